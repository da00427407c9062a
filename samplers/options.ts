/**
 * Typed option schemas for sampler plugins, and their validation.
 *
 * A plugin declares each option it takes (type, default, range, one line of
 * help), so a command line can list, parse and check options without knowing
 * the solver. {@linkcode validateSamplerOptions} applies defaults and checks
 * ranges; every sampler calls it first, so a bad value fails with one line.
 *
 * @module
 */
import { SPACINGS } from "./math.ts";

/** An integer option. `max: "T"` means "at most the schedule's step count". */
export interface IntOptionSpec {
  /** The kind of value. */
  readonly type: "int";
  /** One line of help. */
  readonly description: string;
  /** The value used when the caller gives none; no default means "unset". */
  readonly default?: number;
  /** The smallest value allowed (inclusive). */
  readonly min?: number;
  /** The largest value allowed (inclusive), or "T" for the schedule's step count. */
  readonly max?: number | "T";
}

/** A real-valued option. */
export interface NumberOptionSpec {
  /** The kind of value. */
  readonly type: "number";
  /** One line of help. */
  readonly description: string;
  /** The value used when the caller gives none. */
  readonly default?: number;
  /** The smallest value allowed (inclusive). */
  readonly min?: number;
  /** The largest value allowed (inclusive). */
  readonly max?: number;
}

/** An on/off option. */
export interface BooleanOptionSpec {
  /** The kind of value. */
  readonly type: "boolean";
  /** One line of help. */
  readonly description: string;
  /** The value used when the caller gives none. */
  readonly default?: boolean;
}

/** An option that takes one of a fixed list of strings. */
export interface ChoiceOptionSpec {
  /** The kind of value. */
  readonly type: "choice";
  /** One line of help. */
  readonly description: string;
  /** The strings allowed. */
  readonly choices: readonly string[];
  /** The value used when the caller gives none. */
  readonly default?: string;
}

/** One option of a sampler: its type, default, range and help. */
export type OptionSpec =
  | IntOptionSpec
  | NumberOptionSpec
  | BooleanOptionSpec
  | ChoiceOptionSpec;

/** A sampler's options by name. */
export type OptionsSchema = Readonly<Record<string, OptionSpec>>;

/** Option values after defaults are applied (unset options are absent). */
export type OptionValues = Record<string, number | boolean | string>;

/**
 * The options every sampler takes, besides the run-time ones that are not
 * plain values (`xT`, `signal`, `onStep`).
 */
export const COMMON_OPTIONS: OptionsSchema = {
  n: { type: "int", description: "number of images", default: 1, min: 1 },
  imgSize: {
    type: "int",
    description: "image height and width in pixels",
    default: 32,
    min: 1,
  },
  channels: {
    type: "int",
    description: "channels per pixel",
    default: 1,
    min: 1,
  },
  seed: {
    type: "int",
    description: "seed of the noise; random when unset",
    min: 0,
    max: 4294967295,
  },
};

/** The steps option shared by the few-step solvers. */
export const NUM_STEPS_OPTION: IntOptionSpec = {
  type: "int",
  description: "number of solver steps (the grid decides the exact count)",
  default: 50,
  min: 1,
  max: "T",
};

/** The spacing option shared by the few-step solvers (default "leading"). */
export const SPACING_OPTION: ChoiceOptionSpec = {
  type: "choice",
  description:
    "timestep spacing: leading (reference), trailing, linspace, karras",
  choices: SPACINGS,
  default: "leading",
};

/** Run-time options that are not plain values: never listed, never checked here. */
const RUNTIME_OPTIONS: readonly string[] = ["xT", "signal", "onStep"];

function fail(
  what: string,
  ErrorClass: RangeErrorConstructor | TypeErrorConstructor,
  why: string,
): never {
  throw new ErrorClass(`Cannot ${what}: ${why}`);
}

function checkValue(
  what: string,
  key: string,
  spec: OptionSpec,
  value: unknown,
  T: number | undefined,
): void {
  const shown = typeof value === "string" ? `"${value}"` : String(value);
  switch (spec.type) {
    case "int":
    case "number": {
      if (typeof value !== "number" || Number.isNaN(value)) {
        fail(
          what,
          TypeError,
          `${key} must be a number (got ${shown}, expected a${
            spec.type === "int" ? "n integer" : " number"
          })`,
        );
      }
      if (spec.type === "int" && !Number.isInteger(value)) {
        fail(
          what,
          RangeError,
          `${key} must be an integer (got ${shown}, expected an integer)`,
        );
      }
      const max = spec.max === "T" ? T : spec.max;
      const lo = spec.min ?? -Infinity;
      const hi = max ?? Infinity;
      if (value < lo || value > hi) {
        const range = max === undefined
          ? `>= ${lo}`
          : spec.min === undefined
          ? `<= ${hi}`
          : spec.max === "T"
          ? `in [${lo}, T = ${hi}]`
          : `in [${lo}, ${hi}]`;
        fail(
          what,
          RangeError,
          `${key} out of range (got ${shown}, expected ${range})`,
        );
      }
      return;
    }
    case "boolean":
      if (typeof value !== "boolean") {
        fail(
          what,
          TypeError,
          `${key} must be true or false (got ${shown}, expected a boolean)`,
        );
      }
      return;
    case "choice":
      if (typeof value !== "string" || !spec.choices.includes(value)) {
        fail(
          what,
          RangeError,
          `unknown ${key} (got ${shown}, expected one of ${
            spec.choices.join(", ")
          })`,
        );
      }
      return;
  }
}

