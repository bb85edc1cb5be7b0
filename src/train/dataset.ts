/**
 * The training data of Custom Diffusion: instance images (the new concept), class images (prior
 * preservation), prompts, and batch assembly, deterministic and resumable.
 *
 * Batches follow the diffusers-based scripts (A-DF / HF-EX): the dataset length is
 * max(#class, #instance) with prior preservation (#instance without); the instance list is
 * shuffled once; every epoch visits a fresh permutation of the dataset indices; index i pairs
 * instance `order[i % #instance]` with class `i % #class`; a batch is [B instance examples, then the
 * B class examples] concatenated (pixels [2B,3,S,S], masks [2B,1,S/8,S/8] with class masks all ones,
 * 2B prompts, a flag per example). Several concepts (a concepts list) pool their instance images and,
 * separately, their class images (each concept contributing its first `num_class_images`), as the
 * original does, so the class example paired with an instance is unrelated to it.
 *
 * Randomness comes from three streams of one seed (see {@link Rng}): the one-time instance
 * shuffle, one permutation per epoch (stream derived from the epoch number), and the augmentation
 * draws (one stream, consumed in batch order). A {@link DataLoaderState} — epoch, position, batch
 * count and the augmentation stream's state — is plain JSON and restores the exact continuation.
 *
 * @packageDocumentation
 */
import { createHash } from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { DataError, InvalidArgumentError } from '../errors';
import {
  applyClassAugment,
  applyInstanceAugment,
  classResizedSize,
  drawClassAugment,
  drawInstanceAugment,
  LATENT_FACTOR,
  prepareClassImage,
  prepareInstanceImage,
  resolveAugmentOptions,
  type AugmentOptions,
  type ClassAugmentParams,
  type InstanceAugmentParams,
  type ResolvedAugmentOptions,
} from './augment';
import { DEFAULT_MIN_IMAGE_SIZE, isImageFile, loadImage, probeImage, type AlphaBackground, type RgbImage } from './images';
import { Rng, type RngState } from './rng';

// ---------------------------------------------------------------------------------------------
// Concepts

/** One concept: its instance images and prompt, and optionally its class (prior) images. */
export interface ConceptSpec {
  /** The prompt of every instance image without a caption of its own, e.g. "photo of a <new1> cat". */
  instancePrompt: string;
  /** Folder of instance images (jpg, jpeg, png, webp). */
  instanceDataDir: string;
  /**
   * The class prompt (e.g. "cat"), used for class images without a caption. When it names an
   * existing file and `classDataDir` is an `images.txt`-style list, the file's lines are the
   * captions (the form HF-EX writes into a concepts list for real priors).
   */
  classPrompt?: string;
  /**
   * Class images: a folder of images, a folder holding `images.txt` + `caption.txt` (what
   * {@link retrieveClassImages} and the original retrieve scripts write), or an `images.txt` file.
   */
  classDataDir?: string;
  /** How many class images this concept contributes (its first N); default: the dataset option. */
  numClassImages?: number;
  /**
   * Captions for the instance images: a `.json` file mapping file names to captions, or a text file
   * with one caption per line, aligned with the sorted image list. A `<name>.txt` beside an image
   * takes precedence. A caption replaces `instancePrompt` for its image.
   */
  instanceCaptionsFile?: string;
}

const CONCEPT_KEYS = {
  instance_prompt: 'instancePrompt',
  instance_data_dir: 'instanceDataDir',
  class_prompt: 'classPrompt',
  class_data_dir: 'classDataDir',
  num_class_images: 'numClassImages',
  instance_captions_file: 'instanceCaptionsFile',
} as const;

const PATH_KEYS = new Set(['instance_data_dir', 'class_data_dir', 'instance_captions_file']);

/**
 * Parses a concepts list in the original format (A-DF/HF-EX `--concepts_list`): a JSON array of
 * objects with `instance_prompt`, `instance_data_dir`, and, for prior preservation, `class_prompt`
 * and `class_data_dir`; optionally `num_class_images` and (our addition) `instance_captions_file`.
 * Other keys (e.g. CustomConcept101's `prompt_filename`) are ignored. Relative paths are resolved
 * against `baseDir` — by default the current directory, as the original scripts do.
 * `source` names the list in errors.
 */
