/**
 * Train-all-weights mode (native/pretrain): optimizer steps over every parameter of a loaded
 * UNet + text encoder ({@link DiffusionPretrainer}) or AutoencoderKL ({@link VaePretrainer}), for
 * pretraining a small pipeline from scratch. The steps update the models' own weights in place, so
 * after training the loaded models hold the result and {@link modelTensors} gives what to save.
 *
 * @packageDocumentation
 */
import { callAsync, callSync, modelHandle, nativeAs, type NativeGenerator, type NativeTensor } from '../native';
import { DisposedError, InvalidArgumentError } from '../errors';
import { Tensor } from '../core/tensor';
import type { Generator } from '../core/generator';
import type { UNet } from '../model/unet';
import type { TextEncoder } from '../model/text-encoder';
import type { AutoencoderKL } from '../model/vae';
import type { Scheduler } from '../model/scheduler';

/** Optimizer settings shared by both trainers (AdamW over all parameters in one group). */
export interface PretrainOptimizerOptions {
  /** Peak learning rate (default 1e-4). */
  learningRate?: number;
  /** 'cosine' (default; diffusers' get_cosine_schedule_with_warmup, 0 at totalSteps) or 'constant', both after a linear warmup. */
  lrSchedule?: 'cosine' | 'constant';
  /** Linear warmup from 0 (default 0). */
  warmupSteps?: number;
  /** Total optimizer steps (required by the cosine schedule). */
  totalSteps?: number;
  adamBeta1?: number;
  adamBeta2?: number;
  adamEpsilon?: number;
  /** Decoupled weight decay (default 1e-2). */
  adamWeightDecay?: number;
  /** Clip the total gradient norm to this (default 1; ≤ 0 disables). */
  maxGradNorm?: number;
  /** Maximum EMA decay (diffusers EMAModel's `decay`; default 0: no EMA). */
  emaDecay?: number;
}

export interface DiffusionPretrainOptions extends PretrainOptimizerOptions {
  /** Train the text encoder too (default true). */
  trainTextEncoder?: boolean;
  /** Multiplies cached posteriors (default: the VAE's scaling_factor). */
  scalingFactor?: number;
}

export interface VaePretrainOptions extends PretrainOptimizerOptions {
  /** Reconstruction term (default 'l1'). */
  reconLoss?: 'l1' | 'mse';
  /** Weight of the mean per-image KL (default 1e-6). */
  klWeight?: number;
}

/** One diffusion batch: token ids plus latents, a cached posterior, or pixels. */
export interface DiffusionBatch {
  /** int64 `[N, 77]`. */
  inputIds: Tensor;
  /** Latents already × scaling_factor, used as they are. */
  latents?: Tensor;
  /** A cached posterior (unscaled): latents = (mean + std·ε) × scalingFactor. */
  latentMean?: Tensor;
  latentStd?: Tensor;
  /** Images `[N, 3, H, W]` in [−1, 1], encoded by the frozen VAE. */
  pixels?: Tensor;
  /** Injected randomness (tests). */
  vaeNoise?: Tensor;
  noise?: Tensor;
  timesteps?: Tensor;
}

export interface VaeBatch {
  /** Images `[N, 3, H, W]` in [−1, 1]. */
  pixels: Tensor;
  /** Injected posterior noise (tests). */
  vaeNoise?: Tensor;
}

export interface PretrainStepResult {
  loss: number;
  /** The learning rate this step used. */
  lr: number;
  /** Total gradient norm before clipping. */
  gradNorm: number;
  /** Optimizer steps done, this one included. */
  step: number;
  /** VAE steps: the reconstruction term and the mean KL (before klWeight). */
  recon?: number;
  kl?: number;
}

interface NativePretrainInfo {
  kind: 'diffusion' | 'vae';
  parameterNames: string[];
  parameterCount: number;
  hasEma: boolean;
  predictionType?: string;
  scalingFactor?: number | null;
}

/** What native/pretrain/bind_pretrain.cc registers as `pretrain`. */
interface PretrainBinding {
  pretrain: {
    createDiffusion(unet: unknown, textEncoder: unknown, vae: unknown, schedulerConfig: string, options: object): unknown;
    createVae(vae: unknown, options: object): unknown;
    step(handle: unknown, batch: Record<string, NativeTensor>, generator?: NativeGenerator): Promise<PretrainStepResult>;
    swapEma(handle: unknown): Promise<boolean>;
    weights(handle: unknown, ema: boolean): Promise<Record<string, NativeTensor>>;
    learningRateAt(handle: unknown, step: number): number;
    emaDecayAt(handle: unknown, k: number): number;
    info(handle: unknown): NativePretrainInfo;
    dispose(handle: unknown): void;
    textEncoderTensors(handle: unknown): Record<string, NativeTensor>;
    vaeTensors(handle: unknown): Record<string, NativeTensor>;
  };
}

function binding(): PretrainBinding['pretrain'] {
  return nativeAs<PretrainBinding>().pretrain;
}

function batchHandles(batch: object, what: string): Record<string, NativeTensor> {
  if (batch === null || typeof batch !== 'object') throw new InvalidArgumentError(`${what} must be an object`);
  const out: Record<string, NativeTensor> = {};
  for (const [k, v] of Object.entries(batch)) {
    if (v === undefined) continue;
    if (!(v instanceof Tensor)) throw new InvalidArgumentError(`${what}.${k} must be a Tensor`);
    out[k] = v.handle;
  }
  return out;
}

