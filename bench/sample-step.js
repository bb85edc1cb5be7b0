#!/usr/bin/env node
'use strict';
// Steady-state time of one denoising step of text-to-image generation (classifier-free guidance: a
// UNet pass on [negative, positive], the guidance mix and a DDIM step): ours (StableDiffusion.generate,
// the loop native on a worker, prompt K/V prepared once) against diffusers' StableDiffusionPipeline on
// the same CPU, same model, same size and thread count, timed in alternating rounds in one invocation.
// Step times are the gaps between consecutive step callbacks, so text encoding and VAE decoding are
// left out. Also measures the time to switch concepts with an SD1.5-sized delta.
//
//   npm run build:ts && node bench/sample-step.js [--model DIR] [--size 256] [--steps 5] [--rounds 3]
//                                                  [--threads 2] [--json FILE]
//
// Default model: /tmp/parity-full/sd15 when present (random weights, exact SD1.5 architecture, from
// `python3 test/parity/make_full_size.py /tmp/parity-full --models sd15`), else the tiny fixture.
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn } = require('child_process');

const root = path.resolve(__dirname, '..');
const lib = process.env.CUSTOM_DIFFUSION_LIB || path.join(root, 'lib');
const FULL = '/tmp/parity-full/sd15';

function args() {
  const full = fs.existsSync(path.join(FULL, 'model_index.json'));
  const a = {
    model: full ? FULL : path.join(root, 'test', 'fixtures', 'parity', 'sd1', 'model'),
    size: full ? 256 : 32,
    steps: 5,
    rounds: 3,
    threads: 2,
    json: null,
  };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i].replace(/^--/, '');
    if (!(k in a)) throw new Error(`unknown option ${argv[i]}`);
    const v = argv[++i];
    a[k] = typeof a[k] === 'number' ? Number(v) : v;
  }
  return a;
}

const PROMPT = 'a photo of an astronaut riding a horse on the moon';

const PY = String.raw`
import sys, json, time
import torch
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
import diffusers, transformers
from diffusers import StableDiffusionPipeline, DDIMScheduler
diffusers.logging.set_verbosity_error(); transformers.logging.set_verbosity_error()
pipe = StableDiffusionPipeline.from_pretrained(cfg["model"], torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
def run():
    stamps = []
    def cb(p, i, t, kw):
        stamps.append(time.perf_counter())
        return kw
    with torch.no_grad():
        pipe(prompt=cfg["prompt"], num_inference_steps=cfg["steps"], guidance_scale=7.5, height=cfg["size"], width=cfg["size"],
             generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=cb)
    return [1000 * (b - a) for a, b in zip(stamps, stamps[1:])]
run()
print(json.dumps({"ready": True, "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    if int(line) <= 0: break
    print(json.dumps(run()), flush=True)
`;

function startReference(cfg) {
  const child = spawn(process.env.PYTHON || 'python3', ['-c', PY, JSON.stringify(cfg)], {
    env: { ...process.env, OMP_NUM_THREADS: String(cfg.threads) },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let buf = '';
  let err = '';
  const waiters = [];
  child.stdout.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      const w = waiters.shift();
      if (w) w.resolve(JSON.parse(line));
    }
  });
  child.stderr.on('data', (d) => (err += d));
  child.on('exit', (code) => {
    for (const w of waiters.splice(0)) w.reject(new Error(`reference exited (${code}):\n${err}`));
  });
  const next = () => new Promise((resolve, reject) => waiters.push({ resolve, reject }));
  return {
    ready: next(),
    run() {
      const p = next();
      child.stdin.write('1\n');
      return p;
    },
    stop() {
      child.stdin.end('0\n');
    },
  };
}

async function setupOurs(cfg) {
  const cd = require(lib);
  cd.setNumThreads(cfg.threads);
  const sd = await cd.StableDiffusion.load(cfg.model);
  const run = async () => {
    const stamps = [];
    await sd.generate({
      prompt: PROMPT,
      steps: cfg.steps,
      guidanceScale: 7.5,
      scheduler: 'ddim',
      width: cfg.size,
      height: cfg.size,
      seed: 0,
      onProgress: (e) => {
        if (e.phase === 'denoise') stamps.push(performance.now());
      },
    });
    return stamps.slice(1).map((t, i) => t - stamps[i]);
  };
  await run();
  return { sd, cd, run, threads: cd.getNumThreads() };
}

