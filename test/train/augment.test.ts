import { createHash } from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { InvalidArgumentError } from '../../src/errors';
import {
  applyClassAugment,
  applyInstanceAugment,
  augmentInstance,
  branchOf,
  classResizedSize,
  drawClassAugment,
  drawInstanceAugment,
  FAR_PREFIXES,
  latentMask,
  prepareClassImage,
  prepareInstanceImage,
  resizeRgbSync,
  Rng,
  toFloatCHW,
  ZOOM_PREFIXES,
  type AugmentStyle,
  type InstanceAugmentParams,
  type RgbImage,
} from '../../src/train';
import { repoRoot } from '../helpers/env';
import { maxAbsDiff, pattern, rawImage } from './util';

function sha256(a: Float32Array): string {
  return createHash('sha256').update(Buffer.from(a.buffer, a.byteOffset, a.byteLength)).digest('hex');
}

function textured(width: number, height: number, seed = 1): RgbImage {
  return { width, height, data: new Uint8Array(rawImage(width, height, 3, pattern(seed))) };
}

/** The mask rule restated literally: ones on rows [(cx−s//2)//8+1, (cx+s//2)//8−1) × cols likewise. */
function referenceMask(size: number, s: number, cx: number, cy: number): number[] {
  const n = size / 8;
  const h = Math.floor(s / 2);
  const r0 = Math.floor((cx - h) / 8) + 1;
  const r1 = Math.floor((cx + h) / 8) - 1;
  const c0 = Math.floor((cy - h) / 8) + 1;
  const c1 = Math.floor((cy + h) / 8) - 1;
  const out: number[] = [];
  for (let r = 0; r < n; r++) for (let c = 0; c < n; c++) out.push(r >= r0 && r < r1 && c >= c0 && c < c1 ? 1 : 0);
  return out;
}

/** [first, last] rows and columns holding ones, or null for an empty mask. */
function onesBox(mask: Float32Array, n: number): [number, number, number, number] | null {
  let r0 = n, r1 = -1, c0 = n, c1 = -1;
  for (let r = 0; r < n; r++) {
    for (let c = 0; c < n; c++) {
      const v = mask[r * n + c];
      if (v === 1) {
        r0 = Math.min(r0, r); r1 = Math.max(r1, r); c0 = Math.min(c0, c); c1 = Math.max(c1, c);
      } else if (v !== 0) throw new Error(`mask value ${v} at (${r}, ${c})`);
    }
  }
  return r1 < 0 ? null : [r0, r1, c0, c1];
}

describe('train/rng', () => {
  it('is xoshiro128** (reference output for state 1,2,3,4)', () => {
    const r = Rng.fromState({ algorithm: 'xoshiro128**', s: [1, 2, 3, 4] });
    const out = Array.from({ length: 10 }, () => r.nextUint32());
    expect(out).toEqual([11520, 0, 5927040, 70819200, 2031721883, 1637235492, 1287239034, 3734860849, 3729100597, 4258142804]);
  });

  it('is seeded with SplitMix64 (values from the C reference implementations)', () => {
    const r = Rng.fromSeed(42);
    expect(Array.from({ length: 5 }, () => r.nextUint32())).toEqual([1776835114, 4165204688, 17111135, 2317295270, 2792088233]);
    expect(Rng.fromSeed(42n).getState()).toEqual(Rng.fromSeed(42).getState());
    expect(Rng.fromSeed(42, 1).getState()).not.toEqual(Rng.fromSeed(42).getState());
    expect(Rng.fromSeed(2n ** 64n - 1n).nextUint32()).toBeGreaterThanOrEqual(0);
  });

  it('round-trips its state through JSON and continues identically', () => {
    const a = Rng.fromSeed(7);
    for (let i = 0; i < 13; i++) a.nextUint32();
    const saved = JSON.parse(JSON.stringify(a.getState()));
    const b = Rng.fromState(saved);
    const xs = Array.from({ length: 50 }, () => a.int(0, 1000));
    const ys = Array.from({ length: 50 }, () => b.int(0, 1000));
    expect(ys).toEqual(xs);
    expect(() => Rng.fromState({ algorithm: 'xoshiro128**', s: [0, 0, 0, 0] })).toThrow(InvalidArgumentError);
    expect(() => Rng.fromState({ algorithm: 'pcg32', s: [1, 2, 3, 4] } as never)).toThrow(InvalidArgumentError);
    expect(() => Rng.fromState({ algorithm: 'xoshiro128**', s: [1, 2, 3, 2 ** 32] })).toThrow(InvalidArgumentError);
  });

  it('draws integers uniformly over inclusive ranges', () => {
    const r = Rng.fromSeed(3);
    const counts = new Array(7).fill(0);
    const N = 70000;
    for (let i = 0; i < N; i++) counts[r.int(10, 16) - 10]++;
    for (const c of counts) expect(Math.abs(c / N - 1 / 7)).toBeLessThan(0.006);
    expect(() => r.int(5, 4)).toThrow(InvalidArgumentError);
    expect(r.int(9, 9)).toBe(9);
    const perm = r.permutation(20);
    expect([...perm].sort((x, y) => x - y)).toEqual(Array.from({ length: 20 }, (_, i) => i));
  });
});

