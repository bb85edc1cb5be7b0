// diffusers models/transformers/transformer_2d.py `Transformer2DModel` for continuous (latent image)
// input, and models/attention.py `BasicTransformerBlock` with layer_norm, GEGLU feed-forward and no
// attention bias: the spatial transformer of Stable Diffusion's UNet.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "models/attention.h"
#include "models/weights.h"

namespace cd::models {

class BasicTransformerBlock {
 public:
  BasicTransformerBlock(const Weights::Scope& scope, int64_t dim, int64_t heads, int64_t dimHead,
                        int64_t crossAttentionDim, bool upcastAttention);
  // x: [B, N, dim]; context: [B, L, crossAttentionDim] or its keys and values.
  at::Tensor forward(const at::Tensor& x, const CrossAttentionInput& context, const AttentionOptions& options) const;
  Attention& crossAttention() { return attn2_; }

 private:
  at::Tensor norm1W_, norm1B_, norm2W_, norm2B_, norm3W_, norm3B_;
  Attention attn1_, attn2_;
  at::Tensor ffInW_, ffInB_, ffOutW_, ffOutB_;
  int64_t dim_;
};

class Transformer2DModel {
 public:
  Transformer2DModel(const Weights::Scope& scope, int64_t heads, int64_t dimHead, int64_t inChannels,
                     int64_t numLayers, int64_t crossAttentionDim, int64_t normGroups, bool useLinearProjection,
                     bool upcastAttention);
  // x: [B, C, H, W] → [B, C, H, W] (with the residual added).
  at::Tensor forward(const at::Tensor& x, const CrossAttentionInput& context, const AttentionOptions& options) const;
  // Appends each block's attn2, in forward order.
  void collectCrossAttention(std::vector<Attention*>& out);

 private:
  at::Tensor normW_, normB_, projInW_, projInB_, projOutW_, projOutB_;
  std::vector<BasicTransformerBlock> blocks_;
  int64_t inner_;
  int64_t groups_;
  bool linear_;
};

}  // namespace cd::models
