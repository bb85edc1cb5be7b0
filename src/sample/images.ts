/**
 * Generated images as files: PNG (with the generation parameters in text chunks), JPEG or WebP
 * through sharp, grids, and atomic saving that never overwrites unless asked.
 */
import { promises as fs } from 'fs';
import * as path from 'path';
import * as zlib from 'zlib';
import { FileError, InvalidArgumentError } from '../errors';
import { writeFileAtomic } from '../core/atomic-file';
import { loadSharp, type RgbImage } from '../train/images';

export type ImageFormat = 'png' | 'jpeg' | 'webp';

/** Options of {@link encodeImage}. */
export interface EncodeImageOptions {
  /** JPEG/WebP quality 1-100 (default 92). */
  quality?: number;
  /**
   * Text chunks for PNG files: keyword → text. Latin-1 text goes into `tEXt`, anything else into
   * UTF-8 `iTXt`. Generated images carry `parameters` (a readable summary, as other Stable
   * Diffusion tools write it) and `custom-diffusion` (the same as JSON).
   */
  text?: Record<string, string>;
}

/** The image format a file name asks for (by extension), or an error naming the extensions known. */
export function formatOfFile(file: string): ImageFormat {
  const ext = path.extname(file).toLowerCase();
  if (ext === '.png') return 'png';
  if (ext === '.jpg' || ext === '.jpeg') return 'jpeg';
  if (ext === '.webp') return 'webp';
  throw new InvalidArgumentError(`Cannot tell the image format of ${file}: use .png, .jpg or .webp`);
}

function checkImage(image: RgbImage): void {
  const { width, height, data } = image;
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new InvalidArgumentError(`An image needs a positive integer width and height (got ${width}×${height})`);
  }
  if (!data || data.length !== width * height * 3) {
    throw new InvalidArgumentError(`An RGB image of ${width}×${height} holds ${width * height * 3} bytes, not ${data?.length}`);
  }
}

/** Encodes an RGB image as PNG, JPEG or WebP. */
export async function encodeImage(image: RgbImage, format: ImageFormat = 'png', options: EncodeImageOptions = {}): Promise<Buffer> {
  checkImage(image);
  const sharp = loadSharp();
  const input = sharp(Buffer.from(image.data.buffer, image.data.byteOffset, image.data.byteLength), {
    raw: { width: image.width, height: image.height, channels: 3 },
  });
  const quality = options.quality ?? 92;
  if (!Number.isInteger(quality) || quality < 1 || quality > 100) throw new InvalidArgumentError('quality must be an integer from 1 to 100');
  switch (format) {
    case 'png':
      return withPngText(await input.png().toBuffer(), options.text ?? {});
    case 'jpeg':
      return input.jpeg({ quality }).toBuffer();
    case 'webp':
      return input.webp({ quality }).toBuffer();
    default:
      throw new InvalidArgumentError(`Unknown image format ${JSON.stringify(format)} (png, jpeg or webp)`);
  }
}

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

function pngChunk(type: string, body: Buffer): Buffer {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(body.length, 0);
  head.write(type, 4, 'latin1');
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(zlib.crc32(Buffer.concat([head.subarray(4), body])) >>> 0, 0);
  return Buffer.concat([head, body, crc]);
}

function textChunk(keyword: string, text: string): Buffer {
  if (!/^[\x20-\x7e]{1,79}$/.test(keyword)) throw new InvalidArgumentError(`PNG text keyword ${JSON.stringify(keyword)} must be 1-79 printable ASCII characters`);
  // eslint-disable-next-line no-control-regex
  const latin1 = /^[\x00-\xff]*$/.test(text) && !text.includes('\0');
  if (latin1) return pngChunk('tEXt', Buffer.concat([Buffer.from(keyword, 'latin1'), Buffer.from([0]), Buffer.from(text, 'latin1')]));
  // iTXt: keyword, 0, compression flag 0, method 0, empty language tag, 0, empty translated keyword, 0, UTF-8 text.
  return pngChunk('iTXt', Buffer.concat([Buffer.from(keyword, 'latin1'), Buffer.from([0, 0, 0, 0, 0]), Buffer.from(text, 'utf8')]));
}