export function parseConceptsList(value: unknown, source = '<concepts list>', baseDir: string = process.cwd()): ConceptSpec[] {
  if (!Array.isArray(value)) throw new DataError(`The concepts list ${source} must be a JSON array of objects`, source);
  if (value.length === 0) throw new DataError(`The concepts list ${source} is empty`, source);
  return value.map((entry, i) => {
    const where = `Concept ${i} of ${source}`;
    if (entry === null || typeof entry !== 'object' || Array.isArray(entry)) {
      throw new DataError(`${where} is not an object`, source);
    }
    const e = entry as Record<string, unknown>;
    const spec: Record<string, unknown> = {};
    for (const [key, field] of Object.entries(CONCEPT_KEYS)) {
      const v = e[key];
      if (v === undefined || v === null) continue;
      if (key === 'num_class_images') {
        if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) {
          throw new DataError(`${where}: "num_class_images" must be a positive integer, got ${JSON.stringify(v)}`, source);
        }
        spec[field] = v;
        continue;
      }
      if (typeof v !== 'string' || v.trim() === '') {
        throw new DataError(`${where}: "${key}" must be a non-empty string, got ${JSON.stringify(v)}`, source);
      }
      spec[field] = PATH_KEYS.has(key) ? path.resolve(baseDir, v) : v;
    }
    for (const key of ['instance_prompt', 'instance_data_dir'] as const) {
      if (spec[CONCEPT_KEYS[key]] === undefined) throw new DataError(`${where} has no "${key}"`, source);
    }
    if (spec.classDataDir !== undefined && spec.classPrompt === undefined) {
      throw new DataError(`${where} has "class_data_dir" but no "class_prompt"`, source);
    }
    if (spec.classPrompt !== undefined && spec.classDataDir === undefined) {
      throw new DataError(`${where} has "class_prompt" but no "class_data_dir"`, source);
    }
    // A class prompt may name a captions file (HF-EX real priors); resolve it if it exists.
    if (typeof spec.classPrompt === 'string') {
      const asPath = path.resolve(baseDir, spec.classPrompt);
      if (looksLikeFile(spec.classPrompt) && fs.existsSync(asPath) && fs.statSync(asPath).isFile()) spec.classPrompt = asPath;
    }
    return spec as unknown as ConceptSpec;
  });
}

function looksLikeFile(s: string): boolean {
  return s.endsWith('.txt') && !/\s/.test(s);
}

/** Reads and parses a concepts list JSON file (see {@link parseConceptsList}). */
export async function readConceptsList(file: string, options: { baseDir?: string } = {}): Promise<ConceptSpec[]> {
  let text: string;
  try {
    text = await fs.promises.readFile(file, 'utf8');
  } catch (e) {
    throw new DataError(`Cannot read the concepts list ${file}: ${(e as Error).message}`, file, { cause: e });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new DataError(`The concepts list ${file} is not valid JSON: ${(e as Error).message}`, file, { cause: e });
  }
  return parseConceptsList(value, file, options.baseDir);
}

// ---------------------------------------------------------------------------------------------
// Listing images

/**
 * Compares names in natural order ("2.jpg" before "10.jpg"), independent of the locale: digit runs
 * compare by value, everything else by UTF-16 code unit; ties fall back to plain code-unit order.
 */
export function naturalCompare(a: string, b: string): number {
  const re = /(\d+)|(\D+)/g;
  const pa = a.match(re) ?? [];
  const pb = b.match(re) ?? [];
  for (let i = 0; i < Math.min(pa.length, pb.length); i++) {
    const x = pa[i];
    const y = pb[i];
    if (x === y) continue;
    const dx = /^\d/.test(x);
    const dy = /^\d/.test(y);
    if (dx && dy) {
      const tx = x.replace(/^0+(?=\d)/, '');
      const ty = y.replace(/^0+(?=\d)/, '');
      if (tx.length !== ty.length) return tx.length - ty.length;
      if (tx !== ty) return tx < ty ? -1 : 1;
      continue;
    }
    return x < y ? -1 : 1;
  }
  if (pa.length !== pb.length) return pa.length - pb.length;
  return a < b ? -1 : a > b ? 1 : 0;
}

function statOrNull(p: string): fs.Stats | null {
  try {
    return fs.statSync(p);
  } catch {
    return null;
  }
}

/**
 * The image files of a folder (not recursive): extensions jpg/jpeg/png/webp in any case, hidden
 * files (names starting with '.', e.g. macOS `._x.jpg`) skipped, in natural order.
 */
