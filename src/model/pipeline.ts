/**
 * Loading a whole Stable Diffusion folder (diffusers layout) as it is: model_index.json names the
 * components, each subfolder holds a config and its weights.
 */
import * as path from 'path';
import { ModelError } from '../errors';
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
    return new StableDiffusion(dir, index, unet, textEncoder, vae, tokenizer, scheduler);
  }

  /** Frees the native models. */
  dispose(): void {
    this.unet.dispose();
    this.textEncoder.dispose();
    this.vae.dispose();
  }
}
