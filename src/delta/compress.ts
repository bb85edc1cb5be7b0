/**
 * Low-rank compression of Custom Diffusion deltas: per K/V layer, the SVD of ΔW = W − W0 keeps the
 * leading components; the layer is stored as u = U_r·diag(s_r) [out×r] and v = Vᵀ_r [r×in] and applied
 * as W0 + u·v (never by replacement).
 *
 * Rank rule (ratio mode). The paper's code accumulates the fraction of the SUM of singular values and
 * breaks at the first 0-based index i whose cumulative fraction exceeds the ratio, keeping r = i: the
 * crossing component is dropped, so the kept fraction is ≤ ratio and r can be 0. We keep that rule by
 * default (`keepCrossing: false`) so that compressed files match the published method's sizes and
 * outputs; `keepCrossing: true` keeps r = i + 1 (kept fraction > ratio, never 0 for a non-zero ΔW).
 * With ratio 1 every component is kept (a cumulative fraction "> 1" would only be rounding). `rank` fixes r instead.
 * A layer compressed to rank 0 is reported with `zeroRank: true`: its fine-tuning is dropped entirely.
 */
import { callCancellable, type Dtype } from '../native';
import { Tensor } from '../core/tensor';
import { InvalidArgumentError } from '../errors';
import { deltaBinding } from './native-delta';
import * as path from 'path';
import { loadBaseLayers } from './compose';
import { readDelta, writeDeltaFile, type Delta } from './file';

export interface CompressOptions {
  /** Fraction of the sum of singular values (default 0.6, the paper's). Ignored when `rank` is given. */
  ratio?: number;
  /** Keep the component that crosses the ratio too (default false: the paper's rule). */
  keepCrossing?: boolean;
  /** A fixed rank per layer (clamped to min(out, in)). */
  rank?: number;
  /** dtype of u and v (default float32). */
  outDtype?: Dtype;
  signal?: AbortSignal;
}

export interface CompressedLayer {
  u: Tensor;
  v: Tensor;
  rank: number;
  /** ‖ΔW − u·v‖_F / ‖ΔW‖_F. */
  relError: number;
  /** Σ kept singular values / Σ all. */
  keptFraction: number;
  /** True when r = 0 (the layer's delta is dropped): a warning. */
  zeroRank: boolean;
}

/** Compresses every layer of `tuned` (full fine-tuned weights) against `base` (W0) of the same names. */
export async function compressLayers(
  tuned: Record<string, Tensor>,
  base: Record<string, Tensor>,
  options: CompressOptions = {},
): Promise<Record<string, CompressedLayer>> {
  const { signal, ratio, rank, keepCrossing, outDtype } = options;
  if (ratio !== undefined && !(ratio > 0 && ratio <= 1)) throw new InvalidArgumentError(`ratio must lie in (0, 1], got ${ratio}`);
  if (rank !== undefined && !(Number.isInteger(rank) && rank >= 0)) {
    throw new InvalidArgumentError(`rank must be a non-negative integer, got ${rank}`);
  }
  for (const name of Object.keys(tuned)) {
    if (!(name in base)) throw new InvalidArgumentError(`compress: layer ${name} has no base weight`);
  }
  const raw = await callCancellable(signal, (token) =>
    deltaBinding().compress(
      Object.fromEntries(Object.entries(tuned).map(([k, t]) => [k, t.handle])),
      Object.fromEntries(Object.keys(tuned).map((k) => [k, base[k].handle])),
      { ratio, rank, keepCrossing, outDtype },
      token,
    ),
  );
  const out: Record<string, CompressedLayer> = {};
  for (const l of raw.layers) {
    out[l.name] = {
      u: new Tensor(l.u),
      v: new Tensor(l.v),
      rank: l.rank,
      relError: l.relError,
      keptFraction: l.keptFraction,
      zeroRank: l.zeroRank,
    };
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Compressing a delta file.


export interface CompressDeltaOptions extends CompressOptions {
  /** The delta (file in our format, or already read); must hold full weights. */
  delta: string | Delta;
  /** The base model folder the delta was trained on (W0 comes from its unet/). */
  baseModel: string;
  /** Write the compressed delta here. */
  output?: string;
}

export interface CompressDeltaResult {
  delta: Delta;
  layers: Record<string, Omit<CompressedLayer, 'u' | 'v'>>;
  /** Layers compressed to rank 0 (their fine-tuning is dropped): a warning. */
  zeroRankLayers: string[];
}

/**
 * Compresses the attn2 to_k/to_v layers of a full delta (other tensors and the token rows are kept
 * unchanged, as in the paper) and optionally writes it (kind `compressed`).
 */
export async function compressDelta(options: CompressDeltaOptions): Promise<CompressDeltaResult> {
  const d = typeof options.delta === 'string' ? await readDelta(options.delta) : options.delta;
  if (d.kind === 'compressed') throw new InvalidArgumentError('compressDelta: the delta is already compressed');
  const kv = Object.keys(d.weights).filter((n) => /attn2\.to_[kv]\.weight$/.test(n));
  const base = await loadBaseLayers(path.resolve(options.baseModel), kv);
  try {
    const tuned = Object.fromEntries(kv.map((n) => [n, d.weights[n]]));
    const layers = await compressLayers(tuned, base, options);
    const factors = Object.fromEntries(Object.entries(layers).map(([n, l]) => [n, { u: l.u, v: l.v }]));
    const rest = Object.fromEntries(Object.entries(d.weights).filter(([n]) => !(n in factors)));
    const info = Object.fromEntries(Object.entries(layers).map(([n, l]) => [n, { rank: l.rank, relError: l.relError, keptFraction: l.keptFraction, zeroRank: l.zeroRank }]));
    const compression = {
      ratio: options.rank === undefined ? options.ratio ?? 0.6 : null,
      rank: options.rank ?? null,
      keep_crossing: options.keepCrossing ?? false,
      rule: 'sum of singular values; r = first 0-based index with cumulative fraction > ratio (+1 with keep_crossing)',
      layers: info,
    };
    const out: Delta = { ...d, kind: 'compressed', weights: rest, factors, metadata: { ...d.metadata, kind: 'compressed', compression: JSON.stringify(compression) } };
    if (options.output) {
      const skip = new Set(['format', 'version', 'kind', 'freeze_model', 'tokens', 'dtype', 'base_model_fingerprint']);
      const extra = Object.fromEntries(Object.entries(d.metadata).filter(([k]) => !skip.has(k)));
      await writeDeltaFile(options.output, {
        kind: 'compressed',
        freezeModel: d.freezeModel,
        tokens: d.tokens,
        baseModelFingerprint: d.baseModelFingerprint,
        weights: rest,
        factors,
        tokenRows: d.tokenRows,
        extra: { ...extra, compression },
      });
    }
    return { delta: out, layers: info, zeroRankLayers: Object.keys(info).filter((n) => info[n].zeroRank) };
  } finally {
    for (const t of Object.values(base)) t.dispose();
  }
}
