import * as fs from 'fs';
import * as path from 'path';
import { Generator, InvalidArgumentError, ModelError, Tensor } from '../../src';
import { loadSafetensors } from '../../src/core/safetensors';
import {
  SCHEDULER_CLASSES,
  Scheduler,
  fakeModelOutput,
  scaleTensor,
  type SchedulerKind,
  type StepOptions,
} from '../../src/model/scheduler';
import { repoRoot } from '../helpers/env';
import { loadCase, maxAbsDiff, parityDir, readManifest, relError, values } from '../helpers/numeric';

// Every scheduler case of test/parity/README.md: the full sampling loop with the fake model
// eps(x, t) = 0.3·x + 0.01·(t/1000)·c, each step fed our own previous output.
const CASES: [string, SchedulerKind, Record<string, unknown> | undefined][] = [
  ['sched_ddpm', 'ddpm', undefined],
  ['sched_ddim_eta0', 'ddim', undefined],
  ['sched_ddim_eta1', 'ddim', undefined],
  ['sched_pndm', 'pndm', undefined],
  ['sched_dpmpp_2m', 'dpmsolver++', undefined],
  ['sched_dpmpp_2m_25', 'dpmsolver++', undefined],
  ['sched_dpmpp_2m_karras', 'dpmsolver++', { use_karras_sigmas: true }],
  ['sched_euler', 'euler', undefined],
  ['sched_euler_ancestral', 'euler_ancestral', undefined],
];
const CONFIGS = ['sd1', 'sd2'];
const TOL = 1e-5;

function hubConfig(config: string): string {
  return fs.readFileSync(path.join(parityDir(config), 'model', 'scheduler', 'scheduler_config.json'), 'utf8');
}

function intValues(t: Tensor): number[] {
  // Number() of each entry: int64 tensors come back as BigInt64Array (of the addon's realm).
  return Array.from(t.toArray() as ArrayLike<number | bigint>, (x) => Number(x));
}

/** Options without the bookkeeping keys ("_class_name", "_diffusers_version", "_use_default_values"). */
function options(config: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(config).filter(([k]) => !k.startsWith('_')));
}

const report: string[] = [];
afterAll(() => {
  if (report.length) console.log(`scheduler parity (relative error ‖a−b‖/‖b‖, max over steps):\n${report.join('\n')}`);
});

