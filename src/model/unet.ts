/**
 * The denoiser of Stable Diffusion: diffusers' `UNet2DConditionModel`, loaded from a pipeline's
 * `unet/` folder with its own parameter names and run in LibTorch.
 *
 * - {@link UNet.forward} predicts the noise (or v) for latents at given timesteps and text context,
 *   exactly as `unet(sample, timestep, encoder_hidden_states).sample` does.
 * - {@link UNet.setTrainable} chooses Custom Diffusion's trainable parameters (`crossattn_kv`: the
 *   cross-attention key/value projections; `crossattn`: every cross-attention parameter); everything
 *   else is frozen, so autograd does no work for it.
 * - {@link UNet.forwardBackward} runs a forward and a backward pass and hands back the gradients of
 *   the trainable parameters, optionally with Custom Diffusion's start-token detach.
 * - {@link UNet.prepareContext} computes every cross-attention's keys and values for a prompt batch
 *   once, for all denoising steps, and lets each row of one batch use its own concept's K/V weights.
 *
 * @packageDocumentation
 */

import * as path from 'path';
import { callAsync, callSync, nativeAs, type DeviceName, type Dtype, type NativeTensor } from '../native';
import { DisposedError, InvalidArgumentError } from '../errors';
import { Tensor } from '../core/tensor';
import { findWeightFiles, readConfigText } from './files';

/** Which UNet parameters train: Custom Diffusion's `freeze_model`. */
export type TrainableMode = 'crossattn_kv' | 'crossattn' | 'none';

interface NativeUNetInfo {
  inChannels: number;
  outChannels: number;
  crossAttentionDim: number;
  blockOutChannels: number[];
  layersPerBlock: number[];
  attentionHeads: number[];
  sampleSize: number[];
  useLinearProjection: boolean;
  upcastAttention: boolean;
  dtype: Dtype;
  device: string;
  trainable: TrainableMode;
  parameterCount: number;
}

/** What native/models/bind_unet.cc registers as `unet`. */
interface UNetBinding {
  unet: {
    load(configText: string, files: string[], options: { dtype?: Dtype; device?: DeviceName; configFile?: string }): Promise<unknown>;
    prepareContext(
      handle: unknown,
      encoderHiddenStates: NativeTensor,
      weightSets: Record<string, NativeTensor>[] | undefined,
      assignment: number[] | undefined,
    ): Promise<unknown>;
    disposeContext(context: unknown): void;
    forward(
      handle: unknown,
      sample: NativeTensor,
      timesteps: NativeTensor,
      encoderHiddenStates: unknown, // a NativeTensor or a prepareContext handle
      options: { bosDetach?: boolean },
    ): Promise<NativeTensor>;
    forwardBackward(
      handle: unknown,
      sample: NativeTensor,
      timesteps: NativeTensor,
      encoderHiddenStates: NativeTensor,
      gradOut: NativeTensor,
      options: { bosDetach?: boolean; ctxRequiresGrad?: boolean; gradientCheckpointing?: boolean },
    ): Promise<{ out: NativeTensor; grads: Record<string, NativeTensor>; gradEncoderHiddenStates?: NativeTensor; checkpointedSegments: number }>;
    setTrainable(handle: unknown, mode: TrainableMode): void;
    parameters(handle: unknown, trainableOnly: boolean): Record<string, NativeTensor>;
    info(handle: unknown): NativeUNetInfo;
    dispose(handle: unknown): void;
  };
}

function binding(): UNetBinding['unet'] {
  return nativeAs<UNetBinding>().unet;
}

/** Options of {@link loadUNet}. */
export interface UNetNativeLoadOptions {
  /** Floating-point dtype the weights are converted to. Default `float32`. */
  dtype?: Dtype;
  /** Device the weights are placed on. Default `cpu`. */
  device?: DeviceName;
  /** How error messages name the config (default `config.json`). */
  configFile?: string;
}

