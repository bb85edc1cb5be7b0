/**
 * Text-to-image generation as diffusers' StableDiffusionPipeline does it, with Custom Diffusion
 * concepts chosen per request:
 *
 * 1. prompts are tokenised (77 tokens, longer ones truncated with a warning) and encoded; a
 *    request's concept token rows are in the text encoder only while its own prompts are encoded;
 * 2. every cross-attention's keys and values are computed once for the whole batch
 *    ({@link UNet.prepareContext}), each row with its own concept's K/V weights, so requests for
 *    different concepts share one UNet pass and the base weights are never modified;
 * 3. the denoising loop runs natively on a worker thread (classifier-free guidance, the chosen
 *    scheduler, per-image generators so image k reproduces on its own from its seed);
 * 4. the VAE decodes one image at a time (slicing), optionally in tiles.
 */
import { randomInt } from 'crypto';
import { AbortError, InvalidArgumentError } from '../errors';
import { callCancellable, callSync, modelHandle, type NativeProgress } from '../native';
import { Generator } from '../core/generator';
import { Tensor } from '../core/tensor';
import type { Delta } from '../delta/file';
import { installTokenRows } from '../delta/apply';
import { deltaBinding } from '../delta/native-delta';
import { SCHEDULER_CLASSES, type SchedulerKind } from '../model/scheduler';
import type { UNet, CrossAttentionContext } from '../model/unet';
import type { TextEncoder } from '../model/text-encoder';
import type { AutoencoderKL } from '../model/vae';
import type { ClipTokenizer } from '../model/tokenizer';
import type { Scheduler } from '../model/scheduler';
import type { RgbImage } from '../train/images';
import { pipelineBinding } from './native-pipeline';

/** The models generation runs on (a loaded {@link StableDiffusion} has them all). */
export interface GenerationModels {
  unet: UNet;
  textEncoder: TextEncoder;
  vae: AutoencoderKL;
  tokenizer: ClipTokenizer;
  /** The pipeline's own scheduler: its config is the base of whichever scheduler a call picks. */
  scheduler: Scheduler;
}

/** One request of a batch: what varies between the users a batch serves. */
export interface GenerationRequest {
  /** One prompt, or several (each gets `numImages` images). */
  prompt: string | string[];
  /** One negative prompt for all, or one per prompt (default ""). */
  negativePrompt?: string | string[];
  /** Images per prompt (default 1). */
  numImages?: number;
  /**
   * Seeds: a number gives image k the seed `seed + k`; an array gives one seed per image. Default:
   * random seeds (reported on each image, so any image can be made again).
   */
  seed?: number | number[];
  /** Concepts for this request: deltas applied for its images only. Their tokens must be distinct. */
  deltas?: Delta[];
}

/** Settings shared by a whole batch (one denoising loop). */
export interface GenerationSettings {
  /** Classifier-free guidance scale (default 7.5; 1 or less turns guidance off). */
  guidanceScale?: number;
  /** Denoising steps (default 50). */
  steps?: number;
  /** Scheduler (default: the model's own, from scheduler_config.json). */
  scheduler?: SchedulerKind;
  /** DDIM's η (default 0). */
  eta?: number;
  /** Image size in pixels (default: the UNet's sample_size × the VAE's factor); multiples of 8. */
  width?: number;
  height?: number;
  /** Initial noise `[N, C, h, w]` instead of drawing it from the seeds (step noise still comes from the seeds). */
  latents?: Tensor;
  /** Decode in tiles, for images larger than the VAE's sample size (default false). */
  vaeTiling?: boolean;
  /** Send a low-resolution RGB preview with every this many step events (default 0: none). */
  previewEvery?: number;
  /** Also return the final latents and the decoded float images (for tests and further processing). */
  returnTensors?: boolean;
  signal?: AbortSignal;
  onProgress?: (event: GenerationProgress) => void;
}

/** Options of {@link generate}: one request plus the shared settings. */
export type GenerateOptions = GenerationRequest & GenerationSettings;

/** Options of {@link generateBatch}. */
export interface GenerateBatchOptions extends GenerationSettings {
  requests: GenerationRequest[];
}

