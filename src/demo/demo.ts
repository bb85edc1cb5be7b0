/**
 * The Custom Diffusion demo on the embedded toy model (`customdiff demo`, {@link runDemo}):
 *
 * 1. renders 8 pictures of a concept the toy world never shows (the split tile: a square red on its
 *    top half and yellow on its bottom half) captioned "a <new1> tile on a … background", and generates
 *    class images with the base model from captions of the world it has seen (prior preservation);
 * 2. draws the base model's pictures for the concept prompts and for plain world prompts;
 * 3. trains a `<new1>` delta (K/V of the cross-attentions plus the token) with prior preservation;
 * 4. draws the same prompts with the same seeds with the delta: "a <new1> tile on a green
 *    background" now shows the tile on green, and the plain prompts still draw what they drew;
 * 5. compresses the delta (the paper's SVD rule at ratio 0.6) and draws again;
 * 6. trains a second concept (the split disc, "a <new1> badge": a disc white on its left half and
 *    blue on its right) the same way and merges both deltas in closed form into one with `<new1>`
 *    (tile) and `<new2>` (badge), and draws with it;
 * 7. scores every picture with the toy world's judge and writes an HTML report (grids, loss curves,
 *    metrics), the grids as PNG files and the metrics as JSON.
 *
 * The same run with larger sample counts is the project's quality benchmark (bench/quality.js).
 *
 * @packageDocumentation
 */
import * as fs from 'fs';
import * as path from 'path';
import { AbortError, FileError, InvalidArgumentError } from '../errors';
import { getNumThreads, setNumThreads } from '../core/runtime';
import { StableDiffusion } from '../model/pipeline';
import type { Delta } from '../delta/file';
import { readDelta } from '../delta/file';
import { compressDelta } from '../delta/compress';
import { composeDeltas } from '../delta/compose';
import { makeGrid, saveImage } from '../sample/images';
import type { RgbImage } from '../train/images';
import { train } from '../train/trainer';
import { detectEmblem, judgeToyImage, scoreToyImage } from '../toy/judge';
import {
  TOY_EMBLEMS,
  TOY_SIZES,
  emblemBackgrounds,
  emblemCaption,
  renderEmblem,
  sampleEmblemImages,
  toyCaption,
  toyCombos,
  type ToyColour,
  type ToyEmblemName,
} from '../toy/world';
import { renderReportHtml, upscaleImage, type ReportFigure, type ReportTable } from './report';

// ---------------------------------------------------------------------------------------------
// The model

/** The repository (or installed package) root: lib/demo and src/demo both sit two levels below it. */
const PACKAGE_ROOT = path.resolve(__dirname, '..', '..');

/** Where the embedded demo model lives, and where `npm run pretrain:toy` writes it: `<package>/models/toy`. */
export const DEMO_MODEL_DIR = path.join(PACKAGE_ROOT, 'models', 'toy');

const isModelFolder = (dir: string): boolean => fs.existsSync(path.join(dir, 'model_index.json'));

/**
 * The demo's model folder: `model` when given, else the embedded one ({@link DEMO_MODEL_DIR}). Throws
 * a FileError that says how to make the model when the folder (or its model_index.json) is missing.
 */
export function resolveDemoModel(model?: string): string {
  const dir = path.resolve(model ?? DEMO_MODEL_DIR);
  if (!isModelFolder(dir)) {
    const what = model === undefined ? 'The embedded demo model' : 'The demo model';
    throw new FileError(
      `${what} was not found at ${dir} (no model_index.json there). ` +
        `Make it with "npm run pretrain:toy -- --out ${dir}" (scripts/pretrain-toy.js; add --smoke for a quick, poor one), ` +
        'or pass --model with a toy-world diffusers folder.',
      dir,
    );
  }
  return dir;
}

// ---------------------------------------------------------------------------------------------
// Options, events, results

/**
 * The two concepts of the demo, in training order: the split tile ("a <new1> tile", a square red on
 * top and yellow below) first, as the one the embedded model learns best (70 of 100 pictures with
 * the demo's settings, against 26 for the badge); the split disc ("a <new1> badge", a disc white on
 * its left and blue on its right) second. Both come through the embedded model's autoencoder intact
 * (99 and 100 of 100 pictures), which finer layouts did not: a star inside a ring survived in 17.
 */
export const DEMO_CONCEPTS: readonly ToyEmblemName[] = ['split-tile', 'split-disc'];

/** "a <token> badge" (or tile) for an emblem. */
const phrase = (emblem: ToyEmblemName, token = '<new1>'): string => `a ${token} ${TOY_EMBLEMS[emblem].noun}`;

