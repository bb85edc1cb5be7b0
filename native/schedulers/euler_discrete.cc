#include "schedulers/euler_discrete.h"

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
    {"prediction_type", "\"epsilon\""},
    {"interpolation_type", "\"linear\""},
    {"use_karras_sigmas", "false"},
    {"use_exponential_sigmas", "false"},
    {"use_beta_sigmas", "false"},
    {"sigma_min", "null"},
    {"sigma_max", "null"},
    {"timestep_spacing", "\"linspace\""},
    {"timestep_type", "\"discrete\""},
    {"steps_offset", "0"},
    {"rescale_betas_zero_snr", "false"},
    {"final_sigmas_type", "\"zero\""},
};

}  // namespace

std::vector<float> EulerTimesteps(const std::string& spacing, int T, int n, int stepsOffset) {
  std::vector<float> ts;
  if (spacing == "linspace") {
    for (double x : np::Linspace(0, T - 1, n)) ts.push_back(static_cast<float>(x));
    std::reverse(ts.begin(), ts.end());
  } else if (spacing == "leading") {
    const int64_t ratio = T / n;
    for (int64_t i = n - 1; i >= 0; --i) ts.push_back(static_cast<float>(i * ratio) + static_cast<float>(stepsOffset));
  } else {
    const double ratio = static_cast<double>(T) / n;
    for (double x : np::Arange(T, 0, -ratio)) ts.push_back(static_cast<float>(np::Round(x)) - 1.0f);
  }
  return ts;
}

at::Tensor SigmaAddNoise(const Scheduler& s, const std::vector<int64_t>& indices, const at::Tensor& x0, const at::Tensor& noise) {
  at::Tensor sigma =
      s.sigmas().to(x0.device(), x0.scalar_type()).index({at::tensor(indices, at::kLong).to(x0.device())}).flatten();
  while (sigma.dim() < x0.dim()) sigma = sigma.unsqueeze(-1);
  return x0 + noise * sigma;
}

EulerDiscreteScheduler::EulerDiscreteScheduler(const std::string& configText, const std::string& overridesText,
                                               const std::string& file) {
  EffectiveConfig cfg = BuildConfig(className(), kDefaults, configText, overridesText, file);
  auto& r = cfg.reader();
  InitCommon(cfg, {"linear", "scaled_linear", "squaredcos_cap_v2"}, true, true);
  if (predictionType_ == "original_sample") predictionType_ = "sample";  // diffusers' old name
  if (predictionType_ != "epsilon" && predictionType_ != "v_prediction" && predictionType_ != "sample")
    r.Fail("prediction_type", "\"" + predictionType_ + "\" is not supported (choose \"epsilon\", \"v_prediction\" or \"sample\")");
  interpolationType_ = r.String("interpolation_type", "linear");
  if (interpolationType_ != "linear" && interpolationType_ != "log_linear")
    r.Fail("interpolation_type", "\"" + interpolationType_ + "\" is not supported (choose \"linear\" or \"log_linear\")");
  useKarrasSigmas_ = r.Bool("use_karras_sigmas", false);
  useExponentialSigmas_ = r.Bool("use_exponential_sigmas", false);
  r.Expect("use_beta_sigmas", "false", "beta sigmas are not implemented");
  if (useKarrasSigmas_ && useExponentialSigmas_)
    r.Fail("use_karras_sigmas", "only one of use_karras_sigmas and use_exponential_sigmas can be set");
  if (r.Has("sigma_min")) sigmaMin_ = r.Double("sigma_min", 0);
  else r.Ignore({"sigma_min"});
  if (r.Has("sigma_max")) sigmaMax_ = r.Double("sigma_max", 0);
  else r.Ignore({"sigma_max"});
  const std::string timestepType = r.String("timestep_type", "discrete");
  if (timestepType != "discrete" && timestepType != "continuous")
    r.Fail("timestep_type", "\"" + timestepType + "\" is not supported (choose \"discrete\" or \"continuous\")");
  continuousV_ = timestepType == "continuous" && predictionType_ == "v_prediction";
  finalSigmasType_ = r.String("final_sigmas_type", "zero");
  if (finalSigmasType_ != "zero" && finalSigmasType_ != "sigma_min")
    r.Fail("final_sigmas_type", "\"" + finalSigmasType_ + "\" is not supported (choose \"zero\" or \"sigma_min\")");
  r.Finish();

  // Before setTimesteps: every training timestep, σ descending, then 0.
  std::vector<float> table = SigmaTable(alphasCumprod_);
  std::reverse(table.begin(), table.end());
  std::vector<float> ts;
  for (double x : np::Linspace(0, numTrainTimesteps_ - 1, numTrainTimesteps_)) ts.push_back(static_cast<float>(x));
  std::reverse(ts.begin(), ts.end());
  if (continuousV_)
    for (size_t i = 0; i < ts.size(); ++i) ts[i] = 0.25f * f32::Log(table[i]);
  timesteps_ = at::tensor(ts, at::kFloat);
  table.push_back(0.0f);
  SetSigmas(std::move(table));
}

void EulerDiscreteScheduler::SetSigmas(std::vector<float> sigmas) {
  sigmasHost_ = std::move(sigmas);
  sigmas_ = at::tensor(sigmasHost_, at::kFloat);
}

