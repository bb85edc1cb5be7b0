#include "models/transformer_2d.h"

namespace cd::models {

namespace {
// BasicTransformerBlock's LayerNorms (norm_eps of Transformer2DModel, which the UNet leaves at 1e-5).
constexpr double kLayerNormEps = 1e-5;
// Transformer2DModel's GroupNorm is built with eps 1e-6 whatever the UNet's norm_eps.
constexpr double kGroupNormEps = 1e-6;
}  // namespace

BasicTransformerBlock::BasicTransformerBlock(const Weights::Scope& scope, int64_t dim, int64_t heads,
                                             int64_t dimHead, int64_t crossAttentionDim, bool upcastAttention)
    : attn1_(scope.sub("attn1"), dim, 0, heads, dimHead, upcastAttention),
      attn2_(scope.sub("attn2"), dim, crossAttentionDim, heads, dimHead, upcastAttention),
      dim_(dim) {
  norm1W_ = scope.get("norm1.weight", {dim});
  norm1B_ = scope.get("norm1.bias", {dim});
  norm2W_ = scope.get("norm2.weight", {dim});
  norm2B_ = scope.get("norm2.bias", {dim});
  norm3W_ = scope.get("norm3.weight", {dim});
  norm3B_ = scope.get("norm3.bias", {dim});
  // FeedForward(dim, mult=4, "geglu"): net.0 is GEGLU's projection to 2·4·dim, net.1 a dropout of 0.
  const int64_t ffInner = 4 * dim;
  ffInW_ = scope.get("ff.net.0.proj.weight", {2 * ffInner, dim});
  ffInB_ = scope.get("ff.net.0.proj.bias", {2 * ffInner});
  ffOutW_ = scope.get("ff.net.2.weight", {dim, ffInner});
  ffOutB_ = scope.get("ff.net.2.bias", {dim});
}

at::Tensor BasicTransformerBlock::forward(const at::Tensor& x, const CrossAttentionInput& context,
                                          const AttentionOptions& options) const {
  const std::vector<int64_t> shape{dim_};
  at::Tensor h = attn1_.forward(at::layer_norm(x, shape, norm1W_, norm1B_, kLayerNormEps), at::Tensor(), options) + x;
  at::Tensor n = at::layer_norm(h, shape, norm2W_, norm2B_, kLayerNormEps);
  h = (context.kv ? attn2_.forward(n, context.kv->layers.at(static_cast<size_t>(attn2_.slot())))
                  : attn2_.forward(n, context.states, options)) +
      h;
  // GEGLU: the projection's first half is the value, the second half the gate (exact-erf GELU).
  at::Tensor proj = at::linear(at::layer_norm(h, shape, norm3W_, norm3B_, kLayerNormEps), ffInW_, ffInB_);
  auto halves = proj.chunk(2, -1);
  at::Tensor ff = at::linear(halves[0] * at::gelu(halves[1]), ffOutW_, ffOutB_);
  return ff + h;
}

Transformer2DModel::Transformer2DModel(const Weights::Scope& scope, int64_t heads, int64_t dimHead,
                                       int64_t inChannels, int64_t numLayers, int64_t crossAttentionDim,
                                       int64_t normGroups, bool useLinearProjection, bool upcastAttention)
    : inner_(heads * dimHead), groups_(normGroups), linear_(useLinearProjection) {
  normW_ = scope.get("norm.weight", {inChannels});
  normB_ = scope.get("norm.bias", {inChannels});
  if (linear_) {
    projInW_ = scope.get("proj_in.weight", {inner_, inChannels});
    projOutW_ = scope.get("proj_out.weight", {inChannels, inner_});
  } else {
    projInW_ = scope.get("proj_in.weight", {inner_, inChannels, 1, 1});
    projOutW_ = scope.get("proj_out.weight", {inChannels, inner_, 1, 1});
  }
  projInB_ = scope.get("proj_in.bias", {inner_});
  projOutB_ = scope.get("proj_out.bias", {inChannels});
  auto blocks = scope.sub("transformer_blocks");
  blocks_.reserve(static_cast<size_t>(numLayers));
  for (int64_t i = 0; i < numLayers; ++i)
    blocks_.emplace_back(blocks.sub(static_cast<int>(i)), inner_, heads, dimHead, crossAttentionDim, upcastAttention);
}

void Transformer2DModel::collectCrossAttention(std::vector<Attention*>& out) {
  for (auto& block : blocks_) out.push_back(&block.crossAttention());
}

at::Tensor Transformer2DModel::forward(const at::Tensor& x, const CrossAttentionInput& context,
                                       const AttentionOptions& options) const {
  const int64_t batch = x.size(0), height = x.size(2), width = x.size(3);
  at::Tensor h = at::group_norm(x, groups_, normW_, normB_, kGroupNormEps);
  // SD1 projects with a 1×1 conv before flattening to tokens, SD2 with a Linear after; the order of
  // the reshape matters only for which weight layout is read.
  if (!linear_) {
    h = at::conv2d(h, projInW_, projInB_);
    h = h.permute({0, 2, 3, 1}).reshape({batch, height * width, inner_});
  } else {
    h = h.permute({0, 2, 3, 1}).reshape({batch, height * width, x.size(1)});
    h = at::linear(h, projInW_, projInB_);
  }
  for (const auto& block : blocks_) h = block.forward(h, context, options);
  if (!linear_) {
    h = h.reshape({batch, height, width, inner_}).permute({0, 3, 1, 2}).contiguous();
    h = at::conv2d(h, projOutW_, projOutB_);
  } else {
    h = at::linear(h, projOutW_, projOutB_);
    h = h.reshape({batch, height, width, x.size(1)}).permute({0, 3, 1, 2}).contiguous();
  }
  return h + x;
}

}  // namespace cd::models
