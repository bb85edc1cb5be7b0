/**
 * Reading PyTorch `torch.save` files (`.bin`, `.ckpt`, `.pt`) without Python and without running
 * anything they contain.
 *
 * A torch.save file is a ZIP archive holding a pickle (`<name>/data.pkl`) and the raw bytes of each
 * tensor storage. Python's pickle can call any function a file names, which is how malicious
 * checkpoints run code; this loader's unpickler (native, C++) calls nothing. It understands what a
 * tensor state dict needs (dicts, OrderedDicts, lists, tuples, numbers, strings, bytes, tensors,
 * parameters) and shows any other named class or function as an inert `{ __opaque__: 'module.Name' }`
 * placeholder, but refuses outright, with a {@link PickleError} of code `PICKLE_UNSAFE`, a file that
 * names a global that exists to run code (`os.system`, `builtins.eval`, `subprocess.Popen`, ...).
 *
 * @packageDocumentation
 */
import * as path from 'path';
import { callAsync, nativeAs, native, type DeviceName, type Dtype, type NativeTensor } from '../native';
import { InvalidArgumentError } from '../errors';
import { Tensor } from './tensor';

/** A class or function the file names that this loader does not model (never called). */
export interface TorchOpaque {
  /** Its qualified Python name, e.g. `argparse.Namespace` or `numpy._core.multiarray.scalar`. */
  readonly __opaque__: string;
}

/** A Python dict (or OrderedDict) of the file. */
export interface TorchDict {
  [key: string]: TorchValue;
}

/**
 * A value of a torch.save file, as JavaScript:
 * - `None` → `null`; `bool` → boolean; `float` → number; `str` → string; `bytes` → Uint8Array;
 * - `int` → number, or bigint beyond ±(2^53 − 1); ints wider than 64 bits → `{ __opaque__: 'builtins.int' }`;
 * - tensors and `nn.Parameter`s → {@link Tensor} (one handle per tensor object, so tied weights share one);
 * - lists, tuples and sets → arrays;
 * - dicts → plain objects in the file's key order (except that JavaScript lists integer-like keys
 *   first). int keys become decimal strings, other non-string keys a readable text (`None`,
 *   `(1, x)`, a class's qualified name);
 * - anything else → {@link TorchOpaque}.
 */
export type TorchValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | Tensor
  | TorchValue[]
  | TorchDict
  | TorchOpaque;

export interface LoadTorchFileOptions {
  /** Convert floating-point tensors to this dtype while loading (others keep theirs). */
  dtype?: Dtype;
  /** Place the tensors on this device (default `cpu`). */
  device?: DeviceName;
}

/** What native/core/bind_pickle.cc registers. */
interface PickleBinding {
  loadTorchFile(file: string, options: LoadTorchFileOptions): Promise<unknown>;
}

/**
 * Loads a torch.save file (`diffusion_pytorch_model.bin`, Custom Diffusion's `delta.bin` or
 * `delta_epoch=*.ckpt`, a Lightning `.ckpt`, ...) on a worker thread and returns its whole content.
 * CPU tensors kept in the file's dtype share the memory-mapped file's pages (copy-on-write), and
 * tensors that were views of one storage still are.
 *
 * Errors: {@link PickleError} `PICKLE_UNSAFE` for files that would run code in Python (refused,
 * nothing returned), `PICKLE_FORMAT` for damaged or unsupported files (legacy pre-1.6 format,
 * compressed entries, TorchScript archives); {@link FileError} when the file cannot be read.
 */
export async function loadTorchFile(file: string, options: LoadTorchFileOptions = {}): Promise<TorchValue> {
  const raw = await callAsync(() => nativeAs<PickleBinding>().loadTorchFile(path.resolve(file), options));
  return wrap(raw, new Map());
}

/** True when `v` is an {@link TorchOpaque} placeholder. */
export function isTorchOpaque(v: unknown): v is TorchOpaque {
  if (typeof v !== 'object' || v === null || Array.isArray(v) || v instanceof Tensor) return false;
  const keys = Object.keys(v);
  return keys.length === 1 && keys[0] === '__opaque__' && typeof (v as TorchOpaque).__opaque__ === 'string';
}

/** True when `v` is a dict of a loaded tree (not a tensor, array, bytes or opaque placeholder). */
export function isTorchDict(v: unknown): v is TorchDict {
  return (
    typeof v === 'object' &&
    v !== null &&
    !Array.isArray(v) &&
    !(v instanceof Tensor) &&
    !ArrayBuffer.isView(v) &&
    !isTorchOpaque(v)
  );
}

/**
 * Every tensor reachable through nested dicts, named by the dotted path of its keys, in file order:
 * `{unet: {'down_blocks.0...to_k.weight': t}}` → `{'unet.down_blocks.0...to_k.weight': t}`. Arrays
 * and opaque values are not entered; a tensor at the root is named `''` (or `prefix`). Throws an
 * {@link InvalidArgumentError} when two different tensors get the same name.
 */
export function flattenTensors(tree: TorchValue, prefix = ''): Record<string, Tensor> {
  const out: Record<string, Tensor> = {};
  const walk = (v: TorchValue, name: string, depth: number): void => {
    if (v instanceof Tensor) {
      if (Object.prototype.hasOwnProperty.call(out, name) && out[name] !== v) {
        throw new InvalidArgumentError(`Two different tensors are both named "${name}"`);
      }
      Object.defineProperty(out, name, { value: v, enumerable: true, writable: true, configurable: true });
      return;
    }
    if (!isTorchDict(v)) return;
    if (depth > 1000) throw new InvalidArgumentError('The tree is nested too deeply (or is cyclic) to flatten');
    for (const key of Object.keys(v)) walk(v[key], name === '' ? key : `${name}.${key}`, depth + 1);
  };
  walk(tree, prefix, 0);
  return out;
}

function wrap(v: unknown, tensors: Map<NativeTensor, Tensor>): TorchValue {
  if (v === null || typeof v !== 'object') return v as TorchValue;
  if (v instanceof native().Tensor) {
    const handle = v as NativeTensor;
    let t = tensors.get(handle);
    if (!t) {
      t = new Tensor(handle);
      tensors.set(handle, t);
    }
    return t;
  }
  if (Array.isArray(v)) return v.map((x) => wrap(x, tensors));
  if (ArrayBuffer.isView(v)) {
    const b = v as Uint8Array;
    return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
  }
  const obj = v as Record<string, unknown>;
  if (isTorchOpaque(obj)) return obj;
  for (const key of Object.keys(obj)) {
    Object.defineProperty(obj, key, { value: wrap(obj[key], tensors), enumerable: true, writable: true, configurable: true });
  }
  return obj as TorchDict;
}