export interface DemoOptions {
  /** A toy-world diffusers folder (default: the embedded {@link DEMO_MODEL_DIR}). */
  model?: string;
  /** Where everything goes (created). */
  outDir: string;
  /** Replace the demo's earlier outputs in `outDir` (default false: a non-empty folder is an error). */
  overwrite?: boolean;
  /** Optimizer steps per concept (default 800: the embedded model then draws the tile in 70 of 100 pictures, 78 with the delta compressed). */
  steps?: number;
  /** Learning rate of the K/V weights (default 1e-3, not scaled; the token has {@link DemoOptions.tokenLearningRate}). */
  learningRate?: number;
  /**
   * Learning rate of the token rows (default 1e-2, ten times `learningRate`'s default: the concept
   * then lives more in the token's own rows and less in the K/V weights, which on this small model
   * drew the tile in 70 of 100 pictures instead of 47 and kept the merged model's plain prompts
   * right in 77% instead of 49%).
   */
  tokenLearningRate?: number;
  /** Instance examples per step (default 4; as many class examples join them). */
  batchSize?: number;
  /** Everything random follows from it (default 0). */
  seed?: number;
  /** Training pictures per concept (default 8). */
  instanceImages?: number;
  /** Class images generated by the base model for prior preservation (default 64). */
  classImages?: number;
  /** Seeds per background for the concept prompts (default 3; 4 backgrounds each). */
  evalSeeds?: number;
  /** Plain world prompts for prior preservation (default 12). */
  plainImages?: number;
  /** Denoising steps (default 25, the model's own scheduler: DDIM with trailing spacing). */
  sampleSteps?: number;
  /** Classifier-free guidance (default 4.5). */
  guidanceScale?: number;
  /** Pictures per generation call (default 16). */
  batchImages?: number;
  /** LibTorch threads during the run (restored after; default: unchanged). */
  threads?: number;
  signal?: AbortSignal;
  onProgress?: (event: DemoEvent) => void;
}

/** The demo's stages, in order. */
export const DEMO_STAGES = [
  'load',
  'data',
  'class-images',
  'base',
  'train-1',
  'evaluate-1',
  'compress',
  'train-2',
  'merge',
  'report',
] as const;
export type DemoStage = (typeof DEMO_STAGES)[number];

/** Progress of a demo run. */
export type DemoEvent =
  | { type: 'stage'; stage: DemoStage; index: number; stages: number; title: string; total: number; unit: string }
  | { type: 'progress'; stage: DemoStage; done: number; total: number; loss?: number }
  | { type: 'stage-end'; stage: DemoStage; seconds: number };

/** Judge results on concept prompts ("a <token> badge on a green background"). */
export interface ConceptScores {
  /** The concept (emblem) the prompts ask for. */
  emblem: ToyEmblemName;
  images: number;
  /** Share of pictures where the judge finds the emblem (concept fidelity). */
  emblem_rate: number;
  /** Share with the asked background (the context follows the prompt: text alignment). */
  background_rate: number;
  /** Share with both: the concept in the asked context. */
  in_context_rate: number;
  /** Mean share of the emblem detector's checks passed (a softer fidelity score). */
  mean_emblem_score: number;
}

/** Judge results on plain world prompts ("a small red circle on a blue background"). */
export interface PlainScores {
  images: number;
  /** Colour, background and shape all as asked (the pretraining's quality bar). */
  accuracy: number;
  colour: number;
  background: number;
  shape: number;
  /** Share of pictures whose verdict (right or wrong) matches the base model's for the same seed. */
  same_verdict_rate?: number;
  /** Mean absolute pixel difference from the base model's picture for the same seed (0-255). */
  mean_pixel_change?: number;
}

export interface DemoMetrics {
  /** The uncustomised model. */
  base: { concept1: ConceptScores; concept2: ConceptScores; plain: PlainScores };
  /** The first concept's delta (`<new1>` tile: the split tile). */
  delta1: { concept: ConceptScores; plain: PlainScores };
  /** The same delta compressed at ratio 0.6. */
  compressed1: { concept: ConceptScores; plain: PlainScores; ratio: number; meanRank: number; bytes: number; fullBytes: number };
  /** The second concept's delta (`<new1>` badge: the split disc). */
  delta2: { concept: ConceptScores; plain: PlainScores };
  /** Both merged: `<new1>` tile and `<new2>` badge. */
  merged: { concept1: ConceptScores; concept2: ConceptScores; plain: PlainScores; tokens: Record<string, string> };
  training: { concept1: TrainingSummary; concept2: TrainingSummary };
  /** Seconds per stage and in all. */
  seconds: Record<string, number>;
  settings: Record<string, unknown>;
}

export interface TrainingSummary {
  steps: number;
  /** Mean loss over the first and the last tenth of the steps. */
  first_loss: number;
  last_loss: number;
  seconds: number;
}

export interface DemoResult {
  outDir: string;
  reportPath: string;
  metricsPath: string;
  metrics: DemoMetrics;
  /** Files written, by role. */
  files: Record<string, string>;
  seconds: number;
}

// ---------------------------------------------------------------------------------------------
// Helpers

function positiveInt(v: number | undefined, what: string, fallback: number, min = 1): number {
  const x = v ?? fallback;
  if (!Number.isInteger(x) || x < min) throw new InvalidArgumentError(`${what} must be an integer ≥ ${min}, got ${x}`);
  return x;
}

function positiveNumber(v: number | undefined, what: string, fallback: number): number {
  const x = v ?? fallback;
  if (typeof x !== 'number' || !Number.isFinite(x) || x <= 0) throw new InvalidArgumentError(`${what} must be a positive number, got ${x}`);
  return x;
}

const mean = (a: readonly number[]): number => (a.length ? a.reduce((s, x) => s + x, 0) / a.length : NaN);
const share = (a: readonly boolean[]): number => (a.length ? a.filter(Boolean).length / a.length : NaN);

