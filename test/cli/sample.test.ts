/**
 * `customdiff sample` and `customdiff class-images` through bin/customdiff.js on the tiny SD1
 * fixture model, and what `customdiff train` generates itself: class images for prior
 * preservation and validation images.
 */
import * as fs from 'fs';
import * as path from 'path';
import sharp from 'sharp';
import { readPngText } from '../../src/sample/images';
import { tempDir } from '../helpers/env';
import { parityDir } from '../helpers/numeric';
import { cli, events, FAST, MODEL, mtime, writeImageFolders } from './util';

const DELTA = path.join(parityDir('sd1'), 'pipeline', 'delta.safetensors');
/** Few steps and a deterministic scheduler keep each run well under a second of sampling. */
const QUICK = ['-m', MODEL, '--steps', '3', '--scheduler', 'ddim'];

let tmp: { dir: string; cleanup: () => void };
let cwd: string;

beforeAll(() => {
  tmp = tempDir('cd-cli-sample-');
  cwd = tmp.dir;
});
afterAll(() => tmp.cleanup());

async function pixels(file: string): Promise<Buffer> {
  return sharp(file).raw().toBuffer();
}

function parameters(file: string): Record<string, unknown> {
  return JSON.parse(readPngText(fs.readFileSync(file))['custom-diffusion']) as Record<string, unknown>;
}

