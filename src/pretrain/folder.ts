/**
 * Writing a diffusers-layout Stable Diffusion folder from loaded (or freshly initialised) weights:
 * model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/, each with its config and
 * a safetensors file, exactly what {@link StableDiffusion.load} (and diffusers'
 * StableDiffusionPipeline.from_pretrained) reads.
 */
import * as fs from 'fs';
import * as path from 'path';
import { FileError, InvalidArgumentError } from '../errors';
import { Tensor } from '../core/tensor';
import { saveSafetensors } from '../core/safetensors';
import { TEXT_ENCODER_FLOAT_KEYS } from './architecture';

/** The tokenizer files a diffusers `tokenizer/` folder holds. */
export const TOKENIZER_FILES = ['vocab.json', 'merges.txt', 'tokenizer_config.json', 'special_tokens_map.json'] as const;

export interface PipelineFolderContents {
  modelIndex: Record<string, unknown>;
  unet: { config: Record<string, unknown>; tensors: Record<string, Tensor> };
  vae: { config: Record<string, unknown>; tensors: Record<string, Tensor> };
  textEncoder: { config: Record<string, unknown>; tensors: Record<string, Tensor> };
  scheduler: Record<string, unknown>;
  /** A folder holding {@link TOKENIZER_FILES} (copied byte for byte). */
  tokenizerDir: string;
  /** Extra top-level JSON files (e.g. how the model was made). */
  extraJson?: Record<string, unknown>;
}

/**
 * Writes JSON as Python's json module would: `floatKeys` (top-level keys) keep a decimal point when
 * their value is a whole number (1.0, not 1). transformers 5 checks config fields' types and
 * refuses an int where CLIPTextConfig declares a float.
 */
function writeJson(file: string, value: unknown, floatKeys: readonly string[] = []): void {
  let text = JSON.stringify(value, null, 2);
  for (const key of floatKeys) text = text.replace(new RegExp(`^(  "${key}": -?\\d+)(,?)$`, 'm'), '$1.0$2');
  fs.writeFileSync(file, text + '\n');
}

async function saveWeights(file: string, tensors: Record<string, Tensor>, dtype: 'float16' | 'float32'): Promise<void> {
  const out: Record<string, Tensor> = {};
  // Sorted keys: the file's bytes depend on the weights only, not on the order a map was filled in.
  for (const name of Object.keys(tensors).sort()) {
    const t = tensors[name];
    out[name] = t.dtype === dtype ? t : await t.to({ dtype });
  }
  await saveSafetensors(file, out, { format: 'pt' });
}

/**
 * Writes the folder `dir` (which must not exist yet; its parent must). Weights are stored as
 * `dtype` (default float16: half the size, loaded back as float32 by default).
 */
export async function writePipelineFolder(
  dir: string,
  contents: PipelineFolderContents,
  options: { dtype?: 'float16' | 'float32' } = {},
): Promise<void> {
  const dtype = options.dtype ?? 'float16';
  if (dtype !== 'float16' && dtype !== 'float32') throw new InvalidArgumentError(`dtype must be float16 or float32, not ${String(dtype)}`);
  if (fs.existsSync(dir)) throw new FileError(`${dir} already exists`, dir);
  for (const f of TOKENIZER_FILES) {
    const src = path.join(contents.tokenizerDir, f);
    if (!fs.existsSync(src)) throw new FileError(`The tokenizer file ${src} does not exist`, src);
  }
  fs.mkdirSync(dir);
  for (const sub of ['unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler']) fs.mkdirSync(path.join(dir, sub));
  writeJson(path.join(dir, 'model_index.json'), contents.modelIndex);
  writeJson(path.join(dir, 'unet', 'config.json'), contents.unet.config);
  writeJson(path.join(dir, 'vae', 'config.json'), contents.vae.config);
  writeJson(path.join(dir, 'text_encoder', 'config.json'), contents.textEncoder.config, TEXT_ENCODER_FLOAT_KEYS);
  writeJson(path.join(dir, 'scheduler', 'scheduler_config.json'), contents.scheduler);
  for (const f of TOKENIZER_FILES) fs.copyFileSync(path.join(contents.tokenizerDir, f), path.join(dir, 'tokenizer', f));
  for (const [name, value] of Object.entries(contents.extraJson ?? {})) writeJson(path.join(dir, name), value);
  await saveWeights(path.join(dir, 'unet', 'diffusion_pytorch_model.safetensors'), contents.unet.tensors, dtype);
  await saveWeights(path.join(dir, 'vae', 'diffusion_pytorch_model.safetensors'), contents.vae.tensors, dtype);
  await saveWeights(path.join(dir, 'text_encoder', 'model.safetensors'), contents.textEncoder.tensors, dtype);
}

/**
 * Puts the finished folder `staged` in place of `target`: a plain rename when `target` does not
 * exist, otherwise the old folder is renamed aside first and deleted after. A reader never sees a
 * half-written folder at `target`; it may briefly see none (Linux cannot swap two directories in
 * one call portably).
 */
export function replaceFolder(staged: string, target: string): void {
  if (!fs.existsSync(target)) {
    fs.renameSync(staged, target);
    return;
  }
  const aside = `${target}.old-${process.pid}-${Date.now()}`;
  fs.renameSync(target, aside);
  try {
    fs.renameSync(staged, target);
  } catch (e) {
    fs.renameSync(aside, target);
    throw e;
  }
  fs.rmSync(aside, { recursive: true, force: true });
}

/** Total size in bytes of the files under `dir`. */
export function folderSize(dir: string): number {
  let n = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    n += e.isDirectory() ? folderSize(p) : fs.statSync(p).size;
  }
  return n;
}
