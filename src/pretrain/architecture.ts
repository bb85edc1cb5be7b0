/**
 * A small Stable Diffusion pipeline described from scratch: the diffusers / transformers config files
 * of its AutoencoderKL, UNet2DConditionModel and CLIPTextModel, the full list of their parameters
 * (diffusers names and shapes), and a seeded random initialisation. Loading the result through the
 * ordinary model loaders checks every name and shape against the native models, so a mistake here
 * is a ModelError naming the key, never a silently different model.
 */
import { InvalidArgumentError } from '../errors';
import { Tensor } from '../core/tensor';
import { Rng } from '../train/rng';

/** The sizes of a small pipeline. */
export interface TinyPipelineConfig {
  vae: {
    /** Channels per encoder block; the spatial factor is 2^(blocks − 1). */
    blockOutChannels: number[];
    layersPerBlock: number;
    normNumGroups: number;
    latentChannels: number;
    /** Image side in pixels (the config's sample_size). */
    sampleSize: number;
  };
  unet: {
    blockOutChannels: number[];
    layersPerBlock: number;
    normNumGroups: number;
    /** Per down block: CrossAttnDownBlock2D (true) or DownBlock2D; the up blocks mirror it. */
    crossAttention: boolean[];
    /** Heads per block (diffusers' attention_head_dim, which counts heads). */
    attentionHeads: number[];
    /** Latent side (the config's sample_size). */
    sampleSize: number;
  };
  textEncoder: {
    vocabSize: number;
    hiddenSize: number;
    intermediateSize: number;
    numHiddenLayers: number;
    numAttentionHeads: number;
    maxPositionEmbeddings: number;
    bosTokenId: number;
    eosTokenId: number;
    padTokenId: number;
  };
}

/**
 * The toy model's sizes (docs: toy-world-notes): a 32×32 → 8×8×4 autoencoder with [32, 64, 64]
 * channels, a [32, 64] UNet with cross-attention in both blocks and in the middle, and a 2-layer,
 * 64-wide CLIP text encoder over the real 49,408-token CLIP vocabulary.
 */
export const TOY_PIPELINE_CONFIG: TinyPipelineConfig = {
  vae: { blockOutChannels: [32, 64, 64], layersPerBlock: 1, normNumGroups: 8, latentChannels: 4, sampleSize: 32 },
  unet: {
    blockOutChannels: [32, 64],
    layersPerBlock: 1,
    normNumGroups: 8,
    crossAttention: [true, true],
    attentionHeads: [2, 4],
    sampleSize: 8,
  },
  textEncoder: {
    vocabSize: 49408,
    hiddenSize: 64,
    intermediateSize: 256,
    numHiddenLayers: 2,
    numAttentionHeads: 4,
    maxPositionEmbeddings: 77,
    bosTokenId: 49406,
    eosTokenId: 49407,
    padTokenId: 49407,
  },
};

/** How a parameter starts. */
export type ParameterInit =
  | { kind: 'uniform'; bound: number }
  | { kind: 'normal'; std: number }
  | { kind: 'ones' }
  | { kind: 'zeros' };

export interface ParameterSpec {
  name: string;
  shape: number[];
  init: ParameterInit;
}

function checkConfig(c: TinyPipelineConfig): void {
  const positive = (v: number, what: string) => {
    if (!Number.isInteger(v) || v <= 0) throw new InvalidArgumentError(`${what} must be a positive integer, got ${v}`);
  };
  for (const [what, list] of [
    ['vae.blockOutChannels', c.vae.blockOutChannels],
    ['unet.blockOutChannels', c.unet.blockOutChannels],
    ['unet.attentionHeads', c.unet.attentionHeads],
  ] as const) {
    if (!list.length) throw new InvalidArgumentError(`${what} must not be empty`);
    list.forEach((v, i) => positive(v, `${what}[${i}]`));
  }
  const n = c.unet.blockOutChannels.length;
  if (c.unet.crossAttention.length !== n || c.unet.attentionHeads.length !== n) {
    throw new InvalidArgumentError(`unet.crossAttention and unet.attentionHeads need one entry per block (${n})`);
  }
  for (const ch of c.vae.blockOutChannels) if (ch % c.vae.normNumGroups) throw new InvalidArgumentError('vae.normNumGroups must divide every block width');
  for (const ch of c.unet.blockOutChannels) if (ch % c.unet.normNumGroups) throw new InvalidArgumentError('unet.normNumGroups must divide every block width');
  c.unet.blockOutChannels.forEach((ch, i) => {
    if (ch % c.unet.attentionHeads[i]) throw new InvalidArgumentError(`unet.attentionHeads[${i}] must divide ${ch}`);
  });
  if (c.textEncoder.hiddenSize % c.textEncoder.numAttentionHeads) throw new InvalidArgumentError('textEncoder.numAttentionHeads must divide hiddenSize');
}

