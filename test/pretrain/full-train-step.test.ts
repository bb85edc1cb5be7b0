/**
 * The train-all-weights mode against the reference steps of test/parity/make_pretrain_reference.py
 * (diffusers UNet / CLIP text encoder / AutoencoderKL, torch AdamW and clip_grad_norm_, diffusers'
 * cosine schedule and EMAModel) on the tiny sd1 fixture model, plus: losses fall over 50 steps on a
 * small toy batch, EMA swapping, and the models going back to inference afterwards.
 */
import * as fs from 'fs';
import * as path from 'path';
import { Generator, InvalidArgumentError, Tensor, TextEncoder, loadSafetensors } from '../../src';
import { AutoencoderKL } from '../../src/model/vae';
import { UNet } from '../../src/model/unet';
import { Scheduler } from '../../src/model/scheduler';
import { ClipTokenizer } from '../../src/model/tokenizer';
import { TrainStep } from '../../src/train/trainer';
import { DiffusionPretrainer, VaePretrainer, modelTensors } from '../../src/pretrain';
import { toFloatCHW } from '../../src/train/images';
import { toySample } from '../../src/toy';
import { repoRoot } from '../helpers/env';
import { parityDir } from '../helpers/numeric';

const FIXTURES = path.join(repoRoot, 'test', 'fixtures', 'pretrain');
const manifest = JSON.parse(fs.readFileSync(path.join(FIXTURES, 'manifest.json'), 'utf8'));
const P = manifest.configs.sd1.params;
const SAMPLES = 32;
const SMALL = 128;

interface Models {
  unet: UNet;
  textEncoder: TextEncoder;
  vae: AutoencoderKL;
  scheduler: Scheduler;
  tokenizer: ClipTokenizer;
}

async function loadModels(): Promise<Models> {
  const dir = path.join(parityDir('sd1'), 'model');
  const [unet, textEncoder, vae, scheduler, tokenizer] = await Promise.all([
    UNet.load(path.join(dir, 'unet')),
    TextEncoder.load(path.join(dir, 'text_encoder')),
    AutoencoderKL.load(path.join(dir, 'vae')),
    Scheduler.load(path.join(dir, 'scheduler')),
    ClipTokenizer.fromFolder(path.join(dir, 'tokenizer')),
  ]);
  return { unet, textEncoder, vae, scheduler, tokenizer };
}

function dispose(m: Models): void {
  m.unet.dispose();
  m.textEncoder.dispose();
  m.vae.dispose();
}

/** The reference's positions: all of a small tensor, else 32 evenly spread ones. */
function positions(n: number): number[] {
  if (n <= SMALL) return Array.from({ length: n }, (_, i) => i);
  return Array.from({ length: SAMPLES }, (_, i) => Math.floor(((i + 0.5) * n) / SAMPLES));
}

interface Comparison {
  maxValue: number;
  maxSumRel: number;
  /** The same for the attention key biases, whose gradient is zero but for rounding (see below). */
  maxKeyBias: number;
}

/**
 * Attention key biases add q·b to every score of a query row, which softmax cancels: their exact
 * gradient is 0, and what autograd returns is rounding noise (~1e-9) that differs between any two
 * implementations. Adam divides by the noise's own size, so those elements move by up to ~lr per
 * step in a direction set by the noise; they are compared against that bound instead.
 */
const KEY_BIAS = /(k_proj|to_k)\.bias$/;

/**
 * Compares weights (by prefixed name) with a recorded snapshot (values concatenated in the
 * reference's name order, plus float64 sums).
 */
function compare(weights: Record<string, Tensor>, names: string[], values: Float32Array, sums: Float64Array): Comparison {
  let offset = 0;
  const c: Comparison = { maxValue: 0, maxSumRel: 0, maxKeyBias: 0 };
  names.forEach((name, k) => {
    const w = weights[name];
    expect(w).toBeDefined();
    const data = w.toArray() as Float32Array;
    const pos = positions(data.length);
    const keyBias = KEY_BIAS.test(name);
    for (let i = 0; i < pos.length; i++) {
      const d = Math.abs(data[pos[i]] - values[offset + i]);
      if (keyBias) c.maxKeyBias = Math.max(c.maxKeyBias, d);
      else c.maxValue = Math.max(c.maxValue, d);
    }
    offset += pos.length;
    if (keyBias) return;
    let sum = 0;
    for (const x of data) sum += x;
    c.maxSumRel = Math.max(c.maxSumRel, Math.abs(sum - sums[k]) / Math.max(1, Math.abs(sums[k])));
  });
  expect(offset).toBe(values.length);
  return c;
}

