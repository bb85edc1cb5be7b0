#include "custom_diffusion/train_step.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <map>
#include <optional>
#include <set>

#include "core/autocast.h"
#include "core/errors.h"
#include "models/autoencoder_kl.h"
#include "models/clip_text.h"
#include "schedulers/scheduler.h"

namespace cd::custom_diffusion {

namespace {

std::string Shape(const at::Tensor& t) { return c10::str(t.sizes()); }

// Autocast for the forward passes when mixed precision is on (fp16 or bf16); nothing otherwise.
class AutocastScope {
 public:
  AutocastScope(MixedPrecision mp, c10::DeviceType device) {
    if (mp != MixedPrecision::No) guard_.emplace(device, true, mp == MixedPrecision::Fp16 ? at::kHalf : at::kBFloat16);
  }

 private:
  std::optional<AutocastGuard> guard_;
};

void RequireIntegral(const at::Tensor& t, const char* what) {
  Require(!at::isFloatingType(t.scalar_type()) && !t.is_complex() && t.scalar_type() != at::kBool,
          std::string(what) + " must hold integers");
}

}  // namespace

TrainStep::TrainStep(std::shared_ptr<models::UNet2DConditionModel> unet, std::shared_ptr<models::ClipTextModel> text,
                     std::shared_ptr<models::AutoencoderKL> vae, std::unique_ptr<schedulers::Scheduler> scheduler,
                     TrainStepOptions options)
    : unet_(std::move(unet)),
      text_(std::move(text)),
      vae_(std::move(vae)),
      scheduler_(std::move(scheduler)),
      options_(std::move(options)) {
  Require(unet_ != nullptr && text_ != nullptr && scheduler_ != nullptr, "A UNet, a text encoder and a scheduler are needed");
  const TrainStepOptions& o = options_;
  Require(o.freezeModel != models::TrainableMode::None, "freezeModel must be 'crossattn_kv' or 'crossattn'");
  Require(std::isfinite(o.learningRate) && o.learningRate >= 0, "learningRate must be a finite number ≥ 0");
  Require(o.warmupSteps >= 0, "warmupSteps must be ≥ 0");
  Require(o.adamBeta1 >= 0 && o.adamBeta1 < 1, "adamBeta1 must lie in [0, 1)");
  Require(o.adamBeta2 >= 0 && o.adamBeta2 < 1, "adamBeta2 must lie in [0, 1)");
  Require(std::isfinite(o.adamEpsilon) && o.adamEpsilon >= 0, "adamEpsilon must be a finite number ≥ 0");
  Require(std::isfinite(o.adamWeightDecay) && o.adamWeightDecay >= 0, "adamWeightDecay must be a finite number ≥ 0");
  Require(std::isfinite(o.tokenLearningRateScale) && o.tokenLearningRateScale >= 0,
          "tokenLearningRateScale must be a finite number ≥ 0");
  Require(std::isfinite(o.maxGradNorm), "maxGradNorm must be finite (≤ 0 disables clipping)");
  Require(o.gradientAccumulationSteps >= 1, "gradientAccumulationSteps must be ≥ 1");
  Require(std::isfinite(o.priorLossWeight) && o.priorLossWeight >= 0, "priorLossWeight must be a finite number ≥ 0");
  const std::string& pt = scheduler_->predictionType();
  Require(pt == "epsilon" || pt == "v_prediction" || pt == "sample",
          "The scheduler's prediction_type \"" + pt + "\" has no training target");

  device_ = unet_->options().device();
  Require(text_->device() == device_, "The text encoder is on " + text_->device().str() + " but the UNet on " + device_.str());
  if (vae_) Require(vae_->device() == device_, "The VAE is on " + vae_->device().str() + " but the UNet on " + device_.str());

  if (o.mixedPrecision == MixedPrecision::Fp16)
    Require(device_.is_cuda(), "mixedPrecision 'fp16' needs a CUDA device (CPU autocast supports 'bf16' only)");
  if (o.mixedPrecision == MixedPrecision::Bf16)
    Require(device_.is_cuda() || device_.is_cpu(), "mixedPrecision 'bf16' needs a CUDA or CPU device");

  // Which tokens train: exactly the added rows, so the optimizer can own that whole tensor.
  const int64_t base = text_->base_vocab_size();
  const int64_t added = text_->vocab_size() - base;
  if (!o.tokenIds.empty()) {
    Require(static_cast<int64_t>(o.tokenIds.size()) == added,
            "The text encoder has " + std::to_string(added) + " added token rows but " +
                std::to_string(o.tokenIds.size()) + " modifier tokens were given: the added rows must be exactly the modifier tokens");
    for (size_t i = 0; i < o.tokenIds.size(); ++i)
      Require(o.tokenIds[i] == base + static_cast<int64_t>(i),
              "Modifier token " + std::to_string(i) + " has id " + std::to_string(o.tokenIds[i]) + "; expected " +
                  std::to_string(base + static_cast<int64_t>(i)) + " (the added rows, in order)");
    trainTokens_ = true;
  }

  // The trainable UNet tensors, in diffusers name order (the parameters map is sorted).
  unet_->setTrainable(o.freezeModel);
  for (const auto& [name, p] : unet_->parameters()) {
    if (!models::IsTrainable(o.freezeModel, name)) continue;
    Require(p.scalar_type() == at::kFloat,
            "Training needs float32 trainable weights, but " + name + " is " + std::string(c10::toString(p.scalar_type())) +
                ": load the UNet in float32 (mixedPrecision computes in bf16/fp16 with float32 weights)");
    params_.push_back(Param{name, p, 1.0, {}, {}, {}});
  }
  Require(!params_.empty(), "The UNet has no cross-attention parameters to train");
  if (trainTokens_) {
    text_->SetAddedRowsTrainable(true);
    const at::Tensor rows = text_->AddedRows();
    Require(rows.scalar_type() == at::kFloat, "Training needs float32 token rows: load the text encoder in float32");
    params_.push_back(Param{kAddedRowsName, rows, o.tokenLearningRateScale, {}, {}, {}});
  }
  at::NoGradGuard noGrad;
  for (auto& p : params_) {
    // torch initialises the moments lazily with zeros_like at the first step: the same values.
    p.expAvg = at::zeros_like(p.value, at::MemoryFormat::Preserve);
    p.expAvgSq = at::zeros_like(p.value, at::MemoryFormat::Preserve);
  }
  if (o.mixedPrecision == MixedPrecision::Fp16) {
    scale_ = at::full({1}, o.initScale, at::TensorOptions().dtype(at::kFloat).device(device_));
    growthTracker_ = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device_));
  }
}