/** Concept switching with a delta of the model's real K/V shapes (16 layers × 2 for SD1.5). */
async function switchTimes(cd, sd) {
  const { Tensor } = cd;
  const kv = sd.unet.allParameters((n) => /attn2\.to_[kv]\.weight$/.test(n));
  const weights = {};
  for (const [n, t] of Object.entries(kv)) {
    const v = Float32Array.from(t.toArray(), (x) => x * 1.01);
    weights[n] = Tensor.fromArray(v, t.shape);
  }
  const hidden = sd.textEncoder.hiddenSize;
  const delta = {
    kind: 'full',
    version: 1,
    freezeModel: 'crossattn_kv',
    tokens: [{ token: '<new1>', id: sd.textEncoder.baseVocabSize }],
    baseModelFingerprint: null,
    dtype: 'float32',
    weights,
    factors: {},
    tokenRows: { '<new1>': Tensor.fromArray(new Float32Array(hidden).fill(0.01), [hidden]) },
    metadata: {},
  };
  const ids = Tensor.fromArray(new BigInt64Array(2 * 77).fill(1n), [2, 77]);
  const states = await sd.textEncoder.encode(ids);
  const time = async (fn, n = 10) => {
    await fn();
    const ts = [];
    for (let i = 0; i < n; i++) {
      const t0 = performance.now();
      await fn();
      ts.push(performance.now() - t0);
    }
    return median(ts);
  };
  const contextBase = await time(async () => (await sd.unet.prepareContext(states)).dispose());
  const contextDelta = await time(async () => (await sd.unet.prepareContext(states, { weightSets: [weights], assignment: [0, 0] })).dispose());
  const applyUnapply = await time(async () => {
    const a = await cd.applyDelta(delta, { unet: sd.unet, textEncoder: sd.textEncoder, tokenizer: sd.tokenizer }, { force: true });
    a.unapply();
  });
  const layers = Object.keys(weights).length;
  const bytes = Object.values(weights).reduce((s, t) => s + t.numel * 4, 0);
  return { layers, deltaMB: bytes / 2 ** 20, contextBaseMs: contextBase, contextDeltaMs: contextDelta, switchExtraMs: contextDelta - contextBase, applyUnapplyMs: applyUnapply };
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

async function main() {
  const cfg = args();
  console.log(`model ${cfg.model}, ${cfg.size}×${cfg.size}, ${cfg.steps} DDIM steps with guidance, ${cfg.threads} threads, ${cfg.rounds} rounds`);
  const ref = startReference({ ...cfg, prompt: PROMPT });
  const refInfo = await ref.ready;
  const ours = await setupOurs(cfg);
  const mine = [];
  const theirs = [];
  for (let r = 0; r < cfg.rounds; r++) {
    mine.push(...(await ours.run()));
    theirs.push(...(await ref.run()));
    console.log(`round ${r + 1}: ours ${median(mine).toFixed(1)} ms, diffusers ${median(theirs).toFixed(1)} ms per step`);
  }
  ref.stop();
  const sw = await switchTimes(ours.cd, ours.sd);
  const result = {
    benchmark: 'sample-step',
    date: new Date().toISOString(),
    cpu: os.cpus()[0]?.model,
    cores: os.cpus().length,
    model: cfg.model,
    size: cfg.size,
    steps: cfg.steps,
    threads: { ours: ours.threads, reference: refInfo.threads },
    reference: { torch: refInfo.torch, diffusers: refInfo.diffusers },
    oursStepMs: median(mine),
    diffusersStepMs: median(theirs),
    ratio: median(mine) / median(theirs),
    samples: { ours: mine, diffusers: theirs },
    conceptSwitch: sw,
  };
  console.log(`denoising step: ours ${result.oursStepMs.toFixed(1)} ms, diffusers ${result.diffusersStepMs.toFixed(1)} ms, ratio ${result.ratio.toFixed(3)} (ours/diffusers)`);
  console.log(
    `concept switch (${sw.layers} K/V layers, ${sw.deltaMB.toFixed(1)} MB): extra context time ${sw.switchExtraMs.toFixed(1)} ms ` +
      `(prepare ${sw.contextDeltaMs.toFixed(1)} vs ${sw.contextBaseMs.toFixed(1)} ms), in-place apply+unapply ${sw.applyUnapplyMs.toFixed(1)} ms`,
  );
  if (cfg.json) fs.writeFileSync(cfg.json, JSON.stringify(result, null, 2) + '\n');
  ours.sd.dispose();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
