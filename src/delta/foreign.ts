/**
 * Readers for the original Custom Diffusion delta formats (docs/method-facts §2), turned into our
 * in-memory {@link Delta} so that {@link applyDelta} and the merge accept them:
 *
 * - (a) CompVis `delta_epoch=*.ckpt`: `{state_dict: {'model.diffusion_model.<CompVis prefix>…attn2.to_{k,v}.weight': W,
 *   'embed': [N, hidden]}}` (row j = `<new{j+1}>`); compressed: `{name: {u, v}}`.
 * - (b) diffusers-variant `delta.bin`: `{unet: {diffusers name: W | {u, v}}, modifier_token: {'<new1>': row, …}}`.
 * - (c) diffusers library (`save_attn_procs`): `pytorch_custom_diffusion_weights.{safetensors,bin}` with
 *   `…attn2.processor.to_{k,v}_custom_diffusion.weight` (and `to_q…`, `to_out_custom_diffusion.0.*`), token
 *   rows in sibling `<newN>.safetensors|.bin` files.
 *
 * All of them store full trained weights (kind `full`, applied by replacement) unless they hold u/v
 * factors (kind `compressed`, applied as W0 + u·v). Token ids are numbered from `firstTokenId`
 * (49408 for the CLIP vocabulary) in file order. No base-model fingerprint is recorded in these
 * formats, so applying them cannot check the base model.
 */
import { promises as fs } from 'fs';
import * as path from 'path';
import { FileError } from '../errors';
import { loadSafetensors, readSafetensorsHeader } from '../core/safetensors';
import { Tensor } from '../core/tensor';
import { flattenTensors, isTorchDict, loadTorchFile, type TorchDict, type TorchValue } from '../core/torch-file';
import { readDelta, type Delta, type DeltaTokenInfo } from './file';

export type ForeignDeltaFormat = 'compvis' | 'diffusers-delta-bin' | 'diffusers-attn-procs';

export interface ReadForeignOptions {
  /** Id of the first added token (default 49408). */
  firstTokenId?: number;
}

/** CompVis UNet prefix (after `model.diffusion_model.`) → diffusers prefix, as A:src/convert.py maps it. */
export function compvisToDiffusersName(name: string): string | null {
  const m = /^(?:model\.diffusion_model\.)?(input_blocks|output_blocks|middle_block)\.(?:(\d+)\.)?1\.(transformer_blocks\..*)$/.exec(name);
  if (!m) return null;
  const [, kind, idx, rest] = m;
  if (kind === 'middle_block') return idx === undefined ? `mid_block.attentions.0.${rest}` : null;
  if (idx === undefined) return null;
  const i = Number(idx);
  if (kind === 'input_blocks') return `down_blocks.${Math.floor(i / 3)}.attentions.${i === 1 || i === 4 || i === 7 ? 0 : 1}.${rest}`;
  return `up_blocks.${Math.floor(i / 3)}.attentions.${i % 3}.${rest}`;
}

/** `…attn2.processor.to_k_custom_diffusion.weight` → `…attn2.to_k.weight` (null for other keys). */
export function attnProcToDiffusersName(name: string): string | null {
  const m = /^(.*\.attn2)\.processor\.(to_k|to_v|to_q|to_out)_custom_diffusion\.(.*)$/.exec(name);
  return m ? `${m[1]}.${m[2]}.${m[3]}` : null;
}

function emptyDelta(kind: Delta['kind'], format: ForeignDeltaFormat): Delta {
  return {
    kind,
    version: 1,
    freezeModel: 'crossattn_kv',
    tokens: [],
    baseModelFingerprint: null,
    dtype: 'float32',
    weights: {},
    factors: {},
    tokenRows: {},
    metadata: { source_format: format },
  };
}

function isFactor(v: TorchValue): v is TorchDict {
  return isTorchDict(v) && v.u instanceof Tensor && v.v instanceof Tensor;
}

function finish(d: Delta): Delta {
  d.kind = Object.keys(d.factors).length > 0 ? 'compressed' : 'full';
  d.freezeModel = Object.keys(d.weights).some((n) => /attn2\.to_(q|out)/.test(n)) ? 'crossattn' : 'crossattn_kv';
  return d;
}

async function rowsOf(t: Tensor): Promise<Tensor[]> {
  const f = t.dtype === 'float32' ? t : await t.to({ dtype: 'float32' });
  const hidden = f.shape.at(-1)!;
  const data = f.toArray() as Float32Array;
  const n = f.shape.length === 1 ? 1 : f.shape[0];
  return Array.from({ length: n }, (_, i) => Tensor.fromArray(data.slice(i * hidden, (i + 1) * hidden), [hidden]));
}

