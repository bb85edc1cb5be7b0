/**
 * An analytic judge for toy-world pictures: it reads the background colour, the shape's colour,
 * the shape and its size from the pixels alone, so the demo model's samples can be scored against
 * their prompts without any learnt model.
 *
 * How it reads a picture (any size; thresholds scale with it):
 *
 * 1. **Background**: the per-channel median of the border pixels (a ring one pixel wide per 32),
 *    named by the nearest {@link TOY_PALETTE} colour.
 * 2. **Foreground**: pixels farther than `foregroundThreshold` (RGB distance) from the background;
 *    the largest 8-connected group of them is the object. Its colour is the named colour c whose
 *    mixing line (background → c) passes closest to the object's pixels: anti-aliasing and blur
 *    mix the object with the background along that line, so edges and small blurred objects do not
 *    change the name (a plain nearest-colour of the mean would).
 * 3. **Coverage**: each pixel near the object gets a soft coverage α ∈ [0, 1], its position on the
 *    line from the background colour to the object colour. Summing α measures area to a fraction of
 *    a pixel, even on blurred edges. A small dead zone at both ends (α < 0.15 → 0, > 0.85 → 1, the
 *    rest stretched) keeps pixel noise in flat areas out; templates get the same treatment.
 * 4. **Shape**: the ideal circle, square and upright equilateral triangle of the same area and
 *    centroid (the world's shapes; area and centroid are unchanged by blur), drawn with 4×4
 *    supersampling, also blurred by a few Gaussian σ (`blurLevels`, so a soft picture is compared
 *    with equally soft templates), and compared with α by soft IoU (Σ min / Σ max), the best σ per
 *    shape. The best shape wins. Fill
 *    ratio alone is weak (a round blob passes as a circle), so a **strict** verdict also asks for a
 *    good fit (IoU ≥ `strictIoU`), a clear winner (margin ≥ `strictMargin`) and a single object
 *    (the largest group holds ≥ `strictSingle` of the foreground).
 * 5. **Size**: the fitted shape's extent (diameter, side or base) in world units against
 *    {@link TOY_SIZE_THRESHOLD}.
 *
 * {@link detectEmblem} checks the demo's two-colour emblems: both colours present in the right
 * proportions and arrangement (two halves side by side or one above the other) and the object's
 * outline (round, square).
 *
 * @packageDocumentation
 */
import { InvalidArgumentError } from '../errors';
import type { RgbImage } from '../train/images';
import {
  insideToyShape,
  parseToyCaption,
  TOY_COLOURS,
  TOY_EMBLEMS,
  TOY_PALETTE,
  TOY_SHAPES,
  TOY_SIZE_THRESHOLD,
  TOY_WORLD_SIZE,
  type Rgb,
  type ToyAttributes,
  type ToyColour,
  type ToyEmblemName,
  type ToyShape,
  type ToySize,
} from './world';

// Math's functions as module constants: hot loops here call them millions of times, and a global
// lookup of `Math` is slow inside a vm context such as jest's test environment.
const { PI, abs, ceil, exp, floor, hypot, max, min, round, sqrt } = Math;
const SQRT3 = sqrt(3);

/** Tuning of the judge; the defaults are what the tests measure. */
export interface JudgeOptions {
  /** RGB distance from the background above which a pixel is foreground (default 60). */
  foregroundThreshold?: number;
  /** Smallest IoU of the best shape for a strict verdict (default 0.85). */
  strictIoU?: number;
  /** Smallest lead of the best shape's IoU over the runner-up for a strict verdict (default 0.04). */
  strictMargin?: number;
  /** Smallest share of the foreground in the largest connected group for a strict verdict (default 0.85). */
  strictSingle?: number;
  /**
   * Blurs (Gaussian σ in world units, i.e. pixels at 32×32) the shape templates are also tried
   * with, so soft pictures are read fairly (default [0, 0.5, 0.8, 1.1]; [0] compares sharp
   * templates only).
   */
  blurLevels?: readonly number[];
}

/** Coverage below this (or above 1 − this) counts as none (or full): pixel noise, not shape. */
const DEAD = 0.15;

