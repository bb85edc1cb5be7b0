import { spawnSync } from 'child_process';
import { createHash } from 'crypto';
import * as path from 'path';
import { Tensor, isTorchDict, type TorchValue } from '../../src';
import { repoRoot, runPython } from './env';

const missing = new Map<string, string | null>();

/** Why python3 cannot import `modules` here, or null when it can. */
export function pythonModulesMissing(modules: string[]): string | null {
  const key = modules.join(',');
  if (missing.has(key)) return missing.get(key)!;
  const python = process.env.PYTHON || 'python3';
  const r = spawnSync(python, ['-c', `import ${key}`], { encoding: 'utf8' });
  let reason: string | null = null;
  if (r.error) reason = `${python} cannot be run (${r.error.message})`;
  else if (r.status !== 0) reason = `${python} cannot import ${modules.join(', ')} (${(r.stderr || '').trim().split('\n').pop()})`;
  missing.set(key, reason);
  return reason;
}

/**
 * `it` when python3 can import `modules` (default: torch and safetensors, the Python reference),
 * otherwise `it.skip`, with the reason logged.
 */
export function itWithPython(modules: string[] = ['torch', 'safetensors']): jest.It {
  const reason = pythonModulesMissing(modules);
  if (reason === null) return it;
  console.warn(`Skipping a Python reference check: ${reason}`);
  return it.skip;
}

/** Runs a script of test/parity (default export_interop.py) and parses the JSON it prints. */
export function exportInterop<T = unknown>(args: string[], script = 'export_interop.py'): T {
  return JSON.parse(runPython([path.join(repoRoot, 'test', 'parity', script), ...args])) as T;
}

/** sha256 of a tensor's raw bytes (as export_interop.py computes it). */
export function tensorSha256(t: Tensor): string {
  const a = t.toArray();
  return createHash('sha256').update(Buffer.from(a.buffer, a.byteOffset, a.byteLength)).digest('hex');
}

/** The structure export_interop.py prints, computed from a tree our reader loaded. */
export function structureOf(v: TorchValue): unknown {
  if (v instanceof Tensor) return { __tensor__: { dtype: v.dtype, shape: v.shape, sha256: tensorSha256(v) } };
  if (typeof v === 'bigint') return { __bigint__: String(v) };
  if (Array.isArray(v)) return v.map(structureOf);
  if (isTorchDict(v)) return { __dict__: Object.keys(v).map((k) => [k, structureOf(v[k])]) };
  return v;
}
