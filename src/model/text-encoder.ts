/**
 * The CLIP text encoder of Stable Diffusion: transformers' `CLIPTextModel`, loaded from a pipeline's
 * `text_encoder/` folder with its own parameter names and run in LibTorch.
 *
 * It computes `last_hidden_state`: token + learned position embeddings, pre-LayerNorm transformer
 * layers with a causal mask (no padding mask, as in Stable Diffusion), then `final_layer_norm`. The
 * activation is the config's `hidden_act` (`quick_gelu` for SD1's OpenAI CLIP-L, exact `gelu` for
 * SD2's OpenCLIP-H). `clipSkip` works as diffusers' `encode_prompt(clip_skip=k)`:
 * `final_layer_norm(hidden_states[-(k + 1)])`.
 *
 * Custom Diffusion adds tokens such as `<new1>`: {@link TextEncoder.resizeTokenEmbeddings} appends rows,
 * {@link TextEncoder.setTokenRows} writes them and {@link TextEncoder.tokenRows} reads them back. The
 * appended rows live in a tensor of their own, apart from the loaded matrix, so training can update
 * exactly those rows (see native/models/clip_text.h).
 *
 * @packageDocumentation
 */

import * as path from 'path';
import { callAsync, callSync, nativeAs, type DeviceName, type Dtype, type NativeTensor } from '../native';
import { InvalidArgumentError } from '../errors';
import { findWeightFiles, readConfigText } from './files';
import { Tensor } from '../core/tensor';

/** What native/models/bind_text_encoder.cc registers as `textEncoder`. */
interface NativeTextEncoderInfo {
  handle: unknown;
  vocabSize: number;
  baseVocabSize: number;
  hiddenSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  maxPositionEmbeddings: number;
  hiddenAct: string;
  dtype: Dtype;
  device: string;
}

interface TextEncoderBinding {
  textEncoder: {
    load(
      configText: string,
      weightFiles: string[],
      options: { dtype?: Dtype; device?: DeviceName; configFile?: string },
    ): Promise<NativeTextEncoderInfo>;
    encode(
      handle: unknown,
      inputIds: NativeTensor,
      options: { clipSkip?: number; outputHiddenStates?: boolean },
    ): Promise<NativeTensor | { lastHiddenState: NativeTensor; hiddenStates: NativeTensor[] }>;
    resizeTokenEmbeddings(handle: unknown, n: number): number;
    setTokenRows(handle: unknown, ids: number[], rows: NativeTensor): void;
    tokenRows(handle: unknown, ids: number[]): NativeTensor;
    vocabSize(handle: unknown): number;
    dispose(handle: unknown): void;
  };
}

function binding(): TextEncoderBinding['textEncoder'] {
  return nativeAs<TextEncoderBinding>().textEncoder;
}

/** Options of {@link TextEncoder.load}. */
export interface TextEncoderLoadOptions {
  /** Floating-point dtype the weights are converted to. Default `float32`. */
  dtype?: Dtype;
  /** Device the weights are placed on. Default `cpu`. */
  device?: DeviceName;
  /** Load `model.<variant>.safetensors` instead of `model.safetensors` (e.g. `fp16`). */
  variant?: string;
}

/** Options of {@link TextEncoder.encode}. */
export interface EncodeOptions {
  /**
   * Skip the last `clipSkip` layers: the result is `final_layer_norm(hidden_states[-(clipSkip + 1)])`,
   * as diffusers computes it. 0 (the default) gives `last_hidden_state`.
   */
  clipSkip?: number;
  /** Also return every hidden state (embeddings, then each layer's output, before the final norm). */
  outputHiddenStates?: boolean;
}

/** The result of {@link TextEncoder.encode} with `outputHiddenStates: true`. */
export interface TextEncoderOutput {
  /** `[B, S, hidden]`: the final LayerNorm of the selected layer (see {@link EncodeOptions.clipSkip}). */
  lastHiddenState: Tensor;
  /** `numHiddenLayers + 1` tensors `[B, S, hidden]`: the embeddings, then each layer's output. */
  hiddenStates: Tensor[];
}

/**
 * A loaded CLIP text encoder. Load it with {@link TextEncoder.load}; free it with
 * {@link TextEncoder.dispose}.
 */
export class TextEncoder {
  /** Width of the hidden states (768 for SD1, 1024 for SD2). */
  readonly hiddenSize: number;
  /** Number of transformer layers. */
  readonly numHiddenLayers: number;
  /** Number of attention heads. */
  readonly numAttentionHeads: number;
  /** Longest input (77). */
  readonly maxPositionEmbeddings: number;
  /** The activation of the MLPs, from the config (`quick_gelu`, `gelu`, ...). */
  readonly hiddenAct: string;
  /** Vocabulary size of the loaded weights; ids from here on are added tokens. */
  readonly baseVocabSize: number;
  /** Dtype of the weights and of the outputs. */
  readonly dtype: Dtype;
  /** Device of the weights and of the outputs. */
  readonly device: string;