TrainStep::~TrainStep() = default;

const std::string& TrainStep::predictionType() const { return scheduler_->predictionType(); }

std::vector<std::string> TrainStep::TrainableNames() const {
  std::vector<std::string> names;
  for (const auto& p : params_) names.push_back(p.name);
  return names;
}

double TrainStep::LearningRateAt(int64_t s) const {
  // diffusers get_constant_schedule_with_warmup: LambdaLR(λ(s) = s / max(1, W) for s < W, else 1).
  const int64_t w = options_.warmupSteps;
  if (s < w) return options_.learningRate * (static_cast<double>(s) / static_cast<double>(std::max<int64_t>(1, w)));
  return options_.learningRate * 1.0;
}

void TrainStep::ResetAccumulation() {
  for (auto& p : params_) p.accum = at::Tensor();
  microSteps_ -= cycleMicro_;
  cycleMicro_ = 0;
}

models::AutoencoderKL::Posterior TrainStep::EncodeImages(const at::Tensor& pixels, int64_t instances) {
  const int64_t n = pixels.size(0);
  if (!options_.cacheClassLatents || instances >= n) return vae_->Encode(pixels);
  // Instance examples are augmented afresh each step: encoded together. Class examples (flip at
  // most) recur, so each is encoded alone once and its posterior kept, keyed by its exact pixels.
  std::vector<at::Tensor> means, stds;
  if (instances > 0) {
    auto post = vae_->Encode(pixels.narrow(0, 0, instances));
    means.push_back(post.mean);
    stds.push_back(post.std);
  }
  for (int64_t i = instances; i < n; ++i) {
    const at::Tensor row = pixels.narrow(0, i, 1).to(at::kCPU).contiguous();
    std::string key(static_cast<const char*>(row.data_ptr()), static_cast<size_t>(row.nbytes()));
    key += c10::str(row.sizes(), row.scalar_type());
    auto it = latentCache_.find(key);
    if (it == latentCache_.end()) {
      auto post = vae_->Encode(pixels.narrow(0, i, 1));
      std::pair<at::Tensor, at::Tensor> entry{post.mean.detach(), post.std.detach()};
      if (latentCache_.size() < 1024) it = latentCache_.emplace(std::move(key), entry).first;
      means.push_back(entry.first);
      stds.push_back(entry.second);
      continue;
    }
    ++latentCacheHits_;
    means.push_back(it->second.first);
    stds.push_back(it->second.second);
  }
  models::AutoencoderKL::Posterior post;
  post.mean = at::cat(means, 0);
  post.std = at::cat(stds, 0);
  return post;
}

