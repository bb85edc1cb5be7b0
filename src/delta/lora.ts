/**
 * LoRA export of a Custom Diffusion delta, for tools that load kohya-style LoRAs (AUTOMATIC1111 /
 * Forge, ComfyUI, kohya's sd-scripts, diffusers' `load_lora_weights`).
 *
 * **The LoRA file** (`<folder>/<loraName>.safetensors`): for each attn2 to_k/to_v layer of the UNet,
 * under kohya's key for the diffusers module path (`lora_unet_` + the path with `.` → `_`, e.g.
 * `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k`, as sd-scripts'
 * networks/lora.py names them for SD1.x/SD2.x):
 * - `<key>.lora_down.weight` [r, in] = v (rows of Vᵀ),
 * - `<key>.lora_up.weight` [out, r] = u = U·diag(s) (× r/alpha when `alpha` ≠ r),
 * - `<key>.alpha`, a 0-dim tensor;
 * so that W0 + lora_up·lora_down·(alpha / r) = W0 + ΔW at multiplier 1. The layout of
 * sd-scripts' `extract_lora_from_models.py` (up = U·S, down = Vᵀ). Metadata: kohya's
 * `ss_network_module` (`networks.lora`), `ss_network_dim` and `ss_network_alpha` (`Dynamic` when
 * layers differ), `ss_v2`/`ss_base_model_version` when the context width says SD1 (768) or SD2
 * (1024), and `custom_diffusion` (JSON: tokens, source kind).
 *
 * The factors come from a compressed delta as they are (r = its rank per layer), or from an SVD at
 * export time: of ΔW = W − W0 for a full or merged delta (needs the base model and `rank` or
 * `ratio`), or of u·v when a compressed delta is re-factorised at another `rank`/`ratio`. Rank-0
 * layers (ΔW = 0) are left out. The other layers a `crossattn` delta trains (attn2 to_q, to_out.0
 * with its bias) are refused unless `skipUnsupported` (a LoRA holds no bias).
 *
 * **The token embeddings** (`<folder>/embeddings/<trigger>.safetensors`, one per token): the
 * textual-inversion layout of AUTOMATIC1111 and kohya, a single tensor `emb_params` [1, hidden].
 * The trigger word is the token with the characters file names cannot hold removed (`<new1>` →
 * `new1`): A1111 and ComfyUI (`embedding:new1`) take the trigger from the file name, so prompts say
 * `new1 cat` there. diffusers: `pipe.load_textual_inversion(file, token='<new1>')`. The LoRA
 * adapts K/V to that embedding, so the two files are used together.
 *
 * @packageDocumentation
 */
import { promises as fs } from 'fs';
import * as path from 'path';
import { InvalidArgumentError } from '../errors';
import { saveSafetensors } from '../core/safetensors';
import { Tensor } from '../core/tensor';
import { loadBaseLayers } from './compose';
import { compressLayers } from './compress';
import { Converter, DIFFUSERS_PARAM_ORDER, rowValues, sortNames, tokensInOrder } from './export-common';
import type { Delta } from './file';
import { deltaBinding } from './native-delta';

export interface LoraExportOptions {
  /**
   * LoRA rank per layer for an SVD at export time (clamped to min(out, in)): needed, or `ratio`,
   * for full and merged deltas; for a compressed delta, re-factorises u·v at this rank.
   */
  rank?: number;
  /** Instead of `rank`: the paper's rule (fraction of the sum of singular values), see compress.ts. */
  ratio?: number;
  /** With `ratio`: also keep the crossing component (see compress.ts). */
  keepCrossing?: boolean;
  /** The stored alpha of every layer (default: its rank, i.e. scale 1); up is rescaled to match. */
  alpha?: number;
  /** File name (without `.safetensors`) of the LoRA (default `custom_diffusion`). */
  loraName?: string;
  /** Leave out the layers a LoRA of K/V does not cover (attn2 to_q, to_out) instead of failing. */
  skipUnsupported?: boolean;
}

/** One exported LoRA layer. */
export interface LoraLayerInfo {
  /** The diffusers parameter name (`….attn2.to_k.weight`). */
  name: string;
  /** The kohya module key (`lora_unet_…_attn2_to_k`). */
  key: string;
  rank: number;
  alpha: number;
  /** ‖ΔW − up·down·alpha/r‖ / ‖ΔW‖ when the layer was factorised at export time. */
  relError?: number;
}

const KV = /\.attn2\.to_[kv]\.weight$/;