describe('customdiff sample', () => {
  it('writes <index>-<seed>.png files with their parameters, a grid, and --json events', () => {
    const r = cli(['sample', ...QUICK, '-p', 'a photo of a cat', '-p', 'a red dog', '-n', '2', '--batch-size', '3', '--seed', '40', '--grid', '-o', 'two', '--json'], cwd);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const ev = events(r.stdout);
    const out = path.join(cwd, 'two');
    expect(ev.find((e) => e.event === 'start')).toMatchObject({ images: 4, batches: 2, batchSize: 3, seed: 40, outputDir: out, prompts: ['a photo of a cat', 'a red dog'] });
    const steps = ev.filter((e) => e.event === 'step');
    expect(steps.map((e) => [e.batch, e.step])).toEqual([
      [1, 1], [1, 2], [1, 3],
      [2, 1], [2, 2], [2, 3],
    ]);
    expect(steps.every((e) => e.steps === 3 && e.batches === 2)).toBe(true);
    const names = ['0000-40.png', '0001-41.png', '0002-42.png', '0003-43.png'];
    expect(ev.filter((e) => e.event === 'image').map((e) => path.basename(e.file as string))).toEqual(names);
    const result = ev[ev.length - 1];
    expect(result.event).toBe('result');
    expect(result.grid).toBe(path.join(out, 'grid.png'));
    expect((result.files as { file: string; prompt: string; seed: number }[]).map((f) => [path.basename(f.file), f.prompt, f.seed])).toEqual([
      [names[0], 'a photo of a cat', 40],
      [names[1], 'a photo of a cat', 41],
      [names[2], 'a red dog', 42],
      [names[3], 'a red dog', 43],
    ]);
    expect(fs.readdirSync(out).sort()).toEqual([...names, 'grid.png']);
    const text = readPngText(fs.readFileSync(path.join(out, names[2])));
    expect(text.parameters).toMatch(/^a red dog\nNegative prompt: \nSteps: 3, Sampler: DDIMScheduler, CFG scale: 7\.5, Seed: 42, Size: 32x32/);
    expect(parameters(path.join(out, names[2]))).toMatchObject({ prompt: 'a red dog', seed: 42, steps: 3, scheduler: 'DDIMScheduler', width: 32, height: 32, deltas: [] });
  });

  it('grids one row per prompt', async () => {
    const meta = await sharp(path.join(cwd, 'two', 'grid.png')).metadata();
    expect([meta.width, meta.height]).toEqual([2 * 32 + 2, 2 * 32 + 2]);
  });

  it('makes any image again on its own from its seed; a batch matches it closely', async () => {
    const r = cli(['sample', ...QUICK, '-p', 'a photo of a cat', '-n', '3', '--seed', '10', '-o', 'seeds', '--quiet'], cwd);
    expect(r.code).toBe(0);
    const again = cli(['sample', ...QUICK, '-p', 'a photo of a cat', '--seed', '12', '-o', 'seed12', '--quiet'], cwd);
    expect(again.code).toBe(0);
    expect(again.stdout.trim().split('\n').pop()).toBe(path.join(cwd, 'seed12', '0000-12.png'));
    expect((await pixels(path.join(cwd, 'seed12', '0000-12.png'))).equals(await pixels(path.join(cwd, 'seeds', '0002-12.png')))).toBe(true);
    const other = await pixels(path.join(cwd, 'seeds', '0001-11.png'));
    expect(other.equals(await pixels(path.join(cwd, 'seeds', '0002-12.png')))).toBe(false);
    // In a batch of three, image 2 equals the one made alone up to float rounding (8-bit values at most 1 apart).
    const batched = cli(['sample', ...QUICK, '-p', 'a photo of a cat', '-n', '3', '--seed', '10', '--batch-size', '3', '-o', 'batched', '--quiet'], cwd);
    expect(batched.code).toBe(0);
    const a = await pixels(path.join(cwd, 'batched', '0002-12.png'));
    const b = await pixels(path.join(cwd, 'seed12', '0000-12.png'));
    expect(Math.max(...a.map((v, i) => Math.abs(v - b[i])))).toBeLessThanOrEqual(1);
  });

  it('applies deltas of any format: ours, the original delta.bin, a training output folder', async () => {
    const prompt = ['-p', 'a photo of a <new1> cat', '--seed', '5'];
    const base = cli(['sample', ...QUICK, ...prompt, '-o', 'base', '--quiet'], cwd);
    expect(base.code).toBe(0);
    expect(base.stderr).toMatch(/warning: the prompts use <new1>, which no --delta defines/);
    const ours = cli(['sample', ...QUICK, ...prompt, '--delta', DELTA, '-o', 'ours', '--json'], cwd);
    expect(ours.code).toBe(0);
    expect(events(ours.stdout).filter((e) => e.event === 'warning')).toEqual([]);
    const file = path.join(cwd, 'ours', '0000-5.png');
    expect(parameters(file).deltas).toEqual([DELTA]);
    expect(readPngText(fs.readFileSync(file)).parameters).toMatch(/, Deltas: \S+delta\.safetensors$/);
    expect((await pixels(file)).equals(await pixels(path.join(cwd, 'base', '0000-5.png')))).toBe(false);

    // The same weights as the original repository's delta.bin, and from a folder holding it.
    const bin = path.join(cwd, 'export', 'delta.bin');
    expect(cli(['convert', DELTA, '--to', 'delta-bin', '-o', bin, '--quiet'], cwd).code).toBe(0);
    const viaBin = cli(['sample', ...QUICK, ...prompt, '-d', path.dirname(bin), '-o', 'bin', '--quiet'], cwd);
    expect(viaBin.stderr).toBe('');
    expect(viaBin.code).toBe(0);
    expect((await pixels(path.join(cwd, 'bin', '0000-5.png'))).equals(await pixels(file))).toBe(true);

    // A compressed delta.
    const small = path.join(cwd, 'export', 'small.safetensors');
    expect(cli(['compress', DELTA, '-m', MODEL, '--rank', '2', '-o', small, '--quiet'], cwd).code).toBe(0);
    const viaSmall = cli(['sample', ...QUICK, ...prompt, '-d', small, '-o', 'small', '--quiet'], cwd);
    expect(viaSmall.code).toBe(0);
    expect(fs.existsSync(path.join(cwd, 'small', '0000-5.png'))).toBe(true);

    // One token defined twice: merge them first.
    const twice = cli(['sample', ...QUICK, ...prompt, '-d', DELTA, '-d', bin, '-o', 'twice'], cwd);
    expect(twice.code).toBe(2);
    expect(twice.stderr).toMatch(/both define the token <new1>; merge them .*customdiff compose/);
    expect(fs.existsSync(path.join(cwd, 'twice'))).toBe(false);
  });

  it('reads prompts from a file and writes JPEG and WebP', async () => {
    fs.writeFileSync(path.join(cwd, 'prompts.txt'), 'a photo of a cat\n\n  a red dog  \n');
    const r = cli(['sample', ...QUICK, '--prompts-file', 'prompts.txt', '--seed', '0', '--format', 'jpg', '--quality', '80', '-o', 'jpg', '--json'], cwd);
    expect(r.code).toBe(0);
    const files = (events(r.stdout).pop()!.files as { file: string; prompt: string }[]).map((f) => [path.basename(f.file), f.prompt]);
    expect(files).toEqual([
      ['0000-0.jpg', 'a photo of a cat'],
      ['0001-1.jpg', 'a red dog'],
    ]);
    expect((await sharp(path.join(cwd, 'jpg', '0000-0.jpg')).metadata()).format).toBe('jpeg');
    const w = cli(['sample', ...QUICK, '-p', 'a cat', '--format', 'webp', '--seed', '0', '-o', 'webp', '--quiet'], cwd);
    expect(w.code).toBe(0);
    expect((await sharp(path.join(cwd, 'webp', '0000-0.webp')).metadata()).format).toBe('webp');
  });

  it('never replaces images without --overwrite', () => {
    const file = path.join(cwd, 'seeds', '0000-10.png');
    const before = mtime(file);
    const r = cli(['sample', ...QUICK, '-p', 'a photo of a cat', '-n', '3', '--seed', '10', '-o', 'seeds'], cwd);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/already holds 0000-10\.png, 0001-11\.png, 0002-12\.png of an earlier run; pass --overwrite/);
    expect(mtime(file)).toBe(before);
    // Other seeds write beside them.
    expect(cli(['sample', ...QUICK, '-p', 'a photo of a cat', '--seed', '99', '-o', 'seeds', '--quiet'], cwd).code).toBe(0);
    const o = cli(['sample', ...QUICK, '-p', 'a photo of a cat', '-n', '3', '--seed', '10', '-o', 'seeds', '--overwrite', '--quiet'], cwd);
    expect(o.code).toBe(0);
    expect(mtime(file)).toBeGreaterThan(before);
    expect(fs.readdirSync(path.join(cwd, 'seeds')).sort()).toEqual(['0000-10.png', '0000-99.png', '0001-11.png', '0002-12.png']);
  });

  it('prints progress and the files for people', () => {
    const r = cli(['sample', ...QUICK, '-p', 'a cat', '-n', '2', '--seed', '3', '-o', 'human'], cwd);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/^2 images \(1 prompt × 2, seeds 3–4\) in 2 batches on cpu \(float32\)/m);
    expect(r.stderr).toMatch(/sample: batch 1\/2: step 3\/3 \| [\d.]+ (step\/s|s\/step) \| elapsed/);
    expect(r.stderr).toMatch(/sample: batch 2\/2: step 3\/3 /);
    expect(r.stdout).toBe(`Wrote 2 PNG images (seeds 3–4) in ${/in (\S+):/.exec(r.stdout)![1]}:\n${path.join(cwd, 'human', '0000-3.png')}\n${path.join(cwd, 'human', '0001-4.png')}\n`);
  });

  it('exits 2 with a message that says what to do on usage errors', () => {
    const cases: [string[], RegExp][] = [
      [['sample', ...QUICK, '-p', 'x', '--width', '30'], /--width.*expected a multiple of 8/],
      [['sample', ...QUICK, '-p', 'x', '--height', '0'], /expected an integer from 8 to 8192/],
      [['sample', ...QUICK, '-p', 'x', '--steps', '0'], /--steps.*expected an integer from 1 to 10000/],
      [['sample', ...QUICK, '-p', 'x', '--scheduler', 'lms'], /Allowed choices are ddpm, ddim, pndm, dpmsolver\+\+, euler, euler_ancestral/],
      [['sample', ...QUICK, '-p', 'x', '--guidance', 'high'], /expected a number/],
      [['sample', ...QUICK, '-p', 'x', '--format', 'gif'], /Allowed choices are png, jpg, jpeg, webp/],
      [['sample', ...QUICK, '-p', 'x', '--quality', '80'], /--quality applies to --format jpg and webp only/],
      [['sample', ...QUICK], /sample needs a prompt/],
      [['sample', '-p', 'x'], /sample needs --model/],
      [['sample', '-m', cwd, '-p', 'x'], /is not a diffusers model folder/],
      [['sample', ...QUICK, '-p', 'x', '--prompts-file', 'nope.txt'], /Cannot read --prompts-file nope\.txt/],
      [['sample', ...QUICK, '-p', 'x', '-d', 'nope.safetensors'], /nope\.safetensors does not exist/],
      [['sample', ...QUICK, '-p', 'x', '-o', 'prompts.txt'], /is a file; give a folder/],
    ];
    for (const [args, message] of cases) {
      const r = cli(args, cwd);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
      expect(r.stderr).toMatch(message);
    }
  });
});

