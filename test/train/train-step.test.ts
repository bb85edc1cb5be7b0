/**
 * The native Custom Diffusion optimizer step against the reference steps of
 * test/parity/make_train_step_reference.py (diffusers' CustomDiffusionAttnProcessor2_0, torch
 * AdamW and clip_grad_norm_, HF-EX's loss) on the tiny fixture models, plus the step's contracts:
 * frozen weights stay bit-identical, NaN is reported, options are checked.
 */
import * as fs from 'fs';
import * as path from 'path';
import { AutoencoderKL, ClipTokenizer, Generator, InvalidArgumentError, Tensor, TextEncoder, TrainingError, loadSafetensors } from '../../src';
import { UNet } from '../../src/model/unet';
import { Scheduler } from '../../src/model/scheduler';
import { TrainStep } from '../../src/train/trainer';
import { repoRoot } from '../helpers/env';
import { maxAbsDiff, parityDir, relError } from '../helpers/numeric';

const FIXTURES = path.join(repoRoot, 'test', 'fixtures', 'train-step');

interface RefParams {
  learning_rate: number;
  adam_beta1: number;
  adam_beta2: number;
  adam_weight_decay: number;
  adam_epsilon: number;
  max_grad_norm: number;
  prior_loss_weight: number;
  instance_count: number;
  steps: number;
  prompts: string[];
  modifier_token: string;
  modifier_token_id: number;
  initializer_token: string;
  initializer_token_id: number;
  prediction_type: string;
  kv_names: string[];
}

const manifest = JSON.parse(fs.readFileSync(path.join(FIXTURES, 'manifest.json'), 'utf8')) as {
  configs: Record<string, { file: string; params: RefParams }>;
};

const measured: string[] = [];
afterAll(() => {
  if (measured.length) console.log(`Training step vs diffusers/torch reference (float32, CPU):\n  ${measured.join('\n  ')}`);
});

interface Models {
  unet: UNet;
  textEncoder: TextEncoder;
  vae: AutoencoderKL;
  scheduler: Scheduler;
}

async function loadModels(config: string): Promise<Models> {
  const dir = path.join(parityDir(config), 'model');
  const [unet, textEncoder, vae, scheduler] = await Promise.all([
    UNet.load(path.join(dir, 'unet')),
    TextEncoder.load(path.join(dir, 'text_encoder')),
    AutoencoderKL.load(path.join(dir, 'vae')),
    Scheduler.load(path.join(dir, 'scheduler')),
  ]);
  return { unet, textEncoder, vae, scheduler };
}

function disposeModels(m: Models): void {
  m.unet.dispose();
  m.textEncoder.dispose();
  m.vae.dispose();
}

/** Adds `<new1>` (one row) initialised from the initializer row, as the reference does. */
function addToken(m: Models, p: RefParams): void {
  expect(m.textEncoder.vocabSize).toBe(p.modifier_token_id);
  m.textEncoder.resizeTokenEmbeddings(p.modifier_token_id + 1);
  m.textEncoder.setTokenRows([p.modifier_token_id], m.textEncoder.tokenRows([p.initializer_token_id]));
}

