/**
 * Multi-concept merging of Custom Diffusion deltas by the paper's closed-form constrained
 * optimisation ("composenW"). For each K/V layer with base weight W0:
 *
 *   min_W ‖K Wᵀ − K W0ᵀ‖²_F  subject to  W K_tᵀ = V_tᵀ
 *
 * where K stacks text embeddings of regularisation captions (keep the base model's behaviour on
 * everyday prompts) and K_t/V_t stack, per concept, the embeddings of its target prompts and their
 * outputs under that concept's own fine-tuned weight. The native side solves it in float64 with
 * factorised solves (no explicit inverse); see native/custom_diffusion/compose.h.
 *
 * This file holds the numerical entry point ({@link composeLayers}) and the prompt rules of the
 * paper's diffusers (DF) variant ({@link targetPrompts}, {@link selectEmbeddingRows}).
 */
import { callCancellable, type Dtype, type NativeProgress } from '../native';
import { Tensor } from '../core/tensor';
import { AbortError, FileError, InvalidArgumentError } from '../errors';
import { deltaBinding } from './native-delta';
import { existsSync, readFileSync } from 'fs';
import * as path from 'path';
import { loadSafetensors, readSafetensorsHeader } from '../core/safetensors';
import { findWeightFiles } from '../model/files';
import { ClipTokenizer } from '../model/tokenizer';
import { TextEncoder } from '../model/text-encoder';
import { UNet } from '../model/unet';
import { readDelta, writeDeltaFile, type Delta, type DeltaTokenInfo } from './file';

export interface ComposeConceptInput {
  /** The concept's target rows K_t,k [m_k × width]. */
  keys: Tensor;
  /** The concept's fine-tuned full weights by layer name (a missing layer means the base weight). */
  weights: Record<string, Tensor>;
}

export interface ComposeLayerReport {
  name: string;
  /** Mean over target rows of ‖W k − v‖. */
  constraintResidual: number;
  /** ‖W K_tᵀ − V_tᵀ‖_F / ‖V_tᵀ‖_F. */
  relConstraintResidual: number;
  /** Mean over regularisation rows of ‖W k − W0 k‖. */
  regError: number;
}

export interface ComposeLayersResult {
  weights: Record<string, Tensor>;
  layers: ComposeLayerReport[];
  /** Target rows after duplicate removal. */
  targetRows: number;
  duplicateRows: number;
  regRows: number;
  /** Factorisation used for KᵀK: `cholesky`, or `lu` when KᵀK is not numerically positive-definite. */
  solver: string;
}

export interface ComposeLayersOptions {
  /** dtype of the merged weights (default float32). */
  outDtype?: Dtype;
  onProgress?: (p: { done: number; total: number }) => void;
  signal?: AbortSignal;
}

/**
 * The closed-form merge of every layer of `base` (W0 by name) given the concepts' target rows and
 * fine-tuned weights and the regularisation rows `regKeys` [N × width]. Duplicate target rows
 * (mean |difference| == 0, as the paper's code tests it) are removed first.
 */
export async function composeLayers(
  base: Record<string, Tensor>,
  concepts: ComposeConceptInput[],
  regKeys: Tensor,
  options: ComposeLayersOptions = {},
): Promise<ComposeLayersResult> {
  if (concepts.length === 0) throw new InvalidArgumentError('compose: no concepts');
  const { onProgress, signal, outDtype } = options;
  const raw = await callCancellable(signal, (token) =>
    deltaBinding().compose(
      Object.fromEntries(Object.entries(base).map(([k, t]) => [k, t.handle])),
      concepts.map((c) => ({
        keys: c.keys.handle,
        weights: Object.fromEntries(Object.entries(c.weights).map(([k, t]) => [k, t.handle])),
      })),
      regKeys.handle,
      { outDtype },
      onProgress ? (p: NativeProgress) => onProgress({ done: Number(p.done), total: Number(p.total) }) : undefined,
      token,
    ),
  );
  return {
    weights: Object.fromEntries(Object.entries(raw.weights).map(([k, t]) => [k, new Tensor(t)])),
    layers: raw.layers,
    targetRows: raw.targetRows,
    duplicateRows: raw.duplicateRows,
    regRows: raw.regRows,
    solver: raw.solver,
  };
}

