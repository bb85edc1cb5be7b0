#include "models/unet_2d_blocks.h"

#include "core/errors.h"

namespace cd::models {

namespace {
BlockTransformer MakeTransformer(const Weights::Scope& scope, int64_t channels, const BlockSettings& s,
                                 const CrossAttnSettings& a) {
  // Blocks build Transformer2DModel(heads, channels // heads): the config's "head dim" is a count.
  return {Transformer2DModel(scope, a.heads, channels / a.heads, channels, a.transformerLayers, a.crossAttentionDim,
                             s.groups, s.useLinearProjection, s.upcastAttention),
          scope.prefix()};
}

BlockResnet MakeResnet(const Weights::Scope& scope, int64_t inChannels, int64_t outChannels, const BlockSettings& s,
                       double outputScaleFactor) {
  return {ResnetBlock2D(scope, inChannels, outChannels, s.tembChannels, s.groups, s.eps, s.act, outputScaleFactor),
          scope.prefix()};
}
}  // namespace

at::Tensor BlockResnet::forward(const at::Tensor& x, const BlockInputs& in) const {
  if (!in.checkpointing) return module.forward(x, in.tembAct);
  const ResnetBlock2D* m = &module;
  return in.checkpointing->run([m](const std::vector<at::Tensor>& v) { return m->forward(v[0], v[1]); },
                               {x, in.tembAct}, prefix);
}

at::Tensor BlockTransformer::forward(const at::Tensor& x, const BlockInputs& in) const {
  if (!in.checkpointing) return module.forward(x, in.context, in.attention);
  Require(!in.context.kv, "Gradient checkpointing needs encoder_hidden_states, not prepared keys and values");
  const Transformer2DModel* m = &module;
  const AttentionOptions options = in.attention;  // by value: the backward runs after this call returns
  return in.checkpointing->run(
      [m, options](const std::vector<at::Tensor>& v) { return m->forward(v[0], CrossAttentionInput{v[1]}, options); },
      {x, in.context.states}, prefix);
}

void DownBlock::collectCrossAttention(std::vector<Attention*>& out) {
  for (auto& a : attentions_) a.module.collectCrossAttention(out);
}

void UNetMidBlock2DCrossAttn::collectCrossAttention(std::vector<Attention*>& out) {
  for (auto& a : attentions_) a.module.collectCrossAttention(out);
}

void UpBlock::collectCrossAttention(std::vector<Attention*>& out) {
  for (auto& a : attentions_) a.module.collectCrossAttention(out);
}

DownBlock::DownBlock(const Weights::Scope& scope, int64_t inChannels, int64_t outChannels, int64_t numLayers,
                     bool addDownsample, int64_t downsamplePadding, const BlockSettings& s,
                     const CrossAttnSettings& a) {
  auto resnets = scope.sub("resnets");
  auto attentions = scope.sub("attentions");
  for (int64_t i = 0; i < numLayers; ++i) {
    resnets_.push_back(MakeResnet(resnets.sub(static_cast<int>(i)), i == 0 ? inChannels : outChannels, outChannels,
                                  s, 1.0));
    if (a.enabled) attentions_.push_back(MakeTransformer(attentions.sub(static_cast<int>(i)), outChannels, s, a));
  }
  if (addDownsample)
    downsampler_.emplace(scope.sub("downsamplers").sub(0), outChannels, outChannels, downsamplePadding);
}

at::Tensor DownBlock::forward(at::Tensor x, const BlockInputs& in, std::vector<at::Tensor>& skips) const {
  for (size_t i = 0; i < resnets_.size(); ++i) {
    x = resnets_[i].forward(x, in);
    if (!attentions_.empty()) x = attentions_[i].forward(x, in);
    skips.push_back(x);
  }
  if (downsampler_) {
    x = downsampler_->forward(x);
    skips.push_back(x);
  }
  return x;
}

UNetMidBlock2DCrossAttn::UNetMidBlock2DCrossAttn(const Weights::Scope& scope, int64_t channels,
                                                 double outputScaleFactor, const BlockSettings& s,
                                                 const CrossAttnSettings& a) {
  auto resnets = scope.sub("resnets");
  // num_layers is 1: resnet, then (attention, resnet) once.
  for (int i = 0; i < 2; ++i)
    resnets_.push_back(MakeResnet(resnets.sub(i), channels, channels, s, outputScaleFactor));
  attentions_.push_back(MakeTransformer(scope.sub("attentions").sub(0), channels, s, a));
}

at::Tensor UNetMidBlock2DCrossAttn::forward(at::Tensor x, const BlockInputs& in) const {
  x = resnets_[0].forward(x, in);
  for (size_t i = 0; i < attentions_.size(); ++i) {
    x = attentions_[i].forward(x, in);
    x = resnets_[i + 1].forward(x, in);
  }
  return x;
}

UpBlock::UpBlock(const Weights::Scope& scope, int64_t inChannels, int64_t prevOutputChannels, int64_t outChannels,
                 int64_t numLayers, bool addUpsample, const BlockSettings& s, const CrossAttnSettings& a) {
  auto resnets = scope.sub("resnets");
  auto attentions = scope.sub("attentions");
  for (int64_t i = 0; i < numLayers; ++i) {
    const int64_t skipChannels = i == numLayers - 1 ? inChannels : outChannels;
    const int64_t resnetIn = i == 0 ? prevOutputChannels : outChannels;
    resnets_.push_back(MakeResnet(resnets.sub(static_cast<int>(i)), resnetIn + skipChannels, outChannels, s, 1.0));
    if (a.enabled) attentions_.push_back(MakeTransformer(attentions.sub(static_cast<int>(i)), outChannels, s, a));
  }
  if (addUpsample) upsampler_.emplace(scope.sub("upsamplers").sub(0), outChannels, outChannels);
}

at::Tensor UpBlock::forward(at::Tensor x, const BlockInputs& in, std::vector<at::Tensor>& skips,
                            const std::optional<std::vector<int64_t>>& upsampleSize) const {
  for (size_t i = 0; i < resnets_.size(); ++i) {
    at::Tensor skip = std::move(skips.back());
    skips.pop_back();
    // [running, skip] in that order: the resnet's weights expect the running channels first.
    x = resnets_[i].forward(at::cat({x, skip}, 1), in);
    if (!attentions_.empty()) x = attentions_[i].forward(x, in);
  }
  if (upsampler_) x = upsampler_->forward(x, upsampleSize);
  return x;
}

}  // namespace cd::models
