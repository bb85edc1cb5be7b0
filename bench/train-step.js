#!/usr/bin/env node
'use strict';
// Steady-state time of one Custom Diffusion optimizer step: ours (native TrainStep) against a
// diffusers reference step (HF-EX's loop body: CustomDiffusionAttnProcessor2_0, AdamW, clipping) on the
// same device, same model, same batch shape and the same number of threads, timed in alternating rounds
// in one invocation; prints both and the ratio.
//
//   npm run build:ts && node bench/train-step.js [--model DIR] [--resolution 32] [--batch 1]
//                                                 [--steps 20] [--rounds 4] [--warmup 3] [--threads 2] [--json FILE]
//                                                 [--device cpu|cuda] [--mixed-precision no|bf16|fp16] [--reference on|off]
//
// The default model is the tiny SD1-architecture fixture (test/fixtures/parity/sd1/model, VAE factor
// 4); any diffusers SD1/SD2 folder works (e.g. one written by test/parity/make_full_size.py or
// scripts/gpu/make_model.py). A batch is B instance + B class examples (prior preservation), one
// modifier token.
//
// On CUDA with --mixed-precision the reference is set up as diffusers' train_custom_diffusion.py
// does it under accelerate: the frozen UNet and VAE in the half dtype, the text encoder (which
// trains the modifier token) in float32 with its forward under autocast, the Custom Diffusion
// K/V processors in float32, a GradScaler for fp16. Ours keeps float32 weights and runs the
// forward passes under autocast (mixedPrecision). On CUDA the result also has each side's peak
// memory from its caching allocator (torch.cuda.max_memory_allocated / max_memory_reserved, and
// ours through the addon's cudaMemoryStats), the load time, and the process ids (for outside
// samplers such as nvidia-smi).
const fs = require('fs');
const os = require('os');
const path = require('path');
const { parseOptions, startPython } = require('./common');

const root = path.resolve(__dirname, '..');
// The compiled library (npm run build:ts); CUSTOM_DIFFUSION_LIB points elsewhere (a private build).
const lib = process.env.CUSTOM_DIFFUSION_LIB || path.join(root, 'lib');

function args() {
  const a = {
    model: path.join(root, 'test', 'fixtures', 'parity', 'sd1', 'model'),
    resolution: 32,
    batch: 1,
    steps: 20,
    warmup: 3,
    rounds: 4,
    threads: 2,
    json: null,
    device: 'cpu',
    'mixed-precision': 'no',
    reference: 'on',
  };
  Object.assign(a, parseOptions(a));
  a.mixedPrecision = a['mixed-precision'];
  delete a['mixed-precision'];
  if (!['no', 'bf16', 'fp16'].includes(a.mixedPrecision)) throw new Error(`--mixed-precision must be no, bf16 or fp16`);
  if (!['on', 'off'].includes(a.reference)) throw new Error('--reference must be on or off');
  return a;
}

