#!/usr/bin/env node
'use strict';
// Steady-state time of one Custom Diffusion optimizer step: ours (native TrainStep) against a
// diffusers reference step (HF-EX's loop body: CustomDiffusionAttnProcessor2_0, AdamW, clipping) on the
// same CPU, same model, same batch shape and the same number of threads, timed in alternating rounds
// in one invocation; prints both and the ratio.
//
//   npm run build:ts && node bench/train-step.js [--model DIR] [--resolution 32] [--batch 1]
//                                                 [--steps 20] [--rounds 4] [--warmup 3] [--threads 2] [--json FILE]
//
// The default model is the tiny SD1-architecture fixture (test/fixtures/parity/sd1/model, VAE factor
// 4); any diffusers SD1/SD2 folder works (e.g. one written by test/parity/make_full_size.py). A batch
// is B instance + B class examples (prior preservation), one modifier token.
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn } = require('child_process');

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

const PY = String.raw`
import sys, json, time, itertools, os
import torch
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
import torch.nn.functional as F
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
        procs[name] = p
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
    latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
    mask = torch.ones(2 * B, 1, latents.shape[2], latents.shape[3])
    noise = torch.randn_like(latents)
    t = torch.randint(0, sched.config.num_train_timesteps, (2 * B,))
    noisy = sched.add_noise(latents, noise, t)
    ctx = te(ids)[0]
    pred = unet(noisy, t, ctx).sample
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    pi, pp = torch.chunk(pred, 2); ti, tp = torch.chunk(target, 2); mi = torch.chunk(mask, 2)[0]
    l = F.mse_loss(pi.float(), ti.float(), reduction="none")
    loss = ((l * mi).sum([1, 2, 3]) / mi.sum([1, 2, 3])).mean() + F.mse_loss(pp.float(), tp.float(), reduction="mean")
    loss.backward()
    g = te.get_input_embeddings().weight.grad
    z = torch.arange(len(tok)) != new_id
    g.data[z, :] = g.data[z, :].fill_(0)
    torch.nn.utils.clip_grad_norm_(itertools.chain(te.parameters(), layers), 1.0)
    opt.step(); opt.zero_grad()
    return loss.item()
for _ in range(cfg["warmup"]): step()
print(json.dumps({"ready": True, "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    n = int(line)
    if n <= 0: break
    times = []
    for _ in range(n):
        t0 = time.perf_counter(); step(); times.append(1000 * (time.perf_counter() - t0))
    print(json.dumps(times), flush=True)
`;

/** The reference in a child process that stays up, so its rounds can alternate with ours. */
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
    async run(n) {
      const p = next();
      child.stdin.write(`${n}\n`);
      return p;
    },
    stop() {
      child.stdin.end('0\n');
    },
  };
}

async function setupOurs(cfg) {
  const cd = require(lib);
  const { TrainStep } = require(path.join(lib, 'train', 'trainer'));
  const { UNet } = require(path.join(lib, 'model', 'unet'));
  cd.setNumThreads(cfg.threads);
  const m = cfg.model;
  const [unet, textEncoder, vae, scheduler, tok] = await Promise.all([
    UNet.load(path.join(m, 'unet')),
    cd.TextEncoder.load(path.join(m, 'text_encoder')),
    cd.AutoencoderKL.load(path.join(m, 'vae')),
    cd.Scheduler.load(path.join(m, 'scheduler')),
    cd.ClipTokenizer.fromFolder(path.join(m, 'tokenizer')),
  ]);
  const [newId] = tok.addTokens(['<new1>']);
  textEncoder.resizeTokenEmbeddings(newId + 1);
  const step = TrainStep.create({ unet, textEncoder, vae, scheduler }, { learningRate: 1e-5, tokenIds: [newId] });
  const B = cfg.batch;
  const R = cfg.resolution;
  const f = vae.spatialFactor;
  const px = new Float32Array(2 * B * 3 * R * R).map(() => Math.random() * 2 - 1);
  const rows = tok.encodeBatch([...Array(B).fill('photo of a <new1> man'), ...Array(B).fill('photo of a man')], {
    padding: 'max_length',
    truncation: true,
  });
  const ids = new BigInt64Array(rows.flat().map((x) => BigInt(x)));
  const batch = {
    pixels: cd.Tensor.fromArray(px, [2 * B, 3, R, R]),
    masks: cd.Tensor.fromArray(new Float32Array(2 * B * (R / f) ** 2).fill(1), [2 * B, 1, R / f, R / f]),
    inputIds: cd.Tensor.fromArray(ids, [2 * B, rows[0].length]),
    instanceCount: B,
  };
  const gen = new cd.Generator(0);
  for (let i = 0; i < cfg.warmup; i++) await step.step(batch, gen);
  return {
    threads: cd.getNumThreads(),
    async run(n) {
      const times = [];
      for (let i = 0; i < n; i++) {
        const t0 = process.hrtime.bigint();
        await step.step(batch, gen);
        times.push(Number(process.hrtime.bigint() - t0) / 1e6);
      }
      return times;
    },
  };
}

function stats(times) {
  const s = [...times].sort((a, b) => a - b);
  return { median_ms: s[s.length >> 1], mean_ms: s.reduce((a, b) => a + b, 0) / s.length, steps: s.length };
}

async function main() {
  const cfg = args();
  // Both sides are set up and warmed, then timed in alternating rounds, so a change in machine
  // load during the run hits both alike.
  const ours = await setupOurs(cfg);
  const reference = startReference(cfg);
  const refInfo = await reference.ready;
  const oursTimes = [];
  const refTimes = [];
  const rounds = Math.max(1, cfg.rounds);
  const per = Math.max(1, Math.round(cfg.steps / rounds));
  for (let r = 0; r < rounds; r++) {
    oursTimes.push(...(await ours.run(per)));
    refTimes.push(...(await reference.run(per)));
  }
  reference.stop();
  const mine = { ...stats(oursTimes), threads: ours.threads };
  const ref = { ...stats(refTimes), torch: refInfo.torch, diffusers: refInfo.diffusers, threads: refInfo.threads };
  const out = {
    config: { ...cfg, cpu: os.cpus()[0]?.model, cpus: os.cpus().length, loadavg: os.loadavg() },
    ours: mine,
    diffusers: ref,
    ratio_median: mine.median_ms / ref.median_ms,
  };
  console.log(`model ${cfg.model}, ${2 * cfg.batch} examples of ${cfg.resolution}px, ${cfg.threads} threads, ${mine.steps} + ${ref.steps} timed steps in ${rounds} alternating rounds`);
  console.log(`  ours      median ${mine.median_ms.toFixed(1)} ms/step (mean ${mine.mean_ms.toFixed(1)})`);
  console.log(`  diffusers median ${ref.median_ms.toFixed(1)} ms/step (mean ${ref.mean_ms.toFixed(1)})`);
  console.log(`  ratio ours/diffusers ${out.ratio_median.toFixed(3)}`);
  if (cfg.json) fs.writeFileSync(cfg.json, JSON.stringify(out, null, 2) + '\n');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
