import { createHash } from 'crypto';
import { InvalidArgumentError } from '../../src/errors';
import { Rng } from '../../src/train/rng';
import {
  TOY_CAPTION_DROP,
  TOY_COLOURS,
  TOY_EMBLEMS,
  TOY_EMBLEM_NAMES,
  TOY_EXTENTS,
  TOY_HELD_OUT,
  TOY_MARGIN,
  TOY_PALETTE,
  TOY_SHAPES,
  degradeImage,
  emblemBackgrounds,
  emblemCaption,
  isHeldOut,
  parseToyCaption,
  placeToy,
  renderEmblem,
  renderToy,
  sampleEmblemImages,
  sampleToyDataset,
  sampleToySpec,
  toyCaption,
  toyCaptionVariant,
  toyCombos,
  toySample,
  toyVocabulary,
  type ToySpec,
} from '../../src/toy';

const key = (s: { shape: string; colour: string; background: string }): string => `${s.shape}/${s.colour}/${s.background}`;

describe('toy world: determinism', () => {
  test('the same seed gives the same bytes; another seed does not', () => {
    const a = sampleToyDataset({ n: 40, seed: 11 });
    const b = sampleToyDataset({ n: 40, seed: 11 });
    const c = sampleToyDataset({ n: 40, seed: 12 });
    for (let i = 0; i < 40; i++) {
      expect(Buffer.from(a[i].image.data).equals(Buffer.from(b[i].image.data))).toBe(true);
      expect(a[i].spec).toEqual(b[i].spec);
    }
    expect(a.filter((s, i) => Buffer.from(s.image.data).equals(Buffer.from(c[i].image.data))).length).toBeLessThan(2);
  });

  test('samples are addressable one by one and datasets agree on common samples', () => {
    const all = sampleToyDataset({ n: 30, seed: 5 });
    const tail = sampleToyDataset({ n: 10, seed: 5, start: 20 });
    expect(tail.map((s) => s.spec)).toEqual(all.slice(20).map((s) => s.spec));
    expect(toySample(5, 7).spec).toEqual(all[7].spec);
    expect(toySample(5, 7).index).toBe(7);
    expect(toySample(5n, 7).spec).toEqual(all[7].spec);
  });

  test('pinned digest: the world does not drift between versions or platforms', () => {
    // Shapes use only +, ×, / and √ (exact in IEEE 754), so this digest holds everywhere. If the
    // world is changed on purpose, update it (and retrain the embedded model).
    const h = createHash('sha256');
    for (const s of sampleToyDataset({ n: 64, seed: 0 })) {
      h.update(JSON.stringify(s.spec));
      h.update(s.image.data);
    }
    expect(h.digest('hex')).toBe(PINNED_DIGEST);
  });

  test('images are 32×32 RGB Buffers by default and scale with the resolution', () => {
    const s = toySample(1, 0);
    expect(s.image.width).toBe(32);
    expect(s.image.height).toBe(32);
    expect(Buffer.isBuffer(s.image.data)).toBe(true);
    expect(s.image.data.length).toBe(32 * 32 * 3);
    // The same spec at 64: its 2×2 means are the 32×32 picture, up to supersampling differences on
    // edge pixels (16 samples per pixel there, 64 here).
    const big = renderToy(s.spec, { resolution: 64 });
    expect(big.width).toBe(64);
    let maxDiff = 0;
    let sumDiff = 0;
    for (let y = 0; y < 32; y++) {
      for (let x = 0; x < 32; x++) {
        for (let c = 0; c < 3; c++) {
          const at = (yy: number, xx: number): number => big.data[(yy * 64 + xx) * 3 + c];
          const mean = (at(2 * y, 2 * x) + at(2 * y, 2 * x + 1) + at(2 * y + 1, 2 * x) + at(2 * y + 1, 2 * x + 1)) / 4;
          const d = Math.abs(mean - s.image.data[(y * 32 + x) * 3 + c]);
          maxDiff = Math.max(maxDiff, d);
          sumDiff += d;
        }
      }
    }
    expect(maxDiff).toBeLessThanOrEqual(40);
    expect(sumDiff / (32 * 32 * 3)).toBeLessThan(0.5);
  });
});

