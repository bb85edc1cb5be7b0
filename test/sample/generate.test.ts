import * as path from 'path';
import {
  AbortError,
  InvalidArgumentError,
  QueueFullError,
  StableDiffusion,
  Tensor,
  applyDelta,
  compressDelta,
  encodeImage,
  liveTensors,
  parametersText,
  readDelta,
  readPngText,
  type Delta,
  type GeneratedImage,
  type GenerationProgress,
} from '../../src';
import { loadSharp } from '../../src/train/images';
import { parityDir, maxAbsDiff } from '../helpers/numeric';

const MODEL = path.join(parityDir('sd1'), 'model');
const DELTA = path.join(parityDir('sd1'), 'pipeline', 'delta.safetensors');
const FAST = { steps: 3, guidanceScale: 6, scheduler: 'ddim' as const };

function same(a: GeneratedImage, b: GeneratedImage): boolean {
  return Buffer.compare(a.data, b.data) === 0;
}

describe('StableDiffusion.generate', () => {
  let sd: StableDiffusion;
  let delta: Delta;
  let compressed: Delta;

  beforeAll(async () => {
    sd = await StableDiffusion.load(MODEL);
    delta = await readDelta(DELTA);
    compressed = (await compressDelta({ delta, baseModel: MODEL, rank: 1 })).delta;
  });
  afterAll(() => sd?.dispose());

  it('is reproducible from a seed, and different seeds give different images', async () => {
    const a = await sd.generate({ prompt: 'a photo of a cat', seed: 7, ...FAST });
    const b = await sd.generate({ prompt: 'a photo of a cat', seed: 7, ...FAST });
    const c = await sd.generate({ prompt: 'a photo of a cat', seed: 8, ...FAST });
    expect(same(a.images[0], b.images[0])).toBe(true);
    expect(same(a.images[0], c.images[0])).toBe(false);
    expect(a.images[0].parameters).toMatchObject({ prompt: 'a photo of a cat', seed: 7, steps: 3, scheduler: 'DDIMScheduler', width: 32, height: 32 });
  });

  it.each([
    ['ddim', 0],
    ['ddim', 1],
    ['euler_ancestral', 0],
  ] as const)('makes image k of a batch again on its own from its seed (%s, eta %d)', async (scheduler, eta) => {
    const batch = await sd.generate({ prompt: ['a red dog', 'a cat'], numImages: 2, seed: 100, steps: 3, guidanceScale: 6, scheduler, eta, returnTensors: true });
    expect(batch.images.map((i) => [i.parameters.prompt, i.parameters.seed])).toEqual([
      ['a red dog', 100],
      ['a red dog', 101],
      ['a cat', 102],
      ['a cat', 103],
    ]);
    const alone = await sd.generate({ prompt: 'a cat', seed: 103, steps: 3, guidanceScale: 6, scheduler, eta, returnTensors: true });
    const rows = batch.tensors!.images.shape[0];
    expect(rows).toBe(4);
    // Row 3 of the batch against the single image: batched matrix products may round differently.
    const batchLast = new Float32Array(Array.from(batch.tensors!.images.toArray() as Float32Array).slice(3 * 3 * 32 * 32));
    const single = Array.from(alone.tensors!.images.toArray() as Float32Array);
    const diff = Math.max(...single.map((v, i) => Math.abs(v - batchLast[i])));
    expect(diff).toBeLessThan(1e-5);
  });

  it('leaves no trace of a concept: a base image after a delta call equals the one before, bit for bit', async () => {
    const before = await sd.generate({ prompt: 'a photo of a <new1> cat', seed: 3, ...FAST });
    const withConcept = await sd.generate({ prompt: 'a photo of a <new1> cat', seed: 3, deltas: [delta], ...FAST });
    const after = await sd.generate({ prompt: 'a photo of a <new1> cat', seed: 3, ...FAST });
    expect(same(before.images[0], withConcept.images[0])).toBe(false);
    expect(same(before.images[0], after.images[0])).toBe(true);
    expect(sd.tokenizer.tokenId('<new1>')).toBeUndefined();
    expect(sd.textEncoder.vocabSize).toBe(sd.textEncoder.baseVocabSize);
  });

  it('serves queued calls with different concepts without cross-talk', async () => {
    const single = async (deltas: Delta[], seed: number) => (await sd.generate({ prompt: 'a <new1> cat', seed, deltas, ...FAST })).images[0];
    const expected = [await single([delta], 1), await single([], 2), await single([compressed], 3)];
    const concurrent = await Promise.all([single([delta], 1), single([], 2), single([compressed], 3)]);
    concurrent.forEach((img, i) => expect(same(img, expected[i])).toBe(true));
  });

  it('batches requests for different concepts into one pass, equal to separate calls', async () => {
    const requests = [
      { prompt: 'a <new1> cat', seed: 11, deltas: [delta] },
      { prompt: 'a photo of a dog', seed: 12 },
      { prompt: 'a <new1> cat', seed: 13, deltas: [compressed], numImages: 2 },
    ];
    const batch = await sd.generateBatch({ requests, ...FAST, returnTensors: true });
    expect(batch.images.map((i) => i.request)).toEqual([0, 1, 2, 2]);
    const all = Array.from(batch.tensors!.images.toArray() as Float32Array);
    const per = 3 * 32 * 32;
    let row = 0;
    for (const r of requests) {
      const alone = await sd.generate({ ...r, ...FAST, returnTensors: true });
      const values = Array.from(alone.tensors!.images.toArray() as Float32Array);
      const diff = Math.max(...values.map((v, i) => Math.abs(v - all[row * per + i])));
      expect(diff).toBeLessThan(1e-5);
      row += r.numImages ?? 1;
    }
  });

  it('gives a compressed delta the weights W0 + u·v, as applying it in place does', async () => {
    const viaContext = await sd.generate({ prompt: 'a <new1> cat', seed: 5, deltas: [compressed], ...FAST, returnTensors: true });
    const applied = await applyDelta(compressed, { unet: sd.unet, textEncoder: sd.textEncoder, tokenizer: sd.tokenizer }, { force: true });
    let inPlace;
    try {
      inPlace = await sd.generate({ prompt: 'a <new1> cat', seed: 5, ...FAST, returnTensors: true });
    } finally {
      applied.unapply();
    }
    expect(await maxAbsDiff(viaContext.tensors!.images, inPlace.tensors!.images)).toBe(0);
  });

  it('reports every step, with low-resolution previews when asked', async () => {
    const events: GenerationProgress[] = [];
    await sd.generate({ prompt: 'a cat', seed: 1, steps: 4, guidanceScale: 6, scheduler: 'ddim', previewEvery: 2, onProgress: (e) => events.push(e) });
    const steps = events.filter((e) => e.phase === 'denoise');
    expect(steps.map((e) => (e.phase === 'denoise' ? e.step : 0))).toEqual([1, 2, 3, 4]);
    const previews = steps.filter((e) => e.phase === 'denoise' && e.previews);
    expect(previews).toHaveLength(2);
    const p = previews[0].phase === 'denoise' ? previews[0].previews! : [];
    expect(p[0]).toMatchObject({ width: 8, height: 8 });
    expect(p[0].data).toHaveLength(8 * 8 * 3);
    expect(events[0].phase).toBe('encode');
    expect(events.at(-1)!.phase).toBe('decode');
  });

  it('stops at an abort between steps and frees what the call held', async () => {
    await sd.generate({ prompt: 'warm up', seed: 1, ...FAST });
    const live = liveTensors();
    const controller = new AbortController();
    const run = sd.generate({
      prompt: 'a cat',
      seed: 1,
      steps: 50,
      guidanceScale: 6,
      signal: controller.signal,
      onProgress: (e) => {
        if (e.phase === 'denoise' && e.step === 2) controller.abort();
      },
    });
    await expect(run).rejects.toBeInstanceOf(AbortError);
    if (global.gc) global.gc();
    expect(liveTensors()).toBeLessThanOrEqual(live + 2);
    // The model still works.
    const ok = await sd.generate({ prompt: 'a cat', seed: 1, ...FAST });
    expect(ok.images).toHaveLength(1);
  });

  it('rejects calls beyond the queue limit with QueueFullError, and drops aborted waiting calls', async () => {
    const small = await StableDiffusion.load(MODEL, { queueLimit: 1 });
    try {
      const first = small.generate({ prompt: 'a', seed: 1, ...FAST });
      const controller = new AbortController();
      const second = small.generate({ prompt: 'b', seed: 1, ...FAST, signal: controller.signal });
      const third = small.generate({ prompt: 'c', seed: 1, ...FAST });
      await expect(third).rejects.toBeInstanceOf(QueueFullError);
      expect(small.pendingRequests).toBe(1);
      controller.abort();
      await expect(second).rejects.toBeInstanceOf(AbortError);
      expect(small.pendingRequests).toBe(0);
      await expect(first).resolves.toBeDefined();
    } finally {
      small.dispose();
    }
  });

  it.each([
    ['a size that is not a multiple of 8', { width: 30 }, /width must be a multiple of 8/],
    ['zero steps', { steps: 0 }, /steps must be a positive integer/],
    ['an unknown scheduler', { scheduler: 'lms' }, /Unknown scheduler "lms"/],
    ['a NaN guidance scale', { guidanceScale: NaN }, /guidanceScale must be a finite number/],
    ['a negative eta', { eta: -1 }, /eta must be ≥ 0/],
    ['an empty prompt list', { prompt: [] }, /prompt must be a string or a non-empty array/],
    ['seeds that do not match the images', { seed: [1, 2] }, /seed lists 2 seeds for 1 images/],
    ['latents of the wrong shape', { latents: Tensor.zeros([1, 4, 9, 9]) }, /latents must be \[1, 4, 8, 8\]/],
  ])('refuses %s with a clear error', async (_what, bad, message) => {
    const options = { prompt: 'a cat', seed: 1, ...FAST, ...(bad as object) };
    const err = await sd.generate(options as never).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect((err as Error).message).toMatch(message);
  });

  it('refuses a delta trained on another base model', async () => {
    const foreign = { ...delta, baseModelFingerprint: 'sha256:0000' };
    await expect(sd.generate({ prompt: 'a <new1> cat', seed: 1, deltas: [foreign], ...FAST })).rejects.toThrow(/another base model/);
  });

  it('cuts prompts longer than 77 tokens, with a warning', async () => {
    const long = Array.from({ length: 90 }, () => 'cat').join(' ');
    const r = await sd.generate({ prompt: long, seed: 1, ...FAST });
    expect(r.warnings).toHaveLength(1);
    expect(r.warnings[0]).toMatch(/longer than 77 tokens/);
  });

  it('writes PNG files that carry the generation parameters and decode to the same pixels', async () => {
    const r = await sd.generate({ prompt: 'a photo of a cat', negativePrompt: 'blurry', seed: 9, ...FAST });
    const img = r.images[0];
    const png = await encodeImage(img, 'png', { text: parametersText(img.parameters) });
    const text = readPngText(png);
    expect(JSON.parse(text['custom-diffusion'])).toEqual(img.parameters);
    expect(text.parameters).toMatch(/^a photo of a cat\nNegative prompt: blurry\nSteps: 3, Sampler: DDIMScheduler, CFG scale: 6, Seed: 9/);
    const { data, info } = await loadSharp()(png).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height, info.channels]).toEqual([32, 32, 3]);
    expect(Buffer.compare(data, img.data)).toBe(0);
  });
});
