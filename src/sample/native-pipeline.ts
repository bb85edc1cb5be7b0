/**
 * The addon's `pipeline` object (native/pipelines/bind_pipeline.cc): the denoising loop of
 * StableDiffusionPipeline on a worker thread, and the small tensor helpers generation needs.
 */
import { nativeAs, type NativeCancelToken, type NativeGenerator, type NativeProgress, type NativeTensor } from '../native';

export interface NativeDenoiseOptions {
  guidanceScale: number;
  steps: number;
  eta?: number;
  generators?: NativeGenerator[];
  previewEvery?: number;
}

export interface PipelineBinding {
  pipeline: {
    denoise(
      unet: unknown,
      schedulerKind: string,
      schedulerConfig: string,
      latents: NativeTensor,
      conditioning: unknown, // a NativeTensor [B, L, D] or a UNet cross-attention context handle
      options: NativeDenoiseOptions,
      onProgress?: (p: NativeProgress) => void,
      cancel?: NativeCancelToken,
    ): Promise<NativeTensor>;
    cat(tensors: NativeTensor[], dim: number): NativeTensor;
    divide(x: NativeTensor, s: number): NativeTensor;
    denormalize(decoded: NativeTensor): NativeTensor;
    toUint8(images01: NativeTensor): Buffer[];
  };
}

export function pipelineBinding(): PipelineBinding['pipeline'] {
  return nativeAs<PipelineBinding>().pipeline;
}
