// diffusers models/unets/unet_2d_condition.py `UNet2DConditionModel`: Stable Diffusion's denoiser,
// built from a diffusers config.json and a state dict with diffusers' parameter names. Only the
// options Stable Diffusion 1.x/2.x use are implemented; every other option that changes the
// computation is refused when the config is read (MODEL_CONFIG), never silently ignored.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <utility>
#include <vector>

#include "models/attention.h"
#include "models/embeddings.h"
#include "models/unet_2d_blocks.h"
#include "models/weights.h"

namespace cd::models {

struct UNetConfig {
  int64_t inChannels = 4;
  int64_t outChannels = 4;
  bool centerInputSample = false;
  bool flipSinToCos = true;
  double freqShift = 0;
  std::vector<bool> downCrossAttn;  // per down block: CrossAttnDownBlock2D (true) or DownBlock2D
  std::vector<bool> upCrossAttn;    // per up block: CrossAttnUpBlock2D (true) or UpBlock2D
  bool hasMidBlock = true;          // UNetMidBlock2DCrossAttn, or none (mid_block_type null)
  std::vector<int64_t> blockOutChannels;
  std::vector<int64_t> layersPerBlock;
  int64_t downsamplePadding = 1;
  double midBlockScaleFactor = 1;
  Activation act = Activation::SiLU;
  int64_t normNumGroups = 32;
  double normEps = 1e-5;
  int64_t crossAttentionDim = 1280;
  std::vector<int64_t> transformerLayersPerBlock;
  std::vector<int64_t> heads;  // the config's attention_head_dim: heads per down block
  bool useLinearProjection = false;
  bool upcastAttention = false;
  int64_t timeEmbedDim = 0;  // time_embedding_dim, or 4·block_out_channels[0]
  Activation timeEmbeddingAct = Activation::None;
  Activation timestepPostAct = Activation::None;
  int64_t convInKernel = 3;
  int64_t convOutKernel = 3;
  std::vector<int64_t> sampleSize;  // [] (absent), [s] or [h, w]; a default size hint only

  // Reads config.json text strictly (see ConfigReader). `file` names it in errors.
  static UNetConfig Parse(const std::string& text, const std::string& file);
};

// Which parameters train (Custom Diffusion's freeze_model).
enum class TrainableMode { None, CrossAttnKV, CrossAttn };
std::optional<TrainableMode> TrainableModeFromName(const std::string& name);
const char* TrainableModeName(TrainableMode mode);
// The rule itself, on diffusers names: crossattn_kv trains attn2.to_k / attn2.to_v, crossattn every attn2 tensor.
bool IsTrainable(TrainableMode mode, const std::string& name);

class UNet2DConditionModel {
 public:
  // Builds every module from `weights` (which must match the config exactly: Finish() reports every
  // missing, unexpected or mis-shaped key in one MODEL_WEIGHTS error).
  UNet2DConditionModel(UNetConfig config, Weights weights);

  // sample [B, in, H, W]; timesteps: [B], [1] or a scalar, integer or real (broadcast over the batch as
  // diffusers does); encoderHiddenStates [B, L, cross_attention_dim]. Inputs are moved to the model's
  // device and dtype. Records autograd if grad mode is on (the caller chooses: inference wraps it in
  // at::NoGradGuard). Takes the model's lock shared.
  // With gradientCheckpointing (and grad mode on), every resnet and transformer of the blocks keeps
  // only its inputs and runs again in the backward (diffusers' enable_gradient_checkpointing()).
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& encoderHiddenStates,
                     const AttentionOptions& options = {}, bool gradientCheckpointing = false,
                     int64_t* checkpointedSegments = nullptr) const;
  // The same pass with every cross-attention's keys and values taken from `context` (made by this
  // model's prepareContext for a batch of sample's size). Inference only: no autograd is recorded.
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timesteps, const CrossAttentionContext& context) const;

  // A replacement for some cross-attention K/V weights, by diffusers name
  // ("….attn2.to_k.weight" / "….attn2.to_v.weight").
  using KVWeights = std::map<std::string, at::Tensor>;
  // Computes the keys and values of every cross-attention for encoderHiddenStates [B, L, D] once,
  // so a sampling loop does not recompute them at each step. Row b uses weightSets[assignment[b]]
  // for the layers that set has and the model's own weights elsewhere (assignment -1: the model's
  // own everywhere), so concepts with different weights share one batch: each layer does one
  // product per distinct weight among the rows. An empty assignment means all -1 with no weight
  // sets, all 0 with one. The result holds the weights as they are now (an applied delta is seen
  // only by contexts prepared after it). Throws INVALID_ARGUMENT naming any mismatch.
  std::shared_ptr<const CrossAttentionContext> prepareContext(const at::Tensor& encoderHiddenStates,
                                                              const std::vector<KVWeights>& weightSets,
                                                              std::vector<int64_t> assignment) const;

  struct BackwardResult {
    at::Tensor out;
    std::vector<std::pair<std::string, at::Tensor>> grads;  // exactly the trainable parameters, in name order
    at::Tensor gradEncoderHiddenStates;                    // defined when asked for
    int64_t checkpointedSegments = 0;                      // resnets and transformers run checkpointed
  };
  // forward, then backward of sum(out · gradOut). The parameters' .grad fields are empty before and
  // after the call; the gradients are handed back instead. Takes the model's lock exclusively.
  BackwardResult forwardBackward(const at::Tensor& sample, const at::Tensor& timesteps,
                                 const at::Tensor& encoderHiddenStates, const at::Tensor& gradOut,
                                 const AttentionOptions& options, bool encoderHiddenStatesRequiresGrad,
                                 bool gradientCheckpointing = false);

  // Sets requires_grad on exactly the parameters of `mode` (all others off, so autograd does no work
  // for frozen weights). Throws MODEL_BUSY when a forward pass is running.
  void setTrainable(TrainableMode mode);
  TrainableMode trainable() const { return mode_.load(); }

  // Every parameter by diffusers name (the tensors the modules compute with).
  const std::map<std::string, at::Tensor>& parameters() const { return params_; }
  const UNetConfig& config() const { return config_; }
  at::TensorOptions options() const { return options_; }

 private:
  at::Tensor forwardImpl(const at::Tensor& sample, const at::Tensor& timesteps, const CrossAttentionInput& context,
                         const AttentionOptions& options, bool gradientCheckpointing = false,
                         int64_t* checkpointedSegments = nullptr) const;

  UNetConfig config_;
  at::TensorOptions options_;
  at::Tensor convInW_, convInB_;
  Timesteps timeProj_;
  std::optional<TimestepEmbedding> timeEmbedding_;
  std::vector<DownBlock> down_;
  std::optional<UNetMidBlock2DCrossAttn> mid_;
  std::vector<UpBlock> up_;
  at::Tensor normOutW_, normOutB_, convOutW_, convOutB_;
  int64_t numUpsamplers_ = 0;
  std::vector<const Attention*> crossAttention_;  // by slot
  const uint64_t id_;
  std::map<std::string, at::Tensor> params_;
  std::atomic<TrainableMode> mode_{TrainableMode::None};
  mutable std::shared_mutex mutex_;
};

}  // namespace cd::models
