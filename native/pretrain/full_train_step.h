// Train-all-weights mode: optimizer steps over EVERY parameter of a model, for pretraining a small
// Stable Diffusion pipeline from scratch (the embedded toy model) with the project's own models.
// Custom Diffusion (custom_diffusion/train_step.h) trains a few K/V tensors of a frozen model; here
// nothing is frozen, so the two share no optimizer state and are kept apart.
//
// Two trainers, one optimizer:
//
//   DiffusionPretrainer: the UNet and the text encoder jointly, the diffusers text-to-image loss
//     (examples/text_to_image/train_text_to_image.py, with the text encoder unfrozen):
//       latents = (mean + std·ε_vae) × scaling_factor   (posterior sample; or latents given as they are)
//       noise ~ N(0, 1); t ~ U{0 … T−1} per example; noisy = DDPM add_noise(latents, noise, t)
//       loss = mean((unet(noisy, t, text_encoder(ids)) − target)²)   target = noise | v | sample
//     No BOS detach (that belongs to Custom Diffusion). Captions, including the empty ones that
//     teach classifier-free guidance, are the caller's data.
//
//   VaePretrainer: the AutoencoderKL, as a plain β-VAE:
//       posterior = encode(pixels); z = mean + std·ε; recon = decode(z)
//       loss = mean(|recon − pixels|) (or the squared error) + kl_weight · mean_b KL_b
//       KL_b = 0.5 · Σ_{c,h,w} (mean² + exp(logvar) − 1 − logvar)   (diffusers' posterior.kl())
//     No perceptual or adversarial terms: the toy world's flat colours do not need them.
//
// FullOptimizer (both): torch.optim.AdamW over all parameters in one group (single-tensor formula,
// the one torch takes on CPU, scalars in double), torch.nn.utils.clip_grad_norm_ over all of them,
// the learning rate of diffusers' get_cosine_schedule_with_warmup (or constant with warmup), and an
// optional EMA of the weights with diffusers' EMAModel rule (decay_k = 0 at the first update, then
// min(max_decay, (1 + s)/(10 + s)) with s = k − 1; shadow −= (1 − decay)·(shadow − weight)).
//
// The parameters are the models' own tensors, updated in place, so after training the loaded
// models hold the new weights and the ordinary save path (their tensors by diffusers name) writes
// them. SwapEma() exchanges weights and shadow (twice restores), for evaluation or saving.
//
// Autograd: the models keep requires_grad off (they are inference models), so the trainers switch
// it on for every floating-point parameter while they live, and take gradients with
// torch::autograd::grad, never leaving .grad behind. The UNet's own trainable mode is set to none
// first (which fails with MODEL_BUSY while a forward pass runs) and then overridden for all its
// tensors; another trainer that calls setTrainable on the same UNet is detected at the next step.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/async.h"

namespace cd::models {
class UNet2DConditionModel;
class ClipTextModel;
class AutoencoderKL;
}  // namespace cd::models

namespace cd::schedulers {
class Scheduler;
}

namespace cd::pretrain {

enum class LrSchedule { Constant, Cosine };

struct OptimizerOptions {
  double learningRate = 1e-4;
  LrSchedule schedule = LrSchedule::Cosine;
  int64_t warmupSteps = 0;
  // Cosine: the step count at which the rate reaches 0 (diffusers' num_training_steps); later steps
  // keep 0. Must be > warmupSteps for the cosine schedule.
  int64_t totalSteps = 0;
  double adamBeta1 = 0.9;
  double adamBeta2 = 0.999;
  double adamEpsilon = 1e-8;
  double adamWeightDecay = 1e-2;
  // ≤ 0 disables clipping.
  double maxGradNorm = 1.0;
  // 0 disables the EMA; otherwise diffusers EMAModel's `decay` (the maximum decay).
  double emaDecay = 0;
};

// A named parameter list with AdamW moments and an optional EMA shadow.
class FullOptimizer {
 public:
  FullOptimizer(std::vector<std::pair<std::string, at::Tensor>> params, OptimizerOptions options);

  // diffusers' LambdaLR factor for optimizer step s (0-based) times the base rate.
  double LearningRateAt(int64_t s) const;

  struct Update {
    double lr = 0;
    double gradNorm = 0;  // total 2-norm before clipping
  };
  // Clips `grads` (one per parameter, in order; undefined = zeros) and applies one AdamW step and
  // the EMA update. Throws TRAIN_NAN, changing nothing, when the norm is not finite; `loss` is read
  // on the host in the same transfer as the norm and returned through lossOut.
  Update Apply(std::vector<at::Tensor> grads, const at::Tensor& loss, double* lossOut);

