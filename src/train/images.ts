/**
 * Loading training images: decode (JPEG, PNG, WebP and whatever else libvips reads, through
 * `sharp`), apply the EXIF orientation, convert to 8-bit sRGB RGB, check the size, and turn the
 * pixels into the float CHW data the model takes. Also the pixel operations the augmentation needs:
 * crop, horizontal flip, and a resize that reproduces Pillow's `Image.resize` bit for bit.
 *
 * Choices (documented in src/train/README.md as well):
 * - EXIF orientation is applied (`loadSharp()().rotate()`). The original scripts open images with PIL,
 *   which ignores it, so a phone photo taken upright but stored sideways trains sideways there.
 * - Colour: grayscale, CMYK, 16-bit and images with an ICC profile are converted to 8-bit sRGB by
 *   libvips (CMYK through its built-in profile when the file has none). PIL's `convert("RGB")` does
 *   none of the colour management, so CMYK or wide-gamut inputs differ slightly from the original.
 * - Alpha is composited onto **white** by default (`alpha: 'black'` is the other choice). PIL's
 *   `convert("RGB")` simply drops the alpha channel, which shows whatever colour the transparent
 *   pixels happen to store (often black, sometimes garbage); white is the usual backdrop of the
 *   product photos people train on, and it is deterministic.
 * - Size: an image whose shorter side (after orientation) is below `minSize` pixels (default
 *   {@link DEFAULT_MIN_IMAGE_SIZE} = 64, one 8×8 latent) is refused with a {@link DataError} naming
 *   the file. Anything at least that large is accepted; the dataset reports images smaller than the
 *   training resolution as warnings, since upscaling them costs sharpness but is not an error.
 * - Resize: {@link resizeRgb} defaults to a TypeScript port of Pillow's resampler (the same
 *   coefficients, the same 22-bit fixed-point arithmetic, the same two-pass order), which gives the
 *   same bytes as PIL `BICUBIC`/`BILINEAR` for 8-bit RGB. libvips' resize (`engine: 'sharp'`) is
 *   several times faster but is not PIL: it agrees within ~0.3/255 on average when shrinking, and
 *   when enlarging it samples on a grid shifted by about half a source pixel (mean differences of
 *   10–20/255 on textured images), so it is offered only as an option.
 *
 * @packageDocumentation
 */
import * as fs from 'fs';
import * as path from 'path';
import { Worker } from 'worker_threads';
import type sharpModule from 'sharp';
import { DataError, InvalidArgumentError } from '../errors';

let sharpCache: typeof sharpModule | undefined;

/**
 * sharp, loaded on first use: the rest of the library keeps working where its native binary is
 * missing (e.g. installed without optional dependencies), and the error says how to fix it.
 */
export function loadSharp(): typeof sharpModule {
  if (!sharpCache) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      sharpCache = require('sharp') as typeof sharpModule;
    } catch (e) {
      const first = String((e as Error).message).split('\n')[0];
      throw new DataError(
        `Reading images needs the "sharp" package, which could not be loaded (${first}). ` +
          'Reinstall it with its optional platform packages: npm install --include=optional sharp',
        'sharp',
        { cause: e },
      );
    }
  }
  return sharpCache;
}

/** An 8-bit RGB image, rows top to bottom, pixels interleaved: `data[(y·width + x)·3 + c]`. */
export interface RgbImage {
  readonly width: number;
  readonly height: number;
  readonly data: Uint8Array;
}

/** Float pixel data in channel-first layout `[3, height, width]`, values in [−1, 1]. */
export interface FloatImage {
  readonly data: Float32Array;
  readonly shape: [3, number, number];
}

/** Where transparent pixels go: composited onto white or onto black. */
export type AlphaBackground = 'white' | 'black';

/** The resampling filters of the original pipelines: PIL `BICUBIC` (A-CV) and `BILINEAR` (A-DF). */
export type ResampleFilter = 'bicubic' | 'bilinear';

/** `'pil'`: the exact Pillow algorithm in TypeScript (default); `'sharp'`: libvips, faster, not identical. */
export type ResizeEngine = 'pil' | 'sharp';

/** The smallest accepted shorter side, in pixels, unless the caller sets another. */
export const DEFAULT_MIN_IMAGE_SIZE = 64;

/** File extensions accepted as training images (compared case-insensitively). */
export const IMAGE_EXTENSIONS: readonly string[] = ['.jpg', '.jpeg', '.png', '.webp'];