/** The demo's own outputs inside `outDir` (what --overwrite replaces; nothing else is touched). */
const OWN_ENTRIES = ['data', 'train', 'deltas', 'grids', 'report.html', 'metrics.json'];

function prepareOutDir(outDir: string, overwrite: boolean): void {
  if (fs.existsSync(outDir)) {
    if (!fs.statSync(outDir).isDirectory()) throw new InvalidArgumentError(`The output folder ${outDir} is a file; choose another folder`);
    const entries = fs.readdirSync(outDir);
    if (entries.length > 0) {
      if (!overwrite) {
        throw new InvalidArgumentError(`The output folder ${outDir} is not empty; pass --overwrite (overwrite: true) to replace an earlier demo there, or choose another folder`);
      }
      for (const e of OWN_ENTRIES) fs.rmSync(path.join(outDir, e), { recursive: true, force: true });
    }
  }
  fs.mkdirSync(outDir, { recursive: true });
}

/** Nearest-neighbour ×2: the trainer reads pictures of at least 64 px; at 32 px training they come back unchanged in content. */
function doubled(img: RgbImage): RgbImage {
  return upscaleImage(img, 2);
}

/** The backgrounds an emblem's prompts use: all the world allows for it (four for both demo emblems). */
function conceptBackgrounds(emblem: ToyEmblemName): ToyColour[] {
  return emblemBackgrounds(emblem);
}

/** Concept prompts: every background × `seedsPer` seeds, row-major by background. */
function conceptPrompts(emblem: ToyEmblemName, token: string, seedsPer: number): { prompts: string[]; backgrounds: ToyColour[] } {
  const prompts: string[] = [];
  const backgrounds: ToyColour[] = [];
  for (const b of conceptBackgrounds(emblem)) {
    for (let k = 0; k < seedsPer; k++) {
      prompts.push(emblemCaption({ emblem, background: b }, token));
      backgrounds.push(b);
    }
  }
  return { prompts, backgrounds };
}

/** Plain world captions spread evenly over the seen combinations, sizes alternating. */
export function plainPrompts(n: number, offset = 0): string[] {
  const combos = toyCombos('seen');
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const [shape, colour, background] = combos[(Math.floor((i * combos.length) / n) + offset) % combos.length];
    out.push(toyCaption({ shape, colour, background, size: TOY_SIZES[i % 2] }));
  }
  return out;
}

function scoreConcept(images: readonly RgbImage[], emblem: ToyEmblemName, backgrounds: readonly ToyColour[]): ConceptScores {
  const det = images.map((im) => detectEmblem(im, emblem));
  const bg = images.map((im, i) => judgeToyImage(im).background.name === backgrounds[i]);
  return {
    emblem,
    images: images.length,
    emblem_rate: share(det.map((d) => d.present)),
    background_rate: share(bg),
    in_context_rate: share(det.map((d, i) => d.present && bg[i])),
    mean_emblem_score: mean(det.map((d) => d.score)),
  };
}

function scorePlain(images: readonly RgbImage[], prompts: readonly string[], base?: readonly RgbImage[]): PlainScores {
  const s = images.map((im, i) => scoreToyImage(im, prompts[i]));
  const ok = s.map((x) => !!(x.colour && x.background && x.shape));
  const out: PlainScores = {
    images: images.length,
    accuracy: share(ok),
    colour: share(s.map((x) => !!x.colour)),
    background: share(s.map((x) => !!x.background)),
    shape: share(s.map((x) => !!x.shape)),
  };
  if (base) {
    const b = base.map((im, i) => scoreToyImage(im, prompts[i]));
    out.same_verdict_rate = share(b.map((x, i) => !!(x.colour && x.background && x.shape) === ok[i]));
    out.mean_pixel_change = mean(
      images.map((im, i) => {
        let d = 0;
        for (let k = 0; k < im.data.length; k++) d += Math.abs(im.data[k] - base[i].data[k]);
        return d / im.data.length;
      }),
    );
  }
  return out;
}

function lossEnds(losses: readonly number[]): { first: number; last: number } {
  const k = Math.max(1, Math.floor(losses.length / 10));
  return { first: mean(losses.slice(0, k)), last: mean(losses.slice(-k)) };
}

const pct = (x: number | undefined): string => (x === undefined || !Number.isFinite(x) ? '–' : `${(100 * x).toFixed(0)}%`);
const signedPts = (x: number): string => (Number.isFinite(x) ? `${x >= 0 ? '+' : '−'}${Math.abs(100 * x).toFixed(0)} pts` : '–');

// ---------------------------------------------------------------------------------------------
// The run

