import * as fs from 'fs';
import * as path from 'path';
import { FileError, InvalidArgumentError, Tensor, loadTorchFile, saveTorchFile } from '../../src';
import { dumpPickle, PickleFloat, PickleTuple } from '../../src/core/pickle-writer';
import { buildStoredZip, crc32 } from '../../src/core/zip-writer';
import { tempDir } from '../helpers/env';
import { exportInterop, itWithPython, structureOf } from '../helpers/python-torch';

type Tree = Record<string, { tree: unknown; zip: { testzip: string | null; entries: { name: string; data_offset: number; size: number; method: number }[]; records: Record<string, string> } }>;

function sample(): Map<string, unknown> {
  const f32 = Tensor.fromArray(new Float32Array([1, -2.5, 3e-8, 4e30, 5, 6]), [2, 3]);
  return new Map<string, unknown>([
    ['f32', f32],
    ['tied', f32],
    ['f16', Tensor.fromArray(new Float32Array([0.5, -1, 65504]), [3], 'float16')],
    ['bf16', Tensor.fromArray(new Float32Array([1.5, -3]), [1, 2], 'bfloat16')],
    ['f64', Tensor.fromArray(new Float64Array([Math.PI]), [1])],
    ['i64', Tensor.fromArray(new BigInt64Array([-(2n ** 40n), 7n]), [2])],
    ['i32', Tensor.fromArray(new Int32Array([-1, 2, 3]), [3])],
    ['u8', Tensor.fromArray(new Uint8Array([0, 255]), [2])],
    ['bool', Tensor.fromArray(new Uint8Array([1, 0, 1]), [3], 'bool')],
    ['scalar', Tensor.fromArray(new Float32Array([7]), [])],
    ['empty', Tensor.zeros([0, 4])],
    ['nested', { u: Tensor.fromArray(new Float32Array([1, 2]), [2, 1]), deeper: { x: null, y: true, z: false } }],
    ['ints', [0, 1, 255, 256, 65535, 65536, -1, -129, 2 ** 31 - 1, -(2 ** 31), 2 ** 31, 2 ** 40, -(2 ** 45), 2n ** 63n - 1n, -(2n ** 63n)]],
    ['floats', [0.5, -1e-300, 1e300, -0.25]],
    ['strings', ['', 'ascii', 'é漢字<new1>', 'x'.repeat(300)]],
    ['long_list', Array.from({ length: 2500 }, (_, i) => i)],
    ['big_dict', new Map(Array.from({ length: 1001 }, (_, i) => [`k${i}`, i]))],
    ['one_item_dict', { only: 1 }],
    ['empty_dict', {}],
    ['empty_list', []],
  ]);
}