/**
 * Clamps a coverage to [0, 1] with a dead zone at each end, stretching the rest linearly (0.5 stays
 * 0.5). Applied alike to the picture and to the templates, it keeps pixel noise in flat areas from
 * counting as shape without changing an exact match.
 */
function deadZone(a: number): number {
  const v = (a - DEAD) / (1 - 2 * DEAD);
  return v < 0 ? 0 : v > 1 ? 1 : v;
}

const DEFAULTS: Required<JudgeOptions> = {
  foregroundThreshold: 60,
  strictIoU: 0.85,
  strictMargin: 0.04,
  strictSingle: 0.85,
  blurLevels: [0, 0.5, 0.8, 1.1],
};

/** A colour read from the picture. */
export interface ColourVerdict {
  /** The named colour. */
  name: ToyColour;
  /**
   * 1 − d₁/d₂ for the distances to the best and second-best named colours (for the object's colour:
   * the mean distances of its pixels to the two mixing lines): 0 undecided, 1 exact.
   */
  confidence: number;
  /** The measured colour (the object's: the median of its interior pixels). */
  rgb: Rgb;
  /** Its RGB distance to the named colour. */
  distance: number;
}

/** The shape read from the picture. */
export interface ShapeVerdict {
  /** The best-fitting shape. */
  name: ToyShape;
  /** Its soft IoU with the picture's coverage. */
  iou: number;
  /** Its lead over the runner-up's IoU. */
  margin: number;
  /** Whether the fit is good, clear and of a single object (see {@link JudgeOptions}). */
  strict: boolean;
  /** min(1, margin / 0.1). */
  confidence: number;
  /** Every shape's IoU. */
  scores: Record<ToyShape, number>;
  /** The template blur (world units) that fitted the best shape: an estimate of the picture's softness. */
  blur: number;
}

/** The size read from the picture. */
export interface SizeVerdict {
  name: ToySize;
  /** The fitted shape's extent (diameter, side or base), in world units (the canvas is 32). */
  extent: number;
  /** min(1, |extent − threshold| / 2.5). */
  confidence: number;
}

/** Everything the judge reads from one picture. */
export interface ToyJudgement {
  background: ColourVerdict;
  /** Share of the border pixels within the foreground threshold of the background colour. */
  borderAgreement: number;
  /** Null when nothing stands out from the background. */
  colour: ColourVerdict | null;
  shape: ShapeVerdict | null;
  size: SizeVerdict | null;
  /** Foreground pixels (all groups). */
  foregroundPixels: number;
  /** Connected groups of foreground pixels (8-connectivity), not counting specks (groups under 3 pixels per 32×32). */
  components: number;
  /** Share of the foreground pixels outside specks that lies in the largest group (1: a single object). */
  mainComponentShare: number;
}

// ---------------------------------------------------------------------------------------------
// Shared pixel work

function checkImage(img: RgbImage): void {
  const { width: w, height: h, data } = img;
  if (!Number.isInteger(w) || !Number.isInteger(h) || w < 8 || h < 8) {
    throw new InvalidArgumentError(`The judge needs an image of at least 8×8 pixels, got ${w}×${h}`);
  }
  if (!data || data.length !== w * h * 3) {
    throw new InvalidArgumentError(`Image data must hold ${w}×${h}×3 = ${w * h * 3} bytes (RGB, interleaved), got ${data?.length}`);
  }
}

const dist = (a: Rgb, r: number, g: number, b: number): number => hypot(a[0] - r, a[1] - g, a[2] - b);

/** Names a colour: the nearest palette entry, with the 1 − d₁/d₂ confidence. */
export function nameColour(rgb: Rgb): ColourVerdict {
  let best: ToyColour = TOY_COLOURS[0];
  let d1 = Infinity;
  let d2 = Infinity;
  for (const c of TOY_COLOURS) {
    const d = dist(TOY_PALETTE[c], rgb[0], rgb[1], rgb[2]);
    if (d < d1) {
      d2 = d1;
      d1 = d;
      best = c;
    } else if (d < d2) d2 = d;
  }
  return { name: best, confidence: d2 > 0 ? 1 - d1 / d2 : 0, rgb, distance: d1 };
}

