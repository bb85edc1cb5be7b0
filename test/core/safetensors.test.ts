import { createHash } from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import {
  FileError,
  InvalidArgumentError,
  SafetensorsError,
  Tensor,
  loadSafetensors,
  readSafetensorsHeader,
  saveSafetensors,
  type Dtype,
  type TensorData,
} from '../../src';
import { repoRoot, runPython, tempDir } from '../helpers/env';

const interop = path.join(repoRoot, 'test', 'parity', 'safetensors_interop.py');

function sha(data: TensorData): string {
  return createHash('sha256').update(Buffer.from(data.buffer, data.byteOffset, data.byteLength)).digest('hex');
}

const SAFETENSORS_DTYPE: Record<Dtype, string> = {
  float64: 'F64', float32: 'F32', float16: 'F16', bfloat16: 'BF16', int64: 'I64',
  int32: 'I32', int16: 'I16', int8: 'I8', uint8: 'U8', bool: 'BOOL',
};

/** Builds a raw safetensors file from a header object (or raw header text) and data bytes. */
function rawFile(header: object | string, data: Buffer = Buffer.alloc(0), lengthOverride?: bigint): Buffer {
  const text = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(lengthOverride ?? BigInt(text.length));
  return Buffer.concat([len, text, data]);
}

describe('safetensors', () => {
  let tmp: { dir: string; cleanup: () => void };
  beforeAll(() => (tmp = tempDir()));
  afterAll(() => tmp.cleanup());
  const file = (name: string) => path.join(tmp.dir, name);

  it('round-trips every dtype bit for bit, with metadata', async () => {
    const src = new Float32Array(24).map((_, i) => (i - 11.5) * 3.75);
    const tensors: Record<string, Tensor> = {};
    const f32 = Tensor.fromArray(src, [2, 3, 4]);
    for (const dtype of Object.keys(SAFETENSORS_DTYPE) as Dtype[]) {
      tensors[dtype] = dtype === 'float32' ? f32 : await f32.to({ dtype });
    }
    tensors.scalar = Tensor.fromArray(new Float32Array([1.5]), []);
    tensors.empty = Tensor.zeros([0, 3]);
    const metadata = { format: 'pt', text: 'ünïcødé "quotes" \\ and\nnewlines' };
    await saveSafetensors(file('all.safetensors'), tensors, metadata);

    const header = await readSafetensorsHeader(file('all.safetensors'));
    expect(header.metadata).toEqual(metadata);
    expect(header.entries.map((e) => e.name)).toEqual(Object.keys(tensors));
    expect(header.headerSize % 8).toBe(0);

    const loaded = await loadSafetensors(file('all.safetensors'));
    expect(loaded.metadata).toEqual(metadata);
    for (const [name, t] of Object.entries(tensors)) {
      expect(loaded.tensors[name].dtype).toBe(t.dtype);
      expect(loaded.tensors[name].shape).toEqual(t.shape);
      expect(sha(loaded.tensors[name].toArray())).toBe(sha(t.toArray()));
    }
  });

  it('reads files written by Python safetensors bit for bit', async () => {
    const f = file('py.safetensors');
    const expected = JSON.parse(runPython([interop, 'write', f]));
    const loaded = await loadSafetensors(f);
    expect(loaded.metadata).toEqual(expected.metadata);
    expect(Object.keys(loaded.tensors).sort()).toEqual(Object.keys(expected.tensors).sort());
    for (const [name, want] of Object.entries<{ dtype: string; shape: number[]; sha256: string }>(expected.tensors)) {
      const t = loaded.tensors[name];
      expect([name, SAFETENSORS_DTYPE[t.dtype]]).toEqual([name, want.dtype]);
      expect(t.shape).toEqual(want.shape);
      expect([name, sha(t.toArray())]).toEqual([name, want.sha256]);
    }
  });

  it('writes files that Python safetensors reads bit for bit', async () => {
    const f = file('js.safetensors');
    const g = Tensor.randn([4, 5]);
    const tensors: Record<string, Tensor> = { f32: g };
    for (const dtype of ['float16', 'bfloat16', 'float64', 'int64', 'int32', 'int16', 'int8', 'uint8', 'bool'] as Dtype[]) {
      tensors[dtype] = await g.to({ dtype });
    }
    tensors.scalar = Tensor.fromArray(new Int32Array([7]), []);
    await saveSafetensors(f, tensors, { written_by: 'custom-diffusion' });
    const read = JSON.parse(runPython([interop, 'read', f]));
    expect(read.metadata).toEqual({ written_by: 'custom-diffusion' });
    for (const [name, t] of Object.entries(tensors)) {
      expect([name, read.tensors[name].sha256]).toEqual([name, sha(t.toArray())]);
      expect(read.tensors[name].shape).toEqual(t.shape);
    }
  });

  it('converts dtype and selects tensors on load', async () => {
    const f = file('sel.safetensors');
    await saveSafetensors(f, {
      a: await Tensor.fromArray(new Float32Array([1, 2]), [2]).to({ dtype: 'float16' }),
      b: Tensor.fromArray(new Int32Array([3]), [1]),
    });
    const r = await loadSafetensors(f, { dtype: 'float32', names: ['a'] });
    expect(Object.keys(r.tensors)).toEqual(['a']);
    expect(r.tensors.a.dtype).toBe('float32');
    expect(Array.from(r.tensors.a.toArray() as Float32Array)).toEqual([1, 2]);
    const ints = await loadSafetensors(f, { dtype: 'float16', names: ['b'] });
    expect(ints.tensors.b.dtype).toBe('int32'); // integer tensors are never converted
    await expect(loadSafetensors(f, { names: ['nope'] })).rejects.toThrow(/Tensor "nope" is not in/);
  });

  it('lets a loaded tensor be changed in memory without touching the file', async () => {
    const f = file('cow.safetensors');
    await saveSafetensors(f, { w: Tensor.fromArray(new Float32Array([1, 2, 3, 4]), [4]) });
    const before = fs.readFileSync(f);
    const { tensors } = await loadSafetensors(f);
    const copy = await tensors.w.to({ dtype: 'float32' });
    expect(Array.from(copy.toArray() as Float32Array)).toEqual([1, 2, 3, 4]);
    expect(fs.readFileSync(f).equals(before)).toBe(true);
  });

  it('writes atomically: a failed save leaves the old file and no temporary files', async () => {
    const f = file('atomic.safetensors');
    await saveSafetensors(f, { x: Tensor.zeros([2]) });
    const before = fs.readFileSync(f);
    await expect(saveSafetensors(f, { __metadata__: Tensor.zeros([1]) })).rejects.toBeInstanceOf(InvalidArgumentError);
    expect(fs.readFileSync(f).equals(before)).toBe(true);
    await expect(saveSafetensors(path.join(tmp.dir, 'no', 'such', 'dir.safetensors'), { x: Tensor.zeros([1]) })).rejects.toBeInstanceOf(
      FileError,
    );
    expect(fs.readdirSync(tmp.dir).filter((n) => n.includes('.tmp-'))).toEqual([]);
    const disposed = Tensor.zeros([1]);
    disposed.dispose();
    await expect(saveSafetensors(f, { d: disposed })).rejects.toThrow(/disposed/);
  });

  it('reports missing files and folders as FileError', async () => {
    await expect(loadSafetensors(file('missing.safetensors'))).rejects.toBeInstanceOf(FileError);
    await expect(loadSafetensors(file('missing.safetensors'))).rejects.toThrow(/File not found: .*missing\.safetensors/);
    await expect(readSafetensorsHeader(tmp.dir)).rejects.toThrow(/Not a regular file/);
  });

  const f32 = (shape: number[], begin: number, end: number) => ({ dtype: 'F32', shape, data_offsets: [begin, end] });
  // Every row has four entries: jest passes a `done` callback in place of a missing last argument.
  const corrupt: [string, Buffer, RegExp, string | undefined][] = [
    ['an empty file', Buffer.alloc(0), /0 bytes long, too short/, undefined],
    ['a 5-byte file', Buffer.from([1, 2, 3, 4, 5]), /5 bytes long, too short/, undefined],
    ['a zero header length', rawFile('{}', Buffer.alloc(0), 0n), /header length is 0/, undefined],
    ['a header length past the end', rawFile('{}', Buffer.alloc(0), 1000n), /runs past the end of the 10-byte file/, undefined],
    ['a header length above the limit', rawFile('{}', Buffer.alloc(0), 1n << 40n), /exceeds the limit/, undefined],
    ['a header that is not an object', rawFile('[1, 2]'), /does not start with '\{'/, undefined],
    ['truncated JSON', rawFile('{"a": {"dtype": "F32"'), /not valid JSON \(expected ',' or '\}' at byte 21\)/, undefined],
    ['trailing garbage after the JSON', rawFile('{} x'), /not valid JSON \(unexpected trailing/, undefined],
    ['NaN in the offsets', rawFile('{"a":{"dtype":"F32","shape":[1],"data_offsets":[NaN,4]}}', Buffer.alloc(4)), /not valid JSON/, undefined],
    ['a duplicated tensor name', rawFile('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', Buffer.alloc(2)), /duplicate key "a"/, undefined],
    ['an unknown dtype', rawFile({ w: { dtype: 'F7', shape: [1], data_offsets: [0, 4] } }, Buffer.alloc(4)), /tensor "w": unknown dtype "F7"/, 'w'],
    ['a shape that is not an array', rawFile({ w: { dtype: 'F32', shape: 4, data_offsets: [0, 16] } }, Buffer.alloc(16)), /"w": missing or non-array "shape"/, 'w'],
    ['a negative dimension', rawFile({ w: f32([-1, 4], 0, 16) }, Buffer.alloc(16)), /each shape dimension must be a non-negative integer/, 'w'],
    ['an overflowing element count', rawFile({ w: f32([2 ** 40, 2 ** 40, 2 ** 40], 0, 4) }, Buffer.alloc(4)), /element count overflows/, 'w'],
    ['missing data_offsets', rawFile({ w: { dtype: 'F32', shape: [1] } }, Buffer.alloc(4)), /"data_offsets" must be an array of two integers/, 'w'],
    ['offsets past the data', rawFile({ w: f32([4], 0, 16) }, Buffer.alloc(8)), /run past the 8-byte data section/, 'w'],
    ['end before begin', rawFile({ w: f32([0], 8, 4) }, Buffer.alloc(8)), /end is before begin/, 'w'],
    ['a byte length that does not match the shape', rawFile({ w: f32([4], 0, 12) }, Buffer.alloc(12)), /holds 12 bytes but dtype F32 and shape need 16/, 'w'],
    ['overlapping tensors', rawFile({ a: f32([2], 0, 8), b: f32([2], 4, 12) }, Buffer.alloc(12)), /"b": its bytes overlap those of "a"/, 'b'],
    ['a gap between tensors', rawFile({ a: f32([1], 0, 4), b: f32([1], 8, 12) }, Buffer.alloc(12)), /gap of 4 bytes before it/, 'b'],
    ['bytes after the last tensor', rawFile({ a: f32([1], 0, 4) }, Buffer.alloc(9)), /5 bytes after the last tensor belong to no tensor/, undefined],
    ['a non-string metadata value', rawFile({ __metadata__: { epoch: 3 } }), /__metadata__ value for "epoch" must be a string/, undefined],
    ['an unexpected field', rawFile({ w: { ...f32([1], 0, 4), extra: 1 } }, Buffer.alloc(4)), /unexpected field "extra"/, 'w'],
    ['hostile nesting depth', rawFile(`{"__metadata__":${'['.repeat(200)}${']'.repeat(200)}}`), /nesting too deep/, undefined],
  ];

  it.each(corrupt)('refuses %s with a clear error', async (_what, bytes, message, tensor) => {
    const f = file('corrupt.safetensors');
    fs.writeFileSync(f, bytes);
    const err = await loadSafetensors(f).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SafetensorsError);
    expect((err as Error).message).toMatch(message);
    expect((err as Error).message).toContain(f);
    expect((err as SafetensorsError).file).toBe(f);
    if (tensor) expect((err as SafetensorsError).tensor).toBe(tensor);
    await expect(readSafetensorsHeader(f)).rejects.toBeInstanceOf(SafetensorsError);
  });

  it('refuses a truncated real file', async () => {
    const f = file('trunc.safetensors');
    await saveSafetensors(f, { a: Tensor.zeros([64]), b: Tensor.zeros([64]) });
    const bytes = fs.readFileSync(f);
    fs.writeFileSync(f, bytes.subarray(0, bytes.length - 100));
    await expect(loadSafetensors(f)).rejects.toThrow(/run past the .*data section \(is the file truncated\?\)/);
  });
});
