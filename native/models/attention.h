// diffusers models/attention_processor.py `Attention`, as BasicTransformerBlock builds it (attn1 and
// attn2 of the UNet): to_q/to_k/to_v without bias, to_out.0 with bias (to_out.1 is a dropout of 0),
// computed the way the default AttnProcessor2_0 does, through scaled_dot_product_attention.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "models/weights.h"

namespace cd::models {

// Switches that change how a forward pass is computed without changing its values.
struct AttentionOptions {
  // Custom Diffusion's training attention: in cross-attention the key and value rows of token 0
  // (the start token) are detached, so the start token passes no gradient to W_k, W_v or the text
  // encoder while the forward values stay identical.
  bool bosDetach = false;
};

// One cross-attention's keys and values, already split into heads ([B, heads, L, dimHead], the
// layout scaled_dot_product_attention takes).
struct CrossAttentionKV {
  at::Tensor key;
  at::Tensor value;
};

// The keys and values of every cross-attention of one UNet for one batch of text, computed once
// (UNet2DConditionModel::prepareContext) and reused at every denoising step. They depend only on
// the text and the K/V weights, so rows of one batch may come from different weights.
struct CrossAttentionContext {
  uint64_t modelId = 0;  // the UNet that prepared it: the layer order below is that model's
  int64_t batchSize = 0;
  int64_t tokens = 0;
  std::vector<CrossAttentionKV> layers;  // by Attention::slot()
};

// What a cross-attention attends to: the text states, or their keys and values computed in advance.
struct CrossAttentionInput {
  at::Tensor states;  // encoder_hidden_states [B, L, crossAttentionDim]; undefined when kv is set
  const CrossAttentionContext* kv = nullptr;
};

class Attention {
 public:
  // crossAttentionDim 0 builds a self-attention (keys and values come from the query input).
  // The projection is heads·dimHead wide; to_out maps it back to queryDim.
  Attention(const Weights::Scope& scope, int64_t queryDim, int64_t crossAttentionDim, int64_t heads, int64_t dimHead,
            bool upcastAttention);

  // x: [B, N, queryDim]; context: [B, L, crossAttentionDim] (cross) or undefined (self).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context, const AttentionOptions& options) const;
  // Cross-attention on keys and values computed in advance from the context (splitHeads of the
  // to_k / to_v projections). The query path is forward's, so with the same keys and values the
  // result is bit for bit forward's.
  at::Tensor forward(const at::Tensor& x, const CrossAttentionKV& kv) const;

  // [B, L, heads·dimHead] → [B, heads, L, dimHead] as a strided view, exactly as forward does it.
  at::Tensor splitHeads(const at::Tensor& t) const;

  bool isCross() const { return cross_; }
  // The diffusers prefix of the layer's parameters ("mid_block.attentions.0.transformer_blocks.0.attn2.").
  const std::string& prefix() const { return prefix_; }
  const at::Tensor& keyWeight() const { return toK_; }
  const at::Tensor& valueWeight() const { return toV_; }
  // Where this layer's keys and values sit in a CrossAttentionContext (set by the UNet; -1 = none).
  int64_t slot() const { return slot_; }
  void setSlot(int64_t slot) { slot_ = slot; }

 private:
  at::Tensor attend(const at::Tensor& x, const at::Tensor& k, const at::Tensor& v) const;

  std::string prefix_;
  int64_t slot_ = -1;
  at::Tensor toQ_, toK_, toV_, outW_, outB_;
  int64_t heads_;
  int64_t dimHead_;
  bool cross_;
  bool upcast_;
};

}  // namespace cd::models
