/**
 * Exporting a delta (any kind: `full`, `merged`, `compressed`) to the formats other tools read
 * (docs/method-facts §2; the readers are in foreign.ts, so every export reads back bit for bit):
 *
 * | format | target | what is written |
 * |---|---|---|
 * | `ours` | a file | our safetensors delta ({@link writeDeltaFile}) |
 * | `compvis` | a file (`delta_epoch=000000.ckpt`, `delta.ckpt`) | the original repository's CompVis delta, as `src/get_deltas.py` writes it: torch.save of `{'state_dict': {'model.diffusion_model.<LDM name>': W, …, 'embed': [N, hidden]}}`; compressed as `src/compress.py` writes it: `{'state_dict': {'embed': …, name: {'u': …, 'v': …}, …}}` |
 * | `diffusers-delta-bin` | a file (`delta.bin`) | the original repository's diffusers-path delta (`save_pretrained` / `save_delta`): `{'unet': {diffusers name: W}, 'modifier_token': {'<new1>': row, …}}`; compressed (`compress.py --diffuser`): `unet` entries `{'u', 'v'}` |
 * | `diffusers-attn-procs` | a folder | diffusers' train_custom_diffusion.py output: `pytorch_custom_diffusion_weights.safetensors` (or `.bin`) with `…attn2.processor.to_k_custom_diffusion.weight` keys, and one `<token>.safetensors` (or `.bin`) per token holding `{token: row}` |
 * | `lora` | a folder | a kohya-style LoRA of the attn2 to_k/to_v layers and one textual-inversion embedding per token (see lora.ts) |
 *
 * Full and merged deltas hold the fine-tuned weights W (tools apply them by replacement);
 * compressed deltas hold u·v = ΔW (applied as W0 + u·v). A format that cannot hold factors
 * (`diffusers-attn-procs`) gets W = W0 + u·v, which needs the base model; so does a LoRA of a full
 * delta (ΔW = W − W0, then factorised).
 *
 * The CompVis layout numbers tokens by their row in `embed` (`<new1>`, `<new2>`, … when read back);
 * the other layouts keep the token texts.
 *
 * @packageDocumentation
 */
import { promises as fs } from 'fs';
import * as path from 'path';
import { InvalidArgumentError } from '../errors';
import { saveSafetensors } from '../core/safetensors';
import { Tensor } from '../core/tensor';
import { saveTorchFile, type TorchSaveValue } from '../core/torch-save';
import { loadBaseLayers } from './compose';
import {
  ATTN_PROC_ORDER,
  checkTarget,
  COMPVIS_PARAM_ORDER,
  Converter,
  diffusersToAttnProcName,
  diffusersToCompvisName,
  DIFFUSERS_PARAM_ORDER,
  rowValues,
  sortNames,
  tokenFileStem,
  tokensInOrder,
} from './export-common';
import { writeDeltaFile, type Delta } from './file';
import { openDelta } from './foreign';
import { writeLoraExport, type LoraExportOptions, type LoraLayerInfo } from './lora';
import { deltaBinding } from './native-delta';

export { diffusersToCompvisName, diffusersToAttnProcName } from './export-common';

/** Formats {@link exportDelta} writes (the first four read back with {@link openDelta}). */
export type DeltaExportFormat = 'ours' | 'compvis' | 'diffusers-delta-bin' | 'diffusers-attn-procs' | 'lora';

/** The formats {@link exportDelta} accepts, with the kind of target each takes. */
export const DELTA_EXPORT_FORMATS: Readonly<Record<DeltaExportFormat, 'file' | 'folder'>> = {
  ours: 'file',
  compvis: 'file',
  'diffusers-delta-bin': 'file',
  'diffusers-attn-procs': 'folder',
  lora: 'folder',
};

