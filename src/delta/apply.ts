/**
 * Applying a delta to loaded models in place, and undoing it.
 *
 * - kinds `full`/`merged`: the K/V tensors are **replaced** by the delta's full weights (deltas hold
 *   trained weights, not differences);
 * - kind `compressed`: u·v is **added** to the current (base) weight, W0 + u·v;
 * - token rows are written into the text encoder (the embedding is resized first when needed) and,
 *   when a tokenizer is given, the tokens are added to it.
 *
 * The base tensors are copied before they are overwritten, so {@link AppliedDelta.unapply} restores
 * them bit for bit. A delta whose layer names or shapes, or token width, do not match the models is
 * refused; so is one recorded against another base model (fingerprint, see
 * src/train/delta-writer.ts) unless `force` is set. Do not apply or unapply while a forward pass runs.
 */
import { callSync } from '../native';
import { DeltaMismatchError, InvalidArgumentError } from '../errors';
export { DeltaMismatchError } from '../errors';
import { Tensor } from '../core/tensor';
import type { UNet } from '../model/unet';
import type { TextEncoder } from '../model/text-encoder';
import type { ClipTokenizer } from '../model/tokenizer';
import { computeBaseFingerprint } from '../train/delta-writer';
import type { Delta } from './file';
import { deltaBinding } from './native-delta';

export interface ApplyTargets {
  unet: UNet;
  textEncoder?: TextEncoder;
  tokenizer?: ClipTokenizer;
}

export interface ApplyOptions {
  /** Apply even if the delta's base-model fingerprint differs from the models'. */
  force?: boolean;
  /** The models' base fingerprint when already known (skips hashing the K/V weights). */
  baseFingerprint?: string;
}



/** A delta applied to models; {@link unapply} restores the state before {@link applyDelta}. */
export class AppliedDelta {
  private active = true;

  /** @internal */
  constructor(
    /** Token text → id used in the models. */
    readonly tokenIds: Record<string, number>,
    private readonly restoreTargets: Tensor[],
    private readonly saved: Tensor[],
    private readonly tokens: InstalledTokenRows,
  ) {}

  get applied(): boolean {
    return this.active;
  }

  /** Puts back the base tensors and token rows (bit for bit). Calling it twice is an error. */
  unapply(): void {
    if (!this.active) throw new InvalidArgumentError('This delta was already unapplied');
    callSync(() => deltaBinding().assign(this.restoreTargets.map((t) => t.handle), this.saved.map((t) => t.handle)));
    this.tokens.restore();
    for (const t of this.saved) t.dispose();
    this.active = false;
  }
}

/** Applies `delta` to the models in place. */
export async function applyDelta(delta: Delta, targets: ApplyTargets, options: ApplyOptions = {}): Promise<AppliedDelta> {
  const { unet, textEncoder, tokenizer } = targets;
  const params = unet.allParameters();
  const layerNames = [...Object.keys(delta.weights), ...Object.keys(delta.factors)];
  if (layerNames.length === 0) throw new DeltaMismatchError('The delta holds no UNet layers');
  for (const name of layerNames) {
    const p = params[name];
    if (!p) throw new DeltaMismatchError(`The delta's layer ${name} does not exist in this UNet`);
    const shape = name in delta.weights ? delta.weights[name].shape : [delta.factors[name].u.shape[0], delta.factors[name].v.shape[1]];
    if (p.shape.join(',') !== shape.join(',')) {
      throw new DeltaMismatchError(
        `The delta's layer ${name} is [${shape.join(', ')}] but the UNet's is [${p.shape.join(', ')}] (a delta for another model size?)`,
      );
    }
  }
  if (delta.tokens.length > 0) {
    if (!textEncoder) throw new InvalidArgumentError('This delta has token rows: pass the textEncoder');
    for (const t of delta.tokens) {
      const w = delta.tokenRows[t.token].shape.at(-1);
      if (w !== textEncoder.hiddenSize) {
        throw new DeltaMismatchError(`The delta's token ${t.token} has width ${w}, the text encoder ${textEncoder.hiddenSize}`);
      }
    }
  }
  if (delta.baseModelFingerprint && !options.force) {
    let fp = options.baseFingerprint;
    if (!fp) {
      if (!textEncoder) {
        throw new InvalidArgumentError('Checking the base model needs the textEncoder (or options.baseFingerprint, or force)');
      }
      const kv = Object.fromEntries(Object.entries(params).filter(([k]) => /attn2\.to_[kv]\.weight$/.test(k)));
      fp = await computeBaseFingerprint(kv, [textEncoder.baseVocabSize, textEncoder.hiddenSize]);
    }
    if (fp !== delta.baseModelFingerprint) {
      throw new DeltaMismatchError(
        'The delta was trained on another base model (or another delta is applied): fingerprints differ; pass force to apply anyway',
      );
    }
  }

  const tokens = installTokenRows([delta], textEncoder, tokenizer);
  const b = deltaBinding();
  const restoreTargets = layerNames.map((n) => params[n]);
  const saved = restoreTargets.map((t) => new Tensor(callSync(() => b.clone(t.handle))));
  const full = Object.keys(delta.weights);
  callSync(() => b.assign(full.map((n) => params[n].handle), full.map((n) => delta.weights[n].handle)));
  for (const [n, f] of Object.entries(delta.factors)) callSync(() => b.addProduct(params[n].handle, f.u.handle, f.v.handle));
  return new AppliedDelta(tokens.tokenIds, restoreTargets, saved, tokens);
}

