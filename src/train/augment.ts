/**
 * The Custom Diffusion augmentations, deterministic given an {@link Rng}.
 *
 * **Instance images** get the paper's random-scale augmentation. The default, `style: 'compvis'`,
 * follows the original paper code (A-CV, adobe-research/custom-diffusion `src/finetune_data.py`
 * `MaskBase`):
 *
 * 1. center-crop to a square of side min(h, w) (offsets (h−c)//2, (w−c)//2);
 * 2. horizontal flip with p = 0.5 (`hflip: false` makes it p = 0);
 * 3. the scale s: with probability 2/3 (`randint(0,3) < 2`) s ~ U{size//3 … size}, otherwise
 *    s ~ U{int(1.2·size) … int(1.4·size)−1}; an odd s becomes s+1 (`noaug`: s = size, no draws);
 * 4. three branches:
 *    - s < 0.6·size ("far"): prompt prefix `"a far away "` or `"very small "` (50/50); centre
 *      cx, cy ~ U{s//2 … size−s//2} (cx on rows, cy on columns); the image resized to s×s is pasted
 *      into a zero canvas (0 is mid-grey in [−1, 1]) on rows [cx−s//2, cx+s//2) and columns
 *      [cy−s//2, cy+s//2); the mask, built directly at latent resolution size/8, is 1 on rows
 *      (cx−s//2)//8+1 … (cx+s//2)//8−1 (end excluded) and the same columns for cy, 0 elsewhere;
 *    - s > size ("zoom"): prefix `"zoomed in "` or `"close up "` (50/50); cx, cy ~ U{size//2 … s−size//2};
 *      the s×s resize is cropped to rows [cx−size//2, cx+size//2), columns likewise; mask all ones;
 *    - otherwise ("full"): no prefix, resized to size×size (s only chose the branch), mask all ones;
 * 5. resampling is PIL **BICUBIC**; pixels map to [−1, 1] as float32(x/127.5 − 1).
 *
 * `style: 'diffusers'` is the official diffusers-based script (A-DF, `src/diffusers_data_pipeline.py`):
 * the same draws and branches, but **no center crop** (a non-square image is squashed to a square)
 * and PIL **BILINEAR** resampling. (The diffusers example, HF-EX, has a different augmentation, see
 * method-facts pitfall 11; it is not implemented.)
 *
 * Why 'compvis' is the default: it is the code the paper's results come from, and the center crop
 * keeps the concept's proportions, where A-DF distorts every non-square photo.
 *
 * **Class (prior) images** get no scale augmentation: 'compvis' center-crops, flips and resizes
 * bicubic to size×size; 'diffusers' resizes the shorter side to `size` (bilinear, torchvision's
 * rounding) and takes a random size×size crop (`centerCrop: true`: the central one), then flips.
 * Their pixels are a function of (file, flip, crop), so the resized image can be cached and the flip
 * and crop applied per draw. PIL's resampler is mirror-symmetric (flip∘resize = resize∘flip, checked
 * in the tests), so flipping after the resize gives exactly the original's flip-then-resize bytes.
 *
 * Draw order per example (one stream): instance: flip, [branch, scale, [prefix, cx, cy]]; class:
 * flip, [top, left]. This is the original order of the numpy/torch draws, on our own generator:
 * the same distributions, not the same numbers as numpy's stream.
 *
 * @packageDocumentation
 */
import { InvalidArgumentError } from '../errors';
import {
  centerCropSquare,
  cropRgb,
  flipHorizontal,
  resizeRgb,
  toFloatCHW,
  type Normalization,
  type ResampleFilter,
  type ResizeEngine,
  type RgbImage,
} from './images';
import type { Rng } from './rng';

/** `'compvis'`: the original paper code A-CV (default); `'diffusers'`: the official diffusers script A-DF. */
export type AugmentStyle = 'compvis' | 'diffusers';

/** The VAE's downsampling factor: masks live at size/8. */
export const LATENT_FACTOR = 8;

