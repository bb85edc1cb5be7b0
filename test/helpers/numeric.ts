import * as fs from 'fs';
import * as path from 'path';
import { Tensor, loadSafetensors } from '../../src';
import { repoRoot } from './env';

/** Folder of the committed parity fixtures of one config (`sd1` or `sd2`). */
export function parityDir(config: string): string {
  return path.join(repoRoot, 'test', 'fixtures', 'parity', config);
}

/** Loads one parity case file (`cases/<name>.safetensors`) as float32/int64 CPU tensors. */
export async function loadCase(config: string, name: string): Promise<Record<string, Tensor>> {
  return (await loadSafetensors(path.join(parityDir(config), 'cases', `${name}.safetensors`))).tensors;
}

/** The values of a tensor as float64 numbers (any dtype and device). */
export async function toFloat64(t: Tensor): Promise<Float64Array> {
  const cpu = t.dtype === 'float64' && t.device === 'cpu' ? t : await t.to({ dtype: 'float64', device: 'cpu' });
  return cpu.toArray() as Float64Array;
}

/** Relative error ‖a − b‖₂ / ‖b‖₂ between two tensors of the same shape (b is the reference). */
export async function relError(a: Tensor, b: Tensor): Promise<number> {
  if (a.shape.join(',') !== b.shape.join(',')) {
    throw new Error(`shape mismatch: [${a.shape.join(', ')}] vs [${b.shape.join(', ')}]`);
  }
  const x = await toFloat64(a);
  const y = await toFloat64(b);
  let num = 0;
  let den = 0;
  for (let i = 0; i < y.length; i++) {
    const d = x[i] - y[i];
    num += d * d;
    den += y[i] * y[i];
  }
  if (!Number.isFinite(num)) return Infinity;
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

/** Largest absolute difference between two tensors of the same shape. */
export async function maxAbsDiff(a: Tensor, b: Tensor): Promise<number> {
  if (a.shape.join(',') !== b.shape.join(',')) {
    throw new Error(`shape mismatch: [${a.shape.join(', ')}] vs [${b.shape.join(', ')}]`);
  }
  const x = await toFloat64(a);
  const y = await toFloat64(b);
  let m = 0;
  for (let i = 0; i < y.length; i++) {
    const d = Math.abs(x[i] - y[i]);
    if (Number.isNaN(d)) return NaN;
    if (d > m) m = d;
  }
  return m;
}

/** The values of a floating-point CPU tensor as plain numbers (exact for float32). */
export function values(t: Tensor): number[] {
  const data = t.toArray();
  if (data instanceof BigInt64Array) throw new Error('values() of an int64 tensor');
  return Array.from(data as Float32Array);
}

/** A parity case as described in `<config>/manifest.json`. */
export interface ParityCase {
  file: string;
  params: Record<string, unknown>;
  inputs: Record<string, { dtype: string; shape: number[] }>;
  expected: Record<string, { dtype: string; shape: number[]; absmax: number }>;
}

const manifests = new Map<string, { cases: Record<string, ParityCase> } & Record<string, unknown>>();

/**
 * `<config>/manifest.json`. Python's json writes ±Infinity and NaN bare (a scheduler config has
 * `lambda_min_clipped: -Infinity`); they are read as ±Infinity / NaN numbers.
 */
export function readManifest(config: string): { cases: Record<string, ParityCase> } & Record<string, unknown> {
  let m = manifests.get(config);
  if (!m) {
    const text = fs.readFileSync(path.join(parityDir(config), 'manifest.json'), 'utf8');
    const quoted = text.replace(/([:[,]\s*)(-?Infinity|NaN)(?=\s*[,\]}])/g, '$1"__$2__"');
    m = JSON.parse(quoted, (_k, v: unknown) =>
      v === '__Infinity__' ? Infinity : v === '__-Infinity__' ? -Infinity : v === '__NaN__' ? NaN : v,
    ) as { cases: Record<string, ParityCase> } & Record<string, unknown>;
    manifests.set(config, m);
  }
  return m;
}
