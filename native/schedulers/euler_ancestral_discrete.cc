#include "schedulers/euler_ancestral_discrete.h"

#include <algorithm>
#include <cmath>

#include "core/errors.h"
#include "schedulers/euler_discrete.h"

namespace cd::schedulers {

namespace {

const std::vector<std::pair<const char*, const char*>> kDefaults = {
    {"num_train_timesteps", "1000"},
    {"beta_start", "0.0001"},
    {"beta_end", "0.02"},
    {"beta_schedule", "\"linear\""},
    {"trained_betas", "null"},
    {"prediction_type", "\"epsilon\""},
    {"timestep_spacing", "\"linspace\""},
    {"steps_offset", "0"},
    {"rescale_betas_zero_snr", "false"},
};

}  // namespace

EulerAncestralDiscreteScheduler::EulerAncestralDiscreteScheduler(const std::string& configText,
                                                                 const std::string& overridesText, const std::string& file) {
  EffectiveConfig cfg = BuildConfig(className(), kDefaults, configText, overridesText, file);
  auto& r = cfg.reader();
  InitCommon(cfg, {"linear", "scaled_linear", "squaredcos_cap_v2"}, true, true);
  if (predictionType_ != "epsilon" && predictionType_ != "v_prediction")
    r.Fail("prediction_type", "\"" + predictionType_ +
                                  "\" is not supported by EulerAncestralDiscreteScheduler (choose \"epsilon\" or \"v_prediction\")");
  r.Finish();
  std::vector<float> table = SigmaTable(alphasCumprod_);
  std::reverse(table.begin(), table.end());
  table.push_back(0.0f);
  sigmasHost_ = table;
  sigmas_ = at::tensor(sigmasHost_, at::kFloat);
  // diffusers keeps these initial timesteps in float64.
  timesteps_ = at::tensor(np::Linspace(0, numTrainTimesteps_ - 1, numTrainTimesteps_), at::kDouble).flip(0);
}

void EulerAncestralDiscreteScheduler::setTimesteps(int n) {
  Require(n >= 1, "EulerAncestralDiscreteScheduler.setTimesteps: the number of steps must be at least 1");
  numInferenceSteps_ = n;
  const std::vector<float> ts = EulerTimesteps(timestepSpacing_, numTrainTimesteps_, n, stepsOffset_);
  const std::vector<float> table = SigmaTable(alphasCumprod_);
  std::vector<double> fp(table.begin(), table.end());
  sigmasHost_.clear();
  for (float t : ts) sigmasHost_.push_back(static_cast<float>(np::InterpIndex(t, fp)));
  sigmasHost_.push_back(0.0f);
  sigmas_ = at::tensor(sigmasHost_, at::kFloat);
  timesteps_ = at::tensor(ts, at::kFloat);
  stepIndex_ = -1;
  beginIndex_ = -1;
}

at::Tensor EulerAncestralDiscreteScheduler::step(const at::Tensor& modelOutput, double t, const at::Tensor& sampleIn,
                                                 const StepOptions& options) {
  if (stepIndex_ < 0) InitStepIndex(t, false);
  Require(stepIndex_ + 1 < static_cast<int64_t>(sigmasHost_.size()),
          "EulerAncestralDiscreteScheduler.step: the schedule is finished (call setTimesteps again)");
  const float sigma = sigmasHost_[static_cast<size_t>(stepIndex_)];
  at::Tensor sample = sampleIn.to(at::kFloat);
  at::Tensor x0 = predictionType_ == "epsilon"
                      ? sample - modelOutput * sigma
                      : modelOutput * (-sigma / f32::Sqrt(sigma * sigma + 1.0f)) + sample / (sigma * sigma + 1.0f);
  // Split the move to σ_next into a deterministic part (to σ_down) and fresh noise (σ_up), with
  // σ_down² + σ_up² = σ_next².
  const float from = sigma, to = sigmasHost_[static_cast<size_t>(stepIndex_ + 1)];
  const float sigmaUp = f32::Sqrt(to * to * (from * from - to * to) / (from * from));
  const float sigmaDown = f32::Sqrt(to * to - sigmaUp * sigmaUp);
  at::Tensor derivative = (sample - x0) / sigma;
  const float dt = sigmaDown - sigma;
  at::Tensor prev = sample + derivative * dt;
  at::Tensor noise = StepNoise(modelOutput, options, modelOutput.scalar_type());
  prev = prev + noise * sigmaUp;
  ++stepIndex_;
  return prev.to(modelOutput.scalar_type());
}

}  // namespace cd::schedulers
