/**
 * The command line, called in-process through `main(args)` with temporary
 * folders and tiny runs (base 8, batch 4, T = 20, a few steps).
 */
import assert from "node:assert/strict";
import { decode } from "fast-png";
import { main } from "../cli.ts";
import { decodeSafetensors, listSamplers } from "../mod.ts";

const CLI = new URL("../cli.ts", import.meta.url).pathname;

interface Outcome {
  code: number;
  stdout: string[];
  stderr: string[];
}

/** Run `main(args)` capturing what it prints (console.log: stdout, console.error: stderr). */
async function cli(...args: string[]): Promise<Outcome> {
  const stdout: string[] = [];
  const stderr: string[] = [];
  const { log, error } = console;
  const lines = (xs: unknown[]) => xs.map(String).join(" ").split("\n");
  console.log = (...xs: unknown[]) => stdout.push(...lines(xs));
  console.error = (...xs: unknown[]) => stderr.push(...lines(xs));
  try {
    const code = await main(args);
    return { code, stdout, stderr };
  } finally {
    console.log = log;
    console.error = error;
  }
}

/** A user mistake: the exit code, and exactly one stderr line naming it, with no stack. */
function assertMistake(got: Outcome, code: number, pattern: RegExp): void {
  const shown = got.stderr.join("\n");
  assert.equal(got.code, code, shown);
  const last = got.stderr.at(-1) ?? "";
  assert.match(last, /^ddpm[ :]/, shown);
  assert.match(last, pattern, shown);
  assert.ok(
    !got.stderr.some((l) => /^\s+at /.test(l) || /Error:/.test(l)),
    `stack trace or raw error: ${shown}`,
  );
  // Lines before the error are the backend report, never another error.
  assert.equal(
    got.stderr.filter((l) => l.startsWith("ddpm")).length,
    1,
    shown,
  );
}

const TINY = [
  "--backend",
  "cpu",
  "--dataset",
  "mnist-lite",
  "--base",
  "8",
  "--batch-size",
  "4",
  "--timesteps",
  "20",
  "--lr",
  "1e-3",
];

const root = await Deno.makeTempDir({ prefix: "ddpm_cli_test_" });
const trained = `${root}/tiny`;

let tiny: Promise<Outcome> | null = null;

/** The tiny training run the sampling and mistake tests use: made once, by whichever test comes first. */
function tinyRun(): Promise<Outcome> {
  tiny ??= cli(
    "train",
    ...TINY,
    "--steps",
    "3",
    "--out",
    trained,
    "--sample-n",
    "5",
    "--sample-steps",
    "2",
  );
  return tiny;
}

function gridSize(n: number, size = 32, nrow = 8): [number, number] {
  // torchvision's make_grid with padding 2: cols = min(nrow, n).
  const cols = Math.min(nrow, n);
  const rows = Math.ceil(n / cols);
  return [cols * (size + 2) + 2, rows * (size + 2) + 2];
}

Deno.test("train writes a checkpoint, one metrics line per step, a loss curve and a sample grid", async () => {
  const got = await tinyRun();
  assert.equal(got.code, 0, got.stderr.join("\n"));
  assert.deepEqual(got.stdout.filter((l) => l !== ""), [
    `${trained}/checkpoint.safetensors`,
    `${trained}/metrics.jsonl`,
    `${trained}/loss.png`,
    `${trained}/samples.png`,
  ]);
  const file = decodeSafetensors(
    await Deno.readFile(`${trained}/checkpoint.safetensors`),
  );
  assert.equal(file.metadata.step, "3");
  assert.deepEqual(JSON.parse(file.metadata.config), {
    inChannels: 1,
    base: 8,
    timeDim: 32,
  });
  const training = JSON.parse(file.metadata.training);
  assert.deepEqual(training.schedule, { kind: "linear", T: 20 });
  assert.equal(training.data.batchSize, 4);
  assert.equal(training.data.dataset, "mnist-lite");
  assert.equal(training.optimizer.config.lr, 1e-3);
  // Live, EMA and both AdamW moments of every weight (in_conv as a witness).
  for (
    const key of [
      "in_conv.weight",
      "ema.in_conv.weight",
      "optim.exp_avg.in_conv.weight",
      "optim.exp_avg_sq.in_conv.weight",
    ]
  ) {
    assert.deepEqual(file.tensors.get(key)?.shape, [8, 1, 3, 3], key);
  }
  const lines = (await Deno.readTextFile(`${trained}/metrics.jsonl`))
    .split("\n").filter((l) => l !== "").map((l) => JSON.parse(l));
  assert.deepEqual(lines.map((l) => l.step), [1, 2, 3]);
  assert.ok(lines.every((l) => l.loss > 0 && l.imagesPerSec > 0));
  const grid = decode(await Deno.readFile(`${trained}/samples.png`));
  assert.deepEqual([grid.width, grid.height], gridSize(5));
  const curve = decode(await Deno.readFile(`${trained}/loss.png`));
  assert.deepEqual([curve.width, curve.height], [480, 240]);
  // Progress went to stderr as plain lines (not a terminal).
  assert.ok(got.stderr.some((l) => /^step 1\/3 loss /.test(l)));
});