const measured: string[] = [];
afterAll(() => {
  if (measured.length) console.log(`Pretraining steps vs diffusers/torch reference (float32, CPU):\n  ${measured.join('\n  ')}`);
});

describe('train-all-weights parity with diffusers + torch', () => {
  let ref: Record<string, Tensor>;
  beforeAll(async () => {
    ref = (await loadSafetensors(path.join(FIXTURES, 'sd1.safetensors'))).tensors;
  });

  test('UNet + text encoder: two AdamW steps with clipping, cosine lr and EMA', async () => {
    const m = await loadModels();
    const d = P.diffusion;
    const trainer = DiffusionPretrainer.create(m, {
      learningRate: d.learning_rate,
      lrSchedule: 'cosine',
      warmupSteps: d.warmup,
      totalSteps: d.total,
      adamWeightDecay: d.weight_decay,
      adamBeta1: d.adam_beta1,
      adamBeta2: d.adam_beta2,
      adamEpsilon: d.adam_epsilon,
      maxGradNorm: d.max_grad_norm,
      emaDecay: d.ema_decay,
    });
    try {
      expect([...trainer.parameterNames].sort()).toEqual([...d.names].sort());
      expect(m.unet.trainable).toBe('none');
      for (let s = 0; s < 3; s++) expect(trainer.learningRateAt(s)).toBeCloseTo(d.learning_rate * 0.5 * (1 + Math.cos((Math.PI * s) / 3)), 12);
      expect(trainer.emaDecayAt(1)).toBe(0);
      expect(trainer.emaDecayAt(2)).toBeCloseTo(2 / 11, 15);
      expect(trainer.emaDecayAt(1e6)).toBe(d.ema_decay);
      // The reference tokenised the prompts with transformers' CLIPTokenizer; ours must agree.
      const ids = m.tokenizer.encodeBatch(d.prompts, { padding: 'max_length', truncation: true });
      expect(Array.from(ref['diffusion.input_ids'].toArray() as BigInt64Array, Number)).toEqual(ids.flat());
      for (let k = 0; k < 2; k++) {
        const r = await trainer.step({
          inputIds: ref['diffusion.input_ids'],
          latentMean: ref['diffusion.latent_mean'],
          latentStd: ref['diffusion.latent_std'],
          vaeNoise: ref[`diffusion.vae_noise.${k}`],
          noise: ref[`diffusion.noise.${k}`],
          timesteps: ref[`diffusion.timesteps.${k}`],
        });
        expect(r.step).toBe(k + 1);
        expect(r.lr).toBeCloseTo(d.lrs[k], 12);
        expect(Math.abs(r.loss - d.losses[k]) / d.losses[k]).toBeLessThan(1e-5);
        expect(Math.abs(r.gradNorm - d.grad_norms[k]) / d.grad_norms[k]).toBeLessThan(1e-5);
        const c = compare(
          await trainer.weights(),
          d.names,
          ref[`diffusion.after.${k}.values`].toArray() as Float32Array,
          ref[`diffusion.after.${k}.sums`].toArray() as Float64Array,
        );
        measured.push(
          `diffusion step ${k}: loss ${r.loss.toFixed(6)} (ref ${d.losses[k].toFixed(6)}), max |Δw| ${c.maxValue.toExponential(2)}, ` +
            `max sum rel ${c.maxSumRel.toExponential(2)}, key biases ${c.maxKeyBias.toExponential(2)}`,
        );
        expect(c.maxValue).toBeLessThan(1e-4);
        expect(c.maxSumRel).toBeLessThan(1e-4);
        expect(c.maxKeyBias).toBeLessThan(2 * d.learning_rate * (k + 1));
      }
      const e = compare(
        await trainer.weights({ ema: true }),
        d.names,
        ref['diffusion.ema.values'].toArray() as Float32Array,
        ref['diffusion.ema.sums'].toArray() as Float64Array,
      );
      measured.push(`diffusion EMA: max |Δw| ${e.maxValue.toExponential(2)}, key biases ${e.maxKeyBias.toExponential(2)}`);
      expect(e.maxValue).toBeLessThan(1e-4);
      expect(e.maxKeyBias).toBeLessThan(4 * d.learning_rate);

      // The steps wrote into the models themselves: what a folder writer saves.
      const saved = { ...prefixed(modelTensors(m.unet, 'unet'), 'unet.'), ...prefixed(modelTensors(m.textEncoder, 'text_encoder'), 'text_encoder.') };
      const current = await trainer.weights();
      for (const name of d.names) expect(Buffer.compare(bytes(saved[name]), bytes(current[name]))).toBe(0);

      // EMA swap: the EMA weights go in, steps are refused, a second swap restores.
      const emaBefore = await trainer.weights({ ema: true });
      expect(await trainer.swapEma()).toBe(true);
      const swapped = prefixed(modelTensors(m.unet, 'unet'), 'unet.');
      const shadow = await trainer.weights({ ema: true });
      for (const n of d.names.filter((x: string) => x.startsWith('unet.'))) {
        expect(Buffer.compare(bytes(swapped[n]), bytes(emaBefore[n]))).toBe(0);
        expect(Buffer.compare(bytes(shadow[n]), bytes(current[n]))).toBe(0);
      }
      await expect(
        trainer.step({ inputIds: ref['diffusion.input_ids'], latentMean: ref['diffusion.latent_mean'], latentStd: ref['diffusion.latent_std'] }),
      ).rejects.toThrow(/EMA weights are swapped in/);
      expect(await trainer.swapEma()).toBe(false);
      const back = await trainer.weights();
      for (const n of d.names) expect(Buffer.compare(bytes(back[n]), bytes(current[n]))).toBe(0);
    } finally {
      trainer.dispose();
      dispose(m);
    }
  });

  test('AutoencoderKL: two AdamW steps of L1 + KL with clipping', async () => {
    const m = await loadModels();
    const v = P.vae;
    const trainer = VaePretrainer.create(m.vae, {
      learningRate: v.learning_rate,
      lrSchedule: 'constant',
      adamWeightDecay: v.weight_decay,
      maxGradNorm: v.max_grad_norm,
      klWeight: v.kl_weight,
      reconLoss: 'l1',
    });
    try {
      expect([...trainer.parameterNames].sort()).toEqual([...v.names].sort());
      expect(trainer.hasEma).toBe(false);
      for (let k = 0; k < 2; k++) {
        const r = await trainer.step({ pixels: ref['vae.pixels'], vaeNoise: ref[`vae.vae_noise.${k}`] });
        expect(Math.abs(r.loss - v.losses[k]) / v.losses[k]).toBeLessThan(1e-5);
        expect(Math.abs(r.recon! - v.recons[k]) / v.recons[k]).toBeLessThan(1e-5);
        expect(Math.abs(r.kl! - v.kls[k]) / v.kls[k]).toBeLessThan(1e-4);
        expect(Math.abs(r.gradNorm - v.grad_norms[k]) / v.grad_norms[k]).toBeLessThan(1e-5);
        const c = compare(
          await trainer.weights(),
          v.names,
          ref[`vae.after.${k}.values`].toArray() as Float32Array,
          ref[`vae.after.${k}.sums`].toArray() as Float64Array,
        );
        measured.push(
          `vae step ${k}: loss ${r.loss.toFixed(6)} (ref ${v.losses[k].toFixed(6)}), max |Δw| ${c.maxValue.toExponential(2)}, ` +
            `max sum rel ${c.maxSumRel.toExponential(2)}, key biases ${c.maxKeyBias.toExponential(2)}`,
        );
        expect(c.maxValue).toBeLessThan(1e-4);
        expect(c.maxSumRel).toBeLessThan(1e-4);
        expect(c.maxKeyBias).toBeLessThan(2 * v.learning_rate * (k + 1));
      }
      await expect(trainer.swapEma()).rejects.toThrow(/no EMA/);
    } finally {
      trainer.dispose();
      dispose(m);
    }
  });
});

