/**
 * Finding a diffusers component's files: its config and its weights, in the order diffusers prefers
 * them (safetensors over .bin, the requested variant such as `fp16`, single files or shards).
 */
import * as fs from 'fs';
import * as path from 'path';
import { FileError, InvalidArgumentError } from '../errors';

/** Which weights files were chosen for a component. */
export interface WeightFiles {
  format: 'safetensors' | 'bin';
  files: string[];
}

export interface WeightFileOptions {
  /** A weights variant such as `fp16` (`diffusion_pytorch_model.fp16.safetensors`). */
  variant?: string;
  /** The base name of pickled weights when it differs (transformers: `pytorch_model.bin`). */
  binBaseName?: string;
}

function readShardIndex(indexFile: string): string[] {
  let index: { weight_map?: Record<string, string> };
  try {
    index = JSON.parse(fs.readFileSync(indexFile, 'utf8'));
  } catch (e) {
    throw new FileError(`Cannot read the shard index ${indexFile}: ${(e as Error).message}`, indexFile, { cause: e });
  }
  if (!index.weight_map || typeof index.weight_map !== 'object') {
    throw new FileError(`The shard index ${indexFile} has no "weight_map"`, indexFile);
  }
  const dir = path.dirname(indexFile);
  const shards = [...new Set(Object.values(index.weight_map))].map((f) => path.join(dir, f));
  for (const s of shards) {
    if (!fs.existsSync(s)) throw new FileError(`The shard ${s} named by ${indexFile} does not exist`, s);
  }
  return shards;
}

/**
 * The weights of one component (e.g. `unet/` with base name `diffusion_pytorch_model`, or
 * `text_encoder/` with `model`). Throws a FileError listing what was looked for when none exists.
 */
export function findWeightFiles(dir: string, baseName: string, options: WeightFileOptions = {}): WeightFiles {
  const { variant } = options;
  if (variant !== undefined && !/^[\w-]+$/.test(variant)) {
    throw new InvalidArgumentError(`Bad weights variant "${variant}" (expected a name such as fp16)`);
  }
  const names = (ext: string) => {
    const base = ext === 'bin' && options.binBaseName ? options.binBaseName : baseName;
    return [...(variant ? [`${base}.${variant}.${ext}`] : []), `${base}.${ext}`];
  };
  const tried: string[] = [];
  for (const format of ['safetensors', 'bin'] as const) {
    for (const name of names(format)) {
      const file = path.join(dir, name);
      tried.push(name);
      if (fs.existsSync(file)) return { format, files: [file] };
      const index = `${file}.index.json`;
      tried.push(`${name}.index.json`);
      if (fs.existsSync(index)) return { format, files: readShardIndex(index) };
    }
  }
  if (!fs.existsSync(dir)) throw new FileError(`The model folder ${dir} does not exist`, dir);
  throw new FileError(`No weights in ${dir}: looked for ${tried.join(', ')}`, dir);
}

/** Reads `<dir>/<name>` as text; a clear FileError when it is missing. */
export function readConfigText(dir: string, name = 'config.json'): string {
  const file = path.join(dir, name);
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (e) {
    const why = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'does not exist' : (e as Error).message;
    throw new FileError(`The config file ${file} ${why}`, file, { cause: e });
  }
}

/** One entry of model_index.json: the library and class of a component, or null when absent. */
export type ComponentSpec = [library: string, className: string] | null;

/** A pipeline folder's model_index.json. */
export interface ModelIndex {
  className: string;
  components: Record<string, ComponentSpec>;
  /** Other settings such as requires_safety_checker. */
  settings: Record<string, unknown>;
}

export function readModelIndex(folder: string): ModelIndex {
  const text = readConfigText(folder, 'model_index.json');
  let raw: Record<string, unknown>;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new FileError(`${path.join(folder, 'model_index.json')} is not valid JSON: ${(e as Error).message}`, folder, {
      cause: e,
    });
  }
  const components: Record<string, ComponentSpec> = {};
  const settings: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(raw)) {
    if (k.startsWith('_')) continue;
    if (v === null || (Array.isArray(v) && v.length === 2 && (v[0] === null || typeof v[0] === 'string'))) {
      components[k] = v === null || v[0] === null ? null : [v[0] as string, v[1] as string];
    } else {
      settings[k] = v;
    }
  }
  return { className: String(raw._class_name ?? ''), components, settings };
}