/** Distance d from the point (r, g, b) to the segment from `a` to `b`, and the position t ∈ [0, 1] of its foot. */
function segmentFit(a: Rgb, b: Rgb, r: number, g: number, bl: number): { d: number; t: number } {
  const d0 = b[0] - a[0];
  const d1 = b[1] - a[1];
  const d2 = b[2] - a[2];
  const len2 = d0 * d0 + d1 * d1 + d2 * d2 || 1;
  let t = ((r - a[0]) * d0 + (g - a[1]) * d1 + (bl - a[2]) * d2) / len2;
  t = t < 0 ? 0 : t > 1 ? 1 : t;
  return { d: hypot(r - a[0] - t * d0, g - a[1] - t * d1, bl - a[2] - t * d2), t };
}

/**
 * Names an object's colour from its pixels: the named colour c (other than the background's) whose
 * mixing line background → c passes closest to them (mean distance). Blur and anti-aliasing mix the
 * object with the background along exactly that line, so a small black shape blurred into a white
 * background reads as black, where its mean (a mid grey) would be nearer to green.
 */
function nameForeground(data: Uint8Array, pixels: number[], bg: Rgb, bgName: ToyColour, rgb: Rgb): ColourVerdict {
  let best: ToyColour = TOY_COLOURS[0];
  let r1 = Infinity;
  let r2 = Infinity;
  for (const c of TOY_COLOURS) {
    if (c === bgName) continue;
    let sum = 0;
    for (const p of pixels) sum += segmentFit(bg, TOY_PALETTE[c], data[p * 3], data[p * 3 + 1], data[p * 3 + 2]).d;
    const r = sum / pixels.length;
    if (r < r1) {
      r2 = r1;
      r1 = r;
      best = c;
    } else if (r < r2) r2 = r;
  }
  const target = TOY_PALETTE[best];
  return { name: best, confidence: 1 - (r1 + 1) / (r2 + 1), rgb, distance: dist(target, rgb[0], rgb[1], rgb[2]) };
}

/** Per-channel median of the listed pixels (by 256-bin histograms). */
function medianRgb(data: Uint8Array, pixels: ArrayLike<number>): Rgb {
  const out: number[] = [];
  for (let c = 0; c < 3; c++) {
    const hist = new Uint32Array(256);
    for (let i = 0; i < pixels.length; i++) hist[data[pixels[i] * 3 + c]]++;
    const half = pixels.length / 2;
    let acc = 0;
    let v = 0;
    for (; v < 255; v++) {
      acc += hist[v];
      if (acc >= half) break;
    }
    out.push(v);
  }
  return [out[0], out[1], out[2]];
}

/** Pixel-scale factors of an image relative to the 32×32 world. */
function scales(img: RgbImage): { unit: number; border: number } {
  const side = sqrt(img.width * img.height);
  return { unit: side / TOY_WORLD_SIZE, border: max(1, round(min(img.width, img.height) / TOY_WORLD_SIZE)) };
}

interface Foreground {
  background: ColourVerdict;
  bg: Rgb;
  borderAgreement: number;
  /** 1 where the pixel is foreground. */
  mask: Uint8Array;
  /** Group label per pixel (0: background, 1…n). */
  labels: Int32Array;
  /** Pixel indices of each group, largest first. */
  groups: number[][];
  count: number;
}

