#include "models/attention.h"

namespace cd::models {

Attention::Attention(const Weights::Scope& scope, int64_t queryDim, int64_t crossAttentionDim, int64_t heads,
                     int64_t dimHead, bool upcastAttention)
    : prefix_(scope.prefix()),
      heads_(heads),
      dimHead_(dimHead),
      cross_(crossAttentionDim > 0),
      upcast_(upcastAttention) {
  const int64_t inner = heads * dimHead;
  const int64_t kvIn = cross_ ? crossAttentionDim : queryDim;
  toQ_ = scope.get("to_q.weight", {inner, queryDim});
  toK_ = scope.get("to_k.weight", {inner, kvIn});
  toV_ = scope.get("to_v.weight", {inner, kvIn});
  outW_ = scope.get("to_out.0.weight", {queryDim, inner});
  outB_ = scope.get("to_out.0.bias", {queryDim});
}

at::Tensor Attention::forward(const at::Tensor& x, const at::Tensor& context, const AttentionOptions& options) const {
  const at::Tensor& kvInput = cross_ ? context : x;
  at::Tensor k = at::linear(kvInput, toK_);
  at::Tensor v = at::linear(kvInput, toV_);

  if (cross_ && options.bosDetach) {
    // Same values, but the autograd graph of row 0 is cut. diffusers writes this as
    // m·k + (1−m)·k.detach(); a concatenation gives identical numbers without the two extra products.
    const int64_t len = k.size(1);
    if (len == 1) {
      k = k.detach();
      v = v.detach();
    } else {
      k = at::cat({k.narrow(1, 0, 1).detach(), k.narrow(1, 1, len - 1)}, 1);
      v = at::cat({v.narrow(1, 0, 1).detach(), v.narrow(1, 1, len - 1)}, 1);
    }
  }
  return attend(x, splitHeads(k), splitHeads(v));
}

at::Tensor Attention::forward(const at::Tensor& x, const CrossAttentionKV& kv) const {
  return attend(x, kv.key, kv.value);
}

// The views of AttnProcessor2_0: SDPA accepts these strides, so no copy is made here.
at::Tensor Attention::splitHeads(const at::Tensor& t) const {
  return t.view({t.size(0), -1, heads_, dimHead_}).transpose(1, 2);
}

at::Tensor Attention::attend(const at::Tensor& x, const at::Tensor& k, const at::Tensor& v) const {
  const int64_t batch = x.size(0);
  at::Tensor q = splitHeads(at::linear(x, toQ_));

  const auto dtype = q.scalar_type();
  at::Tensor h;
  if (upcast_ && (dtype == at::kHalf || dtype == at::kBFloat16)) {
    // upcast_attention (SD 2.1): q·kᵀ and the softmax overflow float16 in some layers, so they are
    // computed in float32 and only the result returns to the model's precision.
    h = at::scaled_dot_product_attention(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat)).to(dtype);
  } else {
    h = at::scaled_dot_product_attention(q, k, v);
  }
  h = h.transpose(1, 2).reshape({batch, -1, heads_ * dimHead_});
  return at::linear(h, outW_, outB_);
}

}  // namespace cd::models