/**
 * Apply defaults and check every option against a schema (no common options added).
 *
 * @param what What the caller cannot do when a check fails ("invert with ddim").
 * @param schema The options allowed.
 * @param values The caller's options; `undefined` entries count as unset.
 * @param T The schedule's step count, for options whose `max` is "T".
 * @param passThrough Names allowed without a check (run-time options such as "signal").
 * @returns The values with defaults applied; options without default or value are absent.
 * @throws {TypeError} An option of the wrong type, or an unknown option name.
 * @throws {RangeError} A value out of range, not an integer, or not among the choices.
 * @example
 * ```ts
 * import { validateOptions } from "./options.ts";
 * const schema = { numSteps: { type: "int", description: "steps", default: 50, min: 1, max: "T" } } as const;
 * console.log(validateOptions("invert", schema, {}, 1000).numSteps); // 50
 * ```
 */
export function validateOptions(
  what: string,
  schema: OptionsSchema,
  values: Readonly<Record<string, unknown>>,
  T?: number,
  passThrough: readonly string[] = [],
): OptionValues {
  for (const key of Object.keys(values)) {
    if (!(key in schema) && !passThrough.includes(key)) {
      fail(
        what,
        TypeError,
        `unknown option "${key}" (got "${key}", expected one of ${
          [...Object.keys(schema), ...passThrough].join(", ")
        })`,
      );
    }
  }
  const out: OptionValues = {};
  for (const [key, spec] of Object.entries(schema)) {
    const value = values[key] ?? spec.default;
    if (value === undefined) continue;
    checkValue(what, key, spec, value, T);
    out[key] = value as number | boolean | string;
  }
  return out;
}

/**
 * Apply defaults and check every option against a sampler's schema.
 *
 * Unknown option names are rejected (a typo must not be silently ignored);
 * `xT`, `signal` and `onStep` pass through unchecked. The schema given is
 * merged over {@linkcode COMMON_OPTIONS}.
 *
 * @param samplerName The sampler's name, for the error message.
 * @param schema The sampler's own options.
 * @param values The caller's options; `undefined` entries count as unset.
 * @param T The schedule's step count, for options whose `max` is "T".
 * @returns The values with defaults applied; options without default or value are absent.
 * @throws {TypeError} An option of the wrong type, or an unknown option name.
 * @throws {RangeError} A value out of range, not an integer, or not among the choices.
 * @example
 * ```ts
 * import { validateSamplerOptions } from "./options.ts";
 * const schema = { eta: { type: "number", description: "noise", default: 0, min: 0, max: 1 } } as const;
 * const got = validateSamplerOptions("ddim", schema, { n: 4 }, 1000);
 * console.log(got.n, got.eta, got.imgSize); // 4 0 32
 * try {
 *   validateSamplerOptions("ddim", schema, { eta: 2 }, 1000);
 * } catch (e) {
 *   console.log((e as Error).message); // Cannot sample with ddim: eta out of range (got 2, expected in [0, 1])
 * }
 * ```
 */
export function validateSamplerOptions(
  samplerName: string,
  schema: OptionsSchema,
  values: Readonly<Record<string, unknown>>,
  T?: number,
): OptionValues {
  return validateOptions(
    `sample with ${samplerName}`,
    { ...COMMON_OPTIONS, ...schema },
    values,
    T,
    RUNTIME_OPTIONS,
  );
}

/**
 * Parse one option from command-line text according to its spec.
 *
 * @param name The option's name, for the error message.
 * @param spec The option's spec from a sampler's schema.
 * @param text The text given on the command line.
 * @returns The typed value (range checks are left to {@linkcode validateSamplerOptions}).
 * @throws {TypeError} Text that does not parse as the option's type.
 * @example
 * ```ts
 * import { parseOptionValue } from "./options.ts";
 * const v = parseOptionValue("clipX0", { type: "boolean", description: "clip" }, "false");
 * console.log(v); // false
 * ```
 */
export function parseOptionValue(
  name: string,
  spec: OptionSpec,
  text: string,
): number | boolean | string {
  switch (spec.type) {
    case "int":
    case "number": {
      const v = Number(text);
      if (text.trim() === "" || Number.isNaN(v)) {
        throw new TypeError(
          `Cannot parse option ${name}: not a number (got "${text}", expected a${
            spec.type === "int" ? "n integer" : " number"
          })`,
        );
      }
      return v;
    }
    case "boolean":
      if (["true", "1", "yes", "on"].includes(text)) return true;
      if (["false", "0", "no", "off"].includes(text)) return false;
      throw new TypeError(
        `Cannot parse option ${name}: not a boolean (got "${text}", expected true or false)`,
      );
    case "choice":
      return text;
  }
}