export interface ExportDeltaOptions extends LoraExportOptions {
  /**
   * The diffusers model folder the delta was trained on (W0 from its `unet/`). Needed to write a
   * compressed delta as `diffusers-attn-procs`, and a full or merged delta as `lora`.
   */
  baseModel?: string;
  /** dtype of the stored tensors (default float32, as the original tools save). */
  dtype?: 'float32' | 'float16';
  /**
   * `diffusers-attn-procs` only: `safetensors` (default; train_custom_diffusion.py's default) or
   * `bin` (its `--no_safe_serialization`: torch.save files, with the parameter-less attn1
   * processors as `{}` placeholders as `save_attn_procs` writes them).
   *
   * Loading into diffusers ≥ 0.29 (`unet.load_attn_procs(dir, weight_name=…, _pipeline=pipe)`)
   * works with `bin` only: the safetensors form cannot hold the placeholders (diffusers drops them
   * too), and `set_attn_processor` then refuses a dict with half the processors. The token files of
   * both load with `pipe.load_textual_inversion(dir, weight_name='<new1>.safetensors')`.
   */
  serialization?: 'safetensors' | 'bin';
  signal?: AbortSignal;
}

/** A token as exported. */
export interface ExportedToken {
  token: string;
  id: number;
  /** The file holding its embedding, for formats with one file per token. */
  file?: string;
  /**
   * What to type in a prompt of the target tool: the token itself, except for `lora`, whose
   * embedding files are named by it (A1111 and ComfyUI use a file's name as its trigger word).
   */
  trigger: string;
}

export interface ExportDeltaResult {
  format: DeltaExportFormat;
  /** Absolute paths of every file written, in the order written. */
  files: string[];
  tokens: ExportedToken[];
  /** `lora` only: one entry per exported layer. */
  loraLayers?: LoraLayerInfo[];
  /** Layers that were not exported (`lora`: rank-0 layers, whose ΔW is zero, and skipped ones). */
  skipped: string[];
}

async function loadIfPath(delta: Delta | string): Promise<{ delta: Delta; loaded: boolean }> {
  if (typeof delta === 'string') return { delta: await openDelta(delta), loaded: true };
  return { delta, loaded: false };
}

function disposeDelta(d: Delta): void {
  const all = [...Object.values(d.weights), ...Object.values(d.factors).flatMap((f) => [f.u, f.v]), ...Object.values(d.tokenRows)];
  for (const t of all) if (!t.disposed) t.dispose();
}

/**
 * Writes `delta` (a {@link Delta}, or a delta file in any format {@link openDelta} reads) in
 * `format` at `outPath` (a file or a folder, see {@link DELTA_EXPORT_FORMATS}) and returns the
 * files written. Files are written atomically (temporary file, fsync, rename); folders are created.
 *
 * Errors: {@link InvalidArgumentError} when the delta cannot be expressed in the format (names
 * outside the attention blocks for `compvis`, a compressed delta without `baseModel` where W is
 * needed, a LoRA without a rank, …), {@link FileError} for paths that cannot be written.
 */
export async function exportDelta(
  delta: Delta | string,
  format: DeltaExportFormat,
  outPath: string,
  options: ExportDeltaOptions = {},
): Promise<ExportDeltaResult> {
  if (!Object.prototype.hasOwnProperty.call(DELTA_EXPORT_FORMATS, format)) {
    throw new InvalidArgumentError(`exportDelta: unknown format ${JSON.stringify(format)} (one of ${Object.keys(DELTA_EXPORT_FORMATS).join(', ')})`);
  }
  const dtype = options.dtype ?? 'float32';
  if (dtype !== 'float32' && dtype !== 'float16') throw new InvalidArgumentError(`exportDelta: dtype must be float32 or float16, got ${String(dtype)}`);
  if (options.serialization !== undefined && options.serialization !== 'safetensors' && options.serialization !== 'bin') {
    throw new InvalidArgumentError(`exportDelta: serialization must be safetensors or bin, got ${String(options.serialization)}`);
  }
  const target = path.resolve(outPath);
  await checkTarget(target, DELTA_EXPORT_FORMATS[format]);
  const { delta: d, loaded } = await loadIfPath(delta);
  const conv = new Converter(dtype);
  try {
    switch (format) {
      case 'ours':
        return await exportOurs(d, target, dtype);
      case 'compvis':
        return await exportCompvis(d, target, conv);
      case 'diffusers-delta-bin':
        return await exportDeltaBin(d, target, conv);
      case 'diffusers-attn-procs':
        return await exportAttnProcs(d, target, conv, options);
      case 'lora':
        return { format, ...(await writeLoraExport(d, target, conv, options)) };
      default:
        throw new InvalidArgumentError(`exportDelta: unknown format ${JSON.stringify(format)}`);
    }
  } finally {
    conv.dispose();
    if (loaded) disposeDelta(d);
  }
}