export function listImageFiles(dir: string, what = 'image'): string[] {
  const st = statOrNull(dir);
  if (!st) throw new DataError(`The ${what} folder ${dir} does not exist`, dir);
  if (!st.isDirectory()) throw new DataError(`The ${what} folder ${dir} is not a folder`, dir);
  const names = fs
    .readdirSync(dir)
    .filter((n) => !n.startsWith('.') && isImageFile(n))
    .filter((n) => statOrNull(path.join(dir, n))?.isFile() ?? false)
    .sort(naturalCompare);
  return names.map((n) => path.join(dir, n));
}

function readLines(file: string, what: string): string[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new DataError(`Cannot read the ${what} ${file}: ${(e as Error).message}`, file, { cause: e });
  }
  const lines = text.split(/\r?\n/);
  if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
  return lines;
}

/** One training image with its prompt. `concept` is the index of its concept in the list. */
export interface DataItem {
  file: string;
  prompt: string;
  concept: number;
  /** Size after the EXIF orientation, from the header (filled by the dataset's scan). */
  width: number;
  height: number;
}

/** The instance images of one concept, with their prompts (captions where present). */
export function listInstanceItems(spec: ConceptSpec, concept = 0): DataItem[] {
  const files = listImageFiles(spec.instanceDataDir, 'instance');
  if (files.length === 0) {
    throw new DataError(
      `The instance folder ${spec.instanceDataDir} holds no images (${['jpg', 'jpeg', 'png', 'webp'].join(', ')}, any letter case)`,
      spec.instanceDataDir,
    );
  }
  let captions: Map<string, string> | null = null;
  if (spec.instanceCaptionsFile) {
    const file = spec.instanceCaptionsFile;
    captions = new Map();
    if (file.toLowerCase().endsWith('.json')) {
      let obj: unknown;
      try {
        obj = JSON.parse(fs.readFileSync(file, 'utf8'));
      } catch (e) {
        throw new DataError(`Cannot read the captions file ${file}: ${(e as Error).message}`, file, { cause: e });
      }
      if (!obj || typeof obj !== 'object' || Array.isArray(obj)) {
        throw new DataError(`The captions file ${file} must hold a JSON object mapping file names to captions`, file);
      }
      for (const [k, v] of Object.entries(obj as Record<string, unknown>)) {
        if (typeof v !== 'string') throw new DataError(`The caption of "${k}" in ${file} is not a string`, file);
        captions.set(k, v.trim());
      }
      const names = new Set(files.map((f) => path.basename(f)));
      const unknown = [...captions.keys()].filter((k) => !names.has(k));
      if (unknown.length > 0) {
        throw new DataError(`The captions file ${file} names images that are not in ${spec.instanceDataDir}: ${unknown.slice(0, 5).join(', ')}`, file);
      }
    } else {
      const lines = readLines(file, 'captions file');
      if (lines.length !== files.length) {
        throw new DataError(
          `The captions file ${file} has ${lines.length} lines but ${spec.instanceDataDir} holds ${files.length} images; ` +
            `give one caption per image, in the images' sorted order (or use a .json object)`,
          file,
        );
      }
      files.forEach((f, i) => captions!.set(path.basename(f), lines[i].trim()));
    }
  }
  return files.map((file) => {
    const base = path.basename(file);
    const side = path.join(path.dirname(file), base.slice(0, base.length - path.extname(base).length) + '.txt');
    let prompt = spec.instancePrompt;
    if (fs.existsSync(side)) {
      const text = fs.readFileSync(side, 'utf8').trim();
      if (text !== '') prompt = text;
    } else if (captions?.has(base) && captions.get(base) !== '') {
      prompt = captions.get(base)!;
    }
    return { file, prompt, concept, width: 0, height: 0 };
  });
}

function resolveListedImage(line: string, listFile: string): string | null {
  if (path.isAbsolute(line)) return fs.existsSync(line) ? line : null;
  const dir = path.dirname(listFile);
  // The original scripts read these paths relative to the current directory; a list that moved
  // with its folder is found relative to itself, or by file name under images/.
  for (const p of [path.resolve(line), path.resolve(dir, line), path.join(dir, 'images', path.basename(line))]) {
    if (fs.existsSync(p)) return p;
  }
  return null;
}

/**
 * The class images of one concept, first `limit` of them: from a folder (constant class prompt),
 * or from an `images.txt` list with line-aligned captions (`caption.txt` beside it, or the file
 * `classPrompt` names). An empty caption falls back to the class prompt (when the concept has one).
 */
