import * as fs from 'fs';
import * as http from 'http';
import type { AddressInfo } from 'net';
import * as path from 'path';
import sharp from 'sharp';
import { AbortError, DataError, InvalidArgumentError } from '../../src/errors';
import { buildKnnRequest, queryKnn, retrieveClassImages, type RetrieveProgress } from '../../src/train';
import { tempDir } from '../helpers/env';
import { pattern, rawImage } from './util';

async function encode(format: 'jpeg' | 'png' | 'webp', width: number, height: number, seed: number): Promise<Buffer> {
  const img = sharp(rawImage(width, height, 3, pattern(seed)), { raw: { width, height, channels: 3 } });
  return format === 'jpeg' ? img.jpeg().toBuffer() : format === 'png' ? img.png().toBuffer() : img.webp().toBuffer();
}

interface Entry {
  url: string;
  caption: string;
  body?: Buffer;
  status?: number;
  delayMs?: number;
}

/** A fake clip-retrieval backend on 127.0.0.1: a knn endpoint plus the images its results point to. */
class FakeService {
  server!: http.Server;
  base = '';
  entries: Entry[] = [];
  requests: Record<string, unknown>[] = [];
  hits = new Map<string, number>();
  knnStatus = 200;
  knnBody: unknown = null;

  async start(): Promise<void> {
    this.server = http.createServer((req, res) => {
      const url = req.url ?? '';
      if (req.method === 'POST' && url === '/knn-service') {
        let body = '';
        req.on('data', (c) => (body += c));
        req.on('end', () => {
          const json = JSON.parse(body) as Record<string, unknown>;
          this.requests.push({ ...json, contentType: req.headers['content-type'] });
          if (this.knnStatus !== 200) {
            res.writeHead(this.knnStatus);
            res.end('boom');
            return;
          }
          const answer = this.knnBody ?? this.entries.slice(0, json.num_images as number).map((e, i) => ({ id: i, similarity: 0.3, url: e.url, caption: e.caption }));
          res.writeHead(200, { 'content-type': 'application/json' });
          res.end(JSON.stringify(answer));
        });
        return;
      }
      const full = this.base + url;
      this.hits.set(full, (this.hits.get(full) ?? 0) + 1);
      const e = this.entries.find((x) => x.url === full && x.body);
      if (!e || e.status === 404) {
        res.writeHead(404);
        res.end('not found');
        return;
      }
      const send = () => {
        if (res.destroyed) return;
        res.writeHead(e.status ?? 200, { 'content-type': 'application/octet-stream' });
        res.end(e.body);
      };
      if (e.delayMs) {
        const t = setTimeout(send, e.delayMs);
        res.on('close', () => clearTimeout(t));
      } else send();
    });
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.base = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  get knnUrl(): string {
    return `${this.base}/knn-service`;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

function lines(file: string): string[] {
  const t = fs.readFileSync(file, 'utf8');
  expect(t.endsWith('\n') || t === '').toBe(true);
  return t === '' ? [] : t.slice(0, -1).split('\n');
}

async function checkOutput(out: string, n: number): Promise<{ captions: string[]; urls: string[] }> {
  const captions = lines(path.join(out, 'caption.txt'));
  const urls = lines(path.join(out, 'urls.txt'));
  const images = lines(path.join(out, 'images.txt'));
  expect([captions.length, urls.length, images.length]).toEqual([n, n, n]);
  expect(images).toEqual(Array.from({ length: n }, (_, i) => path.join(out, 'images', `${i}.jpg`)));
  expect(fs.readdirSync(path.join(out, 'images')).filter((f) => f.endsWith('.jpg')).length).toBe(n);
  for (let i = 0; i < n; i++) expect((await sharp(path.join(out, 'images', `${i}.jpg`)).metadata()).format).toBe('jpeg');
  return { captions, urls };
}

describe('train/retrieve', () => {
  const svc = new FakeService();
  let tmp: { dir: string; cleanup: () => void };
  const u = (name: string) => `${svc.base}/img/${name}`;

  beforeAll(async () => {
    tmp = tempDir('cd-retrieve-');
    await svc.start();
    svc.entries = [
      { url: u('0.jpg'), caption: 'a cat', body: await encode('jpeg', 80, 70, 0) },
      { url: u('1.jpg'), caption: 'gone', status: 404 },
      { url: u('2.jpg'), caption: 'broken', body: Buffer.from('<html>not an image</html>') },
      { url: u('3.png'), caption: 'multi\nline  caption ', body: await encode('png', 90, 64, 3) },
      { url: u('4.jpg'), caption: 'cat four', body: await encode('jpeg', 64, 64, 4) },
      { url: u('5.webp'), caption: 'cat five', body: await encode('webp', 100, 80, 5) },
      { url: u('0.jpg'), caption: 'duplicate of 0', body: await encode('jpeg', 80, 70, 0) },
      { url: u('7.jpg'), caption: 'tiny', body: await encode('jpeg', 10, 10, 7) },
      { url: u('8.jpg'), caption: 'cat eight', body: await encode('jpeg', 70, 70, 8) },
      { url: u('9.jpg'), caption: 'cat nine', body: await encode('jpeg', 70, 70, 9) },
      { url: u('10.jpg'), caption: 'cat ten', body: await encode('jpeg', 70, 70, 10) },
      { url: u('11.jpg'), caption: 'cat eleven', body: await encode('jpeg', 70, 70, 11) },
    ];
  });
  afterAll(async () => {
    await svc.stop();
    tmp.cleanup();
  });

  it('sends the same JSON body as clip-retrieval ClipClient', () => {
    const body = buildKnnRequest('cat', 300);
    expect(Object.keys(body).sort()).toEqual(
      ['text', 'image', 'image_url', 'embedding_input', 'deduplicate', 'use_safety_model', 'use_violence_detector', 'indice_name',
        'use_mclip', 'aesthetic_score', 'aesthetic_weight', 'modality', 'num_images', 'num_result_ids'].sort(),
    );
    expect(body).toEqual({
      text: 'cat', image: null, image_url: null, embedding_input: null, deduplicate: true, use_safety_model: true,
      use_violence_detector: true, indice_name: 'laion_400m', use_mclip: false, aesthetic_score: 9, aesthetic_weight: 0.1,
      modality: 'image', num_images: 300, num_result_ids: 300,
    });
  });

  it('downloads exactly N images in result order, skipping 404s, broken, duplicate and tiny images', async () => {
    const out = path.join(tmp.dir, 'cat');
    svc.requests = [];
    const progress: RetrieveProgress[] = [];
    const r = await retrieveClassImages({ url: svc.knnUrl, query: 'cat', outDir: out, count: 5, onProgress: (p) => progress.push(p), concurrency: 3 });
    expect(r).toMatchObject({ count: 5, existing: 0, downloaded: 5, queries: 2 });
    // 1.5·5 → 7 results < 7.5, so the request grows to int(1.5·7) = 10 (HF-EX's rule).
    expect(svc.requests.map((q) => q.num_images)).toEqual([7, 10]);
    expect(svc.requests[0]).toEqual({ ...buildKnnRequest('cat', 7), contentType: 'application/json' });
    const { captions, urls } = await checkOutput(out, 5);
    expect(captions).toEqual(['a cat', 'multi line  caption', 'cat four', 'cat five', 'cat eight']);
    expect(urls).toEqual([u('0.jpg'), u('3.png'), u('4.jpg'), u('5.webp'), u('8.jpg')]);
    expect(r.failed.map((f) => [path.basename(f.url), f.reason])).toEqual([
      ['1.jpg', 'HTTP 404'],
      ['2.jpg', expect.stringMatching(/Cannot decode/)],
      ['7.jpg', expect.stringMatching(/is 10×10 pixels/)],
    ]);
    // The PNG and WebP were re-encoded as JPEG at their own size.
    expect(await sharp(path.join(out, 'images', '1.jpg')).metadata()).toMatchObject({ format: 'jpeg', width: 90, height: 64 });
    expect(await sharp(path.join(out, 'images', '3.jpg')).metadata()).toMatchObject({ format: 'jpeg', width: 100, height: 80 });
    // A JPEG is kept byte for byte.
    expect(fs.readFileSync(path.join(out, 'images', '0.jpg')).equals(svc.entries[0].body!)).toBe(true);
    expect(progress[0]).toEqual({ phase: 'resume', kept: 0, target: 5 });
    expect(progress.filter((x) => x.phase === 'query').length).toBe(2);
    expect(progress.filter((x) => x.phase === 'download' && x.ok).map((x) => (x as { kept: number }).kept)).toEqual([1, 2, 3, 4, 5]);
  });

  it('resumes: keeps what exists, downloads only what is missing, and does nothing when complete', async () => {
    const out = path.join(tmp.dir, 'cat');
    const hitsBefore = new Map(svc.hits);
    svc.requests = [];
    const done = await retrieveClassImages({ url: svc.knnUrl, query: 'cat', outDir: out, count: 5 });
    expect(done).toMatchObject({ count: 5, existing: 5, downloaded: 0, queries: 0 });
    expect(svc.requests.length).toBe(0);

    const r = await retrieveClassImages({ url: svc.knnUrl, query: 'cat', outDir: out, count: 8 });
    expect(r).toMatchObject({ count: 8, existing: 5, downloaded: 3 });
    const { captions, urls } = await checkOutput(out, 8);
    expect(captions.slice(5)).toEqual(['cat nine', 'cat ten', 'cat eleven']);
    expect(urls.slice(0, 5)).toEqual([u('0.jpg'), u('3.png'), u('4.jpg'), u('5.webp'), u('8.jpg')]);
    for (const name of ['0.jpg', '3.png', '4.jpg', '5.webp', '8.jpg']) expect(svc.hits.get(u(name))).toBe(hitsBefore.get(u(name)));
  });

  it('recovers from a run cut between writing an image and its lines', async () => {
    const out = path.join(tmp.dir, 'cat');
    // Simulate a crash: one caption line too many, and the last image missing.
    fs.appendFileSync(path.join(out, 'caption.txt'), 'half-written\n');
    fs.unlinkSync(path.join(out, 'images', '7.jpg'));
    const r = await retrieveClassImages({ url: svc.knnUrl, query: 'cat', outDir: out, count: 8 });
    expect(r).toMatchObject({ existing: 7, downloaded: 1, count: 8 });
    const { captions } = await checkOutput(out, 8);
    expect(captions[7]).toBe('cat eleven');
  });

  it('fails with a DataError, keeping what it found, when the service has too few images', async () => {
    const out = path.join(tmp.dir, 'few');
    const err = await retrieveClassImages({ url: svc.knnUrl, query: 'cat', outDir: out, count: 20, maxQueryImages: 40 }).catch((e) => e);
    expect(err).toBeInstanceOf(DataError);
    expect(err.file).toBe(out);
    expect(err.message).toMatch(/Only 8 of 20 images/);
    await checkOutput(out, 8);
  });

  it('reports service errors and requires a URL', async () => {
    svc.knnStatus = 500;
    await expect(queryKnn('cat', 10, { url: svc.knnUrl })).rejects.toThrow(/HTTP 500/);
    svc.knnStatus = 200;
    svc.knnBody = { error: 'indice laion_400m not found' };
    const err = await queryKnn('cat', 10, { url: svc.knnUrl }).catch((e) => e);
    expect(err).toBeInstanceOf(DataError);
    expect(err.message).toMatch(/indice laion_400m not found/);
    svc.knnBody = null;
    await expect(queryKnn('cat', 10, { url: 'http://127.0.0.1:1/knn-service' })).rejects.toThrow(/did not answer/);
    await expect(retrieveClassImages({ url: '', query: 'cat', outDir: tmp.dir, count: 1 })).rejects.toThrow(InvalidArgumentError);
  });

  it('times out slow downloads and moves on', async () => {
    const slow = { url: u('slow.jpg'), caption: 'slow', body: await encode('jpeg', 70, 70, 40), delayMs: 3000 };
    const saved = svc.entries;
    svc.entries = [slow, { url: u('fast.jpg'), caption: 'fast', body: await encode('jpeg', 70, 70, 41) }];
    try {
      const out = path.join(tmp.dir, 'slow');
      const r = await retrieveClassImages({ url: svc.knnUrl, query: 'x', outDir: out, count: 1, timeoutMs: 200, factor: 2 });
      expect(r.failed).toEqual([{ url: u('slow.jpg'), reason: 'timeout' }]);
      expect((await checkOutput(out, 1)).captions).toEqual(['fast']);
    } finally {
      svc.entries = saved;
    }
  });

  it('aborts through an AbortSignal, leaving consistent files', async () => {
    const saved = svc.entries;
    svc.entries = [
      { url: u('a0.jpg'), caption: 'first', body: await encode('jpeg', 70, 70, 50) },
      { url: u('a1.jpg'), caption: 'slow', body: await encode('jpeg', 70, 70, 51), delayMs: 5000 },
      { url: u('a2.jpg'), caption: 'third', body: await encode('jpeg', 70, 70, 52) },
    ];
    try {
      const out = path.join(tmp.dir, 'abort');
      const ac = new AbortController();
      const started = Date.now();
      const err = await retrieveClassImages({
        url: svc.knnUrl,
        query: 'x',
        outDir: out,
        count: 3,
        factor: 2,
        concurrency: 1,
        signal: ac.signal,
        onProgress: (p) => {
          if (p.phase === 'download' && p.ok) setTimeout(() => ac.abort(), 50);
        },
      }).catch((e) => e);
      expect(err).toBeInstanceOf(AbortError);
      expect(err.code).toBe('ABORT_ERR');
      expect(Date.now() - started).toBeLessThan(3000);
      expect((await checkOutput(out, 1)).captions).toEqual(['first']);

      const already = new AbortController();
      already.abort();
      await expect(retrieveClassImages({ url: svc.knnUrl, query: 'x', outDir: out, count: 3, signal: already.signal })).rejects.toBeInstanceOf(AbortError);
    } finally {
      svc.entries = saved;
    }
  });
});
