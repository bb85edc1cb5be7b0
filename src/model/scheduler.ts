/**
 * Diffusion schedulers, matching diffusers 0.42 step for step: DDPM, DDIM, PNDM (PLMS), DPM-Solver++
 * (multistep), Euler and Euler-ancestral. A scheduler is built from a diffusers
 * `scheduler_config.json` with the rules of diffusers' `Scheduler.from_config`, so switching the
 * sampler of a model works as in Python:
 *
 * ```ts
 * const base = await Scheduler.load('sd15/scheduler');       // PNDMScheduler, from `_class_name`
 * const euler = Scheduler.fromConfig('euler', base.config);  // EulerDiscreteScheduler.from_config(pipe.scheduler.config)
 * euler.setTimesteps(30);
 * let x = initialLatents;                                    // unit Gaussian noise × euler.initNoiseSigma()
 * for (const t of euler.timesteps()) {
 *   const eps = await unet(euler.scaleModelInput(x, t), t, context);
 *   x = euler.step(eps, t, x);
 * }
 * ```
 *
 * @packageDocumentation
 */
import { promises as fs } from 'fs';
import * as path from 'path';
import { FileError, InvalidArgumentError } from '../errors';
import { callSync, nativeAs, type NativeGenerator, type NativeTensor } from '../native';
import { Tensor } from '../core/tensor';
import type { Generator } from '../core/generator';

/** The schedulers this library implements (diffusers class in brackets). */
export type SchedulerKind =
  | 'ddpm' // DDPMScheduler
  | 'ddim' // DDIMScheduler
  | 'pndm' // PNDMScheduler
  | 'dpmsolver++' // DPMSolverMultistepScheduler
  | 'euler' // EulerDiscreteScheduler
  | 'euler_ancestral'; // EulerAncestralDiscreteScheduler

/** The diffusers class behind each {@link SchedulerKind}. */
export const SCHEDULER_CLASSES: Readonly<Record<SchedulerKind, string>> = {
  ddpm: 'DDPMScheduler',
  ddim: 'DDIMScheduler',
  pndm: 'PNDMScheduler',
  'dpmsolver++': 'DPMSolverMultistepScheduler',
  euler: 'EulerDiscreteScheduler',
  euler_ancestral: 'EulerAncestralDiscreteScheduler',
};

/** Options of {@link Scheduler.step}. Each applies only to the schedulers named. */
export interface StepOptions {
  /**
   * The noise of a stochastic step (DDPM, DDIM with eta > 0, Euler-ancestral, Euler with churn,
   * DPM-Solver with `sde-dpmsolver++`), shaped like the model output. Without it the noise is drawn
   * from `generator` (or LibTorch's default generator).
   */
  noise?: Tensor;
  /** The generator stochastic steps draw from when no `noise` is given. */
  generator?: Generator;
  /** DDIM: η, the weight of fresh noise (0 = deterministic DDIM, the default; 1 = DDPM-like). */
  eta?: number;
  /** DDIM: re-derive ε from the clipped x0 (Glide). */
  useClippedModelOutput?: boolean;
  /** Euler: the churn of Karras et al. (0 = deterministic, the default), and its range and noise scale. */
  sChurn?: number;
  sTmin?: number;
  sTmax?: number;
  sNoise?: number;
}

/** Timesteps for {@link Scheduler.addNoise} and friends: one per batch item. */
export type TimestepsLike = Tensor | number | number[];

interface NativeStepOptions {
  noise?: NativeTensor;
  generator?: NativeGenerator;
  eta?: number;
  useClippedModelOutput?: boolean;
  sChurn?: number;
  sTmin?: number;
  sTmax?: number;
  sNoise?: number;
}

type NativeTimesteps = NativeTensor | number | number[];

/** The handle native/schedulers/bind_schedulers.cc returns. */
interface NativeScheduler {
  readonly className: string;
  readonly predictionType: string;
  readonly numTrainTimesteps: number;
  config(): string;
  setTimesteps(n: number): void;
  numInferenceSteps(): number;
  timesteps(): number[];
  timestepsTensor(): NativeTensor;
  sigmas(): NativeTensor | null;
  initNoiseSigma(): number;
  scaleModelInput(sample: NativeTensor, t: number): NativeTensor;
  step(modelOutput: NativeTensor, t: number, sample: NativeTensor, options?: NativeStepOptions): NativeTensor;
  addNoise(x0: NativeTensor, noise: NativeTensor, timesteps: NativeTimesteps): NativeTensor;
  getVelocity(x0: NativeTensor, noise: NativeTensor, timesteps: NativeTimesteps): NativeTensor;
  trainingTarget(x0: NativeTensor, noise: NativeTensor, timesteps: NativeTimesteps): NativeTensor;
  betas(): NativeTensor;
  alphasCumprod(): NativeTensor;
  stepIndex(): number | null;
  setBeginIndex(i: number): void;
}