function findForeground(img: RgbImage, threshold: number): Foreground {
  checkImage(img);
  const { width: w, height: h, data } = img;
  const { border } = scales(img);
  const borderPixels: number[] = [];
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (x < border || y < border || x >= w - border || y >= h - border) borderPixels.push(y * w + x);
    }
  }
  const bg = medianRgb(data, borderPixels);
  let agree = 0;
  for (const p of borderPixels) if (dist(bg, data[p * 3], data[p * 3 + 1], data[p * 3 + 2]) <= threshold) agree++;
  const mask = new Uint8Array(w * h);
  let count = 0;
  for (let p = 0; p < w * h; p++) {
    if (dist(bg, data[p * 3], data[p * 3 + 1], data[p * 3 + 2]) > threshold) {
      mask[p] = 1;
      count++;
    }
  }
  // 8-connected groups, by an explicit stack.
  const labels = new Int32Array(w * h);
  const groups: number[][] = [];
  const stack: number[] = [];
  for (let p = 0; p < w * h; p++) {
    if (!mask[p] || labels[p]) continue;
    const label = groups.length + 1;
    const members: number[] = [];
    labels[p] = label;
    stack.push(p);
    while (stack.length) {
      const q = stack.pop()!;
      members.push(q);
      const qx = q % w;
      const qy = (q - qx) / w;
      for (let dy = -1; dy <= 1; dy++) {
        const ny = qy + dy;
        if (ny < 0 || ny >= h) continue;
        for (let dx = -1; dx <= 1; dx++) {
          const nx = qx + dx;
          if (nx < 0 || nx >= w) continue;
          const n = ny * w + nx;
          if (mask[n] && !labels[n]) {
            labels[n] = label;
            stack.push(n);
          }
        }
      }
    }
    groups.push(members);
  }
  groups.sort((a, b) => b.length - a.length);
  return {
    background: nameColour(bg),
    bg,
    borderAgreement: borderPixels.length ? agree / borderPixels.length : 0,
    mask,
    labels,
    groups,
    count,
  };
}

/** The groups of at least 3 pixels per 32×32 (smaller ones are noise specks), largest first. */
function withoutSpecks(groups: number[][], unit: number): number[][] {
  const minPixels = max(3, round(3 * unit * unit));
  return groups.filter((g) => g.length >= minPixels);
}

/** A fitted ideal shape, in pixel coordinates (bounding-box centre and extent). */
interface Fit {
  shape: ToyShape;
  cx: number;
  cy: number;
  extent: number;
}

/** Area and centroid of a coverage map over a pixel list. */
function moments(alpha: Float64Array, pixels: number[], w: number): { area: number; mx: number; my: number } {
  let area = 0;
  let sx = 0;
  let sy = 0;
  for (const p of pixels) {
    const a = alpha[p];
    const x = (p % w) + 0.5;
    const y = floor(p / w) + 0.5;
    area += a;
    sx += a * x;
    sy += a * y;
  }
  if (area <= 0) return { area: 0, mx: 0, my: 0 };
  return { area, mx: sx / area, my: sy / area };
}

/**
 * The ideal shape with the same area and centroid: circle r = √(A/π); square s = √A; upright
 * equilateral triangle of base b = √(4A/√3), whose centroid lies 2/3 of its height below the apex.
 * (Area and centroid are unchanged by blur, so the fit is too.)
 */
function fitShape(shape: ToyShape, m: ReturnType<typeof moments>): Fit {
  switch (shape) {
    case 'circle':
      return { shape, cx: m.mx, cy: m.my, extent: 2 * sqrt(m.area / PI) };
    case 'square':
      return { shape, cx: m.mx, cy: m.my, extent: sqrt(m.area) };
    case 'triangle': {
      const base = sqrt((4 * m.area) / SQRT3);
      const height = (base * SQRT3) / 2;
      const top = m.my - (2 * height) / 3;
      return { shape, cx: m.mx, cy: top + height / 2, extent: base };
    }
  }
}

/** A Gaussian kernel of standard deviation `sigma` (pixels), normalised, radius ⌈3σ⌉. */
function gaussianKernel(sigma: number): Float64Array {
  const radius = max(1, ceil(3 * sigma));
  const k = new Float64Array(2 * radius + 1);
  let sum = 0;
  for (let i = -radius; i <= radius; i++) sum += k[i + radius] = exp(-(i * i) / (2 * sigma * sigma));
  for (let i = 0; i < k.length; i++) k[i] /= sum;
  return k;
}

/** Separable blur of a `cols`×`rows` map, zero outside it. */
function blurMap(map: Float64Array, cols: number, rows: number, sigma: number): Float64Array {
  const k = gaussianKernel(sigma);
  const r = (k.length - 1) / 2;
  const tmp = new Float64Array(map.length);
  for (let y = 0; y < rows; y++) {
    for (let x = 0; x < cols; x++) {
      let acc = 0;
      for (let i = max(-r, -x); i <= min(r, cols - 1 - x); i++) acc += k[i + r] * map[y * cols + x + i];
      tmp[y * cols + x] = acc;
    }
  }
  const out = new Float64Array(map.length);
  for (let y = 0; y < rows; y++) {
    for (let x = 0; x < cols; x++) {
      let acc = 0;
      for (let i = max(-r, -y); i <= min(r, rows - 1 - y); i++) acc += k[i + r] * tmp[(y + i) * cols + x];
      out[y * cols + x] = acc;
    }
  }
  return out;
}

