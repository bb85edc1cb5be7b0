/**
 * Custom Diffusion training: {@link train} runs the whole recipe (modifier tokens, data, native
 * optimizer steps, checkpoints, the delta), and {@link TrainStep} is the native optimizer step itself.
 *
 * ```ts
 * const run = train({
 *   pretrainedModel: 'models/sd15',
 *   concepts: [{ instancePrompt: 'photo of a <new1> cat', instanceDataDir: 'data/cat',
 *                classPrompt: 'cat', classDataDir: 'real_reg/samples_cat' }],
 *   modifierTokens: ['<new1>'],
 *   outputDir: 'out/cat',
 *   maxTrainSteps: 250, checkpointingSteps: 100,
 *   signal: controller.signal,
 * });
 * run.on('step', (e) => console.log(e.step, e.loss, e.lr, e.imagesPerSecond, e.etaSeconds));
 * const result = await run.result;   // result.deltaPath: out/cat/delta.safetensors
 * ```
 *
 * Every heavy part runs off the JS thread (image decoding in sharp/libuv, the step in a native
 * worker), so the event loop stays free while training. The recipe and its choices are documented
 * in src/train/README.md ("Training").
 *
 * @packageDocumentation
 */
import { EventEmitter } from 'events';
import * as os from 'os';
import * as path from 'path';
import { AbortError, InvalidArgumentError, TrainingError } from '../errors';
import { callAsync, callSync, modelHandle, nativeAs, type DeviceName, type NativeGenerator, type NativeTensor } from '../native';
import { Generator } from '../core/generator';
import { setNumThreads, getNumThreads } from '../core/runtime';
import { Tensor } from '../core/tensor';
import { UNet } from '../model/unet';
import { TextEncoder } from '../model/text-encoder';
import { AutoencoderKL } from '../model/vae';
import { ClipTokenizer } from '../model/tokenizer';
import { Scheduler } from '../model/scheduler';
import type { AugmentOptions } from './augment';
import {
  readConceptsList,
  TrainingDataLoader,
  TrainingDataset,
  type ConceptSpec,
  type DataLoaderState,
  type TrainingBatch,
} from './dataset';
import {
  checkpointDir,
  latestCheckpoint,
  loadCheckpoint,
  pruneCheckpoints,
  saveCheckpoint,
  type CheckpointData,
  type OptimizerStateData,
} from './checkpoint';
import { computeBaseFingerprint, toJsonSafe, writeDelta, writeRunRecord, type DeltaToken } from './delta-writer';

// ---------------------------------------------------------------------------------------------
// The native step

/** Which parameters train (`freeze_model` of the original scripts). */
export type FreezeModel = 'crossattn_kv' | 'crossattn';
/** How the class (prior) examples are weighted in the loss; see src/train/README.md. */
export type LossWeighting = 'diffusers' | 'compvis';
export type MixedPrecision = 'no' | 'fp16' | 'bf16';

/** Options of the native optimizer step. */
export interface TrainStepOptions {
  /** Default `'crossattn_kv'`. */
  freezeModel?: FreezeModel;
  /** Ids of the modifier tokens: exactly the text encoder's added rows, in order. */
  tokenIds?: number[];
  /** The learning rate after the scale_lr rule (default 1e-5). */
  learningRate?: number;
  /** The token rows' learning rate as a multiple of `learningRate` (default 1: one rate for all). */
  tokenLearningRateScale?: number;
  /** Linear warmup over this many optimizer steps (default 0; the first step then has lr 0). */
  warmupSteps?: number;
  adamBeta1?: number;
  adamBeta2?: number;
  adamEpsilon?: number;
  adamWeightDecay?: number;
  /** Gradient clipping max norm (default 1.0; 0 disables). */
  maxGradNorm?: number;
  /** Micro-batches per optimizer step (default 1). */
  gradientAccumulationSteps?: number;
  /** Weight of the class-image term (default 1). */
  priorLossWeight?: number;
  /** Default `'diffusers'`. */
  lossWeighting?: LossWeighting;
  /** Autocast for the forward passes with float32 trainables (`'fp16'`: CUDA only, with loss scaling). */
  mixedPrecision?: MixedPrecision;
  /**
   * Recompute each UNet resnet and transformer in the backward pass instead of keeping its
   * activations (diffusers' `--gradient_checkpointing`): the same gradients with less memory, for
   * about one more UNet forward pass per step (default false).
   */
  gradientCheckpointing?: boolean;
  /**
   * Keep the text encoder's output of prompts that hold no trainable token (class prompts; every
   * prompt when no token trains), which never changes during training (default true). Each such
   * prompt is encoded alone, so cached and fresh values are the same bits.
   */
  cacheTextEmbeddings?: boolean;
  /**
   * Keep the VAE posterior of each class example (class images are only flipped, so they recur),
   * keyed by its exact pixels; a fresh posterior sample is still drawn every step (default true).
   */
  cacheClassLatents?: boolean;
}

/** One micro-batch: examples [0, instanceCount) are instance examples, the rest class examples. */
export interface TrainStepBatch {
  /** [N, 3, H, W] in [−1, 1] (or give `latents`). */
  pixels?: Tensor;
  /** [N, 4, h, w], already × the VAE's scaling factor (cached encodings). */
  latents?: Tensor;
  /** [N, 1, m, m]; resized (nearest) to the latent size when it differs. */
  masks: Tensor;
  /** Integer [N, 77]. */
  inputIds: Tensor;
  instanceCount: number;
  /** Injected randomness (tests): replaces the draws from the generator. */
  vaeNoise?: Tensor;
  noise?: Tensor;
  timesteps?: Tensor;
}

export interface TrainStepResult {
  /** This micro-batch's loss. */
  loss: number;
  /** The learning rate of the optimizer step this micro-batch belongs to. */
  lr: number;
  /** Total gradient norm before clipping (−1 when no optimizer step was taken). */
  gradNorm: number;
  /** Whether this call ended an accumulation cycle and updated the weights. */
  optimizerStepped: boolean;
  /** fp16: the update was skipped because of inf/NaN gradients (the loss scale was reduced). */
  skipped: boolean;
  optimizerSteps: number;
  microSteps: number;
  /** Prompt rows served from the text-embedding cache so far. */
  textCacheHits: number;
  /** Class examples served from the VAE posterior cache so far. */
  latentCacheHits: number;
  /** UNet resnets and transformers run with gradient checkpointing so far (0 without it). */
  checkpointedSegments: number;
}

