/**
 * The toy world: a deterministic generator of small pictures of simple things with captions that
 * describe them, written for this project's embedded demo model.
 *
 * - A picture is one shape (circle, square or upright equilateral triangle) in one of six named
 *   colours, small or large, at a random position fully inside the canvas, on a background of a
 *   different named colour. Its caption says exactly that: "a small red circle on a blue background".
 * - Geometry lives in world units on a 32×32 canvas; {@link renderToy} draws it at any resolution
 *   (32 by default) with 4×4 supersampling, so edges are anti-aliased and the same spec gives the
 *   same picture, only sharper, at 64.
 * - 15 of the 90 (shape, colour, background) combinations are held out ({@link TOY_HELD_OUT}): the
 *   pretraining sampler never produces them, so a model trained on it can be tested on composing
 *   attributes it has only seen apart. Every (shape, colour), (shape, background) and
 *   (colour, background) pair still appears in training.
 * - Emblems ({@link TOY_EMBLEMS}) are two-colour concepts the world never shows, for the Custom
 *   Diffusion demo: render 6-10 of them, train a `<new1>` delta, then ask for
 *   "a <new1> emblem on a green background".
 *
 * Everything is deterministic on every platform: the only source of randomness is the project's
 * {@link Rng} (xoshiro128**), seeded per sample, and rendering is plain floating-point arithmetic
 * in a fixed order.
 *
 * @packageDocumentation
 */
import { InvalidArgumentError } from '../errors';
import type { RgbImage } from '../train/images';
import { Rng } from '../train/rng';

// Math's functions as module constants: hot loops here call them millions of times, and a global
// lookup of `Math` is slow inside a vm context such as jest's test environment.
const { PI, abs, ceil, cos, exp, log, max, min, round, sin, sqrt } = Math;
const SQRT3 = sqrt(3);

/** Width and height of the world's canvas, in world units (and pixels at the default resolution). */
export const TOY_WORLD_SIZE = 32;

/** The named colours of the toy world. */
export const TOY_COLOURS = ['red', 'green', 'blue', 'yellow', 'white', 'black'] as const;
/** A named colour of the toy world. */
export type ToyColour = (typeof TOY_COLOURS)[number];

/** An RGB triple, 0-255 per channel. */
export type Rgb = readonly [number, number, number];

/**
 * The RGB value of each named colour. The closest pair (green and black) is about 150 apart in RGB
 * (Euclidean), every other pair more than 170, so mild noise or blur never moves a solid pixel to
 * another name.
 */
export const TOY_PALETTE: Readonly<Record<ToyColour, Rgb>> = {
  red: [220, 40, 40],
  green: [40, 170, 60],
  blue: [40, 80, 220],
  yellow: [240, 210, 40],
  white: [240, 240, 240],
  black: [25, 25, 25],
};

/** The shapes of the toy world. */
export const TOY_SHAPES = ['circle', 'square', 'triangle'] as const;
/** A shape of the toy world. */
export type ToyShape = (typeof TOY_SHAPES)[number];

/** The size words of the toy world. */
export const TOY_SIZES = ['small', 'large'] as const;
/** A size word of the toy world. */
export type ToySize = (typeof TOY_SIZES)[number];

/**
 * The extent (world units) each size word draws from, uniformly: the diameter of a circle, the side
 * of a square, the base of a triangle. The gap between the two ranges leaves the judge a clear
 * threshold ({@link TOY_SIZE_THRESHOLD}).
 */
export const TOY_EXTENTS: Readonly<Record<ToySize, readonly [number, number]>> = {
  small: [8, 11],
  large: [16, 21],
};

/** The extent (world units) that separates "small" from "large". */
export const TOY_SIZE_THRESHOLD = 13.5;

/** Distance (world units) every shape keeps from the canvas edge, so the border shows only background. */
export const TOY_MARGIN = 2;

/** What a caption says: a (shape, colour, background, size) combination. */
export interface ToyAttributes {
  shape: ToyShape;
  colour: ToyColour;
  background: ToyColour;
  size: ToySize;
}

/**
 * A complete picture description: the attributes plus the geometry, in world units. `cx`, `cy` is
 * the centre of the shape's bounding box (x to the right, y down, the canvas spans [0, 32]);
 * `extent` is the circle's diameter, the square's side or the triangle's base.
 */