describe('customdiff class-images', () => {
  const args = ['class-images', ...QUICK.filter((a) => a !== 'ddim' && a !== '--scheduler'), '--steps', '2', '--class-prompt', 'photo of a cat', '--batch-size', '2'];

  it('writes the layout train reads, resumes, and starts over with --overwrite', () => {
    const r = cli([...args, '-n', '3', '-o', 'reg/cat', '--json'], cwd);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const ev = events(r.stdout);
    const out = path.join(cwd, 'reg', 'cat');
    expect(ev.filter((e) => e.event === 'progress').map((e) => e.value)).toEqual([0, 2, 3]);
    expect(ev.pop()).toMatchObject({ event: 'result', outputDir: out, count: 3, generated: 3, existing: 0 });
    expect(fs.readdirSync(path.join(out, 'images')).sort()).toEqual(['0.png', '1.png', '2.png']);
    expect(fs.readFileSync(path.join(out, 'caption.txt'), 'utf8')).toBe('photo of a cat\n'.repeat(3));
    expect(fs.readFileSync(path.join(out, 'images.txt'), 'utf8').trim().split('\n')).toHaveLength(3);
    // Class images are at least 64 pixels (what training accepts), though the tiny model draws 32.
    expect(parameters(path.join(out, 'images', '0.png'))).toMatchObject({ prompt: 'photo of a cat', seed: 0, width: 64, height: 64, guidanceScale: 6 });

    const first = mtime(path.join(out, 'images', '0.png'));
    const more = cli([...args, '-n', '4', '-o', 'reg/cat'], cwd);
    expect(more.code).toBe(0);
    expect(more.stderr).toMatch(/holds 3 images of an earlier run: keeping them and making the other 1/);
    expect(more.stdout).toMatch(/^4 images of "photo of a cat" in .* \(1 generated, 3 already there\)\nUse them with: customdiff train … --class-dir reg\/cat --class-prompt "photo of a cat"/);
    expect(mtime(path.join(out, 'images', '0.png'))).toBe(first);
    expect(parameters(path.join(out, 'images', '3.png')).seed).toBe(3);

    const over = cli([...args, '-n', '2', '--seed', '100', '-o', 'reg/cat', '--overwrite', '--json'], cwd);
    expect(over.code).toBe(0);
    expect(events(over.stdout).pop()).toMatchObject({ count: 2, generated: 2, existing: 0 });
    expect(fs.readdirSync(path.join(out, 'images')).sort()).toEqual(['0.png', '1.png']);
    expect(parameters(path.join(out, 'images', '1.png')).seed).toBe(101);
  });

  it('protects folders it did not write; usage errors exit 2', () => {
    fs.mkdirSync(path.join(cwd, 'retrieved'));
    fs.writeFileSync(path.join(cwd, 'retrieved', 'urls.txt'), 'http://example.com/0.jpg\n');
    const r = cli([...args, '-n', '1', '-o', 'retrieved'], cwd);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/already holds retrieved images .*--overwrite/);
    expect(cli(['class-images', '-m', MODEL, '-o', 'x'], cwd).stderr).toMatch(/needs --class-prompt/);
    expect(cli(['class-images', '-m', MODEL, '--class-prompt', 'cat'], cwd).stderr).toMatch(/needs --output-dir/);
    expect(cli([...args, '-n', '0', '-o', 'x'], cwd).code).toBe(2);
    fs.writeFileSync(path.join(cwd, 'a-file'), '');
    const file = cli([...args, '-n', '1', '-o', 'a-file'], cwd);
    expect(file.code).toBe(2);
    expect(file.stderr).toMatch(/a-file is a file; give a folder/);
  });
});