at::Tensor TrainStep::EncodeText(const at::Tensor& inputIds) {
  auto forward = [&](const at::Tensor& ids, bool grad) {
    std::optional<at::NoGradGuard> noGrad;
    if (!grad) noGrad.emplace();
    return text_->Forward(ids).last_hidden_state;
  };
  if (!options_.cacheTextEmbeddings) return forward(inputIds, trainTokens_);
  const at::Tensor ids = inputIds.to(at::kCPU, at::kLong).contiguous();
  const int64_t n = ids.size(0), len = ids.size(1);
  std::vector<at::Tensor> rows(static_cast<size_t>(n));
  std::vector<int64_t> live;  // rows holding a trainable token: encoded together, with autograd
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* p = ids.data_ptr<int64_t>() + i * len;
    std::vector<int64_t> key(p, p + len);
    bool trainable = false;
    for (int64_t id : key)
      for (int64_t t : options_.tokenIds) trainable = trainable || id == t;
    if (trainable) {
      live.push_back(i);
      continue;
    }
    auto it = textCache_.find(key);
    if (it != textCache_.end()) {
      ++textCacheHits_;
      rows[static_cast<size_t>(i)] = it->second;
      continue;
    }
    at::Tensor h = forward(inputIds.narrow(0, i, 1), false).detach();
    // Bounded: a few hundred distinct captions (retrieved class images) at most is the usual case.
    if (textCache_.size() < 1024) textCache_.emplace(std::move(key), h);
    rows[static_cast<size_t>(i)] = h;
  }
  if (!live.empty()) {
    const at::Tensor index = at::tensor(live, at::kLong).to(inputIds.device());
    const at::Tensor h = forward(inputIds.index_select(0, index), trainTokens_);
    for (size_t k = 0; k < live.size(); ++k) rows[static_cast<size_t>(live[k])] = h.narrow(0, static_cast<int64_t>(k), 1);
  }
  return rows.size() == 1 ? rows[0] : at::cat(rows, 0);
}

at::Tensor TrainStep::Loss(const at::Tensor& predIn, const at::Tensor& targetIn, const at::Tensor& mask,
                           int64_t instances) const {
  // The reference casts both to float32 before the MSE (`model_pred.float()`).
  const at::Tensor pred = predIn.to(at::kFloat), target = targetIn.to(at::kFloat);
  const int64_t n = pred.size(0);
  const int64_t priors = n - instances;
  const std::vector<int64_t> dims{1, 2, 3};
  // Σ (pred − target)²·mask / Σ mask per example: the mask has one channel, so this is 4× the
  // per-element masked mean (as in all three original implementations).
  auto masked = [&](const at::Tensor& p, const at::Tensor& t, const at::Tensor& m) {
    const at::Tensor l = at::mse_loss(p, t, at::Reduction::None);
    return (l * m).sum(dims) / m.sum(dims);
  };
  if (priors == 0) return masked(pred, target, mask).mean();
  const at::Tensor pi = pred.narrow(0, 0, instances), ti = target.narrow(0, 0, instances);
  const at::Tensor pp = pred.narrow(0, instances, priors), tp = target.narrow(0, instances, priors);
  const at::Tensor mi = mask.narrow(0, 0, instances), mp = mask.narrow(0, instances, priors);
  if (options_.lossWeighting == LossWeighting::Diffusers) {
    const at::Tensor inst = masked(pi, ti, mi).mean();
    const at::Tensor prior = at::mse_loss(pp, tp, at::Reduction::Mean);
    return inst + options_.priorLossWeight * prior;
  }
  // CompVis: every example through the masked formula (class masks are all ones).
  const at::Tensor inst = masked(pi, ti, mi).mean();
  const at::Tensor prior = masked(pp, tp, mp).mean();
  return (inst + options_.priorLossWeight * prior) * 0.5;
}