/**
 * Soft IoU (Σ min / Σ max) between a coverage map and an ideal shape drawn with 4×4 supersampling,
 * the shape also blurred by each of `sigmas` (pixels): the best IoU and the blur that gave it.
 * Blurring a picture blurs its coverage map the same way, so a soft but right shape still fits its
 * own template better than the others'.
 */
function softIoU(
  alpha: Float64Array,
  w: number,
  h: number,
  fit: Fit,
  box: [number, number, number, number],
  sigmas: readonly number[],
): { iou: number; sigma: number } {
  const pad = ceil(3 * max(0, ...sigmas)) + 1;
  const half = fit.extent / 2;
  const x0 = max(0, min(box[0], floor(fit.cx - half) - pad));
  const y0 = max(0, min(box[1], floor(fit.cy - half) - pad));
  const x1 = min(w - 1, max(box[2], ceil(fit.cx + half) + pad));
  const y1 = min(h - 1, max(box[3], ceil(fit.cy + half) + pad));
  const cols = x1 - x0 + 1;
  const rows = y1 - y0 + 1;
  const S = 4;
  const sharp = new Float64Array(cols * rows);
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      let hits = 0;
      for (let sy = 0; sy < S; sy++) {
        for (let sx = 0; sx < S; sx++) {
          if (insideToyShape(fit.shape, x + (sx + 0.5) / S, y + (sy + 0.5) / S, fit.cx, fit.cy, fit.extent)) hits++;
        }
      }
      sharp[(y - y0) * cols + (x - x0)] = hits / (S * S);
    }
  }
  let best = { iou: 0, sigma: 0 };
  for (const sigma of sigmas) {
    const t = sigma > 0 ? blurMap(sharp, cols, rows, sigma) : sharp.slice();
    for (let i = 0; i < t.length; i++) t[i] = deadZone(t[i]);
    let inter = 0;
    let union = 0;
    for (let y = y0; y <= y1; y++) {
      for (let x = x0; x <= x1; x++) {
        const a = alpha[y * w + x];
        const v = t[(y - y0) * cols + (x - x0)];
        inter += min(a, v);
        union += max(a, v);
      }
    }
    const iou = union > 0 ? inter / union : 0;
    if (iou > best.iou) best = { iou, sigma };
  }
  return best;
}

/** Pixels of `group` and those within `radius` (Chebyshev) of it, with the group's bounding box. */
function dilate(group: number[], w: number, h: number, radius: number): { pixels: number[]; box: [number, number, number, number] } {
  const seen = new Uint8Array(w * h);
  const pixels: number[] = [];
  let x0 = w;
  let y0 = h;
  let x1 = -1;
  let y1 = -1;
  for (const p of group) {
    const px = p % w;
    const py = (p - px) / w;
    for (let y = max(0, py - radius); y <= min(h - 1, py + radius); y++) {
      for (let x = max(0, px - radius); x <= min(w - 1, px + radius); x++) {
        const q = y * w + x;
        if (!seen[q]) {
          seen[q] = 1;
          pixels.push(q);
          if (x < x0) x0 = x;
          if (x > x1) x1 = x;
          if (y < y0) y0 = y;
          if (y > y1) y1 = y;
        }
      }
    }
  }
  return { pixels, box: [x0, y0, x1, y1] };
}

/** Fits every shape to a coverage map over `pixels` and returns their IoUs and fits. */
function fitAll(alpha: Float64Array, pixels: number[], box: [number, number, number, number], w: number, h: number, sigmas: readonly number[]) {
  const m = moments(alpha, pixels, w);
  const fits = {} as Record<ToyShape, Fit>;
  const scores = {} as Record<ToyShape, number>;
  const blur = {} as Record<ToyShape, number>;
  for (const s of TOY_SHAPES) {
    fits[s] = fitShape(s, m);
    const r = m.area > 0 ? softIoU(alpha, w, h, fits[s], box, sigmas) : { iou: 0, sigma: 0 };
    scores[s] = r.iou;
    blur[s] = r.sigma;
  }
  return { m, fits, scores, blur };
}

