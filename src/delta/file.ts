/**
 * Reading and writing delta files (safetensors, format `custom-diffusion-delta`, version 1; see
 * src/train/delta-writer.ts for the layout the trainer writes). Kinds:
 *
 * - `full` (trainer) and `merged` (compose): full K/V weights under diffusers names — applied by
 *   **replacing** the base tensors (never added);
 * - `compressed`: per layer `<name>.u` [out×r] and `<name>.v` [r×in] — applied as W0 + u·v.
 *
 * Token rows are stored under the token text (`<new1>`, shape [hidden]).
 */
import { promises as fs } from 'fs';
import * as path from 'path';
import { FileError, InvalidArgumentError } from '../errors';
import { loadSafetensors, saveSafetensors } from '../core/safetensors';
import { Tensor } from '../core/tensor';

export const DELTA_FORMAT = 'custom-diffusion-delta';
export const DELTA_VERSION = 1;
export type DeltaKind = 'full' | 'merged' | 'compressed';

export interface DeltaTokenInfo {
  token: string;
  id: number;
  initializer?: string | null;
  initializer_id?: number | null;
  [key: string]: unknown;
}

export interface Delta {
  kind: DeltaKind;
  version: number;
  freezeModel: string;
  tokens: DeltaTokenInfo[];
  baseModelFingerprint: string | null;
  dtype: string;
  /** Full weights by diffusers name (kinds full/merged). */
  weights: Record<string, Tensor>;
  /** Low-rank factors by diffusers name (kind compressed). */
  factors: Record<string, { u: Tensor; v: Tensor }>;
  /** Token rows by token text, each [hidden]. */
  tokenRows: Record<string, Tensor>;
  /** The raw `__metadata__`. */
  metadata: Record<string, string>;
}

function parseJson(file: string, key: string, text: string | undefined, fallback: unknown): unknown {
  if (text === undefined) return fallback;
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new FileError(`${file}: metadata "${key}" is not valid JSON`, file, { cause: e });
  }
}

/** Reads a delta file (float32 CPU tensors). Throws FileError for anything that is not our format. */
export async function readDelta(file: string): Promise<Delta> {
  const { tensors, metadata } = await loadSafetensors(file, { dtype: 'float32' });
  if (metadata.format !== DELTA_FORMAT) {
    throw new FileError(`${file} is not a Custom Diffusion delta (metadata format is ${JSON.stringify(metadata.format)})`, file);
  }
  const version = Number(metadata.version);
  if (version !== DELTA_VERSION) throw new FileError(`${file}: unsupported delta version ${metadata.version}`, file);
  const kind = metadata.kind as DeltaKind;
  if (kind !== 'full' && kind !== 'merged' && kind !== 'compressed') {
    throw new FileError(`${file}: unknown delta kind ${JSON.stringify(metadata.kind)}`, file);
  }
  const tokens = parseJson(file, 'tokens', metadata.tokens, []) as DeltaTokenInfo[];
  if (!Array.isArray(tokens)) throw new FileError(`${file}: metadata "tokens" must be a list`, file);
  const delta: Delta = {
    kind,
    version,
    freezeModel: metadata.freeze_model ?? 'crossattn_kv',
    tokens,
    baseModelFingerprint: metadata.base_model_fingerprint ?? null,
    dtype: metadata.dtype ?? 'float32',
    weights: {},
    factors: {},
    tokenRows: {},
    metadata,
  };
  const tokenNames = new Set(tokens.map((t) => t.token));
  for (const [name, t] of Object.entries(tensors)) {
    if (tokenNames.has(name)) {
      delta.tokenRows[name] = t;
    } else if (kind === 'compressed' && /\.(u|v)$/.test(name)) {
      const layer = name.slice(0, -2);
      const f = (delta.factors[layer] ??= {} as { u: Tensor; v: Tensor });
      f[name.endsWith('.u') ? 'u' : 'v'] = t;
    } else if (kind === 'compressed' && /^<.*>$/.test(name)) {
      throw new FileError(`${file}: tensor ${name} looks like a token but is not listed in metadata "tokens"`, file);
    } else {
      delta.weights[name] = t;
    }
  }
  for (const t of tokens) {
    if (!(t.token in delta.tokenRows)) throw new FileError(`${file}: no row for token ${t.token}`, file);
  }
  for (const [layer, f] of Object.entries(delta.factors)) {
    if (!f.u || !f.v) throw new FileError(`${file}: layer ${layer} lacks its ${f.u ? 'v' : 'u'} factor`, file);
  }
  return delta;
}

