/**
 * `customdiff retrieve` against a fake clip-retrieval service on 127.0.0.1, then `customdiff train`
 * on the folder it wrote.
 */
import * as fs from 'fs';
import * as http from 'http';
import type { AddressInfo } from 'net';
import * as path from 'path';
import sharp from 'sharp';
import { tempDir } from '../helpers/env';
import { pattern, rawImage } from '../train/util';
import { cli, cliAsync, events, FAST, writeImageFolders } from './util';

let tmp: { dir: string; cleanup: () => void };
let server: http.Server;
let base = '';
const images = new Map<string, Buffer>();
const knnRequests: Record<string, unknown>[] = [];

beforeAll(async () => {
  tmp = tempDir('cd-cli-retrieve-');
  for (let i = 0; i < 8; i++) {
    const img = sharp(rawImage(72, 72, 3, pattern(i + 40)), { raw: { width: 72, height: 72, channels: 3 } });
    images.set(`/img/${i}`, await (i % 2 ? img.png() : img.jpeg()).toBuffer());
  }
  server = http.createServer((req, res) => {
    if (req.method === 'POST' && req.url === '/knn-service') {
      let body = '';
      req.on('data', (c) => (body += c));
      req.on('end', () => {
        const q = JSON.parse(body) as { num_images: number };
        knnRequests.push(q);
        // Result 2 is a broken link: it is skipped.
        const results = Array.from({ length: Math.min(q.num_images, 8) }, (_, i) => ({ url: `${base}/img/${i === 2 ? 'missing' : i}`, caption: `a cat, number ${i}` }));
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify(results));
      });
      return;
    }
    const body = images.get(req.url ?? '');
    res.writeHead(body ? 200 : 404);
    res.end(body ?? 'not found');
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
afterAll(async () => {
  await new Promise<void>((resolve) => server.close(() => resolve()));
  tmp.cleanup();
});

describe('customdiff retrieve', () => {
  it('writes images/, caption.txt, urls.txt, images.txt that train reads; resumes; --overwrite starts over', async () => {
    const cwd = tmp.dir;
    const r = await cliAsync(['retrieve', '--url', `${base}/knn-service`, '--query', 'cat', '-n', '4', '-o', 'reg/cat', '--json'], cwd);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const res = events(r.stdout).pop()!;
    expect(res).toMatchObject({ event: 'result', count: 4, downloaded: 4, existing: 0 });
    expect((res.failed as { url: string }[]).map((f) => f.url)).toEqual([`${base}/img/missing`]);
    expect(knnRequests[0]).toMatchObject({ text: 'cat', num_images: 6, indice_name: 'laion_400m', aesthetic_weight: 0.1 });
    const out = path.join(cwd, 'reg', 'cat');
    expect(fs.readdirSync(path.join(out, 'images')).sort()).toEqual(['0.jpg', '1.jpg', '2.jpg', '3.jpg']);
    expect(fs.readFileSync(path.join(out, 'caption.txt'), 'utf8')).toBe('a cat, number 0\na cat, number 1\na cat, number 3\na cat, number 4\n');
    expect(fs.readFileSync(path.join(out, 'images.txt'), 'utf8').split('\n')[0]).toBe('reg/cat/images/0.jpg');

    // The folder is class data for train (captions from caption.txt).
    const { inst1 } = await writeImageFolders(path.join(cwd, 'imgs'));
    const t = cli(['train', ...FAST, '--instance-dir', inst1, '--instance-prompt', 'photo of a <new1> cat', '--class-dir', 'reg/cat', '--class-prompt', 'cat', '--max-train-steps', '1', '-o', 'out', '--quiet'], cwd);
    expect(t.stderr).toMatch(/^(warning: .*\n)*$/);
    expect(t.code).toBe(0);

    // A second run keeps what is there.
    const again = await cliAsync(['retrieve', '--url', `${base}/knn-service`, '--query', 'cat', '-n', '5', '-o', 'reg/cat'], cwd);
    expect(again.code).toBe(0);
    expect(again.stderr).toMatch(/earlier retrieval: keeping its images/);
    expect(again.stdout).toMatch(/^5 images for "cat" .* \(1 downloaded, 4 already there\)/m);

    // Files that no retrieval wrote are protected.
    fs.mkdirSync(path.join(cwd, 'mine'));
    fs.writeFileSync(path.join(cwd, 'mine', 'caption.txt'), 'my own\n');
    const refuse = await cliAsync(['retrieve', '--url', `${base}/knn-service`, '--query', 'cat', '-n', '2', '-o', 'mine'], cwd);
    expect(refuse.code).toBe(2);
    expect(refuse.stderr).toMatch(/already holds caption\.txt .*--overwrite/);
    expect(fs.readFileSync(path.join(cwd, 'mine', 'caption.txt'), 'utf8')).toBe('my own\n');
    const over = await cliAsync(['retrieve', '--url', `${base}/knn-service`, '--query', 'cat', '-n', '2', '-o', 'mine', '--overwrite', '--json'], cwd);
    expect(over.code).toBe(0);
    expect(events(over.stdout).pop()).toMatchObject({ count: 2, downloaded: 2, existing: 0 });
  });

  it('exits 2 without --url or --query, 1 when the service is down', async () => {
    const cwd = tmp.dir;
    const a = cli(['retrieve', '--query', 'cat', '-o', 'x'], cwd);
    expect(a.code).toBe(2);
    expect(a.stderr).toMatch(/needs --url/);
    expect(cli(['retrieve', '--url', 'ftp://x', '--query', 'cat', '-o', 'x'], cwd).code).toBe(2);
    expect(cli(['retrieve', '--url', `${base}/knn-service`, '-o', 'x'], cwd).stderr).toMatch(/needs --query/);
    const down = await cliAsync(['retrieve', '--url', 'http://127.0.0.1:9/knn-service', '--query', 'cat', '-n', '2', '-o', 'down'], cwd);
    expect(down.code).toBe(1);
    expect(down.stderr).toMatch(/did not answer/);
  });
});