/** Options of {@link UNet.load}. */
export interface UNetLoadOptions {
  /** Floating-point dtype the weights are converted to. Default `float32`. */
  dtype?: Dtype;
  /** Device the weights are placed on. Default `cpu`. */
  device?: DeviceName;
  /** Load `diffusion_pytorch_model.<variant>.safetensors` (e.g. `fp16`). */
  variant?: string;
}

/** The parts of the config other code needs. */
export interface UNetConfig {
  inChannels: number;
  outChannels: number;
  /** Width of the text context (768 for SD1, 1024 for SD2). */
  crossAttentionDim: number;
  blockOutChannels: number[];
  layersPerBlock: number[];
  /** Heads per down block (the config's `attention_head_dim`, which counts heads). */
  attentionHeads: number[];
  /** The config's `sample_size` ([] when absent, [s] or [h, w]): the default latent size. */
  sampleSize: number[];
  useLinearProjection: boolean;
  upcastAttention: boolean;
}

/** Options of {@link UNet.forward}. */
export interface UNetForwardOptions {
  /** Detach the cross-attention keys and values of token 0 (no effect on the values). */
  bosDetach?: boolean;
}

/** Options of {@link UNet.prepareContext}. */
export interface PrepareContextOptions {
  /**
   * Replacement cross-attention key/value weights, one set per concept: diffusers name
   * (`…attn2.to_k.weight` / `…attn2.to_v.weight`) → a tensor of that layer's shape (any float dtype
   * or device: it is converted to the model's). A set may hold only some layers; the others keep the
   * model's own weights. A Custom Diffusion delta's `weights` is such a set.
   */
  weightSets?: Array<Record<string, Tensor>>;
  /**
   * One entry per row of `encoderHiddenStates`: the index of the weight set the row uses, or -1 for
   * the model's own weights. Default: all -1 without weight sets, all 0 with exactly one set; with
   * several sets it is required.
   */
  assignment?: number[];
}

/**
 * Every cross-attention's keys and values for one batch of text, made by {@link UNet.prepareContext}
 * and passed to {@link UNet.forward} in place of the text: a sampling loop then projects the prompt
 * once rather than at each step. It belongs to the UNet that made it and holds the K/V weights as they
 * were when it was made. Free it with {@link dispose} (the garbage collector frees forgotten ones).
 */
export class CrossAttentionContext {
  /** The number of rows: the batch size of every forward pass it is used in. */
  readonly batchSize: number;
  /** Text tokens per row. */
  readonly tokens: number;

  /** @internal */
  readonly handle: unknown;
  private isDisposed = false;

  /** @internal */
  constructor(handle: unknown, batchSize: number, tokens: number) {
    this.handle = handle;
    this.batchSize = batchSize;
    this.tokens = tokens;
  }

  get disposed(): boolean {
    return this.isDisposed;
  }

  /** Frees the keys and values (once passes that use them finish). Later forward calls throw a DisposedError. */
  dispose(): void {
    if (this.isDisposed) return;
    this.isDisposed = true;
    callSync(() => binding().disposeContext(this.handle));
  }
}

/** Options of {@link UNet.forwardBackward}. */
export interface UNetBackwardOptions {
  /**
   * Custom Diffusion's training attention: in every cross-attention the key and value rows of token 0
   * (the start token) are detached. The output is unchanged; W_k, W_v and the context receive no
   * gradient through token 0.
   */
  bosDetach?: boolean;
  /** Also return the gradient of `encoderHiddenStates` (for training the text encoder's token rows). */
  ctxRequiresGrad?: boolean;
  /**
   * Keep only each resnet's and transformer's inputs and recompute the block in the backward pass
   * (diffusers' `enable_gradient_checkpointing()`): the same gradients with less memory, for about
   * one more forward pass of time.
   */
  gradientCheckpointing?: boolean;
}

