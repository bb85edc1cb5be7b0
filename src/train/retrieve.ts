/**
 * Real regularisation images for prior preservation, retrieved from a clip-retrieval knn service
 * (the `real_reg` recipe of Custom Diffusion).
 *
 * The request is the one clip-retrieval's `ClipClient` sends (rom1504/clip-retrieval,
 * `clip_retrieval/clip_client.py`): a POST of a JSON body with `text`, `image`, `image_url`,
 * `embedding_input`, `deduplicate`, `use_safety_model`, `use_violence_detector`, `indice_name`,
 * `use_mclip`, `aesthetic_score`, `aesthetic_weight`, `modality`, `num_images` and
 * `num_result_ids` (= num_images) to the service URL (the `/knn-service` endpoint). The answer is a
 * JSON array of `{ url, caption, id?, similarity? }`.
 *
 * The procedure follows the diffusers example (HF-EX `examples/custom_diffusion/retrieve.py`) with
 * the original settings (`indice_name: 'laion_400m'`, `aesthetic_weight: 0.1`, ClipClient's other
 * defaults): ask for 1.5·N results, grow the request ×1.5 while fewer than 1.5·N come back (up to a
 * cap of 10,000), download in result order, keep the images that answer HTTP 200 and decode, and
 * stop at exactly N. Output, line-aligned: `<out>/images/<i>.jpg`, `<out>/caption.txt`,
 * `<out>/urls.txt`, `<out>/images.txt` (the image paths, written as `<out>/images/<i>.jpg` with
 * `out` as given, like the original).
 *
 * Differences from the original, on purpose: a timeout per download (30 s) and a size cap; captions
 * and URLs have line breaks replaced by spaces (a caption with a newline would misalign the files);
 * images that are not JPEG are re-encoded as JPEG (quality 95, orientation applied, alpha on white)
 * so every `.jpg` is one; it resumes (already downloaded lines are kept and their URLs skipped);
 * when the results run out before N, the request grows again, and if the cap is reached a
 * DataError says how many were found (the original would crash on an index error).
 *
 * **The public LAION service (knn.laion.ai) is offline**, so there is no default URL: pass the
 * `/knn-service` URL of a clip-retrieval backend you run or trust (`clip-retrieval back`).
 *
 * @packageDocumentation
 */
import * as fs from 'fs';
import * as path from 'path';
import { AbortError, DataError, InvalidArgumentError } from '../errors';
import { DEFAULT_MIN_IMAGE_SIZE, decodeImage, loadSharp } from './images';

/** The request body of clip-retrieval's ClipClient for a text query. */
export interface KnnRequest {
  text: string | null;
  image: string | null;
  image_url: string | null;
  embedding_input: number[] | null;
  deduplicate: boolean;
  use_safety_model: boolean;
  use_violence_detector: boolean;
  indice_name: string;
  use_mclip: boolean;
  aesthetic_score: number;
  aesthetic_weight: number;
  modality: 'image' | 'text';
  num_images: number;
  num_result_ids: number;
}

/** One result of the knn service. */
export interface KnnResult {
  url: string;
  caption: string;
  id?: number;
  similarity?: number;
}

export interface KnnQueryOptions {
  /** The knn service endpoint, e.g. `http://host:1234/knn-service`. Required: the public LAION service is down. */
  url: string;
  /** Index to search (default 'laion_400m', as the original). */
  indiceName?: string;
  /** Aesthetic score to favour (ClipClient default 9). */
  aestheticScore?: number;
  /** Weight of the aesthetic score (default 0.1, as the original; ClipClient's own default is 0.5). */
  aestheticWeight?: number;
  /** Search the image embeddings ('image', default) or the caption embeddings ('text'). */
  modality?: 'image' | 'text';
  useMclip?: boolean;
  deduplicate?: boolean;
  useSafetyModel?: boolean;
  useViolenceDetector?: boolean;
  /** Milliseconds to wait for the service (default 600 000; ClipClient waits an hour). */
  queryTimeoutMs?: number;
  signal?: AbortSignal;
  /** A fetch implementation (default: the global one). */
  fetch?: typeof fetch;
}

