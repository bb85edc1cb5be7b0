/**
 * Custom Diffusion deltas: reading/inspecting, applying/unapplying, multi-concept merging (closed
 * form), low-rank compression, and export to the original, diffusers and LoRA formats.
 *
 * @packageDocumentation
 */
export { readDelta, writeDeltaFile, inspectDelta, DELTA_FORMAT, type Delta, type DeltaKind, type DeltaTokenInfo, type WriteDeltaFileOptions } from './file';
export { applyDelta, AppliedDelta, DeltaMismatchError, type ApplyTargets, type ApplyOptions } from './apply';
export {
  composeLayers,
  composeDeltas,
  targetPrompts,
  selectEmbeddingRows,
  embedPrompts,
  readCaptions,
  defaultRegularizationCaptionsFile,
  type ComposeConceptInput,
  type ComposeLayerReport,
  type ComposeLayersResult,
  type ComposeLayersOptions,
  type ComposeDeltasOptions,
  type ComposeDeltasResult,
  type ComposeConceptRecord,
} from './compose';
export {
  compressLayers,
  compressDelta,
  type CompressOptions,
  type CompressedLayer,
  type CompressDeltaOptions,
  type CompressDeltaResult,
} from './compress';
export {
  readForeignDelta,
  openDelta,
  compvisToDiffusersName,
  attnProcToDiffusersName,
  type ForeignDeltaFormat,
  type ReadForeignOptions,
} from './foreign';
export {
  exportDelta,
  diffusersToCompvisName,
  diffusersToAttnProcName,
  DELTA_EXPORT_FORMATS,
  type DeltaExportFormat,
  type ExportDeltaOptions,
  type ExportDeltaResult,
  type ExportedToken,
} from './export';
export { loraKeyOf, embeddingTriggerOf, type LoraExportOptions, type LoraLayerInfo } from './lora';