function bytesOf(t: Tensor): Buffer {
  const a = t.toArray() as Float32Array;
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

function stepOptions(p: RefParams) {
  return {
    learningRate: p.learning_rate,
    adamBeta1: p.adam_beta1,
    adamBeta2: p.adam_beta2,
    adamWeightDecay: p.adam_weight_decay,
    adamEpsilon: p.adam_epsilon,
    maxGradNorm: p.max_grad_norm,
    priorLossWeight: p.prior_loss_weight,
    tokenIds: [p.modifier_token_id],
  };
}

describe.each([['sd1'], ['sd2']])('Custom Diffusion training step (%s) against the reference', (config) => {
  const ref = manifest.configs[config];
  const p = ref.params;
  let tensors: Record<string, Tensor>;
  let m: Models;

  beforeAll(async () => {
    tensors = (await loadSafetensors(path.join(FIXTURES, ref.file))).tensors;
    m = await loadModels(config);
    addToken(m, p);
  });
  afterAll(() => disposeModels(m));

  it('tokenizes the prompts as the reference (the added token is one id)', async () => {
    const tok = await ClipTokenizer.fromFolder(path.join(parityDir(config), 'model', 'tokenizer'));
    expect(tok.tokenId(p.initializer_token)).toBe(p.initializer_token_id);
    expect(tok.addTokens([p.modifier_token])).toEqual([p.modifier_token_id]);
    const ids = tok.encodeBatch(p.prompts, { padding: 'max_length', truncation: true });
    const want = Array.from(tensors.input_ids.toArray() as BigInt64Array, Number);
    expect(ids.flat()).toEqual(want);
  });

  it('matches the loss, gradient norm, K/V weights and token row after two AdamW steps; nothing else changes', async () => {
    const row0 = m.textEncoder.tokenRows([p.modifier_token_id]);
    expect(bytesOf(row0).equals(bytesOf(tensors.initial_token_row))).toBe(true);

    // Everything that must stay bit-identical: every UNet tensor but the trained K/V, every base token row.
    const kv = new Set(p.kv_names);
    const frozenBefore = new Map<string, Buffer>();
    for (const [name, t] of Object.entries(m.unet.allParameters())) if (!kv.has(name)) frozenBefore.set(name, bytesOf(t));
    const baseIds = Array.from({ length: p.modifier_token_id }, (_, i) => i);
    const baseRowsBefore = bytesOf(m.textEncoder.tokenRows(baseIds));
    const kvBefore: Record<string, Tensor> = m.unet.allParameters((n) => kv.has(n));
    const kvStart: Record<string, Tensor> = {};
    for (const [n, t] of Object.entries(kvBefore)) kvStart[n] = Tensor.fromArray(t.toArray() as Float32Array, t.shape);

    const step = TrainStep.create(m, stepOptions(p));
    try {
      expect([...step.trainableNames]).toEqual([...p.kv_names, step.addedRowsName]);
      let prev: Record<string, Tensor> = { ...kvStart, [step.addedRowsName]: row0 };
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
        expect(r.optimizerStepped).toBe(true);
        expect(r.optimizerSteps).toBe(k + 1);
        expect(r.lr).toBe(p.learning_rate);
        const wantLoss = (tensors[`loss.${k}`].toArray() as Float32Array)[0];
        const wantNorm = (tensors[`grad_norm.${k}`].toArray() as Float32Array)[0];
        const lossErr = Math.abs(r.loss - wantLoss) / Math.abs(wantLoss);
        const normErr = Math.abs(r.gradNorm - wantNorm) / Math.abs(wantNorm);
        expect(lossErr).toBeLessThanOrEqual(1e-4);
        expect(normErr).toBeLessThanOrEqual(1e-4);

        const now = await step.trainables();
        let worstW = 0;
        let worstDelta = 0;
        for (const name of p.kv_names) {
          const want = tensors[`after.${k}.${name}`];
          const got = now[name];
          worstW = Math.max(worstW, await relError(got, want));
          // The update itself (after − before) is a much stricter measure than the weights.
          worstDelta = Math.max(worstDelta, await relErrorOfDiff(got, prev[name], want, prev[name]));
        }
        const rows = now[step.addedRowsName];
        const rowGot = Tensor.fromArray(rows.toArray() as Float32Array, [rows.shape[1]]);
        const rowWant = tensors[`after.${k}.${p.modifier_token}`];
        const rowErr = await relError(rowGot, rowWant);
        const rowPrev = prev[step.addedRowsName];
        const rowPrevFlat = Tensor.fromArray(rowPrev.toArray() as Float32Array, [rowGot.shape[0]]);
        const rowDeltaErr = await relErrorOfDiff(rowGot, rowPrevFlat, rowWant, rowPrevFlat);
        measured.push(
          `${config} step ${k + 1}: loss ${r.loss.toFixed(6)} (rel ${lossErr.toExponential(2)}), grad norm ${r.gradNorm.toFixed(5)} ` +
            `(rel ${normErr.toExponential(2)}); K/V rel ≤ ${worstW.toExponential(2)} (update rel ≤ ${worstDelta.toExponential(2)}); ` +
            `token row rel ${rowErr.toExponential(2)} (update rel ${rowDeltaErr.toExponential(2)})`,
        );
        expect(worstW).toBeLessThanOrEqual(1e-4);
        expect(rowErr).toBeLessThanOrEqual(1e-4);
        // float32 noise in tiny gradients (|g| ~ eps) shows here up to ~1e-3; a missing weight decay
        // (2% of the update in sd1) or a wrong bias correction would be far above.
        expect(worstDelta).toBeLessThanOrEqual(3e-3);
        expect(rowDeltaErr).toBeLessThanOrEqual(3e-3);
        prev = now;
      }

      // The K/V tensors the model computes with are the ones that were updated (in place).
      const live = m.unet.allParameters((n) => kv.has(n));
      for (const name of p.kv_names) expect(await maxAbsDiff(live[name], prev[name])).toBe(0);
      const all = m.unet.allParameters();
      const changed = [...frozenBefore].filter(([name, before]) => !bytesOf(all[name]).equals(before)).map(([name]) => name);
      expect(changed).toEqual([]);
      expect(frozenBefore.size).toBeGreaterThan(100);
      expect(bytesOf(m.textEncoder.tokenRows(baseIds)).equals(baseRowsBefore)).toBe(true);

      // The optimizer state: torch's moments after two steps are finite and round-trip exactly.
      const st = await step.optimizerState();
      expect(st.names).toEqual([...step.trainableNames]);
      expect(st.optimizerSteps).toBe(p.steps);
      await step.setOptimizerState(st);
      const again = await step.optimizerState();
      for (let i = 0; i < st.names.length; i++) expect(bytesOf(again.expAvgSq[i]).equals(bytesOf(st.expAvgSq[i]))).toBe(true);
    } finally {
      step.dispose();
    }
  });
});

