/**
 * The ddpm command line.
 *
 * @module
 */
import { initBackend, tf } from "./mod.ts";

const USAGE = `ddpm: train and sample denoising diffusion models

USAGE
  deno run -A cli.ts <command> [options]

COMMANDS
  info      show Deno, tfjs and backend versions and the adapter

OPTIONS
  -h, --help  show this help
`;

/**
 * Run the command line.
 *
 * @param args The arguments after the program name.
 * @returns The exit code: 0 ok, 1 failure, 2 usage error.
 */
export async function main(args: string[]): Promise<number> {
  const [command, ...rest] = args;
  if (command === undefined || command === "-h" || command === "--help") {
    console.log(USAGE);
    return command === undefined ? 2 : 0;
  }
  if (command === "info") {
    const backend = (rest[0] as "auto" | undefined) ?? "auto";
    const got = await initBackend(backend);
    console.log(`deno ${Deno.version.deno}, tfjs-core ${tf.version_core}`);
    console.log(`backend ${got.backend} (${got.reason})`);
    console.log(
      `adapter ${got.adapter ?? "none"}${
        got.softwareAdapter ? " (software)" : ""
      }`,
    );
    return 0;
  }
  console.error(
    `ddpm: unknown command "${command}" (expected one of: info); see --help`,
  );
  return 2;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