/**
 * The target prompts of one concept, as the paper's diffusers variant builds them: s = "<newk>
 * {category}" (or "{category}" for a token-less delta); if "art" is a substring of s (so "cart" and
 * "party" count too): [s, "painting in the style of " + s], else [s, "photo of a " + s].
 */
export function targetPrompts(category: string, token: string | null): string[] {
  const s = token ? `${token} ${category}` : category;
  return s.includes('art') ? [s, `painting in the style of ${s}`] : [s, `photo of a ${s}`];
}

/**
 * Which token positions of a prompt's encoder output become rows: drop BOS (position 0), or
 * positions 0–3 when "photo of a" occurs within the first 15 characters of the raw prompt; keep
 * through the first EOS inclusive; no padding. `ids` are the unpadded token ids (BOS … EOS).
 */
export function selectEmbeddingRows(prompt: string, ids: number[], eosId: number): { start: number; end: number } {
  const start = prompt.slice(0, 15).includes('photo of a') ? 4 : 1;
  const eos = ids.indexOf(eosId, 1);
  const end = (eos < 0 ? ids.length - 1 : eos) + 1;
  if (end <= start) throw new InvalidArgumentError(`compose: prompt "${prompt}" has no rows after the dropped positions`);
  return { start, end };
}

// ---------------------------------------------------------------------------------------------
// Merging N single-concept delta files against a base model folder.


const KV_NAME = /attn2\.to_[kv]\.weight$/;

/** The default regularisation captions shipped with the library (one per line). */
export function defaultRegularizationCaptionsFile(): string {
  // Next to this file (src/delta) or, when running from lib/delta, in the package's src/delta.
  const candidates = [
    path.join(__dirname, 'regularization-captions.txt'),
    path.join(__dirname, '..', '..', 'src', 'delta', 'regularization-captions.txt'),
  ];
  const found = candidates.find((c) => existsSync(c));
  if (!found) throw new FileError(`The default regularisation captions were not found (looked at ${candidates.join(', ')})`, candidates[0]);
  return found;
}

/** Reads a caption file: stripped non-empty lines. */
export function readCaptions(file: string): string[] {
  return readFileSync(file, 'utf8')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.length > 0);
}

export interface ComposeDeltasOptions {
  /** Single-concept deltas (files in our format, or already read), in the order that numbers the tokens. */
  deltas: (string | Delta)[];
  /** One category per delta ("cat", "wooden pot"). */
  categories: string[];
  /** The base model folder (diffusers layout: unet/, text_encoder/, tokenizer/). */
  baseModel: string;
  /** Caption file or list (default: the shipped list). */
  regularizationCaptions?: string | string[];
  /** Use only the first n captions (default 200, as the paper's code; Infinity for all). */
  maxCaptions?: number;
  /** Write the merged delta here. */
  output?: string;
  /** Merge even when the deltas record different base models. */
  force?: boolean;
  onProgress?: (p: { stage: string; done: number; total: number }) => void;
  signal?: AbortSignal;
}

export interface ComposeConceptRecord {
  source: string;
  category: string;
  /** The token of the merged delta (`<newk>`), or null for a token-less concept. */
  token: string | null;
  /** The input delta's token the row came from. */
  sourceToken: string | null;
  prompts: string[];
}

export interface ComposeDeltasResult extends ComposeLayersResult {
  /** The merged delta (kind `merged`). */
  delta: Delta;
  concepts: ComposeConceptRecord[];
  regCaptions: number;
}

/** Rows (per the DF selection rule) of each prompt's last hidden state, stacked as float64 [rows × hidden]. */
export async function embedPrompts(prompts: string[], tok: ClipTokenizer, enc: TextEncoder, batch = 64): Promise<Tensor> {
  const hidden = enc.hiddenSize;
  const chunks: Float64Array[] = [];
  let rows = 0;
  for (let i = 0; i < prompts.length; i += batch) {
    const part = prompts.slice(i, i + batch);
    const ids = tok.encodeBatch(part, { truncation: true, maxLength: 77 });
    const len = Math.max(...ids.map((r) => r.length));
    // Right padding with EOS: the text encoder's causal mask keeps the rows through EOS unaffected.
    const flat = new BigInt64Array(part.length * len);
    ids.forEach((r, b) => {
      for (let j = 0; j < len; j++) flat[b * len + j] = BigInt(j < r.length ? r[j] : tok.eosTokenId);
    });
    const input = Tensor.fromArray(flat, [part.length, len]);
    const out = await enc.encode(input);
    input.dispose();
    const f64 = await out.to({ dtype: 'float64' });
    out.dispose();
    const data = f64.toArray() as Float64Array;
    f64.dispose();
    ids.forEach((r, b) => {
      const { start, end } = selectEmbeddingRows(part[b], r, tok.eosTokenId);
      chunks.push(data.slice((b * len + start) * hidden, (b * len + end) * hidden));
      rows += end - start;
    });
  }
  const all = new Float64Array(rows * hidden);
  let o = 0;
  for (const c of chunks) {
    all.set(c, o);
    o += c.length;
  }
  return Tensor.fromArray(all, [rows, hidden]);
}

