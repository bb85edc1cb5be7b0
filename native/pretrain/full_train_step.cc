#include "pretrain/full_train_step.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>

#include "core/errors.h"
#include "models/autoencoder_kl.h"
#include "models/clip_text.h"
#include "models/unet_2d_condition.h"
#include "schedulers/scheduler.h"

namespace cd::pretrain {

namespace {

constexpr double kPi = 3.14159265358979323846;

std::string Shape(const at::Tensor& t) { return c10::str(t.sizes()); }

void RequireIntegral(const at::Tensor& t, const char* what) {
  Require(t.defined() && !at::isFloatingType(t.scalar_type()) && !t.is_complex() && t.scalar_type() != at::kBool,
          std::string(what) + " must hold integers");
}

void CheckOptimizerOptions(const OptimizerOptions& o) {
  Require(std::isfinite(o.learningRate) && o.learningRate >= 0, "learningRate must be a finite number ≥ 0");
  Require(o.warmupSteps >= 0, "warmupSteps must be ≥ 0");
  if (o.schedule == LrSchedule::Cosine)
    Require(o.totalSteps > o.warmupSteps, "The cosine schedule needs totalSteps > warmupSteps (got totalSteps " +
                                              std::to_string(o.totalSteps) + ", warmupSteps " +
                                              std::to_string(o.warmupSteps) + ")");
  Require(o.adamBeta1 >= 0 && o.adamBeta1 < 1, "adamBeta1 must lie in [0, 1)");
  Require(o.adamBeta2 >= 0 && o.adamBeta2 < 1, "adamBeta2 must lie in [0, 1)");
  Require(std::isfinite(o.adamEpsilon) && o.adamEpsilon >= 0, "adamEpsilon must be a finite number ≥ 0");
  Require(std::isfinite(o.adamWeightDecay) && o.adamWeightDecay >= 0, "adamWeightDecay must be a finite number ≥ 0");
  Require(std::isfinite(o.maxGradNorm), "maxGradNorm must be finite (≤ 0 disables clipping)");
  Require(std::isfinite(o.emaDecay) && o.emaDecay >= 0 && o.emaDecay < 1, "emaDecay must lie in [0, 1) (0: no EMA)");
}

// The floating-point tensors of a model by name, with a prefix, in name order.
void Collect(const std::map<std::string, at::Tensor>& tensors, const std::string& prefix,
             std::vector<std::pair<std::string, at::Tensor>>& out) {
  for (const auto& [name, t] : tensors)
    if (t.defined() && at::isFloatingType(t.scalar_type())) out.emplace_back(prefix + name, t);
}

void SetRequiresGrad(const std::vector<std::pair<std::string, at::Tensor>>& params, bool on) {
  for (const auto& [name, t] : params) t.requires_grad_(on);
}

// Draws on the generator's own device (a CPU seed gives the same numbers whatever the model's
// device), as diffusers' randn_tensor does.
at::Tensor Randn(at::IntArrayRef sizes, const std::optional<at::Generator>& generator, c10::Device device) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  if (!generator) return at::randn(sizes, opts.device(device));
  const c10::Device gd = generator->device();
  Require(gd.is_cpu() || gd == device || (gd.is_cuda() && device.is_cuda()),
          "The generator is on " + gd.str() + " but the model on " + device.str());
  return at::randn(sizes, generator, opts.device(gd)).to(device);
}

std::vector<at::Tensor> Grad(const at::Tensor& loss, const std::vector<at::Tensor>& inputs) {
  return torch::autograd::grad({loss}, inputs, {}, /*retain_graph=*/false, /*create_graph=*/false,
                               /*allow_unused=*/true);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// FullOptimizer

FullOptimizer::FullOptimizer(std::vector<std::pair<std::string, at::Tensor>> params, OptimizerOptions options)
    : options_(options) {
  CheckOptimizerOptions(options_);
  Require(!params.empty(), "There are no parameters to train");
  at::NoGradGuard noGrad;
  for (auto& [name, t] : params) {
    Require(t.scalar_type() == at::kFloat,
            "\"" + name + "\" is " + std::string(c10::toString(t.scalar_type())) +
                ": pretraining keeps weights, gradients and AdamW state in float32 (load the models as float32)");
    names_.push_back(name);
    values_.push_back(t);
    // torch creates the moments lazily with zeros_like at the first step: the same values.
    expAvg_.push_back(at::zeros_like(t, at::MemoryFormat::Preserve));
    expAvgSq_.push_back(at::zeros_like(t, at::MemoryFormat::Preserve));
    if (options_.emaDecay > 0) ema_.push_back(t.detach().clone());
  }
}

double FullOptimizer::LearningRateAt(int64_t s) const {
  const OptimizerOptions& o = options_;
  const int64_t w = o.warmupSteps;
  if (s < w) return o.learningRate * (static_cast<double>(s) / static_cast<double>(std::max<int64_t>(1, w)));
  if (o.schedule == LrSchedule::Constant) return o.learningRate;
  // Beyond totalSteps diffusers' formula would climb again (cos past π); the rate stays at 0 instead.
  if (s >= o.totalSteps) return 0.0;
  const double progress = static_cast<double>(s - w) / static_cast<double>(std::max<int64_t>(1, o.totalSteps - w));
  return o.learningRate * std::max(0.0, 0.5 * (1.0 + std::cos(kPi * 0.5 * 2.0 * progress)));
}

double FullOptimizer::EmaDecayAt(int64_t k) const {
  const int64_t s = k - 1;
  if (s <= 0) return 0.0;
  const double d = (1.0 + static_cast<double>(s)) / (10.0 + static_cast<double>(s));
  return std::min(d, options_.emaDecay);
}

FullOptimizer::Update FullOptimizer::Apply(std::vector<at::Tensor> grads, const at::Tensor& loss, double* lossOut) {
  Require(!swapped_, "The EMA weights are swapped in: swap them back before training on");
  Require(grads.size() == values_.size(), "One gradient per parameter is needed");
  const OptimizerOptions& o = options_;
  at::NoGradGuard noGrad;
  for (size_t i = 0; i < grads.size(); ++i)
    if (!grads[i].defined()) grads[i] = at::zeros_like(values_[i]);

  // clip_grad_norm_: the 2-norm of the per-tensor 2-norms (torch._foreach_norm, as torch does).
  const std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2);
  const at::Tensor totalNorm = at::linalg_vector_norm(at::stack(norms), 2);
  // One device→host read for the loss and the norm together.
  const at::Tensor host =
      at::stack({loss.detach().to(at::kFloat).reshape({}), totalNorm.to(at::kFloat).reshape({})}).to(at::kCPU, at::kDouble);
  const double lossValue = host.data_ptr<double>()[0];
  const double norm = host.data_ptr<double>()[1];
  if (lossOut) *lossOut = lossValue;
  const std::string where = "optimizer step " + std::to_string(steps_ + 1);
  if (!std::isfinite(lossValue))
    throw Error("TRAIN_NAN", "The loss is " + std::to_string(lossValue) + " at " + where + "; the weights were not updated",
                {{"step", std::to_string(steps_ + 1)}});
  if (!std::isfinite(norm))
    throw Error("TRAIN_NAN",
                "The gradients are not finite (norm " + std::to_string(norm) + ") at " + where + "; the weights were not updated",
                {{"step", std::to_string(steps_ + 1)}});

  if (o.maxGradNorm > 0) {
    // clip_coef = max_norm / (total_norm + 1e-6), evaluated as Python does: reciprocal(...) · max_norm.
    const at::Tensor coef = at::clamp_max(at::reciprocal(totalNorm + 1e-6) * o.maxGradNorm, 1.0);
    at::_foreach_mul_(grads, coef);
  }

  Update u;
  u.lr = LearningRateAt(steps_);
  u.gradNorm = norm;
  // torch.optim.AdamW, _single_tensor_adam with decoupled weight decay; torch keeps `step` as float32.
  const double step = static_cast<double>(static_cast<float>(steps_ + 1));
  const double bc1 = 1 - std::pow(o.adamBeta1, step);
  const double bc2Sqrt = std::pow(1 - std::pow(o.adamBeta2, step), 0.5);
  const double stepSize = u.lr / bc1;
  for (size_t i = 0; i < values_.size(); ++i) {
    at::Tensor& p = values_[i];
    const at::Tensor& g = grads[i];
    if (o.adamWeightDecay != 0) p.mul_(1 - u.lr * o.adamWeightDecay);
    expAvg_[i].lerp_(g, 1 - o.adamBeta1);
    expAvgSq_[i].mul_(o.adamBeta2).addcmul_(g, g, 1 - o.adamBeta2);
    const at::Tensor denom = (expAvgSq_[i].sqrt() / bc2Sqrt).add_(o.adamEpsilon);
    p.addcdiv_(expAvg_[i], denom, -stepSize);
  }
  ++steps_;
  if (!ema_.empty()) {
    const double oneMinusDecay = 1.0 - EmaDecayAt(steps_);
    for (size_t i = 0; i < values_.size(); ++i) ema_[i].sub_((ema_[i] - values_[i]) * oneMinusDecay);
  }
  return u;
}

void FullOptimizer::SwapEma() {
  Require(!ema_.empty(), "This trainer keeps no EMA weights (emaDecay is 0)");
  at::NoGradGuard noGrad;
  for (size_t i = 0; i < values_.size(); ++i) {
    const at::Tensor tmp = values_[i].clone();
    values_[i].copy_(ema_[i]);
    ema_[i].copy_(tmp);
  }
  swapped_ = !swapped_;
}

std::vector<std::pair<std::string, at::Tensor>> FullOptimizer::Weights() const {
  at::NoGradGuard noGrad;
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < values_.size(); ++i) out.emplace_back(names_[i], values_[i].detach().clone());
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> FullOptimizer::EmaWeights() const {
  Require(!ema_.empty(), "This trainer keeps no EMA weights (emaDecay is 0)");
  at::NoGradGuard noGrad;
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < ema_.size(); ++i) out.emplace_back(names_[i], ema_[i].clone());
  return out;
}

