import * as path from 'path';
import { ClipTokenizer, TextEncoder, UNet } from '../../src';
import { applyDelta, DeltaMismatchError } from '../../src/delta/apply';
import { readDelta, writeDeltaFile } from '../../src/delta/file';
import { compressLayers } from '../../src/delta/compress';
import { repoRoot } from '../helpers/env';
import { maxAbsDiff, relError, values } from '../helpers/numeric';
import * as os from 'os';
import * as fs from 'fs';

const MODEL = path.join(repoRoot, 'test', 'fixtures', 'parity', 'sd1', 'model');
const FIX = path.join(repoRoot, 'test', 'fixtures', 'compose');
const KV = /attn2\.to_[kv]\.weight$/;

describe('applyDelta / unapply', () => {
  let unet: UNet;
  let enc: TextEncoder;

  beforeAll(async () => {
    unet = await UNet.load(path.join(MODEL, 'unet'));
    enc = await TextEncoder.load(path.join(MODEL, 'text_encoder'));
  });
  afterAll(() => {
    unet.dispose();
    enc.dispose();
  });

  it('replaces K/V, adds the token row, and unapply restores the base bit for bit', async () => {
    const delta = await readDelta(path.join(FIX, 'concept1.safetensors'));
    expect(delta.kind).toBe('full');
    const before = Object.fromEntries(Object.entries(unet.allParameters((n) => KV.test(n))).map(([k, t]) => [k, values(t)]));
    const vocab = enc.vocabSize;
    const tok = await ClipTokenizer.fromFolder(path.join(MODEL, 'tokenizer'));
    const t0 = Date.now();
    const applied = await applyDelta(delta, { unet, textEncoder: enc, tokenizer: tok });
    const ms = Date.now() - t0;
    console.log(`apply (fingerprint check included) took ${ms} ms`);
    expect(applied.tokenIds['<new1>']).toBe(vocab);
    expect(enc.vocabSize).toBe(vocab + 1);
    const now = unet.allParameters((n) => KV.test(n));
    expect(Object.keys(now).length).toBe(Object.keys(delta.weights).length);
    for (const [n, t] of Object.entries(now)) expect(await maxAbsDiff(t, delta.weights[n])).toBe(0);
    expect(values(enc.tokenRows([vocab]))).toEqual(values(delta.tokenRows['<new1>']));

    applied.unapply();
    expect(enc.vocabSize).toBe(vocab);
    for (const [n, t] of Object.entries(unet.allParameters((n) => KV.test(n)))) expect(values(t)).toEqual(before[n]);
    expect(() => applied.unapply()).toThrow(/already/);
  });

  it('applies a compressed delta as W0 + u·v', async () => {
    const delta = await readDelta(path.join(FIX, 'concept1.safetensors'));
    const base = unet.allParameters((n) => KV.test(n));
    const factors = await compressLayers(delta.weights, base, { ratio: 1.0 });
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cd-delta-'));
    const file = path.join(dir, 'compressed.safetensors');
    await writeDeltaFile(file, {
      kind: 'compressed',
      freezeModel: 'crossattn_kv',
      tokens: delta.tokens,
      baseModelFingerprint: delta.baseModelFingerprint,
      factors: Object.fromEntries(Object.entries(factors).map(([k, f]) => [k, { u: f.u, v: f.v }])),
      tokenRows: delta.tokenRows,
    });
    const c = await readDelta(file);
    expect(c.kind).toBe('compressed');
    const snapshot = Object.fromEntries(Object.entries(base).map(([k, t]) => [k, values(t)]));
    const applied = await applyDelta(c, { unet, textEncoder: enc });
    for (const [n, t] of Object.entries(unet.allParameters((n) => KV.test(n)))) {
      expect(await relError(t, delta.weights[n])).toBeLessThan(1e-6);
    }
    applied.unapply();
    for (const [n, t] of Object.entries(unet.allParameters((n) => KV.test(n)))) expect(values(t)).toEqual(snapshot[n]);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('refuses a delta whose layers do not match, or another base model unless forced', async () => {
    const delta = await readDelta(path.join(FIX, 'concept1.safetensors'));
    const name = Object.keys(delta.weights)[0];
    const wrongShape = { ...delta, weights: { ...delta.weights, [name]: delta.weights[Object.keys(delta.weights).find((n) => delta.weights[n].shape[0] !== delta.weights[name].shape[0])!] } };
    await expect(applyDelta(wrongShape, { unet, textEncoder: enc })).rejects.toThrow(DeltaMismatchError);
    await expect(applyDelta(wrongShape, { unet, textEncoder: enc })).rejects.toThrow(/another model size/);
    const unknown = { ...delta, weights: { 'mid_block.nope.weight': delta.weights[name] } };
    await expect(applyDelta(unknown, { unet, textEncoder: enc })).rejects.toThrow(/does not exist in this UNet/);
    const other = { ...delta, baseModelFingerprint: '0'.repeat(64) };
    await expect(applyDelta(other, { unet, textEncoder: enc })).rejects.toThrow(/fingerprints differ/);
    const forced = await applyDelta(other, { unet, textEncoder: enc }, { force: true });
    forced.unapply();
  });
});
