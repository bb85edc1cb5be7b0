// diffusers models/attention_processor.py `Attention`, as BasicTransformerBlock builds it (attn1 and
// attn2 of the UNet): to_q/to_k/to_v without bias, to_out.0 with bias (to_out.1 is a dropout of 0),
// computed the way the default AttnProcessor2_0 does, through scaled_dot_product_attention.
#pragma once

#include <ATen/ATen.h>

#include "models/weights.h"

namespace cd::models {

// Switches that change how a forward pass is computed without changing its values.
struct AttentionOptions {
  // Custom Diffusion's training attention: in cross-attention the key and value rows of token 0
  // (the start token) are detached, so the start token passes no gradient to W_k, W_v or the text
  // encoder while the forward values stay identical.
  bool bosDetach = false;
};

class Attention {
 public:
  // crossAttentionDim 0 builds a self-attention (keys and values come from the query input).
  // The projection is heads·dimHead wide; to_out maps it back to queryDim.
  Attention(const Weights::Scope& scope, int64_t queryDim, int64_t crossAttentionDim, int64_t heads, int64_t dimHead,
            bool upcastAttention);

  // x: [B, N, queryDim]; context: [B, L, crossAttentionDim] (cross) or undefined (self).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context, const AttentionOptions& options) const;

  bool isCross() const { return cross_; }

 private:
  at::Tensor toQ_, toK_, toV_, outW_, outB_;
  int64_t heads_;
  int64_t dimHead_;
  bool cross_;
  bool upcast_;
};

}  // namespace cd::models
