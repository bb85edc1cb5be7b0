import { createHash } from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import * as zlib from 'zlib';
import { FileError, PickleError, Tensor, type TensorData } from '../../src';
import { flattenTensors, isTorchOpaque, loadTorchFile, type TorchValue } from '../../src/core/torch-file';
import { repoRoot, tempDir } from '../helpers/env';

// Fixtures written by test/parity/make_pickle_fixtures.py (no Python is needed here).
const root = path.join(repoRoot, 'test', 'fixtures', 'pickle');
interface TensorRecord {
  dtype: string;
  shape: number[];
  sha256?: string;
  sha256_as_float32?: string;
}
const expected = JSON.parse(fs.readFileSync(path.join(root, 'expected.json'), 'utf8')) as {
  marker: string;
  good: Record<string, { structure: unknown; tensors: Record<string, TensorRecord> }>;
  unsafe: Record<string, string>;
  corrupt: Record<string, string | null>;
};

function sha(data: TensorData): string {
  return createHash('sha256').update(Buffer.from(data.buffer, data.byteOffset, data.byteLength)).digest('hex');
}

async function record(t: Tensor): Promise<TensorRecord> {
  if (t.dtype.startsWith('Float8')) {
    return { dtype: t.dtype, shape: t.shape, sha256_as_float32: sha((await t.to({ dtype: 'float32' })).toArray()) };
  }
  return { dtype: t.dtype, shape: t.shape, sha256: sha(t.toArray()) };
}

/** The tree in the generator's JSON form: tensors as records, dicts as ordered [key, value] pairs. */
async function structure(v: TorchValue): Promise<unknown> {
  if (v instanceof Tensor) return { __tensor__: await record(v) };
  if (v === null || typeof v !== 'object') return typeof v === 'bigint' ? { __bigint__: v.toString() } : v;
  if (Array.isArray(v)) return Promise.all(v.map(structure));
  if (v instanceof Uint8Array) return { __bytes__: Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('hex') };
  if (isTorchOpaque(v)) return { __opaque__: v.__opaque__ };
  const pairs: unknown[] = [];
  for (const k of Object.keys(v)) pairs.push([k, await structure((v as Record<string, TorchValue>)[k])]);
  return { __dict__: pairs };
}

/** A minimal ZIP writer (stored entries, no alignment) for archives made up in the tests. */
function zip(entries: [string, Buffer][]): Buffer {
  const parts: Buffer[] = [];
  const central: Buffer[] = [];
  let offset = 0;
  for (const [name, data] of entries) {
    const n = Buffer.from(name);
    const crc = zlib.crc32(data);
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(20, 4);
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(data.length, 18);
    local.writeUInt32LE(data.length, 22);
    local.writeUInt16LE(n.length, 26);
    const c = Buffer.alloc(46);
    c.writeUInt32LE(0x02014b50, 0);
    c.writeUInt16LE(20, 4);
    c.writeUInt16LE(20, 6);
    c.writeUInt32LE(crc, 16);
    c.writeUInt32LE(data.length, 20);
    c.writeUInt32LE(data.length, 24);
    c.writeUInt16LE(n.length, 28);
    c.writeUInt32LE(offset, 42);
    parts.push(local, n, data);
    central.push(c, n);
    offset += 30 + n.length + data.length;
  }
  const cd = Buffer.concat(central);
  const eocd = Buffer.alloc(22);
  eocd.writeUInt32LE(0x06054b50, 0);
  eocd.writeUInt16LE(entries.length, 8);
  eocd.writeUInt16LE(entries.length, 10);
  eocd.writeUInt32LE(cd.length, 12);
  eocd.writeUInt32LE(offset, 16);
  return Buffer.concat([...parts, cd, eocd]);
}

/** The entries of a torch.save archive, read with a minimal central-directory walk. */
function unzip(buf: Buffer): [string, Buffer][] {
  const eocd = buf.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06]));
  let count = buf.readUInt16LE(eocd + 10);
  let pos = buf.readUInt32LE(eocd + 16);
  if (pos === 0xffffffff || count === 0xffff) {
    const rec = Number(buf.readBigUInt64LE(eocd - 20 + 8));
    count = Number(buf.readBigUInt64LE(rec + 32));
    pos = Number(buf.readBigUInt64LE(rec + 48));
  }
  const out: [string, Buffer][] = [];
  for (let i = 0; i < count; i++) {
    const size = buf.readUInt32LE(pos + 24);
    const nameLen = buf.readUInt16LE(pos + 28);
    const extra = buf.readUInt16LE(pos + 30);
    const comment = buf.readUInt16LE(pos + 32);
    const name = buf.toString('utf8', pos + 46, pos + 46 + nameLen);
    const local = buf.readUInt32LE(pos + 42);
    const begin = local + 30 + buf.readUInt16LE(local + 26) + buf.readUInt16LE(local + 28);
    out.push([name, buf.subarray(begin, begin + size)]);
    pos += 46 + nameLen + extra + comment;
  }
  return out;
}

