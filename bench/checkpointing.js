#!/usr/bin/env node
'use strict';
// What gradient checkpointing buys: peak memory of Custom Diffusion training steps with and without
// it, and what it costs in step time. Each mode runs in its own child process (a fresh allocator, so
// peaks do not mix): load the model, take the resident size, run the steps, and report the peak
// resident size (VmHWM, reset after loading) above the loaded baseline, which is what the steps
// took (activations, gradients, optimizer state). On CUDA the same is read from the caching
// allocator instead (peak allocated bytes, its peak reset after loading). The
// gradients are the same either way (test/model/unet.test.ts, test/train/train-step.test.ts).
//
//   npm run build:ts && node bench/checkpointing.js [--model DIR] [--resolution 256] [--batch 1]
//                                                    [--steps 3] [--threads 2] [--json FILE]
//                                                    [--device cpu|cuda] [--mixed-precision no|bf16|fp16]
//
// The default model is the tiny SD1 fixture; pass an SD1.5-sized folder (test/parity/make_full_size.py
// writes one with random weights) for the figures that matter. A batch is B instance + B class examples.
const fs = require('fs');
const os = require('os');
const path = require('path');
const { execFileSync } = require('child_process');
const { parseOptions, median } = require('./common');

const root = path.resolve(__dirname, '..');
const lib = process.env.CUSTOM_DIFFUSION_LIB || path.join(root, 'lib');

