#!/usr/bin/env node
'use strict';
// Steady-state time of one denoising step of text-to-image generation (classifier-free guidance: a
// UNet pass on [negative, positive], the guidance mix and a DDIM step): ours (StableDiffusion.generate,
// the loop native on a worker, prompt K/V prepared once) against diffusers' StableDiffusionPipeline on
// the same device, same model, same size, dtype and thread count, timed in alternating rounds in one
// invocation. Also measures the time to switch concepts with an SD1.5-sized delta and, with
// --mixed on, the throughput of a batch whose rows use different concepts.
//
//   npm run build:ts && node bench/sample-step.js [--model DIR] [--size 256] [--steps 5] [--rounds 3]
//                                                  [--threads 2] [--json FILE]
//                                                  [--device cpu|cuda] [--dtype float32|float16|bfloat16]
//                                                  [--method auto|callbacks|calls] [--short-steps 10]
//                                                  [--mixed off|on] [--mixed-batch 4] [--reference on|off]
//
// Two ways to time a step:
// - callbacks (the default on a CPU): the gaps between consecutive step callbacks, so text encoding
//   and VAE decoding are left out;
// - calls (the default on CUDA, where callbacks fire when work is queued, not done): whole calls of
//   --steps and of --short-steps steps, each ending with the image on the host; a step is
//   (T(steps) − T(short)) / (steps − short), which cancels encoding, decoding and copies, and
//   T(steps) is also reported as the end-to-end time.
//
// Default model: /tmp/parity-full/sd15 when present (random weights, exact SD1.5 architecture, from
// `python3 test/parity/make_full_size.py /tmp/parity-full --models sd15`), else the tiny fixture.
const fs = require('fs');
const os = require('os');
const path = require('path');
const { parseOptions, startPython, median } = require('./common');

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
    device: 'cpu',
    dtype: 'float32',
    method: 'auto',
    'short-steps': 10,
    switch: 'on',
    mixed: 'off',
    'mixed-batch': 4,
    reference: 'on',
  };
  Object.assign(a, parseOptions(a));
  a.shortSteps = a['short-steps'];
  a.mixedBatch = a['mixed-batch'];
  delete a['short-steps'];
  delete a['mixed-batch'];
  if (a.method === 'auto') a.method = String(a.device).startsWith('cuda') ? 'calls' : 'callbacks';
  if (!['callbacks', 'calls'].includes(a.method)) throw new Error('--method must be auto, callbacks or calls');
  if (a.method === 'calls' && !(a.shortSteps >= 1 && a.shortSteps < a.steps)) throw new Error('--short-steps must lie in [1, --steps)');
  return a;
}

const PROMPT = 'a photo of an astronaut riding a horse on the moon';

const PY = String.raw`
import sys, json, time, os
t_start = time.perf_counter()
import torch
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
import diffusers, transformers
from diffusers import StableDiffusionPipeline, DDIMScheduler
diffusers.logging.set_verbosity_error(); transformers.logging.set_verbosity_error()
dev = torch.device(cfg["device"])
dtype = getattr(torch, cfg["dtype"])
pipe = StableDiffusionPipeline.from_pretrained(cfg["model"], torch_dtype=dtype, safety_checker=None, requires_safety_checker=False).to(dev)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
def callbacks():
    stamps = []
    def cb(p, i, t, kw):
        stamps.append(time.perf_counter())
        return kw
    with torch.no_grad():
        pipe(prompt=cfg["prompt"], num_inference_steps=cfg["steps"], guidance_scale=7.5, height=cfg["size"], width=cfg["size"],
             generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=cb)
    return [1000 * (b - a) for a, b in zip(stamps, stamps[1:])]
def call(steps):
    # The whole call, the image decoded and on the host at the end (as ours returns it).
    sync(); t0 = time.perf_counter()
    with torch.no_grad():
        pipe(prompt=cfg["prompt"], num_inference_steps=steps, guidance_scale=7.5, height=cfg["size"], width=cfg["size"],
             generator=torch.Generator().manual_seed(0), output_type="np")
    sync()
    return 1000 * (time.perf_counter() - t0)
def memory():
    if dev.type != "cuda": return None
    return {"peakAllocatedBytes": torch.cuda.max_memory_allocated(dev), "peakReservedBytes": torch.cuda.max_memory_reserved(dev)}
load_ms = 1000 * (time.perf_counter() - t_start)
if cfg["method"] == "calls": call(cfg["shortSteps"])
else: callbacks()
print(json.dumps({"ready": True, "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
                  "pid": os.getpid(), "loadMs": load_ms, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "stop": break
    if cmd["op"] == "callbacks": print(json.dumps(callbacks()), flush=True)
    elif cmd["op"] == "call": print(json.dumps(call(cmd["steps"])), flush=True)
    elif cmd["op"] == "memory": print(json.dumps(memory()), flush=True)
`;

