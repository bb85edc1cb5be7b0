/**
 * The demo (runDemo and `customdiff demo` through bin/customdiff.js) end to end on a toy-world model
 * made in beforeAll with a couple of pretraining steps: loadable, same architecture as the embedded
 * model, but it cannot draw. So these tests check structure (stages, files, report, events, exit
 * codes), never quality; bench/quality.js checks the real thresholds on the real model.
 */
import * as fs from 'fs';
import * as path from 'path';
import { pretrainToy } from '../../src/pretrain/toy';
import { runDemo, resolveDemoModel, DEMO_MODEL_DIR, DEMO_STAGES, type DemoEvent, type ConceptScores, type PlainScores } from '../../src/demo/demo';
import { InvalidArgumentError, FileError } from '../../src/errors';
import { tempDir } from '../helpers/env';
import { cli, cliAsync, events } from '../cli/util';

let tmp: { dir: string; cleanup: () => void };
let model: string;

/** The smallest run: a few steps and pictures everywhere. */
const TINY = { steps: 3, classImages: 2, evalSeeds: 1, plainImages: 2, sampleSteps: 2, instanceImages: 3 };
const TINY_ARGS = ['--steps', '3', '--class-images', '2', '--eval-seeds', '1', '--plain-images', '2', '--sample-steps', '2', '--threads', '2'];

beforeAll(async () => {
  tmp = tempDir('cd-demo-');
  model = path.join(tmp.dir, 'toy-sd');
  await pretrainToy({
    outDir: model,
    threads: 2,
    vae: { steps: 1, batchSize: 2 },
    unet: { steps: 1, batchSize: 2 },
    cacheImages: 4,
    scaleImages: 4,
    evaluate: false,
  });
}, 120_000);
afterAll(() => tmp?.cleanup());

function expectRate(x: number): void {
  expect(x).toBeGreaterThanOrEqual(0);
  expect(x).toBeLessThanOrEqual(1);
}

function expectConcept(s: ConceptScores, emblem: string, images: number): void {
  expect(s).toMatchObject({ emblem, images });
  for (const k of ['emblem_rate', 'background_rate', 'in_context_rate', 'mean_emblem_score'] as const) expectRate(s[k]);
  expect(s.in_context_rate).toBeLessThanOrEqual(Math.min(s.emblem_rate, s.background_rate));
}

function expectPlain(s: PlainScores, images: number, vsBase: boolean): void {
  expect(s.images).toBe(images);
  for (const k of ['accuracy', 'colour', 'background', 'shape'] as const) expectRate(s[k]);
  if (vsBase) {
    expectRate(s.same_verdict_rate!);
    expect(s.mean_pixel_change).toBeGreaterThanOrEqual(0);
    expect(s.mean_pixel_change).toBeLessThanOrEqual(255);
  } else {
    expect(s.same_verdict_rate).toBeUndefined();
  }
}

