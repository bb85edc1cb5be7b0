/**
 * The command-line examples of README.md run as written: every `customdiff …` line of its ```bash
 * blocks (backslash continuations joined; `npx customdiff` as `customdiff`) runs through bash, in
 * document order, in one temporary folder, against the tiny SD1 fixture model. What a reader
 * supplies is supplied here: `$MODEL` is the fixture model, `$KNN_URL` a fake clip-retrieval
 * service, the photos under `data/<name>/`, the concepts list of the ```json block and prompt
 * files. Small sizes and counts are appended to each line (the command line's last value of an
 * option wins), so the whole README runs in about a minute. A README command that fails fails here.
 */
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as http from 'http';
import type { AddressInfo } from 'net';
import * as path from 'path';
import sharp from 'sharp';
import { repoRoot, tempDir } from '../helpers/env';
import { pattern, rawImage, writeImage } from '../train/util';
import { BIN, MODEL } from './util';

export interface ReadmeCommand {
  /** 1-based line of README.md where the command starts. */
  line: number;
  /** The command with continuations joined, `npx customdiff` made `customdiff`. */
  command: string;
  /** The subcommand, e.g. `train`. */
  name: string;
}

/** The `customdiff` lines of the ```bash blocks of a Markdown text. */
export function readmeCommands(markdown: string): ReadmeCommand[] {
  const lines = markdown.split('\n');
  const out: ReadmeCommand[] = [];
  let inBash = false;
  for (let i = 0; i < lines.length; i++) {
    const fence = /^\s*```(\S*)\s*$/.exec(lines[i]);
    if (fence) {
      inBash = !inBash && fence[1] === 'bash';
      continue;
    }
    if (!inBash) continue;
    const start = i;
    let text = lines[i].trim();
    while (text.endsWith('\\') && i + 1 < lines.length) text = `${text.slice(0, -1).trimEnd()} ${lines[++i].trim()}`;
    const m = /^(?:npx\s+)?customdiff\s+(\S+)/.exec(text);
    if (!m) continue;
    out.push({ line: start + 1, command: text.replace(/^npx\s+/, ''), name: m[1] });
  }
  return out;
}

/** The ```json blocks of a Markdown text, parsed. */
export function readmeJsonBlocks(markdown: string): unknown[] {
  return [...markdown.matchAll(/^```json\n([\s\S]*?)^```$/gm)].map((m) => JSON.parse(m[1]) as unknown);
}

/** What each command gets appended: the tiny model's sizes, few steps and images. */
const OVERRIDES: Record<string, string[]> = {
  train: [
    '--resolution', '32', '--train-batch-size', '1', '--noaug', '--learning-rate', '1e-4',
    // The tiny tokenizer has no "ktn"/"pll": raw entries of its vocabulary instead.
    '--initializer-token', 'man</w>+a</w>',
    '--max-train-steps', '2', '--num-class-images', '2', '--validation-steps', '2', '--num-validation-images', '1',
  ],
  sample: ['--steps', '2'],
  'class-images': ['-n', '2', '--steps', '2'],
  retrieve: ['-n', '3'],
};

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

const markdown = fs.readFileSync(path.join(repoRoot, 'README.md'), 'utf8');
const commands = readmeCommands(markdown);

let tmp: { dir: string; cleanup: () => void };
let server: http.Server;
let env: NodeJS.ProcessEnv;

beforeAll(async () => {
  tmp = tempDir('cd-cli-readme-');
  const cwd = tmp.dir;

  // `customdiff` on the PATH is this checkout's binary.
  const binDir = path.join(cwd, '.bin');
  fs.mkdirSync(binDir);
  fs.writeFileSync(path.join(binDir, 'customdiff'), `#!/bin/sh\nexec ${shellQuote(process.execPath)} ${shellQuote(BIN)} "$@"\n`, { mode: 0o755 });

  // Photos of every data/<name> folder the README names, its concepts list, its prompt files.
  const named = new Set([...markdown.matchAll(/(?:\.\/)?\bdata\/[\w-]+/g)].map((m) => m[0].replace(/^\.\//, '')));
  let seed = 1;
  for (const dir of named) for (let i = 0; i < 3; i++) await writeImage(path.join(cwd, dir, `${i}.png`), 64, 64, pattern(seed++));
  const lists = readmeJsonBlocks(markdown).filter((b) => Array.isArray(b) && b.some((c) => c && typeof c === 'object' && 'instance_data_dir' in c));
  for (const c of commands) {
    const list = /--concepts-list\s+(\S+)/.exec(c.command)?.[1];
    if (list) {
      expect(lists).toHaveLength(1);
      fs.writeFileSync(path.join(cwd, list), JSON.stringify(lists[0], null, 2));
    }
    const prompts = /--prompts-file\s+(\S+)/.exec(c.command)?.[1];
    if (prompts) fs.writeFileSync(path.join(cwd, prompts), '<new1> cat playing with a ball\n<new1> cat in a bucket\n');
  }

  // A clip-retrieval service: results with captions, images served from here.
  const images: Buffer[] = [];
  for (let i = 0; i < 8; i++) images.push(await sharp(rawImage(72, 72, 3, pattern(i + 50)), { raw: { width: 72, height: 72, channels: 3 } }).png().toBuffer());
  let base = '';
  server = http.createServer((req, res) => {
    if (req.method === 'POST' && req.url === '/knn-service') {
      let body = '';
      req.on('data', (c) => (body += c));
      req.on('end', () => {
        const q = JSON.parse(body) as { text: string; num_images: number };
        const results = Array.from({ length: Math.min(q.num_images, images.length) }, (_, i) => ({ url: `${base}/img/${i}`, caption: `a ${q.text}, number ${i}` }));
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify(results));
      });
      return;
    }
    const m = /^\/img\/(\d+)$/.exec(req.url ?? '');
    const img = m ? images[Number(m[1])] : undefined;
    res.writeHead(img ? 200 : 404);
    res.end(img ?? 'not found');
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  env = { ...process.env, MODEL, KNN_URL: `${base}/knn-service`, PATH: `${binDir}${path.delimiter}${process.env.PATH ?? ''}` };
});

afterAll(async () => {
  await new Promise<void>((resolve) => server?.close(() => resolve()));
  tmp?.cleanup();
});

/** Runs a shell command line without blocking the event loop (the fake service answers meanwhile). */
function run(line: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('bash', ['-c', line], { cwd: tmp.dir, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

describe('README.md command-line examples', () => {
  it('show every command, as lines that take appended options', () => {
    const names = new Set(commands.map((c) => c.name));
    for (const c of ['train', 'sample', 'class-images', 'retrieve', 'compose', 'compress', 'convert', 'inspect', 'doctor']) expect({ c, shown: names.has(c) }).toEqual({ c, shown: true });
    // A trailing comment would swallow the appended options.
    for (const c of commands) expect({ line: c.line, comment: /\s#/.test(c.command.replace(/"[^"]*"|'[^']*'/g, '')) }).toEqual({ line: c.line, comment: false });
  });

  it.each(commands.map((c) => [`README.md:${c.line}: ${c.command}`, c] as const))('%s', async (_, c) => {
    const line = [c.command, ...(OVERRIDES[c.name] ?? []).map(shellQuote)].join(' ');
    const r = await run(line);
    if (r.code !== 0) throw new Error(`README.md line ${c.line} failed (exit ${r.code}):\n$ ${line}\n${r.stderr}${r.stdout}`);
    expect(r.code).toBe(0);
  });

  it('left what the examples promise', () => {
    const out = (p: string) => path.join(tmp.dir, p);
    for (const f of [
      'out/cat/delta.safetensors',
      'out/cat-gen/class_images/images.txt',
      'gen_reg/samples_cat/images.txt',
      'out/pot+cat/delta.safetensors',
      'out/pot+cat-merged.safetensors',
      'out/cat/compressed_delta.safetensors',
      'out/me-crossattn/delta.safetensors',
      'samples/cat/grid.png',
      'export/cat/delta.bin',
    ]) {
      expect({ f, exists: fs.existsSync(out(f)) }).toEqual({ f, exists: true });
    }
    expect(fs.readdirSync(out('out/cat/validation'))).toEqual(['step-2']);
  });
});
