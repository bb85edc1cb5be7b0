/**
 * custom-diffusion: Custom Diffusion (Kumari et al., "Multi-Concept Customization of Text-to-Image
 * Diffusion", CVPR 2023) for Node.js on LibTorch.
 *
 * @packageDocumentation
 */
export * from './errors';
export { Tensor, type TensorData } from './core/tensor';
export { Generator } from './core/generator';
export {
  readSafetensorsHeader,
  loadSafetensors,
  saveSafetensors,
  type SafetensorsHeader,
  type SafetensorsEntry,
  type LoadSafetensorsOptions,
} from './core/safetensors';
export { info, setNumThreads, getNumThreads, liveTensors, type RuntimeInfo } from './core/runtime';
export type { Dtype, DeviceName } from './native';
export {
  ClipTokenizer,
  type AddedTokenOptions,
  type PaddingStrategy,
  type EncodeBatchOptions,
  type DecodeOptions,
} from './model/tokenizer';
export {
  loadTorchFile,
  flattenTensors,
  isTorchOpaque,
  isTorchDict,
  type TorchValue,
  type TorchDict,
  type TorchOpaque,
  type LoadTorchFileOptions,
} from './core/torch-file';
export { saveTorchFile, type TorchSaveValue, type SaveTorchFileOptions } from './core/torch-save';
export { TextEncoder, type TextEncoderLoadOptions, type EncodeOptions, type TextEncoderOutput } from './model/text-encoder';
export {
  AutoencoderKL,
  type VaeLoadOptions,
  type LatentDistribution,
  type VaeEncodeOptions,
  type VaeDecodeOptions,
} from './model/vae';
export { findWeightFiles, readModelIndex, type WeightFiles, type ModelIndex } from './model/files';
export { Scheduler, SCHEDULER_CLASSES, type SchedulerKind, type StepOptions } from './model/scheduler';
export {
  UNet,
  loadUNet,
  type TrainableMode,
  type UNetConfig,
  type UNetLoadOptions,
  type UNetForwardOptions,
  type UNetBackwardOptions,
  type UNetBackwardResult,
  type ParameterFilter,
  CrossAttentionContext,
  type PrepareContextOptions,
} from './model/unet';
export { StableDiffusion, type StableDiffusionLoadOptions } from './model/pipeline';
export * from './train';
export {
  readDelta,
  writeDeltaFile,
  inspectDelta,
  applyDelta,
  AppliedDelta,
  composeLayers,
  composeDeltas,
  targetPrompts,
  selectEmbeddingRows,
  embedPrompts,
  readCaptions,
  defaultRegularizationCaptionsFile,
  compressLayers,
  compressDelta,
  readForeignDelta,
  openDelta,
  compvisToDiffusersName,
  attnProcToDiffusersName,
  exportDelta,
  diffusersToCompvisName,
  diffusersToAttnProcName,
  DELTA_EXPORT_FORMATS,
  loraKeyOf,
  embeddingTriggerOf,
  type Delta,
  type DeltaKind,
  type DeltaTokenInfo,
  type WriteDeltaFileOptions,
  type ApplyTargets,
  type ApplyOptions,
  type ComposeDeltasOptions,
  type ComposeDeltasResult,
  type CompressOptions,
  type CompressDeltaOptions,
  type CompressDeltaResult,
  type ForeignDeltaFormat,
  type DeltaExportFormat,
  type ExportDeltaOptions,
  type ExportDeltaResult,
  type ExportedToken,
  type LoraExportOptions,
  type LoraLayerInfo,
} from './delta';
export * from './sample';
export * from './toy';
export * from './demo';
export * from './pretrain';