interface NativeTrainerInfo {
  trainableNames: string[];
  addedRowsName: string;
  predictionType: string;
  learningRate: number;
  warmupSteps: number;
  gradientAccumulationSteps: number;
  freezeModel: FreezeModel;
}

interface NativeOptimizerState {
  names: string[];
  expAvg: NativeTensor[];
  expAvgSq: NativeTensor[];
  optimizerSteps: number;
  microSteps: number;
  scale?: NativeTensor;
  growthTracker?: NativeTensor;
}

/** What native/custom_diffusion/bind_train.cc registers as `trainer`. */
interface TrainerBinding {
  trainer: {
    create(unet: unknown, textEncoder: unknown, vae: unknown, schedulerConfig: string, options: TrainStepOptions): unknown;
    step(handle: unknown, batch: Record<string, NativeTensor | number>, generator?: NativeGenerator): Promise<TrainStepResult>;
    trainables(handle: unknown): Promise<Record<string, NativeTensor>>;
    setTrainables(handle: unknown, values: Record<string, NativeTensor>): Promise<void>;
    optimizerState(handle: unknown): Promise<NativeOptimizerState>;
    setOptimizerState(handle: unknown, state: NativeOptimizerState): Promise<void>;
    info(handle: unknown): NativeTrainerInfo;
    learningRateAt(handle: unknown, step: number): number;
    dispose(handle: unknown): void;
  };
}

function binding(): TrainerBinding['trainer'] {
  return nativeAs<TrainerBinding>().trainer;
}

/**
 * The native Custom Diffusion optimizer step over a UNet, a text encoder and a VAE (see
 * native/custom_diffusion/train_step.h): one call per micro-batch runs VAE encoding, noising, the
 * text encoder, the UNet with the start-token detach, the loss, backward and — at the end of an
 * accumulation cycle — clipping and AdamW, and returns only numbers. The models are trained in place.
 */
export class TrainStep {
  /** Trainable tensor names in optimizer order (UNet diffusers names, then {@link TrainStep.addedRowsName}). */
  readonly trainableNames: readonly string[];
  /** The name of the added token rows [n, hidden] among the trainables. */
  readonly addedRowsName: string;
  /** The scheduler's prediction type (the training target). */
  readonly predictionType: string;
  readonly freezeModel: FreezeModel;

  private readonly handle: unknown;
  private disposed = false;

  private constructor(handle: unknown) {
    this.handle = handle;
    const info = callSync(() => binding().info(handle));
    this.trainableNames = Object.freeze([...info.trainableNames]);
    this.addedRowsName = info.addedRowsName;
    this.predictionType = info.predictionType;
    this.freezeModel = info.freezeModel;
  }

  /**
   * Sets the UNet's trainable set and makes the text encoder's added rows trainable. `scheduler` is
   * the model's scheduler (or its config JSON text): training always uses `DDPMScheduler.from_config`
   * of it, as the original scripts do.
   */
  static create(
    models: { unet: UNet; textEncoder: TextEncoder; vae?: AutoencoderKL | null; scheduler: Scheduler | string },
    options: TrainStepOptions = {},
  ): TrainStep {
    const { unet, textEncoder, vae, scheduler } = models;
    if (!(unet instanceof UNet)) throw new InvalidArgumentError('unet must be a UNet');
    if (!(textEncoder instanceof TextEncoder)) throw new InvalidArgumentError('textEncoder must be a TextEncoder');
    if (vae !== undefined && vae !== null && !(vae instanceof AutoencoderKL)) throw new InvalidArgumentError('vae must be an AutoencoderKL');
    const config = typeof scheduler === 'string' ? scheduler : scheduler instanceof Scheduler ? scheduler.configJson() : undefined;
    if (config === undefined) throw new InvalidArgumentError('scheduler must be a Scheduler or its config JSON text');
    const handle = callSync(() =>
      binding().create(
        modelHandle(unet, 'unet'),
        modelHandle(textEncoder, 'textEncoder'),
        vae ? modelHandle(vae, 'vae') : null,
        config,
        options,
      ),
    );
    return new TrainStep(handle);
  }

  /** One micro-batch (see {@link TrainStepBatch}); draws from `generator` unless randomness is injected. */
  async step(batch: TrainStepBatch, generator?: Generator): Promise<TrainStepResult> {
    const b: Record<string, NativeTensor | number> = { instanceCount: batch.instanceCount };
    for (const k of ['pixels', 'latents', 'masks', 'inputIds', 'vaeNoise', 'noise', 'timesteps'] as const) {
      const t = batch[k];
      if (t === undefined) continue;
      if (!(t instanceof Tensor)) throw new InvalidArgumentError(`batch.${k} must be a Tensor`);
      b[k] = t.handle;
    }
    return callAsync(() => binding().step(this.handle, b, generator?.handle));
  }

  /** Copies of the trainable tensors by name. */
  async trainables(): Promise<Record<string, Tensor>> {
    const raw = await callAsync(() => binding().trainables(this.handle));
    return Object.fromEntries(Object.entries(raw).map(([k, v]) => [k, new Tensor(v)]));
  }

  /** Overwrites trainable tensors (resume). */
  async setTrainables(values: Record<string, Tensor>): Promise<void> {
    const raw: Record<string, NativeTensor> = {};
    for (const [k, v] of Object.entries(values)) {
      if (!(v instanceof Tensor)) throw new InvalidArgumentError(`${k} must be a Tensor`);
      raw[k] = v.handle;
    }
    await callAsync(() => binding().setTrainables(this.handle, raw));
  }