/** Prompt prefixes of the "far" branch, exactly as in the original (trailing space included). */
export const FAR_PREFIXES = ['a far away ', 'very small '] as const;
/** Prompt prefixes of the "zoom" branch. */
export const ZOOM_PREFIXES = ['zoomed in ', 'close up '] as const;

export type ScaleBranch = 'far' | 'zoom' | 'full';

export interface AugmentOptions {
  /** Training resolution in pixels; a multiple of 8 (default 512). */
  size?: number;
  /**
   * Which original pipeline to follow. Default `'compvis'` (A-CV, the paper's code: center crop,
   * PIL BICUBIC), because the paper's results come from it and the crop keeps the concept's
   * proportions; `'diffusers'` (A-DF: squash to square, PIL BILINEAR) matches the diffusers-based
   * scripts. See the module comment.
   */
  style?: AugmentStyle;
  /** Random horizontal flips with p = 0.5 (default true; false: p = 0). */
  hflip?: boolean;
  /** Instance images: no scale augmentation (s = size: full branch, mask all ones, no prefix). */
  noaug?: boolean;
  /** Class images in the 'diffusers' style: central crop instead of a random one (default false). */
  centerCrop?: boolean;
  /** Resampling implementation (default `'pil'`, byte-exact with Pillow). */
  engine?: ResizeEngine;
}

/** Options with defaults filled in and checked. */
export interface ResolvedAugmentOptions {
  size: number;
  style: AugmentStyle;
  hflip: boolean;
  noaug: boolean;
  centerCrop: boolean;
  engine: ResizeEngine;
}

export function resolveAugmentOptions(options: AugmentOptions = {}): ResolvedAugmentOptions {
  const size = options.size ?? 512;
  if (!Number.isInteger(size) || size < LATENT_FACTOR * 3 || size % LATENT_FACTOR !== 0) {
    throw new InvalidArgumentError(`size must be a multiple of ${LATENT_FACTOR} and at least 24, got ${size}`);
  }
  const style = options.style ?? 'compvis';
  if (style !== 'compvis' && style !== 'diffusers') {
    throw new InvalidArgumentError(`style must be 'compvis' or 'diffusers', got ${String(style)}`);
  }
  const engine = options.engine ?? 'pil';
  if (engine !== 'pil' && engine !== 'sharp') throw new InvalidArgumentError(`engine must be 'pil' or 'sharp', got ${String(engine)}`);
  return {
    size,
    style,
    hflip: options.hflip ?? true,
    noaug: options.noaug ?? false,
    centerCrop: options.centerCrop ?? false,
    engine,
  };
}

/** The resampling filter of a style: PIL BICUBIC for 'compvis', BILINEAR for 'diffusers'. */
export function filterOf(style: AugmentStyle): ResampleFilter {
  return style === 'compvis' ? 'bicubic' : 'bilinear';
}

/** How bytes become floats for a style's class images (instance images always use 'numpy'). */
export function classNormalizationOf(style: AugmentStyle): Normalization {
  return style === 'compvis' ? 'numpy' : 'torchvision';
}

/** The random choices of one instance example. */
export interface InstanceAugmentParams {
  flip: boolean;
  /** The drawn scale s (even), or size with noaug. */
  scale: number;
  branch: ScaleBranch;
  /** One of the four prefixes, or '' for the full branch. */
  prefix: '' | (typeof FAR_PREFIXES)[number] | (typeof ZOOM_PREFIXES)[number];
  /** Centre row / column: in the size×size canvas (far) or in the s×s resize (zoom); −1 for full. */
  cx: number;
  cy: number;
}

/** The random choices of one class example: flip and the top-left of the crop in the resized image. */
export interface ClassAugmentParams {
  flip: boolean;
  top: number;
  left: number;
}

/** The branch a scale falls in, with the original thresholds (s < 0.6·size, s > size). */
export function branchOf(scale: number, size: number): ScaleBranch {
  if (scale < 0.6 * size) return 'far';
  if (scale > size) return 'zoom';
  return 'full';
}