StepResult TrainStep::Step(const StepBatch& batch, std::optional<at::Generator> generator, const Progress* progress) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (progress) progress->ThrowIfCancelled();
  const TrainStepOptions& o = options_;

  // ---- Checks, all on the host (the inputs come from JavaScript as CPU tensors).
  Require(batch.inputIds.defined() && batch.inputIds.dim() == 2, "inputIds must be an integer tensor [N, tokens]");
  RequireIntegral(batch.inputIds, "inputIds");
  const int64_t n = batch.inputIds.size(0);
  Require(n >= 1, "The batch is empty");
  Require(batch.instanceCount >= 1 && batch.instanceCount <= n,
          "instanceCount must lie in [1, " + std::to_string(n) + "] (examples [0, instanceCount) are instance examples)");
  const bool fromLatents = batch.latents.defined();
  Require(fromLatents || batch.pixels.defined(), "The batch needs pixels (or cached latents)");
  if (fromLatents) {
    Require(batch.latents.dim() == 4 && batch.latents.size(0) == n && at::isFloatingType(batch.latents.scalar_type()),
            "latents must be a floating-point tensor [" + std::to_string(n) + ", channels, h, w], got " + Shape(batch.latents));
  } else {
    Require(vae_ != nullptr, "This trainer has no VAE: batches must bring latents");
    Require(batch.pixels.dim() == 4 && batch.pixels.size(0) == n && batch.pixels.size(1) == 3 &&
                at::isFloatingType(batch.pixels.scalar_type()),
            "pixels must be a floating-point tensor [" + std::to_string(n) + ", 3, H, W], got " + Shape(batch.pixels));
  }
  Require(batch.masks.defined() && batch.masks.dim() == 4 && batch.masks.size(0) == n && batch.masks.size(1) == 1 &&
              at::isFloatingType(batch.masks.scalar_type()),
          "masks must be a floating-point tensor [" + std::to_string(n) + ", 1, h, w], got " +
              (batch.masks.defined() ? Shape(batch.masks) : std::string("nothing")));
  if (batch.masks.is_cpu()) {
    // An empty mask would divide by zero; say which example instead of returning NaN.
    const at::Tensor sums = batch.masks.to(at::kDouble).sum({1, 2, 3});
    const int64_t check = o.lossWeighting == LossWeighting::Diffusers ? batch.instanceCount : n;
    for (int64_t i = 0; i < check; ++i)
      Require(sums[i].item<double>() > 0, "The mask of example " + std::to_string(i) + " of the batch is empty (all zeros)");
  }
  if (trainTokens_)
    Require(text_->AddedRows().is_same(params_.back().value),
            "The text encoder's vocabulary was resized after the trainer was created");

  at::AutoGradMode gradMode(true);
  const auto floatOpts = at::TensorOptions().dtype(at::kFloat).device(device_);
  // Draws from the generator on its own device (CPU generator → CPU draw, then moved), as diffusers'
  // randn_tensor does, so a CPU seed gives the same numbers whatever the model's device.
  auto randn = [&](at::IntArrayRef sizes) -> at::Tensor {
    if (!generator) return at::randn(sizes, floatOpts);
    const c10::Device gd = generator->device();
    Require(gd.is_cpu() || gd == device_ || (gd.is_cuda() && device_.is_cuda()),
            "The generator is on " + gd.str() + " but the model on " + device_.str());
    return at::randn(sizes, generator, at::TensorOptions().dtype(at::kFloat).device(gd)).to(device_);
  };

  // ---- Latents: a sample of the posterior, times the scaling factor (frozen VAE, no autograd).
  at::Tensor latents;
  {
    at::NoGradGuard noGrad;
    if (fromLatents) {
      latents = batch.latents.to(floatOpts);
    } else {
      models::AutoencoderKL::Posterior post;
      {
        AutocastScope autocast(o.mixedPrecision, device_.type());
        post = EncodeImages(batch.pixels, batch.instanceCount);
      }
      at::Tensor eps;
      if (batch.vaeNoise.defined()) {
        Require(batch.vaeNoise.sizes() == post.mean.sizes(),
                "vaeNoise must have the posterior's shape " + Shape(post.mean) + ", got " + Shape(batch.vaeNoise));
        eps = batch.vaeNoise.to(floatOpts);
      } else {
        eps = randn(post.mean.sizes());
      }
      // DiagonalGaussianDistribution.sample(): mean + std · ε; then × scaling_factor.
      latents = (post.mean.to(at::kFloat) + post.std.to(at::kFloat) * eps) * vae_->config().scaling_factor;
    }
  }
  const at::IntArrayRef latentSize = latents.sizes();

  // ---- Noise, timesteps (drawn in this order, after the VAE noise, as the reference scripts do).
  at::Tensor noise;
  if (batch.noise.defined()) {
    Require(batch.noise.sizes() == latentSize, "noise must have the latents' shape " + Shape(latents) + ", got " + Shape(batch.noise));
    noise = batch.noise.to(floatOpts);
  } else {
    noise = randn(latentSize);
  }
  const at::Tensor timesteps = schedulers::TrainingTimesteps(*scheduler_, batch.timesteps, n, generator, device_);
  auto [noisy, target] = schedulers::NoiseForTraining(*scheduler_, latents, noise, timesteps);

  // ---- Text encoder (records autograd only when token rows train) and UNet with the BOS detach.
  at::Tensor context;
  {
    AutocastScope autocast(o.mixedPrecision, device_.type());
    context = EncodeText(batch.inputIds);
  }
  at::Tensor pred;
  {
    AutocastScope autocast(o.mixedPrecision, device_.type());
    models::AttentionOptions attn;
    attn.bosDetach = true;
    int64_t segments = 0;
    pred = unet_->forward(noisy, timesteps, context, attn, o.gradientCheckpointing, &segments);
    checkpointedSegments_ += segments;
  }

  at::Tensor mask = batch.masks.to(floatOpts);
  if (mask.size(2) != latents.size(2) || mask.size(3) != latents.size(3))
    mask = at::upsample_nearest2d(mask, {latents.size(2), latents.size(3)});
  const at::Tensor loss = Loss(pred, target, mask, batch.instanceCount);

  // ---- Backward: accelerate divides the loss by the accumulation steps; GradScaler multiplies by
  // the scale. Gradients are returned, not left in .grad, so the models carry no state.
  at::Tensor objective = loss / static_cast<double>(o.gradientAccumulationSteps);
  if (o.mixedPrecision == MixedPrecision::Fp16) objective = objective * scale_.reshape({});
  std::vector<at::Tensor> inputs;
  for (const auto& p : params_) inputs.push_back(p.value);
  std::vector<at::Tensor> grads;
  try {
    grads = torch::autograd::grad({objective}, inputs, {}, /*retain_graph=*/false, /*create_graph=*/false,
                                  /*allow_unused=*/true);
  } catch (...) {
    ResetAccumulation();
    throw;
  }
  {
    at::NoGradGuard noGrad;
    for (size_t i = 0; i < params_.size(); ++i) {
      at::Tensor g = grads[i].defined() ? grads[i] : at::zeros_like(params_[i].value);
      // As AccumulateGrad: the first gradient is taken as it is, later ones are added in place.
      if (params_[i].accum.defined()) params_[i].accum.add_(g);
      else params_[i].accum = g;
    }
  }
  grads.clear();
  ++cycleMicro_;
  ++microSteps_;

  StepResult r;
  r.lr = LearningRateAt(optimizerSteps_);
  const bool finalMicro = cycleMicro_ >= o.gradientAccumulationSteps;
  if (!finalMicro) {
    r.loss = loss.detach().to(at::kCPU, at::kDouble).item<double>();
    if (!std::isfinite(r.loss)) {
      ResetAccumulation();
      throw Error("TRAIN_NAN", "The loss is " + std::to_string(r.loss) + " at optimizer step " +
                                   std::to_string(optimizerSteps_ + 1) + " (micro-batch " +
                                   std::to_string(microSteps_ + 1) + "); the weights were not updated",
                  {{"step", std::to_string(optimizerSteps_ + 1)}});
    }
    return WithCounters(r);
  }

  // ---- End of the accumulation cycle: unscale (fp16), norm, one host read, clip, AdamW.
  at::NoGradGuard noGrad;
  std::vector<at::Tensor> acc;
  for (auto& p : params_) acc.push_back(p.accum);
  at::Tensor foundInf = at::zeros({1}, floatOpts);
  if (o.mixedPrecision == MixedPrecision::Fp16) {
    const at::Tensor invScale = scale_.to(at::kDouble).reciprocal().to(at::kFloat);
    at::_amp_foreach_non_finite_check_and_unscale_(acc, foundInf, invScale);
  }
  // clip_grad_norm_: the 2-norm of the per-tensor 2-norms (torch._foreach_norm, as torch does on CPU and CUDA).
  const std::vector<at::Tensor> norms = at::_foreach_norm(acc, 2);
  const at::Tensor totalNorm = at::linalg_vector_norm(at::stack(norms), 2);
  // The one device→host read of the step: loss, norm and the overflow flag together.
  const at::Tensor host =
      at::stack({loss.detach().to(at::kFloat).reshape({}), totalNorm.to(at::kFloat).reshape({}), foundInf.reshape({})})
          .to(at::kCPU, at::kDouble);
  const double* h = host.data_ptr<double>();
  r.loss = h[0];
  r.gradNorm = h[1];
  const std::string where = "optimizer step " + std::to_string(optimizerSteps_ + 1);
  if (!std::isfinite(r.loss)) {
    ResetAccumulation();
    throw Error("TRAIN_NAN", "The loss is " + std::to_string(r.loss) + " at " + where + "; the weights were not updated",
                {{"step", std::to_string(optimizerSteps_ + 1)}});
  }
  if (o.mixedPrecision == MixedPrecision::Fp16) {
    const bool overflow = h[2] != 0;
    if (overflow) {
      // GradScaler: skip optimizer.step(), back the scale off. The lr schedule does not advance
      // (accelerate does not step the scheduler after a skipped optimizer step).
      at::_amp_update_scale_(scale_, growthTracker_, foundInf, o.growthFactor, o.backoffFactor, o.growthInterval);
      for (auto& p : params_) p.accum = at::Tensor();
      cycleMicro_ = 0;
      r.skipped = true;
      return WithCounters(r);
    }
  } else if (!std::isfinite(r.gradNorm)) {
    ResetAccumulation();
    throw Error("TRAIN_NAN", "The gradients are not finite (norm " + std::to_string(r.gradNorm) + ") at " + where +
                                 "; the weights were not updated",
                {{"step", std::to_string(optimizerSteps_ + 1)}});
  }

  if (o.maxGradNorm > 0) {
    // clip_coef = max_norm / (total_norm + 1e-6), which Python evaluates as reciprocal(...) · max_norm.
    const at::Tensor coef = at::reciprocal(totalNorm + 1e-6) * o.maxGradNorm;
    const at::Tensor clamped = at::clamp_max(coef, 1.0);
    at::_foreach_mul_(acc, clamped.to(device_));
  }

  // torch.optim.AdamW, _single_tensor_adam with decoupled weight decay (scalars in double, as Python).
  const double lr = r.lr;
  const double step = static_cast<double>(static_cast<float>(optimizerSteps_ + 1));  // torch keeps `step` as float32
  const double bc1 = 1 - std::pow(o.adamBeta1, step);
  const double bc2 = 1 - std::pow(o.adamBeta2, step);
  const double bc2Sqrt = std::pow(bc2, 0.5);
  for (size_t i = 0; i < params_.size(); ++i) {
    Param& p = params_[i];
    const at::Tensor& g = acc[i];
    const double plr = lr * p.lrScale;
    const double stepSize = plr / bc1;
    if (o.adamWeightDecay != 0) p.value.mul_(1 - plr * o.adamWeightDecay);
    p.expAvg.lerp_(g, 1 - o.adamBeta1);
    p.expAvgSq.mul_(o.adamBeta2).addcmul_(g, g, 1 - o.adamBeta2);
    const at::Tensor denom = (p.expAvgSq.sqrt() / bc2Sqrt).add_(o.adamEpsilon);
    p.value.addcdiv_(p.expAvg, denom, -stepSize);
    p.accum = at::Tensor();
  }
  if (o.mixedPrecision == MixedPrecision::Fp16)
    at::_amp_update_scale_(scale_, growthTracker_, foundInf, o.growthFactor, o.backoffFactor, o.growthInterval);
  ++optimizerSteps_;
  cycleMicro_ = 0;
  r.optimizerStepped = true;
  return WithCounters(r);
}

