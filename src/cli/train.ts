/**
 * `customdiff train`: Custom Diffusion training from the terminal — one concept
 * (`--instance-dir`, `--instance-prompt`, optionally `--class-dir`/`--class-prompt`), or several
 * jointly (`--concepts-list` in the original JSON format) — with every option of the `train()` API,
 * presets from the original README, resume, and Ctrl-C that saves a checkpoint before stopping.
 */
import { Command, Option } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { AbortError } from '../errors';
import { latestCheckpoint, listCheckpoints } from '../train/checkpoint';
import { readConceptsList, type ConceptSpec } from '../train/dataset';
import type { StableDiffusion } from '../model/pipeline';
import { train, type StepEvent, type TrainOptions, type TrainResult } from '../train/trainer';
import { defineAction, type CommandContext, type Preset } from './action';
import { classFolderState, listedImages, runClassImages } from './class-images';
import { generationDtype, loadPipeline } from './generation';
import {
  addCommonOptions,
  addDeviceOptions,
  addExamples,
  addOverwriteOption,
  intArg,
  numberArg,
  tokensArg,
  usageError,
  type DeviceOptions,
  type OverwriteOptions,
} from './options';
import { formatDuration } from './output';
import { validationSampler } from './validation';

export interface TrainCliOptions extends OverwriteOptions, DeviceOptions {
  preset?: string;
  // Model
  model?: string;
  variant?: string;
  // Data
  instanceDir?: string;
  instancePrompt?: string;
  instanceCaptions?: string;
  classDir?: string;
  classPrompt?: string;
  conceptsList?: string;
  priorPreservation?: boolean;
  priorLossWeight?: number;
  numClassImages?: number;
  sampleBatchSize?: number;
  resolution?: number;
  augmentStyle?: 'compvis' | 'diffusers';
  hflip?: boolean;
  noaug?: boolean;
  centerCrop?: boolean;
  resizeEngine?: 'pil' | 'sharp';
  // Tokens
  modifierToken?: string[];
  initializerToken?: string[];
  freezeModel?: 'crossattn_kv' | 'crossattn';
  // Optimisation
  learningRate?: number;
  tokenLearningRate?: number;
  scaleLr?: boolean;
  numProcesses?: number;
  lrWarmupSteps?: number;
  maxTrainSteps?: number;
  trainBatchSize?: number;
  gradientAccumulationSteps?: number;
  maxGradNorm?: number;
  adamBeta1?: number;
  adamBeta2?: number;
  adamWeightDecay?: number;
  adamEpsilon?: number;
  lossWeighting?: 'diffusers' | 'compvis';
  seed?: number;
  mixedPrecision?: 'no' | 'fp16' | 'bf16';
  gradientCheckpointing?: boolean;
  // Output
  outputDir?: string;
  checkpointingSteps?: number;
  checkpointsTotalLimit?: number;
  resume?: string | true;
  deltaDtype?: 'float32' | 'float16';
  saveDelta?: boolean;
  // Validation
  validationPrompt?: string;
  validationSteps?: number;
  numValidationImages?: number;
}

/**
 * Recipes of the original README (adobe-research/custom-diffusion, "Training using Diffusers
 * library" and "Fine-tuning on human faces"): its commands pass resolution 512, batch size 2, lr
 * warmup 0, 200 class images, prior loss weight 1, scale_lr and hflip. The step counts are the
 * README's one-GPU advice (our runs use one device).
 */