describe('toy world: combinations', () => {
  test('15 held-out combinations, valid and distinct, of 90', () => {
    expect(toyCombos('all')).toHaveLength(90);
    expect(TOY_HELD_OUT).toHaveLength(15);
    expect(new Set(TOY_HELD_OUT.map(([s, c, b]) => key({ shape: s, colour: c, background: b }))).size).toBe(15);
    for (const [shape, colour, background] of TOY_HELD_OUT) {
      expect(TOY_SHAPES).toContain(shape);
      expect(TOY_COLOURS).toContain(colour);
      expect(TOY_COLOURS).toContain(background);
      expect(colour).not.toBe(background);
    }
    expect(toyCombos('held-out')).toHaveLength(15);
    expect(toyCombos('seen')).toHaveLength(75);
  });

  test('every pair of attributes of a held-out combination is still seen in training', () => {
    const seen = toyCombos('seen');
    for (const [shape, colour, background] of TOY_HELD_OUT) {
      expect(seen.some(([s, c]) => s === shape && c === colour)).toBe(true);
      expect(seen.some(([s, , b]) => s === shape && b === background)).toBe(true);
      expect(seen.some(([, c, b]) => c === colour && b === background)).toBe(true);
    }
  });

  test('the pretraining sampler never draws a held-out combination; all the others occur', () => {
    const rng = Rng.fromSeed(3);
    const drawn = new Set<string>();
    let held = 0;
    for (let i = 0; i < 6000; i++) {
      const s = sampleToySpec(rng);
      if (isHeldOut(s)) held++;
      drawn.add(key(s));
    }
    expect(held).toBe(0);
    expect(drawn.size).toBe(75);
    expect(sampleToyDataset({ n: 500, seed: 9 }).filter((s) => isHeldOut(s.spec))).toEqual([]);
  });

  test('includeHeldOut and combos widen or narrow the sampler', () => {
    const rng = Rng.fromSeed(4);
    const drawn = new Set<string>();
    for (let i = 0; i < 6000; i++) drawn.add(key(sampleToySpec(rng, { includeHeldOut: true })));
    expect(drawn.size).toBe(90);
    const held = sampleToyDataset({ n: 200, seed: 1, combos: toyCombos('held-out') });
    expect(held.every((s) => isHeldOut(s.spec))).toBe(true);
  });
});

