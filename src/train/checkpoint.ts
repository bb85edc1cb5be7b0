/**
 * Training checkpoints: everything a run needs to continue exactly where it stopped, so that
 * training N steps equals training M steps, resuming, and training N − M more (bit for bit on CPU).
 *
 * A checkpoint is a folder `<outputDir>/checkpoint-<step>/` with
 * - `state.safetensors`: the trained tensors (`trainable.<name>`, e.g.
 *   `trainable.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight` and
 *   `trainable.text_encoder.token_embedding.added_rows`), the AdamW moments
 *   (`optimizer.exp_avg.<name>`, `optimizer.exp_avg_sq.<name>`) and, with fp16 loss scaling, the
 *   scaler (`scaler.scale`, `scaler.growth_tracker`); every tensor in float32 (int32 for the tracker);
 * - `state.json`: the step, the optimizer's counters and tensor order, the state of every random
 *   generator (base64), the data loader's state, the losses and learning rates so far, the tokens,
 *   the base-model fingerprint and the training options.
 *
 * The folder is written under a temporary name and renamed into place, so a crash never leaves a
 * half-written `checkpoint-<step>`.
 *
 * @packageDocumentation
 */
import { promises as fs } from 'fs';
import * as path from 'path';
import { FileError, TrainingError } from '../errors';
import { loadSafetensors, saveSafetensors } from '../core/safetensors';
import type { Tensor } from '../core/tensor';
import type { DataLoaderState } from './dataset';
import { toJsonSafe, type DeltaToken } from './delta-writer';

export const CHECKPOINT_FORMAT = 'custom-diffusion-checkpoint';
export const CHECKPOINT_VERSION = 1;

/** AdamW state as the native trainer exposes it. */
export interface OptimizerStateData {
  /** Trainable tensor names in optimizer order. */
  names: string[];
  expAvg: Tensor[];
  expAvgSq: Tensor[];
  /** Updates applied (torch's per-parameter `step`). */
  optimizerSteps: number;
  /** Micro-batches processed. */
  microSteps: number;
  /** fp16 loss scale [1] and its growth tracker [1] (int32), with mixedPrecision 'fp16'. */
  scale?: Tensor;
  growthTracker?: Tensor;
}

export interface CheckpointData {
  /** Optimizer steps completed. */
  step: number;
  /** Trainable tensors by the native trainer's names. */
  trainables: Record<string, Tensor>;
  optimizer: OptimizerStateData;
  /** States of the random generators by role (e.g. `noise`), from `Generator.getState()`. */
  generators: Record<string, Uint8Array>;
  /** The data loader's state after the last batch used (null when batches came from elsewhere). */
  dataLoader: DataLoaderState | null;
  losses: number[];
  learningRates: number[];
  tokens: DeltaToken[];
  baseModelFingerprint: string;
  /** The training options (JSON-safe). */
  options: unknown;
}

interface StateJson {
  format: typeof CHECKPOINT_FORMAT;
  version: number;
  step: number;
  trainableNames: string[];
  optimizer: { names: string[]; optimizerSteps: number; microSteps: number; scaler: boolean };
  generators: Record<string, string>;
  dataLoader: DataLoaderState | null;
  losses: number[];
  learningRates: number[];
  tokens: DeltaToken[];
  baseModelFingerprint: string;
  options: unknown;
}

/** `checkpoint-<step>` inside an output folder. */
export function checkpointDir(outputDir: string, step: number): string {
  return path.join(outputDir, `checkpoint-${step}`);
}