export interface UNetBackwardResult {
  /** The forward output (no autograd history). */
  out: Tensor;
  /** d(sum(out · gradOut)) / dθ for exactly the trainable parameters, by diffusers name. */
  grads: Record<string, Tensor>;
  /** d(sum(out · gradOut)) / d encoderHiddenStates, when `ctxRequiresGrad` was set. */
  gradEncoderHiddenStates?: Tensor;
  /** Resnets and transformers that ran checkpointed (0 without `gradientCheckpointing`). */
  checkpointedSegments: number;
}

/** A parameter filter: a substring, a regular expression or a predicate on the diffusers name. */
export type ParameterFilter = string | RegExp | ((name: string) => boolean);

function matches(filter: ParameterFilter | undefined, name: string): boolean {
  if (filter === undefined) return true;
  if (typeof filter === 'string') return name.includes(filter);
  if (filter instanceof RegExp) return filter.test(name);
  return filter(name);
}

function timestepTensor(t: Tensor | number): Tensor {
  if (t instanceof Tensor) return t;
  if (typeof t !== 'number' || !Number.isFinite(t)) {
    throw new InvalidArgumentError('timesteps must be a Tensor or a finite number');
  }
  // As diffusers' get_time_embed: a Python int becomes int64, a float becomes float64.
  return Number.isInteger(t)
    ? Tensor.fromArray(new BigInt64Array([BigInt(t)]), [1])
    : Tensor.fromArray(new Float64Array([t]), [1]);
}

function requireTensor(t: unknown, what: string): asserts t is Tensor {
  if (!(t instanceof Tensor)) throw new InvalidArgumentError(`${what} must be a Tensor`);
}

/**
 * Loads a UNet from the text of its config.json and its weights: safetensors files (one file or the
 * shards of one checkpoint) or torch.save pickles (`.bin`). The weights are converted to `dtype`
 * (default float32) on `device`.
 *
 * @throws ModelError `MODEL_CONFIG` naming every config option that is unknown or not implemented (it
 *   would change the computation); `MODEL_WEIGHTS` listing every missing, unexpected and mis-shaped key.
 */
export async function loadUNet(
  configJsonText: string,
  weightFiles: string[],
  options: UNetNativeLoadOptions = {},
): Promise<UNet> {
  if (typeof configJsonText !== 'string') throw new InvalidArgumentError('configJsonText must be a string');
  if (!Array.isArray(weightFiles) || weightFiles.length === 0 || weightFiles.some((f) => typeof f !== 'string')) {
    throw new InvalidArgumentError('weightFiles must be a non-empty array of paths');
  }
  const files = weightFiles.map((f) => path.resolve(f));
  const handle = await callAsync(() => binding().load(configJsonText, files, options));
  return new UNet(handle);
}

/**
 * A loaded UNet2DConditionModel. Load it with {@link UNet.load} (a diffusers `unet/` folder) or
 * {@link loadUNet}; free it with {@link UNet.dispose}.
 */
export class UNet {
  readonly config: UNetConfig;
  readonly dtype: Dtype;
  readonly device: string;
  /** Number of parameter elements. */
  readonly parameterCount: number;

  private readonly handle: unknown;
  private disposed = false;

  /** @internal */
  constructor(handle: unknown) {
    this.handle = handle;
    const info = callSync(() => binding().info(handle));
    this.config = {
      inChannels: info.inChannels,
      outChannels: info.outChannels,
      crossAttentionDim: info.crossAttentionDim,
      blockOutChannels: info.blockOutChannels,
      layersPerBlock: info.layersPerBlock,
      attentionHeads: info.attentionHeads,
      sampleSize: info.sampleSize,
      useLinearProjection: info.useLinearProjection,
      upcastAttention: info.upcastAttention,
    };
    this.dtype = info.dtype;
    this.device = info.device;
    this.parameterCount = info.parameterCount;
  }

