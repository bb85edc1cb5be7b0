/**
 * The frame every `customdiff` command runs in: {@link defineAction} wires a command's handler to
 * the config file and presets, a {@link Reporter}, `--threads`, and Ctrl-C (SIGINT/SIGTERM abort the
 * command's signal; a second Ctrl-C quits at once). A new command is its options plus one handler:
 *
 * ```ts
 * export function sampleCommand(): Command {
 *   const cmd = new Command('sample').description('…').requiredOption…;   // its own options
 *   addDeviceOptions(cmd, { dtypes: ['float32', 'float16', 'bfloat16'] });
 *   addOverwriteOption(cmd);
 *   addCommonOptions(cmd);
 *   return defineAction<SampleOptions>(cmd, async (ctx) => {
 *     const device = ctx.device();                // --device, or CUDA when usable
 *     const bar = ctx.reporter.progress({ label: 'sample', total: steps, unit: 'step' });
 *     …generate({ …, signal: ctx.signal, onProgress: (p) => bar.update(p.step) });
 *     ctx.reporter.result(`wrote ${file}`, { files: [file] });
 *   });
 * }
 * ```
 *
 * @packageDocumentation
 */
import { Command } from 'commander';
import { setNumThreads } from '../core/runtime';
import { Reporter } from './output';
import { applyOptionValues, isExplicit, readConfigFile, resolveDevice, usageError, valueSource, type CommonOptions } from './options';

/** Exit code of a command stopped by Ctrl-C (128 + SIGINT, what shells report). */
export const EXIT_INTERRUPTED = 130;

export interface Preset {
  description: string;
  /** Option values by attribute name (`learningRate`), as in a config file. */
  values: Record<string, unknown>;
}

export interface ActionSettings {
  /** Named option sets for `--preset` (the command must define `--preset <name>`). */
  presets?: Record<string, Preset>;
  /** Said on the first Ctrl-C, after "Interrupted: " (default "stopping"). */
  interruptMessage?: string;
}

export interface CommandContext<O> {
  /** The options after the config file and presets were applied. */
  readonly opts: O & CommonOptions;
  readonly cmd: Command;
  readonly reporter: Reporter;
  /** Aborted by Ctrl-C (SIGINT) or SIGTERM. */
  readonly signal: AbortSignal;
  /** Whether the user set an option (command line or config file), not a default or preset. */
  explicit(key: keyof O & string): boolean;
  /** Where an option's value came from (`cli`, `config`, `preset`, `default`, …). */
  source(key: keyof O & string): string | undefined;
  /** `--device` checked, or CUDA when usable, else `cpu`. */
  device(): string;
}

/** Registers `handler` as the command's action inside the shared frame (see the module comment). */
export function defineAction<O extends object>(
  cmd: Command,
  handler: (ctx: CommandContext<O>, ...args: string[]) => Promise<void>,
  settings: ActionSettings = {},
): Command {
  cmd.action(async (...all: unknown[]) => {
    // commander calls action(...positional, opts, command)
    const command = all[all.length - 1] as Command;
    const positional = all.slice(0, -2) as string[];
    await runAction(command, positional, handler, settings);
  });
  return cmd;
}

async function runAction<O extends object>(
  cmd: Command,
  positional: string[],
  handler: (ctx: CommandContext<O>, ...args: string[]) => Promise<void>,
  settings: ActionSettings,
): Promise<void> {
  try {
    // Config file, then the preset (which fills only what neither the command line nor the file set).
    const configFile = cmd.getOptionValue('config') as string | undefined;
    if (configFile !== undefined) applyOptionValues(cmd, readConfigFile(configFile), 'config', `config file ${configFile}`);
    if (settings.presets) {
      const name = cmd.getOptionValue('preset') as string | undefined;
      if (name !== undefined) {
        const preset = settings.presets[name];
        if (!preset) throw usageError(`Unknown preset "${name}"; choose one of: ${Object.keys(settings.presets).join(', ')}`);
        applyOptionValues(cmd, preset.values, 'preset', `preset ${name}`, { onlyUnset: true });
      }
    }
    const o = cmd.opts() as CommonOptions;
    if (o.quiet && o.verbose) throw usageError('--quiet and --verbose contradict each other; give one of them');
  } catch (e) {
    new Reporter({ json: !!cmd.getOptionValue('json') }).error(e);
    throw e;
  }
  const opts = cmd.opts() as O & CommonOptions;
  const reporter = new Reporter({ json: opts.json, quiet: opts.quiet, verbose: opts.verbose, command: cmd.name() });

  const controller = new AbortController();
  let interrupts = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    interrupts += 1;
    if (interrupts === 1) {
      reporter.warn(`Interrupted (${sig}): ${settings.interruptMessage ?? 'stopping'}. Press Ctrl-C again to quit at once.`, { signal: sig });
      controller.abort(new Error(`interrupted by ${sig}`));
    } else {
      reporter.close();
      process.exit(EXIT_INTERRUPTED);
    }
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  let memo: string | undefined;
  const ctx: CommandContext<O> = {
    opts,
    cmd,
    reporter,
    signal: controller.signal,
    explicit: (key) => isExplicit(cmd, key),
    source: (key) => valueSource(cmd, key),
    device: () => (memo ??= resolveDevice((opts as { device?: string }).device)),
  };
  try {
    const threads = (opts as { threads?: number }).threads;
    if (threads !== undefined) setNumThreads(threads);
    await handler(ctx, ...positional);
  } catch (e) {
    reporter.error(e);
    throw e;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    reporter.close();
  }
}