/** The JSON body ClipClient sends for a text query. */
export function buildKnnRequest(text: string, numImages: number, options: Omit<KnnQueryOptions, 'url'> = {}): KnnRequest {
  return {
    text,
    image: null,
    image_url: null,
    embedding_input: null,
    deduplicate: options.deduplicate ?? true,
    use_safety_model: options.useSafetyModel ?? true,
    use_violence_detector: options.useViolenceDetector ?? true,
    indice_name: options.indiceName ?? 'laion_400m',
    use_mclip: options.useMclip ?? false,
    aesthetic_score: options.aestheticScore ?? 9,
    aesthetic_weight: options.aestheticWeight ?? 0.1,
    modality: options.modality ?? 'image',
    num_images: numImages,
    num_result_ids: numImages,
  };
}

function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new AbortError('The retrieval was aborted.', { cause: signal.reason });
}

function withTimeout(signal: AbortSignal | undefined, ms: number): AbortSignal {
  const t = AbortSignal.timeout(ms);
  return signal ? AbortSignal.any([signal, t]) : t;
}

/** Sends one text query to the knn service and returns its results. */
export async function queryKnn(text: string, numImages: number, options: KnnQueryOptions): Promise<KnnResult[]> {
  if (!options.url) throw new InvalidArgumentError('The knn service URL is required (the public LAION service is offline)');
  throwIfAborted(options.signal);
  const doFetch = options.fetch ?? fetch;
  let res: Response;
  try {
    res = await doFetch(options.url, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(buildKnnRequest(text, numImages, options)),
      signal: withTimeout(options.signal, options.queryTimeoutMs ?? 600_000),
    });
  } catch (e) {
    throwIfAborted(options.signal);
    throw new DataError(`The knn service ${options.url} did not answer: ${(e as Error).message}`, options.url, { cause: e });
  }
  if (!res.ok) {
    throw new DataError(`The knn service ${options.url} answered HTTP ${res.status} ${res.statusText}`, options.url);
  }
  let body: unknown;
  try {
    body = await res.json();
  } catch (e) {
    throwIfAborted(options.signal);
    throw new DataError(`The knn service ${options.url} did not answer JSON: ${(e as Error).message}`, options.url, { cause: e });
  }
  if (!Array.isArray(body)) {
    const detail = body && typeof body === 'object' && 'error' in body ? `: ${String((body as { error: unknown }).error)}` : '';
    throw new DataError(`The knn service ${options.url} did not answer a list of results${detail}`, options.url);
  }
  return body
    .filter((r): r is Record<string, unknown> => !!r && typeof r === 'object' && typeof (r as { url?: unknown }).url === 'string')
    .map((r) => ({
      url: r.url as string,
      caption: typeof r.caption === 'string' ? r.caption : '',
      ...(typeof r.id === 'number' ? { id: r.id } : {}),
      ...(typeof r.similarity === 'number' ? { similarity: r.similarity } : {}),
    }));
}

/** Progress of a retrieval. */
export type RetrieveProgress =
  | { phase: 'resume'; kept: number; target: number }
  | { phase: 'query'; requested: number; results: number; target: number }
  | { phase: 'download'; kept: number; target: number; tried: number; url: string; ok: boolean; reason?: string };

export interface RetrieveOptions extends KnnQueryOptions {
  /** The text query, e.g. the class name "cat". */
  query: string;
  /** Output folder (created). */
  outDir: string;
  /** Number of images to keep, N. */
  count: number;
  /** Initial request = ceil... int(factor·N), grown ×factor (default 1.5, as HF-EX). */
  factor?: number;
  /** Largest request before giving up growing (default 10 000, as the original). */
  maxQueryImages?: number;
  /** Milliseconds per download (default 30 000). */
  timeoutMs?: number;
  /** Largest accepted download in bytes (default 32 MiB). */
  maxBytes?: number;
  /** Smallest accepted shorter side in pixels (default 64, as the dataset's default minimum). */
  minImageSize?: number;
  /** Downloads in flight at once (default 4; results are still kept in result order). */
  concurrency?: number;
  onProgress?: (p: RetrieveProgress) => void;
}

export interface RetrieveResult {
  outDir: string;
  /** Images now listed in the output (N, or more if an earlier run kept more). */
  count: number;
  /** Images found already present at the start. */
  existing: number;
  /** Images downloaded by this call. */
  downloaded: number;
  /** Downloads that failed (HTTP error, timeout, not an image, too small or too large). */
  failed: { url: string; reason: string }[];
  /** Knn queries made. */
  queries: number;
}

function oneLine(s: string): string {
  return s.replace(/[\r\n]+/g, ' ').trim();
}