describe('saveTorchFile', () => {
  let tmp: { dir: string; cleanup: () => void };
  beforeAll(() => {
    tmp = tempDir('cd-torch-save-');
  });
  afterAll(() => tmp.cleanup());

  it('writes what our reader reads back, values and tensor bits', async () => {
    const file = path.join(tmp.dir, 'sample.bin');
    const value = sample();
    await saveTorchFile(file, value as never);
    const back = (await loadTorchFile(file)) as Record<string, unknown>;
    expect(Object.keys(back)).toEqual([...value.keys()]);
    for (const [k, v] of value) {
      if (v instanceof Tensor) {
        const b = back[k] as Tensor;
        expect([k, b.dtype, b.shape]).toEqual([k, v.dtype, v.shape]);
        expect(Array.from(b.toArray() as ArrayLike<number>)).toEqual(Array.from(v.toArray() as ArrayLike<number>));
      }
    }
    expect(back.tied).toBe(back.f32); // one object, as torch.save writes a tensor reached twice
    expect(back.ints).toEqual([0, 1, 255, 256, 65535, 65536, -1, -129, 2 ** 31 - 1, -(2 ** 31), 2 ** 31, 2 ** 40, -(2 ** 45), 2n ** 63n - 1n, -(2n ** 63n)]);
    expect(back.floats).toEqual([0.5, -1e-300, 1e300, -0.25]);
    expect(back.strings).toEqual(['', 'ascii', 'é漢字<new1>', 'x'.repeat(300)]);
    expect(back.long_list).toEqual(Array.from({ length: 2500 }, (_, i) => i));
    expect(Object.keys(back.big_dict as object)).toHaveLength(1001);
    expect((back.nested as { deeper: unknown }).deeper).toEqual({ x: null, y: true, z: false });
    expect(back.one_item_dict).toEqual({ only: 1 });
    expect(back.empty_dict).toEqual({});
    expect(back.empty_list).toEqual([]);
    // Atomic write: nothing but the file is left in the folder.
    expect(fs.readdirSync(tmp.dir)).toEqual(['sample.bin']);
  });

  itWithPython()('is read by torch.load(weights_only=True) exactly as by our reader, with torch\'s record layout', async () => {
    const file = path.join(tmp.dir, 'delta_epoch=000001.ckpt');
    await saveTorchFile(file, sample() as never);
    const py = exportInterop<Tree>(['tree', file])[file];
    expect(py.tree).toEqual(structureOf(await loadTorchFile(file)));
    expect(py.zip.testzip).toBeNull(); // every CRC-32 checks out
    expect(py.zip.records).toEqual({ version: '3\n', byteorder: 'little', '.format_version': '1', '.storage_alignment': '64', '.data/serialization_id': expect.stringMatching(/^\d{40}$/) });
    const names = py.zip.entries.map((e) => e.name);
    expect(names[0]).toBe('delta_epoch=000001/data.pkl'); // torch names the archive after the file
    const data = py.zip.entries.filter((e) => e.name.includes('/data/'));
    expect(data.map((e) => e.name)).toEqual(Array.from({ length: 11 }, (_, i) => `delta_epoch=000001/data/${i}`));
    for (const e of py.zip.entries) {
      expect([e.name, e.method, e.data_offset % 64]).toEqual([e.name, 0, 0]);
    }
  });

  it('refuses values it cannot write, and unwritable paths', async () => {
    await expect(saveTorchFile(path.join(tmp.dir, 'x.bin'), { a: new Date() as never })).rejects.toThrow(InvalidArgumentError);
    await expect(saveTorchFile(path.join(tmp.dir, 'x.bin'), { a: (() => 1) as never })).rejects.toThrow(InvalidArgumentError);
    const cyclic: Record<string, unknown> = {};
    cyclic.self = cyclic;
    await expect(saveTorchFile(path.join(tmp.dir, 'x.bin'), cyclic as never)).rejects.toThrow(InvalidArgumentError);
    fs.writeFileSync(path.join(tmp.dir, 'plain'), 'x');
    await expect(saveTorchFile(path.join(tmp.dir, 'plain', 'x.bin'), { a: 1 })).rejects.toThrow(FileError);
    expect(fs.existsSync(path.join(tmp.dir, 'x.bin'))).toBe(false);
  });
});

describe('pickle and zip writers', () => {
  it('writes protocol-2 pickles with the opcodes Python writes for small values', () => {
    const hex = (v: Parameters<typeof dumpPickle>[0]) => Buffer.from(dumpPickle(v)).toString('hex');
    expect(hex(null)).toBe('80024e2e');
    expect(hex(5)).toBe('80024b052e'); // BININT1
    expect(hex(-1)).toBe('80024affffffff2e'); // BININT
    expect(hex(2n ** 40n)).toBe('80028a060000000000012e'); // LONG1
    expect(hex(new PickleFloat(2))).toBe('8002474000000000000000' + '2e');
    expect(hex(new PickleTuple([1, 2]))).toBe('80024b014b02862e');
    expect(hex({ a: 1 })).toBe('80027d580100000061' + '4b01732e');
  });

  it('computes CRC-32 and lays out aligned stored entries', () => {
    expect(crc32(Buffer.from('123456789'))).toBe(0xcbf43926);
    const chunks = buildStoredZip([{ name: 'a/b', data: new Uint8Array([1, 2, 3]) }], { align: 64 });
    const header = chunks[0];
    expect(header.length % 64).toBe(0);
    expect(() => buildStoredZip([{ name: 'x', data: new Uint8Array() }, { name: 'x', data: new Uint8Array() }])).toThrow(InvalidArgumentError);
  });
});