function startReference(cfg) {
  const py = startPython(PY, cfg);
  const ask = (cmd) => py.send(JSON.stringify(cmd));
  return {
    ready: py.ready,
    callbacks: () => ask({ op: 'callbacks' }),
    call: (steps) => ask({ op: 'call', steps }),
    memory: () => ask({ op: 'memory' }),
    stop: () => py.end(JSON.stringify({ op: 'stop' })),
  };
}

async function setupOurs(cfg) {
  const t0 = performance.now();
  const cd = require(lib);
  const { native } = require(path.join(lib, 'native'));
  cd.setNumThreads(cfg.threads);
  const sd = await cd.StableDiffusion.load(cfg.model, { dtype: cfg.dtype, device: cfg.device });
  const loadMs = performance.now() - t0;
  const options = (steps, extra = {}) => ({
    prompt: PROMPT,
    steps,
    guidanceScale: 7.5,
    scheduler: 'ddim',
    width: cfg.size,
    height: cfg.size,
    seed: 0,
    ...extra,
  });
  const callbacks = async () => {
    const stamps = [];
    await sd.generate(
      options(cfg.steps, {
        onProgress: (e) => {
          if (e.phase === 'denoise') stamps.push(performance.now());
        },
      }),
    );
    return stamps.slice(1).map((t, i) => t - stamps[i]);
  };
  // The images come back as host bytes, so the call has finished on the device when it resolves.
  const call = async (steps) => {
    const c0 = performance.now();
    await sd.generate(options(steps));
    return performance.now() - c0;
  };
  if (cfg.method === 'calls') await call(cfg.shortSteps);
  else await callbacks();
  const memory = () => {
    if (!String(cfg.device).startsWith('cuda')) return null;
    const fn = native().cudaMemoryStats;
    if (typeof fn !== 'function') return { unavailable: 'this addon has no cudaMemoryStats (rebuild it)' };
    try {
      return fn(0);
    } catch (e) {
      return { unavailable: String(e.message || e) };
    }
  };
  return { sd, cd, callbacks, call, options, memory, loadMs, threads: cd.getNumThreads() };
}

/** A delta with the model's real K/V shapes (16 layers × 2 for SD1.5), as readDelta returns it (float32, CPU). */
async function makeDelta(cd, sd, token, scale) {
  const { Tensor } = cd;
  const kv = sd.unet.allParameters((n) => /attn2\.to_[kv]\.weight$/.test(n));
  const weights = {};
  for (const [n, t] of Object.entries(kv)) {
    const host = await t.to({ dtype: 'float32', device: 'cpu' });
    weights[n] = Tensor.fromArray(Float32Array.from(host.toArray(), (x) => x * scale), t.shape);
  }
  const hidden = sd.textEncoder.hiddenSize;
  return {
    kind: 'full',
    version: 1,
    freezeModel: 'crossattn_kv',
    tokens: [{ token, id: sd.textEncoder.baseVocabSize }],
    baseModelFingerprint: null,
    dtype: 'float32',
    weights,
    factors: {},
    tokenRows: { [token]: Tensor.fromArray(new Float32Array(hidden).fill(0.01 * scale), [hidden]) },
    metadata: { name: token },
  };
}

/** Concept switching with deltas of the model's real K/V shapes. */
async function switchTimes(cfg, ours) {
  const { cd, sd } = ours;
  const { Tensor } = cd;
  const a = await makeDelta(cd, sd, '<new1>', 1.01);
  const b = await makeDelta(cd, sd, '<new2>', 0.99);
  const weights = a.weights;
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
  // Launch times on CUDA (prepareContext returns before the device has finished): see the
  // generate-level figures below for what a user waits.
  const contextBase = await time(async () => (await sd.unet.prepareContext(states)).dispose());
  const contextDelta = await time(async () => (await sd.unet.prepareContext(states, { weightSets: [weights], assignment: [0, 0] })).dispose());
  const applyUnapply = await time(async () => {
    const applied = await cd.applyDelta(a, { unet: sd.unet, textEncoder: sd.textEncoder, tokenizer: sd.tokenizer }, { force: true });
    applied.unapply();
  });
  const layers = Object.keys(weights).length;
  const bytes = Object.values(weights).reduce((s, t) => s + t.numel * 4, 0);
  const out = {
    layers,
    deltaMB: bytes / 2 ** 20,
    contextBaseMs: contextBase,
    contextDeltaMs: contextDelta,
    switchExtraMs: contextDelta - contextBase,
    applyUnapplyMs: applyUnapply,
  };
  if (cfg.method === 'calls') {
    // What a user waits: a call with a different concept than the last one, against a call with none
    // (each call prepares its concept's K/V; the base weights are never modified).
    const steps = cfg.shortSteps;
    const plain = [];
    const switched = [];
    const withConcept = async (d) => {
      const t0 = performance.now();
      await sd.generate(ours.options(steps, { prompt: `a photo of a ${d.tokens[0].token} dog`, deltas: [d] }));
      return performance.now() - t0;
    };
    // Each concept once before timing (a first use also converts a compressed delta's factors), then
    // 7 alternating rounds: a median of 3 calls swung by tens of milliseconds on an H200.
    await withConcept(a);
    await withConcept(b);
    for (let i = 0; i < 7; i++) {
      plain.push(await ours.call(steps));
      switched.push(await withConcept(i % 2 ? b : a));
    }
    out.generateRounds = 7;
    out.generateSteps = steps;
    out.generatePlainMs = median(plain);
    out.generateSwitchMs = median(switched);
    out.generateSwitchExtraMs = median(switched) - median(plain);
  }
  return { out, a, b };
}

