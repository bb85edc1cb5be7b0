/**
 * Options shared by the `customdiff` commands: argument parsers, the output options (`--json`,
 * `--quiet`, `--verbose`, `--config`), `--overwrite`, the device options (`--device`, `--dtype`,
 * `--threads`), config files and presets, and the checks that keep outputs from being overwritten.
 *
 * Precedence of an option's value: the command line, then the `--config` JSON file, then (where a
 * command has them) values recorded by an earlier run or a `--preset`, then the library defaults.
 *
 * @packageDocumentation
 */
import { Command, InvalidArgumentError as CommanderArgumentError, Option } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { DeviceUnavailableError, InvalidArgumentError } from '../errors';
import { info } from '../core/runtime';

// ---------------------------------------------------------------------------------------------
// Argument parsers (they throw commander's InvalidArgumentError: a usage error, exit code 2)

/** An integer in [min, max]. */
export function intArg(min = 0, max = Number.MAX_SAFE_INTEGER): (value: string) => number {
  return (value) => {
    const v = Number(value);
    if (String(value).trim() === '' || !Number.isInteger(v) || v < min || v > max) {
      throw new CommanderArgumentError(
        max === Number.MAX_SAFE_INTEGER ? `expected an integer ≥ ${min}.` : `expected an integer from ${min} to ${max}.`,
      );
    }
    return v;
  };
}

/** A finite number with optional bounds (`gt`: strictly greater than). */
export function numberArg(bounds: { min?: number; max?: number; gt?: number } = {}): (value: string) => number {
  return (value) => {
    const v = Number(value);
    const ok =
      String(value).trim() !== '' &&
      Number.isFinite(v) &&
      (bounds.min === undefined || v >= bounds.min) &&
      (bounds.max === undefined || v <= bounds.max) &&
      (bounds.gt === undefined || v > bounds.gt);
    if (!ok) {
      const rule = [
        bounds.gt !== undefined ? `> ${bounds.gt}` : undefined,
        bounds.min !== undefined ? `≥ ${bounds.min}` : undefined,
        bounds.max !== undefined ? `≤ ${bounds.max}` : undefined,
      ].filter(Boolean);
      throw new CommanderArgumentError(`expected a number${rule.length ? ' ' + rule.join(' and ') : ''}.`);
    }
    return v;
  };
}

