/**
 * Validation images during `customdiff train --validation-prompt`: the seam between the training
 * command and the generation API (src/sample). {@link validationSampler} returns the trainer's
 * `sample` hook, or undefined when this build cannot generate images; the train command then warns
 * once and trains without validation.
 */
import type { SampleContext } from '../train/trainer';
import type { Reporter } from './output';

export interface ValidationSettings {
  /** The run's output folder; images go to `<outputDir>/samples/`. */
  outputDir: string;
  /** The device the models are on. */
  device: string;
  reporter: Reporter;
  overwrite: boolean;
}

/** The trainer's `sample` hook for validation images, or undefined while no generation API is available. */
export function validationSampler(settings: ValidationSettings): ((context: SampleContext) => Promise<unknown>) | undefined {
  // To be wired to StableDiffusion.generate (src/sample) with the training models in context.models,
  // writing <outputDir>/samples/step-<N>-<i>.png and returning { files }.
  void settings;
  return undefined;
}