// ---------------------------------------------------------------------------------------------
// The judge

/**
 * Reads background, colour, shape and size from a picture (see the module notes for how). Works at
 * any resolution; the picture is expected to be square like the world's canvas.
 */
export function judgeToyImage(img: RgbImage, options: JudgeOptions = {}): ToyJudgement {
  const o = { ...DEFAULTS, ...options };
  const fg = findForeground(img, o.foregroundThreshold);
  const { width: w, height: h, data } = img;
  const { unit } = scales(img);
  const objects = withoutSpecks(fg.groups, unit);
  const objectPixels = objects.reduce((n, g) => n + g.length, 0);
  const base = {
    background: fg.background,
    borderAgreement: fg.borderAgreement,
    foregroundPixels: fg.count,
    components: objects.length,
  };
  const main = fg.groups[0];
  if (!main || !objects.length) {
    return { ...base, colour: null, shape: null, size: null, mainComponentShare: 0 };
  }
  // The object's colour: median of its interior pixels (all of it when it has no interior).
  const interior: number[] = [];
  for (const p of main) {
    const x = p % w;
    const y = (p - x) / w;
    if (x > 0 && y > 0 && x < w - 1 && y < h - 1 && fg.mask[p - 1] && fg.mask[p + 1] && fg.mask[p - w] && fg.mask[p + w]) interior.push(p);
  }
  const fgRgb = medianRgb(data, interior.length >= 3 ? interior : main);
  const bg = fg.bg;
  const colour = nameForeground(data, main, bg, fg.background.name, fgRgb);
  // Soft coverage around the object: its position on the line from the background to the named
  // colour, scaled by how far the object actually reaches along it (the 95th percentile), but never
  // by less than 85% of the named colour's distance (a small blurred object never reaches it all).
  const target = TOY_PALETTE[colour.name];
  const dir = [target[0] - bg[0], target[1] - bg[1], target[2] - bg[2]];
  const len = hypot(dir[0], dir[1], dir[2]) || 1;
  const project = (p: number): number =>
    ((data[p * 3] - bg[0]) * dir[0] + (data[p * 3 + 1] - bg[1]) * dir[1] + (data[p * 3 + 2] - bg[2]) * dir[2]) / len;
  const reach = main.map(project).sort((a, b) => a - b)[min(main.length - 1, floor(0.95 * main.length))];
  const scale = max(reach, 0.85 * len);
  const { pixels, box } = dilate(main, w, h, max(1, round(2 * unit)));
  const alpha = new Float64Array(w * h);
  for (const p of pixels) {
    // Pixels of another foreground group next to the object are not part of it.
    if (fg.labels[p] && fg.labels[p] !== fg.labels[main[0]]) continue;
    alpha[p] = deadZone(project(p) / scale);
  }
  const sigmas = o.blurLevels.map((b) => b * unit);
  const { fits, scores, blur } = fitAll(alpha, pixels, box, w, h, sigmas);
  const ranked = [...TOY_SHAPES].sort((a, b) => scores[b] - scores[a]);
  const best = ranked[0];
  const margin = scores[best] - scores[ranked[1]];
  const mainComponentShare = main.length / objectPixels;
  const shape: ShapeVerdict = {
    name: best,
    iou: scores[best],
    margin,
    strict: scores[best] >= o.strictIoU && margin >= o.strictMargin && mainComponentShare >= o.strictSingle,
    confidence: min(1, margin / 0.1),
    scores,
    blur: blur[best] / unit,
  };
  const extent = fits[best].extent / unit;
  const size: SizeVerdict = {
    name: extent < TOY_SIZE_THRESHOLD ? 'small' : 'large',
    extent,
    confidence: min(1, abs(extent - TOY_SIZE_THRESHOLD) / 2.5),
  };
  return { ...base, colour, shape, size, mainComponentShare };
}

/** Options of {@link scoreToyImage}. */
export interface ScoreOptions extends JudgeOptions {
  /** Count a shape as right only when the judge's verdict is strict (default true). */
  strict?: boolean;
}

