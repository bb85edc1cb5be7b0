#!/usr/bin/env node
'use strict';
// `npm run parity:full`: random-weight models with the exact stable-diffusion-v1-5 and
// stable-diffusion-2-1 (768-v) configs, generated on demand with diffusers (test/parity/make_full_size.py,
// never committed), loaded by this library with zero missing or unexpected keys, and compared with
// the reference forward passes recorded beside them (UNet at a small latent size, text encoder, VAE).
//
//   node scripts/parity-full.js [--dir DIR] [--models sd15,sd21] [--keep]
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');

const root = path.resolve(__dirname, '..');
const cd = require(path.join(root, 'lib'));

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

function relError(a, b) {
  const x = a.toArray();
  const y = b.toArray();
  if (x.length !== y.length) throw new Error(`size mismatch ${x.length} vs ${y.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < x.length; i++) {
    const d = x[i] - y[i];
    num += d * d;
    den += y[i] * y[i];
  }
  return Math.sqrt(num) / Math.sqrt(den);
}

async function checkModel(dir, name, variant) {
  const ref = (await cd.loadSafetensors(path.join(dir, 'reference', 'reference.safetensors'))).tensors;
  const rows = [];
  const opts = { dtype: 'float32', ...(variant ? { variant } : {}) };
  const t0 = Date.now();
  const unet = await cd.UNet.load(path.join(dir, 'unet'), opts);
  const out = await unet.forward(ref['unet.sample'], ref['unet.timesteps'], ref['unet.encoder_hidden_states']);
  rows.push({ model: name, variant: variant || 'main', part: 'unet forward', relError: relError(out, ref['unet.out']) });
  unet.dispose();
  const te = await cd.TextEncoder.load(path.join(dir, 'text_encoder'), opts);
  const enc = await te.encode(ref['text.input_ids'], { outputHiddenStates: true });
  rows.push({ model: name, variant: variant || 'main', part: 'text last_hidden_state', relError: relError(enc.lastHiddenState, ref['text.last_hidden_state']) });
  const pen = enc.hiddenStates[enc.hiddenStates.length - 2];
  rows.push({ model: name, variant: variant || 'main', part: 'text penultimate (raw)', relError: relError(pen, ref['text.hidden_states_penultimate']) });
  te.dispose();
  const vae = await cd.AutoencoderKL.load(path.join(dir, 'vae'), opts);
  const dist = await vae.encode(ref['vae.image']);
  rows.push({ model: name, variant: variant || 'main', part: 'vae mean', relError: relError(dist.mean, ref['vae.mean']) });
  rows.push({ model: name, variant: variant || 'main', part: 'vae logvar', relError: relError(dist.logvar, ref['vae.logvar']) });
  const dec = await vae.decode(ref['vae.latents']);
  rows.push({ model: name, variant: variant || 'main', part: 'vae decoded', relError: relError(dec, ref['vae.decoded']) });
  vae.dispose();
  for (const r of rows) r.seconds = +((Date.now() - t0) / 1000).toFixed(1);
  return rows;
}

async function main() {
  const models = arg('--models', 'sd15,sd21');
  const given = arg('--dir', null);
  const dir = given || fs.mkdtempSync(path.join(os.tmpdir(), 'cd-parity-full-'));
  const keep = process.argv.includes('--keep') || !!given;
  try {
    if (!models.split(',').every((m) => fs.existsSync(path.join(dir, m, 'reference', 'reference.safetensors')))) {
      process.stderr.write(`parity:full: generating ${models} random-weight models in ${dir} (minutes, ~10 GB)\n`);
      const r = spawnSync(process.env.PYTHON || 'python3', [path.join(root, 'test', 'parity', 'make_full_size.py'), dir, '--models', models], {
        stdio: 'inherit',
      });
      if (r.status !== 0) throw new Error('make_full_size.py failed');
    }
    const rows = [];
    for (const m of models.split(',')) {
      const mdir = path.join(dir, m);
      rows.push(...(await checkModel(mdir, m)));
      if (fs.existsSync(path.join(mdir, 'unet', 'diffusion_pytorch_model.fp16.safetensors'))) rows.push(...(await checkModel(mdir, m, 'fp16')));
    }
    const ok = rows.every((r) => r.relError <= 1e-4);
    for (const r of rows) process.stdout.write(`${r.model.padEnd(5)} ${r.variant.padEnd(5)} ${r.part.padEnd(26)} rel.err ${r.relError.toExponential(2)}\n`);
    process.stdout.write(`${ok ? 'PASS' : 'FAIL'}: every model loaded with no missing or unexpected keys; tolerance 1e-4\n`);
    if (!ok) process.exitCode = 1;
  } finally {
    if (!keep) fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  process.stderr.write(`${e.name || 'Error'}: ${e.message}\n`);
  process.exit(1);
});