const PY = String.raw`
import sys, json, time, itertools, os, contextlib
t_start = time.perf_counter()
import torch
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
import torch.nn.functional as F
dev = torch.device(cfg.get("device", "cpu"))
mp = cfg.get("mixedPrecision", "no")
# train_custom_diffusion.py: weight_dtype for the frozen models; the text encoder stays float32 when a
# modifier token trains, and accelerate runs its forward under autocast.
wdt = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mp]
def autocast():
    return torch.autocast(dev.type, dtype=wdt) if mp != "no" else contextlib.nullcontext()
scaler = torch.amp.GradScaler(dev.type) if mp == "fp16" else None
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
import diffusers, transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer
diffusers.logging.set_verbosity_error(); transformers.logging.set_verbosity_error()
m = cfg["model"]
tok = CLIPTokenizer.from_pretrained(m, subfolder="tokenizer")
te = CLIPTextModel.from_pretrained(m, subfolder="text_encoder", torch_dtype=torch.float32)
vae = AutoencoderKL.from_pretrained(m, subfolder="vae", torch_dtype=torch.float32)
unet = UNet2DConditionModel.from_pretrained(m, subfolder="unet", torch_dtype=torch.float32)
sched = DDPMScheduler.from_pretrained(m, subfolder="scheduler")
tok.add_tokens("<new1>"); new_id = tok.convert_tokens_to_ids("<new1>")
te.resize_token_embeddings(len(tok))
vae.requires_grad_(False); unet.requires_grad_(False)
unet.to(dev, dtype=wdt); vae.to(dev, dtype=wdt); te.to(dev)
tm = getattr(te, "text_model", te)
for mod in (tm.encoder, tm.final_layer_norm, tm.embeddings.position_embedding): mod.requires_grad_(False)
st = unet.state_dict(); procs = {}
for name in unet.attn_processors.keys():
    cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
    if name.startswith("mid_block"): hidden = unet.config.block_out_channels[-1]
    elif name.startswith("up_blocks"): hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
    else: hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
    layer = name.split(".processor")[0]
    if cross is not None:
        p = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=hidden, cross_attention_dim=cross)
        p.load_state_dict({"to_k_custom_diffusion.weight": st[layer + ".to_k.weight"], "to_v_custom_diffusion.weight": st[layer + ".to_v.weight"]})
        procs[name] = p.to(dev)
    else:
        procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
unet.set_attn_processor(procs)
layers = [q for mm in unet.attn_processors.values() if isinstance(mm, torch.nn.Module) for q in mm.parameters()]
opt = torch.optim.AdamW(itertools.chain(te.get_input_embeddings().parameters(), layers), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
B = cfg["batch"]; R = cfg["resolution"]
pixels = torch.rand(2 * B, 3, R, R) * 2 - 1
prompts = ["photo of a <new1> man"] * B + ["photo of a man"] * B
ids = tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt").input_ids
def step():
    # The batch comes from the (CPU) data loader; accelerate moves it to the device each step.
    px = pixels.to(dev, non_blocking=True).to(wdt)
    latents = vae.encode(px).latent_dist.sample() * vae.config.scaling_factor
    mask = torch.ones(2 * B, 1, latents.shape[2], latents.shape[3]).to(dev, non_blocking=True)
    noise = torch.randn_like(latents)
    t = torch.randint(0, sched.config.num_train_timesteps, (2 * B,), device=latents.device)
    noisy = sched.add_noise(latents, noise, t)
    with autocast():
        ctx = te(ids.to(dev, non_blocking=True))[0]
    pred = unet(noisy, t, ctx).sample
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    pi, pp = torch.chunk(pred, 2); ti, tp = torch.chunk(target, 2); mi = torch.chunk(mask, 2)[0]
    l = F.mse_loss(pi.float(), ti.float(), reduction="none")
    loss = ((l * mi).sum([1, 2, 3]) / mi.sum([1, 2, 3])).mean() + F.mse_loss(pp.float(), tp.float(), reduction="mean")
    if scaler is not None: scaler.scale(loss).backward()
    else: loss.backward()
    g = te.get_input_embeddings().weight.grad
    z = torch.arange(len(tok), device=g.device) != new_id
    g.data[z, :] = g.data[z, :].fill_(0)
    if scaler is not None: scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(itertools.chain(te.parameters(), layers), 1.0)
    if scaler is not None:
        scaler.step(opt); scaler.update()
    else:
        opt.step()
    opt.zero_grad()
    return loss.item()
sync(); load_ms = 1000 * (time.perf_counter() - t_start)
warm = []
for _ in range(cfg["warmup"]):
    t0 = time.perf_counter(); step(); sync(); warm.append(1000 * (time.perf_counter() - t0))
def memory():
    if dev.type != "cuda": return None
    return {"peakAllocatedBytes": torch.cuda.max_memory_allocated(dev), "peakReservedBytes": torch.cuda.max_memory_reserved(dev),
            "allocatedBytes": torch.cuda.memory_allocated(dev), "reservedBytes": torch.cuda.memory_reserved(dev)}
print(json.dumps({"ready": True, "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                  "threads": torch.get_num_threads(), "pid": os.getpid(), "loadMs": load_ms, "warmupMs": warm,
                  "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}), flush=True)
for line in sys.stdin:
    n = int(line)
    if n <= 0: break
    times = []
    for _ in range(n):
        t0 = time.perf_counter(); step(); sync(); times.append(1000 * (time.perf_counter() - t0))
    print(json.dumps({"times": times, "memory": memory()}), flush=True)
`;

