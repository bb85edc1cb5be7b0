/**
 * The VAE of Stable Diffusion: diffusers' `AutoencoderKL`, loaded from a pipeline's `vae/` folder with
 * its own parameter names and run in LibTorch.
 *
 * - {@link AutoencoderKL.encode} maps images in [-1, 1] to the diagonal Gaussian posterior (`mean`,
 *   `logvar` clamped to [-30, 20], `std = exp(logvar / 2)`); {@link AutoencoderKL.sample} draws
 *   `mean + std · noise`. Training latents are that sample times {@link AutoencoderKL.scalingFactor}.
 * - {@link AutoencoderKL.decode} maps latents back to images (divide by `scalingFactor` first).
 *   `slice` decodes one latent at a time (same result, a fraction of the memory: a batch of four
 *   512 px images needs the activation memory of one); `tile` decodes overlapping tiles and blends
 *   them as diffusers' `tiled_decode` does (for images larger than the VAE's `sample_size`).
 *
 * @packageDocumentation
 */

import * as path from 'path';
import {
  callAsync,
  callCancellable,
  callSync,
  nativeAs,
  type DeviceName,
  type Dtype,
  type NativeCancelToken,
  type NativeGenerator,
  type NativeTensor,
} from '../native';
import { InvalidArgumentError } from '../errors';
import { findWeightFiles, readConfigText } from './files';
import { Tensor } from '../core/tensor';
import type { Generator } from '../core/generator';

interface NativeVaeInfo {
  handle: unknown;
  scalingFactor: number;
  latentChannels: number;
  inChannels: number;
  outChannels: number;
  spatialFactor: number;
  sampleSize: number;
  forceUpcast: boolean;
  dtype: Dtype;
  device: string;
}

/** What native/models/bind_vae.cc registers as `vae`. */
interface VaeBinding {
  vae: {
    load(
      configText: string,
      weightFiles: string[],
      options: { dtype?: Dtype; device?: DeviceName; configFile?: string },
    ): Promise<NativeVaeInfo>;
    encode(
      handle: unknown,
      images: NativeTensor,
      options: { slice?: boolean },
      token?: NativeCancelToken,
    ): Promise<{ mean: NativeTensor; logvar: NativeTensor; std: NativeTensor }>;
    sample(mean: NativeTensor, std: NativeTensor, noise?: NativeTensor, generator?: NativeGenerator): NativeTensor;
    decode(
      handle: unknown,
      latents: NativeTensor,
      options: { slice?: boolean; tile?: boolean },
      token?: NativeCancelToken,
    ): Promise<NativeTensor>;
    dispose(handle: unknown): void;
  };
}

function binding(): VaeBinding['vae'] {
  return nativeAs<VaeBinding>().vae;
}

/** Options of {@link AutoencoderKL.load}. */
export interface VaeLoadOptions {
  /** Floating-point dtype the weights are converted to. Default `float32`. */
  dtype?: Dtype;
  /** Device the weights are placed on. Default `cpu`. */
  device?: DeviceName;
  /** Load `diffusion_pytorch_model.<variant>.safetensors` (e.g. `fp16`). */
  variant?: string;
}

/** The posterior of {@link AutoencoderKL.encode}: a diagonal Gaussian per latent element. */
export interface LatentDistribution {
  /** `[B, latentChannels, H/f, W/f]`. */
  mean: Tensor;
  /** Log-variance, clamped to [-30, 20]. */
  logvar: Tensor;
  /** `exp(logvar / 2)`. */
  std: Tensor;
}

/** Options of {@link AutoencoderKL.encode}. */
export interface VaeEncodeOptions {
  /** Encode one image at a time (same result, less memory). */
  slice?: boolean;
  /** Cancels the work between images. */
  signal?: AbortSignal;
}

/** Options of {@link AutoencoderKL.decode}. */
export interface VaeDecodeOptions {
  /** Decode one latent at a time (same result within float rounding, less memory). */
  slice?: boolean;
  /**
   * Decode in overlapping tiles of `sampleSize` pixels blended linearly over a quarter tile, as
   * diffusers' `enable_tiling()` does, when a latent side exceeds `sampleSize / spatialFactor`.
   * Memory stays bounded for any size, but the result differs from an untiled decode (the mid-block
   * attention and the convolutions near tile borders see only their tile).
   */
  tile?: boolean;
  /** Cancels the work between slices or tiles. */
  signal?: AbortSignal;
}

/**
 * A loaded Stable Diffusion VAE. Load it with {@link AutoencoderKL.load}; free it with
 * {@link AutoencoderKL.dispose}.
 */