export interface ToySpec extends ToyAttributes {
  cx: number;
  cy: number;
  extent: number;
}

/** A (shape, colour, background) combination. */
export type ToyCombo = readonly [ToyShape, ToyColour, ToyColour];

/**
 * The 15 (shape, colour, background) combinations that the pretraining sampler never produces.
 *
 * Built by a rule that keeps every pair of attributes in training: shape k (circle 0, square 1,
 * triangle 2) holds out every colour but one (colour 2k), each on the background 1 + k colours
 * further along {@link TOY_COLOURS}. So each (shape, colour), (shape, background) and
 * (colour, background) pair is held out at most once and still seen with the other shapes or
 * backgrounds.
 */
export const TOY_HELD_OUT: readonly ToyCombo[] = [
  ['circle', 'green', 'blue'],
  ['circle', 'blue', 'yellow'],
  ['circle', 'yellow', 'white'],
  ['circle', 'white', 'black'],
  ['circle', 'black', 'red'],
  ['square', 'red', 'blue'],
  ['square', 'green', 'yellow'],
  ['square', 'yellow', 'black'],
  ['square', 'white', 'red'],
  ['square', 'black', 'green'],
  ['triangle', 'red', 'yellow'],
  ['triangle', 'green', 'white'],
  ['triangle', 'blue', 'black'],
  ['triangle', 'yellow', 'red'],
  ['triangle', 'black', 'blue'],
];

const comboKey = (shape: string, colour: string, background: string): string => `${shape}/${colour}/${background}`;
const HELD_OUT_KEYS = new Set(TOY_HELD_OUT.map(([s, c, b]) => comboKey(s, c, b)));

/** True when the (shape, colour, background) combination of `attrs` is in {@link TOY_HELD_OUT}. */
export function isHeldOut(attrs: Pick<ToyAttributes, 'shape' | 'colour' | 'background'>): boolean {
  return HELD_OUT_KEYS.has(comboKey(attrs.shape, attrs.colour, attrs.background));
}

/**
 * Every (shape, colour, background) combination with a background different from the colour: 90 in
 * all, in a fixed order (shape, then colour, then background, each in its list's order).
 *
 * @param which `'all'` (default), `'seen'` (the 75 the pretraining sampler draws) or `'held-out'`.
 */
export function toyCombos(which: 'all' | 'seen' | 'held-out' = 'all'): ToyCombo[] {
  const out: ToyCombo[] = [];
  for (const shape of TOY_SHAPES) {
    for (const colour of TOY_COLOURS) {
      for (const background of TOY_COLOURS) {
        if (background === colour) continue;
        const held = HELD_OUT_KEYS.has(comboKey(shape, colour, background));
        if (which === 'all' || (which === 'held-out') === held) out.push([shape, colour, background]);
      }
    }
  }
  return out;
}

const ALL_COMBOS = toyCombos('all');
const SEEN_COMBOS = toyCombos('seen');

/** The caption of a picture: "a small red circle on a blue background". */
export function toyCaption(attrs: ToyAttributes): string {
  return phraseToy(attrs, true, true);
}

/** The world's caption with or without its opening "a" and its size word. */
function phraseToy(attrs: ToyAttributes, article: boolean, size: boolean): string {
  return `${article ? 'a ' : ''}${size ? `${attrs.size} ` : ''}${attrs.colour} ${attrs.shape} on a ${attrs.background} background`;
}

/** How often {@link toyCaptionVariant} leaves out the opening "a", and the size word. */
export const TOY_CAPTION_DROP = { article: 0.5, size: 0.3 } as const;

/**
 * A caption for pretraining: {@link toyCaption} with, at random, the opening "a" left out
 * (probability {@link TOY_CAPTION_DROP}.article) and the size word left out (.size), so
 * "small red circle on a blue background", "a red circle on a blue background" and "red circle on
 * a blue background" all occur. Why: when every caption opens with "a", the text encoder's first
 * position learns to ignore its token, and composenW's targets ("<new1> badge") put the new token
 * exactly there, where its row cannot be told from the plain captions' "a". Two draws from `rng`.
 */
export function toyCaptionVariant(attrs: ToyAttributes, rng: Rng): string {
  const article = !rng.bernoulli(TOY_CAPTION_DROP.article);
  const size = !rng.bernoulli(TOY_CAPTION_DROP.size);
  return phraseToy(attrs, article, size);
}