Deno.test("sample writes the right grid with every registered sampler", async () => {
  assert.equal((await tinyRun()).code, 0);
  for (const plugin of listSamplers()) {
    const n = plugin.name === "ddim" ? 9 : 2;
    const out = `${root}/grid_${plugin.name}.png`;
    const steps = "numSteps" in plugin.options ? ["--steps", "3"] : [];
    const got = await cli(
      "sample",
      "--checkpoint",
      `${trained}/checkpoint.safetensors`,
      "--backend",
      "wasm",
      "--sampler",
      plugin.name,
      "--n",
      String(n),
      "--seed",
      "1",
      "--out",
      out,
      ...steps,
    );
    assert.equal(got.code, 0, `${plugin.name}: ${got.stderr.join("\n")}`);
    assert.deepEqual(got.stdout.filter((l) => l !== ""), [out]);
    const png = decode(await Deno.readFile(out));
    assert.deepEqual([png.width, png.height], gridSize(n), plugin.name);
  }
});

Deno.test("eval prints a distance above its floor and writes the same figures as JSON", async () => {
  assert.equal((await tinyRun()).code, 0);
  const json = `${root}/eval.json`;
  const got = await cli(
    "eval",
    "--checkpoint",
    `${trained}/checkpoint.safetensors`,
    "--backend",
    "wasm",
    "--n",
    "20",
    "--steps",
    "2",
    "--seed",
    "3",
    "--json",
    json,
  );
  assert.equal(got.code, 0, got.stderr.join("\n"));
  const report = JSON.parse(await Deno.readTextFile(json));
  assert.equal(report.n, 20);
  assert.equal(report.dataset, "mnist-lite");
  // 3 training steps cannot make digits: far from real digits, whose own
  // distance (the floor) is small; the histogram counts all 20 samples.
  assert.ok(report.distance > 3 * report.floor, JSON.stringify(report));
  assert.equal(
    report.classHistogram.reduce((a: number, b: number) => a + b, 0),
    20,
  );
  assert.ok(report.realMeanConfidence > 0.9);
  assert.match(
    got.stdout[0],
    new RegExp(
      `^distance ${report.distance.toFixed(2)} \\(floor ${
        report.floor.toFixed(2)
      } at N = 20\\)`,
    ),
  );
  assert.equal(got.stdout[1], json);
});

Deno.test("sample takes a plugin's options as kebab-case flags, --live, and writes npy that numpy's format describes", async () => {
  assert.equal((await tinyRun()).code, 0);
  const out = `${root}/x.npy`;
  const got = await cli(
    "sample",
    "--checkpoint",
    `${trained}/checkpoint.safetensors`,
    "--backend",
    "wasm",
    "--sampler",
    "ddim",
    "--num-steps",
    "2",
    "--eta",
    "0.5",
    "--spacing",
    "trailing",
    "--no-clip-x0",
    "--live",
    "--n",
    "3",
    "--seed",
    "4",
    "--out",
    out,
  );
  assert.equal(got.code, 0, got.stderr.join("\n"));
  assert.ok(
    got.stderr.some((l) =>
      /num-steps 2, eta 0.5, spacing trailing, clip-x0 false/.test(l) &&
      /live weights/.test(l)
    ),
    got.stderr.join("\n"),
  );
  const bytes = await Deno.readFile(out);
  // NPY 1.0: \x93NUMPY, version 1.0, uint16 LE header length, the header, data.
  assert.deepEqual([...bytes.subarray(0, 8)], [
    0x93,
    0x4e,
    0x55,
    0x4d,
    0x50,
    0x59,
    1,
    0,
  ]);
  const headerLen = bytes[8] | (bytes[9] << 8);
  const header = new TextDecoder().decode(bytes.subarray(10, 10 + headerLen));
  assert.match(header, /'descr': '<f4'/);
  assert.match(header, /'fortran_order': False/);
  assert.match(header, /'shape': \(3, 32, 32, 1\)/);
  assert.equal((10 + headerLen) % 64, 0);
  assert.equal(bytes.length, 10 + headerLen + 3 * 32 * 32 * 1 * 4);
  const values = new Float32Array(
    bytes.slice(10 + headerLen).buffer,
  );
  assert.ok(values.every((v) => v >= -1 && v <= 1));
});

