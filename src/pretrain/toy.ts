/**
 * Pretraining the embedded toy model from scratch on the shapes world (src/toy), with the
 * train-all-weights mode:
 *
 * 1. a tiny pipeline ({@link TOY_PIPELINE_CONFIG}) is initialised from the seed and written as a
 *    float32 diffusers folder, then loaded by the ordinary loaders (which check every name and shape);
 * 2. the AutoencoderKL trains on fresh world images (L1 + a small KL);
 * 3. the latent scale is measured (1 / std of posterior samples, as SD's 0.18215 was) and the
 *    posteriors of a fixed set of captioned images are cached;
 * 4. the UNet and the text encoder train jointly on the cached posteriors (a fresh sample each time)
 *    with the world's captions, phrased at random ({@link toyCaptionVariant}: the opening "a" and
 *    the size word are sometimes left out), 10% of them emptied for classifier-free guidance, an EMA kept;
 * 5. the EMA weights are written as a float16 diffusers folder with a DDIM "trailing" scheduler,
 *    staged beside the target and renamed into place;
 * 6. optionally, the folder is loaded with StableDiffusion.load and judged on seen and held-out
 *    combinations.
 *
 * Held-out combinations (TOY_HELD_OUT) are never drawn. Every random choice comes from the seed, and
 * LibTorch runs on a fixed number of threads, so the same seed and options give the same folder.
 */
import * as fs from 'fs';
import * as path from 'path';
import { AbortError, InvalidArgumentError } from '../errors';
import { Tensor } from '../core/tensor';
import { Generator } from '../core/generator';
import { getNumThreads, setNumThreads } from '../core/runtime';
import { UNet } from '../model/unet';
import { TextEncoder } from '../model/text-encoder';
import { AutoencoderKL } from '../model/vae';
import { Scheduler } from '../model/scheduler';
import { ClipTokenizer } from '../model/tokenizer';
import { StableDiffusion } from '../model/pipeline';
import { Rng } from '../train/rng';
import { toFloatCHW } from '../train/images';
import { scoreToyImage, summarizeToyScores, type ToyAccuracy } from '../toy/judge';
import { TOY_SIZES, toyCaption, toyCaptionVariant, toyCombos, toySample, type ToyCombo, type ToySample, type ToySpec } from '../toy/world';
import {
  TOY_PIPELINE_CONFIG,
  initParameters,
  modelIndexJson,
  parameterCount,
  schedulerConfigJson,
  textEncoderConfigJson,
  textEncoderParameters,
  unetConfigJson,
  unetParameters,
  vaeConfigJson,
  vaeParameters,
  type TinyPipelineConfig,
} from './architecture';
import { folderSize, replaceFolder, writePipelineFolder } from './folder';
import { DiffusionPretrainer, VaePretrainer, modelTensors } from './trainer';

export interface ToyVaePhaseOptions {
  /**
   * Optimizer steps (default 4000: at 1500 the autoencoder gave back 80% of small-shape pictures that
   * the strict judge still reads right, 1000 more raised that to 90%).
   */
  steps?: number;
  /** Images per step (default 32). */
  batchSize?: number;
  /** Peak learning rate (default 1e-3). */
  learningRate?: number;
  warmupSteps?: number;
  /** Weight of the mean per-image KL (default 1e-6). */
  klWeight?: number;
  reconLoss?: 'l1' | 'mse';
}

export interface ToyUnetPhaseOptions {
  /** Optimizer steps (default 15000; held-out shape accuracy was still rising at 9k). */
  steps?: number;
  /** Examples per step (default 32). */
  batchSize?: number;
  /** Peak learning rate (default 8e-4, cosine to 0). */
  learningRate?: number;
  /** Default 200. */
  warmupSteps?: number;
  /** Share of captions replaced by "" (default 0.1). */
  emptyCaptionRate?: number;
  /** Maximum EMA decay (default 0.999; 0: no EMA, the last weights are saved). */
  emaDecay?: number;
  /** Decoupled weight decay (default 1e-2). */
  weightDecay?: number;
}

export interface ToyEvalOptions {
  /** Images per group (seen, held-out); default 60. */
  images?: number;
  /** Denoising steps (default 25). */
  steps?: number;
  /** Guidance scale (default 4.5). */
  guidanceScale?: number;
}

