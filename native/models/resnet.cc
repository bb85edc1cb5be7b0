#include "models/resnet.h"

namespace cd::models {

namespace {
// Square stride and padding, spelled as arrays (a literal 0 would also match conv2d's string-padding overload).
at::Tensor Conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t stride, int64_t padding) {
  const std::vector<int64_t> s{stride, stride}, p{padding, padding};
  return at::conv2d(x, w, b, s, p);
}
}  // namespace

ResnetBlock2D::ResnetBlock2D(const Weights::Scope& scope, int64_t inChannels, int64_t outChannels,
                             int64_t tembChannels, int64_t groups, double eps, Activation act,
                             double outputScaleFactor)
    : groups_(groups), eps_(eps), act_(act), outputScale_(outputScaleFactor) {
  norm1W_ = scope.get("norm1.weight", {inChannels});
  norm1B_ = scope.get("norm1.bias", {inChannels});
  conv1W_ = scope.get("conv1.weight", {outChannels, inChannels, 3, 3});
  conv1B_ = scope.get("conv1.bias", {outChannels});
  if (tembChannels > 0) {
    tembW_ = scope.get("time_emb_proj.weight", {outChannels, tembChannels});
    tembB_ = scope.get("time_emb_proj.bias", {outChannels});
  }
  norm2W_ = scope.get("norm2.weight", {outChannels});
  norm2B_ = scope.get("norm2.bias", {outChannels});
  conv2W_ = scope.get("conv2.weight", {outChannels, outChannels, 3, 3});
  conv2B_ = scope.get("conv2.bias", {outChannels});
  if (inChannels != outChannels) {
    shortW_ = scope.get("conv_shortcut.weight", {outChannels, inChannels, 1, 1});
    shortB_ = scope.get("conv_shortcut.bias", {outChannels});
  }
}

at::Tensor ResnetBlock2D::forward(const at::Tensor& x, const at::Tensor& tembAct) const {
  at::Tensor h = Activate(act_, at::group_norm(x, groups_, norm1W_, norm1B_, eps_));
  h = Conv(h, conv1W_, conv1B_, 1, 1);
  if (tembW_.defined() && tembAct.defined()) h = h + at::linear(tembAct, tembW_, tembB_).unsqueeze(-1).unsqueeze(-1);
  h = Activate(act_, at::group_norm(h, groups_, norm2W_, norm2B_, eps_));
  h = Conv(h, conv2W_, conv2B_, 1, 1);
  at::Tensor shortcut = shortW_.defined() ? Conv(x, shortW_, shortB_, 1, 0) : x;
  at::Tensor out = shortcut + h;
  // x / 1.0 is exact, so the common case skips the division.
  return outputScale_ == 1.0 ? out : out / outputScale_;
}

Downsample2D::Downsample2D(const Weights::Scope& scope, int64_t channels, int64_t outChannels, int64_t padding)
    : padding_(padding) {
  w_ = scope.get("conv.weight", {outChannels, channels, 3, 3});
  b_ = scope.get("conv.bias", {outChannels});
}

at::Tensor Downsample2D::forward(const at::Tensor& x) const {
  if (padding_ == 0) return Conv(at::constant_pad_nd(x, {0, 1, 0, 1}), w_, b_, 2, 0);
  return Conv(x, w_, b_, 2, padding_);
}

Upsample2D::Upsample2D(const Weights::Scope& scope, int64_t channels, int64_t outChannels) {
  w_ = scope.get("conv.weight", {outChannels, channels, 3, 3});
  b_ = scope.get("conv.bias", {outChannels});
}

at::Tensor Upsample2D::forward(const at::Tensor& x, const std::optional<std::vector<int64_t>>& outputSize) const {
  at::Tensor h;
  if (outputSize) {
    // F.interpolate(size=...): source index = floor(dst · in/out), which is what lets odd latent
    // sizes meet the skip connections (2×3 → 3×5).
    h = at::upsample_nearest2d(x, *outputSize);
  } else {
    const std::vector<int64_t> size{x.size(2) * 2, x.size(3) * 2};
    h = at::upsample_nearest2d(x, size, 2.0, 2.0);
  }
  return Conv(h, w_, b_, 1, 1);
}

}  // namespace cd::models
