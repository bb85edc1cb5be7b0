#include "models/embeddings.h"

#include <cmath>

namespace cd::models {

std::optional<Activation> ActivationFromName(const std::string& name) {
  if (name == "silu" || name == "swish") return Activation::SiLU;
  if (name == "mish") return Activation::Mish;
  if (name == "gelu") return Activation::GELU;
  if (name == "relu") return Activation::ReLU;
  return std::nullopt;
}

at::Tensor Activate(Activation act, const at::Tensor& x) {
  switch (act) {
    case Activation::SiLU: return at::silu(x);
    case Activation::Mish: return at::mish(x);
    case Activation::GELU: return at::gelu(x);
    case Activation::ReLU: return at::relu(x);
    case Activation::None: break;
  }
  return x;
}

at::Tensor Timesteps::forward(const at::Tensor& timesteps) const {
  const int64_t half = channels_ / 2;
  // The same float32 operations in the same order as get_timestep_embedding, so the frequencies
  // round identically: (−ln(10000)·i) / (half − shift), then exp.
  at::Tensor exponent = at::arange(0, half, timesteps.options().dtype(at::kFloat)).mul(-std::log(10000.0));
  exponent = exponent.div(static_cast<double>(half) - shift_);
  at::Tensor freqs = exponent.exp();
  at::Tensor args = timesteps.to(at::kFloat).unsqueeze(1) * freqs.unsqueeze(0);
  at::Tensor emb = flip_ ? at::cat({args.cos(), args.sin()}, -1) : at::cat({args.sin(), args.cos()}, -1);
  if (channels_ % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1, 0, 0});
  return emb;
}

TimestepEmbedding::TimestepEmbedding(const Weights::Scope& scope, int64_t inChannels, int64_t timeEmbedDim,
                                     Activation act, Activation postAct)
    : act_(act), postAct_(postAct) {
  w1_ = scope.get("linear_1.weight", {timeEmbedDim, inChannels});
  b1_ = scope.get("linear_1.bias", {timeEmbedDim});
  w2_ = scope.get("linear_2.weight", {timeEmbedDim, timeEmbedDim});
  b2_ = scope.get("linear_2.bias", {timeEmbedDim});
}

at::Tensor TimestepEmbedding::forward(const at::Tensor& sample) const {
  at::Tensor h = Activate(act_, at::linear(sample, w1_, b1_));
  return Activate(postAct_, at::linear(h, w2_, b2_));
}

}  // namespace cd::models
