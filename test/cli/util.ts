import { spawn, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { repoRoot } from '../helpers/env';
import { pattern, writeImage } from '../train/util';

export const BIN = path.join(repoRoot, 'bin', 'customdiff.js');
export const MODEL = path.join(repoRoot, 'test', 'fixtures', 'parity', 'sd1', 'model');

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs `customdiff` as a user would (synchronously) in `cwd`. */
export function cli(args: string[], cwd: string, env: NodeJS.ProcessEnv = {}): CliResult {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', cwd, env: { ...process.env, ...env }, maxBuffer: 64 * 1024 * 1024 });
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
}

/**
 * Runs `customdiff` without blocking the event loop (for tests that serve HTTP or send signals).
 * `onLine` sees every stdout line as it arrives.
 */
export function cliAsync(
  args: string[],
  cwd: string,
  onLine?: (line: string, child: ReturnType<typeof spawn>) => void,
): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd, env: process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let pending = '';
    child.stdout.setEncoding('utf8');
    child.stderr.setEncoding('utf8');
    child.stdout.on('data', (d: string) => {
      stdout += d;
      pending += d;
      let i: number;
      while ((i = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, i);
        pending = pending.slice(i + 1);
        onLine?.(line, child);
      }
    });
    child.stderr.on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

/** The JSON events of a --json run (every stdout line must be one). */
export function events(stdout: string): Array<Record<string, unknown> & { event: string }> {
  return stdout
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as Record<string, unknown> & { event: string });
}

/** Small training folders: two instance sets and one class set of 64×64 PNGs. */
export async function writeImageFolders(dir: string): Promise<{ inst1: string; inst2: string; cls: string }> {
  const inst1 = path.join(dir, 'data', 'man');
  const inst2 = path.join(dir, 'data', 'dog');
  const cls = path.join(dir, 'reg', 'man');
  for (let i = 0; i < 3; i++) await writeImage(path.join(inst1, `${i}.png`), 64, 64, pattern(i + 1));
  for (let i = 0; i < 3; i++) await writeImage(path.join(inst2, `${i}.png`), 64, 64, pattern(i + 21));
  for (let i = 0; i < 4; i++) await writeImage(path.join(cls, `${i}.png`), 64, 80, pattern(i + 11));
  return { inst1, inst2, cls };
}

/**
 * Options that make training take well under a second per step on the tiny fixture model: 32 px,
 * batch 1, no scale augmentation (tiny pastes at 32 px would leave empty masks), a raw vocabulary
 * entry of the tiny tokenizer as initializer (it has no "ktn").
 */
export const FAST = ['-m', MODEL, '--resolution', '32', '--train-batch-size', '1', '--noaug', '--initializer-token', 'man</w>', '--learning-rate', '1e-4'];

export function mtime(file: string): number {
  return fs.statSync(file).mtimeMs;
}
