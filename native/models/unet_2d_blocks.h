// diffusers models/unets/unet_2d_blocks.py: CrossAttnDownBlock2D / DownBlock2D,
// UNetMidBlock2DCrossAttn and CrossAttnUpBlock2D / UpBlock2D. A plain block is its cross-attention
// twin without the `attentions`, so each pair shares one class here.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "models/attention.h"
#include "models/checkpoint.h"
#include "models/embeddings.h"
#include "models/resnet.h"
#include "models/transformer_2d.h"
#include "models/weights.h"

namespace cd::models {

// What every block of one UNet shares.
struct BlockSettings {
  int64_t tembChannels = 0;
  int64_t groups = 32;
  double eps = 1e-5;
  Activation act = Activation::SiLU;
  bool useLinearProjection = false;
  bool upcastAttention = false;
};

// What a cross-attention block adds (ignored for a plain block).
struct CrossAttnSettings {
  bool enabled = false;
  int64_t heads = 1;  // the config's attention_head_dim entry: a number of heads
  int64_t crossAttentionDim = 0;
  int64_t transformerLayers = 1;
};

// The per-call state a block needs besides its input.
struct BlockInputs {
  const at::Tensor& tembAct;  // the time embedding after the resnets' nonlinearity
  const CrossAttentionInput& context;  // encoder_hidden_states, or their keys and values
  const AttentionOptions& attention;
  // Training with gradient checkpointing: each resnet and transformer is a checkpointed segment
  // (the context must be encoder_hidden_states, not prepared keys and values).
  const GradientCheckpointing* checkpointing = nullptr;
};

// One resnet or transformer of a block, with its diffusers prefix (which finds its trainable
// parameters for checkpointing). A block runs its layers through these.
struct BlockResnet {
  ResnetBlock2D module;
  std::string prefix;
  at::Tensor forward(const at::Tensor& x, const BlockInputs& in) const;
};
struct BlockTransformer {
  Transformer2DModel module;
  std::string prefix;
  at::Tensor forward(const at::Tensor& x, const BlockInputs& in) const;
};

class DownBlock {
 public:
  // CrossAttnDownBlock2D when attn.enabled, else DownBlock2D.
  DownBlock(const Weights::Scope& scope, int64_t inChannels, int64_t outChannels, int64_t numLayers,
            bool addDownsample, int64_t downsamplePadding, const BlockSettings& settings,
            const CrossAttnSettings& attn);
  // Appends each resnet(+attention) output and the downsampler's output to `skips`.
  at::Tensor forward(at::Tensor x, const BlockInputs& in, std::vector<at::Tensor>& skips) const;
  // Appends every attn2 of the block, in forward order.
  void collectCrossAttention(std::vector<Attention*>& out);

 private:
  std::vector<BlockResnet> resnets_;
  std::vector<BlockTransformer> attentions_;
  std::optional<Downsample2D> downsampler_;
};

class UNetMidBlock2DCrossAttn {
 public:
  UNetMidBlock2DCrossAttn(const Weights::Scope& scope, int64_t channels, double outputScaleFactor,
                          const BlockSettings& settings, const CrossAttnSettings& attn);
  at::Tensor forward(at::Tensor x, const BlockInputs& in) const;
  void collectCrossAttention(std::vector<Attention*>& out);

 private:
  std::vector<BlockResnet> resnets_;
  std::vector<BlockTransformer> attentions_;
};

class UpBlock {
 public:
  // CrossAttnUpBlock2D when attn.enabled, else UpBlock2D. Resnet i takes the running tensor
  // (prevOutputChannels for i = 0, else outChannels) concatenated with a skip (inChannels for the
  // last, else outChannels).
  UpBlock(const Weights::Scope& scope, int64_t inChannels, int64_t prevOutputChannels, int64_t outChannels,
          int64_t numLayers, bool addUpsample, const BlockSettings& settings, const CrossAttnSettings& attn);
  // Pops one skip per resnet from the end of `skips`.
  at::Tensor forward(at::Tensor x, const BlockInputs& in, std::vector<at::Tensor>& skips,
                     const std::optional<std::vector<int64_t>>& upsampleSize) const;
  void collectCrossAttention(std::vector<Attention*>& out);
  size_t numLayers() const { return resnets_.size(); }
  bool hasUpsampler() const { return upsampler_.has_value(); }

 private:
  std::vector<BlockResnet> resnets_;
  std::vector<BlockTransformer> attentions_;
  std::optional<Upsample2D> upsampler_;
};

}  // namespace cd::models
