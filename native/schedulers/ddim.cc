#include "schedulers/ddim.h"

#include <algorithm>
#include <cmath>

#include "core/errors.h"

namespace cd::schedulers {

namespace {

const std::vector<std::pair<const char*, const char*>> kDefaults = {
    {"num_train_timesteps", "1000"},
    {"beta_start", "0.0001"},
    {"beta_end", "0.02"},
    {"beta_schedule", "\"linear\""},
    {"trained_betas", "null"},
    {"clip_sample", "true"},
    {"set_alpha_to_one", "true"},
    {"steps_offset", "0"},
    {"prediction_type", "\"epsilon\""},
    {"thresholding", "false"},
    {"dynamic_thresholding_ratio", "0.995"},
    {"clip_sample_range", "1.0"},
    {"sample_max_value", "1.0"},
    {"timestep_spacing", "\"leading\""},
    {"rescale_betas_zero_snr", "false"},
};

}  // namespace

DDIMScheduler::DDIMScheduler(const std::string& configText, const std::string& overridesText, const std::string& file) {
  EffectiveConfig cfg = BuildConfig(className(), kDefaults, configText, overridesText, file);
  auto& r = cfg.reader();
  InitCommon(cfg, {"linear", "scaled_linear", "squaredcos_cap_v2"}, true);
  clipSample_ = r.Bool("clip_sample", true);
  clipSampleRange_ = r.Double("clip_sample_range", 1.0);
  finalAlphaCumprod_ = r.Bool("set_alpha_to_one", true) ? 1.0f : AlphaCumprod(0);
  if (predictionType_ != "epsilon" && predictionType_ != "v_prediction" && predictionType_ != "sample")
    r.Fail("prediction_type", "\"" + predictionType_ + "\" is not supported (choose \"epsilon\", \"v_prediction\" or \"sample\")");
  r.Expect("thresholding", "false", "dynamic thresholding is not implemented");
  r.Ignore({"dynamic_thresholding_ratio", "sample_max_value"});
  r.Finish();
  timesteps_ = at::arange(numTrainTimesteps_ - 1, -1, -1, at::kLong);
}

void DDIMScheduler::setTimesteps(int n) {
  std::vector<int64_t> ts = SpacedTimesteps("DDIMScheduler", timestepSpacing_, numTrainTimesteps_, n, stepsOffset_);
  numInferenceSteps_ = n;
  timesteps_ = at::tensor(ts, at::kLong);
}

at::Tensor DDIMScheduler::step(const at::Tensor& modelOutput, double tIn, const at::Tensor& sample,
                               const StepOptions& options) {
  RequireTimesteps("step");
  const int64_t t = IntTimestep(tIn);
  // DDIM steps by the fixed stride T // n, whatever the spacing of the schedule.
  const int64_t prevT = t - numTrainTimesteps_ / numInferenceSteps_;
  const float aT = AlphaCumprod(t);
  const float aPrev = prevT >= 0 ? AlphaCumprod(prevT) : finalAlphaCumprod_;
  const float bT = 1.0f - aT;

  at::Tensor x0, eps;
  if (predictionType_ == "epsilon") {
    x0 = (sample - modelOutput * f32::Sqrt(bT)) / f32::Sqrt(aT);
    eps = modelOutput;
  } else if (predictionType_ == "sample") {
    x0 = modelOutput;
    eps = (sample - x0 * f32::Sqrt(aT)) / f32::Sqrt(bT);
  } else {
    x0 = sample * f32::Sqrt(aT) - modelOutput * f32::Sqrt(bT);
    eps = modelOutput * f32::Sqrt(aT) + sample * f32::Sqrt(bT);
  }
  if (clipSample_) x0 = x0.clamp(-clipSampleRange_, clipSampleRange_);

  // σ_t(η) of formula (16): η·sqrt((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)).
  const float variance = ((1.0f - aPrev) / bT) * (1.0f - aT / aPrev);
  const float stdDev = static_cast<float>(options.eta) * f32::Sqrt(variance);
  if (options.useClippedModelOutput) eps = (sample - x0 * f32::Sqrt(aT)) / f32::Sqrt(bT);

  at::Tensor direction = eps * f32::Sqrt(1.0f - aPrev - stdDev * stdDev);
  at::Tensor prev = x0 * f32::Sqrt(aPrev) + direction;
  if (options.eta > 0) {
    Require(!(options.noise && options.generator), "DDIMScheduler.step: pass either noise or a generator, not both");
    prev = prev + StepNoise(modelOutput, options, modelOutput.scalar_type()) * stdDev;
  }
  return prev;
}

}  // namespace cd::schedulers
