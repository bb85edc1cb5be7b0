/**
 * Generation: text to image with Custom Diffusion concepts per request, mixed-concept batches,
 * image files with their parameters, and class images for prior preservation.
 *
 * @packageDocumentation
 */
export {
  generate,
  generateBatch,
  parametersText,
  type GenerationModels,
  type GenerationRequest,
  type GenerationSettings,
  type GenerateOptions,
  type GenerateBatchOptions,
  type GenerationProgress,
  type GenerationParameters,
  type GeneratedImage,
  type GenerationResult,
} from './generate';
export {
  encodeImage,
  saveImage,
  makeGrid,
  readPngText,
  formatOfFile,
  type ImageFormat,
  type EncodeImageOptions,
  type SaveImageOptions,
  type GridOptions,
} from './images';
export { JobQueue } from './queue';
export {
  generateClassImages,
  type ClassImagesOptions,
  type ClassImagesProgress,
  type ClassImagesResult,
} from './class-images';
