/**
 * `customdiff sample`: images from prompts with the base model and any Custom Diffusion deltas
 * (ours, compressed or not, merged, or the original repository's and diffusers' files). Image i of
 * a run (prompts in order, `--num-images` each) gets the seed `--seed + i` and the file name
 * `<i>-<seed>.<ext>`, so names sort in generation order and any one image can be made again on its
 * own (`--prompt … --seed <its seed>`); PNG files carry their parameters in text chunks.
 */
import { Command, Option } from 'commander';
import { randomInt } from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import type { Delta } from '../delta/file';
import { openDelta } from '../delta/foreign';
import type { GeneratedImage, GenerationProgress } from '../sample/generate';
import { parametersText } from '../sample/generate';
import { makeGrid, saveImage } from '../sample/images';
import { defineAction, type CommandContext } from './action';
import { findDeltaFile } from './convert';
import { addSamplingOptions, checkModelFolder, generationDtype, loadPipeline, seedRange, type SamplingOptions } from './generation';
import {
  addCommonOptions,
  addDeviceOptions,
  addExamples,
  addOverwriteOption,
  collectArg,
  intArg,
  usageError,
  type DeviceOptions,
  type OverwriteOptions,
} from './options';
import { formatDuration, type Progress } from './output';

export interface SampleCliOptions extends OverwriteOptions, DeviceOptions, SamplingOptions {
  model?: string;
  prompt?: string[];
  promptsFile?: string;
  delta?: string[];
  force?: boolean;
  numImages?: number;
  output?: string;
  grid?: boolean;
  format?: 'png' | 'jpg' | 'jpeg' | 'webp';
  quality?: number;
}

const EXTENSIONS: Record<string, { ext: string; label: string }> = {
  png: { ext: 'png', label: 'PNG' },
  jpg: { ext: 'jpg', label: 'JPEG' },
  jpeg: { ext: 'jpg', label: 'JPEG' },
  webp: { ext: 'webp', label: 'WebP' },
};

/** One image of the run. */
interface Planned {
  index: number;
  prompt: string;
  seed: number;
  file: string;
}

/** The prompts of `--prompt` (in order), then the lines of `--prompts-file` (blank lines skipped). */
export function collectPrompts(prompts: string[] | undefined, file: string | undefined): string[] {
  const out = [...(prompts ?? [])];
  if (file !== undefined) {
    let text: string;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch (e) {
      throw usageError(`Cannot read --prompts-file ${file} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); give a text file with one prompt per line`);
    }
    out.push(...text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== ''));
  }
  for (const p of out) if (p.trim() === '') throw usageError('--prompt is empty; give the text of the image, e.g. --prompt "<new1> cat playing with a ball"');
  return out;
}

/** Reads the `--delta` files and checks they can apply together. */
async function readDeltas(ctx: CommandContext<SampleCliOptions>, files: string[], prompts: string[]): Promise<Delta[]> {
  const deltas: Delta[] = [];
  const owner = new Map<string, string>();
  const layerOwner = new Map<string, string>();
  for (const given of files) {
    const file = findDeltaFile(given);
    const d = await openDelta(file);
    d.metadata.name ??= given;
    if (ctx.opts.force) d.baseModelFingerprint = null;
    for (const t of d.tokens) {
      const other = owner.get(t.token);
      if (other !== undefined) {
        throw usageError(
          `--delta ${other} and --delta ${given} both define the token ${t.token}; merge them into one delta with ` +
            '"customdiff compose" (it renames the tokens <new1>, <new2>, …), or train them with distinct --modifier-token',
        );
      }
      owner.set(t.token, given);
    }
    const layers = [...Object.keys(d.weights), ...Object.keys(d.factors)];
    const shared = layers.filter((l) => layerOwner.has(l));
    if (shared.length > 0) {
      ctx.reporter.warn(
        `--delta ${given} replaces the key/value weights of --delta ${layerOwner.get(shared[0])} on ${shared.length} of its ${layers.length} layers; ` +
          'to show two concepts together, merge them with "customdiff compose" and sample with the merged delta',
      );
    }
    for (const l of layers) layerOwner.set(l, given);
    const tokens = d.tokens.map((t) => t.token);
    if (tokens.length > 0 && !prompts.some((p) => tokens.some((t) => p.includes(t)))) {
      ctx.reporter.warn(`no prompt uses the token${tokens.length > 1 ? 's' : ''} of --delta ${given} (${tokens.join(' ')}); put it in the prompt, e.g. "${tokens[0]} cat playing with a ball"`);
    }
    deltas.push(d);
  }
  const unknown = [...new Set(prompts.flatMap((p) => [...p.matchAll(/<[^<>\s]+>/g)].map((m) => m[0])))].filter((t) => !owner.has(t));
  if (unknown.length > 0) {
    ctx.reporter.warn(`the prompts use ${unknown.join(' ')}, which no --delta defines; the model reads ${unknown.length > 1 ? 'them' : 'it'} as plain text`);
  }
  return deltas;
}