/** A repeatable option: every use appends (`--delta a --delta b`). */
export function collectArg(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

/** A repeatable token list: `--modifier-token "<new1>+<new2>"` or the option given twice. */
export function tokensArg(value: string, previous: string[] | undefined): string[] {
  const parts = value.split('+').map((t) => t.trim());
  if (parts.some((t) => t === '')) throw new CommanderArgumentError('expected tokens joined with "+", e.g. "<new1>+<new2>".');
  return [...(previous ?? []), ...parts];
}

/** `cpu`, `cuda`, `cuda:N` or `auto`. */
export function deviceArg(value: string): string {
  if (value === 'auto' || value === 'cpu' || /^cuda(:\d+)?$/.test(value)) return value;
  throw new CommanderArgumentError('expected cpu, cuda, cuda:N or auto.');
}

// ---------------------------------------------------------------------------------------------
// Shared option sets

/** Options of every command: `--config`, `--json`, `--quiet`, `--verbose`. */
export interface CommonOptions {
  config?: string;
  json?: boolean;
  quiet?: boolean;
  verbose?: boolean;
}

export interface OverwriteOptions {
  overwrite?: boolean;
}

export interface DeviceOptions {
  device?: string;
  dtype?: string;
  threads?: number;
}

const OUTPUT_GROUP = 'Output and config:';
const DEVICE_GROUP = 'Device:';

/** Adds `--config`, `--json`, `-q/--quiet`, `-v/--verbose` (call after the command's own options). */
export function addCommonOptions(cmd: Command): Command {
  cmd.addOption(new Option('--config <file>', 'read options from a JSON file (keys as the long options: "max-train-steps" or "maxTrainSteps"; paths relative to the current folder); the command line wins').helpGroup(OUTPUT_GROUP));
  cmd.addOption(new Option('--json', 'print one JSON event per line on stdout (progress, warnings, the result)').helpGroup(OUTPUT_GROUP));
  cmd.addOption(new Option('-q, --quiet', 'no progress or notes (warnings, errors and the result are still printed)').helpGroup(OUTPUT_GROUP).conflicts('verbose'));
  cmd.addOption(new Option('-v, --verbose', 'more detail: every training step, resolved options, stack traces').helpGroup(OUTPUT_GROUP));
  // -h/--help (created later) joins this group too.
  cmd.optionsGroup(OUTPUT_GROUP);
  return cmd;
}

/** Adds `--overwrite`. */
export function addOverwriteOption(cmd: Command): Command {
  cmd.addOption(new Option('--overwrite', 'replace existing output files (they are never replaced otherwise)').helpGroup(OUTPUT_GROUP));
  return cmd;
}

export interface DeviceOptionSettings {
  /** The accepted `--dtype` values (omit for a command without a dtype choice). */
  dtypes?: string[];
  /** What `--dtype` means for this command. */
  dtypeHelp?: string;
  /** Whether the command takes `--device` (default true). */
  device?: boolean;
}

/** Adds `--device`, `--dtype` and `--threads` (the shared options of model-using commands). */
export function addDeviceOptions(cmd: Command, s: DeviceOptionSettings = {}): Command {
  if (s.device !== false) {
    cmd.addOption(
      new Option('--device <device>', 'cpu, cuda or cuda:N (default: CUDA when usable, else cpu; see "customdiff doctor")').argParser(deviceArg).helpGroup(DEVICE_GROUP),
    );
  }
  if (s.dtypes) {
    cmd.addOption(new Option('--dtype <dtype>', s.dtypeHelp ?? 'model dtype').choices(s.dtypes).helpGroup(DEVICE_GROUP));
  }
  cmd.addOption(new Option('--threads <n>', 'CPU threads for LibTorch operations (default: LibTorch\'s choice)').argParser(intArg(1, 1024)).helpGroup(DEVICE_GROUP));
  return cmd;
}

/** Adds `Examples:` to a command's --help. */
export function addExamples(cmd: Command, examples: string[]): Command {
  return cmd.addHelpText('after', `\nExamples:\n${examples.map((e) => (e.startsWith('#') ? `  ${e}` : `  $ ${e}`)).join('\n')}\n`);
}

// ---------------------------------------------------------------------------------------------
// Usage errors

/** A usage error (exit code 2) whose message says what to do. */
export function usageError(message: string): InvalidArgumentError {
  return new InvalidArgumentError(message);
}

// ---------------------------------------------------------------------------------------------
// Config files and presets

/** `max-train-steps`, `max_train_steps`, `--max-train-steps` → `maxTrainSteps`. */
export function optionKey(key: string): string {
  return key.replace(/^-+/, '').replace(/[-_]+([a-zA-Z0-9])/g, (_, c: string) => c.toUpperCase());
}

/** Where an option's value came from: `cli`, `config`, `preset`, `recorded`, `default` or undefined. */
export function valueSource(cmd: Command, key: string): string | undefined {
  return cmd.getOptionValueSource(key) as string | undefined;
}

/** Whether the user set an option: on the command line or in the config file. */
export function isExplicit(cmd: Command, key: string): boolean {
  const s = valueSource(cmd, key);
  return s === 'cli' || s === 'env' || s === 'config';
}

/** Reads a `--config` file: a JSON object. */
export function readConfigFile(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw usageError(`Cannot read the config file ${file} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); check the --config path`);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw usageError(`The config file ${file} is not valid JSON: ${(e as Error).message}; fix it or drop --config`);
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw usageError(`The config file ${file} must hold a JSON object of options, e.g. {"max-train-steps": 250}`);
  }
  return value as Record<string, unknown>;
}

function optionsByKey(cmd: Command): Map<string, Option[]> {
  const m = new Map<string, Option[]>();
  for (const o of cmd.options) {
    const k = o.attributeName();
    m.set(k, [...(m.get(k) ?? []), o]);
  }
  return m;
}

/** Runs a value from a file through the option's parser, as if it had been typed. */
function coerce(option: Option, raw: unknown, where: string): unknown {
  const flags = option.flags;
  const parse = (v: unknown, previous: unknown): unknown => {
    if (typeof v !== 'string' && typeof v !== 'number') {
      throw usageError(`${where}: ${flags} takes a ${option.variadic ? 'list of values' : 'string or number'}, got ${JSON.stringify(v)}`);
    }
    if (!option.parseArg) return String(v);
    try {
      return option.parseArg(String(v), previous);
    } catch (e) {
      throw usageError(`${where}: ${flags} value ${JSON.stringify(v)} is invalid: ${(e as Error).message}`);
    }
  };
  if (option.isBoolean() || option.negate) {
    if (typeof raw !== 'boolean') throw usageError(`${where}: ${flags} is a switch; give true or false, got ${JSON.stringify(raw)}`);
    return raw;
  }
  if (option.optional && typeof raw === 'boolean') return raw ? (option.presetArg ?? true) : undefined;
  if (Array.isArray(raw)) {
    let acc: unknown = undefined;
    for (const v of raw) acc = parse(v, acc);
    return acc;
  }
  return parse(raw, undefined);
}