describe('train/augment: draws', () => {
  const size = 512;
  const N = 30000;
  const draws: InstanceAugmentParams[] = [];
  beforeAll(() => {
    const rng = Rng.fromSeed(1234);
    for (let i = 0; i < N; i++) draws.push(drawInstanceAugment(rng, { size }));
  });

  it('picks the small range 2/3 of the time and the large one 1/3, with the branch frequencies 0.266/0.400/0.333', () => {
    const small = draws.filter((d) => d.scale <= size).length / N;
    expect(Math.abs(small - 2 / 3)).toBeLessThan(0.01);
    const freq = (b: string) => draws.filter((d) => d.branch === b).length / N;
    // Exact: far = 2/3 · 137/343 (raw draws 170…306), full = 2/3 · 206/343, zoom = 1/3.
    expect(Math.abs(freq('far') - (2 / 3) * (137 / 343))).toBeLessThan(0.01);
    expect(Math.abs(freq('full') - (2 / 3) * (206 / 343))).toBeLessThan(0.01);
    expect(Math.abs(freq('zoom') - 1 / 3)).toBeLessThan(0.01);
    expect(Math.abs(freq('far') - 0.266)).toBeLessThan(0.01);
    expect(Math.abs(freq('full') - 0.4)).toBeLessThan(0.01);
  });

  it('keeps s even and within the ranges, and centres within their bounds', () => {
    // Plain checks collected, then one assertion: 30 000 jest expectations would be slow.
    const bad = draws.filter((d) => {
      if (d.scale % 2 !== 0 || d.branch !== branchOf(d.scale, size)) return true;
      if (d.scale <= size ? d.scale < 170 : d.scale < 614 || d.scale > 716) return true;
      if (d.branch === 'far') {
        return d.scale >= 0.6 * size || [d.cx, d.cy].some((c) => c < d.scale / 2 || c > size - d.scale / 2);
      }
      if (d.branch === 'zoom') return [d.cx, d.cy].some((c) => c < size / 2 || c > d.scale - size / 2);
      return d.cx !== -1 || d.cy !== -1;
    });
    expect(bad).toEqual([]);
    expect(new Set(draws.map((d) => d.scale)).size).toBe(172 + 52); // even values of 170…512 and 614…716
    // Both extremes of the centre ranges occur (upper bounds inclusive, as numpy's randint(lo, hi + 1)).
    const far = draws.filter((d) => d.branch === 'far');
    expect(far.some((d) => d.cx === d.scale / 2)).toBe(true);
    expect(far.some((d) => d.cy === size - d.scale / 2)).toBe(true);
    const zoom = draws.filter((d) => d.branch === 'zoom');
    expect(zoom.some((d) => d.cx === size / 2)).toBe(true);
    expect(zoom.some((d) => d.cy === d.scale - size / 2)).toBe(true);
  });

  it('prefixes exactly one of the four strings, with a trailing space, 50/50 within a branch', () => {
    const exact = ['a far away ', 'very small ', 'zoomed in ', 'close up '];
    expect([...FAR_PREFIXES, ...ZOOM_PREFIXES]).toEqual(exact);
    const bad = draws.filter((d) => {
      if (d.branch === 'far') return !(FAR_PREFIXES as readonly string[]).includes(d.prefix);
      if (d.branch === 'zoom') return !(ZOOM_PREFIXES as readonly string[]).includes(d.prefix);
      return d.prefix !== '';
    });
    expect(bad).toEqual([]);
    for (const p of exact) expect(p.endsWith(' ') && !p.endsWith('  ') && p.trim() === p.slice(0, -1)).toBe(true);
    const far = draws.filter((d) => d.branch === 'far');
    const zoom = draws.filter((d) => d.branch === 'zoom');
    expect(Math.abs(far.filter((d) => d.prefix === 'a far away ').length / far.length - 0.5)).toBeLessThan(0.02);
    expect(Math.abs(zoom.filter((d) => d.prefix === 'zoomed in ').length / zoom.length - 0.5)).toBeLessThan(0.02);
  });

  it('flips half the time, or never with hflip off', () => {
    expect(Math.abs(draws.filter((d) => d.flip).length / N - 0.5)).toBeLessThan(0.01);
    const rng = Rng.fromSeed(9);
    for (let i = 0; i < 500; i++) expect(drawInstanceAugment(rng, { size, hflip: false }).flip).toBe(false);
  });

  it('noaug: s = size, full branch, no prefix, and only the flip is drawn', () => {
    const rng = Rng.fromSeed(10);
    const ref = Rng.fromSeed(10);
    for (let i = 0; i < 200; i++) {
      const d = drawInstanceAugment(rng, { size, noaug: true });
      expect(d).toMatchObject({ scale: size, branch: 'full', prefix: '', cx: -1, cy: -1 });
      ref.nextUint32();
    }
    expect(rng.getState()).toEqual(ref.getState());
  });

  it('same seed, same draws', () => {
    const a = Rng.fromSeed(1234);
    const again = Array.from({ length: 100 }, () => drawInstanceAugment(a, { size }));
    expect(again).toEqual(draws.slice(0, 100));
  });
});

