// diffusers models/embeddings.py: the sinusoidal `Timesteps` projection and the `TimestepEmbedding`
// MLP (linear_1, activation, linear_2) of the UNet; and the activations of models/activations.py
// `get_activation`, which the UNet's config names by string.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "models/weights.h"

namespace cd::models {

enum class Activation { None, SiLU, Mish, GELU, ReLU };

// "silu"/"swish", "mish", "gelu" (exact erf form), "relu"; nullopt for any other name.
std::optional<Activation> ActivationFromName(const std::string& name);
at::Tensor Activate(Activation act, const at::Tensor& x);

// Timesteps(num_channels, flip_sin_to_cos, downscale_freq_shift) with scale 1 and max_period 10000.
class Timesteps {
 public:
  Timesteps(int64_t numChannels, bool flipSinToCos, double downscaleFreqShift)
      : channels_(numChannels), flip_(flipSinToCos), shift_(downscaleFreqShift) {}
  // timesteps: [B] of any real or integer dtype → [B, numChannels] float32 (like diffusers, always
  // float32; the caller casts to the model dtype).
  at::Tensor forward(const at::Tensor& timesteps) const;

 private:
  int64_t channels_;
  bool flip_;
  double shift_;
};

class TimestepEmbedding {
 public:
  TimestepEmbedding(const Weights::Scope& scope, int64_t inChannels, int64_t timeEmbedDim, Activation act,
                    Activation postAct);
  at::Tensor forward(const at::Tensor& sample) const;

 private:
  at::Tensor w1_, b1_, w2_, b2_;
  Activation act_, postAct_;
};

}  // namespace cd::models
