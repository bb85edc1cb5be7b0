import * as fs from 'fs';
import * as path from 'path';
import { InvalidArgumentError, ModelError, Tensor, DisposedError, FileError, PickleError, loadSafetensors, saveSafetensors } from '../../src';
import { TextEncoder } from '../../src/model/text-encoder';
import { runPython, tempDir } from '../helpers/env';
import { loadCase, maxAbsDiff, parityDir, readManifest, relError, toFloat64, values } from '../helpers/numeric';

const TO_BIN =
  'import sys, torch; from safetensors.torch import load_file; torch.save(load_file(sys.argv[1]), sys.argv[2])';

const CONFIGS: [string, number, string][] = [
  ['sd1', 32, 'quick_gelu'],
  ['sd2', 48, 'gelu'],
];

const modelDir = (config: string) => path.join(parityDir(config), 'model', 'text_encoder');
const manifest = readManifest;

// Whole-model tolerance (float32 against float32): relative error ≤ 1e-4, and the parity README's
// per-element bound |a − b| ≤ 1e-4·max(1, absmax).
async function expectClose(config: string, name: string, got: Tensor, want: Tensor, errors: Record<string, number>) {
  const rel = await relError(got, want);
  const abs = await maxAbsDiff(got, want);
  errors[`${config} ${name}`] = rel;
  const absmax = manifest(config).cases.text_encoder.expected[name].absmax;
  expect([name, rel <= 1e-4]).toEqual([name, true]);
  expect([name, abs <= 1e-4 * Math.max(1, absmax)]).toEqual([name, true]);
}

/** A copy of a model folder in a temp dir, with its config and/or weights rewritten. */
async function variantFolder(
  dir: string,
  config: string,
  edit: { config?: (c: Record<string, unknown>) => Record<string, unknown>; weights?: (w: Record<string, Tensor>) => Record<string, Tensor>; weightsName?: string },
): Promise<string> {
  fs.mkdirSync(dir, { recursive: true });
  const cfg = JSON.parse(fs.readFileSync(path.join(modelDir(config), 'config.json'), 'utf8'));
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(edit.config ? edit.config(cfg) : cfg, null, 2));
  const { tensors } = await loadSafetensors(path.join(modelDir(config), 'model.safetensors'));
  await saveSafetensors(path.join(dir, edit.weightsName ?? 'model.safetensors'), edit.weights ? edit.weights(tensors) : tensors);
  return dir;
}

