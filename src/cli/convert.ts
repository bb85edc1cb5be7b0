/**
 * `customdiff convert <delta> --to <format> -o <path>`: between our delta format, the original
 * repository's files (CompVis `delta_epoch=*.ckpt`, diffusers-path `delta.bin`), diffusers' own
 * files (`pytorch_custom_diffusion_weights.*` + one embedding file per token) and a LoRA with
 * textual-inversion embeddings for tools that load kohya LoRAs. The reading side accepts every
 * format but the LoRA.
 */
import { Command, Option } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { exportDelta, type DeltaExportFormat, DELTA_EXPORT_FORMATS } from '../delta/export';
import { openDelta } from '../delta/foreign';
import { ClipTokenizer } from '../model/tokenizer';
import { defineAction } from './action';
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

export interface ConvertCliOptions extends OverwriteOptions, DeviceOptions {
  to?: string;
  output?: string;
  model?: string;
  rank?: number;
  ratio?: number;
  keepCrossing?: boolean;
  alpha?: number;
  loraName?: string;
  skipUnsupported?: boolean;
  serialization?: 'safetensors' | 'bin';
}

/** `--to` names (short ones for people, the library's names too). */
export const CONVERT_TARGETS: Record<string, DeltaExportFormat> = {
  ours: 'ours',
  compvis: 'compvis',
  'delta-bin': 'diffusers-delta-bin',
  'diffusers-delta-bin': 'diffusers-delta-bin',
  diffusers: 'diffusers-attn-procs',
  'diffusers-attn-procs': 'diffusers-attn-procs',
  lora: 'lora',
};

const WEIGHT_FILES = ['delta.safetensors', 'pytorch_custom_diffusion_weights.safetensors', 'pytorch_custom_diffusion_weights.bin', 'delta.bin'];

/** A delta file, or a folder holding one (diffusers' output folder, a training output folder). */
export function findDeltaFile(input: string): string {
  let st: fs.Stats;
  try {
    st = fs.statSync(input);
  } catch {
    throw usageError(`${input} does not exist; give a delta file (or a folder holding one)`);
  }
  if (!st.isDirectory()) return input;
  const found = WEIGHT_FILES.map((f) => path.join(input, f)).find((f) => fs.existsSync(f));
  if (!found) throw usageError(`${input} is a folder without ${WEIGHT_FILES.join(', ')}; give the delta file itself`);
  return found;
}