export class AutoencoderKL {
  /** Latents are `scalingFactor ×` the posterior sample (0.18215 for SD1/SD2). */
  readonly scalingFactor: number;
  /** Channels of the latents (4). */
  readonly latentChannels: number;
  /** Channels of the images (3). */
  readonly inChannels: number;
  readonly outChannels: number;
  /** Image size / latent size (8 for SD; 2^(number of blocks - 1)). */
  readonly spatialFactor: number;
  /** The config's `sample_size`: the tile size in pixels of tiled decoding. */
  readonly sampleSize: number;
  /** The config's `force_upcast`: diffusers pipelines run this VAE in float32 even for float16 models. */
  readonly forceUpcast: boolean;
  readonly dtype: Dtype;
  readonly device: string;

  private readonly handle: unknown;
  private disposed = false;

  private constructor(info: NativeVaeInfo) {
    this.handle = info.handle;
    this.scalingFactor = info.scalingFactor;
    this.latentChannels = info.latentChannels;
    this.inChannels = info.inChannels;
    this.outChannels = info.outChannels;
    this.spatialFactor = info.spatialFactor;
    this.sampleSize = info.sampleSize;
    this.forceUpcast = info.forceUpcast;
    this.dtype = info.dtype;
    this.device = info.device;
  }

  /**
   * Loads `<folder>/config.json` and `<folder>/diffusion_pytorch_model.safetensors` (or its variant or
   * shards). Old attention names (`query`, `key`, `value`, `proj_attn`) are mapped to the current ones.
   *
   * @throws ModelError `MODEL_CONFIG` for options that are not implemented (e.g. a non-null
   *   `shift_factor`) or unknown keys; `MODEL_WEIGHTS` for missing, unexpected or mis-shaped keys (all
   *   listed); PickleError when a `.bin` pickle is damaged or unsafe.
   * @throws FileError when the folder, its config or its weights file is missing.
   */
  static async load(folder: string, options: VaeLoadOptions = {}): Promise<AutoencoderKL> {
    const dir = path.resolve(folder);
    const configText = readConfigText(dir);
    const { files } = findWeightFiles(dir, 'diffusion_pytorch_model', { variant: options.variant });
    const info = await callAsync(() =>
      binding().load(configText, files, { dtype: options.dtype, device: options.device, configFile: path.join(dir, 'config.json') }),
    );
    return new AutoencoderKL(info);
  }

  /** Encodes images `[B, 3, H, W]` in [-1, 1] into the latent posterior (no gradients recorded). */
  async encode(images: Tensor, options: VaeEncodeOptions = {}): Promise<LatentDistribution> {
    if (!(images instanceof Tensor)) throw new InvalidArgumentError('images must be a Tensor');
    const r = await callCancellable(options.signal, (token) =>
      binding().encode(this.handle, images.handle, { slice: options.slice === true }, token),
    );
    return { mean: new Tensor(r.mean), logvar: new Tensor(r.logvar), std: new Tensor(r.std) };
  }

  /**
   * Draws a latent from the posterior: `mean + std · noise`. Without `noise`, it is drawn from
   * `generator` (on the generator's device, then moved, as diffusers' `randn_tensor`) or from
   * LibTorch's default generator.
   */
  sample(dist: LatentDistribution, options: { noise?: Tensor; generator?: Generator } = {}): Tensor {
    const { noise, generator } = options;
    if (noise !== undefined && !(noise instanceof Tensor)) throw new InvalidArgumentError('noise must be a Tensor');
    return new Tensor(
      callSync(() => binding().sample(dist.mean.handle, dist.std.handle, noise?.handle, generator?.handle)),
    );
  }

  /**
   * Decodes latents `[B, latentChannels, h, w]` (used as given: divide by {@link scalingFactor}
   * first) into images `[B, outChannels, h·f, w·f]`, roughly in [-1, 1] (not clamped).
   */
  async decode(latents: Tensor, options: VaeDecodeOptions = {}): Promise<Tensor> {
    if (!(latents instanceof Tensor)) throw new InvalidArgumentError('latents must be a Tensor');
    const opts = { slice: options.slice === true, tile: options.tile === true };
    const t = await callCancellable(options.signal, (token) => binding().decode(this.handle, latents.handle, opts, token));
    return new Tensor(t);
  }

  /** Frees the weights (once running calls finish). Later calls throw a DisposedError. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    callSync(() => binding().dispose(this.handle));
  }
}