  /** Copies of the AdamW moments and counters (not in the middle of an accumulation cycle). */
  async optimizerState(): Promise<OptimizerStateData> {
    const s = await callAsync(() => binding().optimizerState(this.handle));
    return {
      names: s.names,
      expAvg: s.expAvg.map((t) => new Tensor(t)),
      expAvgSq: s.expAvgSq.map((t) => new Tensor(t)),
      optimizerSteps: s.optimizerSteps,
      microSteps: s.microSteps,
      ...(s.scale && s.growthTracker ? { scale: new Tensor(s.scale), growthTracker: new Tensor(s.growthTracker) } : {}),
    };
  }

  async setOptimizerState(state: OptimizerStateData): Promise<void> {
    const raw: NativeOptimizerState = {
      names: state.names,
      expAvg: state.expAvg.map((t) => t.handle),
      expAvgSq: state.expAvgSq.map((t) => t.handle),
      optimizerSteps: state.optimizerSteps,
      microSteps: state.microSteps,
    };
    if (state.scale && state.growthTracker) {
      raw.scale = state.scale.handle;
      raw.growthTracker = state.growthTracker.handle;
    }
    await callAsync(() => binding().setOptimizerState(this.handle, raw));
  }

  /** The learning rate of optimizer step `step` (0-based), warmup included. */
  learningRateAt(step: number): number {
    return callSync(() => binding().learningRateAt(this.handle, step));
  }

  /** Releases the trainer (the models stay loaded). */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    callSync(() => binding().dispose(this.handle));
  }
}

// ---------------------------------------------------------------------------------------------
// The training run

/** Preloaded components (trained in place: the text encoder gets the modifier tokens). */
export interface TrainModels {
  unet: UNet;
  textEncoder: TextEncoder;
  vae: AutoencoderKL;
  tokenizer: ClipTokenizer;
  scheduler: Scheduler;
}

/** What a validation hook receives; see {@link TrainOptions.sample}. */
export interface SampleContext {
  step: number;
  prompt: string;
  models: TrainModels;
  seed: number;
  signal?: AbortSignal;
}

/** A source of batches other than the built-in data pipeline (advanced; no exact resume of it). */
export interface BatchSource {
  next(): Promise<TrainingBatch>;
}

export interface TrainOptions {
  // -- Model
  /** A diffusers pipeline folder (unet/, text_encoder/, vae/, tokenizer/, scheduler/). */
  pretrainedModel?: string;
  /** Or the components, already loaded (float32; trained in place). */
  models?: TrainModels;
  /** Device for models loaded from `pretrainedModel` (default `cpu`). */
  device?: DeviceName;
  /** Load variant (e.g. `fp16` files, upcast to float32). */
  variant?: string;

  // -- Data (A-DF/HF-EX arguments)
  /** The concepts (or a concepts-list JSON file), or the single-concept fields below. */
  concepts?: ConceptSpec[] | string;
  instanceDataDir?: string;
  instancePrompt?: string;
  classDataDir?: string;
  classPrompt?: string;
  /** Default: true when every concept has class data. */
  withPriorPreservation?: boolean;
  /** Default 1.0. */
  priorLossWeight?: number;
  /** Class images per concept (default 200). */
  numClassImages?: number;
  /** Training resolution (default 512). */
  resolution?: number;
  /** Augmentation options of the data pipeline (style, hflip, noaug, centerCrop, engine). */
  augment?: Omit<AugmentOptions, 'size'>;
  /** Batches from elsewhere instead of the built-in pipeline. */
  dataLoader?: BatchSource;

  // -- Tokens
  /** Modifier tokens, e.g. `['<new1>']` (also accepted: `'<new1>+<new2>'`). Default: none. */
  modifierTokens?: string[] | string;
  /**
   * Initializer tokens zipped in order with the modifier tokens, looked up as raw vocabulary entries
   * (not BPE-encoded). Default `['ktn', 'pll', 'ucd']` (ids 42170, 47629, 44746 in CLIP's vocabulary).
   */
  initializerTokens?: string[] | string;
  /** Default `'crossattn_kv'`. */
  freezeModel?: FreezeModel;

  // -- Optimisation
  /** Default 1e-5. */
  learningRate?: number;
  /**
   * The modifier tokens' learning rate, before scaleLr as `learningRate` (default: `learningRate`,
   * one rate for all as in the paper). A higher one puts more of the concept into the token's own
   * text-encoder rows and less into the K/V weights, which the closed-form merge then moves less.
   */
  tokenLearningRate?: number;
  /** lr × gradientAccumulationSteps × trainBatchSize × numProcesses (× 2 with prior preservation). Default true. */
  scaleLr?: boolean;
  /** Processes of a distributed run, for scaleLr only (default 1). */
  numProcesses?: number;
  /** Linear warmup, in optimizer steps (default 0, as the README commands pass). */
  lrWarmupSteps?: number;
  /** Optimizer steps (default 250). */
  maxTrainSteps?: number;
  /** Instance examples per micro-batch, B (default 2; 2B examples with prior preservation). */
  trainBatchSize?: number;
  /** Default 1. */
  gradientAccumulationSteps?: number;
  /** Default 1.0; 0 disables clipping. */
  maxGradNorm?: number;
  adamBeta1?: number;
  adamBeta2?: number;
  adamWeightDecay?: number;
  adamEpsilon?: number;
  /** Default `'diffusers'`. */
  lossWeighting?: LossWeighting;
  /** Seeds the data pipeline and the noise generator (default 42). */
  seed?: number;
  /** Default `'no'`. */
  mixedPrecision?: MixedPrecision;
  /** Recompute UNet blocks in the backward pass to save activation memory (default false). */
  gradientCheckpointing?: boolean;
  /** LibTorch intra-op threads during the run (restored after). */
  numThreads?: number;

  // -- Output
  /** Where checkpoints, `delta.safetensors` and `run.json` go. */
  outputDir?: string;
  /** Save a checkpoint every N optimizer steps. */
  checkpointingSteps?: number;
  /** Keep at most this many checkpoints (oldest removed). */
  checkpointsTotalLimit?: number;
  /** A checkpoint folder, or `'latest'` (the newest in outputDir). */
  resumeFromCheckpoint?: string;
  /** On abort, write a checkpoint of the last completed step (needs outputDir). Default false. */
  checkpointOnAbort?: boolean;
  /** dtype of the delta's tensors (default float32). */
  deltaDtype?: 'float32' | 'float16';
  /** Write `delta.safetensors` and `run.json` at the end (default true when outputDir is set). */
  saveDelta?: boolean;

