/**
 * The GPU check's scripts on the CPU, as they would run on a bare GPU machine: scripts/gpu/pack.sh
 * makes a pack (without the Node.js binary, which this machine has), the checkout is copied as the
 * device tool copies it (tracked and untracked-not-ignored files: no node_modules, no lib/), and
 * scripts/gpu/run.sh unpacks the pack into the copy and runs every section with the smallest
 * budgets: a reduced-width random SD1.5 model, parity in float32/float16/bfloat16 on the tiny
 * fixture, the training and sampling benchmarks against diffusers, concept switch and a
 * mixed-concept batch. The results file must hold every section, with what the CPU cannot do marked
 * as skipped.
 */
import { execFileSync, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { loadAddon } from '../../src/native';
import { repoRoot, tempDir } from '../helpers/env';

jest.setTimeout(8 * 60 * 1000);

const python = process.env.PYTHON || 'python3';
const hasDiffusers = spawnSync(python, ['-c', 'import diffusers, transformers'], { encoding: 'utf8' }).status === 0;

interface Section {
  status: string;
  seconds: number;
  reason?: string;
  error?: string;
  data?: Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
}

describe('scripts/gpu: pack, unpack and run on the CPU', () => {
  let work: { dir: string; cleanup: () => void };
  let results: { status: string; mode: Record<string, unknown>; sections: Record<string, Section>; summary: Record<string, any> }; // eslint-disable-line @typescript-eslint/no-explicit-any
  let markdown: string;
  let log: string;
  const timings: string[] = [];

  beforeAll(() => {
    work = tempDir('cd-gpu-script-');
    const pack = path.join(work.dir, 'pack');
    const tree = path.join(work.dir, 'tree');
    const out = path.join(work.dir, 'out');
    let t0 = Date.now();
    // The compiled lib/ of `npm test`'s pretest when there is one (else pack.sh compiles), fast compression.
    const libFrom = fs.existsSync(path.join(repoRoot, 'lib', 'index.js')) ? ['--lib-from', path.join(repoRoot, 'lib')] : [];
    const p = spawnSync('bash', [path.join(repoRoot, 'scripts', 'gpu', 'pack.sh'), '--no-node', '--out', pack, ...libFrom], {
      cwd: repoRoot,
      encoding: 'utf8',
      env: { ...process.env, XZ_OPT: '-0' },
    });
    // The size check may refuse the working tree of a busy checkout; the pack itself is what matters here.
    expect(fs.existsSync(path.join(pack, 'MANIFEST.json'))).toBe(true);
    for (const f of ['node_modules.tar.xz', 'lib.tar.xz', 'python-site.tar.xz']) expect(fs.existsSync(path.join(pack, f))).toBe(true);
    expect(p.stdout + p.stderr).toMatch(/pack: .* MiB/);
    timings.push(`pack.sh --no-node ${libFrom.length ? '--lib-from lib ' : ''}${((Date.now() - t0) / 1000).toFixed(1)} s`);

    // The checkout as the device tool sends it.
    const files = execFileSync('git', ['ls-files', '-z', '--cached', '--others', '--exclude-standard'], { cwd: repoRoot, encoding: 'utf8' })
      .split('\0')
      .filter(Boolean);
    for (const f of files) {
      const src = path.join(repoRoot, f);
      if (!fs.existsSync(src) || !fs.statSync(src).isFile()) continue;
      fs.mkdirSync(path.dirname(path.join(tree, f)), { recursive: true });
      fs.copyFileSync(src, path.join(tree, f));
    }
    expect(fs.existsSync(path.join(tree, 'node_modules'))).toBe(false);
    expect(fs.existsSync(path.join(tree, 'lib'))).toBe(false);

    t0 = Date.now();
    const addon = loadAddon().file;
    const r = spawnSync(
      'bash',
      [
        path.join(tree, 'scripts', 'gpu', 'run.sh'),
        '--pack', pack,
        '--device', 'cpu',
        '--tiny',
        '--budget', '300',
        '--addon', addon,
        '--out', out,
        '--work', path.join(work.dir, 'work'),
      ],
      { cwd: tree, encoding: 'utf8', env: { ...process.env, OUT: '' }, maxBuffer: 64 * 1024 * 1024 },
    );
    timings.push(`run.sh --device cpu --tiny ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    log = `${r.stdout}\n${r.stderr}`;
    if (r.status !== 0) throw new Error(`run.sh failed (${r.status}):\n${log.slice(-4000)}`);
    results = JSON.parse(fs.readFileSync(path.join(out, 'gpu-run.json'), 'utf8'));
    markdown = fs.readFileSync(path.join(out, 'gpu-run.md'), 'utf8');
    expect(fs.existsSync(path.join(out, 'run.log'))).toBe(true);
    // What the pack brought into the copy.
    expect(fs.existsSync(path.join(tree, 'node_modules', 'node-addon-api'))).toBe(true);
    expect(fs.existsSync(path.join(tree, 'lib', 'index.js'))).toBe(true);
  });

  afterAll(() => {
    console.log(`GPU check scripts on the CPU: ${timings.join('; ')}; sections ${Object.entries(results?.sections ?? {}).map(([k, s]) => `${k} ${s.seconds} s`).join(', ')}`);
    work?.cleanup();
  });

  it('finishes every section, writes JSON and a table', () => {
    expect(results.mode).toMatchObject({ device: 'cpu', tiny: true });
    for (const name of ['env', 'build', 'model', 'parity', 'train', 'checkpointing', 'sample']) {
      expect(results.sections[name]).toBeDefined();
    }
    const bad = Object.entries(results.sections).filter(([, s]) => s.status !== 'ok' && s.status !== 'skipped');
    expect(bad.map(([k, s]) => `${k}: ${s.status} ${s.error ?? ''}`)).toEqual([]);
    expect(results.status).toBe('done');
    expect(markdown).toMatch(/\| Figure \| Ours \| diffusers \|/);
    expect(markdown).toMatch(/CPU \/ tiny mode: a test of the scripts, not a performance result/);
    expect(markdown).toMatch(/\| float16 \|/);
  });

  it('makes the model with the script when diffusers is there (else falls back to the fixture)', () => {
    if (hasDiffusers) {
      expect(results.sections.model.status).toBe('ok');
      expect(results.sections.model.data).toMatchObject({ size: 'tiny', device: 'cpu' });
      expect(String(results.mode.model)).toMatch(/sd15-tiny-random$/);
    } else {
      expect(String(results.mode.model)).toMatch(/fixtures[/\\]parity[/\\]sd1[/\\]model$/);
    }
  });

  it('runs parity per dtype, and says what the CPU skips', () => {
    const s = results.sections.parity.data!.summary as Record<string, { checks: number; passed: number; errors: number; skipped: string[] }>;
    expect(Object.keys(s).sort()).toEqual(['bfloat16', 'float16', 'float32']);
    for (const dt of ['float32', 'float16', 'bfloat16']) {
      expect(s[dt].checks).toBeGreaterThan(5);
      expect(s[dt].errors).toBe(0);
      expect(s[dt].passed).toBe(s[dt].checks);
    }
    // fp16 autocast training needs CUDA: recorded as skipped on the CPU, never silently dropped.
    expect(s.float16.skipped.some((x) => /train step \(mixedPrecision fp16\): cpu:/.test(x))).toBe(true);
    // The training step runs a second time with gradient checkpointing, in each dtype the CPU can run.
    const rows = results.sections.parity.data!.rows as { dtype: string; case: string; pass?: boolean }[];
    for (const dt of ['float32', 'bfloat16']) {
      const ckpt = rows.filter((r) => r.dtype === dt && /gradient checkpointing/.test(r.case));
      expect(ckpt.length).toBeGreaterThanOrEqual(3);
      expect(ckpt.every((r) => r.pass === true)).toBe(true);
    }
    expect(results.sections.parity).toMatchObject({ tf32: 'n/a' });
  });

  it('benchmarks a training step against the reference step', () => {
    const t = results.sections.train.data!;
    expect(t.config).toMatchObject({ device: 'cpu', mixedPrecision: 'bf16' });
    expect(t.ours.median_ms).toBeGreaterThan(0);
    expect(t.ours.pid).toBeGreaterThan(0);
    if (hasDiffusers) {
      expect(t.diffusers.median_ms).toBeGreaterThan(0);
      expect(t.ratio_median).toBeGreaterThan(0);
      expect(results.summary.train.projected250StepsSeconds).toBeGreaterThan(0);
    } else {
      expect(typeof t.diffusers.error).toBe('string');
    }
    // CPU: no allocator figures, recorded as such.
    expect(t.ours.memory).toBeNull();
  });

  it('measures gradient checkpointing: memory of the steps with and without it, and the time ratio', () => {
    const c = results.sections.checkpointing.data!;
    expect(c.settings).toMatchObject({ device: 'cpu', mixedPrecision: 'bf16', memory: 'resident set (VmHWM)' });
    for (const mode of [c.plain, c.checkpointing]) {
      expect(mode.baselineMiB).toBeGreaterThan(0);
      expect(mode.peakMiB).toBeGreaterThanOrEqual(mode.baselineMiB);
      expect(Number.isFinite(mode.loss)).toBe(true);
    }
    expect(c.timeRatio).toBeGreaterThan(0);
    expect(results.summary.checkpointing).toMatchObject({ plainStepMiB: c.plain.stepMiB, checkpointingStepMiB: c.checkpointing.stepMiB });
    expect(markdown).toMatch(/\| Gradient checkpointing: memory the training steps take/);
  });

  it('benchmarks sampling, concept switch and a mixed-concept batch', () => {
    const g = results.sections.sample.data!;
    expect(g).toMatchObject({ device: 'cpu', dtype: 'float16', method: 'calls' });
    // A step is a difference of two call times: at toy size on a busy CPU it is noise, but a number.
    expect(Number.isFinite(g.oursItPerSec)).toBe(true);
    expect(g.endToEndMs.ours).toBeGreaterThan(0);
    if (hasDiffusers) expect(Number.isFinite(g.diffusersItPerSec)).toBe(true);
    else expect(typeof g.reference.error).toBe('string');
    expect(g.conceptSwitch.applyUnapplyMs).toBeGreaterThan(0);
    expect(typeof g.conceptSwitch.generateSwitchExtraMs).toBe('number');
    expect(g.mixedConcepts.images).toBe(2);
    expect(g.mixedConcepts.mixedImagesPerSec).toBeGreaterThan(0);
    expect(g.mixedConcepts.separateImagesPerSec).toBeGreaterThan(0);
  });
});

describe('scripts/gpu/reference_drift.py', () => {
  (hasDiffusers ? it : it.skip)('on the CPU, reproduces the committed training-step fixture exactly', () => {
    // The fixture's generator runs on a device for the drift check; on the CPU it must not change a bit.
    const r = spawnSync(python, [path.join(repoRoot, 'scripts', 'gpu', 'reference_drift.py'), '--device', 'cpu'], { cwd: repoRoot, encoding: 'utf8' });
    expect(r.status).toBe(0);
    const out = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { configs: Record<string, Record<string, number>> };
    expect(Object.keys(out.configs).sort()).toEqual(['sd1', 'sd2']);
    for (const rows of Object.values(out.configs)) {
      expect(Object.keys(rows)).toHaveLength(6);
      for (const v of Object.values(rows)) expect(v).toBe(0);
    }
  });
});