/** The reference in a child process that stays up, so its rounds can alternate with ours. */
function startReference(cfg) {
  const py = startPython(PY, cfg);
  return { ready: py.ready, run: (n) => py.send(String(n)), stop: () => py.end('0') };
}

async function setupOurs(cfg) {
  const t0 = performance.now();
  const cd = require(lib);
  const { TrainStep } = require(path.join(lib, 'train', 'trainer'));
  const { UNet } = require(path.join(lib, 'model', 'unet'));
  const { native } = require(path.join(lib, 'native'));
  cd.setNumThreads(cfg.threads);
  const m = cfg.model;
  // Float32 weights on the device: mixed precision computes in bf16/fp16 under autocast.
  const opts = { device: cfg.device };
  const [unet, textEncoder, vae, scheduler, tok] = await Promise.all([
    UNet.load(path.join(m, 'unet'), opts),
    cd.TextEncoder.load(path.join(m, 'text_encoder'), opts),
    cd.AutoencoderKL.load(path.join(m, 'vae'), opts),
    cd.Scheduler.load(path.join(m, 'scheduler')),
    cd.ClipTokenizer.fromFolder(path.join(m, 'tokenizer')),
  ]);
  const [newId] = tok.addTokens(['<new1>']);
  textEncoder.resizeTokenEmbeddings(newId + 1);
  const step = TrainStep.create(
    { unet, textEncoder, vae, scheduler },
    { learningRate: 1e-5, tokenIds: [newId], ...(cfg.mixedPrecision !== 'no' ? { mixedPrecision: cfg.mixedPrecision } : {}) },
  );
  const B = cfg.batch;
  const R = cfg.resolution;
  const f = vae.spatialFactor;
  const px = new Float32Array(2 * B * 3 * R * R).map(() => Math.random() * 2 - 1);
  const rows = tok.encodeBatch([...Array(B).fill('photo of a <new1> man'), ...Array(B).fill('photo of a man')], {
    padding: 'max_length',
    truncation: true,
  });
  const ids = new BigInt64Array(rows.flat().map((x) => BigInt(x)));
  // CPU tensors, as the data pipeline hands them over: the step moves them to the device.
  const batch = {
    pixels: cd.Tensor.fromArray(px, [2 * B, 3, R, R]),
    masks: cd.Tensor.fromArray(new Float32Array(2 * B * (R / f) ** 2).fill(1), [2 * B, 1, R / f, R / f]),
    inputIds: cd.Tensor.fromArray(ids, [2 * B, rows[0].length]),
    instanceCount: B,
  };
  const gen = new cd.Generator(0);
  const loadMs = performance.now() - t0;
  const warmupMs = [];
  for (let i = 0; i < cfg.warmup; i++) {
    const w0 = performance.now();
    await step.step(batch, gen);
    warmupMs.push(performance.now() - w0);
  }
  const memory = () => {
    const fn = native().cudaMemoryStats;
    if (!String(cfg.device).startsWith('cuda')) return null;
    if (typeof fn !== 'function') return { unavailable: 'this addon has no cudaMemoryStats (rebuild it)' };
    try {
      return fn(0);
    } catch (e) {
      return { unavailable: String(e.message || e) };
    }
  };
  return {
    threads: cd.getNumThreads(),
    loadMs,
    warmupMs,
    memory,
    async run(n) {
      const times = [];
      for (let i = 0; i < n; i++) {
        const t0 = process.hrtime.bigint();
        // The step returns the loss as a number, so it has finished on the device when it resolves.
        await step.step(batch, gen);
        times.push(Number(process.hrtime.bigint() - t0) / 1e6);
      }
      return times;
    },
  };
}

