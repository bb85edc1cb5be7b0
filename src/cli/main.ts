import { Command, CommanderError } from 'commander';
import { AbortError, CustomDiffusionError, DeviceUnavailableError, InvalidArgumentError, NativeLoadError, OutOfMemoryError } from '../errors';
import { EXIT_INTERRUPTED } from './action';
import { classImagesCommand } from './class-images';
import { composeCommand } from './compose';
import { compressCommand } from './compress';
import { convertCommand } from './convert';
import { demoCommand } from './demo';
import { doctorCommand } from './doctor';
import { inspectCommand } from './inspect';
import { retrieveCommand } from './retrieve';
import { sampleCommand } from './sample';
import { trainCommand } from './train';

/** Exit codes: 0 success, 1 runtime failure, 2 usage error, 130 interrupted (Ctrl-C). */
export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;
export { EXIT_INTERRUPTED };

/** The commands, in the order --help lists them. A new command is one line here. */
export const COMMANDS: (() => Command)[] = [
  trainCommand,
  sampleCommand,
  classImagesCommand,
  retrieveCommand,
  composeCommand,
  compressCommand,
  convertCommand,
  inspectCommand,
  demoCommand,
  doctorCommand,
];

export function buildProgram(): Command {
  const program = new Command('customdiff')
    .description('Custom Diffusion for Node.js: teach Stable Diffusion a new concept from a few photos.')
    .version(require('../../package.json').version as string)
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride()
    .addHelpText(
      'after',
      '\nExit codes: 0 success, 1 failure, 2 usage error, 130 interrupted.\n' +
        'Run "customdiff <command> --help" for a command\'s options and examples.',
    );
  for (const make of COMMANDS) program.addCommand(make());
  // addCommand() does not pass these settings down; usage errors must reach main() to exit with 2.
  for (const c of program.commands) c.exitOverride().showHelpAfterError(`(run "customdiff ${c.name()} --help" for usage)`);
  return program;
}

/** What to do about an error whose message may not say it. */
function hint(e: CustomDiffusionError): string | undefined {
  if (e instanceof OutOfMemoryError) {
    return 'Out of memory: try a smaller --train-batch-size or --resolution, --dtype float16 on CUDA, or another --device.';
  }
  if (e instanceof DeviceUnavailableError && !/doctor/.test(e.message)) return 'Run "customdiff doctor" to see which devices work.';
  if (e instanceof NativeLoadError && !/doctor|rebuild|install/.test(e.message)) return 'Run "customdiff doctor" for details.';
  return undefined;
}

/** Runs the CLI; resolves to the process exit code. */
export async function main(argv: string[]): Promise<number> {
  const verbose = argv.includes('--verbose') || argv.includes('-v');
  try {
    const program = buildProgram();
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : EXIT_OK;
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.exitCode === 0) return EXIT_OK;
      return EXIT_USAGE;
    }
    if (e instanceof AbortError) {
      process.stderr.write(`customdiff: ${e.message}\n`);
      return EXIT_INTERRUPTED;
    }
    if (e instanceof InvalidArgumentError) {
      process.stderr.write(`customdiff: ${e.message}\n`);
      return EXIT_USAGE;
    }
    if (e instanceof CustomDiffusionError) {
      const h = hint(e);
      process.stderr.write(`customdiff: ${e.message}\n${h ? `${h}\n` : ''}${verbose && e.stack ? `${e.stack}\n` : ''}`);
      return EXIT_FAILURE;
    }
    process.stderr.write(`customdiff: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    return EXIT_FAILURE;
  }
}