  /**
   * Loads `<folder>/config.json` and `<folder>/diffusion_pytorch_model.safetensors` (with `variant:
   * 'fp16'`, `diffusion_pytorch_model.fp16.safetensors`; sharded checkpoints through their
   * `*.safetensors.index.json`). Folders with only `diffusion_pytorch_model.bin` (torch.save) are read
   * by the restricted unpickler.
   *
   * @throws ModelError as {@link loadUNet}.
   * @throws PickleError when a `.bin` file is damaged or unsafe.
   * @throws FileError when the folder, its config or its weights are missing.
   */
  static async load(folder: string, options: UNetLoadOptions = {}): Promise<UNet> {
    const dir = path.resolve(folder);
    const configText = readConfigText(dir);
    const { files } = findWeightFiles(dir, 'diffusion_pytorch_model', { variant: options.variant });
    return loadUNet(configText, files, {
      dtype: options.dtype,
      device: options.device,
      configFile: path.join(dir, 'config.json'),
    });
  }

  /** The current trainable set. */
  get trainable(): TrainableMode {
    return callSync(() => binding().info(this.handle)).trainable;
  }

  /**
   * `unet(sample, timesteps, encoderHiddenStates).sample`, with no autograd history.
   *
   * @param sample latents `[B, inChannels, H, W]` (any H, W: odd sizes are handled as diffusers does).
   * @param timesteps `[B]`, `[1]` or a scalar tensor, integer or real (one value is used for the whole
   *   batch), or a number.
   * @param encoderHiddenStates text context `[B, tokens, crossAttentionDim]`, or a
   *   {@link CrossAttentionContext} of this UNet with `batchSize` B (the result is then bit for bit
   *   the one with the text it was prepared from and the weights it was prepared with).
   * @returns `[B, outChannels, H, W]` in the model's dtype, on its device.
   * @throws InvalidArgumentError for mis-shaped inputs, or a context of another UNet or batch size.
   * @throws DisposedError when the model or the context was disposed.
   */
  async forward(
    sample: Tensor,
    timesteps: Tensor | number,
    encoderHiddenStates: Tensor | CrossAttentionContext,
    options: UNetForwardOptions = {},
  ): Promise<Tensor> {
    requireTensor(sample, 'sample');
    let context: unknown;
    if (encoderHiddenStates instanceof CrossAttentionContext) {
      if (encoderHiddenStates.disposed) throw new DisposedError('This cross-attention context was disposed; it can no longer be used.');
      context = encoderHiddenStates.handle;
    } else {
      requireTensor(encoderHiddenStates, 'encoderHiddenStates');
      context = encoderHiddenStates.handle;
    }
    const t = timestepTensor(timesteps);
    const out = await callAsync(() =>
      binding().forward(this.handle, sample.handle, t.handle, context, {
        bosDetach: options.bosDetach === true,
      }),
    );
    return new Tensor(out);
  }

  /**
   * Computes the keys and values of every cross-attention for `encoderHiddenStates` once, to pass to
   * {@link forward} at every denoising step instead of the text.
   *
   * With `weightSets` and `assignment`, rows of one batch use different concepts' K/V weights (the
   * only weights Custom Diffusion trains): row b is computed with `weightSets[assignment[b]]` where
   * that set has a layer and with the model's own weights elsewhere, so a forward pass on the context
   * equals, row by row, separate passes with each set's weights put into the model. Each layer does
   * one product per distinct weight among the rows; the model's weights are not copied or changed.
   * Inference only (no autograd).
   *
   * @param encoderHiddenStates text context `[B, tokens, crossAttentionDim]`.
   * @throws InvalidArgumentError naming the problem: a mis-shaped context, an assignment of the wrong
   *   length or out of range, a weight name that is not an `attn2.to_k`/`attn2.to_v` weight of this
   *   UNet, or a weight of the wrong shape.
   */
  async prepareContext(encoderHiddenStates: Tensor, options: PrepareContextOptions = {}): Promise<CrossAttentionContext> {
    requireTensor(encoderHiddenStates, 'encoderHiddenStates');
    const { weightSets, assignment } = options;
    let sets: Record<string, NativeTensor>[] | undefined;
    if (weightSets !== undefined) {
      if (!Array.isArray(weightSets)) throw new InvalidArgumentError('weightSets must be an array of {name: Tensor} objects');
      sets = weightSets.map((set, s) => {
        if (typeof set !== 'object' || set === null || Array.isArray(set)) {
          throw new InvalidArgumentError(`weightSets[${s}] must be a {name: Tensor} object`);
        }
        const out: Record<string, NativeTensor> = {};
        for (const [name, w] of Object.entries(set)) {
          requireTensor(w, `weightSets[${s}]["${name}"]`);
          out[name] = w.handle;
        }
        return out;
      });
    }
    if (assignment !== undefined) {
      if (!Array.isArray(assignment) || assignment.some((a) => !Number.isInteger(a))) {
        throw new InvalidArgumentError('assignment must be an array of integers');
      }
    }
    const handle = await callAsync(() => binding().prepareContext(this.handle, encoderHiddenStates.handle, sets, assignment));
    const [batch, tokens] = encoderHiddenStates.shape;
    return new CrossAttentionContext(handle, batch, tokens);
  }