/** The scale rule: 2/3 small range, 1/3 large range, odd bumped to even. Three or two draws. */
export function drawScale(rng: Rng, size: number): number {
  let s: number;
  if (rng.int(0, 2) < 2) s = rng.int(Math.floor(size / 3), size);
  else s = rng.int(Math.trunc(1.2 * size), Math.trunc(1.4 * size) - 1);
  if (s % 2 === 1) s += 1;
  return s;
}

/** Draws the augmentation of one instance example (see the module comment for the order). */
export function drawInstanceAugment(rng: Rng, options: AugmentOptions = {}): InstanceAugmentParams {
  const o = resolveAugmentOptions(options);
  const size = o.size;
  const flip = rng.bernoulli(o.hflip ? 0.5 : 0);
  const scale = o.noaug ? size : drawScale(rng, size);
  const branch = branchOf(scale, size);
  if (branch === 'far') {
    const prefix = FAR_PREFIXES[rng.int(0, 1)];
    const half = Math.floor(scale / 2);
    const cx = rng.int(half, size - half);
    const cy = rng.int(half, size - half);
    return { flip, scale, branch, prefix, cx, cy };
  }
  if (branch === 'zoom') {
    const prefix = ZOOM_PREFIXES[rng.int(0, 1)];
    const half = Math.floor(size / 2);
    const cx = rng.int(half, scale - half);
    const cy = rng.int(half, scale - half);
    return { flip, scale, branch, prefix, cx, cy };
  }
  return { flip, scale, branch, prefix: '', cx: -1, cy: -1 };
}

/**
 * The latent mask of the far branch, [size/8 × size/8] row-major: 1 on rows
 * (cx−s//2)//8+1 … (cx+s//2)//8−1 (end excluded) and columns likewise with cy, 0 elsewhere.
 * (Python would read a negative end as counting from the end; that needs cx+s//2 < 8, which the
 * scale rule never produces.) Where that range is empty (a square under 3 latent cells, possible only
 * for images below ~72 px), the mask covers the cells the square touches instead, so no example has
 * an empty mask.
 */
export function latentMask(size: number, scale: number, cx: number, cy: number): Float32Array {
  const n = size / LATENT_FACTOR;
  if (!Number.isInteger(n)) throw new InvalidArgumentError(`size must be a multiple of ${LATENT_FACTOR}, got ${size}`);
  const half = Math.floor(scale / 2);
  for (const [name, c] of [['cx', cx], ['cy', cy]] as const) {
    if (!Number.isInteger(c) || c - half < 0 || c + half > size) {
      throw new InvalidArgumentError(`${name}=${c} puts a ${scale}-pixel square outside a ${size}-pixel canvas`);
    }
  }
  const range = (c: number): [number, number] => {
    const lo = Math.floor((c - half) / LATENT_FACTOR) + 1;
    const hi = Math.floor((c + half) / LATENT_FACTOR) - 1;
    // The one-cell erosion empties the range of a square under 3 latent cells (only below ~72 px
    // images; the original then divides by zero and trains on NaN): keep the cells it covers instead.
    if (hi <= lo) return [Math.max(0, Math.floor((c - half) / LATENT_FACTOR)), Math.min(n, Math.ceil((c + half) / LATENT_FACTOR))];
    return [Math.max(0, Math.min(n, lo)), Math.max(0, Math.min(n, hi))];
  };
  const [r0, r1] = range(cx);
  const [c0, c1] = range(cy);
  const mask = new Float32Array(n * n);
  for (let r = r0; r < r1; r++) mask.fill(1, r * n + c0, r * n + Math.max(c0, c1));
  return mask;
}

/** A mask of ones, [size/8 × size/8]. */
export function onesMask(size: number): Float32Array {
  const n = size / LATENT_FACTOR;
  return new Float32Array(n * n).fill(1);
}

/** The instance image as the augmentation starts from it: center-cropped to a square for 'compvis', unchanged for 'diffusers'. */
export function prepareInstanceImage(img: RgbImage, style: AugmentStyle = 'compvis'): RgbImage {
  return style === 'compvis' ? centerCropSquare(img) : img;
}

