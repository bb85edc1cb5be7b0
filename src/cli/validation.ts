/**
 * Validation images during `customdiff train --validation-prompt`: the trainer's `sample` hook,
 * which generates from the models being trained (their key/value weights and the modifier tokens
 * are trained in place, so a plain generation shows the current state) and writes
 * `<outputDir>/validation/step-<N>/<i>-<seed>.png`. The settings follow diffusers'
 * train_custom_diffusion.py: DPM-Solver++ with 25 steps, `--num-validation-images` images (default 2)
 * from the run's seed.
 */
import { promises as fs } from 'fs';
import * as path from 'path';
import type { SchedulerKind } from '../model/scheduler';
import { generate, parametersText } from '../sample/generate';
import { saveImage } from '../sample/images';
import type { SampleContext } from '../train/trainer';
import type { Reporter } from './output';

export interface ValidationSettings {
  /** The run's output folder; images go to `<outputDir>/validation/step-<N>/`. */
  outputDir: string;
  reporter: Reporter;
  /** Images per validation (default 2). */
  numImages?: number;
  /** Denoising steps (default 25). */
  steps?: number;
  /** Default `dpmsolver++`. */
  scheduler?: SchedulerKind;
  /** Default 7.5. */
  guidanceScale?: number;
}

export interface ValidationResult {
  dir: string;
  files: string[];
}

/** The folder of one validation's images. */
export function validationDir(outputDir: string, step: number): string {
  return path.join(outputDir, 'validation', `step-${step}`);
}

/**
 * The trainer's `sample` hook for validation images. Image i gets seed `seed + i` at every
 * validation, so the folders show the same noise as training goes on. A folder left by an earlier
 * attempt at the same step (a resumed run) is replaced: it belongs to this run.
 */
export function validationSampler(settings: ValidationSettings): (context: SampleContext) => Promise<ValidationResult> {
  const numImages = settings.numImages ?? 2;
  let warned = false;
  return async (ctx) => {
    const dir = validationDir(settings.outputDir, ctx.step);
    const t0 = performance.now();
    const result = await generate(ctx.models, {
      prompt: ctx.prompt,
      numImages,
      seed: ctx.seed,
      steps: settings.steps ?? 25,
      scheduler: settings.scheduler ?? 'dpmsolver++',
      guidanceScale: settings.guidanceScale ?? 7.5,
      signal: ctx.signal,
    });
    if (!warned) for (const w of result.warnings) settings.reporter.warn(`--validation-prompt: ${w}`);
    warned = true;
    await fs.rm(dir, { recursive: true, force: true });
    await fs.mkdir(dir, { recursive: true });
    const files: string[] = [];
    for (const [i, img] of result.images.entries()) {
      const file = path.join(dir, `${String(i).padStart(4, '0')}-${img.parameters.seed}.png`);
      files.push(await saveImage(img, file, { overwrite: true, text: parametersText(img.parameters) }));
    }
    if (!settings.reporter.json) {
      settings.reporter.info(`validation at step ${ctx.step}: ${files.length} image${files.length > 1 ? 's' : ''} in ${dir} (${((performance.now() - t0) / 1000).toFixed(1)}s)`);
    }
    return { dir, files };
  };
}