function prefixed(t: Record<string, Tensor>, prefix: string): Record<string, Tensor> {
  return Object.fromEntries(Object.entries(t).map(([k, v]) => [prefix + k, v]));
}

function bytes(t: Tensor): Buffer {
  const a = t.toArray() as Float32Array;
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

function toyBatch(n: number, seed: number): { pixels: Tensor; captions: string[] } {
  const data = new Float32Array(n * 3 * 32 * 32);
  const captions: string[] = [];
  for (let i = 0; i < n; i++) {
    const s = toySample(seed, i);
    toFloatCHW(s.image, 'numpy', data, i * 3 * 32 * 32);
    captions.push(s.caption);
  }
  return { pixels: Tensor.fromArray(data, [n, 3, 32, 32], 'float32'), captions };
}

const mean = (a: number[]) => a.reduce((s, x) => s + x, 0) / a.length;

describe('training makes progress on a toy batch', () => {
  test('50 diffusion steps lower the loss', async () => {
    const m = await loadModels();
    const { pixels, captions } = toyBatch(8, 11);
    const ids = m.tokenizer.encodeBatch(captions, { padding: 'max_length', truncation: true });
    const inputIds = Tensor.fromArray(BigInt64Array.from(ids.flat(), BigInt), [8, ids[0].length], 'int64');
    const trainer = DiffusionPretrainer.create(m, { learningRate: 2e-3, lrSchedule: 'constant', warmupSteps: 5, emaDecay: 0.99 });
    try {
      const gen = new Generator(5);
      const losses: number[] = [];
      for (let s = 0; s < 50; s++) losses.push((await trainer.step({ inputIds, pixels }, gen)).loss);
      measured.push(`diffusion, 50 steps on 8 toy images: loss ${mean(losses.slice(0, 10)).toFixed(4)} → ${mean(losses.slice(-10)).toFixed(4)}`);
      expect(mean(losses.slice(-10))).toBeLessThan(0.7 * mean(losses.slice(0, 10)));
    } finally {
      trainer.dispose();
      dispose(m);
    }
  });

  test('50 VAE steps lower the reconstruction loss', async () => {
    const m = await loadModels();
    const { pixels } = toyBatch(8, 12);
    const trainer = VaePretrainer.create(m.vae, { learningRate: 2e-3, lrSchedule: 'constant', klWeight: 1e-6 });
    try {
      const gen = new Generator(6);
      const losses: number[] = [];
      for (let s = 0; s < 50; s++) losses.push((await trainer.step({ pixels }, gen)).recon!);
      measured.push(`vae, 50 steps on 8 toy images: L1 ${mean(losses.slice(0, 10)).toFixed(4)} → ${mean(losses.slice(-10)).toFixed(4)}`);
      expect(mean(losses.slice(-10))).toBeLessThan(0.7 * mean(losses.slice(0, 10)));
    } finally {
      trainer.dispose();
      dispose(m);
    }
  });
});

describe('contracts', () => {
  test('options are checked; models go back to inference when the trainer is disposed', async () => {
    const m = await loadModels();
    try {
      expect(() => DiffusionPretrainer.create(m, { lrSchedule: 'cosine' })).toThrow(/totalSteps > warmupSteps/);
      expect(() => DiffusionPretrainer.create(m, { bogus: 1 } as never)).toThrow(InvalidArgumentError);
      expect(() => VaePretrainer.create(m.vae, { reconLoss: 'l3' as never })).toThrow(/reconLoss/);
      expect(() => VaePretrainer.create(m.vae, { lrSchedule: 'constant', emaDecay: 1 })).toThrow(/emaDecay/);
      // Without a VAE, cached posteriors need a scaling factor.
      const noVae = DiffusionPretrainer.create({ unet: m.unet, textEncoder: m.textEncoder, scheduler: m.scheduler }, { lrSchedule: 'constant' });
      const ids = m.tokenizer.encodeBatch(['a'], { padding: 'max_length', truncation: true });
      const inputIds = Tensor.fromArray(BigInt64Array.from(ids.flat(), BigInt), [1, ids[0].length], 'int64');
      const z = Tensor.zeros([1, 4, 8, 8]);
      await expect(noVae.step({ inputIds, latentMean: z, latentStd: z })).rejects.toThrow(/scalingFactor/);
      await expect(noVae.step({ inputIds, pixels: Tensor.zeros([1, 3, 32, 32]) })).rejects.toThrow(/no VAE/);
      // A Custom Diffusion trainer that takes the UNet over is detected at the next step.
      const cd = TrainStep.create({ unet: m.unet, textEncoder: m.textEncoder, scheduler: m.scheduler }, { freezeModel: 'crossattn_kv' });
      await expect(noVae.step({ inputIds, latents: z })).rejects.toThrow(/trainable set was changed/);
      cd.dispose();
      noVae.dispose();
      expect(m.unet.trainable).toBe('none');
    } finally {
      dispose(m);
    }
  });
});