/**
 * Sets option values from a plain object (a config file or a preset). Values already given on the
 * command line are kept; with `onlyUnset`, so are values from any other source but defaults.
 * Unknown keys are usage errors that list the known ones.
 */
export function applyOptionValues(
  cmd: Command,
  values: Record<string, unknown>,
  source: string,
  where: string,
  settings: { onlyUnset?: boolean; ignore?: string[] } = {},
): void {
  const byKey = optionsByKey(cmd);
  for (const [rawKey, raw] of Object.entries(values)) {
    let key = optionKey(rawKey);
    let value = raw;
    if (settings.ignore?.includes(key)) continue;
    if (!byKey.has(key) && /^no[A-Z]/.test(key)) {
      // "no-hflip": true
      const positive = key[2].toLowerCase() + key.slice(3);
      if (byKey.has(positive) && typeof raw === 'boolean') {
        key = positive;
        value = !raw;
      }
    }
    const options = byKey.get(key);
    if (!options || key === 'config' || key === 'help' || key === 'version') {
      const known = [...byKey.keys()].filter((k) => k !== 'config').map((k) => byKey.get(k)![0].long?.replace(/^--(no-)?/, ''));
      throw usageError(`${where}: unknown option "${rawKey}" for "customdiff ${cmd.name()}"; known: ${[...new Set(known)].join(', ')}`);
    }
    const current = valueSource(cmd, key);
    if (current === 'cli' || current === 'env') continue;
    if (settings.onlyUnset && current !== undefined && current !== 'default') continue;
    if (value === null) continue;
    const option = options.find((o) => !o.negate) ?? options[0];
    const v = coerce(option, value, where);
    if (v === undefined) continue;
    cmd.setOptionValueWithSource(key, v, source);
  }
}

// ---------------------------------------------------------------------------------------------
// Devices

/**
 * The device to use: the requested one after checking it exists, or CUDA when usable, else the CPU.
 * A missing CUDA is a DeviceUnavailableError whose message says what to do.
 */
export function resolveDevice(requested: string | undefined): string {
  const i = info();
  if (requested === undefined || requested === 'auto') return i.cudaAvailable ? 'cuda' : 'cpu';
  if (requested === 'cpu') return 'cpu';
  if (!i.cudaAvailable) {
    const why = i.libtorch.cuda ? 'no usable CUDA driver or GPU was found' : 'the LibTorch in use is a CPU build';
    throw new DeviceUnavailableError(`--device ${requested}: CUDA is not usable here (${why}); run "customdiff doctor" for details, or use --device cpu`);
  }
  const m = /^cuda:(\d+)$/.exec(requested);
  if (m && Number(m[1]) >= i.cudaDeviceCount) {
    throw new DeviceUnavailableError(
      `--device ${requested}: there ${i.cudaDeviceCount === 1 ? 'is 1 CUDA device (cuda:0)' : `are ${i.cudaDeviceCount} CUDA devices (cuda:0 to cuda:${i.cudaDeviceCount - 1})`}; pick one of them`,
    );
  }
  return requested;
}

// ---------------------------------------------------------------------------------------------
// Outputs

/**
 * Refuses to replace an existing file unless `overwrite` (a usage error that says how to proceed).
 * Also refuses a path that is an existing folder.
 */
export function checkOutputFile(file: string, overwrite: boolean | undefined, flag = '--output'): void {
  let st: fs.Stats | undefined;
  try {
    st = fs.statSync(file);
  } catch {
    return;
  }
  if (st.isDirectory()) throw usageError(`${flag} ${file} is a folder; give a file name, e.g. ${path.join(file, 'delta.safetensors')}`);
  if (!overwrite) throw usageError(`${file} already exists; pass --overwrite to replace it, or choose another ${flag}`);
}

/** Resolves a path given on the command line or in a config file against the current folder. */
export function resolvePath(p: string | undefined): string | undefined {
  return p === undefined ? undefined : path.resolve(p);
}
