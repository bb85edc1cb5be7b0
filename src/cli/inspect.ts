/**
 * `customdiff inspect <delta>`: a delta's format, kind, tokens, base model, layers (shape, rank,
 * size) and recorded metadata (training options, compression, merge), for any delta format the
 * library reads.
 */
import { Command } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { readSafetensorsHeader } from '../core/safetensors';
import { openDelta } from '../delta/foreign';
import { DELTA_FORMAT } from '../delta/file';
import { FileError } from '../errors';
import { defineAction } from './action';
import { addCommonOptions, addExamples } from './options';
import { formatBytes } from './output';

export interface LayerInfo {
  name: string;
  /** The layer's weight shape [out, in] (for factors: of u·v). */
  shape: number[];
  /** Rank of a compressed layer. */
  rank?: number;
  dtype: string;
  parameters: number;
  bytes: number;
}

export interface DeltaReport {
  file: string;
  fileBytes: number;
  /** `custom-diffusion-delta` (ours) or the original format read. */
  format: string;
  version?: number;
  kind: string;
  freezeModel: string;
  tokens: Record<string, unknown>[];
  baseModelFingerprint: string | null;
  dtype: string;
  layers: LayerInfo[];
  parameters: number;
  bytes: number;
  /** Metadata values, JSON-decoded where they are JSON. */
  metadata: Record<string, unknown>;
}

const DTYPE_BYTES: Record<string, number> = {
  F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1,
  float64: 8, float32: 4, float16: 2, bfloat16: 2, int64: 8, int32: 4, int16: 2, int8: 1, uint8: 1, bool: 1,
};

const numel = (shape: number[]) => shape.reduce((a, b) => a * b, 1);

