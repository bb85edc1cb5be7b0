#!/usr/bin/env node
'use strict';
// The parity suite on one device in several dtypes: the committed tiny-model fixtures
// (test/fixtures/parity/{sd1,sd2}, test/fixtures/train-step; references computed by diffusers and
// transformers in float32 on a CPU) run through this library on --device with the weights in each
// dtype, and the relative error ‖ours − ref‖/‖ref‖ of every output is checked against a tolerance
// suited to that dtype. On CUDA, run it with NVIDIA_TF32_OVERRIDE=0 (run.py does): the TF32
// convolutions LibTorch and PyTorch enable by default move even diffusers' own float32 K/V update
// 5-8% away from the CPU fixture (scripts/gpu/reference_drift.py), as much as they move ours.
//
//   node scripts/gpu/parity.js [--device cuda] [--dtypes float32,float16,bfloat16] [--configs sd1,sd2] [--json FILE]
//
// Cases per config and dtype: UNet forward (3 cases), K/V gradients (float32), text encoder with an
// added token (last hidden state, clip skip 1), VAE (posterior mean, log-variance, decoder),
// whole generations against StableDiffusionPipeline (DDIM, DPM-Solver++, DDIM with a concept), and
// two Custom Diffusion training steps against the diffusers reference step with mixedPrecision
// 'no' / 'fp16' / 'bf16'. A dtype the device cannot run is recorded as skipped with the reason.
const fs = require('fs');
const path = require('path');

const root = path.resolve(__dirname, '..', '..');
const lib = process.env.CUSTOM_DIFFUSION_LIB || path.join(root, 'lib');
const cd = require(lib);
const { UNet } = require(path.join(lib, 'model', 'unet'));
const { TrainStep } = require(path.join(lib, 'train', 'trainer'));

const FIX = path.join(root, 'test', 'fixtures');

/**
 * Relative-error tolerances by dtype and kind of output. float32 is for a run without TF32 (an H200
 * gave a worst of 1.2e-3, on a CPU ~1e-3 in the update and ~1e-6 elsewhere).
 * `update` is the first AdamW updates of the K/V weights, which are lr·sign(g) for most elements:
 * its error is 2·√(fraction of sign flips), so mixed precision is allowed a few percent of flips in
 * the tiniest gradients (bf16 on a CPU: 0.23–0.34, i.e. 1.3–3% flipped) while loss and gradient
 * norm (`train`) stay tight. A wrong kernel or layout gives errors of order 1 everywhere.
 */
const TOL = {
  float32: { forward: 5e-3, grad: 1e-2, pipeline: 1e-2, train: 5e-3, update: 2e-2 },
  float16: { forward: 1e-2, grad: 5e-2, pipeline: 3e-2, train: 1e-2, update: 0.5 },
  bfloat16: { forward: 6e-2, grad: 2e-1, pipeline: 1e-1, train: 3e-2, update: 0.6 },
};

function args() {
  const a = { device: 'cuda', dtypes: 'float32,float16,bfloat16', configs: 'sd1,sd2', json: null };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i].replace(/^--/, '');
    if (!(k in a)) throw new Error(`unknown option ${argv[i]}`);
    a[k] = argv[++i];
  }
  return a;
}

async function f64(t) {
  const c = t.dtype === 'float64' && t.device === 'cpu' ? t : await t.to({ dtype: 'float64', device: 'cpu' });
  return c.toArray();
}

