import { Tensor } from '../../src';
import { compressLayers } from '../../src/delta/compress';
import { relError, toFloat64 } from '../helpers/numeric';

/** Deterministic pseudo-random numbers (LCG), so the test needs no fixture. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296 - 0.5;
  };
}

/** n orthonormal vectors of length len (Gram–Schmidt on random vectors). */
function orthonormal(n: number, len: number, next: () => number): number[][] {
  const out: number[][] = [];
  while (out.length < n) {
    const v = Array.from({ length: len }, next);
    for (const u of out) {
      const d = u.reduce((a, x, i) => a + x * v[i], 0);
      for (let i = 0; i < len; i++) v[i] -= d * u[i];
    }
    const norm = Math.sqrt(v.reduce((a, x) => a + x * x, 0));
    out.push(v.map((x) => x / norm));
  }
  return out;
}

/** base W0 and tuned W = W0 + U diag(s) Vᵀ with known singular values s. */
function makeLayer(out: number, inp: number, s: number[], seed: number): { base: Tensor; tuned: Tensor } {
  const next = rng(seed);
  const U = orthonormal(s.length, out, next);
  const V = orthonormal(s.length, inp, next);
  const w0 = new Float32Array(out * inp).map(() => next());
  const w = new Float32Array(out * inp);
  for (let o = 0; o < out; o++) {
    for (let i = 0; i < inp; i++) {
      let d = 0;
      for (let k = 0; k < s.length; k++) d += s[k] * U[k][o] * V[k][i];
      w[o * inp + i] = w0[o * inp + i] + d;
    }
  }
  return { base: Tensor.fromArray(w0, [out, inp]), tuned: Tensor.fromArray(w, [out, inp]) };
}

/** The paper's rule, computed here independently: first 0-based i with Σ_{j≤i} s_j / Σ s > ratio → r = i. */
function paperRank(s: number[], ratio: number): number {
  const total = s.reduce((a, x) => a + x, 0);
  let cum = 0;
  for (let i = 0; i < s.length; i++) {
    cum += s[i];
    if (cum / total > ratio) return i;
  }
  return s.length;
}

const S = [5, 4, 3, 2.5, 2, 1.5, 1, 0.8, 0.5, 0.3, 0.2, 0.1];

describe('compressLayers', () => {
  const L = makeLayer(40, 32, S, 7);
  const name = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight';

  it('ratio 1.0 is near lossless', async () => {
    const r = (await compressLayers({ [name]: L.tuned }, { [name]: L.base }, { ratio: 1.0 }))[name];
    expect(r.u.shape[0]).toBe(40);
    expect(r.v.shape[1]).toBe(32);
    console.log(`ratio 1.0: rank ${r.rank}, rel err ${r.relError.toExponential(2)}`);
    expect(r.relError).toBeLessThan(1e-5);
  });

  it('ratio 0.6 follows the paper rank rule (crossing component dropped) by default', async () => {
    const expected = paperRank(S, 0.6);
    expect(expected).toBe(3); // cumulative 0.239, 0.431, 0.574, 0.694 > 0.6 at i = 3 → r = 3
    const r = (await compressLayers({ [name]: L.tuned }, { [name]: L.base }, { ratio: 0.6 }))[name];
    expect(r.rank).toBe(expected);
    expect(r.u.shape).toEqual([40, expected]);
    expect(r.v.shape).toEqual([expected, 32]);
    expect(r.zeroRank).toBe(false);
    const total = S.reduce((a, x) => a + x, 0);
    expect(r.keptFraction).toBeCloseTo((5 + 4 + 3) / total, 6);
    // The error of the best rank-r approximation: sqrt(Σ_{i≥r} s_i²) / sqrt(Σ s_i²).
    const tail = Math.sqrt(S.slice(expected).reduce((a, x) => a + x * x, 0) / S.reduce((a, x) => a + x * x, 0));
    expect(Math.abs(r.relError - tail)).toBeLessThan(1e-5);
    // u·v is ΔW's rank-r part: u = U_r diag(s_r) has column norms s_r.
    const u = await toFloat64(r.u);
    for (let k = 0; k < expected; k++) {
      let n = 0;
      for (let o = 0; o < 40; o++) n += u[o * expected + k] ** 2;
      expect(Math.sqrt(n)).toBeCloseTo(S[k], 4);
    }
  });

  it('keepCrossing keeps the crossing component too', async () => {
    const r = (await compressLayers({ [name]: L.tuned }, { [name]: L.base }, { ratio: 0.6, keepCrossing: true }))[name];
    expect(r.rank).toBe(paperRank(S, 0.6) + 1);
  });

  it('fixed rank, clamped to min(out, in)', async () => {
    const r = (await compressLayers({ [name]: L.tuned }, { [name]: L.base }, { rank: 5 }))[name];
    expect(r.rank).toBe(5);
    expect(r.u.shape).toEqual([40, 5]);
    const big = (await compressLayers({ [name]: L.tuned }, { [name]: L.base }, { rank: 1000 }))[name];
    expect(big.rank).toBe(32);
    expect(big.relError).toBeLessThan(1e-5);
  });

  it('rank 0 is flagged', async () => {
    const one = makeLayer(10, 8, [10, 0.5, 0.1], 3);
    const r = (await compressLayers({ a: one.tuned }, { a: one.base }, { ratio: 0.6 }))['a'];
    expect(r.rank).toBe(0);
    expect(r.zeroRank).toBe(true);
    expect(r.u.shape).toEqual([10, 0]);
    expect(r.relError).toBeCloseTo(1, 6);
  });

  it('W0 + u·v reconstructs the tuned weight at full rank', async () => {
    const r = (await compressLayers({ [name]: L.tuned }, { [name]: L.base }, { ratio: 1.0, outDtype: 'float64' }))[name];
    const u = await toFloat64(r.u);
    const v = await toFloat64(r.v);
    const w0 = await toFloat64(L.base);
    const rec = new Float32Array(40 * 32);
    for (let o = 0; o < 40; o++)
      for (let i = 0; i < 32; i++) {
        let d = 0;
        for (let k = 0; k < r.rank; k++) d += u[o * r.rank + k] * v[k * 32 + i];
        rec[o * 32 + i] = w0[o * 32 + i] + d;
      }
    expect(await relError(Tensor.fromArray(rec, [40, 32]), L.tuned)).toBeLessThan(1e-6);
  });

  it('refuses bad options and missing base layers', async () => {
    await expect(compressLayers({ [name]: L.tuned }, { [name]: L.base }, { ratio: 1.5 })).rejects.toThrow(/ratio/);
    await expect(compressLayers({ [name]: L.tuned }, {}, {})).rejects.toThrow(/no base weight/);
    await expect(compressLayers({ [name]: L.tuned }, { [name]: Tensor.zeros([3, 3]) }, {})).rejects.toThrow(/same shape/);
  });
});
