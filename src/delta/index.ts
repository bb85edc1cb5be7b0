/**
 * Custom Diffusion deltas: reading/inspecting, applying/unapplying, multi-concept merging (closed
 * form) and low-rank compression.
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