export interface ToyPretrainOptions {
  /** The model folder to write (replaced when it exists). */
  outDir: string;
  /** Everything random follows from it (default 0). */
  seed?: number;
  /** LibTorch threads during the run (default 2); results depend on it. */
  threads?: number;
  /** The CLIP tokenizer files (vocab.json, merges.txt, ...); default: the repository's test/fixtures/clip-tokenizer. */
  tokenizerDir?: string;
  config?: TinyPipelineConfig;
  vae?: ToyVaePhaseOptions;
  /** Images whose posteriors are cached for the UNet phase (default 20000). */
  cacheImages?: number;
  /** Images used to measure the latent scale (default 1024). */
  scaleImages?: number;
  unet?: ToyUnetPhaseOptions;
  /** Stored weight dtype (default float16). */
  dtype?: 'float16' | 'float32';
  /** Judge the result (default: off). */
  evaluate?: ToyEvalOptions | boolean;
  /** Progress events, about every `logEvery` steps (default 50). */
  onEvent?: (event: ToyPretrainEvent) => void;
  logEvery?: number;
  signal?: AbortSignal;
}

export type ToyPretrainEvent =
  | { phase: 'init'; parameters: { vae: number; unet: number; textEncoder: number }; threads: number }
  | { phase: 'vae' | 'unet'; step: number; steps: number; loss: number; lr: number; gradNorm: number; msPerStep: number; recon?: number; kl?: number }
  | { phase: 'scale'; scalingFactor: number }
  | { phase: 'cache'; images: number; ms: number }
  | { phase: 'write'; dir: string; bytes: number }
  | { phase: 'eval'; group: 'seen' | 'held-out'; accuracy: ToyAccuracy; target: number };

/** Timings and results of a run. */
export interface ToyPretrainResult {
  outDir: string;
  bytes: number;
  scalingFactor: number;
  vae: PhaseReport;
  unet: PhaseReport;
  cacheMs: number;
  totalMs: number;
  evaluation?: ToyEvaluation;
}

export interface PhaseReport {
  steps: number;
  batchSize: number;
  /** Mean loss over the first and the last 10% of the steps. */
  firstLoss: number;
  lastLoss: number;
  /** Wall time per step, data preparation included, and the native step alone. */
  msPerStep: number;
  nativeMsPerStep: number;
}

export interface ToyEvaluation {
  seen: ToyAccuracy & { target: number };
  heldOut: ToyAccuracy & { target: number };
}

/** Seeds of the run's independent random streams. */
const STREAMS = { init: 1, vaeData: 2, vaeNoise: 3, scaleData: 4, cacheData: 5, unetOrder: 6, unetNoise: 7, captions: 8 };

function defaultTokenizerDir(): string {
  return path.resolve(__dirname, '..', '..', 'test', 'fixtures', 'clip-tokenizer');
}

function positiveInt(v: number | undefined, what: string, fallback: number): number {
  const x = v ?? fallback;
  if (!Number.isInteger(x) || x < 1) throw new InvalidArgumentError(`${what} must be a positive integer, got ${x}`);
  return x;
}

function checkAbort(signal?: AbortSignal): void {
  if (signal?.aborted) throw new AbortError('Pretraining was aborted.');
}

/** `[n, 3, S, S]` pixels in [−1, 1] for toy samples. */
function pixelTensor(samples: readonly ToySample[]): Tensor {
  const { width, height } = samples[0].image;
  const plane = 3 * width * height;
  const data = new Float32Array(samples.length * plane);
  samples.forEach((s, i) => toFloatCHW(s.image, 'numpy', data, i * plane));
  return Tensor.fromArray(data, [samples.length, 3, height, width], 'float32');
}

function derivedSeed(seed: number, stream: number): number {
  return Rng.fromSeed(seed, stream).nextUint32();
}

/** Means over the first and last tenth of a loss curve. */
function ends(losses: number[]): { first: number; last: number } {
  const k = Math.max(1, Math.floor(losses.length / 10));
  const mean = (a: number[]) => a.reduce((s, x) => s + x, 0) / a.length;
  return { first: mean(losses.slice(0, k)), last: mean(losses.slice(-k)) };
}