describe('torch.save files', () => {
  let tmp: { dir: string; cleanup: () => void };
  beforeAll(() => (tmp = tempDir('cd-pickle-')));
  afterAll(() => tmp.cleanup());

  const goodNames = Object.keys(expected.good);
  it('has the fixtures the generator wrote', () => {
    expect(goodNames.length).toBeGreaterThanOrEqual(16);
    expect(Object.keys(expected.unsafe).length).toBeGreaterThanOrEqual(11);
    expect(Object.keys(expected.corrupt).length).toBeGreaterThanOrEqual(25);
  });

  it.each(goodNames)('loads %s with the exact bytes, shapes, dtypes and structure', async (name) => {
    const tree = await loadTorchFile(path.join(root, 'good', name));
    expect(await structure(tree)).toEqual(expected.good[name].structure);
    const flat = flattenTensors(tree);
    expect(Object.keys(flat)).toEqual(Object.keys(expected.good[name].tensors));
    for (const [k, t] of Object.entries(flat)) expect([k, await record(t)]).toEqual([k, expected.good[name].tensors[k]]);
  });

  it('reads the Custom Diffusion delta layouts as nested dicts', async () => {
    const adf = (await loadTorchFile(path.join(root, 'good', 'delta.bin'))) as Record<string, Record<string, Tensor>>;
    expect(Object.keys(adf)).toEqual(['unet', 'modifier_token']);
    expect(adf.unet['down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'].shape).toEqual([8, 4]);
    expect(Object.keys(adf.modifier_token)).toEqual(['<new1>', '<new2>']);
    expect(adf.modifier_token['<new1>'].shape).toEqual([32]);
    const flat = flattenTensors(adf);
    expect(Object.keys(flat)[0]).toBe('unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight');
    expect(Object.keys(flat)).toContain('modifier_token.<new2>');

    const acv = flattenTensors(await loadTorchFile(path.join(root, 'good', 'delta_epoch=000004.ckpt')));
    expect(Object.keys(acv)).toContain('state_dict.model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight');
    expect(acv.embed.shape).toEqual([1, 32]);

    const comp = (await loadTorchFile(path.join(root, 'good', 'compressed_delta.bin'))) as Record<string, Record<string, TorchValue>>;
    const kv = comp.unet['down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'] as Record<string, Tensor>;
    expect([kv.u.shape, kv.v.shape]).toEqual([[8, 2], [2, 4]]);
    expect(comp.unet['down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight']).toBeInstanceOf(Tensor);

    const procs = (await loadTorchFile(path.join(root, 'good', 'pytorch_custom_diffusion_weights.bin'))) as Record<string, TorchValue>;
    expect(procs['down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor']).toEqual({});
    expect(Object.keys(flattenTensors(procs))).toHaveLength(6);
  });

  it('keeps views, tied tensors, odd keys and opaque placeholders as Python has them', async () => {
    const tied = (await loadTorchFile(path.join(root, 'good', 'tied.pt'))) as Record<string, Tensor>;
    expect(tied['embed.weight']).toBe(tied['lm_head.weight']);

    const d = (await loadTorchFile(path.join(root, 'good', 'dtypes.pt'))) as Record<string, Tensor>;
    const base = Array.from(d.base.toArray() as Float32Array);
    const col = Array.from(d.column.toArray() as Float32Array);
    expect(col).toEqual([0, 1, 2, 3].map((r) => base[r * 6 + 2]));
    const tr = Array.from(d.transposed.toArray() as Float32Array);
    expect(d.transposed.shape).toEqual([6, 4]);
    expect(tr[1 * 4 + 2]).toBe(base[2 * 6 + 1]);
    expect(d.scalar.shape).toEqual([]);
    expect(d.scalar.item()).toBe(3.25);

    const v = (await loadTorchFile(path.join(root, 'good', 'values.pt'))) as Record<string, TorchValue>;
    // A "__proto__" key is an own property; it did not replace the prototype (an Object.prototype,
    // of the addon's realm, not jest's).
    expect(Object.getOwnPropertyDescriptor(v, '__proto__')?.value).toBe('not a prototype');
    expect(Object.getPrototypeOf(Object.getPrototypeOf(v))).toBeNull();
    expect(v.i64max).toBe(9223372036854775807n);
    expect(flattenTensors(v)['dotted.key'].shape).toEqual([1]);

    const l = (await loadTorchFile(path.join(root, 'good', 'lightning.ckpt'))) as Record<string, TorchValue>;
    expect(l.hparams_namespace).toEqual({ __opaque__: 'argparse.Namespace' });
    expect(isTorchOpaque(l.hyper_parameters)).toBe(true);
    expect(Object.keys(l.callbacks as object)).toEqual(['pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint']);

    const bare = await loadTorchFile(path.join(root, 'good', 'bare_tensor.pt'));
    expect(bare).toBeInstanceOf(Tensor);
    expect(Object.keys(flattenTensors(bare))).toEqual(['']);
    expect(Object.keys(flattenTensors(bare, 'x'))).toEqual(['x']);
  });

  it('converts floating-point tensors on request and leaves the file untouched', async () => {
    const f = path.join(root, 'good', 'dtypes.pt');
    const before = fs.readFileSync(f);
    const flat = flattenTensors(await loadTorchFile(f, { dtype: 'float16' }));
    expect(flat.f32.dtype).toBe('float16');
    expect(flat.bf16.dtype).toBe('float16');
    expect(flat.i64.dtype).toBe('int64');
    expect(flat.bool.dtype).toBe('bool');
    const f32 = flattenTensors(await loadTorchFile(f)).f32;
    const back = await flat.f32.to({ dtype: 'float32' });
    const a = Array.from(f32.toArray() as Float32Array);
    const b = Array.from(back.toArray() as Float32Array);
    a.forEach((x, i) => expect(Math.abs(x - b[i])).toBeLessThanOrEqual(Math.abs(x) * 1e-3 + 1e-4));
    expect(fs.readFileSync(f).equals(before)).toBe(true);
  });

  describe('malicious files', () => {
    const marker = expected.marker;
    beforeAll(() => fs.rmSync(marker, { force: true }));

    it.each(Object.entries(expected.unsafe))('refuses %s (%s) with PICKLE_UNSAFE', async (name, global) => {
      const f = path.join(root, 'unsafe', name);
      const err = await loadTorchFile(f).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(PickleError);
      const pe = err as PickleError;
      expect(pe.code).toBe('PICKLE_UNSAFE');
      expect(pe.global).toBe(global);
      expect(pe.file).toBe(f);
      expect(pe.message).toContain(global);
      expect(pe.message).toContain(f);
      expect(typeof pe.offset).toBe('number');
      expect(fs.existsSync(marker)).toBe(false);
    });

    it('never ran what they carry', () => {
      expect(fs.existsSync(marker)).toBe(false);
    });
  });

  describe('corrupt files', () => {
    const cases = Object.entries(expected.corrupt).filter(([, why]) => why !== null);
    it.each(cases)('refuses %s with PICKLE_FORMAT (%s)', async (name, why) => {
      const f = path.join(root, 'corrupt', name);
      const err = await loadTorchFile(f).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(PickleError);
      expect((err as PickleError).code).toBe('PICKLE_FORMAT');
      expect((err as PickleError).message).toContain(why as string);
      expect((err as PickleError).message).toContain(f);
      expect((err as PickleError).file).toBe(f);
    });

    it('reads the hand-made archive the corrupt ones derive from', async () => {
      const t = flattenTensors(await loadTorchFile(path.join(root, 'corrupt', 'valid_handmade.pt'))).w;
      expect(t.shape).toEqual([2, 2]);
      expect(Array.from(t.toArray() as Float32Array)).toEqual([1, 2, 3, 4]);
    });

    it('gives a clear message for the legacy format', async () => {
      await expect(loadTorchFile(path.join(root, 'corrupt', 'legacy_format.pt'))).rejects.toThrow(
        /legacy torch\.save file .*Re-save it with torch >= 1\.6.*or convert it to safetensors/,
      );
    });

    it('reports missing files and folders as FileError', async () => {
      await expect(loadTorchFile(path.join(tmp.dir, 'missing.bin'))).rejects.toBeInstanceOf(FileError);
      await expect(loadTorchFile(tmp.dir)).rejects.toBeInstanceOf(FileError);
    });

    it('survives every truncation and random damage of a real file without crashing', async () => {
      const src = fs.readFileSync(path.join(root, 'good', 'lightning.ckpt'));
      const entries = unzip(src);
      const pkl = entries.find(([n]) => n.endsWith('/data.pkl'))![1];
      let seed = 12345;
      const rand = (n: number) => {
        seed = (seed * 1103515245 + 12345) & 0x7fffffff;
        return seed % n;
      };
      const f = path.join(tmp.dir, 'fuzz.pt');
      let loaded = 0;
      let refused = 0;
      const attempt = async (bytes: Buffer) => {
        fs.writeFileSync(f, bytes);
        try {
          await loadTorchFile(f);
          loaded++;
        } catch (e) {
          expect(e).toBeInstanceOf(PickleError);
          refused++;
        }
      };
      for (let cut = 0; cut < src.length; cut += 61) await attempt(src.subarray(0, cut));
      // Damage inside the pickle, re-zipped with correct CRCs so the unpickler itself sees it.
      for (let i = 0; i < 400; i++) {
        const p = Buffer.from(pkl);
        for (let k = 1 + rand(3); k > 0; k--) p[rand(p.length)] = rand(256);
        const cut = rand(4) === 0 ? rand(p.length) : p.length;
        await attempt(zip(entries.map(([n, b]) => [n, n.endsWith('/data.pkl') ? p.subarray(0, cut) : b])));
      }
      expect(loaded + refused).toBe(400 + Math.ceil(src.length / 61));
      expect(refused).toBeGreaterThan(100);
      expect(loaded).toBeGreaterThan(0);
    });
  });
});
