/**
 * `customdiff compress <delta>`: the paper's low-rank compression of a delta's K/V layers (SVD of
 * W − W0 against the base model; `--ratio` of the singular-value sum, or a fixed `--rank`).
 */
import { Command, Option } from 'commander';
import * as path from 'path';
import { compressDelta } from '../delta/compress';
import { openDelta } from '../delta/foreign';
import { writeDeltaFile } from '../delta/file';
import { defineAction } from './action';
import { describeDelta } from './inspect';
import {
  addCommonOptions,
  addDeviceOptions,
  addExamples,
  addOverwriteOption,
  checkOutputFile,
  intArg,
  numberArg,
  usageError,
  type DeviceOptions,
  type OverwriteOptions,
} from './options';
import { formatBytes } from './output';

export interface CompressCliOptions extends OverwriteOptions, DeviceOptions {
  model?: string;
  output?: string;
  ratio?: number;
  rank?: number;
  keepCrossing?: boolean;
}

/** `dir/delta.safetensors` → `dir/compressed_delta.safetensors` (the original's naming). */
export function defaultCompressedPath(input: string): string {
  const base = path.basename(input).replace(/\.(safetensors|bin|ckpt|pt)$/, '');
  return path.join(path.dirname(input), `compressed_${base}.safetensors`);
}

export function compressCommand(): Command {
  const cmd = new Command('compress')
    .summary('compress a delta to low rank (SVD)')
    .description(
      "Compress a delta's key/value layers to low rank (the paper's SVD of W − W0). The result is applied as W0 + u·v " +
        'and needs the same base model.',
    )
    .argument('<delta>', 'the delta to compress (ours, or an original delta.bin / delta_epoch=*.ckpt / diffusers weights)')
    .option('-m, --model <dir>', 'the base model the delta was trained on (a diffusers folder)')
    .option('-o, --output <file>', 'where to write the compressed delta (default: compressed_<name>.safetensors next to the input)')
    .addOption(new Option('--ratio <r>', "keep the leading singular values up to this fraction of their sum (default 0.6, the paper's)").argParser(numberArg({ gt: 0, max: 1 })).conflicts('rank'))
    .addOption(new Option('--rank <r>', 'keep this many components per layer instead').argParser(intArg(0)))
    .option('--keep-crossing', 'also keep the component that crosses --ratio (the paper drops it, so a layer can get rank 0)');
  addDeviceOptions(cmd, { device: false, dtypes: ['float32', 'float16'], dtypeHelp: 'dtype of the stored delta (default float32)' });
  addOverwriteOption(cmd);
  addCommonOptions(cmd);
  addExamples(cmd, [
    'customdiff compress out/cat/delta.safetensors --model models/sd15',
    'customdiff compress out/cat/delta.safetensors --model models/sd15 --rank 16 -o cat-r16.safetensors',
    'customdiff compress logs/cat/delta.bin --model models/sd14 --ratio 0.8 --dtype float16',
  ]);
  return defineAction<CompressCliOptions>(cmd, async (ctx, input) => {
    const o = ctx.opts;
    if (!o.model) throw usageError('compress needs --model: the base model folder the delta was trained on (W0 comes from its unet/)');
    if (o.rank !== undefined && o.ratio !== undefined) throw usageError('Give --ratio or --rank, not both');
    const output = path.resolve(o.output ?? defaultCompressedPath(input));
    if (path.resolve(input) === output) throw usageError(`--output ${output} is the input file; choose another name`);
    checkOutputFile(output, o.overwrite);

    const bar = ctx.reporter.progress({ label: 'compress', total: 2, unit: 'stage' });
    const delta = await openDelta(input);
    bar.update(1);
    const r = await compressDelta({
      delta,
      baseModel: o.model,
      ratio: o.ratio,
      rank: o.rank,
      keepCrossing: o.keepCrossing,
      signal: ctx.signal,
    });
    bar.update(2);
    bar.stop();
    const d = r.delta;
    const skip = new Set(['format', 'version', 'kind', 'freeze_model', 'tokens', 'dtype', 'base_model_fingerprint', 'source_format']);
    const extra: Record<string, unknown> = Object.fromEntries(Object.entries(d.metadata).filter(([k]) => !skip.has(k)));
    extra.compression = JSON.parse(d.metadata.compression);
    if (delta.metadata.source_format) extra.source = { file: path.resolve(input), format: delta.metadata.source_format };
    await writeDeltaFile(output, {
      kind: 'compressed',
      freezeModel: d.freezeModel,
      tokens: d.tokens,
      baseModelFingerprint: d.baseModelFingerprint,
      weights: d.weights,
      factors: d.factors,
      tokenRows: d.tokenRows,
      dtype: (o.dtype as 'float32' | 'float16' | undefined) ?? 'float32',
      extra,
    });
    for (const name of r.zeroRankLayers) {
      ctx.reporter.warn(`${name} was compressed to rank 0: its fine-tuning is dropped (use a higher --ratio, --keep-crossing or --rank)`);
    }
    const ranks = Object.values(r.layers).map((l) => l.rank);
    const worst = Math.max(...Object.values(r.layers).map((l) => l.relError));
    const before = await describeDelta(input);
    const after = await describeDelta(output);
    const summary = {
      input: path.resolve(input),
      output,
      layers: Object.keys(r.layers).length,
      minRank: Math.min(...ranks),
      maxRank: Math.max(...ranks),
      meanRank: ranks.reduce((a, b) => a + b, 0) / ranks.length,
      maxRelError: worst,
      zeroRankLayers: r.zeroRankLayers,
      inputBytes: before.fileBytes,
      outputBytes: after.fileBytes,
      perLayer: r.layers,
    };
    ctx.reporter.result(
      `Compressed ${summary.layers} layers to ranks ${summary.minRank}–${summary.maxRank} (mean ${summary.meanRank.toFixed(1)}; ` +
        `worst relative error ${worst.toExponential(2)}): ${formatBytes(before.fileBytes)} → ${formatBytes(after.fileBytes)}\n${output}`,
      summary,
    );
  });
}
