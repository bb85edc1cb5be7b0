import * as fs from 'fs';
import * as path from 'path';
import { AbortError, StableDiffusion, generateClassImages } from '../../src';
import { listClassItems } from '../../src/train/dataset';
import { parityDir } from '../helpers/numeric';
import { tempDir } from '../helpers/env';

const MODEL = path.join(parityDir('sd1'), 'model');
const SETTINGS = { classPrompt: 'photo of a cat', steps: 2, guidanceScale: 6, scheduler: 'ddim' as const, batchSize: 2 };

describe('generateClassImages', () => {
  let sd: StableDiffusion;
  beforeAll(async () => {
    sd = await StableDiffusion.load(MODEL);
  });
  afterAll(() => sd?.dispose());

  it('writes the layout training reads, and resumes to exactly what an uninterrupted run makes', async () => {
    const full = tempDir();
    const resumed = tempDir();
    try {
      const r = await generateClassImages({ model: sd, outDir: full.dir, count: 5, ...SETTINGS });
      expect(r).toMatchObject({ count: 5, existing: 0, generated: 5 });
      const lines = fs.readFileSync(path.join(full.dir, 'images.txt'), 'utf8').trim().split('\n');
      expect(lines).toHaveLength(5);
      expect(fs.readFileSync(path.join(full.dir, 'caption.txt'), 'utf8')).toBe('photo of a cat\n'.repeat(5));
      const items = listClassItems({ instanceDataDir: full.dir, instancePrompt: 'x', classPrompt: 'cat', classDataDir: full.dir });
      expect(items).toHaveLength(5);

      // A run stopped by an abort after its first batch…
      const controller = new AbortController();
      const stopped = generateClassImages({
        model: sd,
        outDir: resumed.dir,
        count: 5,
        ...SETTINGS,
        signal: controller.signal,
        onProgress: (p) => {
          if (p.generated === 2) controller.abort();
        },
      });
      await expect(stopped).rejects.toBeInstanceOf(AbortError);
      expect(fs.readFileSync(path.join(resumed.dir, 'images.txt'), 'utf8').trim().split('\n')).toHaveLength(2);
      // …then resumed: it keeps the first two and makes the other three.
      const again = await generateClassImages({ model: sd, outDir: resumed.dir, count: 5, ...SETTINGS });
      expect(again).toMatchObject({ count: 5, existing: 2, generated: 3 });
      for (let i = 0; i < 5; i++) {
        const a = fs.readFileSync(path.join(full.dir, 'images', `${i}.png`));
        const b = fs.readFileSync(path.join(resumed.dir, 'images', `${i}.png`));
        expect(Buffer.compare(a, b)).toBe(0);
      }
      // Asking for the same count again does nothing.
      expect(await generateClassImages({ model: sd, outDir: resumed.dir, count: 5, ...SETTINGS })).toMatchObject({ existing: 5, generated: 0 });
    } finally {
      full.cleanup();
      resumed.cleanup();
    }
  });

  it('refuses a bad count or prompt', async () => {
    await expect(generateClassImages({ model: sd, outDir: '/tmp/x', ...SETTINGS, count: 0 })).rejects.toThrow(/count must be a positive integer/);
    await expect(generateClassImages({ model: sd, outDir: '/tmp/x', ...SETTINGS, classPrompt: ' ' })).rejects.toThrow(/classPrompt/);
  });
});
