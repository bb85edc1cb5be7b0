import * as path from 'path';
import { AbortError, Tensor, loadSafetensors } from '../../src';
import { composeLayers } from '../../src/delta/compose';
import { repoRoot } from '../helpers/env';
import { relError, toFloat64 } from '../helpers/numeric';

const FIX = path.join(repoRoot, 'test', 'fixtures', 'compose');

/** ‖K Wᵀ − V‖_F / ‖V‖_F with V = K Wcᵀ, in float64 in JS (independent of the native code). */
async function targetRelError(k: Tensor, w: Tensor, wc: Tensor): Promise<number> {
  const [m, d] = k.shape;
  const out = w.shape[0];
  const K = await toFloat64(k);
  const W = await toFloat64(w);
  const Wc = await toFloat64(wc);
  let num = 0;
  let den = 0;
  for (let i = 0; i < m; i++) {
    for (let o = 0; o < out; o++) {
      let a = 0;
      let b = 0;
      for (let j = 0; j < d; j++) {
        a += K[i * d + j] * W[o * d + j];
        b += K[i * d + j] * Wc[o * d + j];
      }
      num += (a - b) ** 2;
      den += b * b;
    }
  }
  return Math.sqrt(num / den);
}

describe('composeLayers (closed-form merge)', () => {
  let ref: Record<string, Tensor>;
  let c1: Record<string, Tensor>;
  let c2: Record<string, Tensor>;
  let base: Record<string, Tensor>;

  beforeAll(async () => {
    ref = (await loadSafetensors(path.join(FIX, 'reference.safetensors'))).tensors;
    c1 = (await loadSafetensors(path.join(FIX, 'concept1.safetensors'))).tensors;
    c2 = (await loadSafetensors(path.join(FIX, 'concept2.safetensors'))).tensors;
    const unet = await loadSafetensors(
      path.join(repoRoot, 'test', 'fixtures', 'parity', 'sd1', 'model', 'unet', 'diffusion_pytorch_model.safetensors'),
      { dtype: 'float32' },
    );
    base = Object.fromEntries(Object.entries(unet.tensors).filter(([k]) => /attn2\.to_[kv]\.weight$/.test(k)));
  });

  const kv = (d: Record<string, Tensor>) => Object.fromEntries(Object.entries(d).filter(([k]) => !k.startsWith('<')));

  it('reproduces each concept target W k = v and equals the float64 reference', async () => {
    const r = await composeLayers(
      base,
      [
        { keys: ref['kt.c1'], weights: kv(c1) },
        { keys: ref['kt.c2'], weights: kv(c2) },
      ],
      ref['kreg'],
      { outDtype: 'float64' },
    );
    expect(Object.keys(r.weights).sort()).toEqual(Object.keys(base).sort());
    expect(r.duplicateRows).toBe(0);
    expect(r.targetRows).toBe(ref['kt.c1'].shape[0] + ref['kt.c2'].shape[0]);
    expect(r.regRows).toBe(ref['kreg'].shape[0]);
    let worstRef = 0;
    let worstTarget = 0;
    for (const name of Object.keys(base)) {
      worstRef = Math.max(worstRef, await relError(r.weights[name], ref[`merged.${name}`]));
      worstTarget = Math.max(worstTarget, await targetRelError(ref['kt.c1'], r.weights[name], c1[name]));
      worstTarget = Math.max(worstTarget, await targetRelError(ref['kt.c2'], r.weights[name], c2[name]));
    }
    console.log(`compose fixture: max rel err vs reference ${worstRef.toExponential(2)}, max target rel err ${worstTarget.toExponential(2)}, solver ${r.solver}`);
    expect(worstRef).toBeLessThanOrEqual(1e-6);
    expect(worstTarget).toBeLessThanOrEqual(1e-6);
    for (const l of r.layers) {
      expect(l.relConstraintResidual).toBeLessThanOrEqual(1e-6);
      expect(l.regError).toBeGreaterThan(0);
    }
  });

  it('float32 output still meets W k = v to 1e-6 relative', async () => {
    const r = await composeLayers(base, [{ keys: ref['kt.c1'], weights: kv(c1) }, { keys: ref['kt.c2'], weights: kv(c2) }], ref['kreg']);
    const name = Object.keys(base)[0];
    expect(r.weights[name].dtype).toBe('float32');
    expect(await relError(r.weights[name], ref[`merged.${name}`])).toBeLessThanOrEqual(1e-6);
  });

  it('removes duplicate target rows (a concept repeated) and gives the same merge', async () => {
    // Concept 2 listed twice: its rows are exact duplicates, so the merge equals the two-concept one.
    const r = await composeLayers(
      base,
      [
        { keys: ref['kt.c1'], weights: kv(c1) },
        { keys: ref['kt.c2'], weights: kv(c2) },
        { keys: ref['kt.c2'], weights: kv(c2) },
      ],
      ref['kreg'],
      { outDtype: 'float64' },
    );
    expect(r.duplicateRows).toBe(ref['kt.c2'].shape[0]);
    for (const name of Object.keys(base)) {
      expect(await relError(r.weights[name], ref[`merged.${name}`])).toBeLessThanOrEqual(1e-6);
    }
  });

  it('a concept that leaves a layer out keeps W0 as its target there', async () => {
    const name = Object.keys(base)[0];
    const partial = { ...kv(c2) };
    delete partial[name];
    const r = await composeLayers(base, [{ keys: ref['kt.c2'], weights: partial }], ref['kreg'], { outDtype: 'float64' });
    // Target v = W0 k and minimal change → W = W0.
    expect(await relError(r.weights[name], base[name])).toBeLessThanOrEqual(1e-9);
  });

  it('honours an aborted signal and reports progress per layer', async () => {
    const ac = new AbortController();
    ac.abort();
    await expect(
      composeLayers(base, [{ keys: ref['kt.c1'], weights: kv(c1) }], ref['kreg'], { signal: ac.signal }),
    ).rejects.toThrow(AbortError);
    const seen: number[] = [];
    await composeLayers(base, [{ keys: ref['kt.c1'], weights: kv(c1) }], ref['kreg'], { onProgress: (p) => seen.push(p.done) });
    expect(seen).toEqual(Object.keys(base).map((_, i) => i + 1));
  });

  it('refuses mismatched widths and unknown layers with clear errors', async () => {
    const name = Object.keys(base)[0];
    await expect(
      composeLayers(base, [{ keys: Tensor.zeros([3, 7]), weights: {} }], ref['kreg']),
    ).rejects.toThrow(/keys must be \[rows × 32\]/);
    await expect(
      composeLayers(base, [{ keys: ref['kt.c1'], weights: { 'nope.weight': base[name] } }], ref['kreg']),
    ).rejects.toThrow(/not among the base layers/);
    await expect(
      composeLayers(base, [{ keys: ref['kt.c1'], weights: { [name]: Tensor.zeros([5, 32]) } }], ref['kreg']),
    ).rejects.toThrow(/has shape/);
  });
});
