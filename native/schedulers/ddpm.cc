#include "schedulers/ddpm.h"

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
    {"variance_type", "\"fixed_small\""},
    {"clip_sample", "true"},
    {"prediction_type", "\"epsilon\""},
    {"thresholding", "false"},
    {"dynamic_thresholding_ratio", "0.995"},
    {"clip_sample_range", "1.0"},
    {"sample_max_value", "1.0"},
    {"timestep_spacing", "\"leading\""},
    {"steps_offset", "0"},
    {"rescale_betas_zero_snr", "false"},
};

}  // namespace

DDPMScheduler::DDPMScheduler(const std::string& configText, const std::string& overridesText, const std::string& file) {
  EffectiveConfig cfg = BuildConfig(className(), kDefaults, configText, overridesText, file);
  auto& r = cfg.reader();
  InitCommon(cfg, {"linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"}, true);
  varianceType_ = r.String("variance_type", "fixed_small");
  if (varianceType_ != "fixed_small" && varianceType_ != "fixed_small_log" && varianceType_ != "fixed_large")
    r.Fail("variance_type", "\"" + varianceType_ +
                                "\" is not supported (choose \"fixed_small\", \"fixed_small_log\" or \"fixed_large\"; "
                                "learned variances need a model that predicts them)");
  clipSample_ = r.Bool("clip_sample", true);
  clipSampleRange_ = r.Double("clip_sample_range", 1.0);
  if (predictionType_ != "epsilon" && predictionType_ != "v_prediction" && predictionType_ != "sample")
    r.Fail("prediction_type", "\"" + predictionType_ + "\" is not supported (choose \"epsilon\", \"v_prediction\" or \"sample\")");
  r.Expect("thresholding", "false", "dynamic thresholding is not implemented");
  // Only read by thresholding, which is off.
  r.Ignore({"dynamic_thresholding_ratio", "sample_max_value"});
  r.Finish();
  // Before setTimesteps the schedule is every training timestep, descending.
  timesteps_ = at::arange(numTrainTimesteps_ - 1, -1, -1, at::kLong);
}

void DDPMScheduler::setTimesteps(int n) {
  std::vector<int64_t> ts = SpacedTimesteps("DDPMScheduler", timestepSpacing_, numTrainTimesteps_, n, stepsOffset_);
  numInferenceSteps_ = n;
  timesteps_ = at::tensor(ts, at::kLong);
}

// previous_timestep: the next entry of the schedule (its first occurrence of t), or t − 1 before
// setTimesteps (training-time use).
int64_t DDPMScheduler::PreviousTimestep(int64_t t) const {
  if (numInferenceSteps_ <= 0) return t - 1;
  std::vector<int64_t> hits = TimestepPositions(static_cast<double>(t));
  if (hits.empty())
    throw Error("INVALID_ARGUMENT", "DDPMScheduler.step: the timestep " + std::to_string(t) +
                                        " is not one of the scheduler's timesteps (pass the values of timesteps())");
  const int64_t i = hits[0];
  return i == timesteps_.numel() - 1 ? -1 : timesteps_[i + 1].item<int64_t>();
}

float DDPMScheduler::NoiseScale(int64_t t, int64_t prevT) const {
  const float aT = AlphaCumprod(t);
  const float aPrev = prevT >= 0 ? AlphaCumprod(prevT) : 1.0f;
  const float curBeta = 1.0f - aT / aPrev;
  // (1 − ᾱ_prev)/(1 − ᾱ_t)·β_t, clamped because the log form takes its log.
  const float variance = std::max((1.0f - aPrev) / (1.0f - aT) * curBeta, 1e-20f);
  if (varianceType_ == "fixed_small_log") return f32::Exp(0.5f * f32::Log(variance));
  if (varianceType_ == "fixed_large") return f32::Sqrt(curBeta);
  return f32::Sqrt(variance);
}

at::Tensor DDPMScheduler::step(const at::Tensor& modelOutput, double tIn, const at::Tensor& sample,
                               const StepOptions& options) {
  const int64_t t = IntTimestep(tIn);
  const int64_t prevT = PreviousTimestep(t);
  const float aT = AlphaCumprod(t);
  const float aPrev = prevT >= 0 ? AlphaCumprod(prevT) : 1.0f;
  const float bT = 1.0f - aT;
  const float bPrev = 1.0f - aPrev;
  const float curAlpha = aT / aPrev;
  const float curBeta = 1.0f - curAlpha;

  at::Tensor x0;
  if (predictionType_ == "epsilon") x0 = (sample - modelOutput * f32::Sqrt(bT)) / f32::Sqrt(aT);
  else if (predictionType_ == "sample") x0 = modelOutput;
  else x0 = sample * f32::Sqrt(aT) - modelOutput * f32::Sqrt(bT);
  if (clipSample_) x0 = x0.clamp(-clipSampleRange_, clipSampleRange_);

  // Formula (7) of Ho et al.: the posterior mean μ̃(x_t, x0).
  const float x0Coeff = (f32::Sqrt(aPrev) * curBeta) / bT;
  const float sampleCoeff = f32::Sqrt(curAlpha) * bPrev / bT;
  at::Tensor prev = x0 * x0Coeff + sample * sampleCoeff;
  if (t > 0) {
    at::Tensor noise = StepNoise(modelOutput, options, modelOutput.scalar_type());
    prev = prev + noise * NoiseScale(t, prevT);
  }
  return prev;
}

}  // namespace cd::schedulers