// ---------------------------------------------------------------------------------------------
// Config files

/** unet/config.json (diffusers 0.42 spelling of every key, so diffusers loads it unchanged). */
export function unetConfigJson(c: TinyPipelineConfig): Record<string, unknown> {
  checkConfig(c);
  const u = c.unet;
  const n = u.blockOutChannels.length;
  return {
    _class_name: 'UNet2DConditionModel',
    _diffusers_version: '0.42.1',
    act_fn: 'silu',
    addition_embed_type: null,
    addition_embed_type_num_heads: 64,
    addition_time_embed_dim: null,
    attention_head_dim: u.attentionHeads,
    attention_type: 'default',
    block_out_channels: u.blockOutChannels,
    center_input_sample: false,
    class_embed_type: null,
    class_embeddings_concat: false,
    conv_in_kernel: 3,
    conv_out_kernel: 3,
    cross_attention_dim: c.textEncoder.hiddenSize,
    cross_attention_norm: null,
    down_block_types: u.crossAttention.map((x) => (x ? 'CrossAttnDownBlock2D' : 'DownBlock2D')),
    downsample_padding: 1,
    dropout: 0.0,
    dual_cross_attention: false,
    encoder_hid_dim: null,
    encoder_hid_dim_type: null,
    flip_sin_to_cos: true,
    freq_shift: 0,
    in_channels: c.vae.latentChannels,
    layers_per_block: u.layersPerBlock,
    mid_block_only_cross_attention: null,
    mid_block_scale_factor: 1,
    mid_block_type: 'UNetMidBlock2DCrossAttn',
    norm_eps: 1e-5,
    norm_num_groups: u.normNumGroups,
    num_attention_heads: null,
    num_class_embeds: null,
    only_cross_attention: false,
    out_channels: c.vae.latentChannels,
    projection_class_embeddings_input_dim: null,
    resnet_out_scale_factor: 1.0,
    resnet_skip_time_act: false,
    resnet_time_scale_shift: 'default',
    reverse_transformer_layers_per_block: null,
    sample_size: u.sampleSize,
    time_cond_proj_dim: null,
    time_embedding_act_fn: null,
    time_embedding_dim: null,
    time_embedding_type: 'positional',
    timestep_post_act: null,
    transformer_layers_per_block: 1,
    up_block_types: [...u.crossAttention].reverse().map((x) => (x ? 'CrossAttnUpBlock2D' : 'UpBlock2D')).slice(0, n),
    upcast_attention: false,
    use_linear_projection: false,
  };
}

/** vae/config.json; `scalingFactor` is measured after training (1 / std of the latents). */
export function vaeConfigJson(c: TinyPipelineConfig, scalingFactor: number): Record<string, unknown> {
  checkConfig(c);
  const v = c.vae;
  const n = v.blockOutChannels.length;
  return {
    _class_name: 'AutoencoderKL',
    _diffusers_version: '0.42.1',
    act_fn: 'silu',
    block_out_channels: v.blockOutChannels,
    down_block_types: Array(n).fill('DownEncoderBlock2D'),
    force_upcast: true,
    in_channels: 3,
    latent_channels: v.latentChannels,
    latents_mean: null,
    latents_std: null,
    layers_per_block: v.layersPerBlock,
    mid_block_add_attention: true,
    norm_num_groups: v.normNumGroups,
    out_channels: 3,
    sample_size: v.sampleSize,
    scaling_factor: scalingFactor,
    shift_factor: null,
    up_block_types: Array(n).fill('UpDecoderBlock2D'),
    use_post_quant_conv: true,
    use_quant_conv: true,
  };
}

/** The fields of CLIPTextConfig that transformers types as floats (written as 1.0, never 1). */
export const TEXT_ENCODER_FLOAT_KEYS = ['attention_dropout', 'initializer_factor', 'initializer_range', 'layer_norm_eps'] as const;

