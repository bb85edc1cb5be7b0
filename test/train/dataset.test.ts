import { createHash } from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { DataError, InvalidArgumentError } from '../../src/errors';
import {
  applyClassAugment,
  FAR_PREFIXES,
  loadImage,
  prepareClassImage,
  listImageFiles,
  listInstanceItems,
  naturalCompare,
  parseConceptsList,
  readConceptsList,
  TrainingDataLoader,
  TrainingDataset,
  ZOOM_PREFIXES,
  type ConceptSpec,
  type DataLoaderState,
  type TrainingBatch,
} from '../../src/train';
import { tempDir } from '../helpers/env';
import { pattern, writeImage } from './util';

const SIZE = 64;

function hash(a: Float32Array): string {
  return createHash('sha256').update(Buffer.from(a.buffer, a.byteOffset, a.byteLength)).digest('hex');
}

/** What identifies a batch's content, for comparisons. */
function summary(b: TrainingBatch) {
  return {
    epoch: b.epoch,
    batch: b.batch,
    prompts: b.prompts,
    files: b.files.map((f) => path.basename(path.dirname(f)) + '/' + path.basename(f)),
    isPrior: b.isPrior,
    pixels: hash(b.pixels),
    masks: hash(b.masks),
  };
}

async function expectDataError(p: Promise<unknown> | (() => unknown), file: string, pattern: RegExp): Promise<DataError> {
  let err: unknown;
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(DataError);
  const de = err as DataError;
  expect(de.code).toBe('DATA');
  expect(de.file).toBe(file);
  expect(de.message).toMatch(pattern);
  return de;
}