async function relError(a, b) {
  if (a.shape.join(',') !== b.shape.join(',')) throw new Error(`shape [${a.shape}] vs reference [${b.shape}]`);
  const x = await f64(a);
  const y = await f64(b);
  let num = 0;
  let den = 0;
  for (let i = 0; i < y.length; i++) {
    const d = x[i] - y[i];
    num += d * d;
    den += y[i] * y[i];
  }
  if (!Number.isFinite(num)) return Infinity;
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

/** Moves a fixture tensor to the device; floating tensors also to `dtype`. */
async function put(t, device, dtype) {
  const floating = t.dtype === 'float32' || t.dtype === 'float64' || t.dtype === 'float16' || t.dtype === 'bfloat16';
  return t.to(floating && dtype ? { dtype, device } : { device });
}

async function loadCase(config, name) {
  return (await cd.loadSafetensors(path.join(FIX, 'parity', config, 'cases', `${name}.safetensors`))).tensors;
}

/** A message that says the device cannot do this dtype at all (rather than a bug of ours). */
function unsupported(e) {
  return /not implemented for '(Half|BFloat16)'|"[a-z_0-9]+" not implemented for|Unsupported.*(Half|BFloat16)|needs a CUDA device/i.test(
    String(e && e.message),
  );
}

async function runCase(rows, base, fn) {
  const t0 = performance.now();
  try {
    const metrics = await fn();
    for (const [metric, value, kind] of metrics) {
      const tol = TOL[base.dtype][kind];
      rows.push({ ...base, metric, relError: value, tol, pass: Number.isFinite(value) && value <= tol, ms: Math.round(performance.now() - t0) });
    }
  } catch (e) {
    if (base.device === 'cpu' && base.dtype !== 'float32' && unsupported(e)) {
      rows.push({ ...base, skipped: `cpu: ${String(e.message).split('\n')[0].slice(0, 160)}` });
    } else {
      rows.push({ ...base, error: String((e && e.stack) || e).split('\n').slice(0, 4).join(' | '), pass: false });
    }
  }
}

async function unetCases(rows, config, device, dtype) {
  const dir = path.join(FIX, 'parity', config, 'model');
  let unet;
  await runCase(rows, { config, device, dtype, case: 'unet load' }, async () => {
    unet = await UNet.load(path.join(dir, 'unet'), { dtype, device });
    return [];
  });
  if (!unet) return;
  try {
    for (const name of ['unet_forward', 'unet_forward_float_t', 'unet_forward_odd']) {
      await runCase(rows, { config, device, dtype, case: name }, async () => {
        const c = await loadCase(config, name);
        const out = await unet.forward(await put(c.sample, device, dtype), await put(c.timesteps, device, null), await put(c.encoder_hidden_states, device, dtype));
        return [['out', await relError(out, c.out), 'forward']];
      });
    }
    if (dtype === 'float32') {
      await runCase(rows, { config, device, dtype, case: 'unet_backward (K/V grads)' }, async () => {
        const c = await loadCase(config, 'unet_backward');
        unet.setTrainable('crossattn_kv');
        const r = await unet.forwardBackward(
          await put(c.sample, device, dtype),
          await put(c.timesteps, device, null),
          await put(c.encoder_hidden_states, device, dtype),
          await put(c.grad_out, device, dtype),
        );
        let worst = 0;
        for (const [n, g] of Object.entries(r.grads)) worst = Math.max(worst, await relError(g, c[`grad.${n}`]));
        if (Object.keys(r.grads).length === 0) throw new Error('no gradients returned');
        unet.setTrainable('none');
        return [
          ['out', await relError(r.out, c.out), 'forward'],
          [`worst of ${Object.keys(r.grads).length} K/V grads`, worst, 'grad'],
        ];
      });
    } else {
      rows.push({ config, device, dtype, case: 'unet_backward (K/V grads)', skipped: 'float32 only (half-precision training is the mixed-precision train step below)' });
    }
  } finally {
    unet.dispose();
  }
}

async function textCases(rows, config, device, dtype) {
  const dir = path.join(FIX, 'parity', config, 'model');
  await runCase(rows, { config, device, dtype, case: 'text_encoder' }, async () => {
    const c = await loadCase(config, 'text_encoder');
    const te = await cd.TextEncoder.load(path.join(dir, 'text_encoder'), { dtype, device });
    try {
      const id = te.vocabSize;
      te.resizeTokenEmbeddings(id + 1);
      te.setTokenRows([id], cd.Tensor.fromArray(c.new_token_row.toArray(), [1, c.new_token_row.shape[0]]));
      const ids = await put(c.input_ids, device, null);
      const last = await te.encode(ids);
      const skip = await te.encode(ids, { clipSkip: 1 });
      return [
        ['last_hidden_state', await relError(last, c.last_hidden_state), 'forward'],
        ['clip_skip_1', await relError(skip, c.clip_skip_1), 'forward'],
      ];
    } finally {
      te.dispose();
    }
  });
}

async function vaeCases(rows, config, device, dtype) {
  const dir = path.join(FIX, 'parity', config, 'model');
  await runCase(rows, { config, device, dtype, case: 'vae' }, async () => {
    const c = await loadCase(config, 'vae');
    const vae = await cd.AutoencoderKL.load(path.join(dir, 'vae'), { dtype, device });
    try {
      const post = await vae.encode(await put(c.image, device, dtype));
      const dec = await vae.decode(await put(c.latents, device, dtype));
      return [
        ['mean', await relError(post.mean, c.mean), 'forward'],
        ['logvar', await relError(post.logvar, c.logvar), 'forward'],
        ['decoded', await relError(dec, c.decoded), 'forward'],
      ];
    } finally {
      vae.dispose();
    }
  });
}

async function pipelineCases(rows, config, device, dtype) {
  const dir = path.join(FIX, 'parity', config, 'pipeline');
  const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8'));
  const KIND = { ddim: 'ddim', pndm: 'pndm', dpmpp_2m: 'dpmsolver++', euler: 'euler' };
  let sd;
  await runCase(rows, { config, device, dtype, case: 'pipeline load' }, async () => {
    sd = await cd.StableDiffusion.load(path.join(FIX, 'parity', config, 'model'), { dtype, device });
    return [];
  });
  if (!sd) return;
  try {
    const tensors = (await cd.loadSafetensors(path.join(dir, 'cases.safetensors'))).tensors;
    for (const name of ['ddim', 'dpmpp_2m', 'ddim_delta']) {
      const c = manifest.cases[name];
      if (!c) continue;
      await runCase(rows, { config, device, dtype, case: `pipeline ${name}` }, async () => {
        const deltas = c.delta ? [await cd.readDelta(path.join(dir, 'delta.safetensors'))] : [];
        const r = await sd.generateBatch({
          requests: [{ prompt: c.prompts, negativePrompt: c.negative_prompts, deltas, seed: 0 }],
          latents: tensors[`latents.${name}`],
          steps: c.steps,
          guidanceScale: c.guidance_scale,
          scheduler: KIND[c.scheduler],
          returnTensors: true,
        });
        return [['image', await relError(r.tensors.images, tensors[`image.${name}`]), 'pipeline']];
      });
    }
  } finally {
    sd.dispose();
  }
}

async function trainCases(rows, config, device, dtype, gradientCheckpointing) {
  const mixed = { float32: 'no', float16: 'fp16', bfloat16: 'bf16' }[dtype];
  const label = gradientCheckpointing ? ', gradient checkpointing' : '';
  const base = { config, device, dtype, case: `train step (mixedPrecision ${mixed}${label})` };
  if (mixed === 'fp16' && !device.startsWith('cuda')) {
    rows.push({ ...base, skipped: 'cpu: fp16 autocast with loss scaling needs CUDA' });
    return;
  }
  const manifest = JSON.parse(fs.readFileSync(path.join(FIX, 'train-step', 'manifest.json'), 'utf8'));
  const ref = manifest.configs[config];
  if (!ref) return;
  const p = ref.params;
  await runCase(rows, base, async () => {
    const tensors = (await cd.loadSafetensors(path.join(FIX, 'train-step', ref.file))).tensors;
    const dir = path.join(FIX, 'parity', config, 'model');
    const opts = { dtype: 'float32', device };
    const [unet, textEncoder, vae, scheduler] = await Promise.all([
      UNet.load(path.join(dir, 'unet'), opts),
      cd.TextEncoder.load(path.join(dir, 'text_encoder'), opts),
      cd.AutoencoderKL.load(path.join(dir, 'vae'), opts),
      cd.Scheduler.load(path.join(dir, 'scheduler')),
    ]);
    try {
      textEncoder.resizeTokenEmbeddings(p.modifier_token_id + 1);
      textEncoder.setTokenRows([p.modifier_token_id], textEncoder.tokenRows([p.initializer_token_id]));
      const step = TrainStep.create(
        { unet, textEncoder, vae, scheduler },
        {
          learningRate: p.learning_rate,
          adamBeta1: p.adam_beta1,
          adamBeta2: p.adam_beta2,
          adamWeightDecay: p.adam_weight_decay,
          adamEpsilon: p.adam_epsilon,
          maxGradNorm: p.max_grad_norm,
          priorLossWeight: p.prior_loss_weight,
          tokenIds: [p.modifier_token_id],
          mixedPrecision: mixed,
          gradientCheckpointing,
        },
      );
      const before = await step.trainables();
      const out = [];
      let prev = before;
      for (let k = 0; k < p.steps; k++) {
        const r = await step.step({
          pixels: tensors.pixels,
          masks: tensors.masks,
          inputIds: tensors.input_ids,
          instanceCount: p.instance_count,
          vaeNoise: tensors[`vae_noise.${k}`],
          noise: tensors[`noise.${k}`],
          timesteps: tensors[`timesteps.${k}`],
        });
        // Proves the recomputing path ran, not the plain backward.
        if (gradientCheckpointing && !(r.checkpointedSegments > 0)) throw new Error('gradient checkpointing requested but no segment was checkpointed');
        const wantLoss = tensors[`loss.${k}`].toArray()[0];
        const wantNorm = tensors[`grad_norm.${k}`].toArray()[0];
        out.push([`loss ${k + 1}`, Math.abs(r.loss - wantLoss) / Math.abs(wantLoss), 'train']);
        out.push([`grad norm ${k + 1}`, Math.abs(r.gradNorm - wantNorm) / Math.abs(wantNorm), 'train']);
        const now = await step.trainables();
        // The update (after − before) of every K/V weight: far stricter than the weights themselves.
        let worst = 0;
        for (const name of p.kv_names) {
          const want = tensors[`after.${k}.${name}`];
          const a = await f64(now[name]);
          const b = await f64(prev[name]);
          const w = await f64(want);
          let num = 0;
          let den = 0;
          for (let i = 0; i < w.length; i++) {
            const d = a[i] - b[i] - (w[i] - b[i]);
            num += d * d;
            den += (w[i] - b[i]) ** 2;
          }
          worst = Math.max(worst, den === 0 ? Math.sqrt(num) : Math.sqrt(num / den));
        }
        out.push([`K/V update ${k + 1} (worst of ${p.kv_names.length})`, worst, 'update']);
        prev = now;
      }
      step.dispose();
      return out;
    } finally {
      unet.dispose();
      textEncoder.dispose();
      vae.dispose();
    }
  });
}

async function main() {
  const a = args();
  const info = cd.info();
  const rows = [];
  const started = Date.now();
  for (const dtype of a.dtypes.split(',').filter(Boolean)) {
    if (!TOL[dtype]) throw new Error(`unknown dtype ${dtype}`);
    for (const config of a.configs.split(',').filter(Boolean)) {
      await unetCases(rows, config, a.device, dtype);
      await textCases(rows, config, a.device, dtype);
      await vaeCases(rows, config, a.device, dtype);
      await pipelineCases(rows, config, a.device, dtype);
      await trainCases(rows, config, a.device, dtype, false);
      await trainCases(rows, config, a.device, dtype, true);
    }
  }
  const summary = {};
  for (const dtype of a.dtypes.split(',').filter(Boolean)) {
    const mine = rows.filter((r) => r.dtype === dtype);
    const checked = mine.filter((r) => 'relError' in r);
    summary[dtype] = {
      checks: checked.length,
      passed: checked.filter((r) => r.pass).length,
      failed: checked.filter((r) => !r.pass).length,
      errors: mine.filter((r) => r.error).length,
      skipped: mine.filter((r) => r.skipped).map((r) => `${r.config} ${r.case}: ${r.skipped}`),
      worst: checked.reduce((w, r) => (w && w.relError / w.tol >= r.relError / r.tol ? w : r), null),
      tolerances: TOL[dtype],
    };
  }
  const result = {
    device: a.device,
    torch: info.torchVersion,
    cudaDevices: info.cudaDevices,
    seconds: (Date.now() - started) / 1000,
    summary,
    rows,
  };
  for (const [dtype, s] of Object.entries(summary)) {
    const w = s.worst ? `; worst ${s.worst.config} ${s.worst.case} ${s.worst.metric} ${s.worst.relError.toExponential(2)} (tol ${s.worst.tol})` : '';
    console.log(`${dtype}: ${s.passed}/${s.checks} within tolerance, ${s.errors} errors, ${s.skipped.length} skipped${w}`);
  }
  for (const r of rows) if (r.error || r.pass === false) console.log(`  FAIL ${r.config} ${r.dtype} ${r.case} ${r.metric || ''} ${r.error || r.relError}`);
  if (a.json) fs.writeFileSync(a.json, JSON.stringify(result, null, 2) + '\n');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
