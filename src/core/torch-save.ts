/**
 * Writing PyTorch `torch.save` files (`.bin`, `.ckpt`, `.pt`) without Python, in the format current
 * torch writes and every torch since 1.6 reads (including `torch.load(..., weights_only=True)`):
 * a stored ZIP archive `<name>/` holding the pickle `data.pkl` (protocol 2), one raw little-endian
 * record `data/<key>` per tensor storage (64-byte aligned), and the `version`, `byteorder`,
 * `.format_version`, `.storage_alignment` and `.data/serialization_id` records.
 *
 * Tensors are pickled as torch does (`torch._utils._rebuild_tensor_v2` over a persistent-id storage
 * `('storage', torch.FloatStorage, key, 'cpu', numel)`), each with its own contiguous storage; the
 * same {@link Tensor} object reached twice is written once and loads as one tensor, as in torch.
 *
 * @packageDocumentation
 */
import { randomBytes } from 'crypto';
import * as os from 'os';
import * as path from 'path';
import type { Dtype } from '../native';
import { InvalidArgumentError } from '../errors';
import { writeFileAtomic } from './atomic-file';
import { dumpPickle, PickleGlobal, PicklePersistentId, PickleReduce, PickleTuple, type PickleValue } from './pickle-writer';
import { Tensor } from './tensor';
import { buildStoredZip, type ZipEntry } from './zip-writer';

/**
 * A value {@link saveTorchFile} can write: `null` (None), booleans, numbers (a safe integer is
 * written as a Python int, any other number as a float), bigints (int), strings, {@link Tensor}s, arrays
 * (lists), and Maps or plain objects with string keys (dicts, in insertion order; use a Map when
 * keys look like integers, which plain objects would reorder).
 */
export type TorchSaveValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | Tensor
  | TorchSaveValue[]
  | Map<string, TorchSaveValue>
  | { [key: string]: TorchSaveValue };

const STORAGE: Record<Dtype, { cls: string; size: number }> = {
  float32: { cls: 'FloatStorage', size: 4 },
  float64: { cls: 'DoubleStorage', size: 8 },
  float16: { cls: 'HalfStorage', size: 2 },
  bfloat16: { cls: 'BFloat16Storage', size: 2 },
  int64: { cls: 'LongStorage', size: 8 },
  int32: { cls: 'IntStorage', size: 4 },
  int16: { cls: 'ShortStorage', size: 2 },
  int8: { cls: 'CharStorage', size: 1 },
  uint8: { cls: 'ByteStorage', size: 1 },
  bool: { cls: 'BoolStorage', size: 1 },
};

export interface SaveTorchFileOptions {
  /**
   * The archive's folder name inside the ZIP (default: the file name without its last extension,
   * as torch.save names it).
   */
  archiveName?: string;
}

function contiguousStrides(shape: number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i];
  }
  return s;
}

/** The pickle and storage records of a value, as torch.save lays them out. */
export function encodeTorchValue(value: TorchSaveValue): { pickle: Uint8Array; storages: { key: string; data: Uint8Array }[] } {
  if (os.endianness() !== 'LE') throw new InvalidArgumentError('saveTorchFile: only little-endian hosts are supported');
  const storages: { key: string; data: Uint8Array }[] = [];
  const byTensor = new Map<Tensor, PickleReduce>();
  const rebuild = new PickleGlobal('torch._utils', '_rebuild_tensor_v2');
  const orderedDict = new PickleGlobal('collections', 'OrderedDict');

  const tensor = (t: Tensor): PickleValue => {
    const dtype = t.dtype;
    const st = STORAGE[dtype];
    if (!st) throw new InvalidArgumentError(`saveTorchFile: tensors of dtype ${dtype} cannot be written`);
    const shape = t.shape;
    const numel = shape.reduce((a, b) => a * b, 1);
    const known = byTensor.get(t);
    if (known) return known; // the same object again (memoised by the pickle writer)
    const key = String(storages.length);
    const arr = t.toArray();
    const data = new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength);
    if (data.byteLength !== numel * st.size) {
      throw new InvalidArgumentError(`saveTorchFile: a ${dtype} tensor of ${numel} elements gave ${data.byteLength} bytes`);
    }
    storages.push({ key, data });
    const storage = new PicklePersistentId(new PickleTuple(['storage', new PickleGlobal('torch', st.cls), key, 'cpu', numel]));
    const rebuilt = new PickleReduce(
      rebuild,
      new PickleTuple([storage, 0, new PickleTuple(shape), new PickleTuple(contiguousStrides(shape)), false, new PickleReduce(orderedDict, new PickleTuple([]))]),
    );
    byTensor.set(t, rebuilt);
    return rebuilt;
  };

  const convert = (v: TorchSaveValue, depth: number): PickleValue => {
    if (depth > 1000) throw new InvalidArgumentError('saveTorchFile: the value is nested too deeply (or is cyclic)');
    if (v instanceof Tensor) return tensor(v);
    if (Array.isArray(v)) return v.map((x) => convert(x, depth + 1));
    if (v instanceof Map) return new Map([...v.entries()].map(([k, x]) => [k, convert(x, depth + 1)]));
    if (v !== null && typeof v === 'object') {
      const proto = Object.getPrototypeOf(v) as unknown;
      if (proto !== Object.prototype && proto !== null) {
        throw new InvalidArgumentError(`saveTorchFile: cannot write an object of class ${(v as object).constructor?.name ?? '?'}`);
      }
      return new Map(Object.entries(v).map(([k, x]) => [k, convert(x, depth + 1)]));
    }
    return v;
  };

  const pickle = dumpPickle(convert(value, 0));
  return { pickle, storages };
}

/** A 40-digit decimal id, like the one torch records in `.data/serialization_id`. */
function serializationId(): string {
  const b = randomBytes(40);
  return Array.from(b, (x) => String(x % 10)).join('');
}

/**
 * Writes `value` as a torch.save file (see the module documentation), atomically: temporary file,
 * fsync, rename. Python reads it with `torch.load(file, weights_only=True)`; {@link loadTorchFile}
 * reads it back bit for bit.
 *
 * Errors: {@link InvalidArgumentError} for values it cannot write (other classes, unsupported
 * dtypes), {@link FileError} when the file cannot be written.
 */
export async function saveTorchFile(file: string, value: TorchSaveValue, options: SaveTorchFileOptions = {}): Promise<void> {
  const target = path.resolve(file);
  const base = path.basename(target);
  const dot = base.lastIndexOf('.');
  const archive = options.archiveName ?? ((dot > 0 ? base.slice(0, dot) : base) || 'archive');
  if (archive.includes('/') || archive.includes('\\') || archive === '') {
    throw new InvalidArgumentError(`saveTorchFile: invalid archive name ${JSON.stringify(archive)}`);
  }
  const { pickle, storages } = encodeTorchValue(value);
  const text = (s: string) => new Uint8Array(Buffer.from(s, 'utf8'));
  // The record order of torch 2.x's writer.
  const entries: ZipEntry[] = [
    { name: `${archive}/data.pkl`, data: pickle },
    { name: `${archive}/.format_version`, data: text('1') },
    { name: `${archive}/.storage_alignment`, data: text('64') },
    { name: `${archive}/byteorder`, data: text('little') },
    ...storages.map((s) => ({ name: `${archive}/data/${s.key}`, data: s.data })),
    { name: `${archive}/version`, data: text('3\n') },
    { name: `${archive}/.data/serialization_id`, data: text(serializationId()) },
  ];
  await writeFileAtomic(target, buildStoredZip(entries, { align: 64 }));
}