describe('toy world: captions and geometry', () => {
  const samples = sampleToyDataset({ n: 500, seed: 21, includeHeldOut: true });

  test('captions say exactly what the spec draws, and read back', () => {
    for (const { spec, caption } of samples) {
      expect(caption).toBe(`a ${spec.size} ${spec.colour} ${spec.shape} on a ${spec.background} background`);
      expect(caption).toBe(toyCaption(spec));
      expect(parseToyCaption(caption)).toEqual({ size: spec.size, colour: spec.colour, shape: spec.shape, background: spec.background });
    }
    expect(parseToyCaption('Red circle on blue')).toEqual({ colour: 'red', shape: 'circle', background: 'blue' });
    expect(parseToyCaption('a large triangle')).toEqual({ size: 'large', shape: 'triangle' });
    expect(parseToyCaption('a <new1> emblem on a green background')).toEqual({ background: 'green' });
  });

  test('pretraining phrasings leave out the article and the size at the stated rates, and still read back', () => {
    const rng = Rng.fromSeed(5);
    const counts = new Map<string, number>();
    const n = 4000;
    for (let i = 0; i < n; i++) {
      const { spec } = samples[i % samples.length];
      const text = toyCaptionVariant(spec, rng);
      const form = `${text.startsWith('a ') ? 'a' : '-'}${text.includes(` ${spec.size} `) || text.startsWith(`${spec.size} `) ? 's' : '-'}`;
      counts.set(form, (counts.get(form) ?? 0) + 1);
      expect(text.endsWith(`${spec.colour} ${spec.shape} on a ${spec.background} background`)).toBe(true);
      const { size, ...rest } = parseToyCaption(text);
      expect(rest).toEqual({ colour: spec.colour, shape: spec.shape, background: spec.background });
      if (size !== undefined) expect(size).toBe(spec.size);
    }
    // All four forms occur, at the rates the two independent drops give (±4 standard deviations).
    const { article, size } = TOY_CAPTION_DROP;
    const expected: Record<string, number> = {
      as: (1 - article) * (1 - size), 'a-': (1 - article) * size, '-s': article * (1 - size), '--': article * size,
    };
    for (const [form, p] of Object.entries(expected)) {
      expect(Math.abs((counts.get(form) ?? 0) - n * p)).toBeLessThan(4 * Math.sqrt(n * p * (1 - p)));
    }
    // Same generator state, same phrasing.
    const spec = samples[0].spec;
    expect(toyCaptionVariant(spec, Rng.fromSeed(9))).toBe(toyCaptionVariant(spec, Rng.fromSeed(9)));
  });

  test('the vocabulary covers every caption word and the emblem nouns', () => {
    const vocab = new Set(toyVocabulary());
    for (const { caption } of samples) for (const w of caption.split(' ')) expect(vocab.has(w)).toBe(true);
    for (const e of Object.values(TOY_EMBLEMS)) expect(vocab.has(e.noun)).toBe(true);
  });

  test('sizes come from their ranges; shapes stay inside the margin, so the border is pure background', () => {
    for (const { spec, image } of samples) {
      const [lo, hi] = TOY_EXTENTS[spec.size];
      expect(spec.extent).toBeGreaterThanOrEqual(lo);
      expect(spec.extent).toBeLessThanOrEqual(hi);
      expect(spec.cx - spec.extent / 2).toBeGreaterThanOrEqual(TOY_MARGIN - 0.01);
      expect(spec.cx + spec.extent / 2).toBeLessThanOrEqual(32 - TOY_MARGIN + 0.01);
      const bg = TOY_PALETTE[spec.background];
      let offBorder = 0;
      for (let i = 0; i < 32; i++) {
        for (const [x, y] of [[i, 0], [i, 31], [0, i], [31, i], [i, 1], [1, i], [i, 30], [30, i]]) {
          const o = (y * 32 + x) * 3;
          if (image.data[o] !== bg[0] || image.data[o + 1] !== bg[1] || image.data[o + 2] !== bg[2]) offBorder++;
        }
      }
      expect(offBorder).toBe(0);
      // the shape's colour is there, solid, at its centre (every shape covers its bbox centre)
      const o = (Math.floor(spec.cy) * 32 + Math.floor(spec.cx)) * 3;
      const fg = TOY_PALETTE[spec.colour];
      const d = Math.hypot(image.data[o] - fg[0], image.data[o + 1] - fg[1], image.data[o + 2] - fg[2]);
      expect(d).toBeLessThan(5);
    }
  });

  test('anti-aliased edges: pixels between the two colours exist', () => {
    const { image, spec } = samples.find((s) => s.spec.shape === 'circle')!;
    const bg = TOY_PALETTE[spec.background];
    const fg = TOY_PALETTE[spec.colour];
    let mixed = 0;
    for (let p = 0; p < 32 * 32; p++) {
      const px = [image.data[p * 3], image.data[p * 3 + 1], image.data[p * 3 + 2]];
      const dBg = Math.hypot(px[0] - bg[0], px[1] - bg[1], px[2] - bg[2]);
      const dFg = Math.hypot(px[0] - fg[0], px[1] - fg[1], px[2] - fg[2]);
      if (dBg > 10 && dFg > 10) mixed++;
    }
    expect(mixed).toBeGreaterThan(8);
  });

  test('invalid specs are refused', () => {
    const good: ToySpec = { shape: 'circle', colour: 'red', background: 'blue', size: 'small', cx: 16, cy: 16, extent: 10 };
    expect(() => renderToy({ ...good, background: 'red' })).toThrow(InvalidArgumentError);
    expect(() => renderToy({ ...good, shape: 'hexagon' as never })).toThrow(/Unknown toy shape/);
    expect(() => renderToy({ ...good, colour: 'pink' as never })).toThrow(/Unknown toy colour/);
    expect(() => renderToy(good, { resolution: 4 })).toThrow(InvalidArgumentError);
    expect(() => placeToy({ ...good, size: 'huge' as never }, Rng.fromSeed(0))).toThrow(/Unknown toy size/);
    expect(() => sampleToyDataset({ n: -1, seed: 0 })).toThrow(InvalidArgumentError);
  });
});