/** ‖(a − a0) − (b − b0)‖ / ‖b − b0‖. */
async function relErrorOfDiff(a: Tensor, a0: Tensor, b: Tensor, b0: Tensor): Promise<number> {
  const x = a.toArray() as Float32Array;
  const x0 = a0.toArray() as Float32Array;
  const y = b.toArray() as Float32Array;
  const y0 = b0.toArray() as Float32Array;
  let num = 0;
  let den = 0;
  for (let i = 0; i < y.length; i++) {
    const d = x[i] - x0[i] - (y[i] - y0[i]);
    num += d * d;
    den += (y[i] - y0[i]) ** 2;
  }
  return Math.sqrt(num / den);
}

describe('Custom Diffusion training step: contracts (sd1)', () => {
  const ref = manifest.configs.sd1;
  const p = ref.params;
  let tensors: Record<string, Tensor>;

  beforeAll(async () => {
    tensors = (await loadSafetensors(path.join(FIXTURES, ref.file))).tensors;
  });

  const batchOf = (k: number) => ({
    pixels: tensors.pixels,
    masks: tensors.masks,
    inputIds: tensors.input_ids,
    instanceCount: p.instance_count,
    vaeNoise: tensors[`vae_noise.${k}`],
    noise: tensors[`noise.${k}`],
    timesteps: tensors[`timesteps.${k}`],
  });

  it('reduces the loss well below its start in 100 steps on a fixed batch (K/V and token row only)', async () => {
    const m = await loadModels('sd1');
    addToken(m, p);
    const step = TrainStep.create(m, { ...stepOptions(p), learningRate: 3e-3 });
    try {
      const losses: number[] = [];
      for (let i = 0; i < 100; i++) losses.push((await step.step(batchOf(0))).loss);
      const first = losses[0];
      const last = losses.slice(-5).reduce((a, b) => a + b, 0) / 5;
      measured.push(`sd1 fixed batch, lr 3e-3: loss ${first.toFixed(4)} → ${last.toFixed(4)} after 100 steps (×${(last / first).toFixed(3)})`);
      expect(last).toBeLessThan(0.5 * first);
    } finally {
      step.dispose();
      disposeModels(m);
    }
  });

  it('draws VAE noise, noise and timesteps from the generator (same seed, same loss; another seed, another)', async () => {
    const m = await loadModels('sd1');
    addToken(m, p);
    const step = TrainStep.create(m, { ...stepOptions(p), learningRate: 0 });
    try {
      const batch = { pixels: tensors.pixels, masks: tensors.masks, inputIds: tensors.input_ids, instanceCount: 2 };
      const a = await step.step(batch, new Generator(7));
      const b = await step.step(batch, new Generator(7));
      const c = await step.step(batch, new Generator(8));
      // lr 0 leaves the weights as they are, except AdamW's decay which is lr-scaled too.
      expect(b.loss).toBe(a.loss);
      expect(c.loss).not.toBe(a.loss);
      expect(step.learningRateAt(0)).toBe(0);
    } finally {
      step.dispose();
      disposeModels(m);
    }
  });

  it('caches class latents and the text encoding of prompts without a trainable token, with the same result as encoding every step', async () => {
    const run = async (cache: boolean) => {
      const m = await loadModels('sd1');
      addToken(m, p);
      const step = TrainStep.create(m, { ...stepOptions(p), learningRate: 1e-3, cacheTextEmbeddings: cache, cacheClassLatents: cache });
      try {
        const results = [];
        for (let i = 0; i < 4; i++) results.push(await step.step(batchOf(i % 2)));
        const weights = await step.trainables();
        return { results, weights };
      } finally {
        step.dispose();
        disposeModels(m);
      }
    };
    const cached = await run(true);
    const fresh = await run(false);
    // The fixture batch has class rows (no <new1>): served from the cache from the second step on.
    const classRows = (p as unknown as { prompts: string[] }).prompts.length - p.instance_count;
    expect(classRows).toBeGreaterThan(0);
    expect(cached.results.map((r) => r.textCacheHits)).toEqual([0, 1, 2, 3].map((k) => k * classRows));
    expect(cached.results.map((r) => r.latentCacheHits)).toEqual([0, 1, 2, 3].map((k) => k * classRows));
    expect(fresh.results.every((r) => r.textCacheHits === 0 && r.latentCacheHits === 0)).toBe(true);
    cached.results.forEach((r, i) => expect(Math.abs(r.loss - fresh.results[i].loss)).toBeLessThan(1e-5 * Math.abs(fresh.results[i].loss)));
    for (const n of Object.keys(fresh.weights)) {
      const a = Array.from(cached.weights[n].toArray() as Float32Array);
      const b = Array.from(fresh.weights[n].toArray() as Float32Array);
      const scale = Math.max(...b.map(Math.abs));
      expect(Math.max(...a.map((v, i) => Math.abs(v - b[i]))) / scale).toBeLessThan(1e-5);
    }
  });

  it('with gradient checkpointing gives the losses, K/V weights and token row of the plain step', async () => {
    const run = async (gradientCheckpointing: boolean) => {
      const m = await loadModels('sd1');
      addToken(m, p);
      const step = TrainStep.create(m, { ...stepOptions(p), learningRate: 1e-3, gradientCheckpointing });
      try {
        const losses: number[] = [];
        let segments = 0;
        for (let i = 0; i < 3; i++) {
          const r = await step.step(batchOf(i % 2));
          losses.push(r.loss);
          segments = r.checkpointedSegments;
        }
        // 18 resnets and transformers in the sd1 fixture's UNet, once per step, only when asked.
        expect(segments).toBe(gradientCheckpointing ? 3 * 18 : 0);
        const weights = await step.trainables();
        const row = m.textEncoder.tokenRows([p.modifier_token_id]);
        return { losses, weights, row: Array.from(row.toArray() as Float32Array) };
      } finally {
        step.dispose();
        disposeModels(m);
      }
    };
    const ckpt = await run(true);
    const plain = await run(false);
    ckpt.losses.forEach((l, i) => expect(Math.abs(l - plain.losses[i])).toBeLessThanOrEqual(1e-6 * Math.abs(plain.losses[i])));
    let worst = 0;
    for (const n of Object.keys(plain.weights)) {
      const a = Array.from(ckpt.weights[n].toArray() as Float32Array);
      const b = Array.from(plain.weights[n].toArray() as Float32Array);
      const scale = Math.max(...b.map(Math.abs));
      worst = Math.max(worst, Math.max(...a.map((v, i) => Math.abs(v - b[i]))) / scale);
    }
    const rowScale = Math.max(...plain.row.map(Math.abs));
    const rowErr = Math.max(...ckpt.row.map((v, i) => Math.abs(v - plain.row[i]))) / rowScale;
    measured.push(`sd1 gradient checkpointing vs plain after 3 steps: weights rel ${worst.toExponential(2)}, token row rel ${rowErr.toExponential(2)}`);
    expect(Object.keys(ckpt.weights).sort()).toEqual(Object.keys(plain.weights).sort());
    expect(worst).toBeLessThan(1e-5);
    expect(rowErr).toBeLessThan(1e-5);
  });

  it('gives the token rows their own learning rate (tokenLearningRateScale); the K/V steps stay the same', async () => {
    const run = async (tokenLearningRateScale: number | undefined) => {
      const m = await loadModels('sd1');
      addToken(m, p);
      const row0 = Array.from(m.textEncoder.tokenRows([p.modifier_token_id]).toArray() as Float32Array);
      const step = TrainStep.create(m, { ...stepOptions(p), learningRate: 1e-3, tokenLearningRateScale });
      try {
        await step.step(batchOf(0));
        const weights = await step.trainables();
        const row = Array.from(m.textEncoder.tokenRows([p.modifier_token_id]).toArray() as Float32Array);
        const kv = Object.fromEntries(Object.entries(weights).filter(([n]) => n !== step.addedRowsName).map(([n, t]) => [n, bytesOf(t)]));
        return { kv, moved: row.map((v, i) => v - row0[i]) };
      } finally {
        step.dispose();
        disposeModels(m);
      }
    };
    const one = await run(undefined);
    const ten = await run(10);
    const frozen = await run(0);
    // AdamW's move (decay and step) is proportional to the learning rate.
    const big = one.moved.map((d, i) => [d, ten.moved[i]]).filter(([d]) => Math.abs(d) > 1e-5);
    expect(big.length).toBeGreaterThan(one.moved.length / 2);
    for (const [d, d10] of big) expect(Math.abs(d10 / d - 10)).toBeLessThan(1e-2);
    expect(frozen.moved.every((d) => d === 0)).toBe(true);
    for (const r of [ten, frozen]) {
      for (const n of Object.keys(one.kv)) expect(r.kv[n].equals(one.kv[n])).toBe(true);
    }
  });

  it('accumulates gradients: only every N-th micro-batch updates, with the warmup schedule', async () => {
    const m = await loadModels('sd1');
    addToken(m, p);
    const step = TrainStep.create(m, { ...stepOptions(p), gradientAccumulationSteps: 2, warmupSteps: 2 });
    try {
      const before = await step.trainables();
      const r1 = await step.step(batchOf(0));
      expect(r1.optimizerStepped).toBe(false);
      expect(r1.gradNorm).toBe(-1);
      await expect(step.optimizerState()).rejects.toMatchObject({ code: 'TRAIN_STATE' });
      const mid = await step.trainables();
      for (const n of step.trainableNames) expect(bytesOf(mid[n]).equals(bytesOf(before[n]))).toBe(true);
      const r2 = await step.step(batchOf(1));
      expect(r2.optimizerStepped).toBe(true);
      // LambdaLR warmup: the first optimizer step runs at lr · 0/2 = 0, the second at lr/2, then lr.
      expect(r2.lr).toBe(0);
      expect(step.learningRateAt(1)).toBe(p.learning_rate / 2);
      expect(step.learningRateAt(2)).toBe(p.learning_rate);
      expect((await step.optimizerState()).optimizerSteps).toBe(1);
    } finally {
      step.dispose();
      disposeModels(m);
    }
  });

  it('reports a NaN loss as TrainingError naming the step, without touching the weights', async () => {
    const m = await loadModels('sd1');
    addToken(m, p);
    const step = TrainStep.create(m, stepOptions(p));
    try {
      await step.step(batchOf(0));
      const before = await step.trainables();
      const px = tensors.pixels.toArray() as Float32Array;
      px[5] = NaN;
      const bad = Tensor.fromArray(px, tensors.pixels.shape);
      const err = await step.step({ ...batchOf(1), pixels: bad }).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(TrainingError);
      expect((err as TrainingError).code).toBe('TRAIN_NAN');
      expect((err as TrainingError).step).toBe(2);
      expect((err as Error).message).toMatch(/step 2/);
      const after = await step.trainables();
      for (const n of step.trainableNames) expect(bytesOf(after[n]).equals(bytesOf(before[n]))).toBe(true);
      // Training can go on after the failed step.
      expect((await step.step(batchOf(1))).optimizerSteps).toBe(2);
    } finally {
      step.dispose();
      disposeModels(m);
    }
  });

  it('refuses bad options and bad batches with clear errors', async () => {
    const m = await loadModels('sd1');
    try {
      const make = (o: object) => () => TrainStep.create(m, o as never);
      expect(make({ freezeModel: 'everything' })).toThrow(/freezeModel must be 'crossattn_kv' or 'crossattn'/);
      expect(make({ learningRte: 1 })).toThrow(/Unknown trainer option "learningRte"/);
      expect(make({ gradientCheckpointing: 'yes' })).toThrow(/gradientCheckpointing/);
      expect(make({ mixedPrecision: 'fp16' })).toThrow(/needs a CUDA device/);
      expect(make({ tokenIds: [1514] })).toThrow(/0 added token rows but 1 modifier tokens/);
      expect(make({ gradientAccumulationSteps: 0 })).toThrow(InvalidArgumentError);
      expect(make({ tokenLearningRateScale: -1 })).toThrow(/tokenLearningRateScale must be a finite number ≥ 0/);
      addToken(m, p);
      const step = TrainStep.create(m, stepOptions(p));
      try {
        const b = batchOf(0);
        await expect(step.step({ ...b, instanceCount: 5 })).rejects.toThrow(/instanceCount must lie in \[1, 4\]/);
        await expect(step.step({ ...b, timesteps: Tensor.fromArray(new BigInt64Array([0n, 1n, 2n, 1000n]), [4]) })).rejects.toThrow(
          /timesteps must lie in \[0, 1000\)/,
        );
        const empty = new Float32Array(4 * 64);
        await expect(step.step({ ...b, masks: Tensor.fromArray(empty, [4, 1, 8, 8]) })).rejects.toThrow(/mask of example 0 .* is empty/);
        await expect(step.step({ ...b, pixels: undefined })).rejects.toThrow(/needs pixels/);
      } finally {
        step.dispose();
      }
    } finally {
      disposeModels(m);
    }
  });

  it('runs under bf16 autocast on the CPU with float32 trainables (loss close to float32)', async () => {
    const results: number[] = [];
    for (const mixedPrecision of ['no', 'bf16'] as const) {
      const m = await loadModels('sd1');
      addToken(m, p);
      const step = TrainStep.create(m, { ...stepOptions(p), mixedPrecision });
      try {
        results.push((await step.step(batchOf(0))).loss);
        const t = await step.trainables();
        for (const n of step.trainableNames) expect(t[n].dtype).toBe('float32');
      } finally {
        step.dispose();
        disposeModels(m);
      }
    }
    const rel = Math.abs(results[1] - results[0]) / results[0];
    measured.push(`sd1 bf16 autocast loss ${results[1].toFixed(5)} vs float32 ${results[0].toFixed(5)} (rel ${rel.toExponential(2)})`);
    expect(rel).toBeLessThan(5e-2);
  });
});