/** The base model's K/V weights (float32) of the given names, read straight from the UNet weight files. */
export async function loadBaseLayers(modelDir: string, names: string[]): Promise<Record<string, Tensor>> {
  const unetDir = path.join(modelDir, 'unet');
  const { format, files } = findWeightFiles(unetDir, 'diffusion_pytorch_model');
  if (format === 'safetensors') {
    const out: Record<string, Tensor> = {};
    for (const f of files) {
      const have = new Set((await readSafetensorsHeader(f)).entries.map((e) => e.name));
      const want = names.filter((n) => have.has(n));
      if (want.length === 0) continue;
      Object.assign(out, (await loadSafetensors(f, { names: want, dtype: 'float32' })).tensors);
    }
    const missing = names.filter((n) => !(n in out));
    if (missing.length > 0) throw new InvalidArgumentError(`The base UNet has no layer ${missing[0]} (a delta for another model?)`);
    return out;
  }
  const unet = await UNet.load(unetDir);
  try {
    const params = unet.allParameters();
    const out: Record<string, Tensor> = {};
    for (const n of names) {
      if (!params[n]) throw new InvalidArgumentError(`The base UNet has no layer ${n} (a delta for another model?)`);
      out[n] = new Tensor(deltaBinding().clone(params[n].handle));
    }
    return out;
  } finally {
    unet.dispose();
  }
}

/**
 * Merges single-concept deltas into one (kind `merged`) by the closed form, as the paper's diffusers
 * variant does: concept k (path order) gets the token `<newk>` when its delta has a token (its first
 * token's row; any other tokens are dropped), new ids are given in order to token-bearing concepts
 * (vocabulary size, +1, …), target prompts follow {@link targetPrompts}, embedding rows follow
 * {@link selectEmbeddingRows}. Only the attn2 to_k/to_v layers are merged (to_q/to_out of
 * `crossattn` deltas are dropped, as in the paper). Embeddings are computed in float32.
 */