export const TRAIN_PRESETS: Record<string, Preset> = {
  object: {
    description: 'one object or pet: lr 1e-5, 500 steps (README: 250 on 2 GPUs, "increase to 500 if 1 GPU")',
    values: { learningRate: 1e-5, maxTrainSteps: 500, trainBatchSize: 2, lrWarmupSteps: 0, numClassImages: 200, priorLossWeight: 1.0, scaleLr: true, hflip: true, resolution: 512 },
  },
  joint: {
    description: 'several concepts trained together (--concepts-list): lr 1e-5, 1000 steps (README: 500 on 2 GPUs, "1000 if 1 GPU")',
    values: { learningRate: 1e-5, maxTrainSteps: 1000, trainBatchSize: 2, lrWarmupSteps: 0, numClassImages: 200, priorLossWeight: 1.0, scaleLr: true, hflip: true, resolution: 512 },
  },
  face: {
    description:
      'human faces: lr 5e-6, 750 steps (README: "we recommend learning_rate=5e-6 and max_train_steps=750"; with few images ' +
      'it suggests adding --freeze-model crossattn)',
    values: { learningRate: 5e-6, maxTrainSteps: 750, trainBatchSize: 2, lrWarmupSteps: 0, numClassImages: 200, priorLossWeight: 1.0, scaleLr: true, hflip: true, resolution: 512 },
  },
};

const DTYPE_TO_MIXED: Record<string, 'no' | 'fp16' | 'bf16'> = { float32: 'no', float16: 'fp16', bfloat16: 'bf16' };

/** Options recorded by a run that a resume takes as defaults (not where or how it runs). */
const NOT_RESUMED = new Set(['device', 'numThreads', 'outputDir', 'resumeFromCheckpoint', 'checkpointOnAbort', 'resolved', 'signal', 'sample']);