function stats(times) {
  const s = [...times].sort((a, b) => a - b);
  return { median_ms: s[s.length >> 1], mean_ms: s.reduce((a, b) => a + b, 0) / s.length, min_ms: s[0], steps: s.length };
}

async function main() {
  const cfg = args();
  // Both sides are set up and warmed, then timed in alternating rounds, so a change in machine
  // load during the run hits both alike.
  const ours = await setupOurs(cfg);
  let reference = null;
  let refInfo = null;
  let refError = null;
  if (cfg.reference === 'on') {
    reference = startReference(cfg);
    try {
      refInfo = await reference.ready;
    } catch (e) {
      refError = String(e.message || e);
      reference = null;
    }
  }
  const oursTimes = [];
  const refTimes = [];
  let refMemory = null;
  const rounds = Math.max(1, cfg.rounds);
  const per = Math.max(1, Math.round(cfg.steps / rounds));
  for (let r = 0; r < rounds; r++) {
    oursTimes.push(...(await ours.run(per)));
    if (reference) {
      try {
        const got = await reference.run(per);
        refTimes.push(...got.times);
        refMemory = got.memory;
      } catch (e) {
        // e.g. out of memory: keep our figures, say why the reference has none.
        refError = String(e.message || e);
        reference = null;
      }
    }
  }
  if (reference) reference.stop();
  const mine = { ...stats(oursTimes), threads: ours.threads, pid: process.pid, loadMs: ours.loadMs, warmupMs: ours.warmupMs, memory: ours.memory() };
  const ref = reference
    ? {
        ...stats(refTimes),
        torch: refInfo.torch,
        diffusers: refInfo.diffusers,
        transformers: refInfo.transformers,
        threads: refInfo.threads,
        pid: refInfo.pid,
        loadMs: refInfo.loadMs,
        warmupMs: refInfo.warmupMs,
        memory: refMemory,
      }
    : { error: refError ?? 'not run (--reference off)' };
  const out = {
    config: { ...cfg, cpu: os.cpus()[0]?.model, cpus: os.cpus().length, loadavg: os.loadavg(), gpu: refInfo?.device },
    ours: mine,
    diffusers: ref,
    ratio_median: reference ? mine.median_ms / ref.median_ms : null,
  };
  console.log(
    `model ${cfg.model}, ${2 * cfg.batch} examples of ${cfg.resolution}px on ${cfg.device}, mixed precision ${cfg.mixedPrecision}, ` +
      `${cfg.threads} threads, ${mine.steps} + ${ref.steps ?? 0} timed steps in ${rounds} alternating rounds`,
  );
  console.log(`  ours      median ${mine.median_ms.toFixed(1)} ms/step (mean ${mine.mean_ms.toFixed(1)})`);
  if (reference) {
    console.log(`  diffusers median ${ref.median_ms.toFixed(1)} ms/step (mean ${ref.mean_ms.toFixed(1)})`);
    console.log(`  ratio ours/diffusers ${out.ratio_median.toFixed(3)}`);
  } else {
    console.log(`  diffusers: ${ref.error.split('\n').slice(-3).join(' ')}`);
  }
  const gb = (m) => (m && m.peakAllocatedBytes !== undefined ? `${(m.peakAllocatedBytes / 1e9).toFixed(2)} GB allocated, ${(m.peakReservedBytes / 1e9).toFixed(2)} GB reserved` : 'n/a');
  if (String(cfg.device).startsWith('cuda')) console.log(`  peak memory: ours ${gb(mine.memory)}; diffusers ${gb(ref.memory)}`);
  if (cfg.json) fs.writeFileSync(cfg.json, JSON.stringify(out, null, 2) + '\n');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