  // -- Validation
  validationPrompt?: string;
  /** Run the sample hook every N steps. */
  validationSteps?: number;
  /** Generates validation images (a sampling pipeline is not part of the trainer yet). */
  sample?: (context: SampleContext) => Promise<unknown>;

  signal?: AbortSignal;
}

export interface StepEvent {
  /** Optimizer steps done (1-based). */
  step: number;
  maxSteps: number;
  /** Mean loss of the step's micro-batches. */
  loss: number;
  lr: number;
  gradNorm: number;
  /** Training examples (instance + class) per second over this step. */
  imagesPerSecond: number;
  secondsPerStep: number;
  /** Estimated seconds to the last step (mean of recent steps). */
  etaSeconds: number;
  elapsedSeconds: number;
  epoch: number;
}

export interface TrainingEvents {
  step: StepEvent;
  loss: { step: number; loss: number };
  lr: { step: number; lr: number };
  checkpoint: { step: number; path: string; reason: 'interval' | 'abort' };
  sample: { step: number; prompt: string; result: unknown };
  warning: { message: string };
}

export interface TrainResult {
  /** Optimizer steps done. */
  steps: number;
  losses: number[];
  learningRates: number[];
  /** The trained tensors: UNet tensors by diffusers name and token rows by token text ([hidden]). */
  trained: Record<string, Tensor>;
  tokens: DeltaToken[];
  baseModelFingerprint: string;
  deltaPath?: string;
  runRecordPath?: string;
  checkpoints: string[];
}

/** A running training; listen to its events and await {@link TrainingRun.result}. */
export class TrainingRun {
  /** Resolves when training ends; rejects with AbortError (after an optional checkpoint) or the failure. */
  readonly result: Promise<TrainResult>;
  private readonly emitter = new EventEmitter();

  /** @internal */
  constructor(body: (run: TrainingRun) => Promise<TrainResult>) {
    // Start on a later turn, so listeners attached right after train() returns see every event.
    this.result = new Promise<void>((resolve) => setImmediate(resolve)).then(() => body(this));
    // The caller may attach to `result` late; do not report an unhandled rejection before that.
    this.result.catch(() => undefined);
  }

  on<K extends keyof TrainingEvents>(event: K, listener: (e: TrainingEvents[K]) => void): this {
    this.emitter.on(event, listener);
    return this;
  }

  once<K extends keyof TrainingEvents>(event: K, listener: (e: TrainingEvents[K]) => void): this {
    this.emitter.once(event, listener);
    return this;
  }

  off<K extends keyof TrainingEvents>(event: K, listener: (e: TrainingEvents[K]) => void): this {
    this.emitter.off(event, listener);
    return this;
  }

  /** @internal */
  emit<K extends keyof TrainingEvents>(event: K, e: TrainingEvents[K]): void {
    this.emitter.emit(event, e);
  }
}

/** The original initializer tokens (A-DF/HF-EX `--initializer_token ktn+pll+ucd`). */
export const DEFAULT_INITIALIZER_TOKENS = Object.freeze(['ktn', 'pll', 'ucd']);

/**
 * The learning rate after the scale_lr rule of A-DF/HF-EX: lr × gradient accumulation × batch size ×
 * processes, and × 2 more with prior preservation.
 */
export function scaledLearningRate(
  lr: number,
  o: { gradientAccumulationSteps: number; trainBatchSize: number; numProcesses: number; withPriorPreservation: boolean },
): number {
  let r = lr * o.gradientAccumulationSteps * o.trainBatchSize * o.numProcesses;
  if (o.withPriorPreservation) r *= 2.0;
  return r;
}

interface Resolved {
  freezeModel: FreezeModel;
  learningRate: number;
  tokenLearningRate: number | undefined;
  scaleLr: boolean;
  numProcesses: number;
  lrWarmupSteps: number;
  maxTrainSteps: number;
  trainBatchSize: number;
  gradientAccumulationSteps: number;
  maxGradNorm: number;
  adamBeta1: number;
  adamBeta2: number;
  adamWeightDecay: number;
  adamEpsilon: number;
  priorLossWeight: number;
  lossWeighting: LossWeighting;
  seed: number;
  mixedPrecision: MixedPrecision;
  gradientCheckpointing: boolean;
  resolution: number;
  numClassImages: number;
  modifierTokens: string[];
  initializerTokens: string[];
  checkpointingSteps: number;
  checkpointsTotalLimit: number;
  validationSteps: number;
  checkpointOnAbort: boolean;
  deltaDtype: 'float32' | 'float16';
  saveDelta: boolean;
}

function splitTokens(v: string[] | string | undefined, what: string): string[] | undefined {
  if (v === undefined) return undefined;
  const list = typeof v === 'string' ? v.split('+') : v;
  if (!Array.isArray(list) || list.some((t) => typeof t !== 'string' || t.trim() === '')) {
    throw new InvalidArgumentError(`${what} must be a list of non-empty strings (or one string joined with "+")`);
  }
  return list.map((t) => t.trim());
}

/** The token rows' learning rate over the K/V weights' (scaleLr scales both alike). */
function tokenLearningRateScale(r: Resolved): number {
  // learningRate 0 leaves tokenLearningRate 0 (resolveOptions): nothing trains, at any scale.
  return r.tokenLearningRate === undefined || r.learningRate === 0 ? 1 : r.tokenLearningRate / r.learningRate;
}

