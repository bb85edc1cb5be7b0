import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { ClipTokenizer, loadSafetensors, Tensor, TextEncoder } from '../../src';
import { composeDeltas, embedPrompts, readCaptions, selectEmbeddingRows, targetPrompts } from '../../src/delta/compose';
import { readDelta } from '../../src/delta/file';
import { repoRoot } from '../helpers/env';
import { relError } from '../helpers/numeric';

const FIX = path.join(repoRoot, 'test', 'fixtures', 'compose');
const MODEL = path.join(repoRoot, 'test', 'fixtures', 'parity', 'sd1', 'model');

describe('prompt rules (DF variant)', () => {
  it('builds target prompts with the art substring rule', () => {
    expect(targetPrompts('cat', '<new1>')).toEqual(['<new1> cat', 'photo of a <new1> cat']);
    expect(targetPrompts('cat', null)).toEqual(['cat', 'photo of a cat']);
    expect(targetPrompts('wooden cart', '<new2>')).toEqual(['<new2> wooden cart', 'painting in the style of <new2> wooden cart']);
    expect(targetPrompts('art', '<new1>')).toEqual(['<new1> art', 'painting in the style of <new1> art']);
  });

  it('selects rows: drop BOS (or 0–3 for "photo of a" in the first 15 chars), keep through EOS', () => {
    expect(selectEmbeddingRows('<new1> cat', [9, 1, 2, 8], 8)).toEqual({ start: 1, end: 4 });
    expect(selectEmbeddingRows('photo of a <new1> cat', [9, 3, 4, 5, 1, 2, 8, 8, 8], 8)).toEqual({ start: 4, end: 7 });
    // "a photo of a" puts "photo of a" at characters 2–11: still inside the first 15.
    expect(selectEmbeddingRows('a photo of a dog', [9, 5, 3, 4, 5, 6, 8], 8).start).toBe(4);
    // Beyond the first 15 characters it does not count.
    expect(selectEmbeddingRows('a very old cat, photo of a dog', [9, 1, 2, 3, 4, 5, 6, 7, 8], 8).start).toBe(1);
  });

  it('ships at least 1000 regularisation captions', () => {
    const caps = readCaptions(path.join(repoRoot, 'src', 'delta', 'regularization-captions.txt'));
    expect(caps.length).toBeGreaterThanOrEqual(1000);
    expect(new Set(caps).size).toBe(caps.length);
  });
});

describe('composeDeltas on the tiny SD1 fixture', () => {
  it('matches the float64 reference and writes a merged delta', async () => {
    const ref = (await loadSafetensors(path.join(FIX, 'reference.safetensors'))).tensors;
    const manifest = JSON.parse(fs.readFileSync(path.join(FIX, 'manifest.json'), 'utf8'));
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cd-compose-'));
    const out = path.join(dir, 'merged.safetensors');
    const r = await composeDeltas({
      deltas: [path.join(FIX, 'concept1.safetensors'), path.join(FIX, 'concept2.safetensors')],
      categories: manifest.categories,
      baseModel: MODEL,
      regularizationCaptions: path.join(FIX, 'reg_captions.txt'),
      output: out,
    });
    expect(r.concepts.map((c) => c.prompts)).toEqual(manifest.prompts);
    expect(r.targetRows).toBe(manifest.target_rows);
    expect(r.regRows).toBe(manifest.reg_rows);
    expect(r.delta.tokens.map((t) => [t.token, t.id])).toEqual(Object.entries(manifest.token_ids));
    let worst = 0;
    for (const [name, w] of Object.entries(r.weights)) worst = Math.max(worst, await relError(w, ref[`merged.${name}`]));
    const worstLayer = Math.max(...r.layers.map((l) => l.relConstraintResidual));
    console.log(`composeDeltas: max rel err vs reference ${worst.toExponential(2)}; max rel constraint residual ${worstLayer.toExponential(2)}`);
    // Our float32 text encoder matches transformers' to ~2e-7 relative, and KᵀK of this tiny fixture has
    // cond ≈ 1.5e7 (manifest cond_C), so the end-to-end weights can differ by ~1e-4; the closed form
    // itself is checked to 1e-6 on identical inputs in compose-layers.test.ts.
    expect(worst).toBeLessThanOrEqual(1e-3);
    expect(worstLayer).toBeLessThanOrEqual(1e-6);

    const back = await readDelta(out);
    expect(back.kind).toBe('merged');
    expect(back.tokens.map((t) => t.token)).toEqual(['<new1>', '<new2>']);
    expect(back.tokens[1].source_token).toBe('<new1>');
    expect(await relError(back.tokenRows['<new2>'], ref['token.<new2>'])).toBe(0);
    expect(back.baseModelFingerprint).toBe(manifest.base_model_fingerprint);
    expect(JSON.parse(back.metadata.concepts).length).toBe(2);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('embeds target and regularisation rows as transformers does (≤ 1e-6)', async () => {
    const ref = (await loadSafetensors(path.join(FIX, 'reference.safetensors'))).tensors;
    const manifest = JSON.parse(fs.readFileSync(path.join(FIX, 'manifest.json'), 'utf8'));
    const tok = await ClipTokenizer.fromFolder(path.join(MODEL, 'tokenizer'));
    const enc = await TextEncoder.load(path.join(MODEL, 'text_encoder'));
    const d1 = await readDelta(path.join(FIX, 'concept1.safetensors'));
    const d2 = await readDelta(path.join(FIX, 'concept2.safetensors'));
    const ids = tok.addTokens(['<new1>', '<new2>']);
    enc.resizeTokenEmbeddings(ids[1] + 1);
    enc.setTokenRows([ids[0]], Tensor.fromArray(d1.tokenRows['<new1>'].toArray(), [1, enc.hiddenSize]));
    enc.setTokenRows([ids[1]], Tensor.fromArray(d2.tokenRows['<new1>'].toArray(), [1, enc.hiddenSize]));
    const errs = [
      await relError(await embedPrompts(manifest.prompts[0], tok, enc), ref['kt.c1']),
      await relError(await embedPrompts(manifest.prompts[1], tok, enc), ref['kt.c2']),
      await relError(await embedPrompts(readCaptions(path.join(FIX, 'reg_captions.txt')), tok, enc), ref['kreg']),
    ];
    console.log(`embedding rel errors (c1, c2, reg): ${errs.map((e) => e.toExponential(2)).join(', ')}`);
    for (const e of errs) expect(e).toBeLessThanOrEqual(1e-6);
    enc.dispose();
  });

  it('refuses mismatched inputs', async () => {
    await expect(
      composeDeltas({ deltas: [path.join(FIX, 'concept1.safetensors')], categories: ['a', 'b'], baseModel: MODEL }),
    ).rejects.toThrow(/categories/);
    void Tensor;
  });
});