/** Which of the expected attributes a picture shows. Attributes not asked for are left undefined. */
export interface ToyScore {
  background?: boolean;
  colour?: boolean;
  shape?: boolean;
  size?: boolean;
  /** Every asked-for attribute matches. */
  all: boolean;
  judgement: ToyJudgement;
}

/**
 * Scores a picture against what it should show: attributes, or a caption/prompt read with
 * {@link parseToyCaption}. Only the attributes given are checked; with `strict` (default) the shape
 * counts only when the judge's shape verdict is strict.
 */
export function scoreToyImage(img: RgbImage, expected: Partial<ToyAttributes> | string, options: ScoreOptions = {}): ToyScore {
  const want = typeof expected === 'string' ? parseToyCaption(expected) : expected;
  const j = judgeToyImage(img, options);
  const strict = options.strict ?? true;
  const out: ToyScore = { all: true, judgement: j };
  if (want.background !== undefined) out.background = j.background.name === want.background;
  if (want.colour !== undefined) out.colour = j.colour?.name === want.colour;
  if (want.shape !== undefined) out.shape = !!j.shape && j.shape.name === want.shape && (!strict || j.shape.strict);
  if (want.size !== undefined) out.size = j.size?.name === want.size;
  out.all = [out.background, out.colour, out.shape, out.size].every((v) => v !== false);
  return out;
}

/** Share of right answers per attribute over many scores (NaN where an attribute was never asked). */
export interface ToyAccuracy {
  n: number;
  background: number;
  colour: number;
  shape: number;
  size: number;
  all: number;
}

/** Sums up {@link scoreToyImage} results. */
export function summarizeToyScores(scores: readonly ToyScore[]): ToyAccuracy {
  const rate = (key: 'background' | 'colour' | 'shape' | 'size'): number => {
    const asked = scores.filter((s) => s[key] !== undefined);
    return asked.length ? asked.filter((s) => s[key]).length / asked.length : NaN;
  };
  return {
    n: scores.length,
    background: rate('background'),
    colour: rate('colour'),
    shape: rate('shape'),
    size: rate('size'),
    all: scores.length ? scores.filter((s) => s.all).length / scores.length : NaN,
  };
}

// ---------------------------------------------------------------------------------------------
// Emblems

/** What {@link detectEmblem} found. */
export interface EmblemDetection {
  emblem: ToyEmblemName;
  /** Every check passed. */
  present: boolean;
  /** Share of the checks that passed (a soft score for ranking). */
  score: number;
  /** Each check by name. */
  checks: Record<string, boolean>;
  /** The measurements behind the checks (pixels, shares, ratios). */
  measures: Record<string, number>;
  background: ColourVerdict;
}

/** Largest RGB distance from a background → colour mixing line at which a pixel belongs to that colour. */
const MIX_DISTANCE = 60;

/** A pixel index with a weight (its coverage). */
interface Weighted {
  p: number;
  w: number;
}

function centroid(points: Weighted[], w: number): [number, number] {
  let sx = 0;
  let sy = 0;
  let sw = 0;
  for (const { p, w: k } of points) {
    sx += k * ((p % w) + 0.5);
    sy += k * (floor(p / w) + 0.5);
    sw += k;
  }
  return sw > 0 ? [sx / sw, sy / sw] : [NaN, NaN];
}

/**
 * Does the picture show the emblem (see {@link TOY_EMBLEMS})? Foreground pixels are sorted into the
 * emblem's two colours and others by the nearest background → colour mixing line, each weighted by
 * its coverage along it (so blurred edges count for what they show); then, with shares of that
 * coverage:
 *
 * - few other colours (≤ 15% of the solid foreground) and each of the two 25-75%;
 * - the second colour's centroid at least 0.45 R from the first's along the split axis (to the
 *   right for 'split-disc', below for 'split-tile') and within 0.25 R across it (R the radius of a
 *   disc of the object's area);
 * - the outline: the disc fits a circle, the tile a square (IoU ≥ 0.7, and better than the other);
 * - a single object (≥ 85% of the foreground in one group).
 *
 * `colours` overrides the emblem's own, to look for recoloured variants.
 */