describe('toy world: emblems', () => {
  test('each emblem: captions with its noun, deterministic, never on its own colours', () => {
    for (const name of TOY_EMBLEM_NAMES) {
      const def = TOY_EMBLEMS[name];
      const a = sampleEmblemImages(name, { n: 10, seed: 2 });
      const b = sampleEmblemImages(name, { n: 10, seed: 2 });
      expect(a.map((s) => s.spec)).toEqual(b.map((s) => s.spec));
      for (let i = 0; i < 10; i++) expect(Buffer.from(a[i].image.data).equals(Buffer.from(b[i].image.data))).toBe(true);
      for (const s of a) {
        expect(s.caption).toBe(`a <new1> ${def.noun} on a ${s.spec.background} background`);
        expect([def.colours.outer, def.colours.inner]).not.toContain(s.spec.background);
      }
      expect(emblemBackgrounds(name)).toHaveLength(4);
      expect(() => renderEmblem({ emblem: name, background: def.colours.outer, cx: 16, cy: 16, extent: 20 })).toThrow(InvalidArgumentError);
      const green = sampleEmblemImages(name, { n: 6, seed: 1, backgrounds: ['green'], token: '<new2>' });
      expect(green.every((s) => s.spec.background === 'green' && s.caption === `a <new2> ${def.noun} on a green background`)).toBe(true);
    }
    expect(emblemCaption({ emblem: 'split-tile', background: 'green' })).toBe('a <new1> tile on a green background');
    expect(() => sampleEmblemImages('split-tile', { n: 2, seed: 0, backgrounds: ['red'] })).toThrow(/cannot be drawn/);
  });

  test('both colours are drawn where they belong', () => {
    const px = (img: { data: Uint8Array }, x: number, y: number): number[] => [...img.data.subarray((y * 32 + x) * 3, (y * 32 + x) * 3 + 3)];
    const tile = renderEmblem({ emblem: 'split-tile', background: 'green', cx: 16, cy: 16, extent: 20 });
    expect(px(tile, 16, 7)).toEqual([...TOY_PALETTE.red]); // top half (the square spans 6-26)
    expect(px(tile, 7, 12)).toEqual([...TOY_PALETTE.red]); // top-left corner region
    expect(px(tile, 16, 24)).toEqual([...TOY_PALETTE.yellow]); // bottom half
    expect(px(tile, 25, 25)).toEqual([...TOY_PALETTE.yellow]); // bottom-right corner: a square, not a disc
    expect(px(tile, 16, 3)).toEqual([...TOY_PALETTE.green]); // above it
    expect(px(tile, 1, 1)).toEqual([...TOY_PALETTE.green]);
    const disc = renderEmblem({ emblem: 'split-disc', background: 'green', cx: 16, cy: 16, extent: 24 });
    expect(px(disc, 10, 16)).toEqual([...TOY_PALETTE.white]);
    expect(px(disc, 22, 16)).toEqual([...TOY_PALETTE.blue]);
    expect(px(disc, 1, 30)).toEqual([...TOY_PALETTE.green]);
    const recoloured = renderEmblem({ emblem: 'split-disc', background: 'green', cx: 16, cy: 16, extent: 24, colours: { outer: 'red', inner: 'yellow' } });
    expect(px(recoloured, 10, 16)).toEqual([...TOY_PALETTE.red]);
  });
});

describe('degradeImage', () => {
  test('no options: the same bytes; noise and blur are deterministic in the seed', () => {
    const { image } = toySample(0, 0);
    expect(Buffer.from(degradeImage(image).data).equals(Buffer.from(image.data))).toBe(true);
    const a = degradeImage(image, { noiseSigma: 10, blurSigma: 0.7, seed: 3 });
    const b = degradeImage(image, { noiseSigma: 10, blurSigma: 0.7, seed: 3 });
    const c = degradeImage(image, { noiseSigma: 10, blurSigma: 0.7, seed: 4 });
    expect(Buffer.from(a.data).equals(Buffer.from(b.data))).toBe(true);
    expect(Buffer.from(a.data).equals(Buffer.from(c.data))).toBe(false);
    // noise of sigma 10: the mean absolute change of a flat background is about 8
    const flat = renderToy({ shape: 'circle', colour: 'red', background: 'blue', size: 'small', cx: 6, cy: 6, extent: 8 });
    const noisy = degradeImage(flat, { noiseSigma: 10, seed: 1 });
    let sum = 0;
    for (let i = 0; i < flat.data.length; i++) sum += Math.abs(noisy.data[i] - flat.data[i]);
    expect(sum / flat.data.length).toBeGreaterThan(6);
    expect(sum / flat.data.length).toBeLessThan(10);
  });
});

const PINNED_DIGEST = '71426ff321e72e78bc99e403f72a0b00552c8aa22c3287c3d6bf5df6f94e3d5f';