describe('train/dataset', () => {
  let tmp: { dir: string; cleanup: () => void };
  let root: string;
  const p = (...parts: string[]) => path.join(root, ...parts);
  let catConcept: ConceptSpec;
  let potConcept: ConceptSpec;

  beforeAll(async () => {
    tmp = tempDir('cd-dataset-');
    root = tmp.dir;
    // Concept 1: three instance images of mixed formats and letter cases, one with its own caption.
    await writeImage(p('cat', 'b.jpg'), 96, 72, pattern(1));
    await writeImage(p('cat', 'A.PNG'), 80, 80, pattern(2));
    await writeImage(p('cat', 'c10.webp'), 70, 90, pattern(3));
    fs.writeFileSync(p('cat', 'b.txt'), '  a <new1> cat on a sofa \n');
    fs.writeFileSync(p('cat', 'notes.md'), 'not an image');
    fs.writeFileSync(p('cat', '._b.jpg'), 'macOS resource fork');
    // Its generated class images (numbered like A-DF's, to check the natural order).
    for (const i of [0, 1, 2, 10, 11]) await writeImage(p('cat-class', `${i}.jpg`), 64 + i, 64, pattern(10 + i));
    // Concept 2: two instance images; real class images in the retrieve layout.
    await writeImage(p('pot', 'p1.jpg'), 64, 64, pattern(20));
    await writeImage(p('pot', 'p2.jpeg'), 100, 64, pattern(21));
    const lines: string[] = [];
    for (let i = 0; i < 3; i++) {
      await writeImage(p('pot-real', 'images', `${i}.jpg`), 90 - i * 10, 70, pattern(30 + i));
      lines.push(`pot-real/images/${i}.jpg`); // relative, as the original writes it
    }
    fs.writeFileSync(p('pot-real', 'images.txt'), lines.join('\n') + '\n');
    fs.writeFileSync(p('pot-real', 'caption.txt'), 'a clay pot\n\nwooden pot on a table\n');
    fs.writeFileSync(p('pot-real', 'urls.txt'), 'http://x/0\nhttp://x/1\nhttp://x/2\n');
    catConcept = { instancePrompt: 'photo of a <new1> cat', instanceDataDir: p('cat'), classPrompt: 'cat', classDataDir: p('cat-class') };
    potConcept = { instancePrompt: 'photo of a <new2> pot', instanceDataDir: p('pot'), classPrompt: 'pot', classDataDir: p('pot-real') };
  });
  afterAll(() => tmp.cleanup());

  describe('listing', () => {
    it('sorts naturally and independently of the locale', () => {
      expect(['10.jpg', '2.jpg', 'b.jpg', 'B.jpg', '1.jpg', 'a01.png', 'a1.png'].sort(naturalCompare)).toEqual([
        '1.jpg', '2.jpg', '10.jpg', 'B.jpg', 'a01.png', 'a1.png', 'b.jpg',
      ]);
    });

    it('lists jpg/jpeg/png/webp in any case, skipping hidden and other files', () => {
      expect(listImageFiles(p('cat')).map((f) => path.basename(f))).toEqual(['A.PNG', 'b.jpg', 'c10.webp']);
      expect(listImageFiles(p('cat-class')).map((f) => path.basename(f))).toEqual(['0.jpg', '1.jpg', '2.jpg', '10.jpg', '11.jpg']);
    });

    it('uses <name>.txt beside an image as its prompt, the concept prompt otherwise', () => {
      const items = listInstanceItems(catConcept);
      expect(items.map((i) => [path.basename(i.file), i.prompt])).toEqual([
        ['A.PNG', 'photo of a <new1> cat'],
        ['b.jpg', 'a <new1> cat on a sofa'],
        ['c10.webp', 'photo of a <new1> cat'],
      ]);
    });

    it('reads a captions file: lines aligned with the sorted images, or a JSON object', () => {
      fs.writeFileSync(p('caps.txt'), 'one\ntwo\nthree\n');
      const items = listInstanceItems({ ...catConcept, instanceCaptionsFile: p('caps.txt') });
      expect(items.map((i) => i.prompt)).toEqual(['one', 'a <new1> cat on a sofa', 'three']);
      fs.writeFileSync(p('caps.json'), JSON.stringify({ 'c10.webp': 'json caption' }));
      expect(listInstanceItems({ ...catConcept, instanceCaptionsFile: p('caps.json') }).map((i) => i.prompt)[2]).toBe('json caption');
      fs.writeFileSync(p('short.txt'), 'one\n');
      expect(() => listInstanceItems({ ...catConcept, instanceCaptionsFile: p('short.txt') })).toThrow(/1 lines but .* holds 3 images/);
      fs.writeFileSync(p('stray.json'), JSON.stringify({ 'zzz.jpg': 'x' }));
      expect(() => listInstanceItems({ ...catConcept, instanceCaptionsFile: p('stray.json') })).toThrow(/zzz\.jpg/);
    });

    it('refuses an empty or missing instance folder, naming it', async () => {
      fs.mkdirSync(p('empty'));
      fs.writeFileSync(p('empty', 'readme.txt'), 'no images here');
      await expectDataError(() => listInstanceItems({ instancePrompt: 'x', instanceDataDir: p('empty') }), p('empty'), /holds no images/);
      await expectDataError(() => listInstanceItems({ instancePrompt: 'x', instanceDataDir: p('nope') }), p('nope'), /does not exist/);
      await expectDataError(
        TrainingDataset.open({ size: SIZE, concepts: [{ instancePrompt: 'x', instanceDataDir: p('empty') }] }),
        p('empty'),
        /empty.*holds no images/,
      );
    });
  });

  describe('concepts list', () => {
    it('parses the original format, resolving relative paths against the base folder', async () => {
      const list = [
        { instance_prompt: 'photo of a <new1> cat', class_prompt: 'cat', instance_data_dir: './cat', class_data_dir: './cat-class' },
        { instance_prompt: 'photo of a <new2> pot', class_prompt: 'pot', instance_data_dir: 'pot', class_data_dir: 'pot-real', num_class_images: 2, prompt_filename: 'ignored.txt' },
      ];
      fs.writeFileSync(p('concepts.json'), JSON.stringify(list));
      const parsed = await readConceptsList(p('concepts.json'), { baseDir: root });
      expect(parsed).toEqual([
        { instancePrompt: 'photo of a <new1> cat', classPrompt: 'cat', instanceDataDir: p('cat'), classDataDir: p('cat-class') },
        { instancePrompt: 'photo of a <new2> pot', classPrompt: 'pot', instanceDataDir: p('pot'), classDataDir: p('pot-real'), numClassImages: 2 },
      ]);
      // Without a base folder, paths are relative to the current directory, like the original scripts.
      expect(parseConceptsList(list)[0].instanceDataDir).toBe(path.resolve('cat'));
    });

    it.each([
      ['not an array', { a: 1 }, /must be a JSON array/],
      ['empty', [], /is empty/],
      ['an entry that is not an object', ['x'], /Concept 0 .* is not an object/],
      ['a missing instance_prompt', [{ instance_data_dir: 'a' }], /Concept 0 .* has no "instance_prompt"/],
      ['a missing instance_data_dir', [{ instance_prompt: 'a' }], /has no "instance_data_dir"/],
      ['a class_data_dir without class_prompt', [{ instance_prompt: 'a', instance_data_dir: 'b', class_data_dir: 'c' }], /no "class_prompt"/],
      ['a class_prompt without class_data_dir', [{ instance_prompt: 'a', instance_data_dir: 'b', class_prompt: 'c' }], /no "class_data_dir"/],
      ['a non-string prompt', [{ instance_prompt: 3, instance_data_dir: 'b' }], /"instance_prompt" must be a non-empty string/],
      ['a bad num_class_images', [{ instance_prompt: 'a', instance_data_dir: 'b', num_class_images: 0 }], /positive integer/],
    ])('rejects %s', (_name, value, message) => {
      const err = (() => {
        try {
          parseConceptsList(value, 'list.json');
        } catch (e) {
          return e as DataError;
        }
        throw new Error('expected an error');
      })();
      expect(err).toBeInstanceOf(DataError);
      expect(err.file).toBe('list.json');
      expect(err.message).toMatch(message);
    });

    it('reports unreadable lists and missing folders', async () => {
      fs.writeFileSync(p('broken.json'), '[{"instance_prompt": ');
      await expectDataError(readConceptsList(p('broken.json')), p('broken.json'), /not valid JSON/);
      await expectDataError(readConceptsList(p('absent.json')), p('absent.json'), /Cannot read/);
      const concepts = parseConceptsList([{ instance_prompt: 'a', instance_data_dir: 'cat', class_prompt: 'cat', class_data_dir: 'missing-class' }], 'l', root);
      await expectDataError(TrainingDataset.open({ size: SIZE, concepts }), p('missing-class'), /does not exist/);
    });
  });

  describe('single concept with prior preservation', () => {
    let ds: TrainingDataset;
    beforeAll(async () => {
      ds = await TrainingDataset.open({ size: SIZE, concepts: [catConcept] });
    });

    it('has max(#class, #instance) indices and 2 examples per index', () => {
      expect(ds.instances.length).toBe(3);
      expect(ds.classes.length).toBe(5);
      expect(ds.length).toBe(5);
      expect(ds.withPriorPreservation).toBe(true);
      expect(ds.classes.every((c) => c.prompt === 'cat')).toBe(true);
      expect(ds.instances.map((i) => [i.width, i.height])).toEqual([[80, 80], [96, 72], [70, 90]]);
      // 200 class images per concept by default; fewer exist, which is a warning, not an error.
      expect(ds.warnings).toEqual([`${p('cat-class')} holds 5 class images; 200 were asked for`]);
    });

    it('assembles [B instance examples, then B class examples] with the right shapes, masks and prompts', async () => {
      const loader = new TrainingDataLoader(ds, { batchSize: 2, seed: 42 });
      expect(loader.batchesPerEpoch).toBe(3);
      const b = await loader.next();
      expect(b.size).toBe(4);
      expect(b.instanceCount).toBe(2);
      expect(b.pixelShape).toEqual([4, 3, SIZE, SIZE]);
      expect(b.pixels.length).toBe(4 * 3 * SIZE * SIZE);
      expect(b.maskShape).toEqual([4, 1, SIZE / 8, SIZE / 8]);
      expect(b.masks.length).toBe(4 * 64);
      expect(b.isPrior).toEqual([false, false, true, true]);
      expect(b.cacheable).toEqual([false, false, true, true]);
      expect(b.cacheKeys[0]).toBeNull();
      expect(b.cacheKeys[2]).toMatch(/cat-class\/\d+\.jpg#flip=[01]&top=0&left=0$/);
      for (let k = 2; k < 4; k++) expect(Array.from(b.masks.subarray(k * 64, (k + 1) * 64)).every((v) => v === 1)).toBe(true);
      expect(b.prompts.slice(2)).toEqual(['cat', 'cat']);
      const prefixes = ['', ...FAR_PREFIXES, ...ZOOM_PREFIXES];
      for (const [k, prompt] of b.prompts.slice(0, 2).entries()) {
        const item = ds.instances.find((i) => i.file === b.files[k])!;
        expect(prefixes.map((x) => x + item.prompt)).toContain(prompt);
      }
      expect(Array.from(b.pixels).every((v) => v >= -1 && v <= 1)).toBe(true);
    });

    it('pairs index i with instance order[i % #instance] and class i % #class; epochs cover every index once', () => {
      const loader = new TrainingDataLoader(ds, { batchSize: 2, seed: 7 });
      expect([...loader.instanceOrder].sort()).toEqual([0, 1, 2]);
      const seen: number[] = [];
      const sizes: number[] = [];
      for (let k = 0; k < 3; k++) {
        const plan = loader.planNext();
        expect(plan.epoch).toBe(0);
        sizes.push(plan.indices.length);
        seen.push(...plan.indices);
        const inst = plan.examples.filter((e) => e.kind === 'instance');
        const prior = plan.examples.filter((e) => e.kind === 'prior');
        expect(inst.map((e) => e.item)).toEqual(plan.indices.map((i) => loader.instanceOrder[i % 3]));
        expect(prior.map((e) => e.item)).toEqual(plan.indices.map((i) => i % 5));
        expect(plan.examples.map((e) => e.kind)).toEqual([...inst.map(() => 'instance'), ...prior.map(() => 'prior')]);
      }
      expect(sizes).toEqual([2, 2, 1]); // the last batch of an epoch is smaller (dropLast: false)
      expect([...seen].sort()).toEqual([0, 1, 2, 3, 4]);
      expect(seen).toEqual(loader.epochOrder(0));
      expect(loader.planNext().epoch).toBe(1);

      const dropping = new TrainingDataLoader(ds, { batchSize: 2, seed: 7, dropLast: true });
      expect(dropping.batchesPerEpoch).toBe(2);
      expect([0, 1, 2, 3].map(() => [dropping.planNext()].map((x) => [x.epoch, x.indices.length])[0])).toEqual([[0, 2], [0, 2], [1, 2], [1, 2]]);
    });

    it('shuffles every epoch, deterministically from the seed', () => {
      const run = (seed: number) => {
        const l = new TrainingDataLoader(ds, { batchSize: 2, seed });
        return Array.from({ length: 12 }, () => l.planNext()).map((x) => ({ e: x.epoch, i: x.indices, ex: x.examples.map((e) => [e.item, e.prompt, e.params]) }));
      };
      const a = run(3);
      expect(run(3)).toEqual(a);
      expect(run(4)).not.toEqual(a);
      const l = new TrainingDataLoader(ds, { batchSize: 2, seed: 3 });
      const orders = [0, 1, 2, 3].map((e) => l.epochOrder(e).join(','));
      expect(new Set(orders).size).toBeGreaterThan(1);
      expect(a.filter((x) => x.e === 1).flatMap((x) => x.i)).toEqual(l.epochOrder(1));
    });

    it('resumes from a serialised state exactly, including mid-epoch and after prefetching', async () => {
      const a = new TrainingDataLoader(ds, { batchSize: 2, seed: 11 });
      const first = [];
      for (let k = 0; k < 4; k++) first.push(await a.next());
      const saved = JSON.stringify(first[1].stateAfter); // a checkpoint after the step that used batch 1
      const rest = [];
      for (let k = 0; k < 4; k++) rest.push(await a.next());

      const b = TrainingDataLoader.restore(ds, JSON.parse(saved) as DataLoaderState);
      expect(b.state).toEqual(JSON.parse(saved));
      const again = [];
      for (let k = 0; k < 6; k++) again.push(summary(await b.next()));
      expect(again).toEqual([...first.slice(2), ...rest].map(summary));

      const live = TrainingDataLoader.restore(ds, JSON.parse(JSON.stringify(a.state)));
      const c = new TrainingDataLoader(ds, { batchSize: 2, seed: 11 });
      for (let k = 0; k < 8; k++) c.planNext();
      expect(live.planNext()).toEqual(c.planNext());
    });

    it('refuses a state from other data or a malformed one', async () => {
      const other = await TrainingDataset.open({ size: SIZE, concepts: [{ ...catConcept, classPrompt: 'a cat' }] });
      const state = new TrainingDataLoader(ds, { batchSize: 2, seed: 1 }).state;
      expect(() => TrainingDataLoader.restore(other, state)).toThrow(/belongs to other data/);
      expect(() => TrainingDataLoader.restore(ds, { ...state, version: 2 } as unknown as DataLoaderState)).toThrow(InvalidArgumentError);
      expect(() => TrainingDataLoader.restore(ds, { ...state, position: 99 })).toThrow(/past the epoch/);
      expect(() => TrainingDataLoader.restore(ds, { ...state, rng: { algorithm: 'xoshiro128**', s: [0, 0, 0, 0] } })).toThrow(InvalidArgumentError);
    });

    it('gives the same batches with and without the image caches', async () => {
      const uncached = await TrainingDataset.open({ size: SIZE, concepts: [catConcept], cacheClassImages: false, cacheInstanceImages: false });
      const a = new TrainingDataLoader(ds, { batchSize: 3, seed: 5 });
      const b = new TrainingDataLoader(uncached, { batchSize: 3, seed: 5 });
      for (let k = 0; k < 4; k++) expect(summary(await b.next())).toEqual(summary(await a.next()));
    });
  });

  describe("style 'diffusers'", () => {
    it('crops class images at the drawn offsets of their torchvision resize, the same with or without the cache', async () => {
      const ds = await TrainingDataset.open({ size: SIZE, style: 'diffusers', concepts: [potConcept] });
      const loader = new TrainingDataLoader(ds, { batchSize: 3, seed: 2 });
      const lefts = new Set<number>();
      for (let k = 0; k < 6; k++) {
        const b = await loader.next();
        for (let e = b.instanceCount; e < b.size; e++) {
          const params = b.augment[e] as { flip: boolean; top: number; left: number };
          const item = ds.classes.findIndex((c) => c.file === b.files[e]);
          const prepared = await prepareClassImage(await loadImage(b.files[e]), { size: SIZE, style: 'diffusers' });
          expect([prepared.width, prepared.height]).toEqual(Object.values(ds.classPreparedSize(item)));
          expect(params.top).toBe(0);
          expect(params.left).toBeLessThanOrEqual(prepared.width - SIZE);
          lefts.add(params.left);
          const want = applyClassAugment(prepared, params, { size: SIZE, style: 'diffusers' }).pixels;
          expect(hash(b.pixels.subarray(e * 3 * SIZE * SIZE, (e + 1) * 3 * SIZE * SIZE))).toBe(hash(want));
        }
      }
      expect(lefts.size).toBeGreaterThan(1);
    });
  });

  describe('joint concepts', () => {
    it('pools instance images and class images, each concept contributing its first num_class_images', async () => {
      const ds = await TrainingDataset.open({
        size: SIZE,
        concepts: [{ ...catConcept, numClassImages: 2 }, potConcept],
        numClassImages: 200,
      });
      expect(ds.instances.map((i) => [path.basename(i.file), i.concept])).toEqual([
        ['A.PNG', 0], ['b.jpg', 0], ['c10.webp', 0], ['p1.jpg', 1], ['p2.jpeg', 1],
      ]);
      // Real priors: captions from caption.txt, an empty caption falls back to the class prompt.
      expect(ds.classes.map((c) => [path.basename(c.file), c.prompt, c.concept])).toEqual([
        ['0.jpg', 'cat', 0], ['1.jpg', 'cat', 0],
        ['0.jpg', 'a clay pot', 1], ['1.jpg', 'pot', 1], ['2.jpg', 'wooden pot on a table', 1],
      ]);
      expect(ds.length).toBe(5);
      expect(ds.warnings.some((w) => w.includes('3 class images; 200 were asked for'))).toBe(true);
      const loader = new TrainingDataLoader(ds, { batchSize: 5, seed: 1 });
      const b = await loader.next();
      expect(b.concepts.slice(0, 5).sort()).toEqual([0, 0, 0, 1, 1]);
      expect(b.concepts.slice(5).sort()).toEqual([0, 0, 1, 1, 1]);
    });

    it('reads the HF-EX form: class_data_dir = images.txt, class_prompt = caption.txt', async () => {
      const concepts = parseConceptsList(
        [{ instance_prompt: 'photo of a <new2> pot', instance_data_dir: 'pot', class_prompt: 'pot-real/caption.txt', class_data_dir: 'pot-real/images.txt' }],
        'l',
        root,
      );
      expect(concepts[0].classPrompt).toBe(p('pot-real', 'caption.txt'));
      const ds = await TrainingDataset.open({ size: SIZE, concepts });
      // No constant class prompt here, so the empty caption stays empty, as in the original.
      expect(ds.classes.map((c) => c.prompt)).toEqual(['a clay pot', '', 'wooden pot on a table']);
    });
  });

  describe('without prior preservation', () => {
    it('yields instance examples only, one index per instance image', async () => {
      const ds = await TrainingDataset.open({ size: SIZE, concepts: [catConcept], withPriorPreservation: false });
      expect(ds.classes.length).toBe(0);
      expect(ds.length).toBe(3);
      const b = await new TrainingDataLoader(ds, { batchSize: 2, seed: 0 }).next();
      expect(b.pixelShape).toEqual([2, 3, SIZE, SIZE]);
      expect(b.isPrior).toEqual([false, false]);
    });

    it('refuses prior preservation without class data', async () => {
      await expectDataError(
        TrainingDataset.open({ size: SIZE, concepts: [{ instancePrompt: 'x', instanceDataDir: p('cat') }], withPriorPreservation: true }),
        p('cat'),
        /Prior preservation needs class images/,
      );
    });
  });

  describe('scanning', () => {
    it('reports every unusable image up front, by name', async () => {
      fs.mkdirSync(p('bad'));
      await writeImage(p('bad', 'ok.jpg'), 64, 64);
      fs.writeFileSync(p('bad', 'corrupt.jpg'), 'garbage');
      await writeImage(p('bad', 'tiny.png'), 40, 30);
      const err = await expectDataError(
        TrainingDataset.open({ size: SIZE, concepts: [{ instancePrompt: 'x', instanceDataDir: p('bad') }] }),
        p('bad', 'corrupt.jpg'),
        /2 training image\(s\) cannot be used/,
      );
      expect(err.message).toContain(p('bad', 'tiny.png'));
      expect(err.message).toContain('40×30');
      // A lower minimum accepts the small one.
      fs.unlinkSync(p('bad', 'corrupt.jpg'));
      const ds = await TrainingDataset.open({ size: SIZE, minImageSize: 16, concepts: [{ instancePrompt: 'x', instanceDataDir: p('bad') }] });
      expect(ds.warnings.some((w) => w.includes('tiny.png') && w.includes('smaller than the training size'))).toBe(true);
    });

    it('reports a missing image named in images.txt', async () => {
      fs.mkdirSync(p('listed'));
      fs.writeFileSync(p('listed', 'images.txt'), 'listed/images/0.jpg\n');
      fs.writeFileSync(p('listed', 'caption.txt'), 'x\n');
      await expectDataError(
        TrainingDataset.open({ size: SIZE, concepts: [{ ...catConcept, classDataDir: p('listed') }] }),
        'listed/images/0.jpg',
        /line 1 of .*images\.txt does not exist/,
      );
    });
  });
});
