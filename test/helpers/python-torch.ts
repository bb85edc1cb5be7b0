import { spawnSync } from 'child_process';
import { createHash } from 'crypto';
import * as path from 'path';
import { Tensor, isTorchDict, type TorchValue } from '../../src';
import { repoRoot, runPython } from './env';

let missing: string | null | undefined;

/** Why python3 with torch and safetensors cannot be used here, or null when it can. */
export function pythonTorchMissing(): string | null {
  if (missing !== undefined) return missing;
  const python = process.env.PYTHON || 'python3';
  const r = spawnSync(python, ['-c', 'import torch, safetensors'], { encoding: 'utf8' });
  if (r.error) missing = `${python} cannot be run (${r.error.message})`;
  else if (r.status !== 0) missing = `${python} lacks torch or safetensors (${(r.stderr || '').trim().split('\n').pop()})`;
  else missing = null;
  return missing;
}

/** `it` when the Python reference is available, otherwise `it.skip` (the reason is logged once). */
export function itWithPython(): jest.It {
  const reason = pythonTorchMissing();
  if (reason === null) return it;
  console.warn(`Skipping the Python reference checks: ${reason}`);
  return it.skip;
}

/** Runs test/parity/export_interop.py and parses its JSON. */
export function exportInterop<T = unknown>(args: string[]): T {
  return JSON.parse(runPython([path.join(repoRoot, 'test', 'parity', 'export_interop.py'), ...args])) as T;
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