export function detectEmblem(
  img: RgbImage,
  emblem: ToyEmblemName,
  options: JudgeOptions & { colours?: { outer: ToyColour; inner: ToyColour } } = {},
): EmblemDetection {
  const def = TOY_EMBLEMS[emblem];
  if (!def) throw new InvalidArgumentError(`Unknown emblem "${emblem}"`);
  const o = { ...DEFAULTS, ...options };
  const colours = options.colours ?? def.colours;
  const fg = findForeground(img, o.foregroundThreshold);
  const { width: w, height: h, data } = img;
  const { unit } = scales(img);
  const objects = withoutSpecks(fg.groups, unit);
  const objectPixels = objects.reduce((n, g) => n + g.length, 0);
  // Each object pixel goes to the colour whose mixing line from the background passes closest (a
  // pink pixel of a blurred red ring on white is red, at coverage ~0.5), weighted by its coverage
  // along that line; pixels far from every line (mixes of two foreground colours) are left out.
  const outer: Weighted[] = [];
  const inner: Weighted[] = [];
  let other = 0;
  for (const group of objects) {
    for (const p of group) {
      let best: ToyColour | undefined;
      let bestD = Infinity;
      let bestT = 0;
      for (const c of TOY_COLOURS) {
        if (c === fg.background.name) continue;
        const { d, t } = segmentFit(fg.bg, TOY_PALETTE[c], data[p * 3], data[p * 3 + 1], data[p * 3 + 2]);
        if (d < bestD) {
          bestD = d;
          bestT = t;
          best = c;
        }
      }
      if (!best || bestD > MIX_DISTANCE) continue;
      if (best === colours.outer) outer.push({ p, w: bestT });
      else if (best === colours.inner) inner.push({ p, w: bestT });
      else other += bestT;
    }
  }
  const sumO = outer.reduce((n, v) => n + v.w, 0);
  const sumI = inner.reduce((n, v) => n + v.w, 0);
  const total = sumO + sumI + other;
  const measures: Record<string, number> = {
    foregroundPixels: objectPixels,
    outerArea: sumO,
    innerArea: sumI,
    otherArea: other,
    outerShare: total ? sumO / total : 0,
    innerShare: total ? sumI / total : 0,
    otherShare: total ? other / total : 1,
  };
  const checks: Record<string, boolean> = {
    visible: sumO >= 4 * unit * unit && sumI >= 2 * unit * unit,
    fewOtherColours: measures.otherShare <= 0.15,
  };
  const cO = centroid(outer, w);
  const cI = centroid(inner, w);
  const main = objects[0] ?? [];
  const R = sqrt(main.length / PI);
  const alpha = new Float64Array(w * h);
  for (const p of main) alpha[p] = 1;
  const { pixels, box } = dilate(main, w, h, 1);
  const fit = main.length ? fitAll(alpha, pixels, box, w, h, [0]).scores : { circle: 0, square: 0, triangle: 0 };
  const [outline, rival] = def.name === 'split-disc' ? (['circle', 'square'] as const) : (['square', 'circle'] as const);
  const [along, across] = def.name === 'split-disc' ? [cI[0] - cO[0], cI[1] - cO[1]] : [cI[1] - cO[1], cI[0] - cO[0]];
  Object.assign(measures, {
    radius: R,
    splitOffset: R > 0 ? along / R : 0,
    crossOffset: R > 0 ? abs(across) / R : 0,
    outlineFit: fit[outline],
    rivalFit: fit[rival],
    mainComponentShare: objectPixels ? main.length / objectPixels : 0,
  });
  checks.balanced = measures.outerShare >= 0.25 && measures.outerShare <= 0.75 && measures.innerShare >= 0.25 && measures.innerShare <= 0.75;
  checks.split = measures.splitOffset >= 0.45 && measures.crossOffset <= 0.25;
  checks.outline = measures.outlineFit >= 0.7 && measures.outlineFit > measures.rivalFit;
  checks.single = measures.mainComponentShare >= 0.85;
  const values = Object.values(checks);
  const passed = values.filter(Boolean).length;
  return { emblem, present: passed === values.length, score: passed / values.length, checks, measures, background: fg.background };
}
