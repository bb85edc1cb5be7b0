import * as fs from 'fs';
import * as path from 'path';
import sharp from 'sharp';
import { DataError } from '../../src/errors';
import {
  centerCropSquare,
  cropRgb,
  decodeImage,
  flipHorizontal,
  isImageFile,
  loadImage,
  loadImageFloat,
  normalizationTable,
  probeImage,
  resizeRgb,
  resizeRgbSync,
  toFloatCHW,
  type RgbImage,
} from '../../src/train';
import { repoRoot, tempDir } from '../helpers/env';
import { Rng } from '../../src/train/rng';
import { maxAbsDiff, rawImage, writeImage } from './util';

const RED = [220, 20, 30];
const BLUE = [10, 30, 230];

function pixel(img: RgbImage, x: number, y: number): number[] {
  const i = (y * img.width + x) * 3;
  return [img.data[i], img.data[i + 1], img.data[i + 2]];
}

function near(actual: number[], expected: number[], tol: number): boolean {
  return actual.every((v, i) => Math.abs(v - expected[i]) <= tol);
}

async function expectDataError(p: Promise<unknown>, file: string, pattern: RegExp): Promise<DataError> {
  const err = await p.then(
    () => {
      throw new Error('expected a DataError');
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(DataError);
  const de = err as DataError;
  expect(de.code).toBe('DATA');
  expect(de.file).toBe(file);
  expect(de.message).toContain(file);
  expect(de.message).toMatch(pattern);
  return de;
}

describe('train/images', () => {
  let tmp: { dir: string; cleanup: () => void };
  beforeAll(() => (tmp = tempDir('cd-images-')));
  afterAll(() => tmp.cleanup());
  const file = (name: string) => path.join(tmp.dir, name);

  it('applies EXIF orientation 6 (rotate 90° clockwise): left half becomes the top half', async () => {
    // Stored 40 wide × 20 high, left half red, right half blue; orientation 6 displays it rotated clockwise.
    const raw = rawImage(40, 20, 3, (x) => (x < 20 ? RED : BLUE));
    const f = file('exif6.jpg');
    await sharp(raw, { raw: { width: 40, height: 20, channels: 3 } }).jpeg({ quality: 95 }).withMetadata({ orientation: 6 }).toFile(f);
    expect((await sharp(f).metadata()).orientation).toBe(6);

    const info = await probeImage(f, { minSize: 8 });
    expect([info.width, info.height, info.orientation]).toEqual([20, 40, 6]);
    const img = await loadImage(f, { minSize: 8 });
    expect([img.width, img.height]).toEqual([20, 40]);
    expect(near(pixel(img, 10, 5), RED, 12)).toBe(true);
    expect(near(pixel(img, 10, 34), BLUE, 12)).toBe(true);
    // Without the orientation the same file would be 40×20; make sure the test can tell.
    const plain = file('exif1.jpg');
    await sharp(raw, { raw: { width: 40, height: 20, channels: 3 } }).jpeg({ quality: 95 }).toFile(plain);
    const img1 = await loadImage(plain, { minSize: 8 });
    expect([img1.width, img1.height]).toEqual([40, 20]);
  });

  it('turns grayscale into 3-channel RGB with equal channels', async () => {
    const f = file('gray.png');
    await sharp(rawImage(70, 66, 3, (x, y) => [x * 3, x * 3, x * 3].map((v) => (v + y) & 255)), {
      raw: { width: 70, height: 66, channels: 3 },
    })
      .toColourspace('b-w')
      .png()
      .toFile(f);
    expect((await sharp(f).metadata()).channels).toBe(1);
    const img = await loadImage(f);
    expect(img.data.length).toBe(70 * 66 * 3);
    for (const [x, y] of [[0, 0], [33, 20], [69, 65]]) {
      const [r, g, b] = pixel(img, x, y);
      expect(r).toBe(g);
      expect(g).toBe(b);
      expect(r).toBe((x * 3 + y) & 255);
    }
  });

  it('flattens RGBA onto white by default and onto black on request', async () => {
    const f = file('rgba.png');
    // Left: fully transparent (stored colour green, which must not show); right: opaque red.
    await sharp(rawImage(64, 64, 4, (x) => (x < 32 ? [0, 255, 0, 0] : [255, 0, 0, 255])), {
      raw: { width: 64, height: 64, channels: 4 },
    })
      .png()
      .toFile(f);
    const white = await loadImage(f);
    expect(white.data.length).toBe(64 * 64 * 3);
    expect(pixel(white, 5, 5)).toEqual([255, 255, 255]);
    expect(pixel(white, 50, 5)).toEqual([255, 0, 0]);
    const black = await loadImage(f, { alpha: 'black' });
    expect(pixel(black, 5, 5)).toEqual([0, 0, 0]);
    expect(pixel(black, 50, 5)).toEqual([255, 0, 0]);

    const half = file('half.png');
    await sharp(rawImage(64, 64, 4, () => [255, 0, 0, 128]), { raw: { width: 64, height: 64, channels: 4 } }).png().toFile(half);
    expect(near(pixel(await loadImage(half), 3, 3), [255, 127, 127], 2)).toBe(true);
  });

  it('converts CMYK JPEG to sRGB RGB', async () => {
    const f = file('cmyk.jpg');
    await sharp(rawImage(64, 64, 3, (x) => (x < 32 ? RED : BLUE)), { raw: { width: 64, height: 64, channels: 3 } })
      .toColourspace('cmyk')
      .jpeg({ quality: 95 })
      .toFile(f);
    const meta = await sharp(f).metadata();
    expect(meta.space).toBe('cmyk');
    expect(meta.channels).toBe(4);
    const img = await loadImage(f);
    expect(img.data.length).toBe(64 * 64 * 3);
    const [r, g, b] = pixel(img, 8, 8);
    expect(r).toBeGreaterThan(170);
    expect(g).toBeLessThan(90);
    expect(b).toBeLessThan(90);
    // Blue survives the trip through the CMYK profile less saturated, but clearly blue.
    const [r2, g2, b2] = pixel(img, 56, 8);
    expect(b2).toBeGreaterThan(120);
    expect(b2 - Math.max(r2, g2)).toBeGreaterThan(50);
  });

  it('reads 16-bit PNG and WebP as 8-bit RGB', async () => {
    const f16 = file('deep.png');
    await sharp(rawImage(64, 64, 3, () => [200, 100, 50]), { raw: { width: 64, height: 64, channels: 3 } })
      .toColourspace('rgb16')
      .png()
      .toFile(f16);
    expect((await sharp(f16).metadata()).depth).toBe('ushort');
    const img = await loadImage(f16);
    expect(img.data).toBeInstanceOf(Uint8Array);
    expect(near(pixel(img, 10, 10), [200, 100, 50], 1)).toBe(true);

    const webp = await writeImage(file('x.webp'), 65, 64, () => [1, 2, 3]);
    expect(pixel(await loadImage(webp), 64, 63)).toEqual([1, 2, 3]);
  });

  it('reports unreadable files by name with a DataError', async () => {
    const bad = file('not-an-image.jpg');
    fs.writeFileSync(bad, 'this is text, not a JPEG');
    await expectDataError(loadImage(bad), bad, /Cannot decode/);
    await expectDataError(probeImage(bad), bad, /Cannot decode/);

    const missing = file('missing.png');
    await expectDataError(loadImage(missing), missing, /does not exist/);

    const good = await writeImage(file('whole.jpg'), 200, 150);
    const bytes = fs.readFileSync(good);
    const truncated = file('truncated.jpg');
    fs.writeFileSync(truncated, bytes.subarray(0, Math.floor(bytes.length / 2)));
    await expectDataError(loadImage(truncated), truncated, /Cannot decode/);

    await expectDataError(decodeImage(Buffer.from('nope'), 'https://example.com/x.jpg'), 'https://example.com/x.jpg', /Cannot decode/);
  });

  it('refuses images smaller than the minimum, naming the file and both sizes', async () => {
    const small = await writeImage(file('small.png'), 50, 80);
    const err = await expectDataError(loadImage(small), small, /50×80/);
    expect(err.message).toMatch(/at least 64 pixels/);
    await expectDataError(probeImage(small), small, /50×80/);
    // The minimum is the shorter side after orientation, and configurable.
    expect((await loadImage(small, { minSize: 50 })).width).toBe(50);
    await expectDataError(loadImage(small, { minSize: 51 }), small, /at least 51/);
  });

  it('maps bytes to [-1, 1] like numpy (instance) and like torchvision (class)', async () => {
    const numpy = normalizationTable('numpy');
    const tv = normalizationTable('torchvision');
    expect(numpy[0]).toBe(-1);
    expect(numpy[255]).toBe(1);
    expect(tv[0]).toBe(-1);
    expect(tv[255]).toBe(1);
    // Values computed with numpy (float64 then float32) and torch (float32): they differ at x = 64.
    expect(numpy[64]).toBe(-0.49803921580314636);
    expect(tv[64]).toBe(-0.498039186000824);

    const f = file('solid.png');
    await writeImage(f, 64, 65, (x, y) => [x, y, 255 - x]);
    const fl = await loadImageFloat(f);
    expect(fl.shape).toEqual([3, 65, 64]);
    const plane = 64 * 65;
    expect(fl.data[10 * 64 + 7]).toBe(Math.fround(7 / 127.5 - 1));
    expect(fl.data[plane + 10 * 64 + 7]).toBe(Math.fround(10 / 127.5 - 1));
    expect(fl.data[2 * plane + 10 * 64 + 7]).toBe(Math.fround(248 / 127.5 - 1));
  });

  it('recognises image extensions case-insensitively', () => {
    expect(['a.JPG', 'b.jpeg', 'c.PnG', 'd.webp', 'e.WEBP'].every(isImageFile)).toBe(true);
    expect(['a.gif', 'b.txt', 'jpg', 'c.jpg.txt'].some(isImageFile)).toBe(false);
  });

  it('center-crops with the original offsets and flips', () => {
    const img: RgbImage = { width: 5, height: 2, data: new Uint8Array(rawImage(5, 2, 3, (x, y) => [x, y, 0])) };
    const c = centerCropSquare(img);
    expect([c.width, c.height]).toEqual([2, 2]);
    expect(pixel(c, 0, 0)).toEqual([1, 0, 0]); // (5 − 2) // 2 = 1: the odd pixel is cut on the right
    const tall: RgbImage = { width: 2, height: 5, data: new Uint8Array(rawImage(2, 5, 3, (x, y) => [x, y, 0])) };
    expect(pixel(centerCropSquare(tall), 0, 0)).toEqual([0, 1, 0]);
    const f = flipHorizontal(img);
    expect(pixel(f, 0, 1)).toEqual([4, 1, 0]);
    expect(pixel(f, 4, 0)).toEqual([0, 0, 0]);
    expect(() => cropRgb(img, 0, 4, 2, 2)).toThrow(/does not fit/);
  });

  describe('resize', () => {
    const fixture = JSON.parse(fs.readFileSync(path.join(repoRoot, 'test/fixtures/images/pil-resize.json'), 'utf8')) as {
      width: number;
      height: number;
      source: string;
      cases: { filter: 'bicubic' | 'bilinear'; width: number; height: number; data: string }[];
    };
    const source: RgbImage = { width: fixture.width, height: fixture.height, data: new Uint8Array(Buffer.from(fixture.source, 'base64')) };

    it.each(fixture.cases.map((c) => [`${c.filter} ${c.width}×${c.height}`, c] as const))(
      'gives the same bytes as Pillow: %s',
      async (_name, c) => {
        const expected = new Uint8Array(Buffer.from(c.data, 'base64'));
        const out = await resizeRgb(source, c.width, c.height, c.filter);
        expect([out.width, out.height]).toEqual([c.width, c.height]);
        expect(maxAbsDiff(out.data, expected)).toBe(0);
      },
    );

    it('resizes large images on a worker thread: same bytes, and the event loop keeps turning', async () => {
      const w = 700;
      const h = 500;
      const data = new Uint8Array(w * h * 3);
      for (let i = 0; i < data.length; i++) data[i] = (i * 2654435761) >>> 24;
      const img: RgbImage = { width: w, height: h, data };
      let ticks = 0;
      const timer = setInterval(() => ticks++, 1);
      const started = Date.now();
      const out = await resizeRgb(img, 300, 200, 'bicubic');
      const ms = Date.now() - started;
      clearInterval(timer);
      expect(Buffer.compare(Buffer.from(out.data), Buffer.from(resizeRgbSync(img, 300, 200, 'bicubic').data))).toBe(0);
      // On the JS thread not one timer could fire while the resize ran.
      expect(ticks).toBeGreaterThan(Math.min(3, ms / 20));
      expect(img.data.length).toBe(w * h * 3); // the caller's image is untouched
    });

    it('is mirror-symmetric (flip then resize = resize then flip), which the class cache relies on', () => {
      const rng = Rng.fromSeed(5);
      for (let t = 0; t < 20; t++) {
        const w = rng.int(3, 120);
        const h = rng.int(3, 40);
        const img: RgbImage = { width: w, height: h, data: new Uint8Array(w * h * 3).map(() => rng.int(0, 255)) };
        const ow = rng.int(2, 200);
        const oh = rng.int(2, 60);
        for (const f of ['bicubic', 'bilinear'] as const) {
          const a = flipHorizontal(resizeRgbSync(img, ow, oh, f)).data;
          const b = resizeRgbSync(flipHorizontal(img), ow, oh, f).data;
          expect(maxAbsDiff(a, b)).toBe(0);
        }
      }
    });

    it('offers libvips resizing as an approximate engine', async () => {
      const big: RgbImage = { width: 300, height: 260, data: new Uint8Array(rawImage(300, 260, 3, (x, y) => [x & 255, y & 255, (x + y) & 255])) };
      const a = await resizeRgb(big, 100, 100, 'bicubic', 'pil');
      const b = await resizeRgb(big, 100, 100, 'bicubic', 'sharp');
      let sum = 0;
      for (let i = 0; i < a.data.length; i++) sum += Math.abs(a.data[i] - b.data[i]);
      expect(sum / a.data.length).toBeLessThan(2);
    });

    it('converts to float CHW into a batch slot', () => {
      const img: RgbImage = { width: 2, height: 1, data: new Uint8Array([0, 255, 51, 102, 153, 204]) };
      const out = new Float32Array(10).fill(9);
      toFloatCHW(img, 'numpy', out, 2);
      expect(Array.from(out.subarray(0, 2))).toEqual([9, 9]);
      expect(Array.from(out.subarray(2, 8))).toEqual([0, 102, 255, 153, 51, 204].map((x) => Math.fround(x / 127.5 - 1)));
      expect(Array.from(out.subarray(8))).toEqual([9, 9]);
    });
  });
});