/**
 * Reads the attributes back from a caption or prompt. It accepts the world's own captions and
 * looser prompts ("red circle on blue", "a large triangle"): a colour word before "on" is the
 * shape's colour, one after it the background. Attributes it cannot find are left out.
 */
export function parseToyCaption(text: string): Partial<ToyAttributes> {
  const words = text.toLowerCase().match(/[a-z]+/g) ?? [];
  const out: Partial<ToyAttributes> = {};
  let afterOn = false;
  for (const w of words) {
    if (w === 'on') afterOn = true;
    else if ((TOY_COLOURS as readonly string[]).includes(w)) {
      if (afterOn) out.background ??= w as ToyColour;
      else out.colour ??= w as ToyColour;
    } else if ((TOY_SHAPES as readonly string[]).includes(w)) out.shape ??= w as ToyShape;
    else if ((TOY_SIZES as readonly string[]).includes(w)) out.size ??= w as ToySize;
  }
  return out;
}

/**
 * The words the world's captions and the demo's prompts use, sorted: articles, sizes, colours,
 * shapes, "on", "background" and the emblem nouns. A tiny text encoder needs no more.
 */
export function toyVocabulary(): string[] {
  const words = new Set<string>(['a', 'on', 'background', ...TOY_SIZES, ...TOY_COLOURS, ...TOY_SHAPES]);
  for (const e of Object.values(TOY_EMBLEMS)) words.add(e.noun);
  return [...words].sort();
}

function checkAttributes(a: ToyAttributes): void {
  if (!(TOY_SHAPES as readonly string[]).includes(a.shape)) throw new InvalidArgumentError(`Unknown toy shape "${a.shape}" (one of ${TOY_SHAPES.join(', ')})`);
  if (!(TOY_COLOURS as readonly string[]).includes(a.colour)) throw new InvalidArgumentError(`Unknown toy colour "${a.colour}" (one of ${TOY_COLOURS.join(', ')})`);
  if (!(TOY_COLOURS as readonly string[]).includes(a.background)) throw new InvalidArgumentError(`Unknown toy background "${a.background}" (one of ${TOY_COLOURS.join(', ')})`);
  if (!(TOY_SIZES as readonly string[]).includes(a.size)) throw new InvalidArgumentError(`Unknown toy size "${a.size}" (one of ${TOY_SIZES.join(', ')})`);
  if (a.colour === a.background) throw new InvalidArgumentError(`A ${a.colour} shape on a ${a.background} background would be invisible`);
}

/** Rounds to 1/100 of a world unit, so specs print and serialise cleanly. */
const round2 = (x: number): number => round(x * 100) / 100;

/**
 * Completes attributes with a random geometry: an extent drawn uniformly from the size's range
 * ({@link TOY_EXTENTS}) and a centre drawn uniformly so the whole shape keeps {@link TOY_MARGIN}
 * from the edges. Three draws from `rng`, in that order.
 */
export function placeToy(attrs: ToyAttributes, rng: Rng): ToySpec {
  checkAttributes(attrs);
  const [lo, hi] = TOY_EXTENTS[attrs.size];
  const extent = round2(lo + (hi - lo) * rng.nextFloat());
  const half = extent / 2;
  const h = attrs.shape === 'triangle' ? (extent * SQRT3) / 4 : half; // half of the bbox height
  const cx = round2(TOY_MARGIN + half + (TOY_WORLD_SIZE - 2 * TOY_MARGIN - extent) * rng.nextFloat());
  const cy = round2(TOY_MARGIN + h + (TOY_WORLD_SIZE - 2 * TOY_MARGIN - 2 * h) * rng.nextFloat());
  return { shape: attrs.shape, colour: attrs.colour, background: attrs.background, size: attrs.size, cx, cy, extent };
}

/** Options of {@link sampleToySpec} and {@link sampleToyDataset}. */
export interface ToySampleOptions {
  /**
   * Draw from all 90 combinations instead of the 75 seen ones (default false: the pretraining
   * sampler never produces a {@link TOY_HELD_OUT} combination).
   */
  includeHeldOut?: boolean;
  /** Draw only from these combinations (overrides `includeHeldOut`), e.g. `toyCombos('held-out')`. */
  combos?: readonly ToyCombo[];
}

