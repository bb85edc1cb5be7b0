/**
 * What the image-generating commands (`sample`, `class-images`, and `train` for its class images
 * and validation images) share: option parsers for sizes and schedulers, loading a pipeline on the
 * chosen device with a sensible dtype, and turning generation progress into a progress display.
 */
import { InvalidArgumentError as CommanderArgumentError, Option, type Command } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { SCHEDULER_CLASSES, type SchedulerKind } from '../model/scheduler';
import { StableDiffusion } from '../model/pipeline';
import type { Dtype } from '../native';
import { DEFAULT_MIN_IMAGE_SIZE } from '../train/images';
import { intArg, numberArg, usageError } from './options';

/** The `--scheduler` names (the library's scheduler kinds). */
export const SCHEDULER_CHOICES = Object.keys(SCHEDULER_CLASSES) as SchedulerKind[];

/** An image side in pixels: a multiple of 8 from 8 to 8192. */
export function sizeArg(value: string): number {
  const v = intArg(8, 8192)(value);
  if (v % 8 !== 0) throw new CommanderArgumentError('expected a multiple of 8 (e.g. 512).');
  return v;
}

export interface SamplingOptions {
  scheduler?: SchedulerKind;
  steps?: number;
  guidance?: number;
  eta?: number;
  seed?: number;
  width?: number;
  height?: number;
  batchSize?: number;
  negativePrompt?: string;
  variant?: string;
}

/** Adds the sampling options shared by `sample` and `class-images` (help texts name each command's defaults). */
export function addSamplingOptions(cmd: Command, defaults: { steps: number; guidance: number; batchSize: number; seed: string }): Command {
  cmd.option('--negative-prompt <text>', 'what the images should not show (default none)');
  cmd.addOption(new Option('--scheduler <name>', "the sampler (default: the model's own, from scheduler/scheduler_config.json)").choices(SCHEDULER_CHOICES));
  cmd.option('--steps <n>', `denoising steps (default ${defaults.steps})`, intArg(1, 10000));
  cmd.option('--guidance <scale>', `classifier-free guidance scale (default ${defaults.guidance}; 1 or less turns guidance off)`, numberArg({ min: 0 }));
  cmd.option('--eta <x>', "DDIM's η: 0 deterministic (default), 1 as DDPM", numberArg({ min: 0 }));
  cmd.option('--seed <n>', `${defaults.seed}`, intArg(0, Number.MAX_SAFE_INTEGER));
  cmd.option('--width <px>', "image width, a multiple of 8 (default: the model's, e.g. 512 for SD 1.x)", sizeArg);
  cmd.option('--height <px>', "image height, a multiple of 8 (default: the model's)", sizeArg);
  cmd.option('--batch-size <n>', `images per denoising loop (default ${defaults.batchSize}; larger is faster on a GPU)`, intArg(1, 1024));
  cmd.option('--variant <name>', 'load this weights variant of the model, e.g. fp16');
  return cmd;
}

/** Checks that `--model` is a diffusers pipeline folder (a usage error that says what is wanted). */
export function checkModelFolder(model: string | undefined, command: string): string {
  if (!model) throw usageError(`${command} needs --model: the base model, a diffusers folder (e.g. -m models/stable-diffusion-v1-5)`);
  const dir = path.resolve(model);
  if (!fs.existsSync(path.join(dir, 'model_index.json'))) {
    throw usageError(`--model ${model} is not a diffusers model folder (no model_index.json); give the folder that holds unet/, text_encoder/, vae/, tokenizer/, scheduler/`);
  }
  return dir;
}

/** The dtype to generate in: `--dtype`, else float16 on CUDA (as diffusers' scripts) and float32 on the CPU. */
export function generationDtype(device: string, requested: string | undefined): Dtype {
  if (requested !== undefined) return requested as Dtype;
  return device.startsWith('cuda') ? 'float16' : 'float32';
}

/** Loads a pipeline folder for generation. */
export function loadPipeline(dir: string, device: string, dtype: Dtype, variant?: string): Promise<StableDiffusion> {
  return StableDiffusion.load(dir, { device, dtype, variant });
}

/** `seed 7` or `seeds 7–10`, for messages. */
export function seedRange(first: number, count: number): string {
  return count === 1 ? `seed ${first}` : `seeds ${first}–${first + count - 1}`;
}

/**
 * The size of generated class images: as asked, else the model's default size (diffusers'
 * pipeline default, 512 for SD 1.x), but never smaller than training accepts (64 pixels).
 */
export function classImageSize(sd: StableDiffusion, width?: number, height?: number): { width: number; height: number } {
  const factor = sd.vae.spatialFactor;
  const s = sd.unet.config.sampleSize;
  const [h, w] = s.length ? [s[0] * factor, s[s.length - 1] * factor] : [512, 512];
  const atLeast = (v: number) => Math.max(v, Math.ceil(DEFAULT_MIN_IMAGE_SIZE / 8) * 8);
  return { width: width ?? atLeast(w), height: height ?? atLeast(h) };
}