function buildCommand(): Command {
  const cmd = new Command('sample')
    .summary('generate images from prompts, with trained concepts (deltas)')
    .description(
      'Generate images from prompts with a base model and, optionally, Custom Diffusion deltas (any format: ours, compressed, ' +
        'merged, the original delta.bin / delta_epoch=*.ckpt, diffusers weights). Image i gets the seed --seed + i and the file ' +
        '<i>-<seed>.<format> in --output; PNG files record the prompt and settings. Existing files are never replaced without --overwrite.',
    );
  cmd.optionsGroup('Model and concepts:');
  cmd.option('-m, --model <dir>', 'the base model: a diffusers folder (unet/, text_encoder/, vae/, tokenizer/, scheduler/)');
  cmd.option('-d, --delta <file>', 'a trained delta (a file, or a training output folder); repeat for concepts with distinct tokens', collectArg);
  cmd.option('--force', "use deltas even when they record another base model's fingerprint");
  cmd.optionsGroup('Prompts:');
  cmd.option('-p, --prompt <text>', 'what to draw, e.g. "<new1> cat playing with a ball" (repeatable)', collectArg);
  cmd.option('--prompts-file <file>', 'more prompts, one per line (blank lines skipped)');
  cmd.option('-n, --num-images <n>', 'images per prompt (default 1)', intArg(1, 100_000));
  cmd.optionsGroup('Sampling:');
  addSamplingOptions(cmd, { steps: 50, guidance: 7.5, batchSize: 1, seed: 'image i gets seed + i (default: a random seed, printed; with --batch-size 1 every image is reproducible on its own from its seed)' });
  cmd.optionsGroup('Output:');
  cmd.option('-o, --output <dir>', 'the folder for the images (default samples)');
  cmd.option('--grid', 'also write grid.<format>: all images, one row per prompt');
  cmd.addOption(new Option('--format <format>', 'image format (default png, which records the parameters)').choices(['png', 'jpg', 'jpeg', 'webp']));
  cmd.option('--quality <q>', 'JPEG/WebP quality 1-100 (default 92)', intArg(1, 100));
  addDeviceOptions(cmd, { dtypes: ['float32', 'float16', 'bfloat16'], dtypeHelp: 'model dtype (default float16 on CUDA, float32 on the CPU)' });
  addOverwriteOption(cmd);
  addCommonOptions(cmd);
  addExamples(cmd, [
    'customdiff sample -m models/sd15 --delta out/cat/delta.safetensors -p "<new1> cat playing with a ball" -n 4 --grid -o samples/cat',
    '# two concepts merged by "customdiff compose"; prompts from a file; the same images again with the same seed',
    'customdiff sample -m models/sd15 -d pot+cat.safetensors --prompts-file prompts.txt -n 2 --seed 42 --scheduler ddim --steps 50 -o samples/joint',
    '# the original repository\'s files work as they are',
    'customdiff sample -m models/sd14 -d logs/cat/delta.bin -p "<new1> cat in times square" --guidance 6 --batch-size 4 -n 8',
  ]);
  return cmd;
}