describe.each(CONFIGS)('%s schedulers against diffusers', (config) => {
  it.each(CASES)('%s: timesteps, sigmas and every step', async (name, kind, overrides) => {
    const c = readManifest(config).cases[name];
    const p = c.params as {
      num_inference_steps: number;
      num_loop_steps: number;
      init_noise_sigma: number;
      eta: number | null;
      noise_steps: number[];
      effective_config: Record<string, unknown>;
    };
    const f = await loadCase(config, name);
    const s = Scheduler.fromConfig(kind, hubConfig(config), overrides);
    expect(s.className).toBe(c.params.scheduler_class);
    // The effective config is diffusers' (defaults of the class for absent keys, other keys carried along).
    expect(options(s.config)).toEqual(options(p.effective_config));

    s.setTimesteps(p.num_inference_steps);
    const ts = s.timesteps();
    expect(ts).toEqual(intValues(f.timesteps));
    expect(ts.length).toBe(p.num_loop_steps);
    let sigmaErr = 0;
    if (f.sigmas) {
      const sig = s.sigmas();
      expect(sig).toBeDefined();
      sigmaErr = await maxAbsDiff(sig!, f.sigmas);
      expect(sigmaErr).toBe(0);
    }
    expect(s.initNoiseSigma()).toBe(values(f.init_noise_sigma)[0]);
    expect(s.initNoiseSigma()).toBeCloseTo(p.init_noise_sigma, 12);

    let x = scaleTensor(f.x_T, s.initNoiseSigma());
    const e0 = await relError(x, f.latents_0);
    expect(e0).toBe(0);
    let worst = 0;
    for (let i = 0; i < ts.length; i++) {
      const t = ts[i];
      const input = s.scaleModelInput(x, t);
      if (f[`step.${i}.model_input`]) {
        const e = await relError(input, f[`step.${i}.model_input`]);
        expect(e).toBeLessThanOrEqual(TOL);
        worst = Math.max(worst, e);
      }
      const out = fakeModelOutput(input, t, f.c);
      const eo = await relError(out, f[`step.${i}.model_output`]);
      expect(eo).toBeLessThanOrEqual(TOL);
      const opts: StepOptions = {};
      if (f[`step.${i}.noise`]) opts.noise = f[`step.${i}.noise`];
      if (p.eta !== null) opts.eta = p.eta;
      x = s.step(out, t, x, opts);
      const e = await relError(x, f[`step.${i}.prev_sample`]);
      expect(e).toBeLessThanOrEqual(TOL);
      worst = Math.max(worst, e, eo);
    }
    expect(Object.keys(f).filter((k) => k.endsWith('.noise')).length).toBe(p.noise_steps.length);
    const ef = await relError(x, f.final);
    expect(ef).toBeLessThanOrEqual(TOL);
    report.push(
      `  ${config} ${name.padEnd(22)} steps ${String(ts.length).padStart(2)}  worst step ${worst.toExponential(2)}  final ${ef.toExponential(2)}` +
        (f.sigmas ? `  sigmas max|Δ| ${sigmaErr}` : ''),
    );
  });

  it('ddpm_training: betas, alphas_cumprod, add_noise, get_velocity and the training target', async () => {
    const c = readManifest(config).cases.ddpm_training;
    const f = await loadCase(config, 'ddpm_training');
    const s = Scheduler.fromConfig('ddpm', hubConfig(config));
    expect(options(s.config)).toEqual(options((c.params as { effective_config: Record<string, unknown> }).effective_config));
    // Bit-exact tables: the same float32 linspace/pow/cumprod as diffusers.
    expect(await maxAbsDiff(s.betas(), f.betas)).toBe(0);
    expect(await maxAbsDiff(s.alphasCumprod(), f.alphas_cumprod)).toBe(0);
    const noisy = s.addNoise(f.x0, f.noise, f.timesteps);
    const velocity = s.getVelocity(f.x0, f.noise, f.timesteps);
    const target = s.trainingTarget(f.x0, f.noise, f.timesteps);
    const en = await relError(noisy, f.noisy);
    const ev = await relError(velocity, f.velocity);
    const et = await relError(target, f.target);
    expect(en).toBeLessThanOrEqual(TOL);
    expect(ev).toBeLessThanOrEqual(TOL);
    expect(et).toBeLessThanOrEqual(TOL);
    expect(s.predictionType).toBe(config === 'sd1' ? 'epsilon' : 'v_prediction');
    // Timesteps as a plain number list give the same result.
    const ts = intValues(f.timesteps);
    expect(await maxAbsDiff(s.addNoise(f.x0, f.noise, ts), noisy)).toBe(0);
    report.push(
      `  ${config} ddpm_training          betas/alphas_cumprod bit-exact  add_noise ${en.toExponential(2)}  velocity ${ev.toExponential(2)}  target ${et.toExponential(2)}`,
    );
  });

  it('load() picks the class from _class_name', async () => {
    const s = await Scheduler.load(path.join(parityDir(config), 'model'));
    expect(s.className).toBe(config === 'sd1' ? 'PNDMScheduler' : 'DDIMScheduler');
    expect(s.kind).toBe(config === 'sd1' ? 'pndm' : 'ddim');
    const again = await Scheduler.load(path.join(parityDir(config), 'model', 'scheduler'));
    expect(again.config).toEqual(s.config);
  });
});