export function listClassItems(spec: ConceptSpec, concept = 0, limit = Infinity, captionsMode: 'auto' | 'prompt' = 'auto'): DataItem[] {
  const dataDir = spec.classDataDir;
  if (!dataDir) throw new DataError(`Concept ${concept} has no class_data_dir`, spec.instanceDataDir);
  const st = statOrNull(dataDir);
  if (!st) throw new DataError(`The class data ${dataDir} does not exist`, dataDir);
  let listFile: string | null = null;
  let captionFile: string | null = null;
  const promptIsFile = spec.classPrompt !== undefined && path.isAbsolute(spec.classPrompt) && statOrNull(spec.classPrompt)?.isFile();
  if (st.isFile()) {
    listFile = dataDir;
    captionFile = promptIsFile ? spec.classPrompt! : null;
    if (!captionFile && captionsMode === 'auto') {
      const beside = path.join(path.dirname(dataDir), 'caption.txt');
      if (fs.existsSync(beside)) captionFile = beside;
    }
  } else if (captionsMode === 'auto' && fs.existsSync(path.join(dataDir, 'images.txt')) && fs.existsSync(path.join(dataDir, 'caption.txt'))) {
    listFile = path.join(dataDir, 'images.txt');
    captionFile = path.join(dataDir, 'caption.txt');
  }
  const constantPrompt = spec.classPrompt !== undefined && !promptIsFile ? spec.classPrompt : undefined;
  if (listFile) {
    const lines = readLines(listFile, 'image list').filter((l) => l.trim() !== '');
    const captions = captionFile ? readLines(captionFile, 'captions file') : null;
    if (captions && captions.length < lines.length) {
      throw new DataError(`The captions file ${captionFile} has ${captions.length} lines for ${lines.length} images in ${listFile}`, captionFile!);
    }
    const n = Math.min(lines.length, limit);
    const items: DataItem[] = [];
    for (let i = 0; i < n; i++) {
      const file = resolveListedImage(lines[i].trim(), listFile);
      if (!file) throw new DataError(`The image ${lines[i].trim()} listed on line ${i + 1} of ${listFile} does not exist`, lines[i].trim());
      const caption = captions ? captions[i].trim() : undefined;
      // An empty caption falls back to the class prompt when there is one (the original would train on "").
      const prompt = caption !== undefined && (caption !== '' || constantPrompt === undefined) ? caption : constantPrompt;
      if (prompt === undefined) throw new DataError(`The class images in ${listFile} have no captions file and the concept has no class prompt`, listFile);
      items.push({ file, prompt, concept, width: 0, height: 0 });
    }
    return items;
  }
  if (constantPrompt === undefined) throw new DataError(`The class folder ${dataDir} has no captions and the concept has no class prompt`, dataDir);
  return listImageFiles(dataDir, 'class')
    .slice(0, limit)
    .map((file) => ({ file, prompt: constantPrompt, concept, width: 0, height: 0 }));
}

// ---------------------------------------------------------------------------------------------
// Dataset

export interface DatasetOptions extends AugmentOptions {
  /** The concepts (one for single-concept training). */
  concepts: ConceptSpec[];
  /** Use class images (default: true when every concept has class data). */
  withPriorPreservation?: boolean;
  /** Class images per concept unless the concept says otherwise (default 200, HF-EX and the README recipes). */
  numClassImages?: number;
  /** Refuse images whose shorter side is below this (default 64). */
  minImageSize?: number;
  /** Background for transparent pixels (default 'white'). */
  alpha?: AlphaBackground;
  /** Keep decoded instance images in memory (default true; they are few but may be large). */
  cacheInstanceImages?: boolean;
  /** Keep resized class images in memory (default true; ~0.8 MB each at 512). */
  cacheClassImages?: boolean;
  /** 'auto' (default): use `images.txt` + `caption.txt` captions when a class folder has them; 'prompt': always the class prompt. */
  classCaptions?: 'auto' | 'prompt';
  /** How many headers to read at once while scanning (default 8). */
  scanConcurrency?: number;
}

async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i], i);
    }
  });
  await Promise.all(workers);
  return out;
}

/** The images, prompts and image processing of a training run. Create with {@link TrainingDataset.open}. */
export class TrainingDataset {
  /** Instance images, in concept order then natural file order (before the run's shuffle). */
  readonly instances: readonly DataItem[];
  /** Class images (pooled over concepts, each concept's first N), empty without prior preservation. */
  readonly classes: readonly DataItem[];
  readonly withPriorPreservation: boolean;
  readonly augment: ResolvedAugmentOptions;
  /** Non-fatal findings of the scan (e.g. images smaller than the training size). */
  readonly warnings: readonly string[];
  /** A hash of the file lists and prompts; a saved loader state only resumes on the same data. */
  readonly fingerprint: string;