/** Reads the consistent prefix of an earlier run: lines present in all three files with their image. */
function readExisting(outDir: string): { captions: string[]; urls: string[]; images: string[] } {
  const read = (name: string): string[] => {
    const f = path.join(outDir, name);
    if (!fs.existsSync(f)) return [];
    const lines = fs.readFileSync(f, 'utf8').split('\n');
    if (lines[lines.length - 1] === '') lines.pop();
    return lines;
  };
  const captions = read('caption.txt');
  const urls = read('urls.txt');
  const images = read('images.txt');
  let k = Math.min(captions.length, urls.length, images.length);
  for (let i = 0; i < k; i++) {
    const f = path.join(outDir, 'images', `${i}.jpg`);
    const st = fs.existsSync(f) ? fs.statSync(f) : null;
    if (!st || st.size === 0) {
      k = i;
      break;
    }
  }
  return { captions: captions.slice(0, k), urls: urls.slice(0, k), images: images.slice(0, k) };
}

async function download(
  url: string,
  options: { signal: AbortSignal; timeoutMs: number; maxBytes: number; minSize: number; fetch: typeof fetch },
): Promise<{ ok: true; jpeg: Buffer } | { ok: false; reason: string }> {
  let res: Response;
  const signal = withTimeout(options.signal, options.timeoutMs);
  try {
    res = await options.fetch(url, { signal, redirect: 'follow' });
  } catch (e) {
    return { ok: false, reason: (e as Error).name === 'TimeoutError' ? 'timeout' : (e as Error).message };
  }
  if (res.status !== 200) {
    res.body?.cancel().catch(() => {});
    return { ok: false, reason: `HTTP ${res.status}` };
  }
  const declared = Number(res.headers.get('content-length') ?? NaN);
  if (declared > options.maxBytes) {
    res.body?.cancel().catch(() => {});
    return { ok: false, reason: `too large (${declared} bytes)` };
  }
  const chunks: Uint8Array[] = [];
  let size = 0;
  try {
    const reader = res.body!.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      size += value.byteLength;
      if (size > options.maxBytes) {
        await reader.cancel().catch(() => {});
        return { ok: false, reason: `too large (over ${options.maxBytes} bytes)` };
      }
      chunks.push(value);
    }
  } catch (e) {
    return { ok: false, reason: (e as Error).name === 'TimeoutError' ? 'timeout' : (e as Error).message };
  }
  const bytes = Buffer.concat(chunks);
  let format: string | undefined;
  try {
    // A full decode: a truncated or corrupt file is refused here, not during training.
    await decodeImage(bytes, url, { minSize: options.minSize });
    format = (await loadSharp()(bytes).metadata()).format;
  } catch (e) {
    return { ok: false, reason: (e as Error).message };
  }
  if (format === 'jpeg') return { ok: true, jpeg: bytes };
  try {
    const jpeg = await loadSharp()(bytes).rotate().flatten({ background: { r: 255, g: 255, b: 255 } }).toColourspace('srgb').jpeg({ quality: 95 }).toBuffer();
    return { ok: true, jpeg };
  } catch (e) {
    return { ok: false, reason: (e as Error).message };
  }
}

/**
 * Retrieves N class images for a text query into `outDir` (see the module comment). Resumable:
 * a second call keeps what the first wrote and downloads only what is missing. Throws AbortError
 * when `signal` aborts (what was written stays consistent), DataError when the service fails or
 * too few images can be found.
 */