/** Inserts text chunks right after IHDR, where readers look first. */
function withPngText(png: Buffer, text: Record<string, string>): Buffer {
  const entries = Object.entries(text);
  if (entries.length === 0) return png;
  if (!png.subarray(0, 8).equals(PNG_SIGNATURE)) throw new FileError('sharp did not produce a PNG', '<memory>');
  const ihdrEnd = 8 + 12 + png.readUInt32BE(8);
  return Buffer.concat([png.subarray(0, ihdrEnd), ...entries.map(([k, v]) => textChunk(k, v)), png.subarray(ihdrEnd)]);
}

/** The text chunks (tEXt, and uncompressed iTXt) of a PNG file's bytes. */
export function readPngText(png: Buffer): Record<string, string> {
  if (!png.subarray(0, 8).equals(PNG_SIGNATURE)) throw new InvalidArgumentError('Not a PNG file');
  const out: Record<string, string> = {};
  let pos = 8;
  while (pos + 12 <= png.length) {
    const len = png.readUInt32BE(pos);
    const type = png.toString('latin1', pos + 4, pos + 8);
    const body = png.subarray(pos + 8, pos + 8 + len);
    if (type === 'tEXt') {
      const z = body.indexOf(0);
      out[body.toString('latin1', 0, z)] = body.toString('latin1', z + 1);
    } else if (type === 'iTXt') {
      const z = body.indexOf(0);
      if (body[z + 1] === 0) {
        const lang = body.indexOf(0, z + 3);
        const trans = body.indexOf(0, lang + 1);
        out[body.toString('latin1', 0, z)] = body.toString('utf8', trans + 1);
      }
    } else if (type === 'IEND') {
      break;
    }
    pos += 12 + len;
  }
  return out;
}

/** Options of {@link saveImage}. */
export interface SaveImageOptions extends EncodeImageOptions {
  /** Replace an existing file (default false: an existing file is an error, so nothing is lost). */
  overwrite?: boolean;
}

/** Writes an image file atomically; the format follows the extension. Returns the absolute path. */
export async function saveImage(image: RgbImage, file: string, options: SaveImageOptions = {}): Promise<string> {
  const target = path.resolve(file);
  const format = formatOfFile(target);
  if (!options.overwrite) {
    const exists = await fs.stat(target).then(
      () => true,
      () => false,
    );
    if (exists) throw new FileError(`${target} exists; choose another name or pass overwrite`, target);
  }
  await writeFileAtomic(target, await encodeImage(image, format, options));
  return target;
}

/** Options of {@link makeGrid}. */
export interface GridOptions {
  /** Images per row (default: ⌈√n⌉). */
  columns?: number;
  /** Pixels between cells (default 2), filled with `background`. */
  gap?: number;
  /** RGB of the gaps and empty cells (default white). */
  background?: [number, number, number];
}

/** Lays images of one size out in a grid (row-major). */
export function makeGrid(images: readonly RgbImage[], options: GridOptions = {}): RgbImage {
  if (images.length === 0) throw new InvalidArgumentError('makeGrid needs at least one image');
  const { width, height } = images[0];
  for (const im of images) {
    checkImage(im);
    if (im.width !== width || im.height !== height) throw new InvalidArgumentError('makeGrid needs images of one size');
  }
  const columns = options.columns ?? Math.ceil(Math.sqrt(images.length));
  if (!Number.isInteger(columns) || columns < 1) throw new InvalidArgumentError('columns must be a positive integer');
  const gap = options.gap ?? 2;
  if (!Number.isInteger(gap) || gap < 0) throw new InvalidArgumentError('gap must be a non-negative integer');
  const rows = Math.ceil(images.length / columns);
  const W = columns * width + (columns - 1) * gap;
  const H = rows * height + (rows - 1) * gap;
  const data = new Uint8Array(W * H * 3);
  const bg = options.background ?? [255, 255, 255];
  for (let i = 0; i < W * H; i++) data.set(bg, i * 3);
  images.forEach((im, k) => {
    const x0 = (k % columns) * (width + gap);
    const y0 = Math.floor(k / columns) * (height + gap);
    for (let y = 0; y < height; y++) {
      data.set(im.data.subarray(y * width * 3, (y + 1) * width * 3), ((y0 + y) * W + x0) * 3);
    }
  });
  return { width: W, height: H, data };
}