describe('train/augment: masks', () => {
  it.each([
    // [s, cx, cy, first row, last row, first col, last col] (inclusive), computed by hand
    [200, 100, 300, 1, 23, 26, 48],
    [170, 85, 427, 1, 19, 43, 62],
    [306, 153, 359, 1, 36, 26, 62],
    [172, 90, 256, 1, 20, 22, 40],
    [22, 11, 501, 0, 2, 62, 62], // rows 1 … 1 exclusive would be empty: the cells the square touches
  ])('s=%i cx=%i cy=%i → rows %i…%i, cols %i…%i', (s, cx, cy, r0, r1, c0, c1) => {
    const m = latentMask(512, s, cx, cy);
    expect(m.length).toBe(64 * 64);
    const box = onesBox(m, 64);
    if (r1 < r0) expect(box).toBeNull();
    else expect(box).toEqual([r0, r1, c0, c1]);
  });

  it('matches the slice rule for every centre of several scales', () => {
    let checked = 0;
    for (const s of [170, 204, 250, 306]) {
      for (let cx = s / 2; cx <= 512 - s / 2; cx += 7) {
        const cy = 512 - cx;
        const got = Array.from(latentMask(512, s, cx, cy)).join('');
        if (got !== referenceMask(512, s, cx, cy).join('')) throw new Error(`mask differs for s=${s} cx=${cx} cy=${cy}`);
        checked++;
      }
    }
    expect(checked).toBeGreaterThan(150);
    expect(() => latentMask(512, 200, 99, 300)).toThrow(InvalidArgumentError);
  });
});

