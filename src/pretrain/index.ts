/**
 * Pretraining a small Stable Diffusion pipeline from scratch with the library's own native models:
 * the train-all-weights mode ({@link DiffusionPretrainer}, {@link VaePretrainer}), configs and a
 * seeded initialisation for tiny pipelines, a diffusers-folder writer, and the toy-world recipe of
 * the embedded default model ({@link pretrainToy}).
 *
 * @packageDocumentation
 */
export {
  DiffusionPretrainer,
  VaePretrainer,
  modelTensors,
  type PretrainOptimizerOptions,
  type DiffusionPretrainOptions,
  type VaePretrainOptions,
  type DiffusionBatch,
  type VaeBatch,
  type PretrainStepResult,
} from './trainer';
export {
  TOY_PIPELINE_CONFIG,
  unetConfigJson,
  vaeConfigJson,
  textEncoderConfigJson,
  schedulerConfigJson,
  modelIndexJson,
  unetParameters,
  vaeParameters,
  textEncoderParameters,
  parameterCount,
  initParameters,
  type TinyPipelineConfig,
  type ParameterSpec,
  type ParameterInit,
} from './architecture';
export { writePipelineFolder, replaceFolder, folderSize, TOKENIZER_FILES, type PipelineFolderContents } from './folder';
export {
  pretrainToy,
  evaluateToyModel,
  type ToyPretrainOptions,
  type ToyPretrainEvent,
  type ToyPretrainResult,
  type ToyVaePhaseOptions,
  type ToyUnetPhaseOptions,
  type ToyEvalOptions,
  type PhaseReport,
  type ToyEvaluation,
} from './toy';