/** Progress of a generation. */
export type GenerationProgress =
  | { phase: 'encode'; elapsedMs: number }
  | {
      phase: 'denoise';
      step: number;
      steps: number;
      timestep: number;
      elapsedMs: number;
      /** A low-resolution RGB approximation of each image, on preview steps. */
      previews?: RgbImage[];
    }
  | { phase: 'decode'; images: number; elapsedMs: number };

/** What produced an image: enough to make it again. */
export interface GenerationParameters {
  prompt: string;
  negativePrompt: string;
  seed: number | null;
  steps: number;
  guidanceScale: number;
  scheduler: string;
  eta: number;
  width: number;
  height: number;
  /** Fingerprints (or file names) of the deltas applied. */
  deltas: string[];
}

/** A generated image (8-bit RGB) and its parameters. */
export interface GeneratedImage extends RgbImage {
  readonly data: Buffer;
  /** Index of the request it answers (0 for {@link generate}). */
  readonly request: number;
  readonly parameters: GenerationParameters;
}

export interface GenerationResult {
  images: GeneratedImage[];
  /** e.g. prompts cut at 77 tokens. */
  warnings: string[];
  /** With `returnTensors`: final latents `[N, C, h, w]` and decoded images in [0, 1] `[N, 3, H, W]`. */
  tensors?: { latents: Tensor; images: Tensor };
}

const MAX_SEED = 2 ** 53;

function positiveInt(v: unknown, what: string, fallback: number): number {
  if (v === undefined) return fallback;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) throw new InvalidArgumentError(`${what} must be a positive integer (got ${String(v)})`);
  return v;
}

function finite(v: unknown, what: string, fallback: number): number {
  if (v === undefined) return fallback;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new InvalidArgumentError(`${what} must be a finite number (got ${String(v)})`);
  return v;
}

function stringList(v: unknown, what: string): string[] {
  const list = Array.isArray(v) ? v : [v];
  if (list.length === 0 || list.some((s) => typeof s !== 'string')) throw new InvalidArgumentError(`${what} must be a string or a non-empty array of strings`);
  return list as string[];
}

/** The expanded rows of one request. */
interface Rows {
  prompts: string[];
  negatives: string[];
  seeds: number[];
}

function expandRequest(r: GenerationRequest, index: number): Rows {
  if (r === null || typeof r !== 'object') throw new InvalidArgumentError(`request ${index} must be an object`);
  const prompts = stringList(r.prompt, 'prompt');
  const negatives = r.negativePrompt === undefined ? prompts.map(() => '') : stringList(r.negativePrompt, 'negativePrompt');
  if (negatives.length !== 1 && negatives.length !== prompts.length) {
    throw new InvalidArgumentError(`negativePrompt must be one string or one per prompt (${prompts.length}), got ${negatives.length}`);
  }
  const n = positiveInt(r.numImages, 'numImages', 1);
  const rows: Rows = { prompts: [], negatives: [], seeds: [] };
  // As diffusers' num_images_per_prompt: the images of prompt 0 first, then those of prompt 1, …
  prompts.forEach((p, i) => {
    for (let k = 0; k < n; k++) {
      rows.prompts.push(p);
      rows.negatives.push(negatives.length === 1 ? negatives[0] : negatives[i]);
    }
  });
  const count = rows.prompts.length;
  if (Array.isArray(r.seed)) {
    if (r.seed.length !== count) throw new InvalidArgumentError(`seed lists ${r.seed.length} seeds for ${count} images`);
    rows.seeds = r.seed.slice();
  } else if (r.seed === undefined) {
    rows.seeds = Array.from({ length: count }, () => randomInt(0, 2 ** 32));
  } else {
    rows.seeds = Array.from({ length: count }, (_, k) => (r.seed as number) + k);
  }
  for (const s of rows.seeds) {
    if (typeof s !== 'number' || !Number.isInteger(s) || s < 0 || s >= MAX_SEED) {
      throw new InvalidArgumentError(`seeds must be integers from 0 to 2^53 (got ${String(s)})`);
    }
  }
  for (const d of r.deltas ?? []) {
    if (!d || typeof d !== 'object' || !('weights' in d) || !('factors' in d)) throw new InvalidArgumentError('deltas must be Delta objects (see readDelta)');
  }
  return rows;
}