  private readonly handle: unknown;
  private disposed = false;

  private constructor(info: NativeTextEncoderInfo) {
    this.handle = info.handle;
    this.hiddenSize = info.hiddenSize;
    this.numHiddenLayers = info.numHiddenLayers;
    this.numAttentionHeads = info.numAttentionHeads;
    this.maxPositionEmbeddings = info.maxPositionEmbeddings;
    this.hiddenAct = info.hiddenAct;
    this.baseVocabSize = info.baseVocabSize;
    this.dtype = info.dtype;
    this.device = info.device;
  }

  /**
   * Loads `<folder>/config.json` and `<folder>/model.safetensors` (or `model.<variant>.safetensors`,
   * or the shards of `model.safetensors.index.json`). Weights may be stored with the `text_model.`
   * key prefix (transformers 4) or without it (transformers 5).
   *
   * @throws ModelError `MODEL_CONFIG` when the config sets an option that is not implemented (every
   *   unknown key is named); `MODEL_WEIGHTS` when keys are missing, unexpected or mis-shaped (all are
   *   listed), or when a `.bin` pickle cannot be read safely.
   * @throws FileError when the folder, its config or its weights file is missing.
   */
  static async load(folder: string, options: TextEncoderLoadOptions = {}): Promise<TextEncoder> {
    const dir = path.resolve(folder);
    const configText = readConfigText(dir);
    const { files } = findWeightFiles(dir, 'model', { variant: options.variant, binBaseName: 'pytorch_model' });
    const info = await callAsync(() =>
      binding().load(configText, files, { dtype: options.dtype, device: options.device, configFile: path.join(dir, 'config.json') }),
    );
    return new TextEncoder(info);
  }

  /** Current vocabulary size, added tokens included. */
  get vocabSize(): number {
    return callSync(() => binding().vocabSize(this.handle));
  }

  /**
   * Encodes token ids (integer `[B, S]`, S ≤ {@link TextEncoder.maxPositionEmbeddings}, usually
   * `[B, 77]` from the tokenizer) into `[B, S, hidden]`: `last_hidden_state`, or with `clipSkip` an
   * earlier layer through the final LayerNorm. Runs off the JS thread without recording gradients.
   */
  encode(inputIds: Tensor, options?: EncodeOptions & { outputHiddenStates?: false }): Promise<Tensor>;
  /** As above, and also returns every hidden state. */
  encode(inputIds: Tensor, options: EncodeOptions & { outputHiddenStates: true }): Promise<TextEncoderOutput>;
  async encode(inputIds: Tensor, options: EncodeOptions = {}): Promise<Tensor | TextEncoderOutput> {
    if (!(inputIds instanceof Tensor)) throw new InvalidArgumentError('inputIds must be a Tensor');
    const { clipSkip, outputHiddenStates } = options;
    const r = await callAsync(() =>
      binding().encode(this.handle, inputIds.handle, { clipSkip, outputHiddenStates: outputHiddenStates === true }),
    );
    if (outputHiddenStates === true) {
      const o = r as { lastHiddenState: NativeTensor; hiddenStates: NativeTensor[] };
      return { lastHiddenState: new Tensor(o.lastHiddenState), hiddenStates: o.hiddenStates.map((t) => new Tensor(t)) };
    }
    return new Tensor(r as NativeTensor);
  }

  /**
   * Sets the vocabulary size to `n` (as transformers' `resize_token_embeddings`): existing rows are
   * kept and new rows are appended, initialised to the mean of the existing rows. It may shrink back
   * down to {@link TextEncoder.baseVocabSize}, not below.
   *
   * @returns the new vocabulary size.
   */
  resizeTokenEmbeddings(n: number): number {
    return callSync(() => binding().resizeTokenEmbeddings(this.handle, n));
  }

  /**
   * Writes embedding rows: `rows` is `[ids.length, hiddenSize]` (converted to the model's dtype and
   * device). Ids must be distinct and inside the vocabulary. Do not call it while an `encode` is
   * running.
   */
  setTokenRows(ids: number[], rows: Tensor): void {
    if (!(rows instanceof Tensor)) throw new InvalidArgumentError('rows must be a Tensor');
    callSync(() => binding().setTokenRows(this.handle, ids, rows.handle));
  }

  /** A copy of the embedding rows of `ids`, `[ids.length, hiddenSize]`. */
  tokenRows(ids: number[]): Tensor {
    return new Tensor(callSync(() => binding().tokenRows(this.handle, ids)));
  }

  /** Frees the weights (once running calls finish). Later calls throw a DisposedError. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    callSync(() => binding().dispose(this.handle));
  }
}