describe('train/augment: pixels', () => {
  const size = 64;
  const img = textured(90, 70);

  it('pastes the s×s resize at the centre and leaves exactly 0 elsewhere', async () => {
    const params: InstanceAugmentParams = { flip: false, scale: 30, branch: 'far', prefix: 'very small ', cx: 20, cy: 40 };
    const prepared = prepareInstanceImage(img, 'compvis');
    expect([prepared.width, prepared.height]).toEqual([70, 70]);
    const { pixels, mask } = await applyInstanceAugment(prepared, params, { size });
    expect(pixels.length).toBe(3 * size * size);
    const small = toFloatCHW(resizeRgbSync(prepared, 30, 30, 'bicubic'));
    const wrong: string[] = [];
    let outside = 0;
    for (let c = 0; c < 3; c++) {
      for (let y = 0; y < size; y++) {
        for (let x = 0; x < size; x++) {
          const v = pixels[c * size * size + y * size + x];
          const inside = y >= 5 && y < 35 && x >= 25 && x < 55;
          const want = inside ? small[c * 900 + (y - 5) * 30 + (x - 25)] : 0;
          if (!inside) outside++;
          if (v !== want || (inside && v === 0)) wrong.push(`${c},${y},${x}: ${v} vs ${want}`);
        }
      }
    }
    expect(wrong).toEqual([]);
    expect(outside).toBe(3 * (64 * 64 - 30 * 30));
    // A byte maps to x/127.5 − 1, never to 0: the pasted region is entirely non-zero.
    expect(Array.from(mask)).toEqual(referenceMask(size, 30, 20, 40));
    expect(onesBox(mask, 8)).toEqual([1, 2, 4, 4]); // rows [5, 35) → 0+1 … 4−1; cols [25, 55) → 3+1 … 6−1
  });

  it('crops the zoomed resize around its centre, mask all ones', async () => {
    const params: InstanceAugmentParams = { flip: true, scale: 84, branch: 'zoom', prefix: 'close up ', cx: 40, cy: 50 };
    const prepared = prepareInstanceImage(img, 'diffusers');
    const { pixels, mask } = await applyInstanceAugment(prepared, params, { size, style: 'diffusers' });
    const big = toFloatCHW(resizeRgbSync(prepared, 84, 84, 'bilinear'));
    // Flipped: output column x is column 83 − (x + 18) of the unflipped resize.
    for (const [c, y, x] of [[0, 0, 0], [1, 10, 63], [2, 63, 31]]) {
      expect(pixels[c * size * size + y * size + x]).toBe(big[c * 84 * 84 + (y + 8) * 84 + (83 - (x + 18))]);
    }
    expect(Array.from(mask).every((v) => v === 1)).toBe(true);
  });

  it('noaug gives the full-size resize, all-ones mask and the prompt unchanged', async () => {
    const out = await augmentInstance(img, 'photo of a <new1> cat', Rng.fromSeed(4), { size, noaug: true, hflip: false });
    expect(out.prompt).toBe('photo of a <new1> cat');
    expect(out.params).toMatchObject({ branch: 'full', scale: size, flip: false });
    expect(Array.from(out.mask).every((v) => v === 1)).toBe(true);
    expect(maxAbsDiff(out.pixels, toFloatCHW(resizeRgbSync(prepareInstanceImage(img), size, size, 'bicubic')))).toBe(0);
  });

  it('same seed → same pixels, mask and prompt; the prefix is prepended to the whole prompt', async () => {
    for (let seed = 0; seed < 6; seed++) {
      const a = await augmentInstance(img, 'photo of a <new1> cat', Rng.fromSeed(seed), { size });
      const b = await augmentInstance(img, 'photo of a <new1> cat', Rng.fromSeed(seed), { size });
      expect(sha256(a.pixels)).toBe(sha256(b.pixels));
      expect(Array.from(a.mask)).toEqual(Array.from(b.mask));
      expect(a.prompt).toBe(b.prompt);
      expect(a.prompt).toBe(a.params.prefix + 'photo of a <new1> cat');
    }
  });

  it('rejects inconsistent parameters', async () => {
    const bad: InstanceAugmentParams = { flip: false, scale: 60, branch: 'far', prefix: 'very small ', cx: 32, cy: 32 };
    await expect(applyInstanceAugment(img, bad, { size })).rejects.toThrow(/full branch/);
    await expect(applyInstanceAugment(img, { ...bad, scale: 30, cx: 2 }, { size })).rejects.toThrow(InvalidArgumentError);
    expect(() => drawInstanceAugment(Rng.fromSeed(1), { size: 100 })).toThrow(/multiple of 8/);
  });

  it('class images: compvis draws only the flip; diffusers draws flip, top, left; center crop rounds half to even', () => {
    const a = Rng.fromSeed(2);
    const ref = Rng.fromSeed(2);
    const p = drawClassAugment(a, 64, 64, { size: 64 });
    ref.nextUint32();
    expect(a.getState()).toEqual(ref.getState());
    expect([p.top, p.left]).toEqual([0, 0]);

    expect(classResizedSize(101, 83, { size: 64, style: 'diffusers' })).toEqual({ width: 77, height: 64 });
    expect(classResizedSize(83, 101, { size: 64, style: 'diffusers' })).toEqual({ width: 64, height: 77 });
    expect(drawClassAugment(a, 77, 64, { size: 64, style: 'diffusers', centerCrop: true })).toMatchObject({ top: 0, left: 6 });
    expect(drawClassAugment(a, 64, 79, { size: 64, style: 'diffusers', centerCrop: true })).toMatchObject({ top: 8, left: 0 });
    const lefts = new Set<number>();
    for (let i = 0; i < 300; i++) {
      const d = drawClassAugment(a, 77, 64, { size: 64, style: 'diffusers' });
      expect(d.top).toBe(0);
      lefts.add(d.left);
    }
    expect([...lefts].sort((x, y) => x - y)).toEqual(Array.from({ length: 14 }, (_, i) => i));
  });
});

