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
    private readonly textEncoder: TextEncoder | undefined,
    private readonly vocabBefore: number,
    private readonly savedRows: { ids: number[]; rows: Tensor } | null,
  ) {}

  get applied(): boolean {
    return this.active;
  }

  /** Puts back the base tensors and token rows (bit for bit). Calling it twice is an error. */
  unapply(): void {
    if (!this.active) throw new InvalidArgumentError('This delta was already unapplied');
    callSync(() => deltaBinding().assign(this.restoreTargets.map((t) => t.handle), this.saved.map((t) => t.handle)));
    if (this.textEncoder) {
      if (this.savedRows) this.textEncoder.setTokenRows(this.savedRows.ids, this.savedRows.rows);
      if (this.textEncoder.vocabSize !== this.vocabBefore) this.textEncoder.resizeTokenEmbeddings(this.vocabBefore);
    }
    for (const t of this.saved) t.dispose();
    this.savedRows?.rows.dispose();
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

  // Token ids: the tokenizer's (added if new), else the ids recorded in the delta.
  const tokenIds: Record<string, number> = {};
  for (const t of delta.tokens) {
    if (tokenizer) tokenIds[t.token] = tokenizer.tokenId(t.token) ?? tokenizer.addTokens([t.token])[0];
    else tokenIds[t.token] = t.id;
  }

  const b = deltaBinding();
  const restoreTargets = layerNames.map((n) => params[n]);
  const saved = restoreTargets.map((t) => new Tensor(callSync(() => b.clone(t.handle))));
  const full = Object.keys(delta.weights);
  callSync(() => b.assign(full.map((n) => params[n].handle), full.map((n) => delta.weights[n].handle)));
  for (const [n, f] of Object.entries(delta.factors)) callSync(() => b.addProduct(params[n].handle, f.u.handle, f.v.handle));

  let vocabBefore = 0;
  let savedRows: { ids: number[]; rows: Tensor } | null = null;
  if (textEncoder && delta.tokens.length > 0) {
    vocabBefore = textEncoder.vocabSize;
    const ids = delta.tokens.map((t) => tokenIds[t.token]);
    const maxId = Math.max(...ids);
    if (maxId >= vocabBefore) textEncoder.resizeTokenEmbeddings(maxId + 1);
    const existing = ids.filter((i) => i < vocabBefore);
    if (existing.length > 0) savedRows = { ids: existing, rows: textEncoder.tokenRows(existing) };
    const rows = Tensor.fromArray(
      new Float32Array(delta.tokens.flatMap((t) => Array.from(delta.tokenRows[t.token].toArray() as Float32Array))),
      [ids.length, textEncoder.hiddenSize],
    );
    textEncoder.setTokenRows(ids, rows);
    rows.dispose();
  } else if (textEncoder) {
    vocabBefore = textEncoder.vocabSize;
  }
  return new AppliedDelta(tokenIds, restoreTargets, saved, textEncoder, vocabBefore, savedRows);
}
