import * as fs from 'fs';
import * as path from 'path';
import sharp from 'sharp';

/** Raw pixels from a function of (x, y), with 3 or 4 channels. */
export function rawImage(width: number, height: number, channels: 3 | 4, fn: (x: number, y: number) => number[]): Buffer {
  const buf = Buffer.alloc(width * height * channels);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const v = fn(x, y);
      for (let c = 0; c < channels; c++) buf[(y * width + x) * channels + c] = v[c];
    }
  }
  return buf;
}

/** A deterministic, textured test pattern (gradients plus a hash), so resizes and crops show. */
export function pattern(seed = 1): (x: number, y: number) => number[] {
  return (x, y) => {
    const h = Math.imul(x * 73856093 ^ y * 19349663 ^ seed * 83492791, 2654435761) >>> 24;
    return [(x * 7 + seed) & 255, (y * 5 + 3 * seed) & 255, h];
  };
}

/** Writes an image file (format from the extension) and returns its path. */
export async function writeImage(
  file: string,
  width: number,
  height: number,
  fn: (x: number, y: number) => number[] = pattern(),
  channels: 3 | 4 = 3,
): Promise<string> {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const img = sharp(rawImage(width, height, channels, fn), { raw: { width, height, channels } });
  const ext = path.extname(file).toLowerCase();
  if (ext === '.png') await img.png().toFile(file);
  else if (ext === '.webp') await img.webp({ lossless: true }).toFile(file);
  else await img.jpeg({ quality: 95 }).toFile(file);
  return file;
}

/** Maximum absolute difference between two numeric arrays of the same length. */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d;
}