export interface WriteDeltaFileOptions {
  kind: DeltaKind;
  freezeModel: string;
  tokens: DeltaTokenInfo[];
  baseModelFingerprint: string | null;
  weights?: Record<string, Tensor>;
  factors?: Record<string, { u: Tensor; v: Tensor }>;
  /** Token rows by token text, each [hidden] or [1, hidden] (stored as [hidden]). */
  tokenRows: Record<string, Tensor>;
  /** Stored dtype (default float32). */
  dtype?: 'float32' | 'float16';
  /** Extra metadata (string values; objects are JSON-encoded). */
  extra?: Record<string, unknown>;
}

/**
 * Writes a delta file: the one writer of this format (training, merging and compression all use
 * it). Atomic, as {@link saveSafetensors} is.
 */
export async function writeDeltaFile(file: string, o: WriteDeltaFileOptions): Promise<void> {
  const dtype = o.dtype ?? 'float32';
  const out = new Map<string, Tensor>();
  const owned: Tensor[] = [];
  const convert = async (t: Tensor) => {
    if (t.dtype === dtype && t.device === 'cpu') return t;
    const c = await t.to({ dtype, device: 'cpu' });
    owned.push(c);
    return c;
  };
  try {
    for (const n of Object.keys(o.weights ?? {}).sort()) out.set(n, await convert(o.weights![n]));
    for (const n of Object.keys(o.factors ?? {}).sort()) {
      out.set(`${n}.u`, await convert(o.factors![n].u));
      out.set(`${n}.v`, await convert(o.factors![n].v));
    }
    for (const t of o.tokens) {
      const row = o.tokenRows[t.token];
      if (!row) throw new InvalidArgumentError(`writeDeltaFile: no row for token ${t.token}`);
      if (out.has(t.token)) throw new InvalidArgumentError(`writeDeltaFile: token ${t.token} clashes with a tensor name`);
      const shape = row.shape;
      if (!(shape.length === 1 || (shape.length === 2 && shape[0] === 1))) {
        throw new InvalidArgumentError(`writeDeltaFile: the row of ${t.token} must be [hidden] or [1, hidden], got [${shape.join(', ')}]`);
      }
      let r = await convert(row);
      if (shape.length === 2) {
        // [1, hidden] → [hidden]: copied through a typed array (rows are small).
        r = Tensor.fromArray(r.toArray() as ArrayBufferView, [shape[1]], dtype);
        owned.push(r);
      }
      out.set(t.token, r);
    }
    const metadata: Record<string, string> = {
      format: DELTA_FORMAT,
      version: String(DELTA_VERSION),
      kind: o.kind,
      freeze_model: o.freezeModel,
      tokens: JSON.stringify(o.tokens),
      dtype,
    };
    if (o.baseModelFingerprint) metadata.base_model_fingerprint = o.baseModelFingerprint;
    for (const [k, v] of Object.entries(o.extra ?? {})) metadata[k] = typeof v === 'string' ? v : JSON.stringify(v);
    await fs.mkdir(path.dirname(path.resolve(file)), { recursive: true });
    await saveSafetensors(file, out, metadata);
  } finally {
    for (const t of owned) t.dispose();
  }
}

/** A summary of a delta file for inspection (no weights). */
export async function inspectDelta(file: string): Promise<{
  kind: DeltaKind;
  freezeModel: string;
  tokens: DeltaTokenInfo[];
  baseModelFingerprint: string | null;
  layers: { name: string; shape: number[]; rank?: number }[];
  metadata: Record<string, string>;
}> {
  const d = await readDelta(file);
  const layers = [
    ...Object.entries(d.weights).map(([name, t]) => ({ name, shape: t.shape })),
    ...Object.entries(d.factors).map(([name, f]) => ({ name, shape: [f.u.shape[0], f.v.shape[1]], rank: f.u.shape[1] })),
  ].sort((a, b) => a.name.localeCompare(b.name));
  return { kind: d.kind, freezeModel: d.freezeModel, tokens: d.tokens, baseModelFingerprint: d.baseModelFingerprint, layers, metadata: d.metadata };
}