/** Token rows written into a text encoder; {@link restore} puts back what was there. */
export interface InstalledTokenRows {
  /** Token text → id used in the models. */
  readonly tokenIds: Record<string, number>;
  restore(): void;
}

/**
 * Writes the token rows of `deltas` into the text encoder (resizing its embedding when needed) and
 * adds their tokens to the tokenizer; `restore` takes both back. Deltas must not share a token. Used by {@link applyDelta}
 * and by generation, which installs a concept's rows only while it encodes that concept's prompts.
 */
export function installTokenRows(deltas: Delta[], textEncoder?: TextEncoder, tokenizer?: ClipTokenizer): InstalledTokenRows {
  const all = deltas.flatMap((d) => d.tokens.map((t) => ({ info: t, row: d.tokenRows[t.token] })));
  const seen = new Set<string>();
  for (const { info } of all) {
    if (seen.has(info.token)) throw new DeltaMismatchError(`Two deltas define the token ${info.token}; use one per call, or merge them`);
    seen.add(info.token);
  }
  // Token ids: the tokenizer's (added if new), else the ids recorded in the delta.
  const tokenIds: Record<string, number> = {};
  const added: string[] = [];
  for (const { info } of all) {
    if (!tokenizer) {
      tokenIds[info.token] = info.id;
      continue;
    }
    const known = tokenizer.tokenId(info.token);
    if (known === undefined) added.push(info.token);
    tokenIds[info.token] = known ?? tokenizer.addTokens([info.token])[0];
  }
  const untokenize = () => {
    if (added.length > 0) tokenizer!.removeAddedTokens(added);
  };
  if (!textEncoder || all.length === 0) {
    let done = false;
    return {
      tokenIds,
      restore: () => {
        if (!done) untokenize();
        done = true;
      },
    };
  }
  const vocabBefore = textEncoder.vocabSize;
  const ids = all.map(({ info }) => tokenIds[info.token]);
  const maxId = Math.max(...ids);
  if (maxId >= vocabBefore) textEncoder.resizeTokenEmbeddings(maxId + 1);
  const existing = ids.filter((i) => i < vocabBefore);
  const savedRows = existing.length > 0 ? { ids: existing, rows: textEncoder.tokenRows(existing) } : null;
  const rows = Tensor.fromArray(
    new Float32Array(all.flatMap(({ row }) => Array.from(row.toArray() as Float32Array))),
    [ids.length, textEncoder.hiddenSize],
  );
  textEncoder.setTokenRows(ids, rows);
  rows.dispose();
  let restored = false;
  return {
    tokenIds,
    restore: () => {
      if (restored) return;
      restored = true;
      if (savedRows) textEncoder.setTokenRows(savedRows.ids, savedRows.rows);
      if (textEncoder.vocabSize !== vocabBefore) textEncoder.resizeTokenEmbeddings(vocabBefore);
      savedRows?.rows.dispose();
      untokenize();
    },
  };
}