/** text_encoder/config.json (transformers CLIPTextConfig). */
export function textEncoderConfigJson(c: TinyPipelineConfig): Record<string, unknown> {
  checkConfig(c);
  const t = c.textEncoder;
  return {
    architectures: ['CLIPTextModel'],
    attention_dropout: 0.0,
    bos_token_id: t.bosTokenId,
    dtype: 'float16',
    eos_token_id: t.eosTokenId,
    hidden_act: 'quick_gelu',
    hidden_size: t.hiddenSize,
    initializer_factor: 1.0,
    initializer_range: 0.02,
    intermediate_size: t.intermediateSize,
    layer_norm_eps: 1e-5,
    max_position_embeddings: t.maxPositionEmbeddings,
    model_type: 'clip_text_model',
    num_attention_heads: t.numAttentionHeads,
    num_hidden_layers: t.numHiddenLayers,
    pad_token_id: t.padTokenId,
    projection_dim: t.hiddenSize,
    transformers_version: '5.24.0',
    vocab_size: t.vocabSize,
  };
}

/**
 * scheduler/scheduler_config.json: DDIM with "trailing" spacing, so sampling starts at t = 999 (the
 * default "leading" spacing starts near t = 951, which the feasibility run found hurts a model this
 * small), over SD's scaled-linear training schedule.
 */
export function schedulerConfigJson(): Record<string, unknown> {
  return {
    _class_name: 'DDIMScheduler',
    _diffusers_version: '0.42.1',
    beta_end: 0.012,
    beta_schedule: 'scaled_linear',
    beta_start: 0.00085,
    clip_sample: false,
    num_train_timesteps: 1000,
    prediction_type: 'epsilon',
    set_alpha_to_one: false,
    steps_offset: 0,
    timestep_spacing: 'trailing',
    trained_betas: null,
  };
}

/** model_index.json of a StableDiffusionPipeline without safety checker. */
export function modelIndexJson(): Record<string, unknown> {
  return {
    _class_name: 'StableDiffusionPipeline',
    _diffusers_version: '0.42.1',
    feature_extractor: [null, null],
    image_encoder: [null, null],
    requires_safety_checker: false,
    safety_checker: [null, null],
    scheduler: ['diffusers', 'DDIMScheduler'],
    text_encoder: ['transformers', 'CLIPTextModel'],
    tokenizer: ['transformers', 'CLIPTokenizer'],
    unet: ['diffusers', 'UNet2DConditionModel'],
    vae: ['diffusers', 'AutoencoderKL'],
  };
}

// ---------------------------------------------------------------------------------------------
// Parameters: names and shapes as diffusers / transformers create them, with torch's default
// initialisation for convolutions and linear layers (uniform in ±1/√fan_in, weight and bias),
// ones/zeros for norms, and transformers' N(0, 0.02²) for CLIP's embeddings.

class Specs {
  readonly list: ParameterSpec[] = [];
  private add(name: string, shape: number[], init: ParameterInit): void {
    this.list.push({ name, shape, init });
  }
  conv(name: string, cout: number, cin: number, k: number): void {
    const bound = 1 / Math.sqrt(cin * k * k);
    this.add(`${name}.weight`, [cout, cin, k, k], { kind: 'uniform', bound });
    this.add(`${name}.bias`, [cout], { kind: 'uniform', bound });
  }
  linear(name: string, out: number, inp: number, bias = true): void {
    const bound = 1 / Math.sqrt(inp);
    this.add(`${name}.weight`, [out, inp], { kind: 'uniform', bound });
    if (bias) this.add(`${name}.bias`, [out], { kind: 'uniform', bound });
  }
  norm(name: string, c: number): void {
    this.add(`${name}.weight`, [c], { kind: 'ones' });
    this.add(`${name}.bias`, [c], { kind: 'zeros' });
  }
  embedding(name: string, rows: number, width: number, std: number): void {
    this.add(`${name}.weight`, [rows, width], { kind: 'normal', std });
  }
}

/** diffusers ResnetBlock2D (time embedding optional). */
function resnet(s: Specs, p: string, cin: number, cout: number, temb: number | null): void {
  s.norm(`${p}.norm1`, cin);
  s.conv(`${p}.conv1`, cout, cin, 3);
  if (temb !== null) s.linear(`${p}.time_emb_proj`, cout, temb);
  s.norm(`${p}.norm2`, cout);
  s.conv(`${p}.conv2`, cout, cout, 3);
  if (cin !== cout) s.conv(`${p}.conv_shortcut`, cout, cin, 1);
}