/** True when the file name ends in one of {@link IMAGE_EXTENSIONS}, in any letter case. */
export function isImageFile(name: string): boolean {
  const lower = name.toLowerCase();
  return IMAGE_EXTENSIONS.some((ext) => lower.endsWith(ext));
}

export interface LoadImageOptions {
  /** Refuse images whose shorter side is below this many pixels (default 64). */
  minSize?: number;
  /** Background for transparent pixels (default `'white'`). */
  alpha?: AlphaBackground;
}

/** What {@link probeImage} learns from the header alone. */
export interface ImageInfo {
  /** Width and height after the EXIF orientation is applied. */
  width: number;
  height: number;
  format: string;
  /** The EXIF orientation tag (1 when absent). */
  orientation: number;
}

function checkMinSize(name: string, width: number, height: number, minSize: number): void {
  if (Math.min(width, height) < minSize) {
    throw new DataError(
      `The image ${name} is ${width}×${height} pixels; training images must be at least ${minSize} pixels ` +
        `on their shorter side (option minSize / minImageSize). Remove it or use a larger version.`,
      name,
    );
  }
}

function minSizeOf(options: LoadImageOptions): number {
  const minSize = options.minSize ?? DEFAULT_MIN_IMAGE_SIZE;
  if (!Number.isInteger(minSize) || minSize < 1) {
    throw new InvalidArgumentError(`minSize must be a positive integer, got ${minSize}`);
  }
  return minSize;
}

async function readInput(file: string): Promise<Buffer> {
  try {
    return await fs.promises.readFile(file);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    const why = err.code === 'ENOENT' ? 'it does not exist' : err.code === 'EISDIR' ? 'it is a folder' : err.message;
    throw new DataError(`Cannot read the image ${file}: ${why}`, file, { cause: e });
  }
}

/** Reads only the header: size after orientation, format. Throws a DataError if it is not an image or too small. */
export async function probeImage(file: string, options: LoadImageOptions = {}): Promise<ImageInfo> {
  const minSize = minSizeOf(options);
  const input = await readInput(file);
  return probeBuffer(input, file, minSize);
}

async function probeBuffer(input: Buffer, name: string, minSize: number): Promise<ImageInfo> {
  let meta: sharpModule.Metadata;
  try {
    meta = await loadSharp()(input).metadata();
  } catch (e) {
    throw new DataError(`Cannot decode the image ${name}: ${(e as Error).message}`, name, { cause: e });
  }
  if (!meta.width || !meta.height) throw new DataError(`The image ${name} has no size in its header`, name);
  const orientation = meta.orientation ?? 1;
  const swap = orientation >= 5 && orientation <= 8;
  const width = swap ? meta.height : meta.width;
  const height = swap ? meta.width : meta.height;
  checkMinSize(name, width, height, minSize);
  return { width, height, format: meta.format ?? 'unknown', orientation };
}

/**
 * Decodes an encoded image (file contents or a download) to 8-bit sRGB RGB, orientation applied,
 * alpha composited. `name` is used in error messages and as the DataError's `file`.
 */
export async function decodeImage(input: Buffer | Uint8Array, name: string, options: LoadImageOptions = {}): Promise<RgbImage> {
  const minSize = minSizeOf(options);
  if (options.alpha !== undefined && options.alpha !== 'white' && options.alpha !== 'black') {
    throw new InvalidArgumentError(`alpha must be 'white' or 'black', got ${String(options.alpha)}`);
  }
  const background = (options.alpha ?? 'white') === 'white' ? { r: 255, g: 255, b: 255 } : { r: 0, g: 0, b: 0 };
  let out: { data: Buffer; info: sharpModule.OutputInfo };
  try {
    out = await loadSharp()(input)
      .rotate()
      .flatten({ background })
      .toColourspace('srgb')
      .removeAlpha()
      .raw({ depth: 'uchar' })
      .toBuffer({ resolveWithObject: true });
  } catch (e) {
    throw new DataError(`Cannot decode the image ${name}: ${(e as Error).message}`, name, { cause: e });
  }
  const { width, height, channels } = out.info;
  checkMinSize(name, width, height, minSize);
  const data = new Uint8Array(out.data.buffer, out.data.byteOffset, out.data.byteLength);
  if (channels === 3) return { width, height, data };
  // libvips keeps one band for some grayscale inputs; replicate it (what PIL's L→RGB does).
  if (channels === 1 || channels === 2) {
    const rgb = new Uint8Array(width * height * 3);
    for (let i = 0; i < width * height; i++) {
      const v = data[i * channels];
      rgb[i * 3] = v;
      rgb[i * 3 + 1] = v;
      rgb[i * 3 + 2] = v;
    }
    return { width, height, data: rgb };
  }
  throw new DataError(`The image ${name} decoded to ${channels} channels; expected RGB`, name);
}

