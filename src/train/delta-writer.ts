/**
 * Writing the result of a Custom Diffusion run: the delta (a safetensors file) and a JSON record of
 * the run.
 *
 * The delta holds **full trained weights, not differences**, as every original delta does (apply
 * it by replacing the base tensors): the trained UNet tensors under their diffusers names (e.g.
 * `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`; 32 K/V tensors for SD1/SD2
 * with `freeze_model` "crossattn_kv", 80 attn2 tensors with "crossattn") and one row per modifier
 * token under the token itself (key `<new1>`, shape [hidden]). `__metadata__` (string values):
 *
 * | key | value |
 * |---|---|
 * | `format` | `custom-diffusion-delta` |
 * | `version` | `1` |
 * | `kind` | `full` (full weights; a later compressed kind will hold low-rank factors) |
 * | `freeze_model` | `crossattn_kv` or `crossattn` |
 * | `tokens` | JSON list of `{token, id, initializer, initializer_id}` in id order |
 * | `base_model_fingerprint` | see {@link computeBaseFingerprint} |
 * | `base_model_fingerprint_algorithm` | `custom-diffusion-kv-sha256/1` |
 * | `base_model` | JSON: what is known of the base model (path, token-embedding shape, ...) |
 * | `dtype` | dtype of the stored tensors (`float32` or `float16`) |
 * | `training_options` | JSON of the training options |
 *
 * @packageDocumentation
 */
import { createHash } from 'crypto';
import { promises as fs } from 'fs';
import * as path from 'path';
import { FileError, InvalidArgumentError } from '../errors';
import { DELTA_FORMAT, DELTA_VERSION, writeDeltaFile } from '../delta/file';
import { Tensor } from '../core/tensor';

export { DELTA_FORMAT, DELTA_VERSION } from '../delta/file';
export const FINGERPRINT_ALGORITHM = 'custom-diffusion-kv-sha256/1';

/** One modifier token of a delta. */
export interface DeltaToken {
  /** The token text, e.g. `<new1>`. */
  token: string;
  /** Its id in the tokenizer it was trained with (49408, 49409, … for CLIP). */
  id: number;
  /** The vocabulary entry its row was initialised from (e.g. `ktn`), or null. */
  initializer: string | null;
  initializerId: number | null;
}

export interface WriteDeltaOptions {
  /** Trained UNet tensors by diffusers name (full weights). */
  unet: Record<string, Tensor>;
  /** Trained token rows by token text, each [hidden] (or [1, hidden]). */
  tokenRows: Record<string, Tensor>;
  freezeModel: 'crossattn_kv' | 'crossattn';
  tokens: DeltaToken[];
  /** {@link computeBaseFingerprint} of the base model the delta was trained on. */
  baseModelFingerprint: string;
  /** What is known of the base model (stored as JSON). */
  baseModel?: Record<string, unknown>;
  /** Stored dtype (default float32, the dtype the weights train in). */
  dtype?: 'float32' | 'float16';
  /** The training options (stored as JSON). */
  trainingOptions?: unknown;
}

/**
 * The fingerprint of a base model that a delta records, so tools can tell whether a delta belongs to
 * a model: SHA-256 (hex) over, for every UNet `attn2.to_k.weight` / `attn2.to_v.weight` in sorted
 * name order, the UTF-8 bytes of `<name>\n<d0>x<d1>\n` followed by the values as little-endian
 * float32, and finally `text_encoder.token_embedding <rows>x<hidden>\n` (the base vocabulary, before
 * tokens are added). The K/V weights must be the base values (before training).
 */
export async function computeBaseFingerprint(kvWeights: Record<string, Tensor>, tokenEmbeddingShape: [number, number]): Promise<string> {
  const names = Object.keys(kvWeights)
    .filter((n) => /attn2\.to_[kv]\.weight$/.test(n))
    .sort();
  if (names.length === 0) throw new InvalidArgumentError('computeBaseFingerprint: no attn2.to_k/to_v weights given');
  const h = createHash('sha256');
  for (const name of names) {
    const t = kvWeights[name];
    const f32 = t.dtype === 'float32' && t.device === 'cpu' ? t : await t.to({ dtype: 'float32', device: 'cpu' });
    h.update(`${name}\n${t.shape.join('x')}\n`, 'utf8');
    const data = f32.toArray() as Float32Array;
    h.update(littleEndian(data));
    if (f32 !== t) f32.dispose();
    // SD's K/V weights are ~77 MB: give the event loop a turn between tensors.
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
  h.update(`text_encoder.token_embedding ${tokenEmbeddingShape[0]}x${tokenEmbeddingShape[1]}\n`, 'utf8');
  return h.digest('hex');
}

function littleEndian(a: Float32Array): Uint8Array {
  const bytes = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  if (new Uint8Array(new Uint16Array([1]).buffer)[0] === 1) return bytes;
  const out = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i += 4) {
    out[i] = bytes[i + 3];
    out[i + 1] = bytes[i + 2];
    out[i + 2] = bytes[i + 1];
    out[i + 3] = bytes[i];
  }
  return out;
}