  private readonly minImageSize: number;
  private readonly alpha: AlphaBackground;
  private readonly cacheInstances: boolean;
  private readonly cacheClasses: boolean;
  private readonly instanceCache = new Map<number, Promise<RgbImage>>();
  private readonly classCache = new Map<number, Promise<RgbImage>>();

  private constructor(args: {
    instances: DataItem[];
    classes: DataItem[];
    withPriorPreservation: boolean;
    augment: ResolvedAugmentOptions;
    warnings: string[];
    minImageSize: number;
    alpha: AlphaBackground;
    cacheInstances: boolean;
    cacheClasses: boolean;
  }) {
    this.instances = Object.freeze(args.instances.map((x) => Object.freeze(x)));
    this.classes = Object.freeze(args.classes.map((x) => Object.freeze(x)));
    this.withPriorPreservation = args.withPriorPreservation;
    this.augment = args.augment;
    this.warnings = Object.freeze(args.warnings);
    this.minImageSize = args.minImageSize;
    this.alpha = args.alpha;
    this.cacheInstances = args.cacheInstances;
    this.cacheClasses = args.cacheClasses;
    const h = createHash('sha256');
    h.update(JSON.stringify([args.augment, args.withPriorPreservation]));
    for (const it of [...args.instances, ...args.classes]) h.update(`${it.file}\0${it.prompt}\0`);
    this.fingerprint = h.digest('hex').slice(0, 16);
  }

  /**
   * Lists every concept's images, reads every header (so an unreadable or too-small image is
   * reported now, all of them in one DataError, not in the middle of training), and returns the
   * dataset.
   */
  static async open(options: DatasetOptions): Promise<TrainingDataset> {
    const augment = resolveAugmentOptions(options);
    const concepts = options.concepts;
    if (!Array.isArray(concepts) || concepts.length === 0) throw new InvalidArgumentError('concepts must be a non-empty array');
    const numClassImages = options.numClassImages ?? 200;
    if (!Number.isInteger(numClassImages) || numClassImages < 1) {
      throw new InvalidArgumentError(`numClassImages must be a positive integer, got ${numClassImages}`);
    }
    const minImageSize = options.minImageSize ?? DEFAULT_MIN_IMAGE_SIZE;
    const withPrior = options.withPriorPreservation ?? concepts.every((c) => c.classDataDir !== undefined);
    const captionsMode = options.classCaptions ?? 'auto';
    const warnings: string[] = [];

    const instances: DataItem[] = [];
    const classes: DataItem[] = [];
    concepts.forEach((spec, i) => {
      instances.push(...listInstanceItems(spec, i));
      if (withPrior) {
        if (!spec.classDataDir) {
          throw new DataError(`Prior preservation needs class images, but concept ${i} (${spec.instanceDataDir}) has no class_data_dir`, spec.instanceDataDir);
        }
        const wanted = spec.numClassImages ?? numClassImages;
        const items = listClassItems(spec, i, wanted, captionsMode);
        if (items.length === 0) throw new DataError(`The class data ${spec.classDataDir} holds no images`, spec.classDataDir);
        if (items.length < wanted) {
          warnings.push(`${spec.classDataDir} holds ${items.length} class images; ${wanted} were asked for`);
        }
        classes.push(...items);
      }
    });

    const all = [...instances, ...classes];
    const problems: DataError[] = [];
    await mapLimit(all, options.scanConcurrency ?? 8, async (item) => {
      try {
        const info = await probeImage(item.file, { minSize: minImageSize });
        item.width = info.width;
        item.height = info.height;
        if (Math.min(info.width, info.height) < augment.size) {
          warnings.push(`${item.file} is ${info.width}×${info.height}, smaller than the training size ${augment.size}; it will be upscaled`);
        }
      } catch (e) {
        if (e instanceof DataError) problems.push(e);
        else throw e;
      }
    });
    if (problems.length > 0) {
      problems.sort((a, b) => naturalCompare(a.file, b.file));
      const list = problems.slice(0, 20).map((p) => `  ${p.message}`).join('\n');
      const more = problems.length > 20 ? `\n  … and ${problems.length - 20} more` : '';
      throw new DataError(`${problems.length} training image(s) cannot be used:\n${list}${more}`, problems[0].file, {
        cause: problems[0],
      });
    }
    warnings.sort();
    return new TrainingDataset({
      instances,
      classes: withPrior ? classes : [],
      withPriorPreservation: withPrior,
      augment,
      warnings,
      minImageSize,
      alpha: options.alpha ?? 'white',
      cacheInstances: options.cacheInstanceImages ?? true,
      cacheClasses: options.cacheClassImages ?? true,
    });
  }