function plainTokens(d: Delta): ExportedToken[] {
  return tokensInOrder(d).map((t) => ({ token: t.token, id: t.id, trigger: t.token }));
}

async function exportOurs(d: Delta, target: string, dtype: 'float32' | 'float16'): Promise<ExportDeltaResult> {
  const skip = new Set(['format', 'version', 'kind', 'freeze_model', 'tokens', 'dtype', 'base_model_fingerprint']);
  const extra = Object.fromEntries(Object.entries(d.metadata).filter(([k]) => !skip.has(k)));
  await writeDeltaFile(target, {
    kind: d.kind,
    freezeModel: d.freezeModel,
    tokens: tokensInOrder(d),
    baseModelFingerprint: d.baseModelFingerprint,
    weights: d.weights,
    factors: d.factors,
    tokenRows: d.tokenRows,
    dtype,
    extra,
  });
  return { format: 'ours', files: [target], tokens: plainTokens(d), skipped: [] };
}

/** Every UNet entry of the delta (full weight or {u, v}) under `mapName`, in `order`. */
async function unetEntries(
  d: Delta,
  conv: Converter,
  mapName: (n: string) => string | null,
  order: Record<string, number>,
  what: string,
): Promise<Map<string, TorchSaveValue>> {
  const names = [...Object.keys(d.weights), ...Object.keys(d.factors)];
  const mapped = new Map<string, string>();
  const bad: string[] = [];
  for (const n of names) {
    const m = mapName(n);
    if (m === null) bad.push(n);
    else mapped.set(m, n);
  }
  if (bad.length > 0) throw new InvalidArgumentError(`${what} cannot name these layers: ${bad.join(', ')}`);
  if (mapped.size !== names.length) throw new InvalidArgumentError(`${what}: two layers map to the same name`);
  const out = new Map<string, TorchSaveValue>();
  for (const key of sortNames(mapped.keys(), order)) {
    const n = mapped.get(key)!;
    if (n in d.factors) {
      const f = d.factors[n];
      out.set(key, new Map([['u', await conv.convert(f.u)], ['v', await conv.convert(f.v)]]));
    } else {
      out.set(key, await conv.convert(d.weights[n]));
    }
  }
  return out;
}

async function exportCompvis(d: Delta, target: string, conv: Converter): Promise<ExportDeltaResult> {
  const layers = await unetEntries(d, conv, diffusersToCompvisName, COMPVIS_PARAM_ORDER, 'The CompVis layout');
  const tokens = tokensInOrder(d);
  let embed: Tensor | null = null;
  if (tokens.length > 0) {
    const rows = await Promise.all(tokens.map((t) => rowValues(d.tokenRows[t.token], t.token)));
    const hidden = rows[0].length;
    if (rows.some((r) => r.length !== hidden)) throw new InvalidArgumentError('the token rows have different widths');
    const all = new Float32Array(rows.length * hidden);
    rows.forEach((r, i) => all.set(r, i * hidden));
    embed = conv.fromValues(all, [rows.length, hidden]);
  }
  // get_deltas.py writes the layers then `embed`; compress.py writes `embed` first.
  const sd = new Map<string, TorchSaveValue>();
  if (embed && d.kind === 'compressed') sd.set('embed', embed);
  for (const [k, v] of layers) sd.set(k, v);
  if (embed && d.kind !== 'compressed') sd.set('embed', embed);
  await saveTorchFile(target, new Map([['state_dict', sd]]));
  return {
    format: 'compvis',
    files: [target],
    tokens: tokens.map((t, j) => ({ token: `<new${j + 1}>`, id: t.id, trigger: `<new${j + 1}>` })),
    skipped: [],
  };
}

async function tokenRowTensors(d: Delta, conv: Converter): Promise<Map<string, Tensor>> {
  const out = new Map<string, Tensor>();
  for (const t of tokensInOrder(d)) {
    const values = await rowValues(d.tokenRows[t.token], t.token);
    out.set(t.token, conv.fromValues(values, [values.length]));
  }
  return out;
}