// ---------------------------------------------------------------------------------------------
// DiffusionPretrainer

DiffusionPretrainer::DiffusionPretrainer(std::shared_ptr<models::UNet2DConditionModel> unet,
                                         std::shared_ptr<models::ClipTextModel> textEncoder,
                                         std::shared_ptr<models::AutoencoderKL> vae,
                                         std::unique_ptr<schedulers::Scheduler> scheduler, DiffusionOptions options)
    : unet_(std::move(unet)),
      text_(std::move(textEncoder)),
      vae_(std::move(vae)),
      scheduler_(std::move(scheduler)),
      options_(options) {
  Require(unet_ && text_ && scheduler_, "A UNet, a text encoder and a scheduler are needed");
  const std::string& pt = scheduler_->predictionType();
  Require(pt == "epsilon" || pt == "v_prediction" || pt == "sample",
          "The scheduler's prediction_type \"" + pt + "\" has no training target");
  device_ = unet_->options().device();
  Require(text_->device() == device_, "The text encoder is on " + text_->device().str() + " but the UNet on " + device_.str());
  if (vae_) Require(vae_->device() == device_, "The VAE is on " + vae_->device().str() + " but the UNet on " + device_.str());
  Require(text_->vocab_size() == text_->base_vocab_size(),
          "The text encoder has added token rows; pretraining trains the loaded vocabulary only");
  if (std::isnan(options_.scalingFactor)) {
    scalingFactor_ = vae_ ? vae_->config().scaling_factor : std::numeric_limits<double>::quiet_NaN();
  } else {
    Require(std::isfinite(options_.scalingFactor) && options_.scalingFactor > 0, "scalingFactor must be a positive number");
    scalingFactor_ = options_.scalingFactor;
  }

  std::vector<std::pair<std::string, at::Tensor>> params;
  Collect(unet_->parameters(), "unet.", params);
  if (options_.trainTextEncoder) Collect(text_->weights().tensors(), "text_encoder.", params);
  optimizer_ = std::make_unique<FullOptimizer>(params, options_.optimizer);
  // Clears any Custom Diffusion selection (and fails while a forward pass runs), then opens all.
  unet_->setTrainable(models::TrainableMode::None);
  SetRequiresGrad(params, true);
}