  /**
   * A forward pass, then the backward pass of `loss = sum(out · gradOut)` (i.e. `out.backward(gradOut)`).
   * Returns the gradients of exactly the trainable parameters ({@link setTrainable}); the parameters'
   * own gradient fields are empty before and after. Calls on one model run one at a time.
   */
  async forwardBackward(
    sample: Tensor,
    timesteps: Tensor | number,
    encoderHiddenStates: Tensor,
    gradOut: Tensor,
    options: UNetBackwardOptions = {},
  ): Promise<UNetBackwardResult> {
    requireTensor(sample, 'sample');
    requireTensor(encoderHiddenStates, 'encoderHiddenStates');
    requireTensor(gradOut, 'gradOut');
    const t = timestepTensor(timesteps);
    const r = await callAsync(() =>
      binding().forwardBackward(this.handle, sample.handle, t.handle, encoderHiddenStates.handle, gradOut.handle, {
        bosDetach: options.bosDetach === true,
        ctxRequiresGrad: options.ctxRequiresGrad === true,
        gradientCheckpointing: options.gradientCheckpointing === true,
      }),
    );
    const grads: Record<string, Tensor> = {};
    for (const [name, g] of Object.entries(r.grads)) grads[name] = new Tensor(g);
    const result: UNetBackwardResult = { out: new Tensor(r.out), grads, checkpointedSegments: r.checkpointedSegments };
    if (r.gradEncoderHiddenStates) result.gradEncoderHiddenStates = new Tensor(r.gradEncoderHiddenStates);
    return result;
  }

  /**
   * Makes exactly the parameters of `mode` trainable (requires_grad) and freezes every other one.
   *
   * @throws NativeError `MODEL_BUSY` while a forward pass of this model is running.
   */
  setTrainable(mode: TrainableMode): void {
    if (mode !== 'crossattn_kv' && mode !== 'crossattn' && mode !== 'none') {
      throw new InvalidArgumentError(`mode must be 'crossattn_kv', 'crossattn' or 'none', not ${String(mode)}`);
    }
    callSync(() => binding().setTrainable(this.handle, mode));
  }

  /**
   * The trainable parameters by diffusers name (optionally filtered). The tensors are the model's own
   * (same storage): writing into them changes the model.
   */
  parameters(filter?: ParameterFilter): Record<string, Tensor> {
    return this.collect(true, filter);
  }

  /** Every parameter by diffusers name (optionally filtered), trainable or not; the model's own tensors. */
  allParameters(filter?: ParameterFilter): Record<string, Tensor> {
    return this.collect(false, filter);
  }

  private collect(trainableOnly: boolean, filter?: ParameterFilter): Record<string, Tensor> {
    const raw = callSync(() => binding().parameters(this.handle, trainableOnly));
    const out: Record<string, Tensor> = {};
    for (const [name, t] of Object.entries(raw)) if (matches(filter, name)) out[name] = new Tensor(t);
    return out;
  }

  /** Frees the weights (once running calls finish). Later calls throw a DisposedError. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    callSync(() => binding().dispose(this.handle));
  }
}