  /** Dataset indices per epoch: max(#class, #instance) with prior preservation, else #instance. */
  get length(): number {
    return this.withPriorPreservation ? Math.max(this.classes.length, this.instances.length) : this.instances.length;
  }

  /** Examples per dataset index: 2 with prior preservation (instance + class), else 1. */
  get examplesPerIndex(): 1 | 2 {
    return this.withPriorPreservation ? 2 : 1;
  }

  /** The decoded instance image as the augmentation starts from it (center-cropped for 'compvis'). */
  preparedInstance(index: number): Promise<RgbImage> {
    const load = async () =>
      prepareInstanceImage(await loadImage(this.instances[index].file, { minSize: this.minImageSize, alpha: this.alpha }), this.augment.style);
    return this.cached(this.instanceCache, this.cacheInstances, index, load);
  }

  /** The resized class image (the cacheable part; flip and crop are applied per draw). */
  preparedClass(index: number): Promise<RgbImage> {
    const load = async () =>
      prepareClassImage(await loadImage(this.classes[index].file, { minSize: this.minImageSize, alpha: this.alpha }), this.augment);
    return this.cached(this.classCache, this.cacheClasses, index, load);
  }

  private cached(cache: Map<number, Promise<RgbImage>>, enabled: boolean, index: number, load: () => Promise<RgbImage>): Promise<RgbImage> {
    if (!enabled) return load();
    let p = cache.get(index);
    if (!p) {
      p = load();
      cache.set(index, p);
      p.catch(() => cache.delete(index));
    }
    return p;
  }

  /** The size of a class image after its deterministic resize (from the header, no decoding). */
  classPreparedSize(index: number): { width: number; height: number } {
    const it = this.classes[index];
    if (this.augment.style === 'compvis') return { width: this.augment.size, height: this.augment.size };
    return classResizedSize(it.width, it.height, this.augment);
  }

  /** Drops the decoded-image caches. */
  clearCache(): void {
    this.instanceCache.clear();
    this.classCache.clear();
  }
}

// ---------------------------------------------------------------------------------------------
// Data loader

/** Stream numbers of the one seed (see {@link Rng.fromSeed}). */
const STREAM_INSTANCE_ORDER = 1;
const STREAM_AUGMENT = 2;
const STREAM_EPOCH_BASE = 1_000_000;

/** Where a loader stands, as plain JSON: restore it with {@link TrainingDataLoader.restore}. */
export interface DataLoaderState {
  version: 1;
  /** The seed, as a decimal string (it may exceed 2^53). */
  seed: string;
  batchSize: number;
  dropLast: boolean;
  /** Epochs completed. */
  epoch: number;
  /** Dataset indices of the current epoch already consumed. */
  position: number;
  /** Batches produced so far. */
  batches: number;
  /** The augmentation stream's state. */
  rng: RngState;
  /** {@link TrainingDataset.fingerprint} of the data this state belongs to. */
  fingerprint: string;
}

export interface DataLoaderOptions {
  /** Instance examples per batch, B (a batch holds 2B examples with prior preservation). */
  batchSize: number;
  seed: number | bigint;
  /** Skip an epoch's last batch when it has fewer than B indices (default false, like PyTorch's DataLoader). */
  dropLast?: boolean;
}

/** One example of a planned batch: which image, which random choices, which prompt. */
export type PlannedExample =
  | {
      kind: 'instance';
      datasetIndex: number;
      item: number;
      file: string;
      concept: number;
      prompt: string;
      params: InstanceAugmentParams;
    }
  | {
      kind: 'prior';
      datasetIndex: number;
      item: number;
      file: string;
      concept: number;
      prompt: string;
      params: ClassAugmentParams;
    };

/** A batch decided but not loaded: the random draws are made, the state has advanced. */
export interface BatchPlan {
  epoch: number;
  /** Index of this batch since the start of training (0-based). */
  batch: number;
  /** The dataset indices of the batch, in order. */
  indices: number[];
  /** [instance examples…, then prior examples…]. */
  examples: PlannedExample[];
  /** The loader state right after this batch: save it with a checkpoint of the step that used this batch. */
  stateAfter: DataLoaderState;
}