function deltaLabel(d: Delta): string {
  return d.metadata.name ?? d.baseModelFingerprint ?? d.tokens.map((t) => t.token).join('+');
}

/**
 * The K/V weights a delta gives each layer, for {@link UNet.prepareContext}: the delta's own for full
 * and merged deltas, W0 + u·v for compressed ones (computed once per delta object and kept).
 */
const kvWeightCache = new WeakMap<Delta, WeakMap<UNet, Record<string, Tensor>>>();

function kvWeights(delta: Delta, unet: UNet): Record<string, Tensor> {
  let perUnet = kvWeightCache.get(delta);
  const hit = perUnet?.get(unet);
  if (hit) return hit;
  const out: Record<string, Tensor> = { ...delta.weights };
  const factors = Object.entries(delta.factors);
  if (factors.length > 0) {
    const params = unet.allParameters();
    const b = deltaBinding();
    for (const [name, f] of factors) {
      const base = params[name];
      if (!base) throw new InvalidArgumentError(`The delta's layer ${name} does not exist in this UNet`);
      const w = new Tensor(callSync(() => b.clone(base.handle)));
      callSync(() => b.addProduct(w.handle, f.u.handle, f.v.handle));
      out[name] = w;
    }
  }
  if (!perUnet) {
    perUnet = new WeakMap();
    kvWeightCache.set(delta, perUnet);
  }
  perUnet.set(unet, out);
  return out;
}

function cat(tensors: Tensor[], dim = 0): Tensor {
  if (tensors.length === 1) return tensors[0];
  return new Tensor(callSync(() => pipelineBinding().cat(tensors.map((t) => t.handle), dim)));
}

function schedulerKind(models: GenerationModels, kind: SchedulerKind | undefined): { kind: string; name: string } {
  if (kind === undefined) return { kind: 'auto', name: models.scheduler.className };
  if (!(kind in SCHEDULER_CLASSES)) {
    throw new InvalidArgumentError(`Unknown scheduler ${JSON.stringify(kind)} (known: ${Object.keys(SCHEDULER_CLASSES).join(', ')})`);
  }
  return { kind, name: SCHEDULER_CLASSES[kind] };
}

/** Tokenises to 77 ids, warning about truncated prompts as diffusers does. */
function tokenize(tokenizer: ClipTokenizer, texts: string[], warnings: string[]): number[][] {
  const ids = tokenizer.encodeBatch(texts, { padding: 'max_length', truncation: true });
  const full = tokenizer.encodeBatch(texts);
  full.forEach((f, i) => {
    if (f.length > ids[i].length) {
      const removed = tokenizer.decode(f.slice(ids[i].length - 1, -1), { skipSpecialTokens: true });
      const warning = `The prompt ${JSON.stringify(texts[i])} is longer than ${ids[i].length} tokens; this part was cut: ${JSON.stringify(removed)}`;
      if (!warnings.includes(warning)) warnings.push(warning);
    }
  });
  return ids;
}

async function encodeTexts(models: GenerationModels, texts: string[], deltas: Delta[], warnings: string[]): Promise<Tensor> {
  const installed = installTokenRows(deltas, models.textEncoder, models.tokenizer);
  try {
    const ids = tokenize(models.tokenizer, texts, warnings);
    const input = Tensor.fromArray(BigInt64Array.from(ids.flat().map(BigInt)), [ids.length, ids[0].length]);
    return await models.textEncoder.encode(input);
  } finally {
    installed.restore();
  }
}

/** Generates images for one request (see {@link generateBatch} for several at once). */
export async function generate(models: GenerationModels, options: GenerateOptions): Promise<GenerationResult> {
  if (options === null || typeof options !== 'object') throw new InvalidArgumentError('generate needs an options object');
  const { prompt, negativePrompt, numImages, seed, deltas, ...settings } = options;
  return generateBatch(models, { ...settings, requests: [{ prompt, negativePrompt, numImages, seed, deltas }] });
}