/** Runs the whole pretraining; see the file comment. */
export async function pretrainToy(options: ToyPretrainOptions): Promise<ToyPretrainResult> {
  const t0 = Date.now();
  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed) || seed < 0) throw new InvalidArgumentError(`seed must be a non-negative integer, got ${seed}`);
  if (typeof options.outDir !== 'string' || !options.outDir) throw new InvalidArgumentError('outDir is required');
  const outDir = path.resolve(options.outDir);
  const config = options.config ?? TOY_PIPELINE_CONFIG;
  const tokenizerDir = path.resolve(options.tokenizerDir ?? defaultTokenizerDir());
  const threads = positiveInt(options.threads, 'threads', 2);
  const logEvery = positiveInt(options.logEvery, 'logEvery', 50);
  const emit = options.onEvent ?? (() => {});
  const signal = options.signal;
  const vo = options.vae ?? {};
  const uo = options.unet ?? {};
  const vaeSteps = positiveInt(vo.steps, 'vae.steps', 4000);
  const vaeBatch = positiveInt(vo.batchSize, 'vae.batchSize', 32);
  const unetSteps = positiveInt(uo.steps, 'unet.steps', 15000);
  const unetBatch = positiveInt(uo.batchSize, 'unet.batchSize', 32);
  const cacheImages = positiveInt(options.cacheImages, 'cacheImages', 20000);
  const scaleImages = positiveInt(options.scaleImages, 'scaleImages', 1024);
  const emptyRate = uo.emptyCaptionRate ?? 0.1;
  if (!(emptyRate >= 0 && emptyRate <= 1)) throw new InvalidArgumentError('unet.emptyCaptionRate must lie in [0, 1]');

  const parent = path.dirname(outDir);
  fs.mkdirSync(parent, { recursive: true });
  const work = fs.mkdtempSync(path.join(parent, `.${path.basename(outDir)}.pretrain-`));
  const previousThreads = getNumThreads();
  setNumThreads(threads);
  const disposables: Array<{ dispose(): void }> = [];
  try {
    // ---- 1. Initial weights, through the ordinary loaders.
    const unetSpecs = unetParameters(config);
    const vaeSpecs = vaeParameters(config);
    const textSpecs = textEncoderParameters(config);
    emit({
      phase: 'init',
      parameters: { vae: parameterCount(vaeSpecs), unet: parameterCount(unetSpecs), textEncoder: parameterCount(textSpecs) },
      threads,
    });
    const initSeed = derivedSeed(seed, STREAMS.init);
    const initDir = path.join(work, 'init');
    await writePipelineFolder(
      initDir,
      {
        modelIndex: modelIndexJson(),
        unet: { config: unetConfigJson(config), tensors: initParameters(unetSpecs, initSeed, 'unet') },
        vae: { config: vaeConfigJson(config, 1), tensors: initParameters(vaeSpecs, initSeed, 'vae') },
        textEncoder: { config: textEncoderConfigJson(config), tensors: initParameters(textSpecs, initSeed, 'text_encoder') },
        scheduler: schedulerConfigJson(),
        tokenizerDir,
      },
      { dtype: 'float32' },
    );
    const [unet, textEncoder, vae, tokenizer, scheduler] = await Promise.all([
      UNet.load(path.join(initDir, 'unet'), { dtype: 'float32' }),
      TextEncoder.load(path.join(initDir, 'text_encoder'), { dtype: 'float32' }),
      AutoencoderKL.load(path.join(initDir, 'vae'), { dtype: 'float32' }),
      ClipTokenizer.fromFolder(path.join(initDir, 'tokenizer')),
      Scheduler.load(path.join(initDir, 'scheduler')),
    ]);
    disposables.push(unet, textEncoder, vae);

    // ---- 2. The autoencoder, on fresh images every step.
    const vaeLosses: number[] = [];
    let vaeNative = 0;
    const vaeStart = Date.now();
    {
      const trainer = VaePretrainer.create(vae, {
        learningRate: vo.learningRate ?? 1e-3,
        lrSchedule: 'cosine',
        warmupSteps: vo.warmupSteps ?? Math.min(100, Math.floor(vaeSteps / 10)),
        totalSteps: vaeSteps,
        klWeight: vo.klWeight ?? 1e-6,
        reconLoss: vo.reconLoss ?? 'l1',
        adamWeightDecay: 0,
        maxGradNorm: 1,
      });
      try {
        const dataSeed = derivedSeed(seed, STREAMS.vaeData);
        const gen = new Generator(derivedSeed(seed, STREAMS.vaeNoise));
        let windowStart = Date.now();
        for (let s = 0; s < vaeSteps; s++) {
          checkAbort(signal);
          const samples: ToySample[] = [];
          for (let i = 0; i < vaeBatch; i++) samples.push(toySample(dataSeed, s * vaeBatch + i));
          const pixels = pixelTensor(samples);
          const ts = Date.now();
          const r = await trainer.step({ pixels }, gen);
          vaeNative += Date.now() - ts;
          pixels.dispose();
          vaeLosses.push(r.loss);
          if ((s + 1) % logEvery === 0 || s + 1 === vaeSteps) {
            const window = (s % logEvery) + 1;
            emit({
              phase: 'vae', step: s + 1, steps: vaeSteps, loss: mean(vaeLosses.slice(-window)), lr: r.lr,
              gradNorm: r.gradNorm, msPerStep: (Date.now() - windowStart) / window, recon: r.recon, kl: r.kl,
            });
            windowStart = Date.now();
          }
        }
      } finally {
        trainer.dispose();
      }
    }
    const vaeMs = Date.now() - vaeStart;

    // ---- 3. Latent scale, then the cached posteriors of the UNet's captioned images.
    const encode = async (samples: ToySample[]) => {
      const pixels = pixelTensor(samples);
      const d = await vae.encode(pixels);
      pixels.dispose();
      d.logvar.dispose();
      return d;
    };
    let scalingFactor: number;
    {
      const scaleSeed = derivedSeed(seed, STREAMS.scaleData);
      const noiseGen = new Generator(scaleSeed);
      let sum = 0;
      let sumSq = 0;
      let count = 0;
      for (let start = 0; start < scaleImages; start += 256) {
        const n = Math.min(256, scaleImages - start);
        const samples = Array.from({ length: n }, (_, i) => toySample(scaleSeed, start + i));
        const d = await encode(samples);
        const z = vae.sample(d, { generator: noiseGen });
        for (const x of z.toArray() as Float32Array) {
          sum += x;
          sumSq += x * x;
        }
        count += z.numel;
        d.mean.dispose();
        d.std.dispose();
        z.dispose();
      }
      const m = sum / count;
      const std = Math.sqrt(Math.max(sumSq / count - m * m, 1e-12));
      // Five significant digits, as SD's 0.18215: a tidy config value, scaled latents of std ≈ 1.
      scalingFactor = Number((1 / std).toPrecision(5));
      emit({ phase: 'scale', scalingFactor });
    }

    const cacheStart = Date.now();
    const cacheSeed = derivedSeed(seed, STREAMS.cacheData);
    const latentShape = [config.vae.latentChannels, config.unet.sampleSize, config.unet.sampleSize];
    const latentSize = latentShape[0] * latentShape[1] * latentShape[2];
    const means = new Float32Array(cacheImages * latentSize);
    const stds = new Float32Array(cacheImages * latentSize);
    const specs: ToySpec[] = [];
    for (let start = 0; start < cacheImages; start += 256) {
      checkAbort(signal);
      const n = Math.min(256, cacheImages - start);
      const samples = Array.from({ length: n }, (_, i) => toySample(cacheSeed, start + i));
      for (const s of samples) specs.push(s.spec);
      const d = await encode(samples);
      means.set(d.mean.toArray() as Float32Array, start * latentSize);
      stds.set(d.std.toArray() as Float32Array, start * latentSize);
      d.mean.dispose();
      d.std.dispose();
    }
    const cacheMs = Date.now() - cacheStart;
    emit({ phase: 'cache', images: cacheImages, ms: cacheMs });

    // ---- 4. UNet + text encoder.
    const tokenCache = new Map<string, number[]>();
    const idsOf = (text: string): number[] => {
      let ids = tokenCache.get(text);
      if (!ids) {
        ids = tokenizer.encodeBatch([text], { padding: 'max_length', truncation: true })[0];
        tokenCache.set(text, ids);
      }
      return ids;
    };
    const seqLen = tokenizer.modelMaxLength;
    const unetLosses: number[] = [];
    let unetNative = 0;
    const unetStart = Date.now();
    const emaDecay = uo.emaDecay ?? 0.999;
    const trainer = DiffusionPretrainer.create(
      { unet, textEncoder, scheduler },
      {
        learningRate: uo.learningRate ?? 8e-4,
        lrSchedule: 'cosine',
        warmupSteps: uo.warmupSteps ?? Math.min(200, Math.floor(unetSteps / 10)),
        totalSteps: unetSteps,
        adamWeightDecay: uo.weightDecay ?? 1e-2,
        maxGradNorm: 1,
        emaDecay,
        scalingFactor,
      },
    );
    try {
      const orderSeed = derivedSeed(seed, STREAMS.unetOrder);
      const captionRng = Rng.fromSeed(seed, STREAMS.captions);
      const gen = new Generator(derivedSeed(seed, STREAMS.unetNoise));
      let order: number[] = [];
      let epoch = 0;
      let cursor = 0;
      let windowStart = Date.now();
      const meanBuf = new Float32Array(unetBatch * latentSize);
      const stdBuf = new Float32Array(unetBatch * latentSize);
      const idBuf = new BigInt64Array(unetBatch * seqLen);
      for (let s = 0; s < unetSteps; s++) {
        checkAbort(signal);
        for (let i = 0; i < unetBatch; i++) {
          if (cursor >= order.length) {
            order = Rng.fromSeed(orderSeed, epoch++).permutation(cacheImages);
            cursor = 0;
          }
          const k = order[cursor++];
          meanBuf.set(means.subarray(k * latentSize, (k + 1) * latentSize), i * latentSize);
          stdBuf.set(stds.subarray(k * latentSize, (k + 1) * latentSize), i * latentSize);
          // Both draws always happen, so the empty-caption choices do not depend on the phrasing.
          const empty = captionRng.nextFloat() < emptyRate;
          const phrased = toyCaptionVariant(specs[k], captionRng);
          const text = empty ? '' : phrased;
          const ids = idsOf(text);
          for (let j = 0; j < seqLen; j++) idBuf[i * seqLen + j] = BigInt(ids[j]);
        }
        const latentMean = Tensor.fromArray(meanBuf, [unetBatch, ...latentShape], 'float32');
        const latentStd = Tensor.fromArray(stdBuf, [unetBatch, ...latentShape], 'float32');
        const inputIds = Tensor.fromArray(idBuf, [unetBatch, seqLen], 'int64');
        const ts = Date.now();
        const r = await trainer.step({ inputIds, latentMean, latentStd }, gen);
        unetNative += Date.now() - ts;
        latentMean.dispose();
        latentStd.dispose();
        inputIds.dispose();
        unetLosses.push(r.loss);
        if ((s + 1) % logEvery === 0 || s + 1 === unetSteps) {
          const window = (s % logEvery) + 1;
          emit({
            phase: 'unet', step: s + 1, steps: unetSteps, loss: mean(unetLosses.slice(-window)), lr: r.lr,
            gradNorm: r.gradNorm, msPerStep: (Date.now() - windowStart) / window,
          });
          windowStart = Date.now();
        }
      }
      if (trainer.hasEma) await trainer.swapEma();
    } finally {
      trainer.dispose();
    }
    const unetMs = Date.now() - unetStart;

    // ---- 5. The folder.
    const vaeEnds = ends(vaeLosses);
    const unetEnds = ends(unetLosses);
    const staged = path.join(work, 'model');
    const report = {
      generator: 'scripts/pretrain-toy.js (src/pretrain/toy.ts)',
      seed,
      threads,
      config,
      // The options first, so that an option given as undefined does not hide the value that ran.
      vae: { ...vo, steps: vaeSteps, batchSize: vaeBatch, firstLoss: vaeEnds.first, lastLoss: vaeEnds.last },
      unet: { ...uo, steps: unetSteps, batchSize: unetBatch, emaDecay, firstLoss: unetEnds.first, lastLoss: unetEnds.last },
      cacheImages,
      scalingFactor,
      dtype: options.dtype ?? 'float16',
    };
    await writePipelineFolder(
      staged,
      {
        modelIndex: modelIndexJson(),
        unet: { config: unetConfigJson(config), tensors: modelTensors(unet, 'unet') },
        vae: { config: vaeConfigJson(config, scalingFactor), tensors: modelTensors(vae, 'vae') },
        textEncoder: { config: textEncoderConfigJson(config), tensors: modelTensors(textEncoder, 'text_encoder') },
        scheduler: schedulerConfigJson(),
        tokenizerDir,
        extraJson: { 'pretrain.json': report },
      },
      { dtype: options.dtype ?? 'float16' },
    );
    for (const d of disposables.splice(0)) d.dispose();
    replaceFolder(staged, outDir);
    const bytes = folderSize(outDir);
    emit({ phase: 'write', dir: outDir, bytes });

    const result: ToyPretrainResult = {
      outDir,
      bytes,
      scalingFactor,
      vae: { steps: vaeSteps, batchSize: vaeBatch, firstLoss: vaeEnds.first, lastLoss: vaeEnds.last, msPerStep: vaeMs / vaeSteps, nativeMsPerStep: vaeNative / vaeSteps },
      unet: { steps: unetSteps, batchSize: unetBatch, firstLoss: unetEnds.first, lastLoss: unetEnds.last, msPerStep: unetMs / unetSteps, nativeMsPerStep: unetNative / unetSteps },
      cacheMs,
      totalMs: 0,
    };

    // ---- 6. Judge.
    if (options.evaluate) {
      const eo = options.evaluate === true ? {} : options.evaluate;
      result.evaluation = await evaluateToyModel(outDir, { ...eo, seed, signal, onEvent: emit });
    }
    result.totalMs = Date.now() - t0;
    return result;
  } finally {
    for (const d of disposables) d.dispose();
    setNumThreads(previousThreads);
    fs.rmSync(work, { recursive: true, force: true });
  }
}