function buildCommand(): Command {
  const cmd = new Command('train').description(
    'Train Custom Diffusion on a few photos of a concept (or several concepts jointly). Writes <output-dir>/delta.safetensors ' +
      '(the trained weights and tokens), run.json, and checkpoint-<step>/ folders when --checkpointing-steps is set.',
  );
  cmd.summary('train a concept (or several jointly) on a few photos');
  cmd.addOption(new Option('--preset <name>', 'a recipe of the original README (see Presets below); options given win').choices(Object.keys(TRAIN_PRESETS)));
  cmd.addHelpText('after', `\nPresets:\n${Object.entries(TRAIN_PRESETS).map(([k, p]) => `  ${k.padEnd(8)}${p.description}`).join('\n')}`);

  cmd.optionsGroup('Model:');
  cmd.option('-m, --model <dir>', 'the base model: a diffusers folder (unet/, text_encoder/, vae/, tokenizer/, scheduler/)');
  cmd.option('--variant <name>', 'load this weights variant, e.g. fp16 (upcast to float32 for training)');

  cmd.optionsGroup('Data (one concept):');
  cmd.option('--instance-dir <dir>', 'folder of 4-20 photos of the concept');
  cmd.option('--instance-prompt <text>', 'e.g. "photo of a <new1> cat"; <...> tokens in it become modifier tokens unless --modifier-token says otherwise');
  cmd.option('--instance-captions <file>', 'captions per instance image (a .json map of file names, or one line per sorted image)');
  cmd.option(
    '--class-dir <dir>',
    'regularisation images: a folder of images, one "customdiff retrieve" or "customdiff class-images" wrote, or a folder that does not exist yet (filled with images generated from --class-prompt)',
  );
  cmd.option('--class-prompt <text>', 'e.g. "cat": the caption of class images without their own; without --class-dir, --num-class-images images of it are generated into <output-dir>/class_images first');
  cmd.optionsGroup('Data (several concepts):');
  cmd.option('--concepts-list <file>', 'a JSON list of {instance_prompt, instance_data_dir, class_prompt, class_data_dir} (the original format)');
  cmd.optionsGroup('Data options:');
  cmd.option('--prior-preservation', 'train with the class images (default: when every concept has them)');
  cmd.option('--no-prior-preservation', 'ignore the class images');
  cmd.option('--prior-loss-weight <w>', 'weight of the class-image loss (default 1)', numberArg({ min: 0 }));
  cmd.option('--num-class-images <n>', 'class images used per concept, and generated where a class folder lacks them (default 200)', intArg(1));
  cmd.option('--sample-batch-size <n>', 'images per denoising loop when generating class images (default 4)', intArg(1, 1024));
  cmd.option('--resolution <px>', 'training resolution, a multiple of 8 (default 512)', intArg(24));
  cmd.addOption(new Option('--augment-style <style>', "image pipeline of the paper's code (compvis: center crop, default) or of its diffusers scripts (diffusers: squash)").choices(['compvis', 'diffusers']));
  cmd.option('--no-hflip', 'no random horizontal flips');
  cmd.option('--noaug', 'no scale augmentation of the instance images (the face recipe of the diffusers example uses it)');
  cmd.option('--center-crop', 'class images: central instead of random crop (diffusers style)');
  cmd.addOption(new Option('--resize-engine <engine>', 'pil: byte-exact with Pillow (default); sharp: faster').choices(['pil', 'sharp']));

  cmd.optionsGroup('Tokens and trained weights:');
  cmd.option('--modifier-token <tokens>', 'new tokens, e.g. "<new1>" or "<new1>+<new2>" (repeatable; default: the <...> tokens of the instance prompts)', tokensArg);
  cmd.option('--initializer-token <tokens>', 'vocabulary entries the new tokens start from, in order (default ktn+pll+ucd)', tokensArg);
  cmd.addOption(new Option('--freeze-model <mode>', 'train the cross-attention key/value weights (crossattn_kv, default) or all cross-attention weights (crossattn)').choices(['crossattn_kv', 'crossattn']));

  cmd.optionsGroup('Optimisation:');
  cmd.option('--learning-rate <lr>', 'base learning rate (default 1e-5)', numberArg({ min: 0 }));
  cmd.option('--token-learning-rate <lr>', 'base learning rate of the modifier tokens (default: --learning-rate; scaled alike)', numberArg({ min: 0 }));
  cmd.option('--no-scale-lr', 'use the learning rate as given (default: × accumulation × batch size × processes, × 2 with prior preservation)');
  cmd.option('--num-processes <n>', 'processes of the run the lr scaling assumes (default 1)', intArg(1));
  cmd.option('--lr-warmup-steps <n>', 'linear warmup steps (default 0)', intArg(0));
  cmd.option('--max-train-steps <n>', 'optimizer steps (default 250)', intArg(0));
  cmd.option('--train-batch-size <n>', 'instance images per step (default 2; as many class images are added)', intArg(1));
  cmd.option('--gradient-accumulation-steps <n>', 'micro-batches per optimizer step (default 1)', intArg(1));
  cmd.option('--max-grad-norm <x>', 'gradient clipping (default 1; 0 disables)', numberArg({ min: 0 }));
  cmd.option('--adam-beta1 <x>', 'default 0.9', numberArg({ min: 0, max: 0.999999 }));
  cmd.option('--adam-beta2 <x>', 'default 0.999', numberArg({ min: 0, max: 0.999999 }));
  cmd.option('--adam-weight-decay <x>', 'default 0.01', numberArg({ min: 0 }));
  cmd.option('--adam-epsilon <x>', 'default 1e-8', numberArg({ min: 0 }));
  cmd.addOption(new Option('--loss-weighting <w>', 'diffusers (default: masked instance term + plain prior term) or compvis (one masked formula for all)').choices(['diffusers', 'compvis']));
  cmd.option('--seed <n>', 'seeds the data order, augmentation and noise (default 42)', intArg(0));
  cmd.addOption(new Option('--mixed-precision <p>', 'autocast the forward passes (fp16: CUDA only); trained weights stay float32. Same as --dtype').choices(['no', 'fp16', 'bf16']));
  cmd.option('--gradient-checkpointing', 'recompute UNet blocks in the backward pass: less memory, about a third more time per step');

  cmd.optionsGroup('Output:');
  cmd.option('-o, --output-dir <dir>', 'where delta.safetensors, run.json and checkpoints go');
  cmd.option('--checkpointing-steps <n>', 'save a checkpoint every n steps (Ctrl-C always saves one)', intArg(0));
  cmd.option('--checkpoints-total-limit <n>', 'keep only the newest n checkpoints', intArg(0));
  cmd.option('--resume [checkpoint]', 'continue from a checkpoint folder, or the newest in --output-dir (the default); options not given are taken from it');
  cmd.addOption(new Option('--delta-dtype <dtype>', 'dtype of the saved delta (default float32)').choices(['float32', 'float16']));
  cmd.option('--no-save-delta', 'do not write delta.safetensors and run.json (checkpoints only)');

  cmd.optionsGroup('Validation:');
  cmd.option('--validation-prompt <text>', 'generate images of this prompt during training, e.g. "<new1> cat playing with a ball"');
  cmd.option('--validation-steps <n>', 'every n steps (default 50); images go to <output-dir>/validation/step-<n>/', intArg(1));
  cmd.option('--num-validation-images <n>', 'images per validation, from seeds --seed, --seed + 1, … (default 2)', intArg(1, 64));

  addDeviceOptions(cmd, {
    dtypes: ['float32', 'float16', 'bfloat16'],
    dtypeHelp: 'compute dtype: float16/bfloat16 autocast the forward passes (= --mixed-precision fp16/bf16); trained weights stay float32',
  });
  addOverwriteOption(cmd);
  addCommonOptions(cmd);
  addExamples(cmd, [
    '# one concept; 200 class images of "cat" are generated into out/cat/class_images first',
    'customdiff train -m models/sd15 --instance-dir data/cat --instance-prompt "photo of a <new1> cat" --class-prompt cat -o out/cat',
    '# one concept with real regularisation images (see "customdiff retrieve")',
    'customdiff train -m models/sd15 --instance-dir data/cat --instance-prompt "photo of a <new1> cat" \\\n      --class-dir real_reg/samples_cat --class-prompt cat -o out/cat --max-train-steps 500',
    '# a face, with the README recipe',
    'customdiff train --preset face -m models/sd15 --instance-dir data/me --instance-prompt "photo of a <new1> person" \\\n      --class-dir real_reg/samples_person --class-prompt person -o out/me',
    '# two concepts jointly',
    'customdiff train -m models/sd15 --concepts-list concepts.json --modifier-token "<new1>+<new2>" -o out/pot+cat --preset joint',
    '# options from a file; continue an interrupted run',
    'customdiff train --config cat.json',
    'customdiff train -o out/cat --resume',
  ]);
  return cmd;
}