/** A batch whose rows use different concepts, against the same images made one call at a time. */
async function mixedThroughput(cfg, ours, a, b) {
  const { sd } = ours;
  const n = Math.max(2, cfg.mixedBatch);
  const requests = Array.from({ length: n }, (_, i) => ({
    prompt: i % 2 ? 'a photo of a <new2> cat' : 'a photo of a <new1> dog',
    deltas: [i % 2 ? b : a],
    seed: i,
  }));
  const settings = { steps: cfg.steps, guidanceScale: 7.5, scheduler: 'ddim', width: cfg.size, height: cfg.size };
  const timeIt = async (fn) => {
    const t0 = performance.now();
    await fn();
    return performance.now() - t0;
  };
  const mixed = [];
  const uniform = [];
  const separate = [];
  for (let r = 0; r < 2; r++) {
    mixed.push(await timeIt(() => sd.generateBatch({ ...settings, requests })));
    uniform.push(await timeIt(() => sd.generateBatch({ ...settings, requests: requests.map((q) => ({ ...q, prompt: 'a photo of a <new1> dog', deltas: [a] })) })));
    separate.push(
      await timeIt(async () => {
        for (const q of requests) await sd.generate({ ...settings, ...q });
      }),
    );
  }
  const ips = (ms) => (1000 * n) / ms;
  return {
    images: n,
    concepts: 2,
    steps: cfg.steps,
    mixedBatchMs: median(mixed),
    uniformBatchMs: median(uniform),
    separateCallsMs: median(separate),
    mixedImagesPerSec: ips(median(mixed)),
    uniformImagesPerSec: ips(median(uniform)),
    separateImagesPerSec: ips(median(separate)),
    mixedVsSeparateSpeedup: median(separate) / median(mixed),
    mixedVsUniformCost: median(mixed) / median(uniform),
  };
}