describe('runDemo', () => {
  let out: string;
  const seen: DemoEvent[] = [];
  let result: Awaited<ReturnType<typeof runDemo>>;

  beforeAll(async () => {
    out = path.join(tmp.dir, 'api');
    result = await runDemo({ model, outDir: out, threads: 2, ...TINY, onProgress: (e) => seen.push(e) });
  }, 120_000);

  it('runs every stage in order, each started and ended once, with progress up to its total', () => {
    const starts = seen.filter((e): e is Extract<DemoEvent, { type: 'stage' }> => e.type === 'stage');
    expect(starts.map((e) => e.stage)).toEqual([...DEMO_STAGES]);
    expect(starts.map((e) => e.index)).toEqual(DEMO_STAGES.map((_, i) => i + 1));
    expect(seen.filter((e) => e.type === 'stage-end').map((e) => e.stage)).toEqual([...DEMO_STAGES]);
    for (const s of starts) {
      const p = seen.filter((e): e is Extract<DemoEvent, { type: 'progress' }> => e.type === 'progress' && e.stage === s.stage);
      expect({ stage: s.stage, last: p.at(-1)?.done }).toEqual({ stage: s.stage, last: s.total });
      expect(p.every((e, i) => i === 0 || e.done > p[i - 1].done)).toBe(true);
    }
    const train = seen.filter((e): e is Extract<DemoEvent, { type: 'progress' }> => e.type === 'progress' && e.stage === 'train-1');
    expect(train.map((e) => e.done)).toEqual([1, 2, 3]);
    expect(train.every((e) => Number.isFinite(e.loss))).toBe(true);
  });

  it('writes the report with every grid embedded, the loss curves and the metrics tables', () => {
    expect(result.reportPath).toBe(path.join(out, 'report.html'));
    const html = fs.readFileSync(result.reportPath, 'utf8');
    expect(html.startsWith('<!doctype html>')).toBe(true);
    expect(html.match(/src="data:image\/png;base64,[A-Za-z0-9+/=]+"/g)).toHaveLength(13);
    expect(html).toMatch(/<svg [^>]*aria-label="training loss"/);
    expect(html.match(/<polyline /g)).toHaveLength(4); // two curves, raw and smoothed
    for (const s of ['Concept fidelity and text alignment', 'Prior preservation', 'emblem found', 'background as asked', 'colour+background+shape', 'merged: &quot;a &lt;new2&gt; badge&quot;', 'With the merged delta, plain prompts are drawn right in']) {
      expect(html).toContain(s);
    }
    expect(html).not.toContain('<new1>'); // every prompt is escaped
    // (outside the embedded pictures, whose base64 may spell anything)
    expect(html.replace(/base64,[A-Za-z0-9+/=]+/g, 'base64,')).not.toMatch(/NaN|undefined/);
  });

  it('writes the training data, deltas, grids and metrics.json, and returns the same metrics', () => {
    const f = result.files;
    for (const k of ['instance1', 'instance2', 'classImages', 'delta1', 'compressed1', 'delta2', 'merged', 'grids', 'report', 'metrics']) {
      expect({ k, exists: fs.existsSync(f[k]) }).toEqual({ k, exists: true });
    }
    expect(fs.readdirSync(f.instance1).sort()).toEqual(['0.png', '1.png', '2.png']);
    expect(f.instance1).toBe(path.join(out, 'data', 'split-tile'));
    const captions = JSON.parse(fs.readFileSync(path.join(out, 'data', 'split-tile-captions.json'), 'utf8')) as Record<string, string>;
    expect(Object.values(captions).every((c) => /^a <new1> tile on a (green|blue|white|black) background$/.test(c))).toBe(true);
    const badge = JSON.parse(fs.readFileSync(path.join(out, 'data', 'split-disc-captions.json'), 'utf8')) as Record<string, string>;
    expect(Object.values(badge).every((c) => /^a <new1> badge on a (red|green|yellow|black) background$/.test(c))).toBe(true);
    // Two class images with their captions, the first once more with an empty caption (the unconditional prediction).
    const listed = fs.readFileSync(path.join(f.classImages, 'images.txt'), 'utf8').split('\n');
    const captionLines = fs.readFileSync(path.join(f.classImages, 'caption.txt'), 'utf8').split('\n');
    expect(listed).toHaveLength(4);
    expect(listed[2]).toBe(listed[0]);
    expect(captionLines.slice(0, 2).every((c) => /^a (small|large) \w+ (circle|square|triangle) on a \w+ background$/.test(c))).toBe(true);
    expect(captionLines.slice(2)).toEqual(['', '']);
    expect(fs.readdirSync(f.grids).filter((n) => n.endsWith('.png'))).toHaveLength(15);
    expect(JSON.parse(fs.readFileSync(result.metricsPath, 'utf8'))).toEqual(JSON.parse(JSON.stringify(result.metrics)));
  });

  it('reports scores for every model against the base model (structure only: this model cannot draw)', () => {
    const m = result.metrics;
    const n = 4 * TINY.evalSeeds; // four backgrounds per emblem
    expectConcept(m.base.concept1, 'split-tile', n);
    expectConcept(m.base.concept2, 'split-disc', n);
    expectConcept(m.delta1.concept, 'split-tile', n);
    expectConcept(m.compressed1.concept, 'split-tile', n);
    expectConcept(m.delta2.concept, 'split-disc', n);
    expectConcept(m.merged.concept1, 'split-tile', n);
    expectConcept(m.merged.concept2, 'split-disc', n);
    expectPlain(m.base.plain, TINY.plainImages, false);
    for (const p of [m.delta1.plain, m.compressed1.plain, m.delta2.plain, m.merged.plain]) expectPlain(p, TINY.plainImages, true);
    expect(m.merged.tokens).toEqual({ '<new1>': 'split-tile', '<new2>': 'split-disc' });
    expect(m.compressed1.ratio).toBe(0.6);
    expect(m.compressed1.meanRank).toBeGreaterThanOrEqual(0);
    expect(m.compressed1.bytes).toBeGreaterThan(0);
    expect(m.training.concept1.steps).toBe(3);
    expect(m.training.concept2.steps).toBe(3);
    expect(Object.keys(m.seconds).sort()).toEqual([...DEMO_STAGES, 'total'].sort());
    expect(m.settings).toMatchObject({ steps: 3, classImages: 2, evalSeeds: 1, plainImages: 2, sampleSteps: 2, resolution: 32 });
  });

  it('refuses a non-empty output folder unless told to overwrite, and then replaces only its own outputs', async () => {
    await expect(runDemo({ model, outDir: out, ...TINY })).rejects.toThrow(InvalidArgumentError);
    fs.writeFileSync(path.join(out, 'notes.txt'), 'mine');
    const before = fs.statSync(result.reportPath).mtimeMs;
    const again = await runDemo({ model, outDir: out, overwrite: true, ...TINY, steps: 1 });
    expect(fs.readFileSync(path.join(out, 'notes.txt'), 'utf8')).toBe('mine');
    expect(fs.statSync(again.reportPath).mtimeMs).toBeGreaterThanOrEqual(before);
    expect(again.metrics.training.concept1.steps).toBe(1);
  }, 120_000);
});