function wrap(raw: Record<string, NativeTensor>): Record<string, Tensor> {
  const out: Record<string, Tensor> = {};
  for (const [k, v] of Object.entries(raw)) out[k] = new Tensor(v);
  return out;
}

/** What the two trainers share. */
abstract class PretrainerBase {
  /** Parameter names, prefixed `unet.`, `text_encoder.` or `vae.`, in optimizer order. */
  readonly parameterNames: string[];
  readonly parameterCount: number;
  readonly hasEma: boolean;
  protected readonly handle: unknown;
  private disposed = false;

  protected constructor(handle: unknown) {
    this.handle = handle;
    const info = callSync(() => binding().info(handle));
    this.parameterNames = info.parameterNames;
    this.parameterCount = info.parameterCount;
    this.hasEma = info.hasEma;
  }

  protected live(): unknown {
    if (this.disposed) throw new DisposedError('This pretrainer was disposed; it can no longer be used.');
    return this.handle;
  }

  /** The learning rate of optimizer step `s` (0-based). */
  learningRateAt(s: number): number {
    return callSync(() => binding().learningRateAt(this.live(), s));
  }

  /** The EMA decay of update `k` (1-based; 0 for the first, which copies the weights). */
  emaDecayAt(k: number): number {
    return callSync(() => binding().emaDecayAt(this.live(), k));
  }

  /**
   * Exchanges the model's weights with the EMA weights; calling it again restores them. While the
   * EMA weights are in, steps are refused. Resolves to whether the EMA weights are in the model now.
   */
  swapEma(): Promise<boolean> {
    return callAsync(() => binding().swapEma(this.live()));
  }

  /** Copies of the trained weights (or of the EMA weights), by prefixed name. */
  async weights(options: { ema?: boolean } = {}): Promise<Record<string, Tensor>> {
    return wrap(await callAsync(() => binding().weights(this.live(), options.ema === true)));
  }

  protected async stepWith(batch: object, generator?: Generator): Promise<PretrainStepResult> {
    const handles = batchHandles(batch, 'batch');
    return callAsync(() => binding().step(this.live(), handles, generator?.handle));
  }

  /** Gives the models back to inference (requires_grad off); a running step finishes first. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    callSync(() => binding().dispose(this.handle));
  }
}

/** The UNet and the text encoder, trained jointly with the epsilon (or v) diffusion loss. */
export class DiffusionPretrainer extends PretrainerBase {
  readonly predictionType: string;

  private constructor(handle: unknown) {
    super(handle);
    this.predictionType = callSync(() => binding().info(handle)).predictionType ?? 'epsilon';
  }

  /**
   * Makes every floating-point weight of `unet` (and of `textEncoder`, unless trainTextEncoder is
   * false) trainable. The scheduler's config gives the training noise schedule (read as a
   * DDPMScheduler). `vae` is needed only for batches of pixels, or to default scalingFactor.
   */
  static create(
    models: { unet: UNet; textEncoder: TextEncoder; vae?: AutoencoderKL | null; scheduler: Scheduler },
    options: DiffusionPretrainOptions = {},
  ): DiffusionPretrainer {
    const { unet, textEncoder, vae, scheduler } = models;
    const handle = callSync(() =>
      binding().createDiffusion(
        modelHandle(unet, 'unet'),
        modelHandle(textEncoder, 'textEncoder'),
        vae ? modelHandle(vae, 'vae') : null,
        scheduler.configJson(),
        { ...options },
      ),
    );
    return new DiffusionPretrainer(handle);
  }

  /** One optimizer step on `batch`; noise and timesteps come from `generator` unless given. */
  step(batch: DiffusionBatch, generator?: Generator): Promise<PretrainStepResult> {
    return this.stepWith(batch, generator);
  }
}

/** The AutoencoderKL, trained with a reconstruction loss and a small KL term. */
export class VaePretrainer extends PretrainerBase {
  private constructor(handle: unknown) {
    super(handle);
  }

  static create(vae: AutoencoderKL, options: VaePretrainOptions = {}): VaePretrainer {
    const handle = callSync(() => binding().createVae(modelHandle(vae, 'vae'), { ...options }));
    return new VaePretrainer(handle);
  }

  /** One optimizer step on `batch`; the posterior noise comes from `generator` unless given. */
  step(batch: VaeBatch, generator?: Generator): Promise<PretrainStepResult> {
    return this.stepWith(batch, generator);
  }
}

/**
 * The model's own tensors by the names its weights file uses (no copies: they change as the model
 * trains), for writing a model folder. The UNet's are {@link UNet.allParameters}.
 */
export function modelTensors(model: UNet | TextEncoder | AutoencoderKL, kind: 'unet' | 'text_encoder' | 'vae'): Record<string, Tensor> {
  if (kind === 'unet') return (model as UNet).allParameters();
  const h = modelHandle(model, kind);
  return wrap(callSync(() => (kind === 'vae' ? binding().vaeTensors(h) : binding().textEncoderTensors(h))));
}