/** What native/schedulers/bind_schedulers.cc registers. */
export interface SchedulerBinding {
  createScheduler(kind: string, config: string, overrides?: string, file?: string): NativeScheduler;
  schedulerTestOps: {
    /** The parity fixtures' stand-in model: 0.3·x + (0.01·t/1000)·c. */
    fakeModelOutput(x: NativeTensor, t: number, c: NativeTensor): NativeTensor;
    /** x·s in x's dtype. */
    scale(x: NativeTensor, s: number): NativeTensor;
  };
}

function binding(): SchedulerBinding {
  return nativeAs<SchedulerBinding>();
}

function configText(config: object | string): string {
  if (typeof config === 'string') return config;
  if (config === null || typeof config !== 'object' || Array.isArray(config)) {
    throw new InvalidArgumentError('A scheduler config must be a JSON object or its text');
  }
  return JSON.stringify(config);
}

function nativeTimesteps(t: TimestepsLike): NativeTimesteps {
  return t instanceof Tensor ? t.handle : t;
}

/**
 * A diffusion scheduler: the timestep schedule of sampling and its update rule, and the forward
 * (noising) process used for training. Stateful: multistep schedulers (PNDM, DPM-Solver) keep
 * their history and the sigma-based ones their position; {@link Scheduler.setTimesteps} resets it.
 * Tensors may live on any device; the math runs in their dtype as in diffusers.
 */
export class Scheduler {
  /** @internal */
  readonly handle: NativeScheduler;
  /** The scheduler's kind. */
  readonly kind: SchedulerKind;

  private constructor(handle: NativeScheduler) {
    this.handle = handle;
    const kind = (Object.keys(SCHEDULER_CLASSES) as SchedulerKind[]).find((k) => SCHEDULER_CLASSES[k] === handle.className);
    this.kind = kind ?? 'ddpm';
  }

  /**
   * Builds a scheduler of `kind` from a diffusers scheduler config, as diffusers'
   * `Class.from_config(config, **overrides)`: keys absent from the config (or listed in its
   * `_use_default_values`) take this class's default, e.g. `timestep_spacing` is "leading" for
   * DDPM/DDIM/PNDM and "linspace" for Euler and DPM-Solver; keys of other diffusers schedulers are
   * carried along but ignored. Unknown keys and unsupported option values throw a `ModelError`
   * (code `MODEL_CONFIG`) rather than silently computing something else.
   *
   * @param config the parsed `scheduler_config.json`, its text, or another scheduler's {@link Scheduler.config}.
   * @param overrides options that replace the config's (each must be an option of this class),
   *   e.g. `{ use_karras_sigmas: true }`.
   */
  static fromConfig(kind: SchedulerKind, config: object | string, overrides?: Record<string, unknown>, file?: string): Scheduler {
    if (!(kind in SCHEDULER_CLASSES)) {
      throw new InvalidArgumentError(`Unknown scheduler kind "${String(kind)}" (choose ${Object.keys(SCHEDULER_CLASSES).join(', ')})`);
    }
    return Scheduler.create(kind, configText(config), overrides, file);
  }

