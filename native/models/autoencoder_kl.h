// AutoencoderKL as diffusers defines it (models/autoencoders/autoencoder_kl.py and vae.py), with its
// parameter names, so a Stable Diffusion `vae/` folder loads as it is.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/async.h"
#include "models/config.h"
#include "models/weights.h"

namespace cd::models {

struct AutoencoderKLConfig {
  int in_channels = 3;
  int out_channels = 3;
  int latent_channels = 4;
  std::vector<int> block_out_channels = {64};
  int layers_per_block = 1;
  int norm_num_groups = 32;
  int sample_size = 32;
  double scaling_factor = 0.18215;
  bool force_upcast = true;
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;
  bool mid_block_add_attention = true;

  // Reads a diffusers AutoencoderKL config strictly (defaults are diffusers' own).
  static AutoencoderKLConfig Read(ConfigReader& r);
};

class AutoencoderKL {
 public:
  // Builds over `weights` (old `query/key/value/proj_attn` attention names are accepted) and calls
  // weights.Finish().
  AutoencoderKL(const AutoencoderKLConfig& config, Weights weights);

  // Builds the model from its config.json text and weights files (safetensors or torch.save
  // pickles; the TypeScript side picks them), converting floating-point weights to `dtype` on `device`.
  static std::shared_ptr<AutoencoderKL> Load(const std::string& configText, const std::string& configFile,
                                             const std::vector<std::string>& weightFiles, at::ScalarType dtype,
                                             c10::Device device);

  struct Posterior {
    at::Tensor mean, logvar, std;  // logvar clamped to [-30, 20]; std = exp(logvar / 2)
  };

  // images [B, in_channels, H, W] in [-1, 1] (H, W multiples of the spatial factor for a clean
  // inverse). slice: one image at a time (equal results, less memory).
  Posterior Encode(const at::Tensor& images, bool slice = false, const Progress* progress = nullptr) const;
  // mean + std · noise; noise is drawn (from `generator`, on its device, in the posterior's dtype,
  // then moved, as diffusers' randn_tensor does) when not given.
  static at::Tensor Sample(const Posterior& p, const at::Tensor& noise, std::optional<at::Generator> generator);
  // latents [B, latent_channels, h, w] as they are (callers divide by scaling_factor first).
  // slice: one latent at a time. tile: diffusers' tiled_decode (overlapping tiles of sample_size
  // pixels, blended linearly) when a side exceeds sample_size / spatial_factor.
  at::Tensor Decode(const at::Tensor& latents, bool slice = false, bool tile = false,
                    const Progress* progress = nullptr) const;

  const AutoencoderKLConfig& config() const { return config_; }
  int spatial_factor() const { return 1 << (static_cast<int>(config_.block_out_channels.size()) - 1); }
  int tile_sample_size() const { return config_.sample_size; }
  int tile_latent_size() const { return config_.sample_size / spatial_factor(); }
  at::ScalarType dtype() const { return dtype_; }
  c10::Device device() const { return device_; }
  Weights& weights() { return weights_; }

  struct Conv {
    at::Tensor w, b;
    int64_t stride = 1, padding = 0;
    at::Tensor operator()(const at::Tensor& x) const;
  };
  struct Norm {
    at::Tensor w, b;
    int64_t groups = 32;
    at::Tensor operator()(const at::Tensor& x) const;
  };
  // ResnetBlock2D without a time embedding (temb_channels=None), output_scale_factor 1.
  struct Resnet {
    Norm norm1, norm2;
    Conv conv1, conv2;
    std::optional<Conv> shortcut;  // 1×1 conv_shortcut when in ≠ out channels
    at::Tensor operator()(const at::Tensor& x) const;
  };
  // The mid-block Attention: one head over all channels, group_norm first, residual added.
  struct MidAttention {
    Norm norm;
    at::Tensor q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b;
    at::Tensor operator()(const at::Tensor& x) const;
  };
  struct MidBlock {
    std::vector<Resnet> resnets;  // 2
    std::optional<MidAttention> attention;
    at::Tensor operator()(const at::Tensor& x) const;
  };
  struct EncoderBlock {
    std::vector<Resnet> resnets;
    std::optional<Conv> downsample;  // pad (0,1,0,1), stride 2, padding 0
  };
  struct DecoderBlock {
    std::vector<Resnet> resnets;
    std::optional<Conv> upsample;  // nearest ×2, then 3×3 conv
  };

 private:
  at::Tensor EncodeOne(const at::Tensor& x) const;  // encoder + quant_conv → [B, 2·latent, h, w]
  at::Tensor DecodeOne(const at::Tensor& z) const;  // post_quant_conv + decoder
  at::Tensor TiledDecode(const at::Tensor& z, const Progress* progress) const;

  AutoencoderKLConfig config_;
  Weights weights_;
  at::ScalarType dtype_ = at::kFloat;
  c10::Device device_ = c10::Device(c10::kCPU);

  Conv enc_conv_in_, enc_conv_out_;
  std::vector<EncoderBlock> enc_blocks_;
  MidBlock enc_mid_;
  Norm enc_norm_out_;
  std::optional<Conv> quant_conv_, post_quant_conv_;
  Conv dec_conv_in_, dec_conv_out_;
  MidBlock dec_mid_;
  std::vector<DecoderBlock> dec_blocks_;
  Norm dec_norm_out_;
};

}  // namespace cd::models