/** diffusers Transformer2DModel with one BasicTransformerBlock, 1×1-conv projections (SD1 layout). */
function transformer(s: Specs, p: string, c: number, crossDim: number): void {
  s.norm(`${p}.norm`, c);
  s.conv(`${p}.proj_in`, c, c, 1);
  const b = `${p}.transformer_blocks.0`;
  s.norm(`${b}.norm1`, c);
  for (const x of ['to_q', 'to_k', 'to_v']) s.linear(`${b}.attn1.${x}`, c, c, false);
  s.linear(`${b}.attn1.to_out.0`, c, c);
  s.norm(`${b}.norm2`, c);
  s.linear(`${b}.attn2.to_q`, c, c, false);
  s.linear(`${b}.attn2.to_k`, c, crossDim, false);
  s.linear(`${b}.attn2.to_v`, c, crossDim, false);
  s.linear(`${b}.attn2.to_out.0`, c, c);
  s.norm(`${b}.norm3`, c);
  s.linear(`${b}.ff.net.0.proj`, 8 * c, c);
  s.linear(`${b}.ff.net.2`, c, 4 * c);
  s.conv(`${p}.proj_out`, c, c, 1);
}

/** Every UNet2DConditionModel parameter of the config, in construction order. */
export function unetParameters(c: TinyPipelineConfig): ParameterSpec[] {
  checkConfig(c);
  const u = c.unet;
  const ch = u.blockOutChannels;
  const n = ch.length;
  const temb = 4 * ch[0];
  const cross = c.textEncoder.hiddenSize;
  const s = new Specs();
  s.conv('conv_in', ch[0], c.vae.latentChannels, 3);
  s.linear('time_embedding.linear_1', temb, ch[0]);
  s.linear('time_embedding.linear_2', temb, temb);
  let out = ch[0];
  for (let i = 0; i < n; i++) {
    const inp = out;
    out = ch[i];
    for (let j = 0; j < u.layersPerBlock; j++) {
      resnet(s, `down_blocks.${i}.resnets.${j}`, j === 0 ? inp : out, out, temb);
      if (u.crossAttention[i]) transformer(s, `down_blocks.${i}.attentions.${j}`, out, cross);
    }
    if (i !== n - 1) s.conv(`down_blocks.${i}.downsamplers.0.conv`, out, out, 3);
  }
  const last = ch[n - 1];
  resnet(s, 'mid_block.resnets.0', last, last, temb);
  transformer(s, 'mid_block.attentions.0', last, cross);
  resnet(s, 'mid_block.resnets.1', last, last, temb);
  const rev = [...ch].reverse();
  const revCross = [...u.crossAttention].reverse();
  let prev = rev[0];
  for (let i = 0; i < n; i++) {
    const o = rev[i];
    const inp = rev[Math.min(i + 1, n - 1)];
    for (let j = 0; j <= u.layersPerBlock; j++) {
      const skip = j === u.layersPerBlock ? inp : o;
      const rin = j === 0 ? prev : o;
      resnet(s, `up_blocks.${i}.resnets.${j}`, rin + skip, o, temb);
      if (revCross[i]) transformer(s, `up_blocks.${i}.attentions.${j}`, o, cross);
    }
    if (i !== n - 1) s.conv(`up_blocks.${i}.upsamplers.0.conv`, o, o, 3);
    prev = o;
  }
  s.norm('conv_norm_out', ch[0]);
  s.conv('conv_out', c.vae.latentChannels, ch[0], 3);
  return s.list;
}

/** The VAE's mid-block attention (current diffusers names). */
function vaeAttention(s: Specs, p: string, c: number): void {
  s.norm(`${p}.group_norm`, c);
  for (const x of ['to_q', 'to_k', 'to_v', 'to_out.0']) s.linear(`${p}.${x}`, c, c);
}