describe('Scheduler config rules (diffusers from_config)', () => {
  const hub = JSON.parse(hubConfig('sd1')) as Record<string, unknown>;

  it('gives absent keys the class default, and keeps that after a round trip through another class', () => {
    const ddim = Scheduler.fromConfig('ddim', hub);
    expect(ddim.config.timestep_spacing).toBe('leading');
    expect(ddim.config._use_default_values).toContain('timestep_spacing');
    // Euler.from_config(ddim.config): timestep_spacing was a default of DDIM, so Euler uses its own.
    const euler = Scheduler.fromConfig('euler', ddim.config);
    expect(euler.config.timestep_spacing).toBe('linspace');
    euler.setTimesteps(10);
    expect(euler.initNoiseSigma()).toBeCloseTo(14.6146, 3);
    // Keys of other schedulers are carried along: set_alpha_to_one survives DDPM on its way to DDIM.
    const ddpm = Scheduler.fromConfig('ddpm', hub);
    expect(ddpm.config.set_alpha_to_one).toBe(false);
    const ddim2 = Scheduler.fromConfig('ddim', ddpm.config);
    expect(ddim2.config.set_alpha_to_one).toBe(false);
    expect(ddim2.config).toEqual(ddim.config);
  });

  it('ignores the options of other diffusers schedulers, as from_config does', () => {
    const lcm = { ...hub, _class_name: 'LCMScheduler', original_inference_steps: 50, timestep_scaling: 10.0 };
    const s = Scheduler.fromConfig('ddim', lcm);
    expect(s.config.original_inference_steps).toBe(50);
    expect(options(s.config)).toEqual({ ...options(Scheduler.fromConfig('ddim', hub).config), original_inference_steps: 50, timestep_scaling: 10 });
  });

  it('applies overrides, and with "leading" spacing Euler starts at sqrt(σmax² + 1)', () => {
    const e = Scheduler.fromConfig('euler', hub, { timestep_spacing: 'leading' });
    e.setTimesteps(10);
    expect(e.timesteps()).toEqual([901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    const sigmaMax = values(e.sigmas()!)[0];
    expect(e.initNoiseSigma()).toBe(Math.fround(Math.sqrt(Math.fround(sigmaMax * sigmaMax) + 1)));
  });

  it('builds the timestep tables of every spacing as diffusers does', () => {
    // Expected values from diffusers 0.42.1 set_timesteps.
    const ddim = (spacing: string, n: number) => {
      const s = Scheduler.fromConfig('ddim', hub, { timestep_spacing: spacing });
      s.setTimesteps(n);
      return s.timesteps();
    };
    expect(ddim('trailing', 7)).toEqual([999, 856, 713, 570, 428, 285, 142]);
    expect(ddim('linspace', 7)).toEqual([999, 832, 666, 500, 333, 166, 0]);
    expect(ddim('leading', 7)).toEqual([853, 711, 569, 427, 285, 143, 1]);
    const pndm = Scheduler.fromConfig('pndm', hub, { timestep_spacing: 'trailing' });
    pndm.setTimesteps(4);
    expect(pndm.timesteps()).toEqual([999, 749, 749, 499, 249]);
    const prk = Scheduler.fromConfig('pndm', hub, { skip_prk_steps: false });
    prk.setTimesteps(5);
    expect(prk.timesteps()).toEqual([801, 701, 701, 601, 601, 501, 501, 401, 401, 301, 301, 201, 201, 1]);
    const dpm = Scheduler.fromConfig('dpmsolver++', hub, { timestep_spacing: 'trailing' });
    dpm.setTimesteps(7);
    expect(dpm.timesteps()).toEqual([999, 856, 713, 570, 428, 285, 142]);
  });

  it('refuses unknown keys and unsupported values with MODEL_CONFIG errors', () => {
    expect(() => Scheduler.fromConfig('ddim', { ...hub, foo_bar: 1 })).toThrow(ModelError);
    expect(() => Scheduler.fromConfig('ddim', { ...hub, foo_bar: 1 })).toThrow(/foo_bar/);
    expect(() => Scheduler.fromConfig('ddpm', { ...hub, thresholding: true })).toThrow(/thresholding/);
    expect(() => Scheduler.fromConfig('ddim', { ...hub, beta_schedule: 'quadratic' })).toThrow(/beta_schedule.*quadratic/);
    expect(() => Scheduler.fromConfig('euler', { ...hub, timestep_spacing: 'random' })).toThrow(/timestep_spacing/);
    expect(() => Scheduler.fromConfig('dpmsolver++', hub, { algorithm_type: 'dpmsolver' })).toThrow(/algorithm_type/);
    expect(() => Scheduler.fromConfig('ddpm', hub, { variance_type: 'learned_range' })).toThrow(/variance_type/);
    expect(() => Scheduler.fromConfig('pndm', hub, { prediction_type: 'sample' })).toThrow(/prediction_type/);
    expect(() => Scheduler.fromConfig('ddim', hub, { num_train_timesteps: 'many' })).toThrow(/num_train_timesteps/);
    // An override must be an option of the class (diffusers would drop it silently).
    expect(() => Scheduler.fromConfig('ddim', hub, { use_karras_sigmas: true })).toThrow(/not an option of DDIMScheduler/);
    expect(() => Scheduler.fromConfig('ddim', '{"beta_start": ')).toThrow(ModelError);
    let err: unknown;
    try {
      Scheduler.fromConfig('ddim', { ...hub, foo_bar: 1 }, undefined, 'x/scheduler_config.json');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ModelError);
    expect((err as ModelError).code).toBe('MODEL_CONFIG');
    expect((err as ModelError).file).toBe('x/scheduler_config.json');
    expect(() => Scheduler.fromConfig('lms' as SchedulerKind, hub)).toThrow(InvalidArgumentError);
  });

  it('reads the Python JSON diffusers writes (lambda_min_clipped: -Infinity)', () => {
    const text = JSON.stringify({ ...hub, _class_name: 'DPMSolverMultistepScheduler' }).replace('}', ', "lambda_min_clipped": -Infinity}');
    const s = Scheduler.fromConfig('dpmsolver++', text);
    expect(s.config.lambda_min_clipped).toBe(-Infinity);
    expect(() => Scheduler.fromConfig('dpmsolver++', text.replace('-Infinity', 'NaN'))).toThrow(ModelError);
  });

  it('reports misuse clearly', async () => {
    const f = await loadCase('sd1', 'sched_euler');
    const ddim = Scheduler.fromConfig('ddim', hub);
    expect(() => ddim.step(f.x_T, 901, f.x_T)).toThrow(/setTimesteps/);
    ddim.setTimesteps(10);
    expect(() => ddim.step(f.x_T, 900.5, f.x_T)).toThrow(InvalidArgumentError);
    expect(() => ddim.step(f.x_T, 901, f.x_T, { noise: f.c, generator: undefined, eta: 1, foo: 1 } as StepOptions)).toThrow(/foo/);
    const euler = Scheduler.fromConfig('euler', hub);
    euler.setTimesteps(10);
    expect(() => euler.scaleModelInput(f.x_T, 998)).toThrow(/not one of the scheduler's timesteps/);
    const eu = Scheduler.fromConfig('euler_ancestral', hub);
    eu.setTimesteps(10);
    expect(() => eu.step(f.x_T, 999, f.x_T, { noise: Tensor.zeros([2]) })).toThrow(/noise has shape/);
    const prk = Scheduler.fromConfig('pndm', hub, { skip_prk_steps: false });
    expect(() => prk.setTimesteps(3)).toThrow(/at least 4/);
  });
});

// Options beyond the Stable Diffusion defaults, against references made by
// test/parity/make_scheduler_variants.py (diffusers 0.42.1): spacings, prediction types, beta
// schedules, zero-SNR rescaling, PRK, DPM-Solver orders / heun / SDE / Karras / exponential / lu,
// Euler churn, log-linear and continuous timesteps, and the σ-based add_noise.
describe('scheduler variants against diffusers', () => {
  const dir = path.join(repoRoot, 'test', 'fixtures', 'scheduler-variants');
  interface Variant {
    class: string;
    steps: number;
    overrides: Record<string, unknown>;
    step_kwargs: Record<string, number | boolean>;
    init_noise_sigma: number;
    positions: number[];
    begin_index: number | null;
  }
  const meta = (JSON.parse(fs.readFileSync(path.join(dir, 'variants.json'), 'utf8')) as { variants: Record<string, Variant> }).variants;
  const kindOf = (cls: string) => (Object.keys(SCHEDULER_CLASSES) as SchedulerKind[]).find((k) => SCHEDULER_CLASSES[k] === cls)!;
  const hub = hubConfig('sd1');
  let ref: Record<string, Tensor>;
  let sd: Record<string, Tensor>;
  beforeAll(async () => {
    ref = (await loadSafetensors(path.join(dir, 'variants.safetensors'))).tensors;
    sd = await loadCase('sd1', 'sched_ddpm');
  });

  const stepIds = Object.keys(meta).filter((k) => !k.startsWith('addnoise_'));
  it.each(stepIds.map((id) => [id]))('%s', async (id) => {
    const v = meta[id];
    const s = Scheduler.fromConfig(kindOf(v.class), hub, v.overrides);
    s.setTimesteps(v.steps);
    const ts = s.timesteps();
    expect(ts).toEqual(values(ref[`${id}.timesteps`]));
    let sigmaDiff = 0;
    if (ref[`${id}.sigmas`]) {
      sigmaDiff = await maxAbsDiff(s.sigmas()!, ref[`${id}.sigmas`]);
      expect(sigmaDiff).toBeLessThanOrEqual(1e-6 * values(ref[`${id}.sigmas`])[0]);
    }
    expect(s.initNoiseSigma()).toBeCloseTo(v.init_noise_sigma, 5);
    const k = v.step_kwargs;
    const opts: StepOptions = {};
    if (k.eta !== undefined) opts.eta = k.eta as number;
    if (k.use_clipped_model_output !== undefined) opts.useClippedModelOutput = k.use_clipped_model_output as boolean;
    if (k.s_churn !== undefined) opts.sChurn = k.s_churn as number;
    if (k.s_tmin !== undefined) opts.sTmin = k.s_tmin as number;
    if (k.s_tmax !== undefined) opts.sTmax = k.s_tmax as number;
    let x = scaleTensor(sd.x_T, s.initNoiseSigma());
    let e0 = 0;
    for (let i = 0; i < ts.length; i++) {
      const out = fakeModelOutput(s.scaleModelInput(x, ts[i]), ts[i], sd.c);
      x = s.step(out, ts[i], x, { ...opts, noise: sd[`step.${i % 10}.noise`] });
      if (i === 0) e0 = await relError(x, ref[`${id}.step0`]);
    }
    const ef = await relError(x, ref[`${id}.final`]);
    expect(e0).toBeLessThanOrEqual(TOL);
    expect(ef).toBeLessThanOrEqual(TOL);
    report.push(
      `  variant ${id.padEnd(30)} steps ${String(ts.length).padStart(2)}  step0 ${e0.toExponential(2)}  final ${ef.toExponential(2)}` +
        (ref[`${id}.sigmas`] ? `  sigmas max|Δ| ${sigmaDiff.toExponential(2)}` : ''),
    );
  });

  const noiseIds = Object.keys(meta).filter((k) => k.startsWith('addnoise_'));
  it.each(noiseIds.map((id) => [id]))('%s', async (id) => {
    const v = meta[id];
    const s = Scheduler.fromConfig(kindOf(v.class), hub, v.overrides);
    s.setTimesteps(v.steps);
    if (v.begin_index !== null) s.setBeginIndex(v.begin_index);
    const ts = v.positions.map((p) => s.timesteps()[p]);
    expect(ts).toEqual(values(ref[`${id}.timesteps`]));
    const x0 = await loadPair(sd.x_T, sd.c);
    const noise = await loadPair(sd['step.0.noise'], sd['step.1.noise']);
    const e = await relError(s.addNoise(x0, noise, ts), ref[`${id}.noisy`]);
    expect(e).toBeLessThanOrEqual(TOL);
    report.push(`  variant ${id.padEnd(30)} add_noise ${e.toExponential(2)}`);
  });
});

describe('scheduler dtypes, batches and generators', () => {
  const hub = hubConfig('sd1');

  it.each([['ddpm'], ['ddim'], ['pndm'], ['dpmsolver++'], ['euler'], ['euler_ancestral']] as [SchedulerKind][])(
    '%s runs in float16 (an fp16 UNet) and stays close to float32',
    async (kind) => {
      const f = await loadCase('sd1', 'sched_ddpm');
      const run = async (dtype: 'float32' | 'float16') => {
        const s = Scheduler.fromConfig(kind, hub);
        s.setTimesteps(6);
        let x = await scaleTensor(f.x_T, s.initNoiseSigma()).to({ dtype });
        const c = await f.c.to({ dtype });
        const ts = s.timesteps();
        for (let i = 0; i < ts.length; i++) {
          const out = fakeModelOutput(s.scaleModelInput(x, ts[i]), ts[i], c);
          expect(out.dtype).toBe(dtype);
          x = s.step(out, ts[i], x, { noise: await f[`step.${i % 10}.noise`].to({ dtype }), eta: 1 });
          expect(x.dtype).toBe(dtype);
        }
        return x.to({ dtype: 'float32' });
      };
      const e = await relError(await run('float16'), await run('float32'));
      expect(e).toBeLessThan(1e-2);
    },
  );

  it('draws step noise from a Generator reproducibly, and handles batches', async () => {
    const f = await loadCase('sd1', 'sched_ddpm');
    const x = await loadPair(f.x_T, f.c);
    const run = (seed: number) => {
      const s = Scheduler.fromConfig('euler_ancestral', hub);
      s.setTimesteps(4);
      const g = new Generator(seed);
      let y = scaleTensor(x, s.initNoiseSigma());
      for (const t of s.timesteps()) y = s.step(fakeModelOutput(s.scaleModelInput(y, t), t, y), t, y, { generator: g });
      return y;
    };
    const a = run(7);
    expect(a.shape).toEqual([2, 4, 8, 8]);
    expect(await maxAbsDiff(run(7), a)).toBe(0);
    expect(await maxAbsDiff(run(8), a)).toBeGreaterThan(0.01);
    // add_noise broadcasts one timestep per batch item.
    const ddpm = Scheduler.fromConfig('ddpm', hub);
    const noisy = ddpm.addNoise(x, x, [10, 900]);
    const ac = values(ddpm.alphasCumprod());
    const xv = values(x);
    const nv = values(noisy);
    const k = (i: number) => (i < 256 ? 10 : 900);
    for (const i of [0, 100, 300, 511]) {
      const want = Math.sqrt(ac[k(i)]) * xv[i] + Math.sqrt(1 - ac[k(i)]) * xv[i];
      expect(nv[i]).toBeCloseTo(want, 5);
    }
    expect(() => ddpm.addNoise(x, x, [1000, 0])).toThrow(/timesteps must lie in/);
  });
});

/** cat([a, b]) along the batch for [1, ...] float32 tensors. */
async function loadPair(a: Tensor, b: Tensor): Promise<Tensor> {
  const x = values(a);
  const y = values(b);
  return Tensor.fromArray(new Float32Array([...x, ...y]), [2, ...a.shape.slice(1)]);
}