export async function composeDeltas(options: ComposeDeltasOptions): Promise<ComposeDeltasResult> {
  const { categories, baseModel, onProgress, signal } = options;
  if (options.deltas.length === 0) throw new InvalidArgumentError('composeDeltas: no deltas');
  if (categories.length !== options.deltas.length) {
    throw new InvalidArgumentError(`composeDeltas: ${options.deltas.length} deltas but ${categories.length} categories`);
  }
  const deltas: Delta[] = [];
  const sources: string[] = [];
  for (const d of options.deltas) {
    deltas.push(typeof d === 'string' ? await readDelta(d) : d);
    sources.push(typeof d === 'string' ? path.resolve(d) : '(in memory)');
  }
  deltas.forEach((d, i) => {
    if (d.kind === 'compressed') throw new InvalidArgumentError(`composeDeltas: ${sources[i]} is compressed; merging needs full weights`);
  });
  const fps = new Set(deltas.map((d) => d.baseModelFingerprint).filter((f): f is string => !!f));
  if (fps.size > 1 && !options.force) {
    throw new InvalidArgumentError('composeDeltas: the deltas were trained on different base models (fingerprints differ); pass force to merge anyway');
  }
  const names = [...new Set(deltas.flatMap((d) => Object.keys(d.weights).filter((n) => KV_NAME.test(n))))].sort();
  if (names.length === 0) throw new InvalidArgumentError('composeDeltas: the deltas hold no attn2 to_k/to_v weights');

  const captions = Array.isArray(options.regularizationCaptions)
    ? options.regularizationCaptions
    : readCaptions(options.regularizationCaptions ?? defaultRegularizationCaptionsFile());
  const reg = captions.slice(0, options.maxCaptions ?? 200);
  if (reg.length === 0) throw new InvalidArgumentError('composeDeltas: no regularisation captions');

  const tok = await ClipTokenizer.fromFolder(path.join(baseModel, 'tokenizer'));
  const enc = await TextEncoder.load(path.join(baseModel, 'text_encoder'));
  const owned: Tensor[] = [];
  try {
    // Tokens: <newk> for token-bearing concept k, ids in path order.
    const records: ComposeConceptRecord[] = [];
    const tokens: DeltaTokenInfo[] = [];
    const tokenRows: Record<string, Tensor> = {};
    deltas.forEach((d, i) => {
      const k = i + 1;
      const first = d.tokens[0];
      if (first && d.tokenRows[first.token].shape.at(-1) !== enc.hiddenSize) {
        throw new InvalidArgumentError(`composeDeltas: ${sources[i]}'s token row width does not match the text encoder (${enc.hiddenSize})`);
      }
      const token = first ? `<new${k}>` : null;
      records.push({ source: sources[i], category: categories[i], token, sourceToken: first?.token ?? null, prompts: targetPrompts(categories[i], token) });
      if (!first || !token) return;
      if (tok.tokenId(token) !== undefined) throw new InvalidArgumentError(`composeDeltas: the base tokenizer already has ${token}`);
      const id = tok.addTokens([token])[0];
      tokens.push({ token, id, source: sources[i], source_token: first.token, category: categories[i] });
      tokenRows[token] = d.tokenRows[first.token];
    });
    if (tokens.length > 0) {
      enc.resizeTokenEmbeddings(Math.max(...tokens.map((t) => t.id)) + 1);
      const rows = Tensor.fromArray(
        new Float32Array(tokens.flatMap((t) => Array.from(tokenRows[t.token].toArray() as Float32Array))),
        [tokens.length, enc.hiddenSize],
      );
      enc.setTokenRows(tokens.map((t) => t.id), rows);
      rows.dispose();
    }

    onProgress?.({ stage: 'embed', done: 0, total: deltas.length + 1 });
    const concepts: ComposeConceptInput[] = [];
    for (let i = 0; i < deltas.length; i++) {
      if (signal?.aborted) throw new AbortError('The operation was aborted.');
      const keys = await embedPrompts(records[i].prompts, tok, enc);
      owned.push(keys);
      concepts.push({ keys, weights: Object.fromEntries(names.filter((n) => n in deltas[i].weights).map((n) => [n, deltas[i].weights[n]])) });
      onProgress?.({ stage: 'embed', done: i + 1, total: deltas.length + 1 });
    }
    const regKeys = await embedPrompts(reg, tok, enc);
    owned.push(regKeys);
    onProgress?.({ stage: 'embed', done: deltas.length + 1, total: deltas.length + 1 });

    const base = await loadBaseLayers(baseModel, names);
    owned.push(...Object.values(base));
    const merged = await composeLayers(base, concepts, regKeys, {
      signal,
      onProgress: onProgress ? (p) => onProgress({ stage: 'merge', ...p }) : undefined,
    });
    const delta: Delta = {
      kind: 'merged',
      version: 1,
      freezeModel: 'crossattn_kv',
      tokens,
      baseModelFingerprint: fps.size === 1 ? [...fps][0] : null,
      dtype: 'float32',
      weights: merged.weights,
      factors: {},
      tokenRows,
      metadata: {},
    };
    const extra = {
      concepts: records,
      compose: {
        method: 'closed-form (Custom Diffusion composenW, diffusers variant prompts)',
        regularization_captions: reg.length,
        reg_rows: merged.regRows,
        target_rows: merged.targetRows,
        duplicate_rows: merged.duplicateRows,
        solver: merged.solver,
        layers: merged.layers,
      },
    };
    if (options.output) {
      await writeDeltaFile(options.output, {
        kind: 'merged',
        freezeModel: delta.freezeModel,
        tokens,
        baseModelFingerprint: delta.baseModelFingerprint,
        weights: merged.weights,
        tokenRows,
        extra,
      });
    }
    delta.metadata = Object.fromEntries(Object.entries(extra).map(([k, v]) => [k, JSON.stringify(v)]));
    return { ...merged, delta, concepts: records, regCaptions: reg.length };
  } finally {
    for (const t of owned) t.dispose();
    enc.dispose();
  }
}
