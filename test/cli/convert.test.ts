/**
 * `customdiff convert` through bin/customdiff.js: a trained delta (and its compressed form) to every
 * format and back, bit for bit; the LoRA export; usage errors and --overwrite.
 */
import * as fs from 'fs';
import * as path from 'path';
import { loadSafetensors, readSafetensorsHeader } from '../../src/core/safetensors';
import type { Tensor } from '../../src/core/tensor';
import { tempDir } from '../helpers/env';
import { cli, events, FAST, MODEL, mtime, writeImageFolders } from './util';

let tmp: { dir: string; cleanup: () => void };
let cwd: string;
let full: string;
let compressed: string;

beforeAll(async () => {
  tmp = tempDir('cd-cli-convert-');
  cwd = tmp.dir;
  const { inst1 } = await writeImageFolders(cwd);
  const t = cli(['train', ...FAST, '--instance-dir', inst1, '--instance-prompt', 'photo of a <new1> man', '--max-train-steps', '2', '-o', 'run', '--quiet'], cwd);
  if (t.code !== 0) throw new Error(t.stderr);
  full = path.join(cwd, 'run', 'delta.safetensors');
  const c = cli(['compress', full, '-m', MODEL, '--rank', '3', '--quiet'], cwd);
  if (c.code !== 0) throw new Error(c.stderr);
  compressed = path.join(cwd, 'run', 'compressed_delta.safetensors');
});
afterAll(() => tmp.cleanup());