function decodeMetadata(m: Record<string, string>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(m)) {
    if (/^[[{]/.test(v)) {
      try {
        out[k] = JSON.parse(v);
        continue;
      } catch {
        // not JSON
      }
    }
    out[k] = v;
  }
  return out;
}

/** Describes a delta file of any supported format. */
export async function describeDelta(file: string): Promise<DeltaReport> {
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch (e) {
    throw new FileError(`Cannot read the delta ${file} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); check the path`, file);
  }
  if (st.isDirectory()) throw new FileError(`${file} is a folder; give the delta file inside it (e.g. ${path.join(file, 'delta.safetensors')})`, file);
  if (file.endsWith('.safetensors')) {
    const header = await readSafetensorsHeader(file);
    if (header.metadata.format === DELTA_FORMAT) {
      // Our format: everything is in the header.
      const m = header.metadata;
      const tokens = JSON.parse(m.tokens ?? '[]') as Record<string, unknown>[];
      const tokenNames = new Set(tokens.map((t) => String(t.token)));
      const byName = new Map(header.entries.map((e) => [e.name, e]));
      const layers: LayerInfo[] = [];
      for (const e of header.entries) {
        if (tokenNames.has(e.name)) continue;
        const bytes = e.dataOffsets[1] - e.dataOffsets[0];
        if (m.kind === 'compressed' && /\.(u|v)$/.test(e.name)) {
          if (e.name.endsWith('.v')) continue;
          const layer = e.name.slice(0, -2);
          const v = byName.get(`${layer}.v`);
          const vBytes = v ? v.dataOffsets[1] - v.dataOffsets[0] : 0;
          layers.push({
            name: layer,
            shape: [e.shape[0], v?.shape[1] ?? NaN],
            rank: e.shape[1],
            dtype: e.dtype,
            parameters: numel(e.shape) + (v ? numel(v.shape) : 0),
            bytes: bytes + vBytes,
          });
        } else {
          layers.push({ name: e.name, shape: e.shape, dtype: e.dtype, parameters: numel(e.shape), bytes });
        }
      }
      layers.sort((a, b) => a.name.localeCompare(b.name));
      return {
        file,
        fileBytes: st.size,
        format: DELTA_FORMAT,
        version: Number(m.version),
        kind: m.kind,
        freezeModel: m.freeze_model ?? 'crossattn_kv',
        tokens,
        baseModelFingerprint: m.base_model_fingerprint ?? null,
        dtype: m.dtype ?? 'float32',
        layers,
        parameters: layers.reduce((a, l) => a + l.parameters, 0),
        bytes: layers.reduce((a, l) => a + l.bytes, 0),
        metadata: decodeMetadata(Object.fromEntries(Object.entries(m).filter(([k]) => !['format', 'version', 'kind', 'freeze_model', 'tokens', 'dtype', 'base_model_fingerprint'].includes(k)))),
      };
    }
  }
  // An original format: read it (tensors come back as float32).
  const d = await openDelta(file);
  const layers: LayerInfo[] = [
    ...Object.entries(d.weights).map(([name, t]) => ({ name, shape: t.shape, dtype: 'float32', parameters: numel(t.shape), bytes: 4 * numel(t.shape) })),
    ...Object.entries(d.factors).map(([name, f]) => {
      const p = numel(f.u.shape) + numel(f.v.shape);
      return { name, shape: [f.u.shape[0], f.v.shape[1]], rank: f.u.shape[1], dtype: 'float32', parameters: p, bytes: 4 * p };
    }),
  ].sort((a, b) => a.name.localeCompare(b.name));
  for (const t of [...Object.values(d.weights), ...Object.values(d.tokenRows), ...Object.values(d.factors).flatMap((f) => [f.u, f.v])]) t.dispose();
  return {
    file,
    fileBytes: st.size,
    format: d.metadata.source_format ?? 'unknown',
    kind: d.kind,
    freezeModel: d.freezeModel,
    tokens: d.tokens,
    baseModelFingerprint: d.baseModelFingerprint,
    dtype: 'float32 (as read)',
    layers,
    parameters: layers.reduce((a, l) => a + l.parameters, 0),
    bytes: layers.reduce((a, l) => a + l.bytes, 0),
    metadata: {},
  };
}

const KIND_TEXT: Record<string, string> = {
  full: 'full trained weights, applied by replacing the base weights',
  merged: 'a closed-form merge of several concepts, applied by replacing the base weights',
  compressed: 'low-rank factors u·v, applied as base weight + u·v',
};

/** The human-readable report. */
export function formatReport(r: DeltaReport): string {
  const lines: string[] = [];
  const row = (k: string, v: string) => lines.push(`${k.padEnd(12)}${v}`);
  row('File', `${r.file} (${formatBytes(r.fileBytes)})`);
  row('Format', `${r.format}${r.version !== undefined ? ` v${r.version}` : ''}`);
  row('Kind', `${r.kind}: ${KIND_TEXT[r.kind] ?? ''}`);
  row('Trains', r.freezeModel === 'crossattn' ? 'crossattn (all cross-attention weights)' : 'crossattn_kv (cross-attention key/value weights)');
  row('Dtype', r.dtype);
  const fp = r.baseModelFingerprint;
  const base = r.metadata.base_model as { path?: string } | undefined;
  row('Base model', `${fp ? `fingerprint ${fp.slice(0, 16)}…` : 'not recorded'}${base?.path ? `, trained on ${base.path}` : ''}`);
  if (r.tokens.length === 0) row('Tokens', 'none');
  r.tokens.forEach((t, i) => {
    const init = t.initializer ? `, initialised from ${String(t.initializer)}` : '';
    const from = t.source_token ? `, from ${String(t.source_token)} of ${String(t.source)}` : '';
    row(i === 0 ? 'Tokens' : '', `${String(t.token)} (id ${String(t.id)}${init}${from})`);
  });
  const ranks = r.layers.filter((l) => l.rank !== undefined).map((l) => l.rank!);
  row(
    'Layers',
    `${r.layers.length}, ${r.parameters.toLocaleString('en-US')} parameters, ${formatBytes(r.bytes)}` +
      (ranks.length ? `; ranks ${Math.min(...ranks)}–${Math.max(...ranks)} (mean ${(ranks.reduce((a, b) => a + b, 0) / ranks.length).toFixed(1)})` : ''),
  );
  const width = Math.max(...r.layers.map((l) => l.name.length), 10);
  for (const l of r.layers) {
    lines.push(`  ${l.name.padEnd(width)}  [${l.shape.join(', ')}]${l.rank !== undefined ? `  rank ${l.rank}` : ''}  ${l.dtype}  ${formatBytes(l.bytes)}`);
  }
  const t = r.metadata.training_options as { resolved?: Record<string, unknown> } | undefined;
  if (t?.resolved) {
    const o = t.resolved;
    row('Training', `${String(o.maxTrainSteps)} steps, lr ${String(o.scaledLearningRate ?? o.learningRate)}, batch ${String(o.trainBatchSize)}, resolution ${String(o.resolution)}, seed ${String(o.seed)}`);
  }
  const c = r.metadata.compression as { ratio?: number | null; rank?: number | null; keep_crossing?: boolean } | undefined;
  if (c) row('Compression', c.rank !== null && c.rank !== undefined ? `fixed rank ${c.rank}` : `ratio ${String(c.ratio)}${c.keep_crossing ? ' (keeping the crossing component)' : ''}`);
  const concepts = r.metadata.concepts as { category: string; token: string | null; source: string }[] | undefined;
  if (Array.isArray(concepts)) {
    concepts.forEach((k, i) => row(i === 0 ? 'Concepts' : '', `${k.token ?? '(no token)'} ${k.category} from ${k.source}`));
  }
  return lines.join('\n');
}

export function inspectCommand(): Command {
  const cmd = new Command('inspect')
    .summary("show a delta's metadata, tokens, layers, ranks and sizes")
    .description("Show a delta's format, kind, tokens, base model, layers (shapes, ranks, sizes) and recorded metadata.")
    .argument('<delta>', 'a delta file: ours (.safetensors), or an original delta.bin / delta_epoch=*.ckpt / pytorch_custom_diffusion_weights.*');
  addCommonOptions(cmd);
  addExamples(cmd, [
    'customdiff inspect out/cat/delta.safetensors',
    'customdiff inspect logs/cat/delta.bin --json',
  ]);
  return defineAction(cmd, async (ctx, file) => {
    const r = await describeDelta(file);
    ctx.reporter.result(formatReport(r), { ...r });
  });
}