/** Loads an image file as 8-bit sRGB RGB (see {@link decodeImage}). */
export async function loadImage(file: string, options: LoadImageOptions = {}): Promise<RgbImage> {
  const minSize = minSizeOf(options);
  const input = await readInput(file);
  // The header check first gives the clearer message for tiny images without decoding them.
  await probeBuffer(input, file, minSize);
  return decodeImage(input, file, options);
}

/** Loads an image file as float CHW data in [−1, 1] (x / 127.5 − 1), at its own size. */
export async function loadImageFloat(file: string, options: LoadImageOptions = {}): Promise<FloatImage> {
  const img = await loadImage(file, options);
  return { data: toFloatCHW(img), shape: [3, img.height, img.width] };
}

/**
 * How bytes map to [−1, 1]. `'numpy'`: float32(x / 127.5 − 1.0) computed in float64, as the
 * original instance pipeline does; `'torchvision'`: ToTensor then Normalize(0.5, 0.5) in float32,
 * as the A-DF/HF-EX class pipeline does. They differ in the last bit for some values.
 */
export type Normalization = 'numpy' | 'torchvision';

const LUT_NUMPY = new Float32Array(256).map((_, x) => x / 127.5 - 1.0);
const LUT_TORCHVISION = new Float32Array(256).map((_, x) => {
  const t = Math.fround(x / 255);
  return Math.fround(Math.fround(t - 0.5) / 0.5);
});

/** The float value of each byte under a normalisation (a 256-entry table). */
export function normalizationTable(kind: Normalization = 'numpy'): Float32Array {
  return kind === 'numpy' ? LUT_NUMPY : LUT_TORCHVISION;
}

/**
 * Converts RGB bytes to float CHW in [−1, 1]. With `out` and `offset`, writes into an existing
 * buffer (e.g. one slot of a batch) instead of allocating.
 */
export function toFloatCHW(img: RgbImage, kind: Normalization = 'numpy', out?: Float32Array, offset = 0): Float32Array {
  const { width, height, data } = img;
  const plane = width * height;
  const dst = out ?? new Float32Array(3 * plane);
  if (dst.length < offset + 3 * plane) throw new InvalidArgumentError('toFloatCHW: output buffer too small');
  const lut = normalizationTable(kind);
  for (let i = 0, p = 0; i < plane; i++, p += 3) {
    dst[offset + i] = lut[data[p]];
    dst[offset + plane + i] = lut[data[p + 1]];
    dst[offset + 2 * plane + i] = lut[data[p + 2]];
  }
  return dst;
}

/** The rectangle [top, top+height) × [left, left+width) of an image (copied). */
export function cropRgb(img: RgbImage, top: number, left: number, height: number, width: number): RgbImage {
  if (top < 0 || left < 0 || height < 0 || width < 0 || top + height > img.height || left + width > img.width) {
    throw new InvalidArgumentError(
      `Crop ${width}×${height} at (${left}, ${top}) does not fit in a ${img.width}×${img.height} image`,
    );
  }
  const data = new Uint8Array(width * height * 3);
  const rowBytes = width * 3;
  for (let y = 0; y < height; y++) {
    const src = ((top + y) * img.width + left) * 3;
    data.set(img.data.subarray(src, src + rowBytes), y * rowBytes);
  }
  return { width, height, data };
}

/**
 * The central square of side min(h, w), with the original A-CV offsets ((h − crop)//2,
 * (w − crop)//2): the extra pixel of an odd margin is cut from the bottom/right.
 */
export function centerCropSquare(img: RgbImage): RgbImage {
  const crop = Math.min(img.width, img.height);
  if (crop === img.width && crop === img.height) return img;
  return cropRgb(img, Math.floor((img.height - crop) / 2), Math.floor((img.width - crop) / 2), crop, crop);
}

/** The mirror image about the vertical axis (PIL `FLIP_LEFT_RIGHT`), as a new image. */
export function flipHorizontal(img: RgbImage): RgbImage {
  const { width, height, data } = img;
  const out = new Uint8Array(data.length);
  for (let y = 0; y < height; y++) {
    const row = y * width * 3;
    for (let x = 0; x < width; x++) {
      const s = row + x * 3;
      const d = row + (width - 1 - x) * 3;
      out[d] = data[s];
      out[d + 1] = data[s + 1];
      out[d + 2] = data[s + 2];
    }
  }
  return { width, height, data: out };
}