async function exportDeltaBin(d: Delta, target: string, conv: Converter): Promise<ExportDeltaResult> {
  const unet = await unetEntries(d, conv, (n) => n, DIFFUSERS_PARAM_ORDER, 'The diffusers delta.bin layout');
  const rows = await tokenRowTensors(d, conv);
  await saveTorchFile(target, new Map<string, TorchSaveValue>([['unet', unet], ['modifier_token', rows]]));
  return { format: 'diffusers-delta-bin', files: [target], tokens: plainTokens(d), skipped: [] };
}

/** W for every layer: full weights as they are, factors as W0 + u·v (needs the base model). */
async function fullWeights(d: Delta, conv: Converter, options: ExportDeltaOptions, what: string): Promise<Record<string, Tensor>> {
  const out: Record<string, Tensor> = { ...d.weights };
  const factorNames = Object.keys(d.factors);
  if (factorNames.length === 0) return out;
  if (!options.baseModel) {
    throw new InvalidArgumentError(`${what} holds full weights: exporting a compressed delta needs baseModel (W = W0 + u·v)`);
  }
  const base = await loadBaseLayers(path.resolve(options.baseModel), factorNames);
  for (const n of factorNames) {
    const w = conv.own(base[n]);
    const { u, v } = d.factors[n];
    if (u.shape[0] !== w.shape[0] || v.shape[1] !== w.shape[1]) {
      throw new InvalidArgumentError(`layer ${n}: u·v is [${u.shape[0]}, ${v.shape[1]}] but the base weight is [${w.shape.join(', ')}]`);
    }
    deltaBinding().addProduct(w.handle, u.handle, v.handle);
    out[n] = w;
  }
  return out;
}

async function exportAttnProcs(d: Delta, dir: string, conv: Converter, options: ExportDeltaOptions): Promise<ExportDeltaResult> {
  const bin = options.serialization === 'bin';
  const weights = await fullWeights(d, conv, options, 'The diffusers attention-processor layout');
  const mapped = new Map<string, string>();
  const bad: string[] = [];
  for (const n of Object.keys(weights)) {
    const k = diffusersToAttnProcName(n);
    if (k === null) bad.push(n);
    else mapped.set(k, n);
  }
  if (bad.length > 0) throw new InvalidArgumentError(`The diffusers attention-processor layout holds only attn2 to_k/to_v/to_q/to_out; it cannot hold ${bad.join(', ')}`);
  const state = new Map<string, Tensor>();
  for (const k of sortNames(mapped.keys(), ATTN_PROC_ORDER)) state.set(k, await conv.convert(weights[mapped.get(k)!]));
  const files: string[] = [];
  await fs.mkdir(dir, { recursive: true });
  const weightsFile = path.join(dir, `pytorch_custom_diffusion_weights.${bin ? 'bin' : 'safetensors'}`);
  if (bin) {
    // save_attn_procs adds `{}` for every processor without parameters (attn1 of each block).
    const value = new Map<string, TorchSaveValue>(state);
    const blocks = new Set([...mapped.keys()].map((k) => k.slice(0, k.indexOf('.attn2.processor.'))));
    for (const b of sortNames(blocks, DIFFUSERS_PARAM_ORDER)) value.set(`${b}.attn1.processor`, new Map());
    await saveTorchFile(weightsFile, value);
  } else {
    await saveSafetensors(weightsFile, state, { format: 'pt' });
  }
  files.push(weightsFile);
  const tokens: ExportedToken[] = [];
  for (const [token, row] of await tokenRowTensors(d, conv)) {
    const stem = tokenFileStem(token);
    if (stem === null) throw new InvalidArgumentError(`The token ${JSON.stringify(token)} cannot name a file, as this layout needs`);
    const file = path.join(dir, `${stem}.${bin ? 'bin' : 'safetensors'}`);
    if (bin) await saveTorchFile(file, new Map([[token, row]]));
    else await saveSafetensors(file, new Map([[token, row]]), { format: 'pt' });
    files.push(file);
    tokens.push({ token, id: d.tokens.find((t) => t.token === token)!.id, file, trigger: token });
  }
  return { format: 'diffusers-attn-procs', files, tokens, skipped: [] };
}