  /**
   * Loads `scheduler_config.json` from a folder (a model's `scheduler/` folder, the model folder
   * itself, or the file's path) and builds the class its `_class_name` names.
   */
  static async load(folder: string, overrides?: Record<string, unknown>): Promise<Scheduler> {
    const candidates = folder.endsWith('.json')
      ? [folder]
      : [path.join(folder, 'scheduler_config.json'), path.join(folder, 'scheduler', 'scheduler_config.json')];
    let text: string | undefined;
    let file = candidates[0];
    for (const c of candidates) {
      try {
        text = await fs.readFile(c, 'utf8');
        file = c;
        break;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
          throw new FileError(`Cannot read ${c}: ${(e as Error).message}`, c, { cause: e });
        }
      }
    }
    if (text === undefined) throw new FileError(`No scheduler_config.json in ${folder}`, file);
    return Scheduler.create('auto', text, overrides, file);
  }

  private static create(kind: string, text: string, overrides: Record<string, unknown> | undefined, file?: string): Scheduler {
    const o = overrides === undefined ? undefined : JSON.stringify(overrides);
    return new Scheduler(callSync(() => binding().createScheduler(kind, text, o, file)));
  }

  /** The diffusers class this scheduler matches, e.g. `"DDIMScheduler"`. */
  get className(): string {
    return this.handle.className;
  }

  /** `"epsilon"`, `"v_prediction"` or `"sample"`: what the model predicts. */
  get predictionType(): string {
    return this.handle.predictionType;
  }

  get numTrainTimesteps(): number {
    return this.handle.numTrainTimesteps;
  }

  /**
   * The effective config, as diffusers holds it after `from_config`: every option of this class
   * (defaults filled in), the options kept for other classes, `_class_name` and
   * `_use_default_values`. Pass it to {@link Scheduler.fromConfig} to switch schedulers.
   */
  get config(): Record<string, unknown> {
    return JSON.parse(this.configJson()) as Record<string, unknown>;
  }

  /** {@link Scheduler.config} as JSON text (infinite values are written as ±1e999). */
  configJson(): string {
    return callSync(() => this.handle.config());
  }

  /** Builds the schedule for `numInferenceSteps` steps and resets the step state. */
  setTimesteps(numInferenceSteps: number): void {
    callSync(() => this.handle.setTimesteps(numInferenceSteps));
  }

  /** The steps requested by the last {@link Scheduler.setTimesteps} (0 before). */
  get numInferenceSteps(): number {
    return callSync(() => this.handle.numInferenceSteps());
  }

  /**
   * The timesteps to loop over, in order (integers, except for Euler's float32 values). PNDM's list
   * has one more entry than the steps asked for: PLMS evaluates its second timestep twice.
   */
  timesteps(): number[] {
    return callSync(() => this.handle.timesteps());
  }

  /** The timesteps as a CPU tensor: int64, or float32 for the Euler schedulers. */
  timestepsTensor(): Tensor {
    return new Tensor(callSync(() => this.handle.timestepsTensor()));
  }

  /** The noise levels σ of the schedule (float32, one more than the timesteps), for the σ-based schedulers. */
  sigmas(): Tensor | undefined {
    const s = callSync(() => this.handle.sigmas());
    return s ? new Tensor(s) : undefined;
  }

  /** The standard deviation of the initial noise: multiply unit Gaussian latents by it. */
  initNoiseSigma(): number {
    return callSync(() => this.handle.initNoiseSigma());
  }

  /** The model input for timestep t (Euler divides by sqrt(σ² + 1); others return `sample`). */
  scaleModelInput(sample: Tensor, t: number): Tensor {
    return new Tensor(callSync(() => this.handle.scaleModelInput(sample.handle, t)));
  }

  /**
   * One denoising step: from `sample` at timestep `t` and the model's output for it, the sample
   * at the next timestep of the schedule. Call with the values of {@link Scheduler.timesteps}, in
   * order.
   */
  step(modelOutput: Tensor, t: number, sample: Tensor, options: StepOptions = {}): Tensor {
    const { noise, generator, ...rest } = options;
    const o: NativeStepOptions = { ...rest };
    if (noise !== undefined) o.noise = noise.handle;
    if (generator !== undefined) o.generator = generator.handle;
    return new Tensor(callSync(() => this.handle.step(modelOutput.handle, t, sample.handle, o)));
  }

  /**
   * The forward process: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise for integer timesteps (one per batch
   * item). The σ-based schedulers (Euler, DPM-Solver) use diffusers' own rule: the σ of each
   * timestep of their schedule (img2img).
   */
  addNoise(x0: Tensor, noise: Tensor, timesteps: TimestepsLike): Tensor {
    return new Tensor(callSync(() => this.handle.addNoise(x0.handle, noise.handle, nativeTimesteps(timesteps))));
  }

  /** v = √ᾱ_t·noise − √(1−ᾱ_t)·x0 (the v-prediction target). */
  getVelocity(x0: Tensor, noise: Tensor, timesteps: TimestepsLike): Tensor {
    return new Tensor(callSync(() => this.handle.getVelocity(x0.handle, noise.handle, nativeTimesteps(timesteps))));
  }

  /** The training target for the prediction type: `noise` (epsilon), v (v_prediction) or `x0` (sample). */
  trainingTarget(x0: Tensor, noise: Tensor, timesteps: TimestepsLike): Tensor {
    return new Tensor(callSync(() => this.handle.trainingTarget(x0.handle, noise.handle, nativeTimesteps(timesteps))));
  }

  /** β_t, float32 [numTrainTimesteps]. */
  betas(): Tensor {
    return new Tensor(callSync(() => this.handle.betas()));
  }

  /** ᾱ_t = ∏(1 − β), float32 [numTrainTimesteps], exactly as diffusers computes it. */
  alphasCumprod(): Tensor {
    return new Tensor(callSync(() => this.handle.alphasCumprod()));
  }

  /** The schedule position of the next step (Euler, DPM-Solver), or undefined before the first. */
  stepIndex(): number | undefined {
    return callSync(() => this.handle.stepIndex()) ?? undefined;
  }

  /** Starts the next step at position `i` of the schedule (img2img), as diffusers' set_begin_index. */
  setBeginIndex(i: number): void {
    callSync(() => this.handle.setBeginIndex(i));
  }
}

/**
 * The parity fixtures' stand-in for a UNet, 0.3·x + (0.01·t/1000)·c (test/parity/README.md).
 * @internal
 */
export function fakeModelOutput(x: Tensor, t: number, c: Tensor): Tensor {
  return new Tensor(callSync(() => binding().schedulerTestOps.fakeModelOutput(x.handle, t, c.handle)));
}

/**
 * x·s in x's dtype (the parity loop's `x_T * init_noise_sigma`).
 * @internal
 */
export function scaleTensor(x: Tensor, s: number): Tensor {
  return new Tensor(callSync(() => binding().schedulerTestOps.scale(x.handle, s)));
}