/**
 * Generates the images of several requests in one denoising loop: each request may have its own
 * prompts, seeds and concepts (deltas); rows with different concepts share every UNet pass.
 */
export async function generateBatch(models: GenerationModels, options: GenerateBatchOptions): Promise<GenerationResult> {
  const started = Date.now();
  const elapsed = () => Date.now() - started;
  const { unet, vae } = models;
  if (!Array.isArray(options.requests) || options.requests.length === 0) throw new InvalidArgumentError('requests must be a non-empty array');
  const rowsPerRequest = options.requests.map(expandRequest);
  const steps = positiveInt(options.steps, 'steps', 50);
  if (steps > 10000) throw new InvalidArgumentError('steps must be at most 10000');
  const guidanceScale = finite(options.guidanceScale, 'guidanceScale', 7.5);
  const eta = finite(options.eta, 'eta', 0);
  if (eta < 0) throw new InvalidArgumentError('eta must be ≥ 0');
  const previewEvery = options.previewEvery ?? 0;
  if (!Number.isInteger(previewEvery) || previewEvery < 0) throw new InvalidArgumentError('previewEvery must be a non-negative integer');
  // Default size as diffusers: the UNet's sample_size ([s] or [h, w]) in pixels.
  const factor = vae.spatialFactor;
  const [sh, sw] = unet.config.sampleSize.length ? [unet.config.sampleSize[0], unet.config.sampleSize.at(-1)!] : [64, 64];
  const width = positiveInt(options.width, 'width', sw * factor);
  const height = positiveInt(options.height, 'height', sh * factor);
  for (const [v, what] of [
    [width, 'width'],
    [height, 'height'],
  ] as const) {
    if (v % 8 !== 0 || v % factor !== 0) throw new InvalidArgumentError(`${what} must be a multiple of 8 (got ${v})`);
  }
  const sched = schedulerKind(models, options.scheduler);
  const guided = guidanceScale > 1;
  const total = rowsPerRequest.reduce((n, r) => n + r.prompts.length, 0);
  const latentShape = [1, unet.config.inChannels, height / factor, width / factor];
  if (options.latents !== undefined) {
    if (!(options.latents instanceof Tensor)) throw new InvalidArgumentError('latents must be a Tensor');
    const want = [total, ...latentShape.slice(1)];
    if (options.latents.shape.join(',') !== want.join(',')) {
      throw new InvalidArgumentError(`latents must be [${want.join(', ')}] for ${total} images of ${width}×${height}, got [${options.latents.shape.join(', ')}]`);
    }
  }
  if (options.signal?.aborted) throw new AbortError();

  // 1. Text: one encoding per distinct concept set, rows in request order.
  options.onProgress?.({ phase: 'encode', elapsedMs: elapsed() });
  const warnings: string[] = [];
  const positive: Tensor[] = [];
  const negative: Tensor[] = [];
  const disposables: Tensor[] = [];
  const weightSets: Record<string, Tensor>[] = [];
  const setIndex = new Map<Delta, number>();
  const assignment: number[] = [];
  try {
    for (let i = 0; i < rowsPerRequest.length; i++) {
      const rows = rowsPerRequest[i];
      const deltas = options.requests[i].deltas ?? [];
      const pos = await encodeTexts(models, rows.prompts, deltas, warnings);
      positive.push(pos);
      disposables.push(pos);
      if (guided) {
        const neg = await encodeTexts(models, rows.negatives, deltas, warnings);
        negative.push(neg);
        disposables.push(neg);
      }
      // Several deltas in one request are merged into one weight set (later deltas win a layer).
      let set = -1;
      if (deltas.length === 1) {
        const d = deltas[0];
        if (!setIndex.has(d)) {
          setIndex.set(d, weightSets.length);
          weightSets.push(kvWeights(d, unet));
        }
        set = setIndex.get(d)!;
      } else if (deltas.length > 1) {
        set = weightSets.length;
        weightSets.push(Object.assign({}, ...deltas.map((d) => kvWeights(d, unet))));
      }
      for (let k = 0; k < rows.prompts.length; k++) assignment.push(set);
    }

    // 2. Keys and values of every cross-attention, once for all steps: [negative rows; positive rows].
    const states = cat(guided ? [...negative, ...positive] : positive);
    if (states !== positive[0]) disposables.push(states);
    const context: CrossAttentionContext = await unet.prepareContext(states, {
      weightSets,
      assignment: guided ? [...assignment, ...assignment] : assignment,
    });

    // 3. Noise and the loop.
    const seeds = rowsPerRequest.flatMap((r) => r.seeds);
    const generators = seeds.map((s) => new Generator(s));
    let latents = options.latents;
    if (!latents) {
      const parts = generators.map((g) => Tensor.randn(latentShape, { generator: g }));
      latents = cat(parts);
      if (parts.length > 1) parts.forEach((p) => p.dispose());
      disposables.push(latents);
    }
    const onNative = (p: NativeProgress) => {
      if (!options.onProgress || p.kind !== 'step') return;
      const ev: GenerationProgress = {
        phase: 'denoise',
        step: p.step as number,
        steps: p.steps as number,
        timestep: p.timestep as number,
        elapsedMs: elapsed(),
      };
      if (p.data) {
        const w = p.previewWidth as number;
        const h = p.previewHeight as number;
        const n = p.previewCount as number;
        ev.previews = Array.from({ length: n }, (_, k) => ({ width: w, height: h, data: p.data!.subarray(k * w * h * 3, (k + 1) * w * h * 3) }));
      }
      options.onProgress(ev);
    };
    let final: Tensor;
    try {
      final = await callCancellable(options.signal, async (token) =>
        new Tensor(
          await pipelineBinding().denoise(
            modelHandle(unet, 'unet'),
            sched.kind,
            models.scheduler.configJson(),
            latents!.handle,
            context.handle,
            { guidanceScale, steps, eta, generators: generators.map((g) => g.handle), previewEvery },
            onNative,
            token,
          ),
        ),
      );
    } finally {
      context.dispose();
    }

    // 4. Decode one image at a time (VAE slicing).
    options.onProgress?.({ phase: 'decode', images: total, elapsedMs: elapsed() });
    const scaled = new Tensor(callSync(() => pipelineBinding().divide(final.handle, vae.scalingFactor)));
    const decoded = await vae.decode(scaled, { slice: true, tile: options.vaeTiling === true });
    scaled.dispose();
    const images01 = new Tensor(callSync(() => pipelineBinding().denormalize(decoded.handle)));
    decoded.dispose();
    const buffers = callSync(() => pipelineBinding().toUint8(images01.handle));

    const images: GeneratedImage[] = [];
    let row = 0;
    rowsPerRequest.forEach((rows, request) => {
      const labels = (options.requests[request].deltas ?? []).map(deltaLabel);
      rows.prompts.forEach((p, k) => {
        images.push({
          width,
          height,
          data: buffers[row++],
          request,
          parameters: {
            prompt: p,
            negativePrompt: rows.negatives[k],
            seed: options.latents ? null : rows.seeds[k],
            steps,
            guidanceScale,
            scheduler: sched.name,
            eta,
            width,
            height,
            deltas: labels,
          },
        });
      });
    });
    if (options.returnTensors) return { images, warnings, tensors: { latents: final, images: images01 } };
    final.dispose();
    images01.dispose();
    return { images, warnings };
  } finally {
    for (const t of disposables) if (!t.disposed) t.dispose();
  }
}

/** The PNG text chunks that record how an image was made (see {@link encodeImage}). */
export function parametersText(p: GenerationParameters): Record<string, string> {
  const summary =
    `${p.prompt}\nNegative prompt: ${p.negativePrompt}\n` +
    `Steps: ${p.steps}, Sampler: ${p.scheduler}, CFG scale: ${p.guidanceScale}, Seed: ${p.seed ?? 'given latents'}, ` +
    `Size: ${p.width}x${p.height}${p.eta ? `, Eta: ${p.eta}` : ''}${p.deltas.length ? `, Deltas: ${p.deltas.join(' ')}` : ''}`;
  return { parameters: summary, 'custom-diffusion': JSON.stringify(p) };
}