/** Where an augmented example is written: fresh arrays, or slots of batch buffers. */
export interface ExampleTarget {
  pixels?: Float32Array;
  pixelOffset?: number;
  mask?: Float32Array;
  maskOffset?: number;
}

export interface AugmentedExample {
  /** [3, size, size] float32 in [−1, 1] (or the slot written in the target). */
  pixels: Float32Array;
  /** [1, size/8, size/8] float32, 1 where the loss counts. */
  mask: Float32Array;
}

function checkParams(p: InstanceAugmentParams, size: number): void {
  if (p.branch !== branchOf(p.scale, size)) {
    throw new InvalidArgumentError(`scale ${p.scale} belongs to the ${branchOf(p.scale, size)} branch, not ${p.branch}`);
  }
  if (p.branch !== 'full' && p.scale % 2 !== 0) throw new InvalidArgumentError(`scale must be even, got ${p.scale}`);
  if (p.branch === 'far') {
    const half = p.scale / 2;
    for (const c of [p.cx, p.cy]) {
      if (!Number.isInteger(c) || c < half || c > size - half) {
        throw new InvalidArgumentError(`far centre ${c} is outside [${half}, ${size - half}]`);
      }
    }
  }
  if (p.branch === 'zoom') {
    const half = size / 2;
    for (const c of [p.cx, p.cy]) {
      if (!Number.isInteger(c) || c < half || c > p.scale - half) {
        throw new InvalidArgumentError(`zoom centre ${c} is outside [${half}, ${p.scale - half}]`);
      }
    }
  }
}

/**
 * Applies drawn parameters to a prepared instance image (see {@link prepareInstanceImage}):
 * resize, flip, paste or crop, normalise to [−1, 1], and the mask.
 */
export async function applyInstanceAugment(
  prepared: RgbImage,
  params: InstanceAugmentParams,
  options: AugmentOptions = {},
  target: ExampleTarget = {},
): Promise<AugmentedExample> {
  const o = resolveAugmentOptions(options);
  const size = o.size;
  checkParams(params, size);
  const plane = size * size;
  const pixels = target.pixels ?? new Float32Array(3 * plane);
  const pOff = target.pixels ? target.pixelOffset ?? 0 : 0;
  const n = size / LATENT_FACTOR;
  const mask = target.mask ?? new Float32Array(n * n);
  const mOff = target.mask ? target.maskOffset ?? 0 : 0;
  if (pixels.length < pOff + 3 * plane || mask.length < mOff + n * n) {
    throw new InvalidArgumentError('applyInstanceAugment: target buffers are too small');
  }
  const filter = filterOf(o.style);
  const side = params.branch === 'full' ? size : params.scale;
  let img = await resizeRgb(prepared, side, side, filter, o.engine);
  if (params.flip) img = flipHorizontal(img);

  if (params.branch === 'far') {
    const s = params.scale;
    const half = s / 2;
    pixels.fill(0, pOff, pOff + 3 * plane);
    const top = params.cx - half;
    const left = params.cy - half;
    const src = toFloatCHW(img);
    for (let c = 0; c < 3; c++) {
      for (let y = 0; y < s; y++) {
        const from = c * s * s + y * s;
        pixels.set(src.subarray(from, from + s), pOff + c * plane + (top + y) * size + left);
      }
    }
    mask.set(latentMask(size, s, params.cx, params.cy), mOff);
  } else {
    if (params.branch === 'zoom') {
      const half = size / 2;
      img = cropRgb(img, params.cx - half, params.cy - half, size, size);
    }
    toFloatCHW(img, 'numpy', pixels, pOff);
    mask.fill(1, mOff, mOff + n * n);
  }
  return {
    pixels: target.pixels ? pixels.subarray(pOff, pOff + 3 * plane) : pixels,
    mask: target.mask ? mask.subarray(mOff, mOff + n * n) : mask,
  };
}

