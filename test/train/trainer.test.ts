/**
 * The training run on the tiny fixture model (test/fixtures/parity/sd1/model) with small generated
 * image folders: events, checkpoints, the delta and the run record, exact resume, abort, NaN and
 * option errors.
 */
import * as fs from 'fs';
import * as path from 'path';
import { AbortError, InvalidArgumentError, Tensor, TrainingError, loadSafetensors, readSafetensorsHeader } from '../../src';
import { loadCheckpoint } from '../../src/train/checkpoint';
import { DELTA_FORMAT } from '../../src/train/delta-writer';
import { readDelta } from '../../src/delta/file';
import { train, type StepEvent, type TrainOptions, type TrainResult } from '../../src/train/trainer';
import type { TrainingBatch } from '../../src/train/dataset';
import { tempDir } from '../helpers/env';
import { parityDir } from '../helpers/numeric';
import { pattern, writeImage } from './util';

const MODEL = path.join(parityDir('sd1'), 'model');
const KV_COUNT = 14; // 7 cross-attention blocks in the tiny UNet

let tmp: { dir: string; cleanup: () => void };
let base: TrainOptions;

beforeAll(async () => {
  tmp = tempDir('cd-trainer-');
  const inst = path.join(tmp.dir, 'instance');
  const cls = path.join(tmp.dir, 'class');
  for (let i = 0; i < 3; i++) await writeImage(path.join(inst, `${i}.png`), 64, 64, pattern(i + 1));
  for (let i = 0; i < 4; i++) await writeImage(path.join(cls, `${i}.png`), 64, 80, pattern(i + 11));
  base = {
    pretrainedModel: MODEL,
    concepts: [{ instancePrompt: 'photo of a <new1> man', instanceDataDir: inst, classPrompt: 'photo of a man', classDataDir: cls }],
    modifierTokens: ['<new1>'],
    // The tiny vocabulary has no "ktn"; any single raw vocabulary entry works.
    initializerTokens: ['man</w>'],
    resolution: 32,
    augment: { noaug: true },
    trainBatchSize: 1,
    learningRate: 1e-4,
    seed: 3,
  };
});
afterAll(() => tmp.cleanup());