/** A loaded batch: flat float32 arrays ready to hand to native code in one call. */
export interface TrainingBatch {
  epoch: number;
  batch: number;
  /** Instance examples B′ (B, or fewer in an epoch's last batch). */
  instanceCount: number;
  /** Examples N = 2B′ with prior preservation, else B′. */
  size: number;
  /** [N, 3, S, S] float32 in [−1, 1]. */
  pixels: Float32Array;
  pixelShape: [number, number, number, number];
  /** [N, 1, S/8, S/8] float32; 1 where the loss counts (class examples: all ones). */
  masks: Float32Array;
  maskShape: [number, number, number, number];
  /** N prompts, instance prompts with their augmentation prefix. */
  prompts: string[];
  /** Per example: true for a prior (class) example, false for an instance example. */
  isPrior: boolean[];
  /**
   * Per example: whether its pixels are a pure function of (file, flip, crop) — true for class
   * examples, whose key is in `cacheKeys` (e.g. to cache their VAE encodings); false for instance
   * examples (random scale).
   */
  cacheable: boolean[];
  cacheKeys: (string | null)[];
  files: string[];
  concepts: number[];
  augment: (InstanceAugmentParams | ClassAugmentParams)[];
  stateAfter: DataLoaderState;
}

function seedString(seed: number | bigint): string {
  if (typeof seed === 'number' && (!Number.isSafeInteger(seed) || seed < 0)) {
    throw new InvalidArgumentError(`seed must be a non-negative safe integer or a bigint, got ${seed}`);
  }
  if (typeof seed === 'bigint' && seed < 0n) throw new InvalidArgumentError(`seed must be non-negative, got ${seed}`);
  return BigInt(seed).toString();
}

/** Produces batches from a {@link TrainingDataset}, deterministically from a seed, resumable. */
export class TrainingDataLoader {
  readonly dataset: TrainingDataset;
  readonly batchSize: number;
  readonly dropLast: boolean;
  readonly seed: bigint;
  /** The run's instance order: `instanceOrder[i % #instance]` is the instance of dataset index i. */
  readonly instanceOrder: readonly number[];

  private epoch = 0;
  private position = 0;
  private batches = 0;
  private readonly rng: Rng;
  private permEpoch = -1;
  private perm: number[] = [];

  constructor(dataset: TrainingDataset, options: DataLoaderOptions) {
    if (!Number.isInteger(options.batchSize) || options.batchSize < 1) {
      throw new InvalidArgumentError(`batchSize must be a positive integer, got ${options.batchSize}`);
    }
    this.dataset = dataset;
    this.batchSize = options.batchSize;
    this.dropLast = options.dropLast ?? false;
    this.seed = BigInt(seedString(options.seed));
    if (this.dropLast && dataset.length < this.batchSize) {
      throw new InvalidArgumentError(`With dropLast, a dataset of ${dataset.length} indices never fills a batch of ${this.batchSize}`);
    }
    this.instanceOrder = Object.freeze(Rng.fromSeed(this.seed, STREAM_INSTANCE_ORDER).permutation(dataset.instances.length));
    this.rng = Rng.fromSeed(this.seed, STREAM_AUGMENT);
  }

  /** A loader positioned exactly where `state` was taken (same dataset required). */
  static restore(dataset: TrainingDataset, state: DataLoaderState): TrainingDataLoader {
    if (!state || state.version !== 1) throw new InvalidArgumentError(`Unsupported data loader state: ${JSON.stringify(state)?.slice(0, 200)}`);
    if (state.fingerprint !== dataset.fingerprint) {
      throw new InvalidArgumentError(
        `The data loader state belongs to other data (fingerprint ${state.fingerprint}, this dataset ${dataset.fingerprint}): ` +
          'the images, prompts or augmentation options changed',
      );
    }
    const loader = new TrainingDataLoader(dataset, { batchSize: state.batchSize, seed: BigInt(state.seed), dropLast: state.dropLast });
    for (const [k, v] of [['epoch', state.epoch], ['position', state.position], ['batches', state.batches]] as const) {
      if (!Number.isInteger(v) || v < 0) throw new InvalidArgumentError(`Invalid ${k} ${v} in the data loader state`);
    }
    if (state.position > dataset.length) throw new InvalidArgumentError(`position ${state.position} is past the epoch length ${dataset.length}`);
    loader.epoch = state.epoch;
    loader.position = state.position;
    loader.batches = state.batches;
    loader.rng.setState(state.rng);
    return loader;
  }