// ---------------------------------------------------------------------------------------------
// Pillow's resampler (libImaging/Resample.c, 8 bits per channel), ported for byte-exact output.

const PRECISION_BITS = 32 - 8 - 2;
const HALF = 1 << (PRECISION_BITS - 1);

function bilinearFilter(x: number): number {
  if (x < 0) x = -x;
  return x < 1 ? 1 - x : 0;
}

function bicubicFilter(x: number): number {
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

const FILTERS: Record<ResampleFilter, { fn: (x: number) => number; support: number }> = {
  bilinear: { fn: bilinearFilter, support: 1 },
  bicubic: { fn: bicubicFilter, support: 2 },
};

interface Coeffs {
  ksize: number;
  /** Pairs (first source index, number of taps) per output index. */
  bounds: Int32Array;
  /** Fixed-point taps, ksize per output index. */
  kk: Int32Array;
}

function precomputeCoeffs(inSize: number, outSize: number, filter: ResampleFilter): Coeffs {
  const { fn, support: baseSupport } = FILTERS[filter];
  const scale = inSize / outSize;
  const filterscale = scale < 1 ? 1 : scale;
  const support = baseSupport * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  const ss = 1 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = fn((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) {
      const v = ww !== 0 ? k[x] / ww : k[x];
      kk[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * (1 << PRECISION_BITS)) : Math.trunc(0.5 + v * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

function clip8(ss: number): number {
  const v = ss >> PRECISION_BITS; // arithmetic shift of a 32-bit sum, as in C
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

function resampleHorizontal(src: Uint8Array, srcWidth: number, rowOffset: number, rows: number, outWidth: number, c: Coeffs): Uint8Array {
  const out = new Uint8Array(outWidth * rows * 3);
  const { ksize, bounds, kk } = c;
  for (let yy = 0; yy < rows; yy++) {
    const rowBase = (yy + rowOffset) * srcWidth * 3;
    const outBase = yy * outWidth * 3;
    for (let xx = 0; xx < outWidth; xx++) {
      const xmin = bounds[xx * 2];
      const xmax = bounds[xx * 2 + 1];
      const kbase = xx * ksize;
      // 32-bit integer sums, exactly as Pillow's C (two bits of headroom: they cannot overflow).
      let s0 = HALF;
      let s1 = HALF;
      let s2 = HALF;
      let p = rowBase + xmin * 3;
      for (let x = 0; x < xmax; x++, p += 3) {
        const w = kk[kbase + x];
        s0 = (s0 + Math.imul(src[p], w)) | 0;
        s1 = (s1 + Math.imul(src[p + 1], w)) | 0;
        s2 = (s2 + Math.imul(src[p + 2], w)) | 0;
      }
      const o = outBase + xx * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return out;
}

function resampleVertical(src: Uint8Array, width: number, outHeight: number, c: Coeffs, boundShift: number): Uint8Array {
  const out = new Uint8Array(width * outHeight * 3);
  const { ksize, bounds, kk } = c;
  const stride = width * 3;
  // Row-wise accumulation (cache-friendly); integer sums, so the order of the additions does not
  // change them and the result equals Pillow's per-pixel loop.
  const acc = new Int32Array(stride);
  for (let yy = 0; yy < outHeight; yy++) {
    const ymin = bounds[yy * 2] - boundShift;
    const ymax = bounds[yy * 2 + 1];
    const kbase = yy * ksize;
    acc.fill(HALF);
    for (let y = 0; y < ymax; y++) {
      const w = kk[kbase + y];
      const row = (ymin + y) * stride;
      for (let i = 0; i < stride; i++) acc[i] = (acc[i] + Math.imul(src[row + i], w)) | 0;
    }
    const outBase = yy * stride;
    for (let i = 0; i < stride; i++) out[outBase + i] = clip8(acc[i]);
  }
  return out;
}

/** Pillow's `Image.resize((width, height), BICUBIC|BILINEAR)` on an RGB image, byte for byte. */
function resizePil(img: RgbImage, width: number, height: number, filter: ResampleFilter): RgbImage {
  const needH = width !== img.width;
  const needV = height !== img.height;
  if (!needH && !needV) return { width, height, data: img.data.slice() };
  const vert = precomputeCoeffs(img.height, height, filter);
  let data = img.data;
  let shift = 0;
  if (needH) {
    // Like Pillow, the horizontal pass covers only the source rows the vertical pass reads.
    const first = vert.bounds[0];
    const last = vert.bounds[height * 2 - 2] + vert.bounds[height * 2 - 1];
    data = resampleHorizontal(img.data, img.width, first, last - first, width, precomputeCoeffs(img.width, width, filter));
    shift = first;
    if (!needV) return { width, height, data };
  }
  return { width, height, data: resampleVertical(data, width, height, vert, shift) };
}

/**
 * Resizes to exactly width×height (no aspect preservation: a non-square image is squashed, as PIL's
 * `resize` does). `engine: 'pil'` (default) gives Pillow's bytes; `'sharp'` uses libvips' kernels
 * (`cubic`/`linear`), faster but not identical.
 */
export async function resizeRgb(
  img: RgbImage,
  width: number,
  height: number,
  filter: ResampleFilter,
  engine: ResizeEngine = 'pil',
): Promise<RgbImage> {
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new InvalidArgumentError(`Invalid resize target ${width}×${height}`);
  }
  if (filter !== 'bicubic' && filter !== 'bilinear') throw new InvalidArgumentError(`Unknown resampling filter ${String(filter)}`);
  if (engine === 'pil') {
    // Small images cost less than a message round trip; large ones go to the worker thread.
    if (img.width * img.height < OFF_THREAD_PIXELS) return resizePil(img, width, height, filter);
    return resizeOffThread(img, width, height, filter);
  }
  if (engine !== 'sharp') throw new InvalidArgumentError(`Unknown resize engine ${String(engine)}`);
  if (width === img.width && height === img.height) return { width, height, data: img.data.slice() };
  const data = await loadSharp()(img.data, { raw: { width: img.width, height: img.height, channels: 3 } })
    .resize(width, height, { fit: 'fill', kernel: filter === 'bicubic' ? 'cubic' : 'linear' })
    .raw()
    .toBuffer();
  return { width, height, data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

/** Images with at least this many pixels are resized on the worker thread. */
const OFF_THREAD_PIXELS = 256 * 256;

interface ResizeReply {
  id: number;
  data?: Uint8Array;
  error?: string;
}

let resizeWorker: { worker: Worker; pending: Map<number, (r: ResizeReply) => void>; next: number } | null | undefined;

/**
 * The resize worker, started on first use and unref'd while idle (it never keeps the process alive).
 * Under ts-jest this file is TypeScript; the worker then runs the compiled lib/ copy.
 */
function getResizeWorker(): typeof resizeWorker {
  if (resizeWorker !== undefined) return resizeWorker;
  const compiled = __filename.endsWith('.ts') ? path.resolve(__dirname, '..', '..', 'lib', 'train', 'resize-worker.js') : path.join(__dirname, 'resize-worker.js');
  if (!fs.existsSync(compiled)) return (resizeWorker = null);
  const worker = new Worker(compiled);
  const state = { worker, pending: new Map<number, (r: ResizeReply) => void>(), next: 0 };
  worker.on('message', (r: ResizeReply) => {
    const done = state.pending.get(r.id);
    state.pending.delete(r.id);
    if (state.pending.size === 0) worker.unref();
    done?.(r);
  });
  worker.on('error', (e) => {
    for (const done of state.pending.values()) done({ id: -1, error: `the resize worker failed: ${e.message}` });
    state.pending.clear();
    resizeWorker = undefined;
  });
  worker.unref();
  return (resizeWorker = state);
}

async function resizeOffThread(img: RgbImage, width: number, height: number, filter: ResampleFilter): Promise<RgbImage> {
  const w = getResizeWorker();
  if (!w) return resizePil(img, width, height, filter);
  const id = w.next++;
  const reply = await new Promise<ResizeReply>((resolve) => {
    w.pending.set(id, resolve);
    w.worker.ref();
    // A copy goes over: the caller keeps its image.
    w.worker.postMessage({ id, width: img.width, height: img.height, data: img.data, targetWidth: width, targetHeight: height, filter });
  });
  if (reply.error !== undefined) throw new InvalidArgumentError(`Resize failed: ${reply.error}`);
  return { width, height, data: new Uint8Array(reply.data!.buffer, reply.data!.byteOffset, reply.data!.byteLength) };
}

/** {@link resizeRgb} with the PIL engine, synchronously. */
export function resizeRgbSync(img: RgbImage, width: number, height: number, filter: ResampleFilter): RgbImage {
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new InvalidArgumentError(`Invalid resize target ${width}×${height}`);
  }
  return resizePil(img, width, height, filter);
}