export function sampleCommand(): Command {
  return defineAction<SampleCliOptions>(
    buildCommand(),
    async (ctx) => {
      const o = ctx.opts;
      const model = checkModelFolder(o.model, 'sample');
      const prompts = collectPrompts(o.prompt, o.promptsFile);
      if (prompts.length === 0) throw usageError('sample needs a prompt: --prompt "<new1> cat playing with a ball" (repeatable) or --prompts-file <file>');
      const perPrompt = o.numImages ?? 1;
      const total = prompts.length * perPrompt;
      const batchSize = Math.min(o.batchSize ?? 1, total);
      const seed = o.seed ?? randomInt(0, 2 ** 32);
      if (seed + total - 1 > Number.MAX_SAFE_INTEGER) throw usageError(`--seed ${seed} leaves no room for ${total} images; give a smaller --seed`);
      const format = EXTENSIONS[o.format ?? 'png'];
      if (o.quality !== undefined && format.ext === 'png') throw usageError('--quality applies to --format jpg and webp only (PNG is lossless)');
      const outDir = path.resolve(o.output ?? 'samples');
      if (fs.existsSync(outDir) && !fs.statSync(outDir).isDirectory()) throw usageError(`--output ${outDir} is a file; give a folder for the images`);

      // Every file this run writes, checked before anything is generated.
      const digits = Math.max(4, String(total - 1).length);
      const planned: Planned[] = [];
      prompts.forEach((prompt, p) => {
        for (let k = 0; k < perPrompt; k++) {
          const index = p * perPrompt + k;
          planned.push({ index, prompt, seed: seed + index, file: path.join(outDir, `${String(index).padStart(digits, '0')}-${seed + index}.${format.ext}`) });
        }
      });
      const gridFile = o.grid ? path.join(outDir, `grid.${format.ext}`) : undefined;
      const existing = [...planned.map((x) => x.file), ...(gridFile ? [gridFile] : [])].filter((f) => fs.existsSync(f));
      if (existing.length > 0 && !o.overwrite) {
        const names = existing.slice(0, 3).map((f) => path.basename(f)).join(', ');
        throw usageError(
          `${outDir} already holds ${names}${existing.length > 3 ? ` and ${existing.length - 3} more` : ''} of an earlier run; ` +
            'pass --overwrite to replace them, or choose another --output or --seed',
        );
      }

      const deltas = await readDeltas(ctx, o.delta ?? [], prompts);
      const device = ctx.device();
      const dtype = generationDtype(device, o.dtype);
      const batches = Math.ceil(total / batchSize);
      ctx.reporter.info(
        `${total} image${total > 1 ? 's' : ''} (${prompts.length} prompt${prompts.length > 1 ? 's' : ''} × ${perPrompt}, ${seedRange(seed, total)}) ` +
          `in ${batches} batch${batches > 1 ? 'es' : ''} on ${device} (${dtype}); output in ${outDir}`,
      );
      ctx.reporter.event('start', {
        model,
        device,
        dtype,
        outputDir: outDir,
        prompts,
        images: total,
        batches,
        batchSize,
        seed,
        deltas: (o.delta ?? []).map((d) => path.resolve(d)),
      });
      const started = performance.now();
      const sd = await loadPipeline(model, device, dtype, o.variant);
      const written: Planned[] = [];
      const kept: GeneratedImage[] = [];
      try {
        fs.mkdirSync(outDir, { recursive: true });
        for (let b = 0; b < batches; b++) {
          const batch = planned.slice(b * batchSize, (b + 1) * batchSize);
          let bar: Progress | undefined;
          const onProgress = (e: GenerationProgress) => {
            if (e.phase !== 'denoise') return;
            ctx.reporter.event('step', { batch: b + 1, batches, step: e.step, steps: e.steps, elapsedMs: e.elapsedMs });
            bar ??= ctx.reporter.progress({ label: batches > 1 ? `sample: batch ${b + 1}/${batches}` : 'sample', total: e.steps, unit: 'step', jsonEvents: false });
            // The mean rate since the call began (text encoding included): steadier than the bar's own first-step rate.
            bar.update(e.step, { rate: e.elapsedMs > 0 ? e.step / (e.elapsedMs / 1000) : undefined });
          };
          let result;
          try {
            result = await sd.generate({
              prompt: batch.map((x) => x.prompt),
              negativePrompt: o.negativePrompt,
              numImages: 1,
              seed: batch.map((x) => x.seed),
              deltas,
              steps: o.steps,
              guidanceScale: o.guidance,
              scheduler: o.scheduler,
              eta: o.eta,
              width: o.width,
              height: o.height,
              signal: ctx.signal,
              onProgress,
            });
          } finally {
            bar?.stop();
          }
          if (b === 0) for (const w of result.warnings) ctx.reporter.warn(w);
          for (const [k, img] of result.images.entries()) {
            const x = batch[k];
            await saveImage(img, x.file, {
              overwrite: o.overwrite,
              quality: o.quality,
              text: format.ext === 'png' ? parametersText(img.parameters) : undefined,
            });
            written.push(x);
            if (gridFile) kept.push(img);
            ctx.reporter.event('image', { file: x.file, index: x.index, prompt: x.prompt, seed: x.seed });
            ctx.reporter.debug(`wrote ${x.file}`);
          }
        }
        if (gridFile) {
          const columns = prompts.length > 1 && perPrompt > 1 ? perPrompt : undefined;
          await saveImage(makeGrid(kept, { columns }), gridFile, { overwrite: o.overwrite, quality: o.quality });
        }
      } catch (e) {
        if (written.length > 0 && ctx.signal.aborted) ctx.reporter.info(`kept the ${written.length} image${written.length > 1 ? 's' : ''} written before the interruption in ${outDir}`);
        throw e;
      } finally {
        sd.dispose();
      }
      const seconds = (performance.now() - started) / 1000;
      ctx.reporter.result(
        `Wrote ${written.length} ${format.label} image${written.length > 1 ? 's' : ''} (${seedRange(seed, total)}) in ${formatDuration(seconds)}:\n` +
          [...written.map((x) => x.file), ...(gridFile ? [gridFile] : [])].join('\n'),
        {
          outputDir: outDir,
          seed,
          files: written.map((x) => ({ file: x.file, index: x.index, prompt: x.prompt, seed: x.seed })),
          grid: gridFile ?? null,
          seconds,
        },
      );
    },
    { interruptMessage: 'stopping (images already written are kept)' },
  );
}