/** Refuses to write into a non-empty folder unless --overwrite; with it, removes the stale files the format's reader would pick up. */
function checkOutputFolder(dir: string, format: DeltaExportFormat, overwrite: boolean | undefined): string[] {
  let entries: string[];
  try {
    const st = fs.statSync(dir);
    if (!st.isDirectory()) throw usageError(`-o ${dir} is a file; --to ${format} writes a folder of files`);
    entries = fs.readdirSync(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
  if (entries.length === 0) return [];
  if (!overwrite) throw usageError(`${dir} is not empty; pass --overwrite to write into it (replacing an earlier export), or choose another -o`);
  if (format !== 'diffusers-attn-procs') return [];
  // An earlier export's token files would be read back as tokens of this one.
  const stale = entries.filter((f) => /^pytorch_custom_diffusion_weights\.(safetensors|bin)$/.test(f) || /^<.+>\.(safetensors|bin)$/.test(f));
  for (const f of stale) fs.rmSync(path.join(dir, f), { force: true });
  return stale;
}

export function convertCommand(): Command {
  const cmd = new Command('convert')
    .summary('convert a delta between our format, the original files, diffusers files and LoRA')
    .description(
      'Convert a delta between formats: ours (.safetensors), compvis (the original delta_epoch=*.ckpt), delta-bin (the original ' +
        "diffusers-path delta.bin), diffusers (diffusers' pytorch_custom_diffusion_weights.safetensors + <token>.safetensors, a folder), " +
        'lora (a kohya LoRA of the key/value layers + textual-inversion embeddings, a folder). Any of the first four can be read.',
    )
    .argument('<delta>', 'the delta to convert: a file of any readable format, or a folder holding one')
    .addOption(new Option('--to <format>', 'the target format').choices(Object.keys(CONVERT_TARGETS)))
    .option('-o, --output <path>', 'the file (ours, compvis, delta-bin) or folder (diffusers, lora) to write')
    .option('-m, --model <dir>', 'the base model: needed for a LoRA of a full delta and for diffusers files of a compressed delta; numbers the tokens of original files after its vocabulary (default 49408, CLIP\'s)')
    .addOption(new Option('--rank <r>', 'lora: rank of every layer (a full delta is factorised by SVD)').argParser(intArg(1)).conflicts('ratio'))
    .addOption(new Option('--ratio <r>', "lora: the paper's rule instead of a fixed rank (fraction of the singular-value sum)").argParser(numberArg({ gt: 0, max: 1 })))
    .option('--keep-crossing', 'lora with --ratio: also keep the component that crosses the ratio')
    .option('--alpha <a>', 'lora: stored alpha (default: the rank, scale 1)', numberArg({ gt: 0 }))
    .option('--lora-name <name>', 'lora: file name of the LoRA (default custom_diffusion)')
    .option('--skip-unsupported', 'lora: leave out the layers a K/V LoRA cannot hold (to_q/to_out of crossattn deltas) instead of failing')
    .addOption(new Option('--serialization <s>', 'diffusers: safetensors (default) or bin (torch.save files)').choices(['safetensors', 'bin']));
  addDeviceOptions(cmd, { device: false, dtypes: ['float32', 'float16'], dtypeHelp: 'dtype of the written tensors (default float32, as the original tools save)' });
  addOverwriteOption(cmd);
  addCommonOptions(cmd);
  addExamples(cmd, [
    'customdiff convert out/cat/delta.safetensors --to delta-bin -o logs/cat/delta.bin',
    'customdiff convert out/cat/delta.safetensors --to compvis -o logs/cat/checkpoints/delta_epoch=000000.ckpt',
    'customdiff convert out/cat/delta.safetensors --to diffusers -o out/cat-diffusers',
    'customdiff convert out/cat/delta.safetensors --to lora --model models/sd15 --rank 16 -o out/cat-lora',
    'customdiff convert logs/cat/delta.bin --to ours -o cat.safetensors',
  ]);
  return defineAction<ConvertCliOptions>(cmd, async (ctx, input) => {
    const o = ctx.opts;
    if (!o.to) throw usageError(`convert needs --to: one of ${Object.keys(CONVERT_TARGETS).join(', ')}`);
    if (!o.output) throw usageError(`convert needs -o/--output: the ${DELTA_EXPORT_FORMATS[CONVERT_TARGETS[o.to]]} to write`);
    const format = CONVERT_TARGETS[o.to];
    const loraOnly = (['rank', 'ratio', 'keepCrossing', 'alpha', 'loraName', 'skipUnsupported'] as const).filter((k) => o[k] !== undefined);
    if (format !== 'lora' && loraOnly.length > 0) {
      throw usageError(`--${loraOnly[0].replace(/[A-Z]/g, (c) => '-' + c.toLowerCase())} applies to --to lora only (to compress a delta, use "customdiff compress")`);
    }
    if (format !== 'diffusers-attn-procs' && o.serialization !== undefined) throw usageError('--serialization applies to --to diffusers only');
    const file = findDeltaFile(input);
    const output = path.resolve(o.output);
    if (path.resolve(file) === output) throw usageError(`-o ${output} is the input; choose another name`);
    const kind = DELTA_EXPORT_FORMATS[format];
    let removed: string[] = [];
    if (kind === 'file') checkOutputFile(output, o.overwrite, '-o');
    else removed = checkOutputFolder(output, format, o.overwrite);
    if (removed.length > 0) ctx.reporter.info(`--overwrite: removed ${removed.join(', ')} of an earlier export from ${output}`);

    // The original formats do not record token ids: number them after the base vocabulary when the model is known.
    const firstTokenId = o.model ? (await ClipTokenizer.fromFolder(path.join(o.model, 'tokenizer'))).vocabSize : undefined;
    const delta = await openDelta(file, { firstTokenId });
    if (format === 'lora' && delta.kind !== 'compressed') {
      if (!o.model) throw usageError(`--to lora of a ${delta.kind} delta needs --model (the LoRA holds W − W0) and --rank or --ratio`);
      if (o.rank === undefined && o.ratio === undefined) throw usageError(`--to lora of a ${delta.kind} delta needs --rank (e.g. --rank 16) or --ratio (e.g. 0.6)`);
    }
    if (format === 'diffusers-attn-procs' && delta.kind === 'compressed' && !o.model) {
      throw usageError('--to diffusers of a compressed delta needs --model: diffusers files hold full weights W = W0 + u·v');
    }
    const r = await exportDelta(delta, format, output, {
      baseModel: o.model,
      dtype: o.dtype as 'float32' | 'float16' | undefined,
      serialization: o.serialization,
      rank: o.rank,
      ratio: o.ratio,
      keepCrossing: o.keepCrossing,
      alpha: o.alpha,
      loraName: o.loraName,
      skipUnsupported: o.skipUnsupported,
      signal: ctx.signal,
    });
    for (const s of r.skipped) ctx.reporter.warn(`${s} was not exported`);
    const tokens = r.tokens.map((t) => (t.trigger !== t.token ? `${t.token} (type "${t.trigger}")` : t.token));
    ctx.reporter.result(
      `Wrote ${format}${tokens.length ? ` with tokens ${tokens.join(' ')}` : ''}:\n${r.files.join('\n')}`,
      { input: path.resolve(file), sourceFormat: delta.metadata.source_format ?? 'ours', sourceKind: delta.kind, ...r },
    );
  });
}