  const std::vector<std::string>& names() const { return names_; }
  const std::vector<at::Tensor>& values() const { return values_; }
  int64_t steps() const { return steps_; }
  bool hasEma() const { return !ema_.empty(); }
  bool emaSwapped() const { return swapped_; }
  // The EMA decay used by the k-th update (1-based).
  double EmaDecayAt(int64_t k) const;
  void SwapEma();
  // Copies: the weights, the EMA shadow (when there is one) by name.
  std::vector<std::pair<std::string, at::Tensor>> Weights() const;
  std::vector<std::pair<std::string, at::Tensor>> EmaWeights() const;
  const OptimizerOptions& options() const { return options_; }

 private:
  OptimizerOptions options_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> values_, expAvg_, expAvgSq_, ema_;
  int64_t steps_ = 0;
  bool swapped_ = false;
};

struct StepStats {
  double loss = 0;
  double lr = 0;
  double gradNorm = 0;
  int64_t step = 0;   // optimizer steps done after this one
  double recon = 0;   // VAE: the reconstruction term
  double kl = 0;      // VAE: the mean KL (before kl_weight)
};

struct DiffusionBatch {
  at::Tensor inputIds;    // integer [N, S]
  at::Tensor latents;     // [N, C, h, w], already × scaling_factor, used as they are; or
  at::Tensor latentMean;  // [N, C, h, w] posterior mean and
  at::Tensor latentStd;   // std (unscaled): latents = (mean + std·ε) × scalingFactor; or
  at::Tensor pixels;      // [N, 3, H, W] in [−1, 1], encoded by the (frozen) VAE
  // Injected randomness (parity tests); each replaces a draw, in the order ε_vae, noise, timesteps.
  at::Tensor vaeNoise, noise, timesteps;
};

struct DiffusionOptions {
  OptimizerOptions optimizer;
  bool trainTextEncoder = true;
  // Multiplies cached posteriors; NaN: the VAE's config value (a VAE is then required).
  double scalingFactor = std::numeric_limits<double>::quiet_NaN();
};

class DiffusionPretrainer {
 public:
  // `vae` may be null when batches bring latents or posteriors.
  DiffusionPretrainer(std::shared_ptr<models::UNet2DConditionModel> unet,
                      std::shared_ptr<models::ClipTextModel> textEncoder, std::shared_ptr<models::AutoencoderKL> vae,
                      std::unique_ptr<schedulers::Scheduler> scheduler, DiffusionOptions options);
  ~DiffusionPretrainer();

  // One optimizer step. Calls run one at a time (the lock); a cancelled progress aborts before work.
  StepStats Step(const DiffusionBatch& batch, std::optional<at::Generator> generator, const Progress* progress);

  FullOptimizer& optimizer() { return *optimizer_; }
  std::mutex& mutex() const { return mutex_; }
  const DiffusionOptions& options() const { return options_; }
  const std::string& predictionType() const;
  double scalingFactor() const { return scalingFactor_; }

 private:
  void CheckStillTrainable() const;

  std::shared_ptr<models::UNet2DConditionModel> unet_;
  std::shared_ptr<models::ClipTextModel> text_;
  std::shared_ptr<models::AutoencoderKL> vae_;
  std::unique_ptr<schedulers::Scheduler> scheduler_;
  DiffusionOptions options_;
  double scalingFactor_ = 1;
  c10::Device device_ = c10::Device(c10::kCPU);
  std::unique_ptr<FullOptimizer> optimizer_;
  mutable std::mutex mutex_;
};

enum class ReconLoss { L1, Mse };

struct VaeOptions {
  OptimizerOptions optimizer;
  ReconLoss reconLoss = ReconLoss::L1;
  double klWeight = 1e-6;
};

struct VaeBatch {
  at::Tensor pixels;    // [N, 3, H, W] in [−1, 1]
  at::Tensor vaeNoise;  // injected posterior noise (parity tests)
};

class VaePretrainer {
 public:
  VaePretrainer(std::shared_ptr<models::AutoencoderKL> vae, VaeOptions options);
  ~VaePretrainer();

  StepStats Step(const VaeBatch& batch, std::optional<at::Generator> generator, const Progress* progress);

  FullOptimizer& optimizer() { return *optimizer_; }
  std::mutex& mutex() const { return mutex_; }
  const VaeOptions& options() const { return options_; }

 private:
  std::shared_ptr<models::AutoencoderKL> vae_;
  VaeOptions options_;
  std::unique_ptr<FullOptimizer> optimizer_;
  mutable std::mutex mutex_;
};

}  // namespace cd::pretrain