/** JSON that never throws on bigints, functions or class instances (they are dropped or stringified). */
export function toJsonSafe(value: unknown): unknown {
  const seen = new WeakSet<object>();
  const walk = (v: unknown): unknown => {
    if (v === null || typeof v === 'string' || typeof v === 'boolean') return v;
    if (typeof v === 'number') return Number.isFinite(v) ? v : String(v);
    if (typeof v === 'bigint') return v.toString();
    if (typeof v !== 'object') return undefined; // functions, symbols, undefined
    if (seen.has(v)) return undefined;
    seen.add(v);
    if (Array.isArray(v)) return v.map((x) => walk(x) ?? null);
    const proto = Object.getPrototypeOf(v);
    if (proto !== Object.prototype && proto !== null) return undefined; // models, signals, tensors
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) {
      const w = walk(x);
      if (w !== undefined) out[k] = w;
    }
    return out;
  };
  return walk(value);
}

/**
 * Writes a delta (see the module documentation) atomically: a temporary file in the same folder is
 * renamed over `file` once complete.
 */
export async function writeDelta(file: string, options: WriteDeltaOptions): Promise<void> {
  const { unet, tokenRows, tokens } = options;
  if (options.freezeModel !== 'crossattn_kv' && options.freezeModel !== 'crossattn') {
    throw new InvalidArgumentError(`freezeModel must be 'crossattn_kv' or 'crossattn', got ${String(options.freezeModel)}`);
  }
  const dtype = options.dtype ?? 'float32';
  if (dtype !== 'float32' && dtype !== 'float16') throw new InvalidArgumentError(`dtype must be 'float32' or 'float16', got ${String(dtype)}`);
  if (!/^[0-9a-f]{64}$/.test(options.baseModelFingerprint)) {
    throw new InvalidArgumentError('baseModelFingerprint must be a SHA-256 hex digest (see computeBaseFingerprint)');
  }
  const names = Object.keys(unet).sort();
  if (names.length === 0) throw new InvalidArgumentError('writeDelta: no UNet tensors given');
  for (const t of tokens) {
    if (!(t.token in tokenRows)) throw new InvalidArgumentError(`writeDelta: no row for token ${t.token}`);
    if (t.token in unet) throw new InvalidArgumentError(`writeDelta: the token ${t.token} clashes with a UNet tensor name`);
  }
  if (Object.keys(tokenRows).length !== tokens.length) {
    throw new InvalidArgumentError('writeDelta: tokenRows and tokens must name the same tokens');
  }
  await writeDeltaFile(file, {
    kind: 'full',
    freezeModel: options.freezeModel,
    tokens: [...tokens]
      .sort((a, b) => a.id - b.id)
      .map((t) => ({ token: t.token, id: t.id, initializer: t.initializer, initializer_id: t.initializerId })),
    baseModelFingerprint: options.baseModelFingerprint,
    weights: unet,
    tokenRows,
    dtype,
    extra: {
      base_model_fingerprint_algorithm: FINGERPRINT_ALGORITHM,
      base_model: toJsonSafe(options.baseModel ?? {}),
      training_options: toJsonSafe(options.trainingOptions ?? {}),
    },
  });
}

/** The JSON record of a training run (written next to the delta). */
export interface RunRecord {
  format: 'custom-diffusion-run';
  version: 1;
  startedAt: string;
  finishedAt: string;
  status: 'completed' | 'aborted';
  steps: number;
  options: unknown;
  baseModel: Record<string, unknown>;
  baseModelFingerprint: string;
  tokens: DeltaToken[];
  /** Loss of every optimizer step (index 0 = step 1). */
  losses: number[];
  /** Learning rate of every optimizer step. */
  learningRates: number[];
  /** Seconds per optimizer step, measured. */
  secondsPerStep: number | null;
  delta: string | null;
  checkpoints: string[];
  environment: Record<string, unknown>;
}

/** Writes a run record as pretty JSON, atomically (temporary file + rename). */
export async function writeRunRecord(file: string, record: RunRecord): Promise<void> {
  await writeFileAtomic(file, JSON.stringify(toJsonSafe(record), null, 2) + '\n');
}

/** Writes a file through a temporary file in the same folder and a rename. */
export async function writeFileAtomic(file: string, data: string | Uint8Array): Promise<void> {
  const target = path.resolve(file);
  await fs.mkdir(path.dirname(target), { recursive: true });
  const tmp = `${target}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
  try {
    await fs.writeFile(tmp, data);
    await fs.rename(tmp, target);
  } catch (e) {
    await fs.rm(tmp, { force: true });
    throw new FileError(`Cannot write ${target}: ${(e as Error).message}`, target, { cause: e });
  }
}