function mean(a: number[]): number {
  return a.reduce((s, x) => s + x, 0) / a.length;
}

/**
 * Loads a model folder with StableDiffusion.load and scores generated images with the toy judge:
 * `images` prompts cycling through the seen combinations and as many through the held-out ones
 * (sizes alternating), one seed each. `target` is the share with colour, background and shape all
 * right (the quality bar; size is reported apart).
 */
export async function evaluateToyModel(
  dir: string,
  options: ToyEvalOptions & { seed?: number; signal?: AbortSignal; onEvent?: (e: ToyPretrainEvent) => void } = {},
): Promise<ToyEvaluation> {
  const n = positiveInt(options.images, 'evaluate.images', 60);
  const sd = await StableDiffusion.load(dir);
  try {
    const group = async (which: 'seen' | 'held-out') => {
      const combos: ToyCombo[] = toyCombos(which === 'seen' ? 'seen' : 'held-out');
      // A fixed pick spread evenly over the list (which is ordered by shape, then colour).
      const prompts: string[] = [];
      for (let i = 0; i < n; i++) {
        const [shape, colour, background] = combos[Math.floor((i * combos.length) / n) % combos.length];
        prompts.push(toyCaption({ shape, colour, background, size: TOY_SIZES[i % 2] }));
      }
      const base = (options.seed ?? 0) * 1000 + (which === 'seen' ? 0 : 500);
      const out = await sd.generate({
        prompt: prompts,
        seed: prompts.map((_, i) => base + i),
        steps: options.steps ?? 25,
        guidanceScale: options.guidanceScale ?? 4.5,
        signal: options.signal,
      });
      const scores = out.images.map((img, i) => scoreToyImage(img, prompts[i]));
      const accuracy = summarizeToyScores(scores);
      const target = scores.filter((s) => s.colour && s.background && s.shape).length / scores.length;
      options.onEvent?.({ phase: 'eval', group: which, accuracy, target });
      return { ...accuracy, target };
    };
    return { seen: await group('seen'), heldOut: await group('held-out') };
  } finally {
    sd.dispose();
  }
}