  /** The current state (after the batches planned so far), as JSON-safe data. */
  get state(): DataLoaderState {
    return {
      version: 1,
      seed: this.seed.toString(),
      batchSize: this.batchSize,
      dropLast: this.dropLast,
      epoch: this.epoch,
      position: this.position,
      batches: this.batches,
      rng: this.rng.getState(),
      fingerprint: this.dataset.fingerprint,
    };
  }

  /** Batches per epoch (the last may be smaller unless dropLast). */
  get batchesPerEpoch(): number {
    const n = this.dataset.length;
    return this.dropLast ? Math.floor(n / this.batchSize) : Math.ceil(n / this.batchSize);
  }

  /** The permutation of dataset indices of an epoch (a pure function of the seed and the epoch). */
  epochOrder(epoch: number): number[] {
    return Rng.fromSeed(this.seed, STREAM_EPOCH_BASE + epoch).permutation(this.dataset.length);
  }

  /**
   * Decides the next batch: its indices and every random draw, in order (instance examples first,
   * then class examples), and advances the state. Loading is separate ({@link load}), so a trainer
   * may plan ahead and load in the background.
   */
  planNext(): BatchPlan {
    const n = this.dataset.length;
    if (this.position >= n || (this.dropLast && n - this.position < this.batchSize)) {
      this.epoch += 1;
      this.position = 0;
    }
    if (this.permEpoch !== this.epoch) {
      this.perm = this.epochOrder(this.epoch);
      this.permEpoch = this.epoch;
    }
    const count = Math.min(this.batchSize, n - this.position);
    const indices = this.perm.slice(this.position, this.position + count);
    const ds = this.dataset;
    const examples: PlannedExample[] = [];
    for (const i of indices) {
      const item = this.instanceOrder[i % ds.instances.length];
      const it = ds.instances[item];
      const params = drawInstanceAugment(this.rng, ds.augment);
      examples.push({ kind: 'instance', datasetIndex: i, item, file: it.file, concept: it.concept, prompt: params.prefix + it.prompt, params });
    }
    if (ds.withPriorPreservation) {
      for (const i of indices) {
        const item = i % ds.classes.length;
        const it = ds.classes[item];
        const { width, height } = ds.classPreparedSize(item);
        const params = drawClassAugment(this.rng, width, height, ds.augment);
        examples.push({ kind: 'prior', datasetIndex: i, item, file: it.file, concept: it.concept, prompt: it.prompt, params });
      }
    }
    const plan: BatchPlan = { epoch: this.epoch, batch: this.batches, indices, examples, stateAfter: undefined as unknown as DataLoaderState };
    this.position += count;
    this.batches += 1;
    plan.stateAfter = this.state;
    return plan;
  }

  /** Loads a planned batch: decodes (cached), augments, and fills the batch arrays. */
  async load(plan: BatchPlan): Promise<TrainingBatch> {
    const ds = this.dataset;
    const S = ds.augment.size;
    const m = S / LATENT_FACTOR;
    const N = plan.examples.length;
    const pixels = new Float32Array(N * 3 * S * S);
    const masks = new Float32Array(N * m * m);
    await Promise.all(
      plan.examples.map(async (ex, k) => {
        const target = { pixels, pixelOffset: k * 3 * S * S, mask: masks, maskOffset: k * m * m };
        if (ex.kind === 'instance') {
          await applyInstanceAugment(await ds.preparedInstance(ex.item), ex.params, ds.augment, target);
        } else {
          applyClassAugment(await ds.preparedClass(ex.item), ex.params, ds.augment, target);
        }
      }),
    );
    const instanceCount = plan.examples.filter((e) => e.kind === 'instance').length;
    return {
      epoch: plan.epoch,
      batch: plan.batch,
      instanceCount,
      size: N,
      pixels,
      pixelShape: [N, 3, S, S],
      masks,
      maskShape: [N, 1, m, m],
      prompts: plan.examples.map((e) => e.prompt),
      isPrior: plan.examples.map((e) => e.kind === 'prior'),
      cacheable: plan.examples.map((e) => e.kind === 'prior'),
      cacheKeys: plan.examples.map((e) =>
        e.kind === 'prior' ? `${e.file}#flip=${e.params.flip ? 1 : 0}&top=${e.params.top}&left=${e.params.left}` : null,
      ),
      files: plan.examples.map((e) => e.file),
      concepts: plan.examples.map((e) => e.concept),
      augment: plan.examples.map((e) => e.params),
      stateAfter: plan.stateAfter,
    };
  }

  /** Plans and loads the next batch. Epochs roll over forever; stop after your number of steps. */
  async next(): Promise<TrainingBatch> {
    return this.load(this.planNext());
  }
}