function resolveOptions(o: TrainOptions): Resolved {
  if (o === null || typeof o !== 'object') throw new InvalidArgumentError('train() needs an options object');
  const num = (k: keyof TrainOptions, fallback: number, check: (x: number) => boolean, rule: string): number => {
    const v = o[k];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== 'number' || !Number.isFinite(v) || !check(v)) {
      throw new InvalidArgumentError(`${String(k)} must be ${rule}, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  const int = (k: keyof TrainOptions, fallback: number, min: number) =>
    num(k, fallback, (x) => Number.isInteger(x) && x >= min, `an integer ≥ ${min}`);
  const pos = (x: number) => x >= 0;
  const freezeModel = o.freezeModel ?? 'crossattn_kv';
  if (freezeModel !== 'crossattn_kv' && freezeModel !== 'crossattn') {
    throw new InvalidArgumentError(`freezeModel must be 'crossattn_kv' or 'crossattn', got ${JSON.stringify(freezeModel)}`);
  }
  const lossWeighting = o.lossWeighting ?? 'diffusers';
  if (lossWeighting !== 'diffusers' && lossWeighting !== 'compvis') {
    throw new InvalidArgumentError(`lossWeighting must be 'diffusers' or 'compvis', got ${JSON.stringify(lossWeighting)}`);
  }
  const mixedPrecision = o.mixedPrecision ?? 'no';
  if (mixedPrecision !== 'no' && mixedPrecision !== 'fp16' && mixedPrecision !== 'bf16') {
    throw new InvalidArgumentError(`mixedPrecision must be 'no', 'fp16' or 'bf16', got ${JSON.stringify(mixedPrecision)}`);
  }
  if (o.gradientCheckpointing !== undefined && typeof o.gradientCheckpointing !== 'boolean') {
    throw new InvalidArgumentError(`gradientCheckpointing must be true or false, got ${JSON.stringify(o.gradientCheckpointing)}`);
  }
  const deltaDtype = o.deltaDtype ?? 'float32';
  if (deltaDtype !== 'float32' && deltaDtype !== 'float16') {
    throw new InvalidArgumentError(`deltaDtype must be 'float32' or 'float16', got ${JSON.stringify(deltaDtype)}`);
  }
  const modifierTokens = splitTokens(o.modifierTokens, 'modifierTokens') ?? [];
  if (new Set(modifierTokens).size !== modifierTokens.length) throw new InvalidArgumentError('modifierTokens must be distinct');
  const initializerTokens = splitTokens(o.initializerTokens, 'initializerTokens') ?? [...DEFAULT_INITIALIZER_TOKENS];
  if (modifierTokens.length > initializerTokens.length) {
    throw new InvalidArgumentError(
      `${modifierTokens.length} modifier tokens but ${initializerTokens.length} initializer tokens: give one initializer token per modifier token`,
    );
  }
  if (!o.pretrainedModel && !o.models) throw new InvalidArgumentError('train() needs pretrainedModel (a diffusers folder) or models');
  if (o.pretrainedModel && o.models) throw new InvalidArgumentError('Give pretrainedModel or models, not both');
  if (o.resumeFromCheckpoint !== undefined && typeof o.resumeFromCheckpoint !== 'string') {
    throw new InvalidArgumentError('resumeFromCheckpoint must be a checkpoint folder or "latest"');
  }
  if (o.resumeFromCheckpoint === 'latest' && !o.outputDir) throw new InvalidArgumentError('resumeFromCheckpoint "latest" needs outputDir');
  if (o.checkpointOnAbort && !o.outputDir) throw new InvalidArgumentError('checkpointOnAbort needs outputDir');
  if (o.checkpointingSteps && !o.outputDir) throw new InvalidArgumentError('checkpointingSteps needs outputDir');
  if (o.validationPrompt !== undefined && typeof o.validationPrompt !== 'string') throw new InvalidArgumentError('validationPrompt must be a string');
  if (o.sample !== undefined && typeof o.sample !== 'function') throw new InvalidArgumentError('sample must be a function');
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw new InvalidArgumentError('signal must be an AbortSignal');
  const learningRate = num('learningRate', 1e-5, pos, 'a number ≥ 0');
  const tokenLearningRate = o.tokenLearningRate === undefined ? undefined : num('tokenLearningRate', 0, pos, 'a number ≥ 0');
  if (tokenLearningRate && learningRate === 0) {
    throw new InvalidArgumentError('tokenLearningRate trains the token at a multiple of learningRate, so learningRate must be above 0');
  }
  return {
    freezeModel,
    learningRate,
    tokenLearningRate,
    scaleLr: o.scaleLr ?? true,
    numProcesses: int('numProcesses', 1, 1),
    lrWarmupSteps: int('lrWarmupSteps', 0, 0),
    maxTrainSteps: int('maxTrainSteps', 250, 0),
    trainBatchSize: int('trainBatchSize', 2, 1),
    gradientAccumulationSteps: int('gradientAccumulationSteps', 1, 1),
    maxGradNorm: num('maxGradNorm', 1.0, pos, 'a number ≥ 0 (0 disables clipping)'),
    adamBeta1: num('adamBeta1', 0.9, (x) => x >= 0 && x < 1, 'in [0, 1)'),
    adamBeta2: num('adamBeta2', 0.999, (x) => x >= 0 && x < 1, 'in [0, 1)'),
    adamWeightDecay: num('adamWeightDecay', 1e-2, pos, 'a number ≥ 0'),
    adamEpsilon: num('adamEpsilon', 1e-8, pos, 'a number ≥ 0'),
    priorLossWeight: num('priorLossWeight', 1.0, pos, 'a number ≥ 0'),
    lossWeighting,
    seed: int('seed', 42, 0),
    mixedPrecision,
    gradientCheckpointing: o.gradientCheckpointing ?? false,
    resolution: int('resolution', 512, 8),
    numClassImages: int('numClassImages', 200, 1),
    modifierTokens,
    initializerTokens,
    checkpointingSteps: int('checkpointingSteps', 0, 0),
    checkpointsTotalLimit: int('checkpointsTotalLimit', 0, 0),
    validationSteps: int('validationSteps', 0, 0),
    checkpointOnAbort: o.checkpointOnAbort ?? false,
    deltaDtype,
    saveDelta: o.saveDelta ?? o.outputDir !== undefined,
  };
}

/** The options as recorded in checkpoints, deltas and run records (no models, signals or hooks). */
function recordedOptions(o: TrainOptions, r: Resolved, lr: number): Record<string, unknown> {
  const { models: _m, signal: _s, sample: _f, dataLoader: _d, ...rest } = o;
  return toJsonSafe({ ...rest, resolved: { ...r, scaledLearningRate: lr } }) as Record<string, unknown>;
}

function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new AbortError('Training was aborted.');
}

/**
 * Starts Custom Diffusion training (see the module documentation and src/train/README.md).
 * Options are checked at once (InvalidArgumentError); everything else is reported by the returned
 * run's `result`.
 */
export function train(options: TrainOptions): TrainingRun {
  const r = resolveOptions(options);
  return new TrainingRun((run) => runTraining(run, options, r));
}

async function loadModels(o: TrainOptions): Promise<TrainModels> {
  const dir = path.resolve(o.pretrainedModel!);
  const load = { device: o.device, variant: o.variant, dtype: 'float32' as const };
  const [unet, textEncoder, vae, tokenizer, scheduler] = await Promise.all([
    UNet.load(path.join(dir, 'unet'), load),
    TextEncoder.load(path.join(dir, 'text_encoder'), load),
    AutoencoderKL.load(path.join(dir, 'vae'), load),
    ClipTokenizer.fromFolder(path.join(dir, 'tokenizer')),
    Scheduler.load(path.join(dir, 'scheduler')),
  ]);
  return { unet, textEncoder, vae, tokenizer, scheduler };
}

function conceptsOf(o: TrainOptions): Promise<ConceptSpec[]> | ConceptSpec[] {
  if (typeof o.concepts === 'string') return readConceptsList(o.concepts);
  if (Array.isArray(o.concepts)) return o.concepts;
  if (o.instanceDataDir === undefined || o.instancePrompt === undefined) {
    throw new InvalidArgumentError('Give concepts (or a concepts-list file), or instanceDataDir and instancePrompt');
  }
  return [
    {
      instanceDataDir: o.instanceDataDir,
      instancePrompt: o.instancePrompt,
      ...(o.classDataDir !== undefined ? { classDataDir: o.classDataDir } : {}),
      ...(o.classPrompt !== undefined ? { classPrompt: o.classPrompt } : {}),
    },
  ];
}

/** Adds the modifier tokens to the tokenizer and text encoder, rows initialised from the initializers. */
function addModifierTokens(models: TrainModels, r: Resolved): DeltaToken[] {
  const { tokenizer, textEncoder } = models;
  if (r.modifierTokens.length === 0) return [];
  const base = textEncoder.vocabSize;
  if (tokenizer.vocabSize !== base) {
    throw new InvalidArgumentError(
      `The tokenizer has ${tokenizer.vocabSize} tokens but the text encoder ${base} rows: add the modifier tokens to a fresh pair`,
    );
  }
  for (const t of r.modifierTokens) {
    if (tokenizer.tokenId(t) !== undefined) {
      throw new InvalidArgumentError(`The modifier token ${t} is already in the vocabulary; choose another, e.g. <new1>`);
    }
  }
  // Raw vocabulary lookups (the slow tokenizer's encode([tok]) in the originals), never BPE.
  const initIds = r.modifierTokens.map((_, i) => {
    const init = r.initializerTokens[i];
    const id = tokenizer.tokenId(init);
    if (id === undefined) {
      throw new InvalidArgumentError(
        `The initializer token "${init}" is not a single vocabulary entry (it is looked up raw, not BPE-encoded; e.g. "ktn", "pll", "ucd")`,
      );
    }
    return id;
  });
  const ids = tokenizer.addTokens(r.modifierTokens);
  ids.forEach((id, i) => {
    if (id !== base + i) throw new InvalidArgumentError(`The modifier token ${r.modifierTokens[i]} got id ${id}; expected ${base + i}`);
  });
  textEncoder.resizeTokenEmbeddings(base + ids.length);
  const rows = textEncoder.tokenRows(initIds);
  textEncoder.setTokenRows(ids, rows);
  rows.dispose();
  return r.modifierTokens.map((token, i) => ({ token, id: ids[i], initializer: r.initializerTokens[i], initializerId: initIds[i] }));
}

function batchTensors(batch: TrainingBatch, tokenizer: ClipTokenizer): { pixels: Tensor; masks: Tensor; inputIds: Tensor } {
  const k = batch.instanceCount;
  batch.isPrior.forEach((p, i) => {
    if (p !== i >= k) throw new InvalidArgumentError('A batch must be [instance examples…, then class examples…]');
  });
  const rows = tokenizer.encodeBatch(batch.prompts, { padding: 'max_length', truncation: true });
  const len = rows[0]?.length ?? 0;
  const ids = new BigInt64Array(rows.length * len);
  rows.forEach((row, i) => row.forEach((id, j) => (ids[i * len + j] = BigInt(id))));
  return {
    pixels: Tensor.fromArray(batch.pixels, batch.pixelShape),
    masks: Tensor.fromArray(batch.masks, batch.maskShape),
    inputIds: Tensor.fromArray(ids, [rows.length, len]),
  };
}

async function runTraining(run: TrainingRun, o: TrainOptions, r: Resolved): Promise<TrainResult> {
  const signal = o.signal;
  throwIfAborted(signal);
  const startedAt = new Date();
  const threadsBefore = o.numThreads !== undefined ? getNumThreads() : undefined;
  if (o.numThreads !== undefined) setNumThreads(o.numThreads);
  const ownModels = !o.models;
  let models: TrainModels | undefined;
  let step: TrainStep | undefined;
  try {
    models = o.models ?? (await loadModels(o));
    throwIfAborted(signal);
    for (const [k, m] of Object.entries(models)) if (m === undefined || m === null) throw new InvalidArgumentError(`models.${k} is missing`);

    // Fingerprint of the base K/V (before anything trains), then the tokens.
    const kv = models.unet.allParameters(/attn2\.to_[kv]\.weight$/);
    const baseModelFingerprint = await computeBaseFingerprint(kv, [models.textEncoder.baseVocabSize, models.textEncoder.hiddenSize]);
    const tokens = addModifierTokens(models, r);

    // Data.
    let loader: TrainingDataLoader | undefined;
    let source: BatchSource;
    let withPrior: boolean;
    if (o.dataLoader) {
      source = o.dataLoader;
      withPrior = o.withPriorPreservation ?? true;
    } else {
      const concepts = await conceptsOf(o);
      const dataset = await TrainingDataset.open({
        ...(o.augment ?? {}),
        size: r.resolution,
        concepts,
        withPriorPreservation: o.withPriorPreservation,
        numClassImages: r.numClassImages,
      });
      for (const w of dataset.warnings) run.emit('warning', { message: w });
      withPrior = dataset.withPriorPreservation;
      loader = new TrainingDataLoader(dataset, { batchSize: r.trainBatchSize, seed: r.seed });
      source = loader;
      const prompts = dataset.instances.map((it) => it.prompt).join('\n');
      for (const t of r.modifierTokens) {
        if (!prompts.toLowerCase().includes(t.toLowerCase())) {
          run.emit('warning', { message: `No instance prompt contains the modifier token ${t}; its row will not learn anything` });
        }
      }
    }
    throwIfAborted(signal);

    const lr = r.scaleLr
      ? scaledLearningRate(r.learningRate, {
          gradientAccumulationSteps: r.gradientAccumulationSteps,
          trainBatchSize: r.trainBatchSize,
          numProcesses: r.numProcesses,
          withPriorPreservation: withPrior,
        })
      : r.learningRate;
    const recorded = recordedOptions(o, r, lr);
    step = TrainStep.create(
      { unet: models.unet, textEncoder: models.textEncoder, vae: models.vae, scheduler: models.scheduler },
      {
        freezeModel: r.freezeModel,
        tokenIds: tokens.map((t) => t.id),
        learningRate: lr,
        tokenLearningRateScale: tokenLearningRateScale(r),
        warmupSteps: r.lrWarmupSteps,
        adamBeta1: r.adamBeta1,
        adamBeta2: r.adamBeta2,
        adamEpsilon: r.adamEpsilon,
        adamWeightDecay: r.adamWeightDecay,
        maxGradNorm: r.maxGradNorm,
        gradientAccumulationSteps: r.gradientAccumulationSteps,
        priorLossWeight: r.priorLossWeight,
        lossWeighting: r.lossWeighting,
        mixedPrecision: r.mixedPrecision,
        gradientCheckpointing: r.gradientCheckpointing,
      },
    );
    // The noise generator draws on the CPU whatever the device, so a seed means the same run everywhere.
    const generator = new Generator(r.seed);

    let done = 0;
    let losses: number[] = [];
    let lrs: number[] = [];
    let loaderState: DataLoaderState | null = null;
    const checkpoints: string[] = [];

    // Resume.
    if (o.resumeFromCheckpoint !== undefined) {
      const dir = o.resumeFromCheckpoint === 'latest' ? await latestCheckpoint(o.outputDir!) : o.resumeFromCheckpoint;
      if (dir === undefined) throw new TrainingError(`There is no checkpoint in ${o.outputDir} to resume from`, 'TRAIN_STATE');
      const ck = await loadCheckpoint(dir);
      if (ck.baseModelFingerprint !== baseModelFingerprint) {
        throw new TrainingError(`The checkpoint ${dir} was trained on another base model (K/V fingerprint differs)`, 'TRAIN_STATE');
      }
      const want = tokens.map((t) => `${t.token}=${t.id}`).join(',');
      const have = ck.tokens.map((t) => `${t.token}=${t.id}`).join(',');
      if (want !== have) throw new TrainingError(`The checkpoint ${dir} has tokens [${have}], this run [${want}]`, 'TRAIN_STATE');
      const names = Object.keys(ck.trainables).sort().join(',');
      if (names !== [...step.trainableNames].sort().join(',')) {
        throw new TrainingError(`The checkpoint ${dir} trained other tensors (another freezeModel?)`, 'TRAIN_STATE');
      }
      await step.setTrainables(ck.trainables);
      await step.setOptimizerState(ck.optimizer);
      if (!ck.generators.noise) throw new TrainingError(`The checkpoint ${dir} has no noise generator state`, 'TRAIN_STATE');
      generator.setState(ck.generators.noise);
      if (loader) {
        if (!ck.dataLoader) throw new TrainingError(`The checkpoint ${dir} has no data loader state`, 'TRAIN_STATE');
        loader = TrainingDataLoader.restore(loader.dataset, ck.dataLoader);
        source = loader;
      }
      done = ck.step;
      losses = [...ck.losses];
      lrs = [...ck.learningRates];
      loaderState = ck.dataLoader;
      for (const t of Object.values(ck.trainables)) t.dispose();
      for (const t of [...ck.optimizer.expAvg, ...ck.optimizer.expAvgSq]) t.dispose();
    }

    const writeCheckpoint = async (reason: 'interval' | 'abort'): Promise<string> => {
      const trainables = await step!.trainables();
      const optimizer = await step!.optimizerState();
      const data: CheckpointData = {
        step: done,
        trainables,
        optimizer,
        generators: { noise: generator.getState() },
        dataLoader: loaderState,
        losses,
        learningRates: lrs,
        tokens,
        baseModelFingerprint,
        options: recorded,
      };
      try {
        const dir = await saveCheckpoint(checkpointDir(o.outputDir!, done), data);
        checkpoints.push(dir);
        if (r.checkpointsTotalLimit > 0) await pruneCheckpoints(o.outputDir!, r.checkpointsTotalLimit);
        run.emit('checkpoint', { step: done, path: dir, reason });
        return dir;
      } finally {
        for (const t of Object.values(trainables)) t.dispose();
        for (const t of [...optimizer.expAvg, ...optimizer.expAvgSq]) t.dispose();
      }
    };

    // The loop: batch k+1 is planned and loaded while step k runs.
    let warnedValidation = false;
    let pending: Promise<TrainingBatch> | undefined;
    const totalMicro = r.maxTrainSteps * r.gradientAccumulationSteps;
    let microTaken = done * r.gradientAccumulationSteps;
    const nextBatch = (): Promise<TrainingBatch> => {
      const p = pending ?? source.next();
      microTaken += 1;
      // Prefetch only batches the run will use (an unused prefetch is harmless for resume, since
      // checkpoints record the state after the last batch used, but it wastes image work).
      pending = microTaken < totalMicro ? source.next() : undefined;
      pending?.catch(() => undefined);
      return p;
    };
    const t0 = performance.now();
    const recent: number[] = [];
    while (done < r.maxTrainSteps) {
      if (signal?.aborted) {
        if (r.checkpointOnAbort) await writeCheckpoint('abort');
        throw new AbortError(`Training was aborted after step ${done}.`);
      }
      const stepStart = performance.now();
      let sum = 0;
      let examples = 0;
      let last: TrainStepResult | undefined;
      let epoch = 0;
      for (let m = 0; m < r.gradientAccumulationSteps; m++) {
        const batch = await nextBatch();
        const t = batchTensors(batch, models.tokenizer);
        try {
          last = await step.step({ ...t, instanceCount: batch.instanceCount }, generator);
        } catch (e) {
          if (e instanceof TrainingError && e.code === 'TRAIN_NAN') {
            throw new TrainingError(`Training step ${done + 1} of ${r.maxTrainSteps}: ${e.message}`, 'TRAIN_NAN', done + 1, { cause: e });
          }
          throw e;
        } finally {
          t.pixels.dispose();
          t.masks.dispose();
          t.inputIds.dispose();
        }
        sum += last.loss;
        examples += batch.size;
        epoch = batch.epoch;
        loaderState = batch.stateAfter;
      }
      if (!last || !last.optimizerStepped) {
        if (last?.skipped) {
          run.emit('warning', { message: `Step ${done + 1}: fp16 gradients overflowed; the update was skipped and the loss scale reduced` });
          continue;
        }
        throw new TrainingError(`Step ${done + 1} did not end an accumulation cycle`, 'TRAIN_STATE', done + 1);
      }
      done += 1;
      const loss = sum / r.gradientAccumulationSteps;
      losses.push(loss);
      lrs.push(last.lr);
      const now = performance.now();
      const seconds = (now - stepStart) / 1000;
      recent.push(seconds);
      if (recent.length > 20) recent.shift();
      const mean = recent.reduce((a, b) => a + b, 0) / recent.length;
      run.emit('step', {
        step: done,
        maxSteps: r.maxTrainSteps,
        loss,
        lr: last.lr,
        gradNorm: last.gradNorm,
        imagesPerSecond: examples / Math.max(seconds, 1e-9),
        secondsPerStep: seconds,
        etaSeconds: mean * (r.maxTrainSteps - done),
        elapsedSeconds: (now - t0) / 1000,
        epoch,
      });
      run.emit('loss', { step: done, loss });
      run.emit('lr', { step: done, lr: last.lr });

      if (r.checkpointingSteps > 0 && done % r.checkpointingSteps === 0 && done < r.maxTrainSteps) await writeCheckpoint('interval');
      if (o.validationPrompt && r.validationSteps > 0 && done % r.validationSteps === 0) {
        if (o.sample) {
          const result = await o.sample({ step: done, prompt: o.validationPrompt, models, seed: r.seed, signal });
          run.emit('sample', { step: done, prompt: o.validationPrompt, result });
        } else if (!warnedValidation) {
          warnedValidation = true;
          run.emit('warning', { message: 'validationPrompt is set but no sample function was given; validation is skipped' });
        }
      }
    }
    pending = undefined;

    // The result: UNet tensors by diffusers name, token rows by token.
    const trainables = await step.trainables();
    const trained: Record<string, Tensor> = {};
    for (const [name, t] of Object.entries(trainables)) {
      if (name !== step.addedRowsName) trained[name] = t;
    }
    const rows = trainables[step.addedRowsName];
    if (rows) {
      const data = rows.toArray() as Float32Array;
      const hidden = rows.shape[1];
      tokens.forEach((tok, i) => {
        trained[tok.token] = Tensor.fromArray(data.slice(i * hidden, (i + 1) * hidden), [hidden]);
      });
      rows.dispose();
    }
    const result: TrainResult = { steps: done, losses, learningRates: lrs, trained, tokens, baseModelFingerprint, checkpoints };
    if (r.saveDelta && o.outputDir) {
      const unetTensors = Object.fromEntries(Object.entries(trained).filter(([k]) => !tokens.some((t) => t.token === k)));
      const tokenRows = Object.fromEntries(tokens.map((t) => [t.token, trained[t.token]]));
      const baseModel = {
        path: o.pretrainedModel ? path.resolve(o.pretrainedModel) : null,
        tokenEmbeddingShape: [models.textEncoder.baseVocabSize, models.textEncoder.hiddenSize],
        crossAttentionDim: models.unet.config.crossAttentionDim,
        predictionType: step.predictionType,
      };
      result.deltaPath = path.join(o.outputDir, 'delta.safetensors');
      await writeDelta(result.deltaPath, {
        unet: unetTensors,
        tokenRows,
        freezeModel: r.freezeModel,
        tokens,
        baseModelFingerprint,
        baseModel,
        dtype: r.deltaDtype,
        trainingOptions: recorded,
      });
      result.runRecordPath = path.join(o.outputDir, 'run.json');
      await writeRunRecord(result.runRecordPath, {
        format: 'custom-diffusion-run',
        version: 1,
        startedAt: startedAt.toISOString(),
        finishedAt: new Date().toISOString(),
        status: 'completed',
        steps: done,
        options: recorded,
        baseModel,
        baseModelFingerprint,
        tokens,
        losses,
        learningRates: lrs,
        secondsPerStep: recent.length ? recent.reduce((a, b) => a + b, 0) / recent.length : null,
        delta: result.deltaPath,
        checkpoints,
        environment: { node: process.version, platform: `${os.platform()}-${os.arch()}`, threads: getNumThreads() },
      });
    }
    return result;
  } finally {
    step?.dispose();
    if (ownModels && models) {
      models.unet.dispose();
      models.textEncoder.dispose();
      models.vae.dispose();
    }
    if (threadsBefore !== undefined) setNumThreads(threadsBefore);
  }
}