function bytes(t: Tensor): Buffer {
  const a = t.toArray() as Float32Array;
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

async function rejection(p: Promise<unknown>): Promise<Error> {
  const e = await p.then(
    () => null,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(Error);
  return e as Error;
}

describe('train()', () => {
  it('trains, reports events, writes checkpoints, the delta and the run record', async () => {
    const out = path.join(tmp.dir, 'run-a');
    const run = train({ ...base, maxTrainSteps: 4, outputDir: out, checkpointingSteps: 2 });
    const steps: StepEvent[] = [];
    const checkpoints: string[] = [];
    let ticks = 0;
    const timer = setInterval(() => ticks++, 5);
    run.on('step', (e) => steps.push(e));
    run.on('checkpoint', (e) => checkpoints.push(e.path));
    let result: TrainResult;
    try {
      result = await run.result;
    } finally {
      clearInterval(timer);
    }
    // The event loop kept running while the native steps worked.
    expect(ticks).toBeGreaterThan(5);
    expect(steps.map((s) => s.step)).toEqual([1, 2, 3, 4]);
    for (const s of steps) {
      expect(Number.isFinite(s.loss) && s.loss > 0).toBe(true);
      // scale_lr: 1e-4 × 1 (accumulation) × 1 (batch) × 1 (process) × 2 (prior preservation)
      expect(s.lr).toBeCloseTo(2e-4, 12);
      expect(s.imagesPerSecond).toBeGreaterThan(0);
      expect(s.etaSeconds).toBeGreaterThanOrEqual(0);
    }
    expect(result.losses).toEqual(steps.map((s) => s.loss));
    expect(checkpoints).toEqual([path.join(out, 'checkpoint-2')]);
    const ck = await loadCheckpoint(checkpoints[0]);
    expect(ck.step).toBe(2);
    expect(ck.losses).toEqual(result.losses.slice(0, 2));
    expect(ck.optimizer.optimizerSteps).toBe(2);
    expect(ck.dataLoader?.batches).toBe(2);

    // The delta: full trained weights under diffusers names, the token row under its token, metadata.
    expect(result.deltaPath).toBe(path.join(out, 'delta.safetensors'));
    const header = await readSafetensorsHeader(result.deltaPath!);
    const names = header.entries.map((e) => e.name);
    expect(names.filter((n) => /attn2\.to_[kv]\.weight$/.test(n))).toHaveLength(KV_COUNT);
    expect(names).toContain('<new1>');
    expect(names).toHaveLength(KV_COUNT + 1);
    const meta = await readDelta(result.deltaPath!);
    expect(header.metadata.format).toBe(DELTA_FORMAT);
    expect(meta.version).toBe(1);
    expect(meta.kind).toBe('full');
    expect(meta.freezeModel).toBe('crossattn_kv');
    expect(meta.tokens).toEqual([{ token: '<new1>', id: 1514, initializer: 'man</w>', initializer_id: 786 }]);
    expect(meta.baseModelFingerprint).toMatch(/^[0-9a-f]{64}$/);
    expect(meta.dtype).toBe('float32');
    const trainingOptions = JSON.parse(meta.metadata.training_options) as { resolved: { scaledLearningRate: number } };
    expect(trainingOptions.resolved.scaledLearningRate).toBeCloseTo(2e-4, 12);
    const delta = (await loadSafetensors(result.deltaPath!)).tensors;
    expect(delta['<new1>'].shape).toEqual([32]);
    for (const [k, t] of Object.entries(result.trained)) expect(bytes(delta[k]).equals(bytes(t))).toBe(true);

    const record = JSON.parse(fs.readFileSync(result.runRecordPath!, 'utf8'));
    expect(record.format).toBe('custom-diffusion-run');
    expect(record.losses).toEqual(result.losses);
    expect(record.baseModelFingerprint).toBe(meta.baseModelFingerprint);
    expect(record.status).toBe('completed');
  });

  it('resumes exactly: 6 steps equal 3 steps + resume for 3, bit for bit', async () => {
    const outA = path.join(tmp.dir, 'resume-a');
    const full = await train({ ...base, maxTrainSteps: 6, outputDir: outA, checkpointingSteps: 3, saveDelta: false }).result;
    const outB = path.join(tmp.dir, 'resume-b');
    const resumed = await train({
      ...base,
      maxTrainSteps: 6,
      outputDir: outB,
      resumeFromCheckpoint: path.join(outA, 'checkpoint-3'),
      saveDelta: false,
    }).result;
    expect(resumed.steps).toBe(6);
    expect(resumed.losses).toEqual(full.losses);
    expect(Object.keys(resumed.trained).sort()).toEqual(Object.keys(full.trained).sort());
    for (const k of Object.keys(full.trained)) {
      expect({ k, same: bytes(resumed.trained[k]).equals(bytes(full.trained[k])) }).toEqual({ k, same: true });
    }
    // Training changed the weights (the comparison above is not vacuous).
    const start = await train({ ...base, maxTrainSteps: 0 }).result;
    expect(bytes(start.trained['<new1>']).equals(bytes(full.trained['<new1>']))).toBe(false);
  });

  it("trains every attn2 tensor with freezeModel 'crossattn', several tokens, gradient accumulation", async () => {
    const run = train({
      ...base,
      freezeModel: 'crossattn',
      modifierTokens: '<new1>+<new2>',
      initializerTokens: ['man</w>', 'art</w>'],
      gradientAccumulationSteps: 2,
      maxTrainSteps: 2,
    });
    const warnings: string[] = [];
    const lrs: number[] = [];
    run.on('warning', (w) => warnings.push(w.message));
    run.on('lr', (e) => lrs.push(e.lr));
    const r = await run.result;
    expect(r.steps).toBe(2);
    const unetKeys = Object.keys(r.trained).filter((k) => !k.startsWith('<'));
    expect(unetKeys).toHaveLength(KV_COUNT / 2 * 5); // to_q, to_k, to_v, to_out.0.weight, to_out.0.bias per block
    expect(unetKeys.every((k) => k.includes('.attn2.'))).toBe(true);
    expect(r.tokens.map((t) => [t.token, t.id, t.initializerId])).toEqual([
      ['<new1>', 1514, 786],
      ['<new2>', 1515, 794],
    ]);
    expect(r.trained['<new2>'].shape).toEqual([32]);
    // <new2> is in no prompt: it only decays (weight decay), and the run says so.
    expect(warnings.some((w) => /<new2>.*will not learn/.test(w))).toBe(true);
    // scale_lr: 1e-4 × 2 (accumulation) × 1 × 1 × 2 (prior)
    expect(lrs).toEqual([4e-4, 4e-4]);
  });

  it('stops after the current step on abort and writes a checkpoint when asked', async () => {
    const out = path.join(tmp.dir, 'abort');
    const ac = new AbortController();
    const run = train({ ...base, maxTrainSteps: 50, outputDir: out, checkpointOnAbort: true, signal: ac.signal });
    const seen: number[] = [];
    const reasons: string[] = [];
    run.on('step', (e) => {
      seen.push(e.step);
      if (e.step === 2) ac.abort();
    });
    run.on('checkpoint', (e) => reasons.push(`${e.reason}@${e.step}`));
    const err = await rejection(run.result);
    expect(err).toBeInstanceOf(AbortError);
    expect(err.message).toMatch(/after step 2/);
    expect(seen).toEqual([1, 2]);
    expect(reasons).toEqual(['abort@2']);
    expect((await loadCheckpoint(path.join(out, 'checkpoint-2'))).step).toBe(2);
    expect(fs.existsSync(path.join(out, 'delta.safetensors'))).toBe(false);
    // Aborted before it starts: rejects at once.
    const pre = new AbortController();
    pre.abort();
    expect(await rejection(train({ ...base, signal: pre.signal }).result)).toBeInstanceOf(AbortError);
  });

  it('fails with a TrainingError naming the step when the loss is NaN', async () => {
    let n = 0;
    const nanBatches = {
      async next(): Promise<TrainingBatch> {
        n += 1;
        const pixels = new Float32Array(2 * 3 * 32 * 32).fill(0.1);
        if (n === 2) pixels[7] = NaN;
        return {
          epoch: 0,
          batch: n - 1,
          instanceCount: 1,
          size: 2,
          pixels,
          pixelShape: [2, 3, 32, 32],
          masks: new Float32Array(2 * 16).fill(1),
          maskShape: [2, 1, 4, 4],
          prompts: ['photo of a <new1> man', 'photo of a man'],
          isPrior: [false, true],
          cacheable: [false, true],
          cacheKeys: [null, null],
          files: ['a', 'b'],
          concepts: [0, 0],
          augment: [],
          stateAfter: null as never,
        } as unknown as TrainingBatch;
      },
    };
    const err = await rejection(train({ ...base, dataLoader: nanBatches, maxTrainSteps: 3 }).result);
    expect(err).toBeInstanceOf(TrainingError);
    expect((err as TrainingError).code).toBe('TRAIN_NAN');
    expect((err as TrainingError).step).toBe(2);
    expect(err.message).toMatch(/^Training step 2 of 3: The loss is nan/);
  });

  it('tokenLearningRate gives the token its own rate: at 0 the token keeps its initial row while K/V train', async () => {
    const runTo = async (name: string, o: Partial<TrainOptions>) => {
      const r = await train({ ...base, outputDir: path.join(tmp.dir, name), ...o }).result;
      return (await loadSafetensors(r.deltaPath!)).tensors;
    };
    const start = await runTo('token-lr-start', { maxTrainSteps: 0 });
    const frozen = await runTo('token-lr-0', { maxTrainSteps: 2, tokenLearningRate: 0 });
    const same = await runTo('token-lr-same', { maxTrainSteps: 2 });
    const row = (t: Record<string, Tensor>) => Buffer.from((t['<new1>'].toArray() as Float32Array).buffer);
    expect(row(frozen).equals(row(start))).toBe(true);
    expect(row(same).equals(row(start))).toBe(false);
    const kv = Object.keys(start).filter((n) => n !== '<new1>');
    expect(kv.some((n) => !Buffer.from((frozen[n].toArray() as Float32Array).buffer).equals(Buffer.from((start[n].toArray() as Float32Array).buffer)))).toBe(true);
    expect(() => train({ ...base, learningRate: 0, tokenLearningRate: 1e-3 })).toThrow(/learningRate must be above 0/);
  });

  it('refuses bad options with clear errors', async () => {
    expect(() => train({ ...base, pretrainedModel: undefined })).toThrow(/needs pretrainedModel/);
    expect(() => train({ ...base, freezeModel: 'all' as never })).toThrow(/freezeModel must be 'crossattn_kv' or 'crossattn'/);
    expect(() => train({ ...base, learningRate: -1 })).toThrow(/learningRate must be a number ≥ 0/);
    expect(() => train({ ...base, tokenLearningRate: -1 })).toThrow(/tokenLearningRate must be a number ≥ 0/);
    expect(() => train({ ...base, maxTrainSteps: 1.5 })).toThrow(/maxTrainSteps must be an integer/);
    expect(() => train({ ...base, gradientCheckpointing: 'yes' as never })).toThrow(/gradientCheckpointing must be true or false/);
    expect(() => train({ ...base, modifierTokens: ['<new1>', '<new2>'] })).toThrow(/2 modifier tokens but 1 initializer tokens/);
    expect(() => train({ ...base, checkpointOnAbort: true })).toThrow(/checkpointOnAbort needs outputDir/);
    expect(() => train({ ...base, mixedPrecision: 'fp8' as never })).toThrow(InvalidArgumentError);
    // Found while setting up: the default initializer "ktn" is not in the tiny vocabulary.
    const e1 = await rejection(train({ ...base, initializerTokens: undefined, maxTrainSteps: 1 }).result);
    expect(e1).toBeInstanceOf(InvalidArgumentError);
    expect(e1.message).toMatch(/initializer token "ktn" is not a single vocabulary entry/);
    const e2 = await rejection(train({ ...base, modifierTokens: ['man</w>'], maxTrainSteps: 1 }).result);
    expect(e2.message).toMatch(/already in the vocabulary/);
    const e3 = await rejection(train({ ...base, resumeFromCheckpoint: path.join(tmp.dir, 'nowhere'), maxTrainSteps: 1 }).result);
    expect(e3.message).toMatch(/Cannot read the checkpoint/);
  });
});