StepResult& TrainStep::WithCounters(StepResult& r) const {
  r.optimizerSteps = optimizerSteps_;
  r.microSteps = microSteps_;
  r.textCacheHits = textCacheHits_;
  r.latentCacheHits = latentCacheHits_;
  r.checkpointedSegments = checkpointedSegments_;
  return r;
}

std::vector<std::pair<std::string, at::Tensor>> TrainStep::Trainables() const {
  std::lock_guard<std::mutex> lock(mutex_);
  at::NoGradGuard noGrad;
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : params_) out.emplace_back(p.name, p.value.detach().clone());
  return out;
}

void TrainStep::SetTrainables(const std::vector<std::pair<std::string, at::Tensor>>& values) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::map<std::string, Param*> byName;
  for (auto& p : params_) byName[p.name] = &p;
  std::set<std::string> seen;
  for (const auto& [name, t] : values) {
    auto it = byName.find(name);
    Require(it != byName.end(), "\"" + name + "\" is not a trainable tensor of this trainer");
    Require(seen.insert(name).second, "\"" + name + "\" is given twice");
    Require(t.defined() && t.sizes() == it->second->value.sizes() && at::isFloatingType(t.scalar_type()),
            "\"" + name + "\" must be a floating-point tensor of shape " + Shape(it->second->value));
  }
  at::NoGradGuard noGrad;
  for (const auto& [name, t] : values) byName[name]->value.copy_(t);
}