async function main() {
  const cfg = args();
  console.log(
    `model ${cfg.model}, ${cfg.size}×${cfg.size}, ${cfg.steps} DDIM steps with guidance, ${cfg.device} ${cfg.dtype}, ` +
      `${cfg.threads} threads, ${cfg.rounds} rounds, timed by ${cfg.method}`,
  );
  let ref = null;
  let refInfo = null;
  let refError = null;
  if (cfg.reference === 'on') {
    ref = startReference({ ...cfg, prompt: PROMPT });
    try {
      refInfo = await ref.ready;
    } catch (e) {
      refError = String(e.message || e);
      ref = null;
    }
  }
  const ours = await setupOurs(cfg);
  const mine = [];
  const theirs = [];
  const mineShort = [];
  const theirsShort = [];
  for (let r = 0; r < cfg.rounds; r++) {
    if (cfg.method === 'callbacks') {
      mine.push(...(await ours.callbacks()));
      if (ref) {
        try {
          theirs.push(...(await ref.callbacks()));
        } catch (e) {
          refError = String(e.message || e);
          ref = null;
          theirs.length = 0;
        }
      }
      console.log(`round ${r + 1}: ours ${median(mine).toFixed(1)} ms${ref ? `, diffusers ${median(theirs).toFixed(1)} ms` : ''} per step`);
    } else {
      mine.push(await ours.call(cfg.steps));
      mineShort.push(await ours.call(cfg.shortSteps));
      if (ref) {
        try {
          theirs.push(await ref.call(cfg.steps));
          theirsShort.push(await ref.call(cfg.shortSteps));
        } catch (e) {
          refError = String(e.message || e);
          ref = null;
          theirs.length = theirsShort.length = 0;
        }
      }
      console.log(`round ${r + 1}: ${cfg.steps}-step call ours ${median(mine).toFixed(1)} ms${ref ? `, diffusers ${median(theirs).toFixed(1)} ms` : ''}`);
    }
  }
  const refMemory = ref ? await ref.memory().catch(() => null) : null;
  if (ref) ref.stop();
  const perStep = (long, short) =>
    cfg.method === 'calls' ? (median(long) - median(short)) / (cfg.steps - cfg.shortSteps) : median(long);
  const oursStepMs = perStep(mine, mineShort);
  const diffusersStepMs = ref ? perStep(theirs, theirsShort) : null;
  const result = {
    benchmark: 'sample-step',
    date: new Date().toISOString(),
    cpu: os.cpus()[0]?.model,
    cores: os.cpus().length,
    gpu: refInfo?.device,
    model: cfg.model,
    size: cfg.size,
    steps: cfg.steps,
    device: cfg.device,
    dtype: cfg.dtype,
    method: cfg.method,
    shortSteps: cfg.method === 'calls' ? cfg.shortSteps : undefined,
    threads: { ours: ours.threads, reference: refInfo?.threads },
    reference: ref ? { torch: refInfo.torch, diffusers: refInfo.diffusers, pid: refInfo.pid, loadMs: refInfo.loadMs, memory: refMemory } : { error: refError ?? 'not run (--reference off)' },
    oursPid: process.pid,
    oursLoadMs: ours.loadMs,
    oursStepMs,
    diffusersStepMs,
    oursItPerSec: 1000 / oursStepMs,
    diffusersItPerSec: diffusersStepMs ? 1000 / diffusersStepMs : null,
    ratio: diffusersStepMs ? oursStepMs / diffusersStepMs : null,
    endToEndMs: cfg.method === 'calls' ? { ours: median(mine), diffusers: ref ? median(theirs) : null } : undefined,
    samples: { ours: mine, diffusers: theirs, oursShort: mineShort, diffusersShort: theirsShort },
  };
  console.log(
    `denoising step: ours ${oursStepMs.toFixed(1)} ms (${result.oursItPerSec.toFixed(2)} it/s)` +
      (ref ? `, diffusers ${diffusersStepMs.toFixed(1)} ms (${result.diffusersItPerSec.toFixed(2)} it/s), ratio ${result.ratio.toFixed(3)} (ours/diffusers)` : `; diffusers: ${String(refError || 'off').split('\n').slice(-2).join(' ')}`),
  );
  result.oursMemory = ours.memory();
  // The main figures are on disk before the concept parts run (a failure there keeps them).
  if (cfg.json) fs.writeFileSync(cfg.json, JSON.stringify(result, null, 2) + '\n');
  let switched = null;
  if (cfg.switch === 'on' || cfg.mixed === 'on') {
    try {
      switched = await switchTimes(cfg, ours);
    } catch (e) {
      result.conceptSwitch = { error: String((e && e.stack) || e).split('\n').slice(0, 4).join(' | ') };
      console.log(`concept switch failed: ${result.conceptSwitch.error}`);
    }
  }
  if (switched) {
    const { out: sw, a, b } = switched;
    result.conceptSwitch = sw;
    console.log(
      `concept switch (${sw.layers} K/V layers, ${sw.deltaMB.toFixed(1)} MB): extra context time ${sw.switchExtraMs.toFixed(1)} ms ` +
        `(prepare ${sw.contextDeltaMs.toFixed(1)} vs ${sw.contextBaseMs.toFixed(1)} ms), in-place apply+unapply ${sw.applyUnapplyMs.toFixed(1)} ms` +
        (sw.generateSwitchExtraMs !== undefined ? `; a ${sw.generateSteps}-step call with another concept costs ${sw.generateSwitchExtraMs.toFixed(1)} ms more than one without` : ''),
    );
    if (cfg.mixed === 'on') {
      try {
        const m = await mixedThroughput(cfg, ours, a, b);
        result.mixedConcepts = m;
        console.log(
          `mixed-concept batch of ${m.images} (2 concepts, ${m.steps} steps): ${m.mixedImagesPerSec.toFixed(2)} images/s, ` +
            `${m.mixedVsSeparateSpeedup.toFixed(2)}× separate calls (${m.separateImagesPerSec.toFixed(2)}), ${m.mixedVsUniformCost.toFixed(2)}× the time of a one-concept batch`,
        );
      } catch (e) {
        result.mixedConcepts = { error: String((e && e.stack) || e).split('\n').slice(0, 4).join(' | ') };
        console.log(`mixed-concept batch failed: ${result.mixedConcepts.error}`);
      }
    }
  }
  if (cfg.mixed === 'on') result.oursMemoryAfterMixed = ours.memory();
  if (cfg.json) fs.writeFileSync(cfg.json, JSON.stringify(result, null, 2) + '\n');
  ours.sd.dispose();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