/** Every AutoencoderKL parameter of the config. */
export function vaeParameters(c: TinyPipelineConfig): ParameterSpec[] {
  checkConfig(c);
  const v = c.vae;
  const ch = v.blockOutChannels;
  const n = ch.length;
  const L = v.latentChannels;
  const s = new Specs();
  s.conv('encoder.conv_in', ch[0], 3, 3);
  let prev = ch[0];
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < v.layersPerBlock; j++) resnet(s, `encoder.down_blocks.${i}.resnets.${j}`, j === 0 ? prev : ch[i], ch[i], null);
    if (i !== n - 1) s.conv(`encoder.down_blocks.${i}.downsamplers.0.conv`, ch[i], ch[i], 3);
    prev = ch[i];
  }
  const last = ch[n - 1];
  const mid = (p: string) => {
    resnet(s, `${p}.resnets.0`, last, last, null);
    vaeAttention(s, `${p}.attentions.0`, last);
    resnet(s, `${p}.resnets.1`, last, last, null);
  };
  mid('encoder.mid_block');
  s.norm('encoder.conv_norm_out', last);
  s.conv('encoder.conv_out', 2 * L, last, 3);
  s.conv('quant_conv', 2 * L, 2 * L, 1);
  s.conv('post_quant_conv', L, L, 1);
  s.conv('decoder.conv_in', last, L, 3);
  mid('decoder.mid_block');
  prev = last;
  for (let i = 0; i < n; i++) {
    const o = ch[n - 1 - i];
    for (let j = 0; j <= v.layersPerBlock; j++) resnet(s, `decoder.up_blocks.${i}.resnets.${j}`, j === 0 ? prev : o, o, null);
    if (i !== n - 1) s.conv(`decoder.up_blocks.${i}.upsamplers.0.conv`, o, o, 3);
    prev = o;
  }
  s.norm('decoder.conv_norm_out', ch[0]);
  s.conv('decoder.conv_out', 3, ch[0], 3);
  return s.list;
}

/** Every CLIPTextModel parameter, with transformers 4's "text_model." key prefix (the hub layout). */
export function textEncoderParameters(c: TinyPipelineConfig): ParameterSpec[] {
  checkConfig(c);
  const t = c.textEncoder;
  const H = t.hiddenSize;
  const s = new Specs();
  s.embedding('text_model.embeddings.token_embedding', t.vocabSize, H, 0.02);
  s.embedding('text_model.embeddings.position_embedding', t.maxPositionEmbeddings, H, 0.02);
  for (let i = 0; i < t.numHiddenLayers; i++) {
    const p = `text_model.encoder.layers.${i}`;
    s.norm(`${p}.layer_norm1`, H);
    for (const x of ['q_proj', 'k_proj', 'v_proj', 'out_proj']) s.linear(`${p}.self_attn.${x}`, H, H);
    s.norm(`${p}.layer_norm2`, H);
    s.linear(`${p}.mlp.fc1`, t.intermediateSize, H);
    s.linear(`${p}.mlp.fc2`, H, t.intermediateSize);
  }
  s.norm('text_model.final_layer_norm', H);
  return s.list;
}

/** Number of elements of a parameter list. */
export function parameterCount(specs: readonly ParameterSpec[]): number {
  return specs.reduce((n, p) => n + p.shape.reduce((a, b) => a * b, 1), 0);
}

/**
 * Draws every parameter from one seeded stream per parameter name (so adding a parameter elsewhere
 * never changes the others), in pure JavaScript: the same seed gives the same weights on every
 * machine and LibTorch build. Normal draws use Box-Muller on the stream's uniforms.
 */
export function initParameters(specs: readonly ParameterSpec[], seed: number, streamPrefix: string): Record<string, Tensor> {
  const out: Record<string, Tensor> = {};
  for (const spec of specs) {
    const numel = spec.shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(numel);
    const init = spec.init;
    if (init.kind === 'ones') data.fill(1);
    else if (init.kind !== 'zeros') {
      const rng = Rng.fromSeed(seed, streamId(`${streamPrefix}/${spec.name}`));
      if (init.kind === 'uniform') {
        for (let i = 0; i < numel; i++) data[i] = (2 * rng.nextFloat() - 1) * init.bound;
      } else {
        for (let i = 0; i < numel; i += 2) {
          const u1 = 1 - rng.nextFloat(); // (0, 1]: log stays finite
          const u2 = rng.nextFloat();
          const r = Math.sqrt(-2 * Math.log(u1)) * init.std;
          data[i] = r * Math.cos(2 * Math.PI * u2);
          if (i + 1 < numel) data[i + 1] = r * Math.sin(2 * Math.PI * u2);
        }
      }
    }
    out[spec.name] = Tensor.fromArray(data, spec.shape, 'float32');
  }
  return out;
}

/** A 48-bit FNV-1a hash of a name: the stream of its random numbers. */
function streamId(name: string): number {
  let h = 0xcbf29ce484222325n;
  for (const b of Buffer.from(name, 'utf8')) h = ((h ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
  return Number(h & 0xffffffffffffn);
}