describe('train/augment: parity with the original pipelines (test/fixtures/images/augment-reference.json)', () => {
  type Case =
    | { kind: 'instance'; style: AugmentStyle; flip: boolean; scale: number; cx: number; cy: number; branch: 'far' | 'zoom' | 'full'; pixels: { sha256: string; sums: number[] }; mask: string }
    | { kind: 'class'; style: AugmentStyle; flip: boolean; top: number; left: number; centerCrop: boolean; pixels: { sha256: string; sums: number[] } };
  const ref = JSON.parse(fs.readFileSync(path.join(repoRoot, 'test/fixtures/images/augment-reference.json'), 'utf8')) as {
    size: number;
    width: number;
    height: number;
    source: string;
    cases: Case[];
  };
  const source: RgbImage = { width: ref.width, height: ref.height, data: new Uint8Array(Buffer.from(ref.source, 'base64')) };
  const sums = (a: Float32Array) => [0, 1, 2].map((c) => a.subarray(c * ref.size ** 2, (c + 1) * ref.size ** 2).reduce((s, v) => s + v, 0));

  it.each(ref.cases.map((c, i) => [`${i}: ${c.kind} ${c.style} ${c.kind === 'instance' ? `${c.branch} s=${c.scale}` : `left=${c.left}`} flip=${c.flip}`, c] as const))(
    '%s',
    async (_name, c) => {
      const options = { size: ref.size, style: c.style, centerCrop: c.kind === 'class' ? c.centerCrop : false };
      let pixels: Float32Array;
      if (c.kind === 'instance') {
        const branch = branchOf(c.scale, ref.size);
        expect(branch).toBe(c.branch);
        const prefix = branch === 'far' ? FAR_PREFIXES[0] : branch === 'zoom' ? ZOOM_PREFIXES[0] : '';
        const out = await applyInstanceAugment(prepareInstanceImage(source, c.style), { flip: c.flip, scale: c.scale, branch, prefix, cx: c.cx, cy: c.cy }, options);
        const expected = Array.from(new Float32Array(new Uint8Array(Buffer.from(c.mask, 'base64')).buffer));
        if (expected.some((v) => v !== 0)) {
          expect(Array.from(out.mask)).toEqual(expected);
        } else {
          // The original's mask is empty here (its loss is then NaN); ours keeps the touched cells.
          expect(Array.from(out.mask)).toEqual(Array.from(latentMask(ref.size, c.scale, c.cx, c.cy)));
          expect(out.mask.some((v) => v === 1)).toBe(true);
        }
        pixels = out.pixels;
      } else {
        const prepared = await prepareClassImage(source, options);
        pixels = applyClassAugment(prepared, { flip: c.flip, top: c.top, left: c.left }, options).pixels;
      }
      const got = sums(pixels);
      got.forEach((s, i) => expect(Math.abs(s - c.pixels.sums[i])).toBeLessThan(1e-3));
      expect(sha256(pixels)).toBe(c.pixels.sha256);
    },
  );
});
