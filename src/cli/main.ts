import { Command, CommanderError } from 'commander';
import { CustomDiffusionError, InvalidArgumentError } from '../errors';
import { doctorCommand } from './doctor';

/** Exit codes: 0 success, 1 runtime failure, 2 usage error. */
export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

export function buildProgram(): Command {
  const program = new Command('customdiff')
    .description('Custom Diffusion for Node.js: teach Stable Diffusion a new concept from a few photos.')
    .version(require('../../package.json').version as string)
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride();
  program.addCommand(doctorCommand());
  // addCommand() does not pass these settings down; usage errors must reach main() to exit with 2.
  for (const c of program.commands) c.exitOverride().showHelpAfterError('(run with --help for usage)');
  return program;
}

/** Runs the CLI; resolves to the process exit code. */
export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : EXIT_OK;
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.exitCode === 0) return EXIT_OK;
      return EXIT_USAGE;
    }
    if (e instanceof InvalidArgumentError) {
      process.stderr.write(`customdiff: ${e.message}\n`);
      return EXIT_USAGE;
    }
    if (e instanceof CustomDiffusionError) {
      process.stderr.write(`customdiff: ${e.message}\n`);
      return EXIT_FAILURE;
    }
    process.stderr.write(`customdiff: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    return EXIT_FAILURE;
  }
}