/** The checkpoint folders of an output folder, by increasing step. */
export async function listCheckpoints(outputDir: string): Promise<{ step: number; dir: string }[]> {
  let names: string[];
  try {
    names = await fs.readdir(outputDir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new FileError(`Cannot list ${outputDir}: ${(e as Error).message}`, outputDir, { cause: e });
  }
  const out: { step: number; dir: string }[] = [];
  for (const n of names) {
    const m = /^checkpoint-(\d+)$/.exec(n);
    if (!m) continue;
    const dir = path.join(outputDir, n);
    try {
      await fs.access(path.join(dir, 'state.json'));
      out.push({ step: Number(m[1]), dir });
    } catch {
      // not a complete checkpoint
    }
  }
  return out.sort((a, b) => a.step - b.step);
}

/** The checkpoint with the highest step in an output folder, or undefined. */
export async function latestCheckpoint(outputDir: string): Promise<string | undefined> {
  const all = await listCheckpoints(outputDir);
  return all.length ? all[all.length - 1].dir : undefined;
}

/**
 * Writes a checkpoint folder `dir` atomically (a temporary sibling folder renamed into place; an
 * existing `dir` is replaced).
 */
export async function saveCheckpoint(dir: string, data: CheckpointData): Promise<string> {
  const target = path.resolve(dir);
  const parent = path.dirname(target);
  const tmp = path.join(parent, `.${path.basename(target)}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`);
  const o = data.optimizer;
  if (o.expAvg.length !== o.names.length || o.expAvgSq.length !== o.names.length) {
    throw new TrainingError('The optimizer state has mismatched tensor lists', 'TRAIN_STATE');
  }
  const tensors = new Map<string, Tensor>();
  const trainableNames = Object.keys(data.trainables);
  for (const n of trainableNames) tensors.set(`trainable.${n}`, data.trainables[n]);
  o.names.forEach((n, i) => {
    tensors.set(`optimizer.exp_avg.${n}`, o.expAvg[i]);
    tensors.set(`optimizer.exp_avg_sq.${n}`, o.expAvgSq[i]);
  });
  const scaler = o.scale !== undefined && o.growthTracker !== undefined;
  if (scaler) {
    tensors.set('scaler.scale', o.scale!);
    tensors.set('scaler.growth_tracker', o.growthTracker!);
  }
  const state: StateJson = {
    format: CHECKPOINT_FORMAT,
    version: CHECKPOINT_VERSION,
    step: data.step,
    trainableNames,
    optimizer: { names: o.names, optimizerSteps: o.optimizerSteps, microSteps: o.microSteps, scaler },
    generators: Object.fromEntries(Object.entries(data.generators).map(([k, v]) => [k, Buffer.from(v).toString('base64')])),
    dataLoader: data.dataLoader,
    losses: data.losses,
    learningRates: data.learningRates,
    tokens: data.tokens,
    baseModelFingerprint: data.baseModelFingerprint,
    options: toJsonSafe(data.options),
  };
  try {
    await fs.mkdir(tmp, { recursive: true });
    await saveSafetensors(path.join(tmp, 'state.safetensors'), tensors, { format: CHECKPOINT_FORMAT, version: String(CHECKPOINT_VERSION) });
    // state.json last: a folder with state.json is complete (listCheckpoints relies on it).
    await fs.writeFile(path.join(tmp, 'state.json'), JSON.stringify(state, null, 1) + '\n');
    let old: string | undefined;
    try {
      await fs.rename(tmp, target);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw e;
      old = `${tmp}.old`;
      await fs.rename(target, old);
      await fs.rename(tmp, target);
    }
    if (old) await fs.rm(old, { recursive: true, force: true });
  } catch (e) {
    await fs.rm(tmp, { recursive: true, force: true });
    if (e instanceof Error && 'code' in e && typeof (e as { code: unknown }).code === 'string' && (e as { code: string }).code.startsWith('E')) {
      throw new FileError(`Cannot write the checkpoint ${target}: ${e.message}`, target, { cause: e });
    }
    throw e;
  }
  return target;
}

/** Reads a checkpoint folder written by {@link saveCheckpoint}. */
export async function loadCheckpoint(dir: string): Promise<CheckpointData> {
  const root = path.resolve(dir);
  const jsonFile = path.join(root, 'state.json');
  let state: StateJson;
  try {
    state = JSON.parse(await fs.readFile(jsonFile, 'utf8')) as StateJson;
  } catch (e) {
    throw new FileError(`Cannot read the checkpoint ${jsonFile}: ${(e as Error).message}`, jsonFile, { cause: e });
  }
  if (state.format !== CHECKPOINT_FORMAT || state.version !== CHECKPOINT_VERSION) {
    throw new TrainingError(`${root} is not a ${CHECKPOINT_FORMAT} version ${CHECKPOINT_VERSION} checkpoint`, 'TRAIN_STATE');
  }
  const { tensors } = await loadSafetensors(path.join(root, 'state.safetensors'));
  const need = (name: string): Tensor => {
    const t = tensors[name];
    if (!t) throw new TrainingError(`The checkpoint ${root} has no tensor "${name}"`, 'TRAIN_STATE');
    return t;
  };
  const trainables: Record<string, Tensor> = {};
  for (const n of state.trainableNames) trainables[n] = need(`trainable.${n}`);
  const o = state.optimizer;
  return {
    step: state.step,
    trainables,
    optimizer: {
      names: o.names,
      expAvg: o.names.map((n) => need(`optimizer.exp_avg.${n}`)),
      expAvgSq: o.names.map((n) => need(`optimizer.exp_avg_sq.${n}`)),
      optimizerSteps: o.optimizerSteps,
      microSteps: o.microSteps,
      ...(o.scaler ? { scale: need('scaler.scale'), growthTracker: need('scaler.growth_tracker') } : {}),
    },
    generators: Object.fromEntries(Object.entries(state.generators).map(([k, v]) => [k, new Uint8Array(Buffer.from(v, 'base64'))])),
    dataLoader: state.dataLoader,
    losses: state.losses,
    learningRates: state.learningRates,
    tokens: state.tokens,
    baseModelFingerprint: state.baseModelFingerprint,
    options: state.options,
  };
}

/** Deletes the oldest checkpoints of an output folder so that at most `keep` remain. */
export async function pruneCheckpoints(outputDir: string, keep: number): Promise<string[]> {
  const all = await listCheckpoints(outputDir);
  const removed: string[] = [];
  for (const c of all.slice(0, Math.max(0, all.length - keep))) {
    await fs.rm(c.dir, { recursive: true, force: true });
    removed.push(c.dir);
  }
  return removed;
}