DiffusionPretrainer::~DiffusionPretrainer() {
  // Back to an inference model; a forward pass still running elsewhere keeps its flags (MODEL_BUSY).
  try {
    std::vector<std::pair<std::string, at::Tensor>> params;
    for (size_t i = 0; i < optimizer_->names().size(); ++i)
      params.emplace_back(optimizer_->names()[i], optimizer_->values()[i]);
    SetRequiresGrad(params, false);
    unet_->setTrainable(models::TrainableMode::None);
  } catch (...) {
  }
}

const std::string& DiffusionPretrainer::predictionType() const { return scheduler_->predictionType(); }

void DiffusionPretrainer::CheckStillTrainable() const {
  if (unet_->trainable() != models::TrainableMode::None)
    throw Error("TRAIN_STATE", "The UNet's trainable set was changed (setTrainable) while it was being pretrained");
  for (const at::Tensor& t : optimizer_->values())
    if (!t.requires_grad())
      throw Error("TRAIN_STATE", "A pretrained model's parameter no longer requires grad (its trainable set was changed)");
}

StepStats DiffusionPretrainer::Step(const DiffusionBatch& batch, std::optional<at::Generator> generator,
                                    const Progress* progress) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (progress) progress->ThrowIfCancelled();
  Require(!optimizer_->emaSwapped(), "The EMA weights are swapped in: swap them back before training on");
  CheckStillTrainable();

  Require(batch.inputIds.defined() && batch.inputIds.dim() == 2, "inputIds must be an integer tensor [N, tokens]");
  RequireIntegral(batch.inputIds, "inputIds");
  const int64_t n = batch.inputIds.size(0);
  Require(n >= 1, "The batch is empty");
  auto checkLatentLike = [&](const at::Tensor& t, const char* what) {
    Require(t.dim() == 4 && t.size(0) == n && at::isFloatingType(t.scalar_type()),
            std::string(what) + " must be a floating-point tensor [" + std::to_string(n) + ", channels, h, w], got " + Shape(t));
  };
  const auto floatOpts = at::TensorOptions().dtype(at::kFloat).device(device_);

  at::Tensor latents;
  {
    at::NoGradGuard noGrad;
    auto posteriorSample = [&](const at::Tensor& mean, const at::Tensor& std) {
      at::Tensor eps;
      if (batch.vaeNoise.defined()) {
        Require(batch.vaeNoise.sizes() == mean.sizes(),
                "vaeNoise must have the posterior's shape " + Shape(mean) + ", got " + Shape(batch.vaeNoise));
        eps = batch.vaeNoise.to(floatOpts);
      } else {
        eps = Randn(mean.sizes(), generator, device_);
      }
      Require(!std::isnan(scalingFactor_), "scalingFactor is needed to scale cached posteriors (no VAE was given)");
      return (mean.to(floatOpts) + std.to(floatOpts) * eps) * scalingFactor_;
    };
    if (batch.latents.defined()) {
      checkLatentLike(batch.latents, "latents");
      latents = batch.latents.to(floatOpts);
    } else if (batch.latentMean.defined()) {
      checkLatentLike(batch.latentMean, "latentMean");
      Require(batch.latentStd.defined() && batch.latentStd.sizes() == batch.latentMean.sizes(),
              "latentStd must have latentMean's shape " + Shape(batch.latentMean));
      latents = posteriorSample(batch.latentMean, batch.latentStd);
    } else {
      Require(batch.pixels.defined(), "The batch needs latents, a posterior (latentMean, latentStd) or pixels");
      Require(vae_ != nullptr, "This trainer has no VAE: batches must bring latents or posteriors");
      Require(batch.pixels.dim() == 4 && batch.pixels.size(0) == n && batch.pixels.size(1) == 3,
              "pixels must be a tensor [" + std::to_string(n) + ", 3, H, W], got " + Shape(batch.pixels));
      const models::AutoencoderKL::Posterior post = vae_->Encode(batch.pixels);
      latents = posteriorSample(post.mean, post.std);
    }
  }
  Require(latents.size(1) == unet_->config().inChannels,
          "The latents have " + std::to_string(latents.size(1)) + " channels; the UNet takes " +
              std::to_string(unet_->config().inChannels));

  at::Tensor noise;
  if (batch.noise.defined()) {
    Require(batch.noise.sizes() == latents.sizes(), "noise must have the latents' shape " + Shape(latents) + ", got " + Shape(batch.noise));
    noise = batch.noise.to(floatOpts);
  } else {
    noise = Randn(latents.sizes(), generator, device_);
  }
  const at::Tensor timesteps = schedulers::TrainingTimesteps(*scheduler_, batch.timesteps, n, generator, device_);
  auto [noisy, target] = schedulers::NoiseForTraining(*scheduler_, latents, noise, timesteps);

  at::AutoGradMode gradMode(true);
  at::Tensor context;
  {
    std::optional<at::NoGradGuard> noGrad;
    if (!options_.trainTextEncoder) noGrad.emplace();
    context = text_->Forward(batch.inputIds).last_hidden_state;
  }
  const at::Tensor pred = unet_->forward(noisy, timesteps, context);
  const at::Tensor loss = at::mse_loss(pred.to(at::kFloat), target.to(at::kFloat), at::Reduction::Mean);
  std::vector<at::Tensor> grads = Grad(loss, optimizer_->values());

  StepStats s;
  const FullOptimizer::Update u = optimizer_->Apply(std::move(grads), loss, &s.loss);
  s.lr = u.lr;
  s.gradNorm = u.gradNorm;
  s.step = optimizer_->steps();
  return s;
}

