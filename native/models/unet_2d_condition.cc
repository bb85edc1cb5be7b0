#include "models/unet_2d_condition.h"

#include <functional>
#include <mutex>

#include "core/errors.h"
#include "core/json.h"
#include "models/config.h"

namespace cd::models {

namespace {

std::vector<int64_t> Wide(const std::vector<int>& v) { return std::vector<int64_t>(v.begin(), v.end()); }

// diffusers strips a "UNetRes" prefix from block type names before dispatching on them.
std::string BlockName(const std::string& name) { return name.rfind("UNetRes", 0) == 0 ? name.substr(7) : name; }

// Tells models apart for a CrossAttentionContext (an address could be reused by a later model).
uint64_t NextModelId() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1);
}

std::string ShapeText(at::IntArrayRef shape) { return c10::str(shape); }

Activation ReadActivation(ConfigReader& r, const std::string& key, const std::string& fallback, bool nullable) {
  const std::string name = r.String(key, fallback);
  if (nullable && name.empty()) return Activation::None;
  auto act = ActivationFromName(name);
  if (!act) r.Fail(key, "unknown activation \"" + name + "\" (supported: silu, swish, mish, gelu, relu)");
  return *act;
}

}  // namespace

UNetConfig UNetConfig::Parse(const std::string& text, const std::string& file) {
  ConfigReader r(text, file);
  // ConfigReader reads null as absent, but for these keys diffusers treats an explicit null
  // differently from the default (it crashes, or builds another model): refuse it up front. (A null
  // boolean reads as false in diffusers, which ConfigReader's defaults give, except for
  // flip_sin_to_cos, handled below.)
  const json::Value raw = json::Parse(text.data(), text.size());
  for (const char* key :
       {"in_channels", "out_channels", "freq_shift", "down_block_types", "up_block_types", "only_cross_attention",
        "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "dropout", "act_fn",
        "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
        "resnet_time_scale_shift", "time_embedding_type", "conv_in_kernel", "conv_out_kernel", "attention_type"}) {
    const json::Value* v = raw.find(key);
    if (v && v->kind == json::Value::Kind::Null)
      r.Fail(key, "null is not supported (diffusers would fail or build a different model)");
  }
  auto isNull = [&](const char* key) {
    const json::Value* v = raw.find(key);
    return v && v->kind == json::Value::Kind::Null;
  };

  UNetConfig c;
  c.inChannels = r.Int("in_channels", 4);
  c.outChannels = r.Int("out_channels", 4);
  c.centerInputSample = r.Bool("center_input_sample", false);
  c.flipSinToCos = r.Bool("flip_sin_to_cos", !isNull("flip_sin_to_cos"));
  c.freqShift = r.Double("freq_shift", 0);

  const auto downTypes = r.Strings(
      "down_block_types", {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"});
  const auto upTypes =
      r.Strings("up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"});
  c.blockOutChannels = Wide(r.Ints("block_out_channels", {320, 640, 1280, 1280}));
  const int n = static_cast<int>(c.blockOutChannels.size());
  if (n == 0) r.Fail("block_out_channels", "needs at least one block");
  if (static_cast<int>(downTypes.size()) != n)
    r.Fail("down_block_types", "needs one entry per block_out_channels entry (" + std::to_string(n) + ")");
  if (static_cast<int>(upTypes.size()) != n)
    r.Fail("up_block_types", "needs as many entries as down_block_types (" + std::to_string(n) + ")");
  for (const auto& t : downTypes) {
    const std::string b = BlockName(t);
    if (b != "CrossAttnDownBlock2D" && b != "DownBlock2D")
      r.Fail("down_block_types", "block type \"" + t + "\" is not implemented (CrossAttnDownBlock2D, DownBlock2D are)");
    c.downCrossAttn.push_back(b == "CrossAttnDownBlock2D");
  }
  for (const auto& t : upTypes) {
    const std::string b = BlockName(t);
    if (b != "CrossAttnUpBlock2D" && b != "UpBlock2D")
      r.Fail("up_block_types", "block type \"" + t + "\" is not implemented (CrossAttnUpBlock2D, UpBlock2D are)");
    c.upCrossAttn.push_back(b == "CrossAttnUpBlock2D");
  }
  {
    if (isNull("mid_block_type")) {
      c.hasMidBlock = false;
      r.Ignore({"mid_block_type"});
    } else {
      const std::string mid = r.String("mid_block_type", "UNetMidBlock2DCrossAttn");
      if (mid != "UNetMidBlock2DCrossAttn")
        r.Fail("mid_block_type", "\"" + mid + "\" is not implemented (UNetMidBlock2DCrossAttn or null are)");
    }
  }
  {
    // A bool, or one bool per block; true turns attn1 into a second cross-attention.
    const json::Value* v = raw.find("only_cross_attention");
    r.Ignore({"only_cross_attention"});
    if (v && v->kind == json::Value::Kind::Bool && v->boolean)
      r.Fail("only_cross_attention", "only false is supported");
    if (v && v->kind == json::Value::Kind::Array) {
      if (static_cast<int>(v->array.size()) != n)
        r.Fail("only_cross_attention", "needs one entry per block (" + std::to_string(n) + ")");
      for (const auto& x : v->array)
        if (x.kind != json::Value::Kind::Bool || x.boolean) r.Fail("only_cross_attention", "only false is supported");
    } else if (v && v->kind != json::Value::Kind::Bool) {
      r.Fail("only_cross_attention", "expected false or a list of false");
    }
  }

  c.layersPerBlock = Wide(r.IntOrList("layers_per_block", n, 2));
  c.downsamplePadding = r.Int("downsample_padding", 1);
  c.midBlockScaleFactor = r.Double("mid_block_scale_factor", 1);
  if (r.Double("dropout", 0.0) != 0.0)
    r.Fail("dropout", "only 0 is supported (dropout inside the resnets is not implemented)");
  c.act = ReadActivation(r, "act_fn", "silu", false);
  c.normNumGroups = r.Int("norm_num_groups", 32);
  c.normEps = r.Double("norm_eps", 1e-5);
  {
    const auto dims = r.IntOrList("cross_attention_dim", n, 1280);
    for (int d : dims)
      if (d != dims[0]) r.Fail("cross_attention_dim", "different dimensions per block are not supported");
    c.crossAttentionDim = dims[0];
  }
  c.transformerLayersPerBlock = Wide(r.IntOrList("transformer_layers_per_block", n, 1));
  r.Expect("reverse_transformer_layers_per_block", "null", "asymmetric transformer depths are not implemented");
  r.Expect("num_attention_heads", "null",
           "diffusers refuses it too: the number of heads of SD configs is given by attention_head_dim");
  c.heads = Wide(r.IntOrList("attention_head_dim", n, 8));
  r.Expect("dual_cross_attention", "false", "DualTransformer2DModel is not implemented");
  c.useLinearProjection = r.Bool("use_linear_projection", false);
  c.upcastAttention = r.Bool("upcast_attention", false);
  r.Expect("class_embed_type", "null", "class embeddings are not implemented");
  r.Expect("num_class_embeds", "null", "class embeddings are not implemented");
  r.Expect("class_embeddings_concat", "false", "class embeddings are not implemented");
  r.Expect("addition_embed_type", "null", "additional embeddings (SDXL, Kandinsky) are not implemented");
  r.Expect("encoder_hid_dim", "null", "an encoder_hid_proj is not implemented");
  r.Expect("encoder_hid_dim_type", "null", "an encoder_hid_proj is not implemented");
  r.Expect("time_cond_proj_dim", "null", "timestep conditioning (LCM) is not implemented");
  r.Expect("resnet_time_scale_shift", "\"default\"", "scale_shift time embedding norms are not implemented");
  r.Expect("time_embedding_type", "\"positional\"", "Fourier time embeddings are not implemented");
  r.Expect("attention_type", "\"default\"", "gated (GLIGEN) attention is not implemented");
  c.timeEmbedDim = r.Int("time_embedding_dim", 0);
  if (c.timeEmbedDim <= 0) c.timeEmbedDim = 4 * c.blockOutChannels[0];
  c.timeEmbeddingAct = ReadActivation(r, "time_embedding_act_fn", "", true);
  c.timestepPostAct = ReadActivation(r, "timestep_post_act", "", true);
  c.convInKernel = r.Int("conv_in_kernel", 3);
  c.convOutKernel = r.Int("conv_out_kernel", 3);
  {
    const json::Value* v = raw.find("sample_size");
    if (v && v->kind == json::Value::Kind::Array) c.sampleSize = Wide(r.Ints("sample_size", {}));
    else if (v && v->kind != json::Value::Kind::Null) c.sampleSize = {r.Int("sample_size", 0)};
    else r.Ignore({"sample_size"});
  }
  // Options that only the block types refused above read (ResnetDownsampleBlock2D,
  // SimpleCrossAttn*, UNetMidBlock2DSimpleCrossAttn) or only the embeddings refused above read
  // (text/text_time additions, projection class embeddings): with the blocks and embeddings
  // implemented here diffusers never looks at them, whatever their value.
  r.Ignore({"resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm", "mid_block_only_cross_attention",
            "addition_embed_type_num_heads", "addition_time_embed_dim", "projection_class_embeddings_input_dim"});
  r.Finish();

  // Values diffusers would accept but that cannot build a working model.
  auto positive = [&](const char* key, const std::vector<int64_t>& v) {
    for (auto x : v)
      if (x <= 0) r.Fail(key, "every entry must be positive");
  };
  positive("block_out_channels", c.blockOutChannels);
  positive("layers_per_block", c.layersPerBlock);
  positive("attention_head_dim", c.heads);
  positive("transformer_layers_per_block", c.transformerLayersPerBlock);
  positive("in_channels", {c.inChannels});
  positive("out_channels", {c.outChannels});
  positive("norm_num_groups", {c.normNumGroups});
  positive("cross_attention_dim", {c.crossAttentionDim});
  for (auto ch : c.blockOutChannels)
    if (ch % c.normNumGroups != 0) r.Fail("norm_num_groups", "must divide every block_out_channels entry");
  for (int i = 0; i < n; ++i)
    if ((c.downCrossAttn[i] || c.upCrossAttn[n - 1 - i] || (c.hasMidBlock && i == n - 1)) &&
        c.heads[i] > c.blockOutChannels[i])
      r.Fail("attention_head_dim", "more heads than channels in block " + std::to_string(i));
  if (c.convInKernel % 2 == 0 || c.convInKernel <= 0) r.Fail("conv_in_kernel", "must be a positive odd number");
  if (c.convOutKernel % 2 == 0 || c.convOutKernel <= 0) r.Fail("conv_out_kernel", "must be a positive odd number");
  if (c.downsamplePadding < 0) r.Fail("downsample_padding", "must not be negative");
  if (c.midBlockScaleFactor == 0) r.Fail("mid_block_scale_factor", "must not be 0");
  return c;
}

std::optional<TrainableMode> TrainableModeFromName(const std::string& name) {
  if (name == "none") return TrainableMode::None;
  if (name == "crossattn_kv" || name == "crossattn-kv") return TrainableMode::CrossAttnKV;
  if (name == "crossattn") return TrainableMode::CrossAttn;
  return std::nullopt;
}

const char* TrainableModeName(TrainableMode mode) {
  switch (mode) {
    case TrainableMode::CrossAttnKV: return "crossattn_kv";
    case TrainableMode::CrossAttn: return "crossattn";
    case TrainableMode::None: break;
  }
  return "none";
}

bool IsTrainable(TrainableMode mode, const std::string& name) {
  switch (mode) {
    case TrainableMode::CrossAttnKV:
      return name.find("attn2.to_k.") != std::string::npos || name.find("attn2.to_v.") != std::string::npos;
    case TrainableMode::CrossAttn: return name.find("attn2.") != std::string::npos;
    case TrainableMode::None: break;
  }
  return false;
}

UNet2DConditionModel::UNet2DConditionModel(UNetConfig config, Weights weights)
    : config_(std::move(config)),
      timeProj_(config_.blockOutChannels[0], config_.flipSinToCos, config_.freqShift),
      id_(NextModelId()) {
  const UNetConfig& c = config_;
  const int n = static_cast<int>(c.blockOutChannels.size());
  auto root = weights.root();

  convInW_ = root.get("conv_in.weight", {c.blockOutChannels[0], c.inChannels, c.convInKernel, c.convInKernel});
  convInB_ = root.get("conv_in.bias", {c.blockOutChannels[0]});
  timeEmbedding_.emplace(root.sub("time_embedding"), c.blockOutChannels[0], c.timeEmbedDim, c.act, c.timestepPostAct);

  BlockSettings s;
  s.tembChannels = c.timeEmbedDim;
  s.groups = c.normNumGroups;
  s.eps = c.normEps;
  s.act = c.act;
  s.useLinearProjection = c.useLinearProjection;
  s.upcastAttention = c.upcastAttention;
  auto attnFor = [&](bool enabled, int64_t heads, int64_t layers) {
    CrossAttnSettings a;
    a.enabled = enabled;
    a.heads = heads;
    a.crossAttentionDim = c.crossAttentionDim;
    a.transformerLayers = layers;
    return a;
  };

  auto downScope = root.sub("down_blocks");
  int64_t outCh = c.blockOutChannels[0];
  for (int i = 0; i < n; ++i) {
    const int64_t inCh = outCh;
    outCh = c.blockOutChannels[i];
    down_.emplace_back(downScope.sub(i), inCh, outCh, c.layersPerBlock[i], i != n - 1, c.downsamplePadding, s,
                       attnFor(c.downCrossAttn[i], c.heads[i], c.transformerLayersPerBlock[i]));
  }
  if (c.hasMidBlock)
    mid_.emplace(root.sub("mid_block"), c.blockOutChannels[n - 1], c.midBlockScaleFactor, s,
                 attnFor(true, c.heads[n - 1], c.transformerLayersPerBlock[n - 1]));

  // Up blocks mirror the down blocks: every per-block list is read reversed.
  auto upScope = root.sub("up_blocks");
  outCh = c.blockOutChannels[n - 1];
  for (int i = 0; i < n; ++i) {
    const int r = n - 1 - i;
    const int64_t prevOut = outCh;
    outCh = c.blockOutChannels[r];
    const int64_t inCh = c.blockOutChannels[std::max(r - 1, 0)];
    const bool addUpsample = i != n - 1;
    if (addUpsample) ++numUpsamplers_;
    up_.emplace_back(upScope.sub(i), inCh, prevOut, outCh, c.layersPerBlock[r] + 1, addUpsample, s,
                     attnFor(c.upCrossAttn[i], c.heads[r], c.transformerLayersPerBlock[r]));
  }

  normOutW_ = root.get("conv_norm_out.weight", {c.blockOutChannels[0]});
  normOutB_ = root.get("conv_norm_out.bias", {c.blockOutChannels[0]});
  convOutW_ = root.get("conv_out.weight", {c.outChannels, c.blockOutChannels[0], c.convOutKernel, c.convOutKernel});
  convOutB_ = root.get("conv_out.bias", {c.outChannels});

  weights.Finish();
  std::vector<Attention*> cross;
  for (auto& block : down_) block.collectCrossAttention(cross);
  if (mid_) mid_->collectCrossAttention(cross);
  for (auto& block : up_) block.collectCrossAttention(cross);
  for (size_t i = 0; i < cross.size(); ++i) {
    cross[i]->setSlot(static_cast<int64_t>(i));
    crossAttention_.push_back(cross[i]);
  }
  params_ = weights.tensors();
  options_ = at::TensorOptions().dtype(convInW_.scalar_type()).device(convInW_.device());
  for (auto& [name, p] : params_) {
    if (!at::isFloatingType(p.scalar_type()))
      throw Error("MODEL_WEIGHTS", "The weight \"" + name + "\" in " + weights.source() + " is not floating-point",
                  {{"file", weights.source()}});
    if (p.scalar_type() != options_.dtype().toScalarType() || p.device() != options_.device())
      throw Error("MODEL_WEIGHTS", "The weight \"" + name + "\" has another dtype or device than conv_in.weight",
                  {{"file", weights.source()}});
    p.requires_grad_(false);
  }
}

at::Tensor UNet2DConditionModel::forward(const at::Tensor& sample, const at::Tensor& timesteps,
                                         const at::Tensor& encoderHiddenStates, const AttentionOptions& options,
                                         bool gradientCheckpointing, int64_t* checkpointedSegments) const {
  Require(encoderHiddenStates.defined(), "encoder_hidden_states is required");
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return forwardImpl(sample, timesteps, CrossAttentionInput{encoderHiddenStates.to(options_)}, options,
                     gradientCheckpointing, checkpointedSegments);
}

at::Tensor UNet2DConditionModel::forward(const at::Tensor& sample, const at::Tensor& timesteps,
                                         const CrossAttentionContext& context) const {
  Require(context.modelId == id_, "This cross-attention context was prepared by another UNet");
  at::NoGradGuard noGrad;
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return forwardImpl(sample, timesteps, CrossAttentionInput{at::Tensor(), &context}, AttentionOptions{});
}

std::shared_ptr<const CrossAttentionContext> UNet2DConditionModel::prepareContext(
    const at::Tensor& encoderHiddenStates, const std::vector<KVWeights>& weightSets,
    std::vector<int64_t> assignment) const {
  const int64_t dim = config_.crossAttentionDim;
  Require(encoderHiddenStates.defined() && encoderHiddenStates.dim() == 3 && encoderHiddenStates.size(0) > 0 &&
              encoderHiddenStates.size(2) == dim,
          "encoder_hidden_states must have shape [batch, tokens, " + std::to_string(dim) + "] with batch > 0");
  const int64_t batch = encoderHiddenStates.size(0);
  const int64_t sets = static_cast<int64_t>(weightSets.size());
  if (assignment.empty()) {
    Require(sets <= 1, "assignment is required with several weight sets: one set index (or -1) per row");
    assignment.assign(static_cast<size_t>(batch), sets == 1 ? 0 : -1);
  }
  Require(static_cast<int64_t>(assignment.size()) == batch,
          "assignment has " + std::to_string(assignment.size()) + " entries but encoder_hidden_states has " +
              std::to_string(batch) + " rows");
  for (size_t b = 0; b < assignment.size(); ++b)
    Require(assignment[b] >= -1 && assignment[b] < sets,
            "assignment[" + std::to_string(b) + "] is " + std::to_string(assignment[b]) +
                ": expected -1 (the model's own weights) or the index of one of the " + std::to_string(sets) +
                " weight sets");

  // Column 2·slot holds a layer's key weight, 2·slot + 1 its value weight.
  std::map<std::string, size_t> columns;
  for (size_t i = 0; i < crossAttention_.size(); ++i) {
    columns[crossAttention_[i]->prefix() + "to_k.weight"] = 2 * i;
    columns[crossAttention_[i]->prefix() + "to_v.weight"] = 2 * i + 1;
  }
  auto baseWeight = [&](size_t column) -> const at::Tensor& {
    const Attention* layer = crossAttention_[column / 2];
    return column % 2 == 0 ? layer->keyWeight() : layer->valueWeight();
  };
  std::vector<std::vector<at::Tensor>> replaced(weightSets.size(), std::vector<at::Tensor>(columns.size()));
  for (size_t s = 0; s < weightSets.size(); ++s) {
    const std::string where = "weightSets[" + std::to_string(s) + "]";
    for (const auto& [name, w] : weightSets[s]) {
      auto it = columns.find(name);
      if (it == columns.end()) {
        Require(params_.count(name) == 0, where + ": \"" + name +
                                              "\" is not a cross-attention key or value weight; only attn2.to_k.weight "
                                              "and attn2.to_v.weight can differ between rows");
        Require(false, where + ": this UNet has no layer \"" + name + "\"");
      }
      const at::Tensor& base = baseWeight(it->second);
      Require(w.defined() && at::isFloatingType(w.scalar_type()),
              where + ": \"" + name + "\" must be a floating-point tensor");
      Require(w.sizes() == base.sizes(), where + ": \"" + name + "\" has shape " + ShapeText(w.sizes()) +
                                             " but the model's is " + ShapeText(base.sizes()));
      replaced[s][it->second] = w.to(options_);
    }
  }

  at::NoGradGuard noGrad;
  std::shared_lock<std::shared_mutex> lock(mutex_);
  const at::Tensor states = encoderHiddenStates.to(options_);
  const int64_t tokens = states.size(1);
  auto context = std::make_shared<CrossAttentionContext>();
  context->modelId = id_;
  context->batchSize = batch;
  context->tokens = tokens;

  // Rows grouped by the weight they use in one layer, each group gathered once for all layers.
  std::map<std::vector<int64_t>, std::pair<at::Tensor, at::Tensor>> gathered;  // rows → (index, states rows)
  auto project = [&](size_t column) -> at::Tensor {
    const at::Tensor& base = baseWeight(column);
    std::map<int64_t, std::vector<int64_t>> groups;  // set (-1: the model's own weight) → rows
    for (int64_t b = 0; b < batch; ++b) {
      int64_t s = assignment[static_cast<size_t>(b)];
      if (s >= 0 && !replaced[static_cast<size_t>(s)][column].defined()) s = -1;
      groups[s].push_back(b);
    }
    auto weightOf = [&](int64_t s) -> const at::Tensor& {
      return s < 0 ? base : replaced[static_cast<size_t>(s)][column];
    };
    // One weight for the whole batch: the very product forward computes, so the output is bit for bit the same.
    if (groups.size() == 1) return at::linear(states, weightOf(groups.begin()->first));
    at::Tensor out = at::empty({batch, tokens, base.size(0)}, options_);
    for (const auto& [s, rows] : groups) {
      auto& [index, rowStates] = gathered[rows];
      if (!index.defined()) {
        index = at::tensor(rows, at::TensorOptions().dtype(at::kLong)).to(options_.device());
        rowStates = states.index_select(0, index);
      }
      out.index_copy_(0, index, at::linear(rowStates, weightOf(s)));
    }
    return out;
  };
  context->layers.reserve(crossAttention_.size());
  for (size_t i = 0; i < crossAttention_.size(); ++i) {
    const Attention* layer = crossAttention_[i];
    context->layers.push_back({layer->splitHeads(project(2 * i)), layer->splitHeads(project(2 * i + 1))});
  }
  return context;
}

at::Tensor UNet2DConditionModel::forwardImpl(const at::Tensor& sampleIn, const at::Tensor& timestepsIn,
                                             const CrossAttentionInput& context,
                                             const AttentionOptions& options, bool gradientCheckpointing,
                                             int64_t* checkpointedSegments) const {
  const UNetConfig& c = config_;
  Require(sampleIn.defined() && sampleIn.dim() == 4 && sampleIn.size(1) == c.inChannels,
          "sample must have shape [batch, " + std::to_string(c.inChannels) + ", height, width]");
  const int64_t batch = sampleIn.size(0);
  if (context.kv) {
    Require(context.kv->batchSize == batch, "The cross-attention context was prepared for a batch of " +
                                                std::to_string(context.kv->batchSize) + " but sample has a batch of " +
                                                std::to_string(batch));
  } else {
    const at::Tensor& states = context.states;
    Require(states.defined() && states.dim() == 3 && states.size(0) == batch && states.size(2) == c.crossAttentionDim,
            "encoder_hidden_states must have shape [" + std::to_string(batch) + ", tokens, " +
                std::to_string(c.crossAttentionDim) + "]");
  }
  Require(timestepsIn.defined() && timestepsIn.dim() <= 1 &&
              (timestepsIn.numel() == 1 || timestepsIn.numel() == batch),
          "timesteps must be a scalar, a [1] tensor or a [" + std::to_string(batch) + "] tensor");
  Require(!timestepsIn.is_complex() && timestepsIn.scalar_type() != at::kBool, "timesteps must be integer or real");

  at::Tensor x = sampleIn.to(options_);
  if (c.centerInputSample) x = x.mul(2).sub(1.0);

  // Timesteps: a scalar becomes [1], then one value per sample; the sinusoids are computed in float32
  // and cast to the model's dtype, as in get_time_embed.
  at::Tensor t = timestepsIn.to(options_.device()).reshape({-1}).expand({batch});
  at::Tensor emb = timeEmbedding_->forward(timeProj_.forward(t).to(options_.dtype()));
  emb = Activate(c.timeEmbeddingAct, emb);
  const at::Tensor tembAct = Activate(c.act, emb);
  std::optional<GradientCheckpointing> checkpointing;
  if (gradientCheckpointing && at::GradMode::is_enabled()) checkpointing.emplace(params_);
  const BlockInputs in{tembAct, context, options, checkpointing ? &*checkpointing : nullptr};

  const std::vector<int64_t> one{1, 1}, padIn(2, (c.convInKernel - 1) / 2), padOut(2, (c.convOutKernel - 1) / 2);
  x = at::conv2d(x, convInW_, convInB_, one, padIn);
  std::vector<at::Tensor> skips{x};
  for (const auto& block : down_) x = block.forward(x, in, skips);
  if (mid_) x = mid_->forward(x, in);

  // When a side is not a multiple of 2^(upsamplers), ×2 would miss the skip sizes, so every
  // upsampler is given the size of the skip that the next block concatenates first.
  const int64_t factor = int64_t{1} << numUpsamplers_;
  const bool forwardSize = sampleIn.size(2) % factor != 0 || sampleIn.size(3) % factor != 0;
  for (size_t i = 0; i < up_.size(); ++i) {
    std::optional<std::vector<int64_t>> size;
    if (forwardSize && up_[i].hasUpsampler() && skips.size() > up_[i].numLayers()) {
      const at::Tensor& next = skips[skips.size() - up_[i].numLayers() - 1];
      size = std::vector<int64_t>{next.size(2), next.size(3)};
    }
    x = up_[i].forward(x, in, skips, size);
  }

  if (checkpointedSegments) *checkpointedSegments = checkpointing ? checkpointing->segments() : 0;
  x = Activate(c.act, at::group_norm(x, c.normNumGroups, normOutW_, normOutB_, c.normEps));
  return at::conv2d(x, convOutW_, convOutB_, one, padOut);
}

UNet2DConditionModel::BackwardResult UNet2DConditionModel::forwardBackward(
    const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& encoderHiddenStates,
    const at::Tensor& gradOut, const AttentionOptions& options, bool encoderHiddenStatesRequiresGrad,
    bool gradientCheckpointing) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  const TrainableMode mode = mode_.load();
  std::vector<std::pair<std::string, at::Tensor>> trainable;
  for (const auto& [name, p] : params_)
    if (IsTrainable(mode, name)) trainable.emplace_back(name, p);

  // Gradients are handed back, never left behind in .grad (on success or failure).
  auto clearGrads = [&] {
    for (auto& [name, p] : trainable) p.mutable_grad() = at::Tensor();
  };
  clearGrads();
  struct Cleanup {
    std::function<void()> fn;
    ~Cleanup() { fn(); }
  } cleanup{clearGrads};

  Require(encoderHiddenStates.defined(), "encoder_hidden_states is required");
  at::AutoGradMode gradMode(true);
  // A fresh leaf sharing the caller's storage: the caller's tensor is not marked requires_grad.
  at::Tensor context = encoderHiddenStates.to(options_).detach();
  if (encoderHiddenStatesRequiresGrad) context.requires_grad_(true);

  BackwardResult result;
  at::Tensor out = forwardImpl(sample, timesteps, CrossAttentionInput{context}, options, gradientCheckpointing,
                               &result.checkpointedSegments);
  Require(gradOut.defined() && gradOut.sizes() == out.sizes(),
          "gradOut must have the output's shape " + std::string(c10::str(out.sizes())));
  if (out.requires_grad()) out.backward(gradOut.to(out.options()));
  for (auto& [name, p] : trainable) {
    const at::Tensor& g = p.grad();
    result.grads.emplace_back(name, g.defined() ? g : at::zeros_like(p));
  }
  if (encoderHiddenStatesRequiresGrad)
    result.gradEncoderHiddenStates = context.grad().defined() ? context.grad() : at::zeros_like(context);
  result.out = out.detach();
  return result;
}

void UNet2DConditionModel::setTrainable(TrainableMode mode) {
  std::unique_lock<std::shared_mutex> lock(mutex_, std::try_to_lock);
  if (!lock.owns_lock())
    throw Error("MODEL_BUSY",
                "The UNet's trainable parameters cannot change while one of its forward passes is running.");
  for (auto& [name, p] : params_) p.requires_grad_(IsTrainable(mode, name));
  mode_.store(mode);
}

}  // namespace cd::models