function status(key) {
  const m = fs.readFileSync('/proc/self/status', 'utf8').match(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm'));
  return m ? Number(m[1]) / 1024 : NaN;
}

/** The child: one mode, printed as one JSON line. */
async function child(cfg) {
  const cd = require(lib);
  cd.setNumThreads(cfg.threads);
  const dir = cfg.model;
  const cuda = cfg.device.startsWith('cuda');
  const { native } = require(path.join(lib, 'native'));
  const opts = { device: cfg.device };
  const [unet, textEncoder, vae, scheduler, tokenizer] = await Promise.all([
    cd.UNet.load(path.join(dir, 'unet'), opts),
    cd.TextEncoder.load(path.join(dir, 'text_encoder'), opts),
    cd.AutoencoderKL.load(path.join(dir, 'vae'), opts),
    cd.Scheduler.load(path.join(dir, 'scheduler')),
    cd.ClipTokenizer.fromFolder(path.join(dir, 'tokenizer')),
  ]);
  const [id] = tokenizer.addTokens(['<new1>']);
  textEncoder.resizeTokenEmbeddings(id + 1);
  textEncoder.setTokenRows([id], textEncoder.tokenRows([tokenizer.tokenId('man') ?? 0]));
  const B = cfg.batch;
  const R = cfg.resolution;
  const n = 2 * B;
  const pixels = cd.Tensor.fromArray(Float32Array.from({ length: n * 3 * R * R }, (_, i) => Math.sin(i * 0.37)), [n, 3, R, R]);
  const f = vae.spatialFactor;
  const masks = cd.Tensor.fromArray(new Float32Array(n * (R / f) * (R / f)).fill(1), [n, 1, R / f, R / f]);
  const prompts = [...Array(B).fill('photo of a <new1> man'), ...Array(B).fill('photo of a man')];
  const ids = tokenizer.encodeBatch(prompts, { padding: 'max_length', truncation: true });
  const inputIds = cd.Tensor.fromArray(BigInt64Array.from(ids.flat(), BigInt), [n, ids[0].length], 'int64');
  const step = cd.TrainStep.create(
    { unet, textEncoder, vae, scheduler },
    {
      learningRate: 1e-5,
      tokenIds: [id],
      gradientCheckpointing: cfg.checkpointing,
      ...(cfg.mixedPrecision !== 'no' ? { mixedPrecision: cfg.mixedPrecision } : {}),
    },
  );
  const gen = new cd.Generator(0);
  // Loading peaks above what stays resident (mapped file pages and their copies): start the
  // high-water mark afresh here ("5" resets VmHWM to the current RSS; Linux ≥ 4.0).
  fs.writeFileSync('/proc/self/clear_refs', '5');
  const MiB = 2 ** 20;
  const baseline = cuda ? native().cudaMemoryStats(0, true).allocatedBytes / MiB : status('VmRSS');
  const times = [];
  let loss = 0;
  for (let s = 0; s < cfg.steps; s++) {
    const t0 = process.hrtime.bigint();
    loss = (await step.step({ pixels, masks, inputIds, instanceCount: B }, gen)).loss;
    times.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  const peak = cuda ? native().cudaMemoryStats(0).peakAllocatedBytes / MiB : status('VmHWM');
  process.stdout.write(JSON.stringify({ baselineMiB: baseline, peakMiB: peak, stepMiB: peak - baseline, msPerStep: median(times.slice(1).length ? times.slice(1) : times), loss }) + '\n');
}

async function main() {
  const a = parseOptions({
    model: path.join(root, 'test', 'fixtures', 'parity', 'sd1', 'model'),
    resolution: 256,
    batch: 1,
    steps: 3,
    threads: 2,
    json: null,
    device: 'cpu',
    'mixed-precision': 'no',
    child: '',
  });
  if (a.child) return child(JSON.parse(a.child));
  const run = (checkpointing) => {
    const cfg = {
      model: path.resolve(a.model),
      resolution: a.resolution,
      batch: a.batch,
      steps: a.steps,
      threads: a.threads,
      device: String(a.device),
      mixedPrecision: a['mixed-precision'],
      checkpointing,
    };
    const out = execFileSync(process.execPath, [__filename, '--child', JSON.stringify(cfg)], { encoding: 'utf8', maxBuffer: 1 << 20 });
    return JSON.parse(out.trim().split('\n').pop());
  };
  const plain = run(false);
  const ckpt = run(true);
  const result = {
    bench: 'checkpointing',
    date: new Date().toISOString(),
    machine: { cpus: os.cpus().length, cpu: os.cpus()[0]?.model?.trim(), node: process.version },
    settings: {
      model: a.model,
      resolution: a.resolution,
      batch: `${a.batch} instance + ${a.batch} class`,
      steps: a.steps,
      threads: a.threads,
      device: a.device,
      mixedPrecision: a['mixed-precision'],
      memory: String(a.device).startsWith('cuda') ? 'CUDA caching allocator, peak allocated' : 'resident set (VmHWM)',
    },
    plain,
    checkpointing: ckpt,
    activationMemoryRatio: ckpt.stepMiB / plain.stepMiB,
    timeRatio: ckpt.msPerStep / plain.msPerStep,
  };
  const mib = (x) => `${x.toFixed(0)} MiB`;
  console.log(`model ${a.model}, ${a.resolution} px, batch ${a.batch}+${a.batch}, ${a.device}, mixed precision ${a['mixed-precision']}, ${a.threads} threads`);
  console.log(`plain:         loaded ${mib(plain.baselineMiB)}, peak ${mib(plain.peakMiB)} (+${mib(plain.stepMiB)} for the step), ${plain.msPerStep.toFixed(0)} ms/step`);
  console.log(`checkpointing: loaded ${mib(ckpt.baselineMiB)}, peak ${mib(ckpt.peakMiB)} (+${mib(ckpt.stepMiB)} for the step), ${ckpt.msPerStep.toFixed(0)} ms/step`);
  console.log(`step memory ×${result.activationMemoryRatio.toFixed(3)}, step time ×${result.timeRatio.toFixed(3)} (checkpointing / plain); losses ${plain.loss.toFixed(6)} / ${ckpt.loss.toFixed(6)}`);
  if (a.json) {
    fs.mkdirSync(path.dirname(a.json), { recursive: true });
    fs.writeFileSync(a.json, JSON.stringify(result, null, 1) + '\n');
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