Deno.test("N steps straight equal N/2 steps then --resume to N (same safetensors tensors, cpu)", async () => {
  const a = `${root}/straight`;
  const b = `${root}/halves`;
  const common = [...TINY, "--no-samples", "--seed", "7"];
  assert.equal(
    (await cli("train", ...common, "--steps", "4", "--out", a)).code,
    0,
  );
  assert.equal(
    (await cli("train", ...common, "--steps", "2", "--out", b)).code,
    0,
  );
  const resumed = await cli(
    "train",
    "--resume",
    "--backend",
    "cpu",
    "--steps",
    "4",
    "--out",
    b,
    "--no-samples",
  );
  assert.equal(resumed.code, 0, resumed.stderr.join("\n"));
  assert.ok(resumed.stderr.some((l) => /resuming .* at step 2 of 4/.test(l)));
  const fa = decodeSafetensors(
    await Deno.readFile(`${a}/checkpoint.safetensors`),
  );
  const fb = decodeSafetensors(
    await Deno.readFile(`${b}/checkpoint.safetensors`),
  );
  assert.equal(fb.metadata.step, "4");
  assert.deepEqual(
    [...fb.tensors.keys()].sort(),
    [...fa.tensors.keys()].sort(),
  );
  for (const [key, ta] of fa.tensors) {
    const tb = fb.tensors.get(key)!;
    const x = ta.data as Float32Array;
    const y = tb.data as Float32Array;
    let worst = 0;
    for (let i = 0; i < x.length; i++) {
      worst = Math.max(worst, Math.abs(x[i] - y[i]));
    }
    assert.ok(worst <= 1e-6, `${key}: max difference ${worst}`);
  }
  const losses = async (dir: string) =>
    (await Deno.readTextFile(`${dir}/metrics.jsonl`)).split("\n")
      .filter((l) => l !== "").map((l) => JSON.parse(l).loss);
  assert.deepEqual(await losses(b), await losses(a));
});

Deno.test("--help prints USAGE, COMMANDS and OPTIONS on stdout, for the tool and each command", async () => {
  const top = await cli("--help");
  assert.equal(top.code, 0);
  const text = top.stdout.join("\n");
  for (const section of ["USAGE", "COMMANDS", "OPTIONS"]) {
    assert.match(text, new RegExp(`^${section}$`, "m"));
  }
  for (const command of ["train", "sample", "download", "samplers", "info"]) {
    const got = await cli(command, "--help");
    assert.equal(got.code, 0, command);
    const help = got.stdout.join("\n");
    assert.match(help, /^USAGE$/m, command);
    assert.match(help, /^OPTIONS$/m, command);
  }
  // The sampler options come from the plugins' schemas.
  const sample = (await cli("sample", "--help")).stdout.join("\n");
  assert.match(sample, /--num-steps/);
  assert.match(sample, /--clip-x0 \/ --no-clip-x0/);
  assert.match(sample, /--lower-order-final/);
  const none = await cli();
  assert.equal(none.code, 2);
});

Deno.test("info reports the wasm backend's threads and whether ddpm's wasm kernels run", async () => {
  const got = await cli("info", "--backend", "wasm");
  assert.equal(got.code, 0, got.stderr.join("\n"));
  const line = got.stdout.find((l) => l.startsWith("wasm simd")) ?? "";
  assert.match(
    line,
    /^wasm simd yes, threads (yes|no) \(\d+ in use\), ddpm's wasm kernels yes$/,
  );
});