describe('the demo model', () => {
  it('is the embedded folder by default, and a missing one is a clear error', () => {
    expect(DEMO_MODEL_DIR).toBe(path.join(path.resolve(__dirname, '..', '..'), 'models', 'toy'));
    expect(resolveDemoModel(model)).toBe(model);
    const missing = path.join(tmp.dir, 'nowhere');
    expect(() => resolveDemoModel(missing)).toThrow(FileError);
    expect(() => resolveDemoModel(missing)).toThrow(/npm run pretrain:toy/);
    const root = path.resolve(__dirname, '..', '..');
    const present = [DEMO_MODEL_DIR, path.join(root, 'models', 'toy')].filter((d) => fs.existsSync(path.join(d, 'model_index.json')));
    if (present.length > 0) expect(resolveDemoModel()).toBe(present[0]);
    else expect(() => resolveDemoModel()).toThrow(/embedded demo model was not found at .*toy.*npm run pretrain:toy -- --out /);
  });
});

describe('customdiff demo', () => {
  it('prints progress on stderr and the report path on stdout', () => {
    const r = cli(['demo', '-m', model, '-o', 'human', ...TINY_ARGS], tmp.dir);
    expect(r.code).toBe(0);
    const report = path.join(tmp.dir, 'human', 'report.html');
    expect(r.stdout.trim().split('\n').at(-1)).toMatch(new RegExp(`Report: ${report.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`));
    expect(r.stdout).toContain('concept prompts');
    for (let i = 1; i <= DEMO_STAGES.length; i++) expect(r.stderr).toContain(`[${i}/${DEMO_STAGES.length}] `);
    expect(r.stderr).toMatch(/train-1: step 3\/3 \| loss \d/);
    expect(fs.existsSync(report)).toBe(true);
  });

  it('--json: one JSON event per line (stages, progress, the result with the report and metrics)', () => {
    const r = cli(['demo', '-m', model, '-o', 'json', '--json', ...TINY_ARGS], tmp.dir);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const ev = events(r.stdout);
    expect(ev.filter((e) => e.event === 'stage').map((e) => e.stage)).toEqual([...DEMO_STAGES]);
    expect(ev.filter((e) => e.event === 'stage-end')).toHaveLength(DEMO_STAGES.length);
    expect(ev.filter((e) => e.event === 'progress' && e.stage === 'train-2').map((e) => e.done)).toEqual([1, 2, 3]);
    const result = ev.at(-1)!;
    expect(result.event).toBe('result');
    expect(result.report).toBe(path.join(tmp.dir, 'json', 'report.html'));
    expect(fs.existsSync(result.report as string)).toBe(true);
    expect((result.metrics as { merged: { tokens: unknown } }).merged.tokens).toEqual({ '<new1>': 'split-tile', '<new2>': 'split-disc' });
  });

  it('exits 2 on usage errors', () => {
    const file = path.join(tmp.dir, 'a-file');
    fs.writeFileSync(file, 'x');
    for (const args of [
      ['--steps', '-1'],
      ['--steps', 'many'],
      ['--seed', '1.5'],
      ['--learning-rate', '0'],
      ['--no-such-option'],
      ['-o', file],
      ['-o', 'human'], // not empty, no --overwrite
    ]) {
      const r = cli(['demo', '-m', model, ...args], tmp.dir);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
      expect(r.stderr).not.toBe('');
    }
    const r = cli(['demo', '-m', model, '-o', 'human'], tmp.dir);
    expect(r.stderr).toMatch(/--overwrite/);
  });

  it('exits 1 with a clear message when the model is missing', () => {
    const r = cli(['demo', '-m', path.join(tmp.dir, 'no-model'), '-o', 'missing'], tmp.dir);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/not found at .*no-model.*npm run pretrain:toy/s);
    const j = cli(['demo', '-m', path.join(tmp.dir, 'no-model'), '-o', 'missing', '--json'], tmp.dir);
    expect(j.code).toBe(1);
    expect(events(j.stdout).at(-1)).toMatchObject({ event: 'error', code: 'FILE' });
  });

  it('stops on Ctrl-C during training with exit code 130', async () => {
    let sent = false;
    const r = await cliAsync(['demo', '-m', model, '-o', 'interrupted', '--json', ...TINY_ARGS, '--steps', '100000'], tmp.dir, (line, child) => {
      const e = JSON.parse(line) as { event: string; stage?: string };
      if (!sent && e.event === 'progress' && e.stage === 'train-1') {
        sent = true;
        child.kill('SIGINT');
      }
    });
    expect(sent).toBe(true);
    expect(r.code).toBe(130);
  });
});