function bytes(t: Tensor): Buffer {
  const a = t.toArray() as Float32Array;
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

async function expectSameTensors(a: string, b: string): Promise<void> {
  const x = (await loadSafetensors(a)).tensors;
  const y = (await loadSafetensors(b)).tensors;
  expect(Object.keys(y).sort()).toEqual(Object.keys(x).sort());
  for (const k of Object.keys(x)) expect({ k, same: bytes(x[k]).equals(bytes(y[k])) }).toEqual({ k, same: true });
}

function convert(args: string[]): Record<string, unknown> {
  const r = cli(['convert', ...args, '--json'], cwd);
  expect({ args, stderr: r.stderr, code: r.code }).toEqual({ args, stderr: '', code: 0 });
  return events(r.stdout).pop()!;
}

describe('customdiff convert', () => {
  it.each([
    ['compvis', 'delta_epoch=000000.ckpt', 'compvis'],
    ['delta-bin', 'delta.bin', 'diffusers-delta-bin'],
    ['diffusers', 'diffusers', 'diffusers-attn-procs'],
  ])('ours → %s → ours is exact (full delta)', async (to, name, sourceFormat) => {
    const out = path.join(cwd, 'full', name);
    const res = convert([full, '--to', to, '-o', out]);
    expect((res.files as string[]).every((f) => fs.existsSync(f))).toBe(true);
    expect((res.tokens as { token: string }[]).map((t) => t.token)).toEqual(['<new1>']);
    const back = path.join(cwd, 'full', `back-${to}.safetensors`);
    // A diffusers folder is read through its weights file (tokens from the sibling files).
    const b = convert([out, '--to', 'ours', '-o', back, '-m', MODEL]);
    expect(b.sourceFormat).toBe(sourceFormat);
    await expectSameTensors(full, back);
    const meta = (await readSafetensorsHeader(back)).metadata;
    expect(meta.kind).toBe('full');
    expect(JSON.parse(meta.tokens).map((t: { token: string; id: number }) => [t.token, t.id])).toEqual([['<new1>', 1514]]);
  });

  it('keeps the factors of a compressed delta (compvis, delta-bin) and writes full weights for diffusers', async () => {
    for (const [to, name] of [
      ['compvis', 'compressed_delta_epoch=000000.ckpt'],
      ['delta-bin', 'compressed_delta.bin'],
    ]) {
      const out = path.join(cwd, 'comp', name);
      convert([compressed, '--to', to, '-o', out]);
      const back = path.join(cwd, 'comp', `back-${to}.safetensors`);
      convert([out, '--to', 'ours', '-o', back, '-m', MODEL]);
      expect((await readSafetensorsHeader(back)).metadata.kind).toBe('compressed');
      await expectSameTensors(compressed, back);
    }
    const noModel = cli(['convert', compressed, '--to', 'diffusers', '-o', path.join(cwd, 'comp', 'd')], cwd);
    expect(noModel.code).toBe(2);
    expect(noModel.stderr).toMatch(/needs --model/);
    convert([compressed, '--to', 'diffusers', '-o', path.join(cwd, 'comp', 'd'), '-m', MODEL]);
    const i = events(cli(['inspect', path.join(cwd, 'comp', 'd', 'pytorch_custom_diffusion_weights.safetensors'), '--json'], cwd).stdout)[0];
    expect(i).toMatchObject({ format: 'diffusers-attn-procs', kind: 'full' });
  });

  it('exports a LoRA and embeddings; a full delta needs --model and --rank', async () => {
    const bad = cli(['convert', full, '--to', 'lora', '-o', path.join(cwd, 'lora')], cwd);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/needs --model/);
    const res = convert([full, '--to', 'lora', '-o', path.join(cwd, 'lora'), '-m', MODEL, '--rank', '2']);
    expect(res.tokens).toEqual([expect.objectContaining({ token: '<new1>', trigger: 'new1' })]);
    const lora = await readSafetensorsHeader(path.join(cwd, 'lora', 'custom_diffusion.safetensors'));
    const downs = lora.entries.filter((e) => e.name.endsWith('.lora_down.weight'));
    expect(downs).toHaveLength(14);
    expect(downs.every((e) => e.shape[0] === 2 && e.name.startsWith('lora_unet_'))).toBe(true);
    expect(fs.existsSync(path.join(cwd, 'lora', 'embeddings', 'new1.safetensors'))).toBe(true);
    // A compressed delta exports its own factors.
    const c = convert([compressed, '--to', 'lora', '-o', path.join(cwd, 'lora-c'), '--lora-name', 'cat']);
    expect((c.files as string[]).map((f) => path.relative(cwd, f))).toEqual([path.join('lora-c', 'cat.safetensors'), path.join('lora-c', 'embeddings', 'new1.safetensors')]);
  });

  it('never overwrites without --overwrite; refuses options of other formats', () => {
    const out = path.join(cwd, 'once.bin');
    convert([full, '--to', 'delta-bin', '-o', out]);
    const before = mtime(out);
    const again = cli(['convert', full, '--to', 'delta-bin', '-o', out], cwd);
    expect(again.code).toBe(2);
    expect(again.stderr).toMatch(/already exists; pass --overwrite/);
    expect(mtime(out)).toBe(before);
    convert([full, '--to', 'delta-bin', '-o', out, '--overwrite']);
    expect(mtime(out)).toBeGreaterThan(before);

    const dir = path.join(cwd, 'full', 'diffusers');
    const busy = cli(['convert', full, '--to', 'diffusers', '-o', dir], cwd);
    expect(busy.code).toBe(2);
    expect(busy.stderr).toMatch(/is not empty; pass --overwrite/);
    fs.writeFileSync(path.join(dir, '<new2>.safetensors'), 'stale');
    convert([full, '--to', 'diffusers', '-o', dir, '--overwrite']);
    expect(fs.existsSync(path.join(dir, '<new2>.safetensors'))).toBe(false);

    expect(cli(['convert', full, '-o', 'x.bin'], cwd).stderr).toMatch(/needs --to/);
    expect(cli(['convert', full, '--to', 'onnx', '-o', 'x'], cwd).code).toBe(2);
    const r = cli(['convert', full, '--to', 'compvis', '-o', 'x.ckpt', '--rank', '4'], cwd);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--rank applies to --to lora only/);
    expect(cli(['convert', 'missing.safetensors', '--to', 'ours', '-o', 'y.safetensors'], cwd).stderr).toMatch(/does not exist/);
  });
});