/** One instance example end to end: prepare, draw, apply; the prompt gets the branch's prefix. */
export async function augmentInstance(
  img: RgbImage,
  prompt: string,
  rng: Rng,
  options: AugmentOptions = {},
): Promise<AugmentedExample & { prompt: string; params: InstanceAugmentParams }> {
  const o = resolveAugmentOptions(options);
  const params = drawInstanceAugment(rng, o);
  const out = await applyInstanceAugment(prepareInstanceImage(img, o.style), params, o);
  return { ...out, prompt: params.prefix + prompt, params };
}

/** Python's round(): halves go to the even neighbour (torchvision's CenterCrop uses it). */
function roundHalfEven(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/**
 * The size of a class image after its deterministic resize: size×size for 'compvis' (after the
 * center crop), and torchvision's `Resize(size)` rule for 'diffusers' (shorter side = size, longer
 * side = int(size·long/short)).
 */
export function classResizedSize(width: number, height: number, options: AugmentOptions = {}): { width: number; height: number } {
  const o = resolveAugmentOptions(options);
  if (o.style === 'compvis') return { width: o.size, height: o.size };
  if (width <= height) return { width: o.size, height: Math.trunc((o.size * height) / width) };
  return { width: Math.trunc((o.size * width) / height), height: o.size };
}

/**
 * The deterministic part of a class image, cacheable per file: 'compvis': center crop + bicubic
 * resize to size×size; 'diffusers': bilinear resize of the shorter side to size.
 */
export async function prepareClassImage(img: RgbImage, options: AugmentOptions = {}): Promise<RgbImage> {
  const o = resolveAugmentOptions(options);
  if (o.style === 'compvis') return resizeRgb(centerCropSquare(img), o.size, o.size, 'bicubic', o.engine);
  const { width, height } = classResizedSize(img.width, img.height, o);
  return resizeRgb(img, width, height, 'bilinear', o.engine);
}

/** Draws a class example's flip and crop; `width`/`height` are those of the prepared image. */
export function drawClassAugment(rng: Rng, width: number, height: number, options: AugmentOptions = {}): ClassAugmentParams {
  const o = resolveAugmentOptions(options);
  const flip = rng.bernoulli(o.hflip ? 0.5 : 0);
  if (width < o.size || height < o.size) {
    throw new InvalidArgumentError(`A prepared class image of ${width}×${height} is smaller than ${o.size}`);
  }
  if (o.style === 'compvis' || o.centerCrop) {
    return { flip, top: roundHalfEven((height - o.size) / 2), left: roundHalfEven((width - o.size) / 2) };
  }
  const top = rng.int(0, height - o.size);
  const left = rng.int(0, width - o.size);
  return { flip, top, left };
}

/**
 * Applies a class example's flip and crop to its prepared image and normalises it. The crop is
 * taken in the flipped image, as the original flips before cropping.
 */
export function applyClassAugment(
  prepared: RgbImage,
  params: ClassAugmentParams,
  options: AugmentOptions = {},
  target: ExampleTarget = {},
): AugmentedExample {
  const o = resolveAugmentOptions(options);
  const size = o.size;
  // A crop at `left` of the mirrored image is the mirror of the crop at width−size−left.
  const left = params.flip ? prepared.width - size - params.left : params.left;
  let img = prepared.width === size && prepared.height === size ? prepared : cropRgb(prepared, params.top, left, size, size);
  if (params.flip) img = flipHorizontal(img);
  const plane = size * size;
  const n = size / LATENT_FACTOR;
  const pixels = target.pixels ?? new Float32Array(3 * plane);
  const pOff = target.pixels ? target.pixelOffset ?? 0 : 0;
  toFloatCHW(img, classNormalizationOf(o.style), pixels, pOff);
  const mask = target.mask ?? new Float32Array(n * n);
  const mOff = target.mask ? target.maskOffset ?? 0 : 0;
  mask.fill(1, mOff, mOff + n * n);
  return {
    pixels: target.pixels ? pixels.subarray(pOff, pOff + 3 * plane) : pixels,
    mask: target.mask ? mask.subarray(mOff, mOff + n * n) : mask,
  };
}