/** Reads an original-format delta file (format detected from its content). */
export async function readForeignDelta(file: string, options: ReadForeignOptions = {}): Promise<Delta & { sourceFormat: ForeignDeltaFormat }> {
  const first = options.firstTokenId ?? 49408;
  const addToken = (d: Delta, token: string, row: Tensor) => {
    const info: DeltaTokenInfo = { token, id: first + d.tokens.length, initializer: null, initializer_id: null };
    d.tokens.push(info);
    d.tokenRows[token] = row;
  };

  if (file.endsWith('.safetensors')) {
    const { tensors } = await loadSafetensors(file, { dtype: 'float32' });
    const d = emptyDelta('full', 'diffusers-attn-procs');
    for (const [k, t] of Object.entries(tensors)) {
      const n = attnProcToDiffusersName(k);
      if (!n) throw new FileError(`${file}: unexpected key ${k} for a diffusers Custom Diffusion weights file`, file);
      d.weights[n] = t;
    }
    await addSiblingTokens(file, d, addToken);
    return { ...finish(d), sourceFormat: 'diffusers-attn-procs' };
  }

  const tree = await loadTorchFile(file, { dtype: 'float32' });
  if (!isTorchDict(tree)) throw new FileError(`${file}: not a dict; not a Custom Diffusion delta`, file);
  if (isTorchDict(tree.unet)) {
    const d = emptyDelta('full', 'diffusers-delta-bin');
    for (const [n, v] of Object.entries(tree.unet)) {
      if (v instanceof Tensor) d.weights[n] = v;
      else if (isFactor(v)) d.factors[n] = { u: v.u as Tensor, v: v.v as Tensor };
      else throw new FileError(`${file}: unet entry ${n} is neither a tensor nor {u, v}`, file);
    }
    if (isTorchDict(tree.modifier_token)) {
      for (const [tok, row] of Object.entries(tree.modifier_token)) {
        if (!(row instanceof Tensor)) throw new FileError(`${file}: modifier_token ${tok} is not a tensor`, file);
        addToken(d, tok, (await rowsOf(row))[0]);
      }
    }
    return { ...finish(d), sourceFormat: 'diffusers-delta-bin' };
  }
  if (isTorchDict(tree.state_dict)) {
    const d = emptyDelta('full', 'compvis');
    for (const [k, v] of Object.entries(tree.state_dict)) {
      if (k === 'embed') continue;
      const n = compvisToDiffusersName(k);
      if (!n) throw new FileError(`${file}: unexpected key ${k} for a CompVis Custom Diffusion delta`, file);
      if (v instanceof Tensor) d.weights[n] = v;
      else if (isFactor(v)) d.factors[n] = { u: v.u as Tensor, v: v.v as Tensor };
      else throw new FileError(`${file}: entry ${k} is neither a tensor nor {u, v}`, file);
    }
    const embed = tree.state_dict.embed;
    if (embed instanceof Tensor) (await rowsOf(embed)).forEach((r, j) => addToken(d, `<new${j + 1}>`, r));
    return { ...finish(d), sourceFormat: 'compvis' };
  }
  // diffusers attn-procs saved as .bin: flat dict of processor keys (attn1 placeholders are empty dicts).
  const d = emptyDelta('full', 'diffusers-attn-procs');
  for (const [k, v] of Object.entries(tree)) {
    if (isTorchDict(v) && Object.keys(v).length === 0) continue;
    const n = attnProcToDiffusersName(k);
    if (!n || !(v instanceof Tensor)) throw new FileError(`${file}: not a recognised Custom Diffusion delta (key ${k})`, file);
    d.weights[n] = v;
  }
  if (Object.keys(d.weights).length === 0) throw new FileError(`${file}: not a recognised Custom Diffusion delta`, file);
  await addSiblingTokens(file, d, addToken);
  return { ...finish(d), sourceFormat: 'diffusers-attn-procs' };
}

/**
 * The token files next to a diffusers weights file: each `<token>.safetensors|.bin` holding exactly
 * `{token: row}` (what train_custom_diffusion.py and {@link exportDelta} write, whatever the token's
 * text). `<newN>` tokens come first in N order, then the others by name; a token with both files is
 * read from its `.safetensors`. Other files in the folder are left alone.
 */
async function addSiblingTokens(file: string, d: Delta, addToken: (d: Delta, token: string, row: Tensor) => void): Promise<void> {
  const dir = path.dirname(file);
  const weightsStem = path.basename(file).replace(/\.(safetensors|bin)$/, '');
  const byToken = new Map<string, string>();
  for (const f of await fs.readdir(dir)) {
    const m = /^(.+)\.(safetensors|bin)$/.exec(f);
    if (!m || m[1] === weightsStem) continue;
    if (!byToken.has(m[1]) || f.endsWith('.safetensors')) byToken.set(m[1], f);
  }
  const newN = (t: string) => /^<new(\d+)>$/.exec(t);
  const order = [...byToken.keys()].sort((a, b) => {
    const na = newN(a);
    const nb = newN(b);
    if (na && nb) return Number(na[1]) - Number(nb[1]);
    if (na || nb) return na ? -1 : 1;
    return a < b ? -1 : a > b ? 1 : 0;
  });
  for (const tok of order) {
    const f = path.join(dir, byToken.get(tok)!);
    // A `<newN>` file must be a token file; any other name may be an unrelated file and is skipped
    // unless it holds exactly {its name: row}.
    const row = await readTokenFile(f, tok).catch((e: unknown) => {
      if (newN(tok)) throw e;
      return null;
    });
    if (row) addToken(d, tok, row);
    else if (newN(tok)) throw new FileError(`${f}: no tensor named ${tok}`, f);
  }
}

/** The row of a `{token: row}` file, or null when the file holds anything else. */
async function readTokenFile(f: string, tok: string): Promise<Tensor | null> {
  if (f.endsWith('.safetensors')) {
    const names = (await readSafetensorsHeader(f)).entries.map((e) => e.name);
    if (names.length !== 1 || names[0] !== tok) return null;
  }
  const tensors = f.endsWith('.safetensors')
    ? (await loadSafetensors(f, { dtype: 'float32' })).tensors
    : flattenTensors(await loadTorchFile(f, { dtype: 'float32' }));
  const row = tensors[tok];
  if (!(row instanceof Tensor) || Object.keys(tensors).length !== 1) return null;
  return (await rowsOf(row))[0];
}

/**
 * Reads any supported delta: our format (safetensors with `format: custom-diffusion-delta`) or one of
 * the original formats above.
 */
export async function openDelta(file: string, options: ReadForeignOptions = {}): Promise<Delta> {
  if (file.endsWith('.safetensors')) {
    const { metadata } = await readSafetensorsHeader(file);
    if (metadata.format === 'custom-diffusion-delta') return readDelta(file);
  }
  return readForeignDelta(file, options);
}