/**
 * One random spec: a combination uniformly from the allowed ones, the size "small" or "large" with
 * equal odds, then {@link placeToy}'s geometry. Five draws from `rng`.
 */
export function sampleToySpec(rng: Rng, options: ToySampleOptions = {}): ToySpec {
  const combos = options.combos ?? (options.includeHeldOut ? ALL_COMBOS : SEEN_COMBOS);
  const [shape, colour, background] = rng.choice(combos);
  const size: ToySize = rng.bernoulli(0.5) ? 'large' : 'small';
  return placeToy({ shape, colour, background, size }, rng);
}

// ---------------------------------------------------------------------------------------------
// Rendering

/** Answers the colour at a point of the canvas (world units), or null for the background. */
type Painter = (x: number, y: number) => Rgb | null;

/** Supersampling per pixel side: 16 samples per pixel, 17 coverage levels. */
const SUPERSAMPLE = 4;

function checkResolution(resolution: number): void {
  if (!Number.isInteger(resolution) || resolution < 8 || resolution > 4096) {
    throw new InvalidArgumentError(`Toy resolution must be an integer in [8, 4096], got ${resolution}`);
  }
}

function paint(resolution: number, background: Rgb, painter: Painter): RgbImage {
  checkResolution(resolution);
  const data = Buffer.alloc(resolution * resolution * 3);
  const unit = TOY_WORLD_SIZE / resolution; // world units per pixel
  const n = SUPERSAMPLE * SUPERSAMPLE;
  for (let py = 0; py < resolution; py++) {
    for (let px = 0; px < resolution; px++) {
      let r = 0;
      let g = 0;
      let b = 0;
      for (let sy = 0; sy < SUPERSAMPLE; sy++) {
        const y = (py + (sy + 0.5) / SUPERSAMPLE) * unit;
        for (let sx = 0; sx < SUPERSAMPLE; sx++) {
          const x = (px + (sx + 0.5) / SUPERSAMPLE) * unit;
          const c = painter(x, y) ?? background;
          r += c[0];
          g += c[1];
          b += c[2];
        }
      }
      const o = (py * resolution + px) * 3;
      data[o] = round(r / n);
      data[o + 1] = round(g / n);
      data[o + 2] = round(b / n);
    }
  }
  return { width: resolution, height: resolution, data };
}

/**
 * Whether the point (x, y) lies inside the ideal shape with bounding-box centre (cx, cy) and
 * extent `extent` (all in the same units). The triangle points up, its base `extent` wide and its
 * height extent·√3/2, centred vertically in its bounding box.
 */
export function insideToyShape(shape: ToyShape, x: number, y: number, cx: number, cy: number, extent: number): boolean {
  const half = extent / 2;
  switch (shape) {
    case 'circle': {
      const dx = x - cx;
      const dy = y - cy;
      return dx * dx + dy * dy <= half * half;
    }
    case 'square':
      return abs(x - cx) <= half && abs(y - cy) <= half;
    case 'triangle': {
      const height = (extent * SQRT3) / 2;
      const top = cy - height / 2;
      const t = (y - top) / height; // 0 at the apex, 1 at the base
      return t >= 0 && t <= 1 && abs(x - cx) <= t * half;
    }
  }
}

/** Options of the renderers. */
export interface ToyRenderOptions {
  /** Pixels per side (default 32). Geometry scales with it. */
  resolution?: number;
}

/**
 * Draws a spec: an 8-bit RGB image (rows top to bottom, pixels interleaved, the `data` a Buffer)
 * of `resolution`² pixels, anti-aliased by 4×4 supersampling.
 */
export function renderToy(spec: ToySpec, options: ToyRenderOptions = {}): RgbImage {
  checkAttributes(spec);
  const fg = TOY_PALETTE[spec.colour];
  const { shape, cx, cy, extent } = spec;
  return paint(options.resolution ?? TOY_WORLD_SIZE, TOY_PALETTE[spec.background], (x, y) =>
    insideToyShape(shape, x, y, cx, cy, extent) ? fg : null,
  );
}

/** One sample of the world. */
export interface ToySample {
  /** Its position in the dataset; with the seed it determines the sample. */
  index: number;
  spec: ToySpec;
  caption: string;
  image: RgbImage;
}