// ---------------------------------------------------------------------------------------------
// VaePretrainer

VaePretrainer::VaePretrainer(std::shared_ptr<models::AutoencoderKL> vae, VaeOptions options)
    : vae_(std::move(vae)), options_(options) {
  Require(vae_ != nullptr, "A VAE is needed");
  Require(std::isfinite(options_.klWeight) && options_.klWeight >= 0, "klWeight must be a finite number ≥ 0");
  std::vector<std::pair<std::string, at::Tensor>> params;
  Collect(vae_->weights().tensors(), "vae.", params);
  optimizer_ = std::make_unique<FullOptimizer>(params, options_.optimizer);
  SetRequiresGrad(params, true);
}

VaePretrainer::~VaePretrainer() {
  try {
    for (const at::Tensor& t : optimizer_->values()) t.requires_grad_(false);
  } catch (...) {
  }
}

StepStats VaePretrainer::Step(const VaeBatch& batch, std::optional<at::Generator> generator, const Progress* progress) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (progress) progress->ThrowIfCancelled();
  Require(!optimizer_->emaSwapped(), "The EMA weights are swapped in: swap them back before training on");
  Require(batch.pixels.defined() && batch.pixels.dim() == 4 && batch.pixels.size(0) >= 1 &&
              at::isFloatingType(batch.pixels.scalar_type()),
          "pixels must be a floating-point tensor [N, channels, H, W]");
  const c10::Device device = vae_->device();
  const auto floatOpts = at::TensorOptions().dtype(at::kFloat).device(device);

  at::AutoGradMode gradMode(true);
  const at::Tensor x = batch.pixels.to(floatOpts);
  const models::AutoencoderKL::Posterior post = vae_->Encode(x);
  at::Tensor eps;
  if (batch.vaeNoise.defined()) {
    Require(batch.vaeNoise.sizes() == post.mean.sizes(),
            "vaeNoise must have the posterior's shape " + Shape(post.mean) + ", got " + Shape(batch.vaeNoise));
    eps = batch.vaeNoise.to(floatOpts);
  } else {
    eps = Randn(post.mean.sizes(), generator, device);
  }
  const at::Tensor z = post.mean + post.std * eps;
  const at::Tensor recon = vae_->Decode(z);
  const at::Tensor reconLoss = options_.reconLoss == ReconLoss::L1 ? at::l1_loss(recon, x, at::Reduction::Mean)
                                                                  : at::mse_loss(recon, x, at::Reduction::Mean);
  // DiagonalGaussianDistribution.kl(): var = exp(logvar) of the clamped logvar.
  const at::Tensor kl =
      (at::pow(post.mean, 2) + at::exp(post.logvar) - 1.0 - post.logvar).sum({1, 2, 3}).mul(0.5).mean();
  const at::Tensor loss = reconLoss + kl * options_.klWeight;
  std::vector<at::Tensor> grads = Grad(loss, optimizer_->values());

  StepStats s;
  {
    at::NoGradGuard noGrad;
    const at::Tensor parts = at::stack({reconLoss.detach(), kl.detach()}).to(at::kCPU, at::kDouble);
    s.recon = parts.data_ptr<double>()[0];
    s.kl = parts.data_ptr<double>()[1];
  }
  const FullOptimizer::Update u = optimizer_->Apply(std::move(grads), loss, &s.loss);
  s.lr = u.lr;
  s.gradNorm = u.gradNorm;
  s.step = optimizer_->steps();
  return s;
}

}  // namespace cd::pretrain
