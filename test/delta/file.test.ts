import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { saveSafetensors, Tensor } from '../../src';
import { compressDelta } from '../../src/delta/compress';
import { inspectDelta, readDelta } from '../../src/delta/file';
import { repoRoot } from '../helpers/env';

const FIX = path.join(repoRoot, 'test', 'fixtures', 'compose');
const MODEL = path.join(repoRoot, 'test', 'fixtures', 'parity', 'sd1', 'model');

describe('delta files', () => {
  let dir: string;
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cd-delta-file-'));
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('inspects a trainer-format delta', async () => {
    const info = await inspectDelta(path.join(FIX, 'concept1.safetensors'));
    expect(info.kind).toBe('full');
    expect(info.tokens.map((t) => t.token)).toEqual(['<new1>']);
    expect(info.layers.length).toBe(14);
    expect(info.layers.every((l) => /attn2\.to_[kv]\.weight$/.test(l.name))).toBe(true);
    expect(info.baseModelFingerprint).toMatch(/^[0-9a-f]{64}$/);
  });

  it('refuses a safetensors file that is not a delta', async () => {
    const f = path.join(dir, 'plain.safetensors');
    await saveSafetensors(f, { a: Tensor.zeros([2]) }, {});
    await expect(readDelta(f)).rejects.toThrow(/not a Custom Diffusion delta/);
  });

  it('compresses a delta file against the base model (paper rule by default) and reads it back', async () => {
    const out = path.join(dir, 'compressed.safetensors');
    const r = await compressDelta({ delta: path.join(FIX, 'concept1.safetensors'), baseModel: MODEL, ratio: 0.6, output: out });
    const back = await readDelta(out);
    expect(back.kind).toBe('compressed');
    expect(Object.keys(back.factors).length).toBe(14);
    expect(Object.keys(back.weights).length).toBe(0);
    expect(back.tokenRows['<new1>'].shape).toEqual([32]);
    for (const [n, f] of Object.entries(back.factors)) {
      expect(f.u.shape[1]).toBe(r.layers[n].rank);
      expect(r.layers[n].keptFraction).toBeLessThanOrEqual(0.6 + 1e-12);
    }
    const meta = JSON.parse(back.metadata.compression);
    expect(meta.keep_crossing).toBe(false);
    const info = await inspectDelta(out);
    expect(info.layers[0].rank).toBeGreaterThan(0);
  });
});