/** Runs the demo (see the module comment) and returns where its report is, with the metrics. */
export async function runDemo(options: DemoOptions): Promise<DemoResult> {
  if (!options || typeof options.outDir !== 'string' || options.outDir === '') throw new InvalidArgumentError('runDemo needs outDir');
  const t0 = Date.now();
  const steps = positiveInt(options.steps, 'steps', 800, 0);
  const learningRate = positiveNumber(options.learningRate, 'learningRate', 1e-3);
  const tokenLearningRate = positiveNumber(options.tokenLearningRate, 'tokenLearningRate', 1e-2);
  const batchSize = positiveInt(options.batchSize, 'batchSize', 4);
  const seed = positiveInt(options.seed, 'seed', 0, 0);
  if (seed > 1_000_000) throw new InvalidArgumentError(`seed must be at most 1000000, got ${seed}`);
  const nInstance = positiveInt(options.instanceImages, 'instanceImages', 8);
  const nClass = positiveInt(options.classImages, 'classImages', 64);
  const evalSeeds = positiveInt(options.evalSeeds, 'evalSeeds', 3);
  const nPlain = positiveInt(options.plainImages, 'plainImages', 12);
  const sampleSteps = positiveInt(options.sampleSteps, 'sampleSteps', 25);
  const guidanceScale = positiveNumber(options.guidanceScale, 'guidanceScale', 4.5);
  const batchImages = positiveInt(options.batchImages, 'batchImages', 16);
  const threads = options.threads === undefined ? undefined : positiveInt(options.threads, 'threads', 1);
  const model = resolveDemoModel(options.model);
  const outDir = path.resolve(options.outDir);
  prepareOutDir(outDir, !!options.overwrite);
  const signal = options.signal;
  const emit = options.onProgress ?? (() => {});
  const checkAbort = () => {
    if (signal?.aborted) throw new AbortError('The demo was stopped.');
  };

  const seconds: Record<string, number> = {};
  let stageStart = 0;
  let current: DemoStage = 'load';
  const TITLES: Record<DemoStage, string> = {
    load: 'Loading the model',
    data: 'Drawing the training pictures of both concepts',
    'class-images': 'Generating class images for prior preservation',
    base: 'Drawing with the base model',
    'train-1': `Training <new1> (${DEMO_CONCEPTS[0]} ${TOY_EMBLEMS[DEMO_CONCEPTS[0]].noun})`,
    'evaluate-1': 'Drawing with the <new1> delta',
    compress: 'Compressing the delta (ratio 0.6) and drawing with it',
    'train-2': `Training the second concept (${DEMO_CONCEPTS[1]} ${TOY_EMBLEMS[DEMO_CONCEPTS[1]].noun})`,
    merge: 'Merging both concepts and drawing with the merged delta',
    report: 'Writing the report',
  };
  const begin = (stage: DemoStage, total: number, unit: string) => {
    checkAbort();
    current = stage;
    stageStart = Date.now();
    emit({ type: 'stage', stage, index: DEMO_STAGES.indexOf(stage) + 1, stages: DEMO_STAGES.length, title: TITLES[stage], total, unit });
  };
  const end = () => {
    const s = (Date.now() - stageStart) / 1000;
    seconds[current] = s;
    emit({ type: 'stage-end', stage: current, seconds: s });
  };

  const files: Record<string, string> = {};
  const dirs = {
    data: path.join(outDir, 'data'),
    train: path.join(outDir, 'train'),
    deltas: path.join(outDir, 'deltas'),
    grids: path.join(outDir, 'grids'),
  };
  for (const d of Object.values(dirs)) fs.mkdirSync(d, { recursive: true });

  const threadsBefore = threads !== undefined ? getNumThreads() : undefined;
  if (threads !== undefined) setNumThreads(threads);
  let sd: StableDiffusion | undefined;
  const deltas: Delta[] = [];
  try {
    // ---- 1. The model.
    begin('load', 1, 'model');
    sd = await StableDiffusion.load(model);
    const base = sd;
    emit({ type: 'progress', stage: 'load', done: 1, total: 1 });
    end();

    /** Draws prompts with fixed seeds in chunks, reporting pictures done. */
    let done = 0;
    let planned = 0;
    const draw = async (prompts: string[], seeds: number[], ds: Delta[] = []): Promise<RgbImage[]> => {
      const out: RgbImage[] = [];
      for (let i = 0; i < prompts.length; i += batchImages) {
        checkAbort();
        const r = await base.generate({
          prompt: prompts.slice(i, i + batchImages),
          seed: seeds.slice(i, i + batchImages),
          steps: sampleSteps,
          guidanceScale,
          deltas: ds,
          signal,
        });
        out.push(...r.images);
        done += r.images.length;
        emit({ type: 'progress', stage: current, done, total: planned });
      }
      return out;
    };
    const plan = (n: number) => {
      done = 0;
      planned = n;
    };

    // ---- 2. Training pictures.
    begin('data', DEMO_CONCEPTS.length * nInstance, 'image');
    const instance: Record<string, { dir: string; captions: string; samples: ReturnType<typeof sampleEmblemImages> }> = {};
    let written = 0;
    for (const [k, emblem] of DEMO_CONCEPTS.entries()) {
      const dir = path.join(dirs.data, emblem);
      fs.mkdirSync(dir, { recursive: true });
      const samples = sampleEmblemImages(emblem, { n: nInstance, seed: seed * 10 + 1 + k, token: '<new1>' });
      const captions: Record<string, string> = {};
      for (const s of samples) {
        const name = `${s.index}.png`;
        // Rendered at 64 px (the trainer's minimum picture size); training at 32 px shrinks it back.
        await saveImage(renderEmblem(s.spec, { resolution: 64 }), path.join(dir, name), { overwrite: true });
        captions[name] = s.caption;
        emit({ type: 'progress', stage: 'data', done: ++written, total: DEMO_CONCEPTS.length * nInstance });
      }
      const captionsFile = path.join(dirs.data, `${emblem}-captions.json`);
      fs.writeFileSync(captionsFile, JSON.stringify(captions, null, 2) + '\n');
      instance[emblem] = { dir, captions: captionsFile, samples };
    }
    files.instance1 = instance[DEMO_CONCEPTS[0]].dir;
    files.instance2 = instance[DEMO_CONCEPTS[1]].dir;
    end();

    // ---- 3. Class images: what the base model draws for captions of the world it has seen.
    begin('class-images', nClass, 'image');
    plan(nClass);
    const classDir = path.join(dirs.data, 'class');
    fs.mkdirSync(path.join(classDir, 'images'), { recursive: true });
    const classCaptions = plainPrompts(nClass, 1);
    const classImages = await draw(
      classCaptions,
      classCaptions.map((_, i) => seed * 100_000 + 50_000 + i),
    );
    const classFiles: string[] = [];
    for (const [i, img] of classImages.entries()) {
      const f = path.join(classDir, 'images', `${i}.png`);
      await saveImage(doubled(img), f, { overwrite: true });
      classFiles.push(f);
    }
    // The base model learnt classifier-free guidance from 10% empty captions, and every guided step
    // mixes in its unconditional prediction (×(1 − guidance)): left alone, K/V fine-tuning drifts it
    // and guidance amplifies the drift into every prompt. So the first half of the class images are
    // listed once more with an empty caption: prior preservation keeps the unconditional prediction too.
    const nEmpty = Math.ceil(nClass / 2);
    const listed = [...classFiles, ...classFiles.slice(0, nEmpty)];
    const listedCaptions = [...classCaptions, ...classFiles.slice(0, nEmpty).map(() => '')];
    fs.writeFileSync(path.join(classDir, 'images.txt'), listed.map((f) => f + '\n').join(''));
    fs.writeFileSync(path.join(classDir, 'caption.txt'), listedCaptions.map((c) => c + '\n').join(''));
    files.classImages = classDir;
    end();

    // ---- 4. The base model on every prompt set.
    const c1 = conceptPrompts(DEMO_CONCEPTS[0], '<new1>', evalSeeds);
    const c2 = conceptPrompts(DEMO_CONCEPTS[1], '<new1>', evalSeeds);
    const c2merged = conceptPrompts(DEMO_CONCEPTS[1], '<new2>', evalSeeds);
    const conceptSeeds = c1.prompts.map((_, i) => seed * 100_000 + 10_000 + i);
    const plain = plainPrompts(nPlain);
    const plainSeeds = plain.map((_, i) => seed * 100_000 + 20_000 + i);
    begin('base', c1.prompts.length + c2.prompts.length + plain.length, 'image');
    plan(c1.prompts.length + c2.prompts.length + plain.length);
    const baseC1 = await draw(c1.prompts, conceptSeeds);
    const baseC2 = await draw(c2.prompts, conceptSeeds);
    const basePlain = await draw(plain, plainSeeds);
    end();

    // ---- 5. Training.
    const trainConcept = async (k: number, stage: DemoStage) => {
      const emblem = DEMO_CONCEPTS[k];
      begin(stage, steps, 'step');
      const started = Date.now();
      const run = train({
        pretrainedModel: model,
        concepts: [
          {
            instancePrompt: phrase(emblem),
            instanceDataDir: instance[emblem].dir,
            instanceCaptionsFile: instance[emblem].captions,
            classDataDir: classDir,
          },
        ],
        withPriorPreservation: true,
        numClassImages: nClass + Math.ceil(nClass / 2),
        resolution: 32,
        // No flips: the split disc is white on its left half; the world's own variety of sizes
        // and places replaces the scale augmentation (which would add "zoomed in" / "very small",
        // words the toy model never learnt).
        augment: { hflip: false, noaug: true },
        modifierTokens: ['<new1>'],
        learningRate,
        tokenLearningRate,
        scaleLr: false,
        maxTrainSteps: steps,
        trainBatchSize: batchSize,
        seed: seed * 10 + 7 + k,
        outputDir: path.join(dirs.train, emblem),
        signal,
      });
      run.on('step', (e) => emit({ type: 'progress', stage, done: e.step, total: steps, loss: e.loss }));
      const r = await run.result;
      for (const t of Object.values(r.trained)) t.dispose();
      end();
      const ends = lossEnds(r.losses);
      const summary: TrainingSummary = { steps: r.steps, first_loss: ends.first, last_loss: ends.last, seconds: (Date.now() - started) / 1000 };
      return { deltaPath: r.deltaPath!, losses: r.losses, summary };
    };
    const t1 = await trainConcept(0, 'train-1');
    files.delta1 = t1.deltaPath;
    const delta1 = await readDelta(t1.deltaPath);
    deltas.push(delta1);

    begin('evaluate-1', c1.prompts.length + plain.length, 'image');
    plan(c1.prompts.length + plain.length);
    const d1C1 = await draw(c1.prompts, conceptSeeds, [delta1]);
    const d1Plain = await draw(plain, plainSeeds, [delta1]);
    end();

    // ---- 6. Compression.
    begin('compress', c1.prompts.length + plain.length, 'image');
    plan(c1.prompts.length + plain.length);
    const compressedPath = path.join(dirs.deltas, `${DEMO_CONCEPTS[0]}-compressed.safetensors`);
    const comp = await compressDelta({ delta: delta1, baseModel: model, ratio: 0.6, output: compressedPath, signal });
    deltas.push(comp.delta);
    files.compressed1 = compressedPath;
    const ranks = Object.values(comp.layers).map((l) => l.rank);
    const cC1 = await draw(c1.prompts, conceptSeeds, [comp.delta]);
    const cPlain = await draw(plain, plainSeeds, [comp.delta]);
    end();

    // ---- 7. The second concept and the merge.
    const t2 = await trainConcept(1, 'train-2');
    files.delta2 = t2.deltaPath;
    const delta2 = await readDelta(t2.deltaPath);
    deltas.push(delta2);

    begin('merge', c2.prompts.length + 2 * c1.prompts.length + plain.length + plain.length, 'image');
    plan(c2.prompts.length + 2 * c1.prompts.length + plain.length + plain.length);
    const d2C2 = await draw(c2.prompts, conceptSeeds, [delta2]);
    const d2Plain = await draw(plain, plainSeeds, [delta2]);
    const mergedPath = path.join(dirs.deltas, 'merged.safetensors');
    // Regularisation captions from the world the model knows (the shipped list is about photos).
    const regCaptions = toyCombos('seen').flatMap(([shape, colour, background]) => TOY_SIZES.map((size) => toyCaption({ shape, colour, background, size })));
    const merged = await composeDeltas({
      deltas: [delta1, delta2],
      categories: DEMO_CONCEPTS.map((e) => TOY_EMBLEMS[e].noun),
      baseModel: model,
      regularizationCaptions: regCaptions,
      output: mergedPath,
      signal,
    });
    deltas.push(merged.delta);
    files.merged = mergedPath;
    const tokenOf = merged.concepts.map((c) => c.token ?? '');
    const m1 = conceptPrompts(DEMO_CONCEPTS[0], tokenOf[0], evalSeeds);
    const m2 = tokenOf[1] === '<new2>' ? c2merged : conceptPrompts(DEMO_CONCEPTS[1], tokenOf[1], evalSeeds);
    const mC1 = await draw(m1.prompts, conceptSeeds, [merged.delta]);
    const mC2 = await draw(m2.prompts, conceptSeeds, [merged.delta]);
    const mPlain = await draw(plain, plainSeeds, [merged.delta]);
    end();

    // ---- 8. Scores and the report.
    begin('report', 1, 'file');
    const [e1, e2] = DEMO_CONCEPTS;
    const fullBytes = fs.statSync(t1.deltaPath).size;
    const metrics: DemoMetrics = {
      base: { concept1: scoreConcept(baseC1, e1, c1.backgrounds), concept2: scoreConcept(baseC2, e2, c2.backgrounds), plain: scorePlain(basePlain, plain) },
      delta1: { concept: scoreConcept(d1C1, e1, c1.backgrounds), plain: scorePlain(d1Plain, plain, basePlain) },
      compressed1: {
        concept: scoreConcept(cC1, e1, c1.backgrounds),
        plain: scorePlain(cPlain, plain, basePlain),
        ratio: 0.6,
        meanRank: mean(ranks),
        bytes: fs.statSync(compressedPath).size,
        fullBytes,
      },
      delta2: { concept: scoreConcept(d2C2, e2, c2.backgrounds), plain: scorePlain(d2Plain, plain, basePlain) },
      merged: {
        concept1: scoreConcept(mC1, e1, m1.backgrounds),
        concept2: scoreConcept(mC2, e2, m2.backgrounds),
        plain: scorePlain(mPlain, plain, basePlain),
        tokens: Object.fromEntries(DEMO_CONCEPTS.map((e, i) => [tokenOf[i], e])),
      },
      training: { concept1: t1.summary, concept2: t2.summary },
      seconds,
      settings: {
        model,
        steps,
        learningRate,
        tokenLearningRate,
        batchSize,
        seed,
        instanceImages: nInstance,
        classImages: nClass,
        evalSeeds,
        plainImages: nPlain,
        sampleSteps,
        guidanceScale,
        resolution: 32,
        threads: getNumThreads(),
      },
    };

    // Grids: rows are the backgrounds (concept prompts) or prompts (plain), columns the seeds.
    const cols = evalSeeds;
    const rowLabels = (bgs: ToyColour[]) => bgs.filter((_, i) => i % cols === 0).map((b) => `on ${b}`);
    const grid = (imgs: RgbImage[], columns: number) => makeGrid(imgs, { columns, gap: 1 });
    const plainCols = Math.min(nPlain, 6);
    const gridFiles: Record<string, RgbImage> = {
      'instance-concept1': grid(instance[e1].samples.map((s) => s.image), Math.min(nInstance, 8)),
      'instance-concept2': grid(instance[e2].samples.map((s) => s.image), Math.min(nInstance, 8)),
      'class-images': grid(classImages, Math.min(nClass, 8)),
      'concept1-base': grid(baseC1, cols),
      'concept1-delta': grid(d1C1, cols),
      'concept1-compressed': grid(cC1, cols),
      'concept1-merged': grid(mC1, cols),
      'concept2-base': grid(baseC2, cols),
      'concept2-delta': grid(d2C2, cols),
      'concept2-merged': grid(mC2, cols),
      'plain-base': grid(basePlain, plainCols),
      'plain-delta1': grid(d1Plain, plainCols),
      'plain-compressed1': grid(cPlain, plainCols),
      'plain-delta2': grid(d2Plain, plainCols),
      'plain-merged': grid(mPlain, plainCols),
    };
    for (const [name, img] of Object.entries(gridFiles)) {
      const f = path.join(dirs.grids, `${name}.png`);
      await saveImage(upscaleImage(img, 4), f, { overwrite: true });
    }
    files.grids = dirs.grids;

    const m = metrics;
    const conceptRow = (label: string, s: ConceptScores, b: ConceptScores): string[] => [
      label,
      pct(s.emblem_rate),
      signedPts(s.emblem_rate - b.emblem_rate),
      pct(s.background_rate),
      pct(s.in_context_rate),
      s.mean_emblem_score.toFixed(2),
    ];
    const plainRow = (label: string, s: PlainScores, b: PlainScores): string[] => [
      label,
      pct(s.accuracy),
      signedPts(s.accuracy - b.accuracy),
      s.same_verdict_rate === undefined ? '–' : pct(s.same_verdict_rate),
      s.mean_pixel_change === undefined ? '–' : s.mean_pixel_change.toFixed(1),
    ];
    const tables: ReportTable[] = [
      {
        title: 'Concept fidelity and text alignment',
        text:
          `Each concept prompt ("${phrase(e1)} on a green background") is drawn with the same seeds by the uncustomised model and by each ` +
          'customised one; the toy judge checks whether the emblem is there (fidelity) and whether the background is the one asked for ' +
          '(the context follows the prompt).',
        header: ['model / prompts', 'emblem found', 'vs base', 'background as asked', 'both', 'mean detector score'],
        rows: [
          conceptRow(`base: "${phrase(e1)} …" (${e1})`, m.base.concept1, m.base.concept1),
          conceptRow(`<new1> delta (${e1})`, m.delta1.concept, m.base.concept1),
          conceptRow(`compressed delta, ratio 0.6 (${e1})`, m.compressed1.concept, m.base.concept1),
          conceptRow(`merged: "${phrase(e1, tokenOf[0])}" (${e1})`, m.merged.concept1, m.base.concept1),
          conceptRow(`base: "${phrase(e2)} …" (${e2})`, m.base.concept2, m.base.concept2),
          conceptRow(`second delta (${e2})`, m.delta2.concept, m.base.concept2),
          conceptRow(`merged: "${phrase(e2, tokenOf[1])}" (${e2})`, m.merged.concept2, m.base.concept2),
        ],
        notes: [`${m.base.concept1.images} pictures per row (${conceptBackgrounds(e1).length} backgrounds × ${evalSeeds} seeds).`],
      },
      {
        title: 'Prior preservation',
        text:
          'Plain prompts of the world ("a small red circle on a blue background") with the same seeds: colour, background and shape must ' +
          'follow the prompt as they did before customisation.',
        header: ['model', 'colour+background+shape', 'vs base', 'same verdict as base', 'mean pixel change (0-255)'],
        rows: [
          plainRow('base', m.base.plain, m.base.plain),
          plainRow('<new1> delta', m.delta1.plain, m.base.plain),
          plainRow('compressed delta', m.compressed1.plain, m.base.plain),
          plainRow('second delta', m.delta2.plain, m.base.plain),
          plainRow('merged delta', m.merged.plain, m.base.plain),
        ],
        notes: [`${nPlain} prompts spread over the world's seen combinations.`],
      },
      {
        title: 'Deltas',
        header: ['delta', 'file size', 'notes'],
        rows: [
          [`<new1> (${e1})`, `${(fullBytes / 1024).toFixed(0)} KiB`, `${t1.summary.steps} steps, loss ${t1.summary.first_loss.toFixed(3)} → ${t1.summary.last_loss.toFixed(3)}`],
          [`compressed (ratio 0.6)`, `${(m.compressed1.bytes / 1024).toFixed(0)} KiB`, `mean rank ${m.compressed1.meanRank.toFixed(1)} over ${ranks.length} layers`],
          [`<new1> (${e2})`, `${(fs.statSync(t2.deltaPath).size / 1024).toFixed(0)} KiB`, `${t2.summary.steps} steps, loss ${t2.summary.first_loss.toFixed(3)} → ${t2.summary.last_loss.toFixed(3)}`],
          ['merged', `${(fs.statSync(mergedPath).size / 1024).toFixed(0)} KiB`, merged.concepts.map((c) => `${c.token} = ${c.category} (was ${c.sourceToken})`).join(', ')],
        ],
      },
    ];
    const figure = (title: string, text: string, grids: { title: string; image: RgbImage; rowLabels?: string[] }[]): ReportFigure => ({ title, text, grids });
    const html = await renderReportHtml({
      title: 'Custom Diffusion demo: teaching a tiny model two new emblems',
      intro: [
        `The model (${path.basename(model)}) was trained from scratch on a world of single shapes (circle, square, triangle) in six colours on ` +
          'a plain background. It has never seen an object with two colours. Custom Diffusion teaches it one from ' +
          `${nInstance} pictures: only the key/value projections of its cross-attention layers and a new token <new1> are trained, ` +
          'with class images from the model itself keeping what it already knows (prior preservation).',
        `Every grid below is drawn with the same seeds, ${sampleSteps} denoising steps, guidance ${guidanceScale}; pictures are 32×32, enlarged.`,
      ],
      figures: [
        figure('The new concepts', `Training pictures: ${TOY_EMBLEMS[e1].description} ("${phrase(e1)} on a … background") and ${TOY_EMBLEMS[e2].description} ("${phrase(e2)} …"). Then class images the base model drew for prior preservation.`, [
          { title: `${e1}: "${phrase(e1)}"`, image: gridFiles['instance-concept1'] },
          { title: `${e2}: "${phrase(e2)}"`, image: gridFiles['instance-concept2'] },
          { title: 'class images (base model)', image: gridFiles['class-images'] },
        ]),
        figure(`"${phrase(e1)} on a … background": before and after`, 'Rows ask for different backgrounds; the concept should appear in the asked context.', [
          { title: 'base model', image: gridFiles['concept1-base'], rowLabels: rowLabels(c1.backgrounds) },
          { title: 'with the <new1> delta', image: gridFiles['concept1-delta'], rowLabels: rowLabels(c1.backgrounds) },
          { title: 'compressed delta (ratio 0.6)', image: gridFiles['concept1-compressed'], rowLabels: rowLabels(c1.backgrounds) },
          { title: `merged delta (${tokenOf[0]})`, image: gridFiles['concept1-merged'], rowLabels: rowLabels(m1.backgrounds) },
        ]),
        figure('Prior preservation: plain prompts, same seeds', plain.map((p, i) => `${i + 1}. ${p}`).join('  '), [
          { title: 'base model', image: gridFiles['plain-base'] },
          { title: 'with the <new1> delta', image: gridFiles['plain-delta1'] },
          { title: 'with the merged delta', image: gridFiles['plain-merged'] },
        ]),
        figure(
          'The second concept and the merged model',
          `The ${e2} was trained alone as "${phrase(e2)}"; the merge renames its token ${tokenOf[1]}. ` +
            `With the merged delta, plain prompts are drawn right in ${pct(m.merged.plain.accuracy)} of pictures ` +
            `(${pct(m.base.plain.accuracy)} with the base model). The closed-form merge holds the plain captions' keys and values ` +
            'only on the rows it regularises (each caption up to its end token), while the UNet also reads the start and padding ' +
            'rows; and it keeps each concept\'s keys and values only on its target rows, while on this small model a delta also ' +
            'relies on the rows after its token, which the merge holds to the base model (the README\'s section on the embedded ' +
            'model has the measurements).',
          [
          { title: `base model: "${phrase(e2)} …"`, image: gridFiles['concept2-base'], rowLabels: rowLabels(c2.backgrounds) },
          { title: 'its own delta', image: gridFiles['concept2-delta'], rowLabels: rowLabels(c2.backgrounds) },
          { title: `merged delta: "${phrase(e2, tokenOf[1])} …"`, image: gridFiles['concept2-merged'], rowLabels: rowLabels(m2.backgrounds) },
        ]),
      ],
      curves: {
        title: 'Training loss',
        text: 'Per optimizer step (instance and class examples together); faint: each step, solid: moving average.',
        curves: [
          { label: `<new1> ${e1}`, values: t1.losses, colour: '#c0392b' },
          { label: `<new1> ${e2}`, values: t2.losses, colour: '#2c6fbb' },
        ],
      },
      tables,
      facts: [
        ['model', model],
        ['seconds per stage', Object.entries(seconds).map(([k, v]) => `${k} ${v.toFixed(1)}`).join(', ')],
        ['seconds in all', ((Date.now() - t0) / 1000).toFixed(1)],
        ['training', `${steps} steps per concept, lr ${learningRate} (token ${tokenLearningRate}), batch ${batchSize} + ${batchSize} class examples, 32 px`],
        ['deltas', [files.delta1, files.compressed1, files.delta2, files.merged].join('  ')],
        ['grids (PNG)', dirs.grids],
      ],
    });
    const reportPath = path.join(outDir, 'report.html');
    fs.writeFileSync(reportPath, html);
    emit({ type: 'progress', stage: 'report', done: 1, total: 1 });
    end();
    seconds.total = (Date.now() - t0) / 1000;
    const metricsPath = path.join(outDir, 'metrics.json');
    fs.writeFileSync(metricsPath, JSON.stringify(metrics, null, 2) + '\n');
    files.report = reportPath;
    files.metrics = metricsPath;
    return { outDir, reportPath, metricsPath, metrics, files, seconds: seconds.total };
  } finally {
    // Deltas share tensors (the compressed and merged ones keep the token rows they came from).
    const owned = new Set(deltas.flatMap((d) => [...Object.values(d.weights), ...Object.values(d.tokenRows), ...Object.values(d.factors).flatMap((f) => [f.u, f.v])]));
    for (const t of owned) t.dispose();
    sd?.dispose();
    if (threadsBefore !== undefined) setNumThreads(threadsBefore);
  }
}
