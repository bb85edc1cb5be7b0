/**
 * Helpers shared by the delta exporters: name mappings, the key orders the original tools write,
 * token rows, dtype conversion.
 *
 * @internal
 * @packageDocumentation
 */
import { promises as fs } from 'fs';
import { FileError, InvalidArgumentError } from '../errors';
import { Tensor } from '../core/tensor';
import type { Delta, DeltaTokenInfo } from './file';

/**
 * diffusers UNet name → CompVis (LDM) name under `model.diffusion_model.`, the inverse of
 * {@link compvisToDiffusersName} (A:src/convert.py's rule, for UNets with two layers per block as
 * SD1.x/SD2.x have): `down_blocks.b.attentions.a` → `input_blocks.{3b+a+1}.1`,
 * `mid_block.attentions.0` → `middle_block.1`, `up_blocks.b.attentions.a` → `output_blocks.{3b+a}.1`.
 * Null for names outside the attention blocks.
 */
export function diffusersToCompvisName(name: string): string | null {
  const m = /^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(transformer_blocks\..*)$/.exec(name);
  if (m) {
    const b = Number(m[2]);
    const a = Number(m[3]);
    if (m[1] === 'down_blocks') return a <= 1 ? `model.diffusion_model.input_blocks.${3 * b + a + 1}.1.${m[4]}` : null;
    return a <= 2 ? `model.diffusion_model.output_blocks.${3 * b + a}.1.${m[4]}` : null;
  }
  const mid = /^mid_block\.attentions\.0\.(transformer_blocks\..*)$/.exec(name);
  return mid ? `model.diffusion_model.middle_block.1.${mid[1]}` : null;
}

/**
 * diffusers UNet name → the key diffusers' `save_attn_procs` writes for a Custom Diffusion
 * processor: `….attn2.to_k.weight` → `….attn2.processor.to_k_custom_diffusion.weight` (also to_v,
 * to_q, `to_out.0.{weight,bias}`). Null for other names.
 */
export function diffusersToAttnProcName(name: string): string | null {
  const m = /^(.*\.attn2)\.(to_k|to_v|to_q|to_out)\.(weight|0\.weight|0\.bias)$/.exec(name);
  if (!m) return null;
  if ((m[2] === 'to_out') !== m[3].startsWith('0.')) return null;
  return `${m[1]}.processor.${m[2]}_custom_diffusion.${m[3]}`;
}

/** Rank of a name part in module registration order (unknown parts sort after, by text). */
type PartRanks = Record<string, number>;

/** `unet.named_parameters()` order: down_blocks, up_blocks, mid_block; in Attention q, k, v, out. */
export const DIFFUSERS_PARAM_ORDER: PartRanks = { down_blocks: 0, up_blocks: 1, mid_block: 2, to_q: 10, to_k: 11, to_v: 12, to_out: 13, weight: 20, bias: 21 };
/** CustomDiffusionAttnProcessor registers to_k, to_v, then to_q, to_out. */
export const ATTN_PROC_ORDER: PartRanks = {
  ...DIFFUSERS_PARAM_ORDER,
  to_k_custom_diffusion: 10,
  to_v_custom_diffusion: 11,
  to_q_custom_diffusion: 12,
  to_out_custom_diffusion: 13,
};
/** The LDM UNet registers input_blocks, middle_block, output_blocks. */
export const COMPVIS_PARAM_ORDER: PartRanks = { input_blocks: 0, middle_block: 1, output_blocks: 2, to_q: 10, to_k: 11, to_v: 12, to_out: 13, weight: 20, bias: 21 };

/** Sorts dotted parameter names in module order: numbers numerically, known parts by `ranks`. */
export function sortNames(names: Iterable<string>, ranks: PartRanks): string[] {
  const rankOf = (p: string) => (Object.prototype.hasOwnProperty.call(ranks, p) ? ranks[p] : undefined);
  const cmp = (a: string, b: string): number => {
    const pa = a.split('.');
    const pb = b.split('.');
    for (let i = 0; i < Math.min(pa.length, pb.length); i++) {
      const x = pa[i];
      const y = pb[i];
      if (x === y) continue;
      const nx = /^\d+$/.test(x);
      const ny = /^\d+$/.test(y);
      if (nx && ny) return Number(x) - Number(y);
      const rx = rankOf(x);
      const ry = rankOf(y);
      if (rx !== undefined && ry !== undefined) return rx - ry;
      if (rx !== undefined) return -1;
      if (ry !== undefined) return 1;
      return x < y ? -1 : 1;
    }
    return pa.length - pb.length;
  };
  return [...names].sort(cmp);
}

/** The tokens of a delta in id order (the order the original tools number them). */
export function tokensInOrder(delta: Delta): DeltaTokenInfo[] {
  for (const t of delta.tokens) {
    if (!delta.tokenRows[t.token]) throw new InvalidArgumentError(`the delta has no row for token ${t.token}`);
  }
  return [...delta.tokens].sort((a, b) => a.id - b.id);
}

/** A token row's values as float32 (rows may be [hidden] or [1, hidden]). */
export async function rowValues(row: Tensor, token: string): Promise<Float32Array> {
  const shape = row.shape;
  if (!(shape.length === 1 || (shape.length === 2 && shape[0] === 1))) {
    throw new InvalidArgumentError(`the row of ${token} must be [hidden] or [1, hidden], got [${shape.join(', ')}]`);
  }
  if (row.dtype === 'float32' && row.device === 'cpu') return row.toArray() as Float32Array;
  const f = await row.to({ dtype: 'float32', device: 'cpu' });
  try {
    return f.toArray() as Float32Array;
  } finally {
    f.dispose();
  }
}

/** Converts tensors to a CPU dtype, remembering the copies it makes so they can be disposed. */
export class Converter {
  readonly owned: Tensor[] = [];

  constructor(readonly dtype: 'float32' | 'float16') {}

  async convert(t: Tensor): Promise<Tensor> {
    if (t.dtype === this.dtype && t.device === 'cpu') return t;
    const c = await t.to({ dtype: this.dtype, device: 'cpu' });
    this.owned.push(c);
    return c;
  }

  /** A new tensor of this dtype from float32 values. */
  fromValues(values: Float32Array, shape: number[]): Tensor {
    const t = Tensor.fromArray(values, shape, this.dtype);
    this.owned.push(t);
    return t;
  }

  /** Keeps `t` to be disposed with the rest. */
  own(t: Tensor): Tensor {
    this.owned.push(t);
    return t;
  }

  dispose(): void {
    for (const t of this.owned.splice(0)) if (!t.disposed) t.dispose();
  }
}

/** Checks the output path: a file target must not be a folder, a folder target must not be a file. */
export async function checkTarget(target: string, kind: 'file' | 'folder'): Promise<void> {
  let st;
  try {
    st = await fs.stat(target);
  } catch {
    return;
  }
  if (kind === 'file' && st.isDirectory()) throw new FileError(`${target} is a folder; this export writes one file there`, target);
  if (kind === 'folder' && !st.isDirectory()) throw new FileError(`${target} is a file; this export writes a folder of files there`, target);
}

/** A file name for a token: the token itself when it is a safe name on every platform, else null. */
export function tokenFileStem(token: string): string | null {
  return /^[^/\\\0]+$/.test(token) && token !== '.' && token !== '..' ? token : null;
}