/** kohya's LoRA module key of a diffusers UNet parameter (`….to_k.weight` → `lora_unet_…_to_k`). */
export function loraKeyOf(name: string): string {
  return `lora_unet_${name.replace(/\.weight$/, '').replace(/\./g, '_')}`;
}

/** A trigger word / file stem for a token: the token without characters file names cannot hold. */
export function embeddingTriggerOf(token: string): string {
  return token.replace(/[<>:"/\\|?*\u0000-\u001f\s]+/g, '').replace(/^\.+$/, '');
}

function validate(o: LoraExportOptions): void {
  if (o.rank !== undefined && !(Number.isInteger(o.rank) && o.rank >= 1)) throw new InvalidArgumentError(`lora: rank must be a positive integer, got ${o.rank}`);
  if (o.ratio !== undefined && !(o.ratio > 0 && o.ratio <= 1)) throw new InvalidArgumentError(`lora: ratio must lie in (0, 1], got ${o.ratio}`);
  if (o.rank !== undefined && o.ratio !== undefined) throw new InvalidArgumentError('lora: give rank or ratio, not both');
  if (o.alpha !== undefined && !(Number.isFinite(o.alpha) && o.alpha > 0)) throw new InvalidArgumentError(`lora: alpha must be a positive number, got ${o.alpha}`);
  if (o.loraName !== undefined && !/^[^/\\\0]+$/.test(o.loraName)) throw new InvalidArgumentError(`lora: loraName ${JSON.stringify(o.loraName)} cannot name a file`);
}

interface Factor {
  u: Tensor;
  v: Tensor;
  relError?: number;
}

/** The LoRA factors (u [out×r], v [r×in], u·v = ΔW) of the delta's K/V layers. */
async function kvFactors(
  d: Delta,
  names: string[],
  conv: Converter,
  o: LoraExportOptions & { baseModel?: string; signal?: AbortSignal },
): Promise<Record<string, Factor>> {
  const out: Record<string, Factor> = {};
  const refactor = o.rank !== undefined || o.ratio !== undefined;
  const copts = { rank: o.rank, ratio: o.ratio, keepCrossing: o.keepCrossing, signal: o.signal };
  const own = (layers: Awaited<ReturnType<typeof compressLayers>>) => {
    for (const [n, l] of Object.entries(layers)) out[n] = { u: conv.own(l.u), v: conv.own(l.v), relError: l.relError };
  };
  const fromWeights = names.filter((n) => n in d.weights);
  if (fromWeights.length > 0) {
    if (!o.baseModel) throw new InvalidArgumentError('lora: a full or merged delta needs baseModel (the LoRA holds ΔW = W − W0)');
    if (!refactor) throw new InvalidArgumentError('lora: a full or merged delta needs a rank (or a ratio) to factorise ΔW');
    const base = await loadBaseLayers(path.resolve(o.baseModel), fromWeights);
    Object.values(base).forEach((t) => conv.own(t));
    own(await compressLayers(Object.fromEntries(fromWeights.map((n) => [n, d.weights[n]])), base, copts));
  }
  const fromFactors = names.filter((n) => n in d.factors);
  if (fromFactors.length > 0 && !refactor) {
    for (const n of fromFactors) out[n] = { u: d.factors[n].u, v: d.factors[n].v };
  } else if (fromFactors.length > 0) {
    const products: Record<string, Tensor> = {};
    const zeros: Record<string, Tensor> = {};
    for (const n of fromFactors) {
      const { u, v } = d.factors[n];
      zeros[n] = conv.own(Tensor.zeros([u.shape[0], v.shape[1]]));
      products[n] = conv.own(Tensor.zeros([u.shape[0], v.shape[1]]));
      deltaBinding().addProduct(products[n].handle, u.handle, v.handle);
    }
    own(await compressLayers(products, zeros, copts));
  }
  return out;
}

function formatAlpha(a: number): string {
  return Number.isInteger(a) ? a.toFixed(1) : String(a);
}

/** Writes the LoRA and the embeddings of `d` into `dir`. @internal (use exportDelta). */
export async function writeLoraExport(
  d: Delta,
  dir: string,
  conv: Converter,
  o: LoraExportOptions & { baseModel?: string; signal?: AbortSignal },
): Promise<{
  files: string[];
  tokens: { token: string; id: number; file: string; trigger: string }[];
  loraLayers: LoraLayerInfo[];
  skipped: string[];
}> {
  validate(o);
  const all = [...Object.keys(d.weights), ...Object.keys(d.factors)];
  const kv = sortNames(
    all.filter((n) => KV.test(n)),
    DIFFUSERS_PARAM_ORDER,
  );
  const other = all.filter((n) => !KV.test(n));
  if (other.length > 0 && !o.skipUnsupported) {
    throw new InvalidArgumentError(`lora: only attn2 to_k/to_v layers are exported; the delta also holds ${other.join(', ')} (pass skipUnsupported to leave them out)`);
  }
  if (kv.length === 0) throw new InvalidArgumentError('lora: the delta holds no attn2 to_k/to_v layer');
  const factors = await kvFactors(d, kv, conv, o);

  const tensors = new Map<string, Tensor>();
  const layers: LoraLayerInfo[] = [];
  const skipped = [...other];
  for (const n of kv) {
    const { u, v, relError } = factors[n];
    const rank = u.shape[1];
    if (rank === 0) {
      skipped.push(n);
      continue;
    }
    const key = loraKeyOf(n);
    const alpha = o.alpha ?? rank;
    const up =
      alpha === rank ? await conv.convert(u) : conv.fromValues((await float32Values(u)).map((x) => (x * rank) / alpha), u.shape);
    tensors.set(`${key}.lora_down.weight`, await conv.convert(v));
    tensors.set(`${key}.lora_up.weight`, up);
    tensors.set(`${key}.alpha`, conv.fromValues(Float32Array.of(alpha), []));
    layers.push({ name: n, key, rank, alpha, ...(relError === undefined ? {} : { relError }) });
  }
  if (layers.length === 0) throw new InvalidArgumentError('lora: every layer has rank 0 (the delta changes nothing)');

  // Embeddings: one file per token, named by its trigger word.
  const tokens: { token: string; id: number; file: string; trigger: string }[] = [];
  const used = new Set<string>();
  const embFiles: { file: string; emb: Tensor }[] = [];
  for (const [i, t] of tokensInOrder(d).entries()) {
    let trigger = embeddingTriggerOf(t.token) || `token${i + 1}`;
    for (let k = 2; used.has(trigger.toLowerCase()); k++) trigger = `${embeddingTriggerOf(t.token) || `token${i + 1}`}_${k}`;
    used.add(trigger.toLowerCase());
    const values = await rowValues(d.tokenRows[t.token], t.token);
    const file = path.join(dir, 'embeddings', `${trigger}.safetensors`);
    embFiles.push({ file, emb: conv.fromValues(values, [1, values.length]) });
    tokens.push({ token: t.token, id: t.id, file, trigger });
  }

  const ranks = new Set(layers.map((l) => l.rank));
  const alphas = new Set(layers.map((l) => l.alpha));
  const ctx = factors[layers[0].name].v.shape[1];
  const metadata: Record<string, string> = {
    ss_network_module: 'networks.lora',
    ss_network_dim: ranks.size === 1 ? String([...ranks][0]) : 'Dynamic',
    ss_network_alpha: alphas.size === 1 ? formatAlpha([...alphas][0]) : 'Dynamic',
    custom_diffusion: JSON.stringify({
      source_kind: d.kind,
      freeze_model: d.freezeModel,
      base_model_fingerprint: d.baseModelFingerprint,
      tokens: tokens.map((t) => ({ token: t.token, id: t.id, trigger: t.trigger, embedding: path.relative(dir, t.file).split(path.sep).join('/') })),
    }),
  };
  if (ctx === 768 || ctx === 1024) {
    metadata.ss_v2 = ctx === 1024 ? 'True' : 'False';
    metadata.ss_base_model_version = ctx === 1024 ? 'sd_v2' : 'sd_v1';
  }
  await fs.mkdir(embFiles.length > 0 ? path.join(dir, 'embeddings') : dir, { recursive: true });
  const loraFile = path.join(dir, `${o.loraName ?? 'custom_diffusion'}.safetensors`);
  await saveSafetensors(loraFile, tensors, metadata);
  const files = [loraFile];
  for (const { file, emb } of embFiles) {
    await saveSafetensors(file, { emb_params: emb });
    files.push(file);
  }
  return { files, tokens, loraLayers: layers, skipped };
}

async function float32Values(t: Tensor): Promise<Float32Array> {
  const f = await t.to({ dtype: 'float32', device: 'cpu' });
  try {
    return f.toArray() as Float32Array;
  } finally {
    f.dispose();
  }
}
