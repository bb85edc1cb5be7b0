import * as path from 'path';
import { callAsync, native, type DeviceName, type Dtype, type SafetensorsEntry } from '../native';
import { InvalidArgumentError } from '../errors';
import { Tensor } from './tensor';

export type { SafetensorsEntry };

/** The header of a safetensors file: its tensors' names, dtypes, shapes, offsets, and metadata. */
export interface SafetensorsHeader {
  entries: SafetensorsEntry[];
  metadata: Record<string, string>;
  headerSize: number;
  dataSize: number;
}

export interface LoadSafetensorsOptions {
  /** Convert floating-point tensors to this dtype while loading. */
  dtype?: Dtype;
  /** Place the tensors on this device (default `cpu`). */
  device?: DeviceName;
  /** Load only these tensors (each must exist). */
  names?: string[];
}

/**
 * Reads and validates a file's header without loading tensor data. Every malformed file gives a
 * {@link SafetensorsError} naming the file and, where it applies, the tensor.
 */
export async function readSafetensorsHeader(file: string): Promise<SafetensorsHeader> {
  return callAsync(() => native().safetensorsReadHeader(path.resolve(file)));
}

/**
 * Loads tensors from a safetensors file. The file is memory-mapped: CPU tensors kept in the
 * file's dtype share its pages, so loading costs little more memory than the file itself.
 */
export async function loadSafetensors(
  file: string,
  options: LoadSafetensorsOptions = {},
): Promise<{ tensors: Record<string, Tensor>; metadata: Record<string, string> }> {
  const r = await callAsync(() => native().safetensorsLoad(path.resolve(file), options));
  const tensors: Record<string, Tensor> = {};
  for (const [name, t] of Object.entries(r.tensors)) tensors[name] = new Tensor(t);
  return { tensors, metadata: r.metadata };
}

/**
 * Writes tensors (in the given key order) and string metadata to a safetensors file, atomically:
 * the data goes to a temporary file in the same folder that replaces `file` only when complete.
 */
export async function saveSafetensors(
  file: string,
  tensors: Record<string, Tensor> | Map<string, Tensor>,
  metadata: Record<string, string> = {},
): Promise<void> {
  const entries = tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors);
  for (const [k, v] of Object.entries(metadata)) {
    if (typeof v !== 'string') throw new InvalidArgumentError(`metadata value "${k}" must be a string`);
  }
  const names = entries.map(([n]) => n);
  const handles = entries.map(([n, t]) => {
    if (!(t instanceof Tensor)) throw new InvalidArgumentError(`"${n}" is not a Tensor`);
    return t.handle;
  });
  await callAsync(() => native().safetensorsSave(path.resolve(file), names, handles, metadata));
}