export async function retrieveClassImages(options: RetrieveOptions): Promise<RetrieveResult> {
  const { query, outDir, count } = options;
  if (!options.url) throw new InvalidArgumentError('The knn service URL is required (the public LAION service knn.laion.ai is offline)');
  if (typeof query !== 'string' || query.trim() === '') throw new InvalidArgumentError('query must be a non-empty string');
  if (!Number.isInteger(count) || count < 1) throw new InvalidArgumentError(`count must be a positive integer, got ${count}`);
  const factor = options.factor ?? 1.5;
  if (!(factor > 1)) throw new InvalidArgumentError(`factor must be > 1, got ${factor}`);
  const cap = options.maxQueryImages ?? 10_000;
  const concurrency = Math.max(1, Math.floor(options.concurrency ?? 4));
  const doFetch = options.fetch ?? fetch;
  const report = options.onProgress ?? (() => {});
  throwIfAborted(options.signal);

  const imagesDir = path.join(outDir, 'images');
  await fs.promises.mkdir(imagesDir, { recursive: true });
  const existing = readExisting(outDir);
  const kept0 = existing.urls.length;
  // Rewrite the three lists to their consistent prefix (a crash may have left one line longer).
  const writeAll = async () => {
    for (const [name, lines] of [
      ['caption.txt', existing.captions],
      ['urls.txt', existing.urls],
      ['images.txt', existing.images],
    ] as const) {
      await fs.promises.writeFile(path.join(outDir, name), lines.map((l) => l + '\n').join(''));
    }
  };
  await writeAll();
  report({ phase: 'resume', kept: kept0, target: count });
  const result: RetrieveResult = { outDir, count: kept0, existing: kept0, downloaded: 0, failed: [], queries: 0 };
  if (kept0 >= count) return result;

  const seen = new Set(existing.urls);
  let kept = kept0;
  let tried = 0;
  let numImages = Math.trunc(factor * count);
  let results: KnnResult[] = [];
  const queryOnce = async (n: number) => {
    const r = await queryKnn(query, n, { ...options, fetch: doFetch });
    result.queries += 1;
    report({ phase: 'query', requested: n, results: r.length, target: count });
    return r;
  };
  // HF-EX: grow until the service returns at least factor·N results, or the request passes the cap.
  for (;;) {
    results = await queryOnce(numImages);
    if (results.length >= factor * count || numImages > cap) break;
    numImages = Math.trunc(factor * numImages);
  }

  const stop = new AbortController();
  const signal = options.signal ? AbortSignal.any([options.signal, stop.signal]) : stop.signal;
  const dl = { signal, timeoutMs: options.timeoutMs ?? 30_000, maxBytes: options.maxBytes ?? 32 * 1024 * 1024, minSize: options.minImageSize ?? DEFAULT_MIN_IMAGE_SIZE, fetch: doFetch };
  const inflight = new Map<number, { url: string; caption: string; p: ReturnType<typeof download> }>();
  let next = 0;
  try {
    while (kept < count) {
      throwIfAborted(options.signal);
      while (inflight.size < concurrency && next < results.length) {
        const r = results[next];
        if (!seen.has(r.url)) {
          seen.add(r.url);
          inflight.set(next, { url: r.url, caption: r.caption, p: download(r.url, dl) });
        }
        next++;
      }
      if (inflight.size === 0) {
        // Results exhausted before N: ask for more, unless the cap is reached.
        if (numImages > cap) {
          throw new DataError(
            `Only ${kept} of ${count} images for "${query}" could be downloaded from ${options.url} ` +
              `(${tried} tried, request grew to ${numImages}); what was found is kept in ${outDir}`,
            outDir,
          );
        }
        numImages = Math.trunc(factor * numImages);
        results = await queryOnce(numImages);
        next = 0;
        continue;
      }
      // Keep images in result order: wait for the oldest download in flight.
      const [idx, job] = inflight.entries().next().value as [number, { url: string; caption: string; p: ReturnType<typeof download> }];
      const out = await job.p;
      inflight.delete(idx);
      tried += 1;
      throwIfAborted(options.signal);
      if (!out.ok) {
        result.failed.push({ url: job.url, reason: out.reason });
        report({ phase: 'download', kept, target: count, tried, url: job.url, ok: false, reason: out.reason });
        continue;
      }
      const i = kept;
      const file = path.join(imagesDir, `${i}.jpg`);
      const tmp = `${file}.part`;
      await fs.promises.writeFile(tmp, out.jpeg);
      await fs.promises.rename(tmp, file);
      const caption = oneLine(job.caption);
      const url = oneLine(job.url);
      const listed = path.join(outDir, 'images', `${i}.jpg`);
      // One line per file, appended after the image exists; a resume keeps only complete lines.
      await fs.promises.appendFile(path.join(outDir, 'caption.txt'), caption + '\n');
      await fs.promises.appendFile(path.join(outDir, 'urls.txt'), url + '\n');
      await fs.promises.appendFile(path.join(outDir, 'images.txt'), listed + '\n');
      kept += 1;
      result.downloaded += 1;
      result.count = kept;
      report({ phase: 'download', kept, target: count, tried, url: job.url, ok: true });
    }
  } finally {
    stop.abort();
    await Promise.allSettled([...inflight.values()].map((j) => j.p));
  }
  return result;
}