OptimizerState TrainStep::GetOptimizerState() const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (cycleMicro_ != 0)
    throw Error("TRAIN_STATE", "The optimizer state cannot be saved in the middle of a gradient accumulation cycle (" +
                                   std::to_string(cycleMicro_) + " of " + std::to_string(options_.gradientAccumulationSteps) +
                                   " micro-batches done)");
  at::NoGradGuard noGrad;
  OptimizerState s;
  for (const auto& p : params_) {
    s.names.push_back(p.name);
    s.expAvg.push_back(p.expAvg.clone());
    s.expAvgSq.push_back(p.expAvgSq.clone());
  }
  s.optimizerSteps = optimizerSteps_;
  s.microSteps = microSteps_;
  if (scale_.defined()) {
    s.scale = scale_.clone();
    s.growthTracker = growthTracker_.clone();
  }
  return s;
}

void TrainStep::SetOptimizerState(const OptimizerState& s) {
  std::lock_guard<std::mutex> lock(mutex_);
  Require(s.names.size() == params_.size() && s.expAvg.size() == params_.size() && s.expAvgSq.size() == params_.size(),
          "The optimizer state holds " + std::to_string(s.names.size()) + " tensors; this trainer has " +
              std::to_string(params_.size()) + " trainable tensors");
  for (size_t i = 0; i < params_.size(); ++i) {
    Require(s.names[i] == params_[i].name,
            "The optimizer state's tensor " + std::to_string(i) + " is \"" + s.names[i] + "\"; expected \"" + params_[i].name + "\"");
    for (const at::Tensor* t : {&s.expAvg[i], &s.expAvgSq[i]})
      Require(t->defined() && t->sizes() == params_[i].value.sizes() && at::isFloatingType(t->scalar_type()),
              "The optimizer state of \"" + s.names[i] + "\" must have shape " + Shape(params_[i].value));
  }
  Require(s.optimizerSteps >= 0 && s.microSteps >= 0, "The optimizer step counts must be ≥ 0");
  if (options_.mixedPrecision == MixedPrecision::Fp16) {
    Require(s.scale.defined() && s.scale.numel() == 1 && s.growthTracker.defined() && s.growthTracker.numel() == 1,
            "An fp16 optimizer state needs the loss scale and its growth tracker");
  }
  at::NoGradGuard noGrad;
  for (size_t i = 0; i < params_.size(); ++i) {
    params_[i].expAvg.copy_(s.expAvg[i]);
    params_[i].expAvgSq.copy_(s.expAvgSq[i]);
    params_[i].accum = at::Tensor();
  }
  optimizerSteps_ = s.optimizerSteps;
  microSteps_ = s.microSteps;
  cycleMicro_ = 0;
  if (options_.mixedPrecision == MixedPrecision::Fp16) {
    scale_.copy_(s.scale.reshape({1}));
    growthTracker_.copy_(s.growthTracker.reshape({1}));
  }
}

}  // namespace cd::custom_diffusion