void EulerDiscreteScheduler::setTimesteps(int n) {
  Require(n >= 1, "EulerDiscreteScheduler.setTimesteps: the number of steps must be at least 1");
  numInferenceSteps_ = n;
  const std::vector<float> ts32 = EulerTimesteps(timestepSpacing_, numTrainTimesteps_, n, stepsOffset_);
  std::vector<double> ts(ts32.begin(), ts32.end());
  const std::vector<float> table = SigmaTable(alphasCumprod_);
  const std::vector<float> logSigmas = LogSigmaTable(table);
  std::vector<double> sig;
  if (interpolationType_ == "linear") {
    std::vector<double> fp(table.begin(), table.end());
    for (double t : ts) sig.push_back(np::InterpIndex(t, fp));
  } else {
    // log_linear: n + 1 σ evenly spaced in log σ, computed by torch in float32.
    // The end points are numpy float32 logs.
    at::Tensor l = at::linspace(static_cast<double>(NumpyLogf(table.back())), static_cast<double>(NumpyLogf(table.front())),
                                n + 1, at::kFloat)
                       .exp();
    sig.assign(l.data_ptr<float>(), l.data_ptr<float>() + l.numel());
  }
  if (useKarrasSigmas_ || useExponentialSigmas_) {
    const double lo = sigmaMin_.value_or(sig.back()), hi = sigmaMax_.value_or(sig.front());
    sig = useKarrasSigmas_ ? KarrasSigmas(lo, hi, n) : ExponentialSigmas(lo, hi, n);
    ts.clear();
    for (double s : sig) ts.push_back(SigmaToT(s, logSigmas));
  }
  const float sigmaLast = finalSigmasType_ == "zero" ? 0.0f : f32::Sqrt((1.0f - AlphaCumprod(0)) / AlphaCumprod(0));
  std::vector<float> sigmas;
  for (double s : sig) sigmas.push_back(static_cast<float>(s));
  sigmas.push_back(sigmaLast);
  std::vector<float> outTs;
  if (continuousV_) {
    for (size_t i = 0; i + 1 < sigmas.size(); ++i) outTs.push_back(0.25f * f32::Log(sigmas[i]));
  } else {
    for (double t : ts) outTs.push_back(static_cast<float>(t));
  }
  SetSigmas(std::move(sigmas));
  timesteps_ = at::tensor(outTs, at::kFloat);
  stepIndex_ = -1;
  beginIndex_ = -1;
}

double EulerSigmaScheduler::initNoiseSigma() const {
  const float maxSigma = *std::max_element(sigmasHost_.begin(), sigmasHost_.end());
  if (timestepSpacing_ == "linspace" || timestepSpacing_ == "trailing") return maxSigma;
  return f32::Sqrt(maxSigma * maxSigma + 1.0f);
}

at::Tensor EulerSigmaScheduler::scaleModelInput(const at::Tensor& sample, double t) {
  if (stepIndex_ < 0) InitStepIndex(t, false);
  const float sigma = sigmasHost_[static_cast<size_t>(stepIndex_)];
  // The model sees inputs of unit variance: x / sqrt(σ² + 1).
  return sample / f32::Sqrt(sigma * sigma + 1.0f);
}

at::Tensor EulerDiscreteScheduler::step(const at::Tensor& modelOutput, double t, const at::Tensor& sampleIn,
                                        const StepOptions& options) {
  if (stepIndex_ < 0) InitStepIndex(t, false);
  Require(stepIndex_ + 1 < static_cast<int64_t>(sigmasHost_.size()),
          "EulerDiscreteScheduler.step: the schedule is finished (call setTimesteps again)");
  at::Tensor sample = sampleIn.to(at::kFloat);
  const float sigma = sigmasHost_[static_cast<size_t>(stepIndex_)];
  const double gamma = (options.sTmin <= sigma && sigma <= options.sTmax)
                           ? std::min(options.sChurn / static_cast<double>(sigmasHost_.size() - 1), std::pow(2.0, 0.5) - 1)
                           : 0.0;
  const float sigmaHat = sigma * static_cast<float>(gamma + 1);
  if (gamma > 0) {
    at::Tensor eps = StepNoise(modelOutput, options, modelOutput.scalar_type()) * options.sNoise;
    sample = sample + eps * f32::Sqrt(sigmaHat * sigmaHat - sigma * sigma);
  }
  at::Tensor x0;
  if (predictionType_ == "sample") x0 = modelOutput;
  else if (predictionType_ == "epsilon") x0 = sample - modelOutput * sigmaHat;
  else x0 = modelOutput * (-sigma / f32::Sqrt(sigma * sigma + 1.0f)) + sample / (sigma * sigma + 1.0f);
  // The ODE derivative dx/dσ, one Euler step to the next σ.
  at::Tensor derivative = (sample - x0) / sigmaHat;
  const float dt = sigmasHost_[static_cast<size_t>(stepIndex_ + 1)] - sigmaHat;
  at::Tensor prev = sample + derivative * dt;
  ++stepIndex_;
  return prev.to(modelOutput.scalar_type());
}

at::Tensor EulerSigmaScheduler::addNoise(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) {
  Require(timesteps.dim() <= 1, "addNoise: timesteps must be a scalar or a 1-D tensor");
  at::Tensor ts = timesteps.to(at::kCPU, at::kDouble).contiguous().view(-1);
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < ts.numel(); ++i) {
    if (beginIndex_ < 0) idx.push_back(IndexForTimestep(ts.data_ptr<double>()[i], false));
    else idx.push_back(stepIndex_ >= 0 ? stepIndex_ : beginIndex_);
  }
  return SigmaAddNoise(*this, idx, x0, noise);
}

}  // namespace cd::schedulers