describe('TextEncoder (CLIPTextModel) against transformers', () => {
  const errors: Record<string, number> = {};
  let tmp: { dir: string; cleanup: () => void };
  beforeAll(() => (tmp = tempDir('cd-text-')));
  afterAll(() => {
    tmp.cleanup();
    // The measured relative errors, for the report.
    console.log(`text encoder relative errors:\n${Object.entries(errors).map(([k, v]) => `  ${k}: ${v.toExponential(2)}`).join('\n')}`);
  });

  describe.each(CONFIGS)('%s', (config, hidden, act) => {
    let enc: TextEncoder;
    let c: Record<string, Tensor>;
    beforeAll(async () => {
      enc = await TextEncoder.load(modelDir(config));
      c = await loadCase(config, 'text_encoder');
    });
    afterAll(() => enc.dispose());

    it('reads the config', () => {
      expect(enc.hiddenSize).toBe(hidden);
      expect(enc.hiddenAct).toBe(act);
      expect(enc.numHiddenLayers).toBe(2);
      expect(enc.vocabSize).toBe(1514);
      expect(enc.baseVocabSize).toBe(1514);
      expect(enc.dtype).toBe('float32');
      expect(enc.device).toBe('cpu');
    });

    it('refuses the added token id before the embeddings are resized', async () => {
      await expect(enc.encode(c.input_ids)).rejects.toThrow(InvalidArgumentError);
      await expect(enc.encode(c.input_ids)).rejects.toThrow(/1514.*1514 tokens/);
    });

    it('matches last_hidden_state, clip_skip_1 and every hidden state with <new1> added', async () => {
      const params = manifest(config).cases.text_encoder.params;
      expect(params.added_token_id).toBe(1514);
      expect(enc.resizeTokenEmbeddings(1515)).toBe(1515);
      const row = c.new_token_row.toArray() as Float32Array;
      enc.setTokenRows([1514], Tensor.fromArray(row, [1, hidden]));
      expect(values(enc.tokenRows([1514]))).toEqual(Array.from(row));

      const last = await enc.encode(c.input_ids);
      expect(last.shape).toEqual([2, 77, hidden]);
      await expectClose(config, 'last_hidden_state', last, c.last_hidden_state, errors);

      await expectClose(config, 'clip_skip_1', await enc.encode(c.input_ids, { clipSkip: 1 }), c.clip_skip_1, errors);

      const out = await enc.encode(c.input_ids, { outputHiddenStates: true });
      expect(out.hiddenStates.length).toBe(3);
      for (let i = 0; i < 3; i++) await expectClose(config, `hidden_states.${i}`, out.hiddenStates[i], c[`hidden_states.${i}`], errors);
      await expectClose(config, 'last_hidden_state', out.lastHiddenState, c.last_hidden_state, errors);

      // The added row really is used: another row changes the second prompt only.
      enc.setTokenRows([1514], Tensor.fromArray(row.map((x) => -x), [1, hidden]));
      const changed = await toFloat64(await enc.encode(c.input_ids));
      const ref = await toFloat64(last);
      const per = hidden * 77;
      let d0 = 0;
      let d1 = 0;
      for (let i = 0; i < per; i++) d0 = Math.max(d0, Math.abs(changed[i] - ref[i]));
      for (let i = per; i < 2 * per; i++) d1 = Math.max(d1, Math.abs(changed[i] - ref[i]));
      expect(d0).toBe(0);
      expect(d1).toBeGreaterThan(1e-3);
      enc.setTokenRows([1514], Tensor.fromArray(row, [1, hidden]));
    });

    it('clipSkip equal to the number of layers gives the normalised embeddings; beyond it is refused', async () => {
      await expect(enc.encode(c.input_ids, { clipSkip: 3 })).rejects.toThrow(InvalidArgumentError);
      const s2 = await enc.encode(c.input_ids, { clipSkip: 2 });
      expect(s2.shape).toEqual([2, 77, hidden]);
    });
  });

  it('resizeTokenEmbeddings keeps old rows, fills new rows with the mean, and shrinks back', async () => {
    const enc = await TextEncoder.load(modelDir('sd1'));
    const before = enc.tokenRows([0, 1, 1513]).toArray() as Float32Array;
    expect(enc.resizeTokenEmbeddings(1517)).toBe(1517);
    expect(values(enc.tokenRows([0, 1, 1513]))).toEqual(Array.from(before));
    const all = (await toFloat64(enc.tokenRows(Array.from({ length: 1514 }, (_, i) => i)))) as Float64Array;
    const mean = new Float64Array(32);
    for (let r = 0; r < 1514; r++) for (let j = 0; j < 32; j++) mean[j] += all[r * 32 + j] / 1514;
    const added = await toFloat64(enc.tokenRows([1514, 1515, 1516]));
    for (let j = 0; j < 32; j++) {
      expect(Math.abs(added[j] - mean[j])).toBeLessThan(1e-6);
      expect(added[64 + j]).toBe(added[j]);
    }
    // Setting a base row and an added row together, then reading them back.
    const rows = Tensor.fromArray(new Float32Array(64).map((_, i) => i / 7), [2, 32]);
    enc.setTokenRows([5, 1515], rows);
    expect(values(enc.tokenRows([5, 1515]))).toEqual(values(rows));
    expect(enc.resizeTokenEmbeddings(1514)).toBe(1514);
    expect(enc.vocabSize).toBe(1514);
    expect(() => enc.resizeTokenEmbeddings(1000)).toThrow(InvalidArgumentError);
    expect(() => enc.tokenRows([1514])).toThrow(InvalidArgumentError);
    expect(() => enc.setTokenRows([3, 3], rows)).toThrow(/twice/);
    expect(() => enc.setTokenRows([3], rows)).toThrow(InvalidArgumentError);
    enc.dispose();
    expect(() => enc.vocabSize).toThrow(DisposedError);
  });

  it('loads weights saved without the text_model. prefix (transformers 5) identically', async () => {
    const dir = await variantFolder(path.join(tmp.dir, 'noprefix'), 'sd2', {
      weights: (w) => Object.fromEntries(Object.entries(w).map(([k, v]) => [k.replace(/^text_model\./, ''), v])),
    });
    const a = await TextEncoder.load(modelDir('sd2'));
    const b = await TextEncoder.load(dir);
    const ids = Tensor.fromArray(new BigInt64Array(77).map((_, i) => BigInt((i * 37) % 1514)), [1, 77]);
    expect(await maxAbsDiff(await b.encode(ids), await a.encode(ids))).toBe(0);
    expect(b.vocabSize).toBe(1514);
  });

  it('loads the fp16 variant file and accepts the old position_ids buffer', async () => {
    const dir = await variantFolder(path.join(tmp.dir, 'fp16'), 'sd1', {
      weightsName: 'model.fp16.safetensors',
      weights: (w) => ({ ...w, 'text_model.embeddings.position_ids': Tensor.fromArray(new BigInt64Array(77).map((_, i) => BigInt(i)), [1, 77]) }),
    });
    const enc = await TextEncoder.load(dir, { variant: 'fp16' });
    expect(enc.hiddenSize).toBe(32);
    await expect(TextEncoder.load(dir)).rejects.toThrow(FileError);
    const half = await TextEncoder.load(dir, { variant: 'fp16', dtype: 'float16' });
    expect(half.dtype).toBe('float16');
    // float16 runs too (CPU), close to float32 at float16 precision.
    const ids = Tensor.fromArray(new BigInt64Array(77).map((_, i) => BigInt((i * 53) % 1514)), [1, 77]);
    const h = await half.encode(ids);
    expect(h.dtype).toBe('float16');
    expect(await relError(h, await enc.encode(ids))).toBeLessThan(1e-2);
  });

  it('accepts every key of the real SD1 (CLIP ViT-L/14) and SD2.1 text_encoder configs', async () => {
    const sizes = { hidden_size: 32, intermediate_size: 64, num_attention_heads: 4, num_hidden_layers: 2, vocab_size: 1514 };
    const sd15 = {
      _name_or_path: 'openai/clip-vit-large-patch14', architectures: ['CLIPTextModel'], attention_dropout: 0.0, bos_token_id: 0,
      dropout: 0.0, eos_token_id: 2, hidden_act: 'quick_gelu', hidden_size: 768, initializer_factor: 1.0, initializer_range: 0.02,
      intermediate_size: 3072, layer_norm_eps: 1e-5, max_position_embeddings: 77, model_type: 'clip_text_model',
      num_attention_heads: 12, num_hidden_layers: 12, pad_token_id: 1, projection_dim: 768, torch_dtype: 'float32',
      transformers_version: '4.22.0.dev0', vocab_size: 49408,
    };
    const sd21 = {
      ...sd15, _name_or_path: 'hf-models/stable-diffusion-v2-768x768/text_encoder', hidden_act: 'gelu', hidden_size: 1024,
      intermediate_size: 4096, num_attention_heads: 16, num_hidden_layers: 23, projection_dim: 512, transformers_version: '4.25.0.dev0',
    };
    // The text_config of openai/clip-vit-large-patch14's own config.json, as transformers 4.x dumps it.
    const legacy = {
      ...sd15, add_cross_attention: false, bad_words_ids: null, begin_suppress_tokens: null, chunk_size_feed_forward: 0,
      cross_attention_hidden_size: null, decoder_start_token_id: null, diversity_penalty: 0.0, do_sample: false,
      early_stopping: false, encoder_no_repeat_ngram_size: 0, exponential_decay_length_penalty: null, finetuning_task: null,
      forced_bos_token_id: null, forced_eos_token_id: null, id2label: { '0': 'LABEL_0', '1': 'LABEL_1' }, is_decoder: false,
      is_encoder_decoder: false, label2id: { LABEL_0: 0, LABEL_1: 1 }, length_penalty: 1.0, max_length: 20, min_length: 0,
      no_repeat_ngram_size: 0, num_beam_groups: 1, num_beams: 1, num_return_sequences: 1, output_attentions: false,
      output_hidden_states: false, output_scores: false, prefix: null, problem_type: null, pruned_heads: {},
      remove_invalid_values: false, repetition_penalty: 1.0, return_dict: true, return_dict_in_generate: false,
      sep_token_id: null, suppress_tokens: null, task_specific_params: null, temperature: 1.0, tf_legacy_loss: false,
      tie_encoder_decoder: false, tie_word_embeddings: true, tokenizer_class: null, top_k: 50, top_p: 1.0, torchscript: false,
      typical_p: 1.0, use_bfloat16: false,
    };
    for (const [name, real] of Object.entries({ sd15, sd21, legacy })) {
      const dir = await variantFolder(path.join(tmp.dir, `real-${name}`), 'sd1', { config: () => ({ ...real, ...sizes }) });
      const enc = await TextEncoder.load(dir);
      expect([name, enc.hiddenSize]).toEqual([name, 32]);
      enc.dispose();
    }
  });

  it('the activation matters: sd1 weights run with exact gelu miss the quick_gelu reference', async () => {
    const dir = await variantFolder(path.join(tmp.dir, 'wrong-act'), 'sd1', { config: (cfg) => ({ ...cfg, hidden_act: 'gelu' }) });
    const enc = await TextEncoder.load(dir);
    const c = await loadCase('sd1', 'text_encoder');
    enc.resizeTokenEmbeddings(1515);
    enc.setTokenRows([1514], Tensor.fromArray(c.new_token_row.toArray() as Float32Array, [1, 32]));
    expect(await relError(await enc.encode(c.input_ids), c.last_hidden_state)).toBeGreaterThan(1e-3);
  });

  it('refuses unknown or unsupported config options, naming them', async () => {
    const cases: [string, (c: Record<string, unknown>) => Record<string, unknown>, RegExp][] = [
      ['unknown', (c) => ({ ...c, use_fancy_rope: true, another_option: 1 }), /"use_fancy_rope", "another_option"/],
      ['act', (c) => ({ ...c, hidden_act: 'relu' }), /hidden_act.*relu/],
      ['dropout', (c) => ({ ...c, attention_dropout: 0.1 }), /attention_dropout/],
      ['type', (c) => ({ ...c, model_type: 'clip' }), /model_type/],
      ['heads', (c) => ({ ...c, num_attention_heads: 5 }), /num_attention_heads/],
    ];
    for (const [name, edit, re] of cases) {
      const dir = await variantFolder(path.join(tmp.dir, `cfg-${name}`), 'sd1', { config: edit });
      const err = await TextEncoder.load(dir).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(ModelError);
      expect([name, (err as ModelError).code]).toEqual([name, 'MODEL_CONFIG']);
      expect((err as ModelError).message).toMatch(re);
      expect((err as ModelError).file).toMatch(/config\.json$/);
    }
  });

  it('lists every missing, unexpected and mis-shaped weight', async () => {
    const dir = await variantFolder(path.join(tmp.dir, 'badweights'), 'sd1', {
      weights: (w) => {
        const out = { ...w };
        delete out['text_model.encoder.layers.1.mlp.fc2.bias'];
        out['text_model.text_projection.weight'] = Tensor.zeros([32, 32]);
        out['text_model.final_layer_norm.weight'] = Tensor.zeros([31]);
        return out;
      },
    });
    const err = await TextEncoder.load(dir).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ModelError);
    const e = err as ModelError;
    expect(e.code).toBe('MODEL_WEIGHTS');
    expect(e.message).toMatch(/Missing keys \(1\):\s+text_model\.encoder\.layers\.1\.mlp\.fc2\.bias \[32\]/);
    expect(e.message).toMatch(/Unexpected keys \(1\):\s+text_model\.text_projection\.weight/);
    expect(e.message).toMatch(/Shape mismatches \(1\):\s+text_model\.final_layer_norm\.weight: expected \[32\], found \[31\]/);
  });

  it('loads .bin (torch.save) weights through the restricted unpickler, equal to safetensors', async () => {
    const dir = path.join(tmp.dir, 'bin');
    fs.mkdirSync(dir);
    fs.copyFileSync(path.join(modelDir('sd1'), 'config.json'), path.join(dir, 'config.json'));
    runPython(['-c', TO_BIN, path.join(modelDir('sd1'), 'model.safetensors'), path.join(dir, 'pytorch_model.bin')]);
    const fromBin = await TextEncoder.load(dir);
    const fromSafetensors = await TextEncoder.load(modelDir('sd1'));
    const ids = Tensor.fromArray(new BigInt64Array([1512n, 320n, 1125n, 539n, 1513n, 1513n]), [1, 6]);
    const a = (await fromBin.encode(ids)).toArray() as Float32Array;
    const b = (await fromSafetensors.encode(ids)).toArray() as Float32Array;
    expect(Array.from(a)).toEqual(Array.from(b));
    fs.writeFileSync(path.join(dir, 'pytorch_model.bin'), 'not really a pickle');
    await expect(TextEncoder.load(dir)).rejects.toThrow(PickleError);
    await expect(TextEncoder.load(path.join(tmp.dir, 'nowhere'))).rejects.toThrow(FileError);
  });
});

describe('TextEncoder input checks', () => {
  it('refuses token ids outside the vocabulary, naming the id', async () => {
    const te = await TextEncoder.load(modelDir('sd1'));
    try {
      const bad = Tensor.fromArray(new BigInt64Array([1512n, 99999n, 1513n]), [1, 3]);
      await expect(te.encode(bad)).rejects.toThrow(InvalidArgumentError);
      await expect(te.encode(bad)).rejects.toThrow(/token id 99999, outside the vocabulary of 1514 tokens/);
      const negative = Tensor.fromArray(new BigInt64Array([1512n, -3n]), [1, 2]);
      await expect(te.encode(negative)).rejects.toThrow(/token id -3/);
    } finally {
      te.dispose();
    }
  });
});
