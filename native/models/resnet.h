// diffusers models/resnet.py `ResnetBlock2D` (pre-norm, "default" time-embedding norm, no up/down
// inside), models/downsampling.py `Downsample2D` and models/upsampling.py `Upsample2D` with a
// convolution, as the UNet's blocks build them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "models/embeddings.h"
#include "models/weights.h"

namespace cd::models {

class ResnetBlock2D {
 public:
  // tembChannels 0 builds a block without time_emb_proj.
  ResnetBlock2D(const Weights::Scope& scope, int64_t inChannels, int64_t outChannels, int64_t tembChannels,
                int64_t groups, double eps, Activation act, double outputScaleFactor);

  // `tembAct` is the time embedding already passed through the block's nonlinearity: every block of
  // a UNet applies the same activation to the same embedding, so the caller does it once.
  // Dropout is not implemented: the UNet config refuses a non-zero `dropout`.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& tembAct) const;

 private:
  at::Tensor norm1W_, norm1B_, conv1W_, conv1B_, tembW_, tembB_, norm2W_, norm2B_, conv2W_, conv2B_, shortW_,
      shortB_;
  int64_t groups_;
  double eps_;
  Activation act_;
  double outputScale_;
};

// Conv 3×3 with stride 2, named `conv` (diffusers keeps the conv under `.conv` for name="op").
// padding 0 pads right/bottom by one first, as diffusers does.
class Downsample2D {
 public:
  Downsample2D(const Weights::Scope& scope, int64_t channels, int64_t outChannels, int64_t padding);
  at::Tensor forward(const at::Tensor& x) const;

 private:
  at::Tensor w_, b_;
  int64_t padding_;
};

// Nearest-neighbour interpolation (×2, or to `outputSize` when given) followed by a conv 3×3.
class Upsample2D {
 public:
  Upsample2D(const Weights::Scope& scope, int64_t channels, int64_t outChannels);
  at::Tensor forward(const at::Tensor& x, const std::optional<std::vector<int64_t>>& outputSize) const;

 private:
  at::Tensor w_, b_;
};

}  // namespace cd::models