/** The `<...>` tokens of the prompts, in order of first appearance. */
export function promptTokens(prompts: string[]): string[] {
  const seen: string[] = [];
  for (const p of prompts) for (const m of p.matchAll(/<[^<>\s]+>/g)) if (!seen.includes(m[0])) seen.push(m[0]);
  return seen;
}

/** The options recorded in a checkpoint (state.json `options`), or undefined. */
function recordedOptions(dir: string): Record<string, unknown> | undefined {
  try {
    const state = JSON.parse(fs.readFileSync(path.join(dir, 'state.json'), 'utf8')) as { options?: unknown };
    return state.options && typeof state.options === 'object' ? (state.options as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

/** TrainOptions from the command's options, split into what the user set and what presets/defaults gave. */
function toTrainOptions(ctx: CommandContext<TrainCliOptions>): { explicit: TrainOptions; implicit: TrainOptions } {
  const o = ctx.opts;
  const explicit: Record<string, unknown> = {};
  const implicit: Record<string, unknown> = {};
  const put = (cli: keyof TrainCliOptions, api: string, value: unknown = o[cli]) => {
    if (value === undefined) return;
    const target = ctx.explicit(cli) ? explicit : implicit;
    if (api.startsWith('augment.')) {
      const a = ((target.augment as Record<string, unknown>) ??= {});
      a[api.slice(8)] = value;
    } else {
      target[api] = value;
    }
  };
  const abs = (p: string | undefined) => (p === undefined ? undefined : path.resolve(p));
  put('model', 'pretrainedModel', abs(o.model));
  put('variant', 'variant');
  put('conceptsList', 'concepts', abs(o.conceptsList));
  put('priorPreservation', 'withPriorPreservation');
  put('priorLossWeight', 'priorLossWeight');
  put('numClassImages', 'numClassImages');
  put('resolution', 'resolution');
  put('augmentStyle', 'augment.style');
  put('hflip', 'augment.hflip');
  put('noaug', 'augment.noaug');
  put('centerCrop', 'augment.centerCrop');
  put('resizeEngine', 'augment.engine');
  put('modifierToken', 'modifierTokens');
  put('initializerToken', 'initializerTokens');
  put('freezeModel', 'freezeModel');
  put('learningRate', 'learningRate');
  put('tokenLearningRate', 'tokenLearningRate');
  put('scaleLr', 'scaleLr');
  put('numProcesses', 'numProcesses');
  put('lrWarmupSteps', 'lrWarmupSteps');
  put('maxTrainSteps', 'maxTrainSteps');
  put('trainBatchSize', 'trainBatchSize');
  put('gradientAccumulationSteps', 'gradientAccumulationSteps');
  put('maxGradNorm', 'maxGradNorm');
  put('adamBeta1', 'adamBeta1');
  put('adamBeta2', 'adamBeta2');
  put('adamWeightDecay', 'adamWeightDecay');
  put('adamEpsilon', 'adamEpsilon');
  put('lossWeighting', 'lossWeighting');
  put('seed', 'seed');
  put('mixedPrecision', 'mixedPrecision');
  if (o.dtype !== undefined) put('dtype', 'mixedPrecision', DTYPE_TO_MIXED[o.dtype]);
  put('gradientCheckpointing', 'gradientCheckpointing');
  put('checkpointingSteps', 'checkpointingSteps');
  put('checkpointsTotalLimit', 'checkpointsTotalLimit');
  put('deltaDtype', 'deltaDtype');
  put('saveDelta', 'saveDelta');
  put('validationPrompt', 'validationPrompt');
  put('validationSteps', 'validationSteps');
  // One concept: always as a concepts entry (so a resume restores it whole).
  if (o.instanceDir !== undefined || o.instancePrompt !== undefined || o.classDir !== undefined || o.classPrompt !== undefined || o.instanceCaptions !== undefined) {
    const spec: Record<string, unknown> = {};
    if (o.instanceDir !== undefined) spec.instanceDataDir = path.resolve(o.instanceDir);
    if (o.instancePrompt !== undefined) spec.instancePrompt = o.instancePrompt;
    if (o.classDir !== undefined) spec.classDataDir = path.resolve(o.classDir);
    if (o.classPrompt !== undefined) spec.classPrompt = o.classPrompt;
    if (o.instanceCaptions !== undefined) spec.instanceCaptionsFile = path.resolve(o.instanceCaptions);
    const anyExplicit = (['instanceDir', 'instancePrompt', 'classDir', 'classPrompt', 'instanceCaptions'] as const).some((k) => ctx.explicit(k));
    (anyExplicit ? explicit : implicit).concepts = [spec];
  }
  return { explicit: explicit as TrainOptions, implicit: implicit as TrainOptions };
}

function checkConcepts(o: TrainCliOptions): void {
  const single = (['instanceDir', 'instancePrompt', 'classDir', 'classPrompt', 'instanceCaptions'] as const).filter((k) => o[k] !== undefined);
  if (o.conceptsList !== undefined && single.length > 0) {
    throw usageError('Give either --concepts-list (several concepts) or --instance-dir/--instance-prompt/--class-dir/--class-prompt (one concept), not both');
  }
  if (o.conceptsList !== undefined) return;
  if (o.instanceDir === undefined || o.instancePrompt === undefined) {
    throw usageError(
      'train needs the concept: --instance-dir <folder of photos> and --instance-prompt "photo of a <new1> cat" ' +
        '(or --concepts-list concepts.json for several concepts; or --resume to continue a run)',
    );
  }
  if (o.classDir !== undefined && o.classPrompt === undefined && !fs.existsSync(o.classDir)) {
    throw usageError(
      `--class-dir ${o.classDir} does not exist; give --class-prompt to generate class images into it, ` +
        'fill it with "customdiff retrieve" or "customdiff class-images", or fix the path',
    );
  }
  if (!fs.existsSync(o.instanceDir)) throw usageError(`--instance-dir ${o.instanceDir} does not exist; give the folder of the concept's photos`);
}

/** Refuses to replace an earlier run's results (see the module comment of options.ts). */
async function checkOutputDir(ctx: CommandContext<TrainCliOptions>, dir: string, resuming: boolean): Promise<void> {
  const o = ctx.opts;
  const finals = ['delta.safetensors', 'run.json'].filter((f) => fs.existsSync(path.join(dir, f)));
  if (finals.length > 0 && o.saveDelta !== false && !o.overwrite) {
    throw usageError(
      `${dir} already holds ${finals.join(' and ')} of an earlier run; pass --overwrite to replace ${finals.length > 1 ? 'them' : 'it'}, ` +
        'or choose another --output-dir',
    );
  }
  const checkpoints = await listCheckpoints(dir);
  if (checkpoints.length > 0 && !resuming) {
    if (!o.overwrite) {
      throw usageError(
        `${dir} already holds checkpoints (${checkpoints.map((c) => path.basename(c.dir)).join(', ')}); pass --resume to continue that run, ` +
          '--overwrite to start over (they are deleted), or choose another --output-dir',
      );
    }
    ctx.reporter.info(`--overwrite: removing the earlier checkpoints in ${dir}`);
    for (const c of checkpoints) fs.rmSync(c.dir, { recursive: true, force: true });
  }
}

/** A class prompt that names a captions file (real priors in the HF-EX form), not text to draw. */
function isCaptionsFile(classPrompt: string): boolean {
  try {
    return fs.statSync(classPrompt).isFile();
  } catch {
    return false;
  }
}

/**
 * Prior preservation with generated class images, as the original scripts do it: a concept with a
 * class prompt but no class folder gets `<output-dir>/class_images`; a class folder that does not
 * exist yet (or holds fewer images than wanted from an earlier, interrupted generation) is filled
 * with images of the class prompt from the base model before training starts. Resumable: image i
 * always comes from seed i.
 */
async function prepareClassImages(ctx: CommandContext<TrainCliOptions>, options: TrainOptions, outputDir: string, device: string): Promise<void> {
  if (options.withPriorPreservation === false) return;
  let concepts: ConceptSpec[];
  if (typeof options.concepts === 'string') {
    concepts = await readConceptsList(options.concepts);
  } else if (Array.isArray(options.concepts)) {
    concepts = options.concepts.map((c) =>
      c.classPrompt !== undefined && c.classDataDir === undefined ? { ...c, classDataDir: path.join(outputDir, 'class_images') } : c,
    );
    options.concepts = concepts;
  } else {
    return;
  }
  const wanted = new Map<string, { prompt: string; count: number; existing: number }>();
  for (const c of concepts) {
    if (c.classPrompt === undefined || c.classDataDir === undefined || isCaptionsFile(c.classPrompt)) continue;
    const dir = path.resolve(c.classDataDir);
    const count = c.numClassImages ?? options.numClassImages ?? 200;
    const state = classFolderState(dir);
    // Folders of images from elsewhere (a retrieval, the user's own) are used as they are.
    if (state !== 'absent' && state !== 'empty' && state !== 'generated') continue;
    const existing = state === 'generated' ? listedImages(dir) : 0;
    const prev = wanted.get(dir);
    if (prev && prev.prompt !== c.classPrompt) {
      throw usageError(`Two concepts generate class images into ${dir} with different class prompts ("${prev.prompt}", "${c.classPrompt}"); give each its own class_data_dir`);
    }
    if (existing < count || (prev && prev.count > existing)) wanted.set(dir, { prompt: c.classPrompt, count: Math.max(count, prev?.count ?? 0), existing });
  }
  if (wanted.size === 0) return;

  const dtype = generationDtype(device, undefined);
  const model = path.resolve(options.pretrainedModel!);
  let sd: StableDiffusion | undefined;
  try {
    for (const [dir, w] of wanted) {
      ctx.reporter.info(
        `prior preservation: generating ${w.count - w.existing} class images of "${w.prompt}" into ${dir}` +
          `${w.existing > 0 ? ` (${w.existing} already there)` : ''} with the base model on ${device}`,
      );
      sd ??= await loadPipeline(model, device, dtype, options.variant);
      try {
        const r = await runClassImages({ model: sd, classPrompt: w.prompt, outDir: dir, count: w.count, batchSize: ctx.opts.sampleBatchSize, signal: ctx.signal, reporter: ctx.reporter });
        ctx.reporter.event('class-images', { dir, classPrompt: w.prompt, count: r.count, generated: r.generated, existing: r.existing });
      } catch (e) {
        if (e instanceof AbortError && ctx.signal.aborted) {
          throw new AbortError(
            `Interrupted while generating class images into ${dir}; the images made are kept. Run the same command again to continue (training has not started).`,
          );
        }
        throw e;
      }
    }
  } finally {
    sd?.dispose();
  }
}

export function trainCommand(): Command {
  const cmd = buildCommand();
  return defineAction<TrainCliOptions>(
    cmd,
    async (ctx) => {
      const o = ctx.opts;
      if (!o.outputDir) throw usageError('train needs --output-dir: where to write the delta, the run record and checkpoints (e.g. -o out/cat)');
      const outputDir = path.resolve(o.outputDir);
      if (o.dtype !== undefined && o.mixedPrecision !== undefined && DTYPE_TO_MIXED[o.dtype] !== o.mixedPrecision) {
        throw usageError(`--dtype ${o.dtype} and --mixed-precision ${o.mixedPrecision} disagree; give one of them`);
      }

      // Resume: the checkpoint, and the options it recorded as defaults.
      let resumeFrom: string | undefined;
      let recorded: Record<string, unknown> = {};
      if (o.resume !== undefined) {
        resumeFrom = o.resume === true || o.resume === 'latest' ? await latestCheckpoint(outputDir) : path.resolve(o.resume);
        if (!resumeFrom) {
          throw usageError(`--resume: there is no checkpoint in ${outputDir}; run without --resume to start, or give the checkpoint folder (--resume <dir>)`);
        }
        if (!fs.existsSync(path.join(resumeFrom, 'state.json'))) {
          throw usageError(`--resume ${resumeFrom} is not a checkpoint folder (no state.json); give a checkpoint-<step> folder`);
        }
        recorded = Object.fromEntries(Object.entries(recordedOptions(resumeFrom) ?? {}).filter(([k]) => !NOT_RESUMED.has(k)));
      }

      const { explicit, implicit } = toTrainOptions(ctx);
      if (explicit.concepts !== undefined) delete recorded.concepts;
      if (explicit.concepts !== undefined || recorded.concepts === undefined) {
        checkConcepts(o);
      }
      const options: TrainOptions = {
        ...implicit,
        ...(recorded as TrainOptions),
        ...explicit,
        augment: { ...(implicit.augment ?? {}), ...((recorded.augment as TrainOptions['augment']) ?? {}), ...(explicit.augment ?? {}) },
      };
      if (!options.pretrainedModel) {
        throw usageError('train needs --model: the base model, a diffusers folder (e.g. -m models/stable-diffusion-v1-5)');
      }

      // Modifier tokens from the prompts when none are given.
      if (options.modifierTokens === undefined) {
        const concepts: ConceptSpec[] = typeof options.concepts === 'string' ? await readConceptsList(options.concepts) : (options.concepts ?? []);
        const found = promptTokens(concepts.map((c) => c.instancePrompt));
        if (found.length > 0) {
          options.modifierTokens = found;
          ctx.reporter.info(`modifier token${found.length > 1 ? 's' : ''} from the instance prompt${concepts.length > 1 ? 's' : ''}: ${found.join(' ')} (set --modifier-token to choose)`);
        }
      }

      await checkOutputDir(ctx, outputDir, resumeFrom !== undefined);
      const device = ctx.device();
      options.device = device;
      options.outputDir = outputDir;
      options.checkpointOnAbort = true;
      if (resumeFrom) options.resumeFromCheckpoint = resumeFrom;
      options.signal = ctx.signal;
      if (options.validationPrompt) {
        // diffusers' train_custom_diffusion.py validates every 50 steps unless told otherwise.
        options.validationSteps ??= 50;
        options.sample = validationSampler({ outputDir, reporter: ctx.reporter, numImages: o.numValidationImages });
      }
      await prepareClassImages(ctx, options, outputDir, device);
      ctx.reporter.debug(`options: ${JSON.stringify({ ...options, signal: undefined, sample: undefined })}`);

      const run = train(options);
      const steps = options.maxTrainSteps ?? 250;
      ctx.reporter.info(`training ${steps} steps on ${device}${resumeFrom ? `, resuming from ${resumeFrom}` : ''}; output in ${outputDir}`);
      ctx.reporter.event('start', { device, outputDir, maxTrainSteps: steps, resumeFrom: resumeFrom ?? null, modifierTokens: options.modifierTokens ?? [] });
      let bar: ReturnType<typeof ctx.reporter.progress> | undefined;
      let last: StepEvent | undefined;
      let abortCheckpoint: string | undefined;
      run.on('step', (e) => {
        last = e;
        ctx.reporter.event('step', { ...e });
        bar ??= ctx.reporter.progress({ label: 'train', total: e.maxSteps, unit: 'step', start: e.step - 1, jsonEvents: false });
        bar.update(e.step, {
          fields: { loss: e.loss.toFixed(4), lr: e.lr.toExponential(1) },
          // The trainer's ETA comes from the mean of recent steps: a steadier rate than the last step's.
          rate: e.step < e.maxSteps && e.etaSeconds > 0 ? (e.maxSteps - e.step) / e.etaSeconds : 1 / Math.max(e.secondsPerStep, 1e-9),
          etaSeconds: e.etaSeconds,
        });
      });
      run.on('checkpoint', (e) => {
        if (e.reason === 'abort') abortCheckpoint = e.path;
        ctx.reporter.event('checkpoint', { ...e });
        if (e.reason === 'interval') ctx.reporter.debug(`checkpoint ${e.path} (step ${e.step})`);
      });
      run.on('warning', (e) => ctx.reporter.warn(e.message));
      run.on('sample', (e) => ctx.reporter.event('validation', { step: e.step, prompt: e.prompt, ...(e.result as object) }));

      let result: TrainResult;
      try {
        result = await run.result;
      } catch (e) {
        bar?.stop();
        if (e instanceof AbortError && ctx.signal.aborted) {
          const step = last?.step ?? 0;
          ctx.reporter.event('interrupted', { step, checkpoint: abortCheckpoint ?? null }, true);
          throw new AbortError(
            abortCheckpoint
              ? `Interrupted after step ${step}; saved ${abortCheckpoint}. Continue with: customdiff train -o ${o.outputDir} --resume`
              : 'Interrupted before the first step; nothing was saved. Run the same command again to start.',
          );
        }
        throw e;
      }
      bar?.stop();
      const final = result.losses.at(-1);
      const elapsed = last ? formatDuration(last.elapsedSeconds) : '0s';
      ctx.reporter.result(
        `Trained ${result.steps} steps in ${elapsed}${final !== undefined ? ` (last loss ${final.toFixed(4)})` : ''}` +
          (result.tokens.length ? `; tokens ${result.tokens.map((t) => t.token).join(' ')}` : '') +
          (result.deltaPath ? `\n${result.deltaPath}` : ''),
        {
          steps: result.steps,
          deltaPath: result.deltaPath ?? null,
          runRecordPath: result.runRecordPath ?? null,
          checkpoints: result.checkpoints,
          tokens: result.tokens,
          losses: result.losses,
          baseModelFingerprint: result.baseModelFingerprint,
        },
      );
      for (const t of Object.values(result.trained)) t.dispose();
    },
    { presets: TRAIN_PRESETS, interruptMessage: 'stopping after the current step and saving a checkpoint' },
  );
}
