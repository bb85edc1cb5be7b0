/**
 * Loading a whole Stable Diffusion folder (diffusers layout) as it is: model_index.json names the
 * components, each subfolder holds a config and its weights.
 */
import * as path from 'path';
import { DeltaMismatchError, ModelError } from '../errors';
import type { Delta } from '../delta/file';
import { computeBaseFingerprint } from '../train/delta-writer';
import { generate, generateBatch, type GenerateBatchOptions, type GenerateOptions, type GenerationResult } from '../sample/generate';
import { JobQueue } from '../sample/queue';
import type { DeviceName, Dtype } from '../native';
import { readModelIndex, type ModelIndex } from './files';
import { Scheduler, SCHEDULER_CLASSES } from './scheduler';
import { TextEncoder } from './text-encoder';
import { ClipTokenizer } from './tokenizer';
import { UNet } from './unet';
import { AutoencoderKL } from './vae';

/** Options of {@link StableDiffusion.load}. */
export interface StableDiffusionLoadOptions {
  /** Floating-point dtype of the weights (default float32). float16 files load without a copy. */
  dtype?: Dtype;
  /** Device of the weights (default `cpu`). */
  device?: DeviceName;
  /** A weights variant such as `fp16` (`*.fp16.safetensors`). */
  variant?: string;
  /** How many generation calls may wait while one runs (default 16); more reject with QueueFullError. */
  queueLimit?: number;
}

/** The component classes this library implements, by model_index.json entry. */
const SUPPORTED: Record<string, string[]> = {
  unet: ['UNet2DConditionModel'],
  text_encoder: ['CLIPTextModel'],
  vae: ['AutoencoderKL'],
  tokenizer: ['CLIPTokenizer', 'CLIPTokenizerFast'],
  scheduler: Object.values(SCHEDULER_CLASSES),
};
/** Components a pipeline may list that generation and training do not need. */
const OPTIONAL = new Set(['safety_checker', 'feature_extractor', 'image_encoder']);

/** The loaded components of a Stable Diffusion pipeline folder. */
export class StableDiffusion {
  private readonly queue = new JobQueue();
  private fingerprint: Promise<string> | undefined;

  private constructor(
    readonly folder: string,
    readonly modelIndex: ModelIndex,
    readonly unet: UNet,
    readonly textEncoder: TextEncoder,
    readonly vae: AutoencoderKL,
    readonly tokenizer: ClipTokenizer,
    readonly scheduler: Scheduler,
  ) {}

  /**
   * Loads every component of a diffusers-format folder (e.g. stable-diffusion-v1-5), in parallel.
   *
   * @throws ModelError `MODEL_CONFIG` when model_index.json names a component class this library does
   *   not implement (each is named), and every error of the components' own loaders.
   * @throws FileError when model_index.json or a component is missing.
   */
  static async load(folder: string, options: StableDiffusionLoadOptions = {}): Promise<StableDiffusion> {
    const dir = path.resolve(folder);
    const index = readModelIndex(dir);
    const problems: string[] = [];
    for (const [name, classes] of Object.entries(SUPPORTED)) {
      const spec = index.components[name];
      if (!spec) problems.push(`"${name}" is missing`);
      else if (!classes.includes(spec[1])) problems.push(`"${name}" is a ${spec[1]} (supported: ${classes.join(', ')})`);
    }
    for (const [name, spec] of Object.entries(index.components)) {
      if (spec && !(name in SUPPORTED) && !OPTIONAL.has(name)) problems.push(`"${name}" (${spec[1]}) is not supported`);
    }
    if (problems.length) {
      const file = path.join(dir, 'model_index.json');
      throw new ModelError(`${file} describes a pipeline this library cannot load: ${problems.join('; ')}.`, 'MODEL_CONFIG', file);
    }
    const opts = { dtype: options.dtype, device: options.device, variant: options.variant };
    const [unet, textEncoder, vae, tokenizer, scheduler] = await Promise.all([
      UNet.load(path.join(dir, 'unet'), opts),
      TextEncoder.load(path.join(dir, 'text_encoder'), opts),
      AutoencoderKL.load(path.join(dir, 'vae'), opts),
      ClipTokenizer.fromFolder(path.join(dir, 'tokenizer')),
      Scheduler.load(path.join(dir, 'scheduler')),
    ]);
    const sd = new StableDiffusion(dir, index, unet, textEncoder, vae, tokenizer, scheduler);
    if (options.queueLimit !== undefined) sd.queue.setLimit(options.queueLimit);
    return sd;
  }

  /**
   * Generates images (text to image, as diffusers' StableDiffusionPipeline), optionally with
   * Custom Diffusion concepts (`deltas`) for this call only: the base weights are never modified, so
   * calls with different concepts, or none, never affect each other. Calls run one at a time, in
   * order; at most `queueLimit` wait.
   *
   * @throws InvalidArgumentError for bad options (sizes not multiples of 8, zero steps, unknown
   *   scheduler, non-finite guidance, …); DeltaMismatchError for a delta of another base model or
   *   shape; QueueFullError; AbortError when `signal` fires (waiting or running).
   */
  generate(options: GenerateOptions): Promise<GenerationResult> {
    return this.queue.run(async () => {
      await this.checkDeltas(options?.deltas ?? []);
      return generate(this, options);
    }, options?.signal);
  }

  /**
   * Several requests (each with its own prompts, seeds and concepts) in one denoising loop: rows
   * with different concepts share each UNet pass, and every image equals the one a separate
   * {@link generate} call with the same seed makes (up to float rounding of the batched matrix
   * products).
   */
  generateBatch(options: GenerateBatchOptions): Promise<GenerationResult> {
    return this.queue.run(async () => {
      for (const r of options?.requests ?? []) await this.checkDeltas(r?.deltas ?? []);
      return generateBatch(this, options);
    }, options?.signal);
  }

  /** Calls waiting for the model (not counting the running one). */
  get pendingRequests(): number {
    return this.queue.pending;
  }

  /**
   * The fingerprint of the base weights deltas record (see src/train/delta-writer.ts), computed once:
   * generation never modifies the weights it covers.
   */
  baseFingerprint(): Promise<string> {
    this.fingerprint ??= (async () => {
      const kv = this.unet.allParameters((n) => /attn2\.to_[kv]\.weight$/.test(n));
      return computeBaseFingerprint(kv, [this.textEncoder.baseVocabSize, this.textEncoder.hiddenSize]);
    })();
    return this.fingerprint;
  }

  private async checkDeltas(deltas: unknown[]): Promise<void> {
    for (const d of deltas as Array<Partial<Delta> & { force?: boolean }>) {
      if (!d || typeof d !== 'object' || !d.baseModelFingerprint) continue;
      if ((await this.baseFingerprint()) !== d.baseModelFingerprint) {
        throw new DeltaMismatchError(
          `The delta ${d.metadata?.name ?? (d.tokens ?? []).map((t) => t.token).join(', ')} was trained on another base model ` +
            `(fingerprints differ); load the base model it was trained on, or clear delta.baseModelFingerprint to use it anyway`,
        );
      }
    }
  }

  /** Frees the native models. */
  dispose(): void {
    this.unet.dispose();
    this.textEncoder.dispose();
    this.vae.dispose();
  }
}