/** Options of {@link sampleToyDataset}. */
export interface ToyDatasetOptions extends ToySampleOptions, ToyRenderOptions {
  /** How many samples. */
  n: number;
  /** The dataset's seed (a non-negative safe integer or bigint). */
  seed: number | bigint;
  /** Index of the first sample (default 0): `start: 100, n: 50` gives samples 100-149 of the same seed. */
  start?: number;
}

/**
 * Sample `index` of the dataset with seed `seed`: its spec comes from the generator
 * `Rng.fromSeed(seed, index)` (one stream per sample), so any sample can be made on its own, in
 * any order, and datasets of different lengths agree on their common samples.
 */
export function toySample(seed: number | bigint, index: number, options: ToySampleOptions & ToyRenderOptions = {}): ToySample {
  if (!Number.isSafeInteger(index) || index < 0) throw new InvalidArgumentError(`Sample index must be a non-negative integer, got ${index}`);
  const spec = sampleToySpec(Rng.fromSeed(seed, index), options);
  return { index, spec, caption: toyCaption(spec), image: renderToy(spec, options) };
}

/**
 * A deterministic dataset: samples `start` … `start + n − 1` of seed `seed` (see {@link toySample}).
 * By default held-out combinations never occur.
 */
export function sampleToyDataset(options: ToyDatasetOptions): ToySample[] {
  const { n, seed, start = 0 } = options;
  if (!Number.isSafeInteger(n) || n < 0) throw new InvalidArgumentError(`Dataset size must be a non-negative integer, got ${n}`);
  const out: ToySample[] = [];
  for (let i = 0; i < n; i++) out.push(toySample(seed, start + i, options));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Emblems: two-colour concepts the world never shows

/** The names of the demo's novel concepts. */
export const TOY_EMBLEM_NAMES = ['split-disc', 'split-tile'] as const;
/** A novel concept of the demo. */
export type ToyEmblemName = (typeof TOY_EMBLEM_NAMES)[number];

/** What an emblem is made of. */
export interface ToyEmblemDefinition {
  name: ToyEmblemName;
  /** The noun its captions use ("a <new1> emblem on a green background"). */
  noun: string;
  /** A description for people. */
  description: string;
  /**
   * Its two colours: for 'split-disc' `outer` is the left half and `inner` the right half; for
   * 'split-tile' `outer` is the top half and `inner` the bottom half.
   */
  colours: { outer: ToyColour; inner: ToyColour };
}

/**
 * The demo's emblems. Both use the world's colours and shapes (a model that has learnt to draw them
 * needs nothing new but the arrangement), in arrangements the world never shows: two colours in one
 * object. Both are split in halves because the embedded model's autoencoder (8×8×4 latents learnt
 * from one-colour shapes) gives halves back, where finer two-colour layouts (a star inside a ring,
 * a disc inside a ring) came back as one-colour blobs in four of five pictures.
 */
export const TOY_EMBLEMS: Readonly<Record<ToyEmblemName, ToyEmblemDefinition>> = {
  'split-disc': {
    name: 'split-disc',
    noun: 'badge',
    description: 'a disc, white on its left half and blue on its right half',
    colours: { outer: 'white', inner: 'blue' },
  },
  'split-tile': {
    name: 'split-tile',
    noun: 'tile',
    description: 'a square, red on its top half and yellow on its bottom half',
    colours: { outer: 'red', inner: 'yellow' },
  },
};

/** Emblem extents (outer diameter, world units) that {@link sampleEmblemSpec} draws from. */
export const TOY_EMBLEM_EXTENTS: readonly [number, number] = [16, 24];

/** An emblem to draw: which, where (centre, world units), how large (outer diameter) and on what. */
export interface ToyEmblemSpec {
  emblem: ToyEmblemName;
  background: ToyColour;
  cx: number;
  cy: number;
  extent: number;
  /** Other colours than the emblem's own (for variants and negative examples); default its definition's. */
  colours?: { outer: ToyColour; inner: ToyColour };
}

/** The backgrounds an emblem can be drawn on: every world colour but its own two. */
export function emblemBackgrounds(emblem: ToyEmblemName): ToyColour[] {
  const def = emblemDefinition(emblem);
  return TOY_COLOURS.filter((c) => c !== def.colours.outer && c !== def.colours.inner);
}

function emblemDefinition(emblem: string): ToyEmblemDefinition {
  const def = (TOY_EMBLEMS as Record<string, ToyEmblemDefinition>)[emblem];
  if (!def) throw new InvalidArgumentError(`Unknown emblem "${emblem}" (one of ${TOY_EMBLEM_NAMES.join(', ')})`);
  return def;
}

/** Draws an emblem (see {@link TOY_EMBLEMS}) like {@link renderToy} draws a shape. */
export function renderEmblem(spec: ToyEmblemSpec, options: ToyRenderOptions = {}): RgbImage {
  const def = emblemDefinition(spec.emblem);
  if (!(TOY_COLOURS as readonly string[]).includes(spec.background)) {
    throw new InvalidArgumentError(`Unknown toy background "${spec.background}" (one of ${TOY_COLOURS.join(', ')})`);
  }
  const colours = spec.colours ?? def.colours;
  for (const c of [colours.outer, colours.inner]) {
    if (!(TOY_COLOURS as readonly string[]).includes(c)) throw new InvalidArgumentError(`Unknown toy colour "${c}" (one of ${TOY_COLOURS.join(', ')})`);
  }
  if (spec.background === colours.outer || spec.background === colours.inner) {
    throw new InvalidArgumentError(`The ${spec.emblem} ${def.noun} cannot be drawn on ${spec.background}, one of its own colours`);
  }
  if (!(spec.extent > 0)) throw new InvalidArgumentError(`Emblem extent must be positive, got ${spec.extent}`);
  const outer = TOY_PALETTE[colours.outer];
  const inner = TOY_PALETTE[colours.inner];
  const { cx, cy } = spec;
  const R = spec.extent / 2;
  // Axis-aligned: the disc is split left | right, the tile (a square of side `extent`) top / bottom.
  const painter: Painter =
    def.name === 'split-disc'
      ? (x, y) => ((x - cx) ** 2 + (y - cy) ** 2 > R * R ? null : x < cx ? outer : inner)
      : (x, y) => (abs(x - cx) > R || abs(y - cy) > R ? null : y < cy ? outer : inner);
  return paint(options.resolution ?? TOY_WORLD_SIZE, TOY_PALETTE[spec.background], painter);
}

/** Options of {@link sampleEmblemSpec}. */
export interface EmblemSampleOptions {
  /** Backgrounds to draw from (default: all of {@link emblemBackgrounds}). */
  backgrounds?: readonly ToyColour[];
  /** Extent range (default {@link TOY_EMBLEM_EXTENTS}). */
  extents?: readonly [number, number];
}

/**
 * A random emblem spec: a background uniformly from the allowed ones, an extent uniformly in the
 * range, a centre uniformly so the emblem keeps {@link TOY_MARGIN} from the edges. Four draws.
 */
export function sampleEmblemSpec(emblem: ToyEmblemName, rng: Rng, options: EmblemSampleOptions = {}): ToyEmblemSpec {
  const allowed = emblemBackgrounds(emblem);
  const backgrounds = options.backgrounds ?? allowed;
  for (const b of backgrounds) {
    if (!allowed.includes(b)) throw new InvalidArgumentError(`The ${emblem} emblem cannot be drawn on ${b} (allowed: ${allowed.join(', ')})`);
  }
  const [lo, hi] = options.extents ?? TOY_EMBLEM_EXTENTS;
  if (!(lo > 0 && hi >= lo && hi <= TOY_WORLD_SIZE - 2 * TOY_MARGIN)) {
    throw new InvalidArgumentError(`Emblem extents must satisfy 0 < lo <= hi <= ${TOY_WORLD_SIZE - 2 * TOY_MARGIN}, got [${lo}, ${hi}]`);
  }
  const background = rng.choice(backgrounds);
  const extent = round2(lo + (hi - lo) * rng.nextFloat());
  const free = TOY_WORLD_SIZE - 2 * TOY_MARGIN - extent;
  const cx = round2(TOY_MARGIN + extent / 2 + free * rng.nextFloat());
  const cy = round2(TOY_MARGIN + extent / 2 + free * rng.nextFloat());
  return { emblem, background, cx, cy, extent };
}

/**
 * The caption of an emblem picture with a modifier token: "a <new1> emblem on a green background"
 * (the noun is the emblem's, see {@link TOY_EMBLEMS}).
 */
export function emblemCaption(spec: Pick<ToyEmblemSpec, 'emblem' | 'background'>, token = '<new1>'): string {
  return `a ${token} ${emblemDefinition(spec.emblem).noun} on a ${spec.background} background`;
}

/** One emblem picture. */
export interface EmblemSample {
  index: number;
  spec: ToyEmblemSpec;
  caption: string;
  image: RgbImage;
}

/**
 * `n` pictures of one emblem (the demo's 6-10 training images), deterministic in `seed`; sample i
 * draws from `Rng.fromSeed(seed, i)`. Captions use `token` (default `<new1>`).
 */
export function sampleEmblemImages(
  emblem: ToyEmblemName,
  options: EmblemSampleOptions & ToyRenderOptions & { n: number; seed: number | bigint; token?: string },
): EmblemSample[] {
  const { n, seed, token } = options;
  if (!Number.isSafeInteger(n) || n < 0) throw new InvalidArgumentError(`Sample count must be a non-negative integer, got ${n}`);
  const out: EmblemSample[] = [];
  for (let i = 0; i < n; i++) {
    const spec = sampleEmblemSpec(emblem, Rng.fromSeed(seed, i), options);
    out.push({ index: i, spec, caption: emblemCaption(spec, token), image: renderEmblem(spec, options) });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Degradation, to test the judge on images that look like a diffusion model's

/** Options of {@link degradeImage}. */
export interface DegradeOptions {
  /** Standard deviation of the Gaussian noise added to every channel, in 0-255 units (default 0). */
  noiseSigma?: number;
  /** Standard deviation of the Gaussian blur, in pixels (default 0: none). */
  blurSigma?: number;
  /** Seed of the noise (default 0). */
  seed?: number | bigint;
}

/**
 * A blurred and noisy copy of an image, as a small diffusion model's output tends to look: first a
 * separable Gaussian blur (edges clamped), then independent Gaussian noise per channel, rounded and
 * clamped to 0-255. Deterministic in `seed`.
 */
export function degradeImage(img: RgbImage, options: DegradeOptions = {}): RgbImage {
  const { width: w, height: h } = img;
  const sigma = options.blurSigma ?? 0;
  const noise = options.noiseSigma ?? 0;
  if (!(sigma >= 0) || !(noise >= 0)) throw new InvalidArgumentError('Blur and noise sigmas must be non-negative');
  let f = Float64Array.from(img.data);
  if (sigma > 0) {
    const radius = max(1, ceil(3 * sigma));
    const k: number[] = [];
    let sum = 0;
    for (let i = -radius; i <= radius; i++) {
      const v = exp(-(i * i) / (2 * sigma * sigma));
      k.push(v);
      sum += v;
    }
    for (let i = 0; i < k.length; i++) k[i] /= sum;
    const clamp = (v: number, n: number): number => (v < 0 ? 0 : v >= n ? n - 1 : v);
    const tmp = new Float64Array(f.length);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        for (let c = 0; c < 3; c++) {
          let acc = 0;
          for (let i = -radius; i <= radius; i++) acc += k[i + radius] * f[(y * w + clamp(x + i, w)) * 3 + c];
          tmp[(y * w + x) * 3 + c] = acc;
        }
      }
    }
    const out = new Float64Array(f.length);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        for (let c = 0; c < 3; c++) {
          let acc = 0;
          for (let i = -radius; i <= radius; i++) acc += k[i + radius] * tmp[(clamp(y + i, h) * w + x) * 3 + c];
          out[(y * w + x) * 3 + c] = acc;
        }
      }
    }
    f = out;
  }
  if (noise > 0) {
    const rng = Rng.fromSeed(options.seed ?? 0);
    for (let i = 0; i < f.length; i += 2) {
      // Box-Muller: two normals from two uniforms (1 − u keeps the logarithm finite).
      const u1 = 1 - rng.nextFloat();
      const u2 = rng.nextFloat();
      const m = sqrt(-2 * log(u1));
      f[i] += noise * m * cos(2 * PI * u2);
      if (i + 1 < f.length) f[i + 1] += noise * m * sin(2 * PI * u2);
    }
  }
  const data = Buffer.alloc(f.length);
  for (let i = 0; i < f.length; i++) data[i] = min(255, max(0, round(f[i])));
  return { width: w, height: h, data };
}