describe('customdiff train: generated class images and validation images', () => {
  it('generates the priors into <output-dir>/class_images, validates every --validation-steps, and reuses the priors', async () => {
    const { inst1 } = await writeImageFolders(path.join(cwd, 'train-data'));
    const train = (out: string, extra: string[]) =>
      cli(['train', ...FAST, '--instance-dir', inst1, '--instance-prompt', 'photo of a <new1> man', '--class-prompt', 'photo of a man', '--num-class-images', '2', '-o', out, ...extra], cwd);
    const r = train('gen', ['--max-train-steps', '2', '--validation-prompt', '<new1> man on a beach', '--validation-steps', '1', '--num-validation-images', '1', '--json']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const ev = events(r.stdout);
    const out = path.join(cwd, 'gen');
    const classDir = path.join(out, 'class_images');
    expect(ev.find((e) => e.event === 'class-images')).toMatchObject({ dir: classDir, classPrompt: 'photo of a man', count: 2, generated: 2, existing: 0 });
    // Class images before training, validation after steps 1 and 2.
    const order = ev.map((e) => e.event).filter((e) => ['class-images', 'start', 'validation', 'result'].includes(e));
    expect(order).toEqual(['class-images', 'start', 'validation', 'validation', 'result']);
    const validations = ev.filter((e) => e.event === 'validation');
    expect(validations.map((e) => [e.step, e.prompt, e.dir])).toEqual([
      [1, '<new1> man on a beach', path.join(out, 'validation', 'step-1')],
      [2, '<new1> man on a beach', path.join(out, 'validation', 'step-2')],
    ]);
    const v1 = path.join(out, 'validation', 'step-1', '0000-42.png');
    const v2 = path.join(out, 'validation', 'step-2', '0000-42.png');
    expect(validations.map((e) => e.files)).toEqual([[v1], [v2]]);
    expect(parameters(v2)).toMatchObject({ prompt: '<new1> man on a beach', seed: 42, steps: 25, scheduler: 'DPMSolverMultistepScheduler' });
    // The weights changed between the two validations.
    expect((await pixels(v1)).equals(await pixels(v2))).toBe(false);
    expect(fs.readFileSync(path.join(classDir, 'caption.txt'), 'utf8')).toBe('photo of a man\n'.repeat(2));
    const run = JSON.parse(fs.readFileSync(path.join(out, 'run.json'), 'utf8'));
    expect(run.options.concepts[0].classDataDir).toBe(classDir);
    expect(run.options.resolved.validationSteps).toBe(1);

    // A second run into a --class-dir that holds them already generates nothing.
    const again = cli(
      ['train', ...FAST, '--instance-dir', inst1, '--instance-prompt', 'photo of a <new1> man', '--class-prompt', 'photo of a man', '--class-dir', classDir, '--num-class-images', '2', '--max-train-steps', '1', '-o', 'gen2', '--json'],
      cwd,
    );
    expect(again.code).toBe(0);
    expect(events(again.stdout).find((e) => e.event === 'class-images')).toBeUndefined();
  });
});
