import { spawnSync, type SpawnSyncReturns } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

export const repoRoot = path.resolve(__dirname, '..', '..');

/** A fresh temporary folder, removed by the returned cleanup. */
export function tempDir(prefix = 'cd-test-'): { dir: string; cleanup: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/**
 * Runs a Python script of the parity harness. The test suite needs python3 with torch and
 * safetensors (.ci/run installs them); a missing one is a failure, not a skip.
 */
export function runPython(args: string[], options: { input?: string; env?: NodeJS.ProcessEnv } = {}): string {
  const python = process.env.PYTHON || 'python3';
  const r: SpawnSyncReturns<string> = spawnSync(python, args, {
    encoding: 'utf8',
    input: options.input,
    env: { ...process.env, ...options.env },
    maxBuffer: 64 * 1024 * 1024,
  });
  if (r.status !== 0) throw new Error(`${python} ${args.join(' ')} failed (${r.status}):\n${r.stderr}\n${r.stdout}`);
  return r.stdout;
}

/** Runs the customdiff CLI as a user would. */
export function runCli(args: string[], env: NodeJS.ProcessEnv = {}): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [path.join(repoRoot, 'bin', 'customdiff.js'), ...args], {
    encoding: 'utf8',
    env: { ...process.env, ...env },
    cwd: repoRoot,
  });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}