Deno.test("samplers lists every plugin with its options", async () => {
  const got = await cli("samplers");
  assert.equal(got.code, 0);
  const text = got.stdout.join("\n");
  for (const plugin of listSamplers()) {
    assert.match(text, new RegExp(`^${plugin.name}: `, "m"));
  }
  assert.match(text, /--spacing leading\|trailing\|linspace\|karras/);
});

Deno.test("each user mistake gets one line and exit code 2 (usage) or 1 (failure)", async () => {
  assert.equal((await tinyRun()).code, 0);
  const ckpt = `${trained}/checkpoint.safetensors`;
  const garbage = `${root}/garbage.safetensors`;
  await Deno.writeTextFile(garbage, "this is not a safetensors file");
  const aFile = `${root}/a_file`;
  await Deno.writeTextFile(aFile, "");
  const cases: [string[], number, RegExp][] = [
    [["fly"], 2, /unknown command "fly"/],
    [["train", "--bogus"], 2, /unknown option --bogus/],
    [["train", "--batch-size", "0"], 2, /--batch-size out of range \(got "0"/],
    [["train", "--lr", "abc"], 2, /--lr out of range/],
    [
      ["train", "--workers", "0"],
      2,
      /--workers out of range \(got "0", expected auto or an integer in \[1, 8\]\)/,
    ],
    // Flags are checked before the output folder, even one holding a run.
    [
      ["train", "--workers", "0", "--out", trained],
      2,
      /--workers out of range \(got "0"/,
    ],
    [["train", "--schedule", "cubic"], 2, /unknown --schedule \(got "cubic"/],
    [["train", "--steps"], 2, /--steps needs a value/],
    [["train", "extra"], 2, /unexpected argument "extra"/],
    [["train", "--steps", "2", "--epochs", "1"], 2, /--steps or --epochs/],
    [["train", "--out", trained], 2, /already exists: pass --resume/],
    [["train", "--resume", "--out", `${root}/empty`], 1, /no checkpoint/],
    [
      ["train", "--resume", "--out", trained, "--base", "16"],
      2,
      /--base cannot change on --resume/,
    ],
    [["train", "--out", `${aFile}/sub`], 1, /Cannot write output folder/],
    [["sample"], 2, /--checkpoint FILE is required/],
    [["eval"], 2, /--checkpoint FILE is required/],
    [
      ["sample", "--checkpoint", ckpt, "--threads", "9"],
      2,
      /--threads out of range \(got "9", expected auto or an integer in \[1, 8\]\)/,
    ],
    [
      ["eval", "--checkpoint", ckpt, "--threads", "two"],
      2,
      /--threads out of range \(got "two"/,
    ],
    [
      ["eval", "--checkpoint", ckpt, "--dataset", "fashion-mnist"],
      2,
      /unknown --dataset \(got "fashion-mnist", expected mnist-lite or mnist/,
    ],
    [["eval", "--checkpoint", ckpt, "--n", "5000"], 2, /--n out of range/],
    [
      ["sample", "--checkpoint", `${root}/missing.safetensors`],
      1,
      /no such file/,
    ],
    [
      ["sample", "--checkpoint", garbage, "--backend", "wasm"],
      1,
      /Cannot read ".*garbage.safetensors": header length/,
    ],
    [
      ["sample", "--checkpoint", ckpt, "--sampler", "nope"],
      2,
      /unknown name \(got "nope"/,
    ],
    [
      ["sample", "--checkpoint", ckpt, "--eta", "2", "--backend", "wasm"],
      2,
      /eta out of range \(got 2/,
    ],
    [
      ["sample", "--checkpoint", ckpt, "--steps", "50", "--backend", "wasm"],
      2,
      /--num-steps out of range \(got 50, expected in \[1, T = 20\]\)/,
    ],
    [
      ["sample", "--checkpoint", ckpt, "--sampler", "ddpm", "--steps", "5"],
      2,
      /--steps does not apply to sampler ddpm/,
    ],
    [
      ["sample", "--checkpoint", ckpt, "--sampler", "ddpm", "--eta", "1"],
      2,
      /unknown option --eta for sampler ddpm/,
    ],
    [["sample", "--checkpoint", ckpt, "--n", "0"], 2, /--n out of range/],
    [
      ["sample", "--checkpoint", ckpt, "--out", `${aFile}/x.png`],
      1,
      /Cannot write the output folder/,
    ],
    [
      ["sample", "--checkpoint", ckpt, "--out", `${root}/no/such/dir/x.png`],
      1,
      /no such folder/,
    ],
    [["info", "--backend", "tpu"], 2, /unknown --backend \(got "tpu"/],
    [["download", "--dataset", "cifar"], 2, /unknown --dataset/],
  ];
  for (const [args, code, pattern] of cases) {
    assertMistake(await cli(...args), code, pattern);
  }
  // A bad --backend is refused before train makes its output folder.
  const untouched = `${root}/bad_backend_out`;
  assertMistake(
    await cli("train", "--backend", "tpu", "--out", untouched),
    2,
    /unknown --backend \(got "tpu"/,
  );
  assert.equal(
    await Deno.stat(untouched).then(() => true, () => false),
    false,
    "the output folder was made",
  );
});

Deno.test("a checkpoint that is not a training run's cannot be resumed: one line, exit 1", async () => {
  assert.equal((await tinyRun()).code, 0);
  const dir = `${root}/weights_only`;
  await Deno.mkdir(dir);
  // Only the live weights: what a PyTorch state_dict export looks like.
  const file = decodeSafetensors(
    await Deno.readFile(`${trained}/checkpoint.safetensors`),
  );
  const { encodeSafetensors } = await import("../mod.ts");
  const live = new Map(
    [...file.tensors].filter(([k]) => !/^(ema|optim)\./.test(k))
      .map(([k, t]) => [k, { shape: t.shape, data: t.data as Float32Array }]),
  );
  await Deno.writeFile(
    `${dir}/checkpoint.safetensors`,
    encodeSafetensors(live),
  );
  assertMistake(
    await cli("train", "--resume", "--out", dir, "--backend", "cpu"),
    1,
    /Cannot resume training from .*no training state/,
  );
});

Deno.test("sample runs wasm on one thread per core by default, --threads and DDPM_WASM_THREADS choose", async () => {
  assert.equal((await tinyRun()).code, 0);
  // A fresh process each: tfjs picks its wasm build once per process.
  const run = async (extra: string[], env: Record<string, string>) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        CLI,
        "sample",
        "--checkpoint",
        `${trained}/checkpoint.safetensors`,
        "--backend",
        "wasm",
        "--n",
        "2",
        "--steps",
        "2",
        "--seed",
        "3",
        "--out",
        `${root}/threads.png`,
        ...extra,
      ],
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1", ...env },
    }).output();
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, stderr);
    return /^backend wasm, (\d+) threads? /m.exec(stderr)?.[1];
  };
  const cores = Math.min(8, navigator.hardwareConcurrency);
  assert.equal(await run([], { DDPM_WASM_THREADS: "" }), String(cores));
  assert.equal(await run(["--threads", "1"], {}), "1");
  assert.equal(await run([], { DDPM_WASM_THREADS: "1" }), "1");
  assert.equal(
    await run(["--threads", "2"], { DDPM_WASM_THREADS: "1" }),
    "2",
  );
});

for (
  const [signal, code] of [["SIGINT", 130], ["SIGTERM", 143]] as const
) {
  Deno.test(`${signal} during training (${signal === "SIGINT" ? "Ctrl-C" : "kill"}) finishes the step, writes the checkpoint and exits ${code}`, async () => {
    const out = `${root}/interrupted_${signal}`;
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        CLI,
        "train",
        ...TINY,
        "--no-samples",
        "--steps",
        "1000",
        "--out",
        out,
      ],
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    const reader = child.stderr.pipeThrough(new TextDecoderStream())
      .getReader();
    let seen = "";
    while (!/^step 1\/1000/m.test(seen)) {
      const { value, done } = await reader.read();
      if (done) break;
      seen += value;
    }
    child.kill(signal);
    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      seen += value;
    }
    const status = await child.status;
    await child.stdout.cancel();
    assert.equal(status.code, code, seen);
    assert.match(seen, /interrupted/);
    const file = decodeSafetensors(
      await Deno.readFile(`${out}/checkpoint.safetensors`),
    );
    const step = Number(file.metadata.step);
    assert.ok(step >= 1 && step < 1000, seen);
    const lines = (await Deno.readTextFile(`${out}/metrics.jsonl`)).split("\n")
      .filter((l) => l !== "");
    assert.equal(lines.length, step);
  });
}

Deno.test({
  name: "clean up the temporary folder",
  fn: async () => {
    await Deno.remove(root, { recursive: true });
  },
});
