#include "schedulers/dpm_solver_multistep.h"

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
    {"solver_order", "2"},
    {"prediction_type", "\"epsilon\""},
    {"thresholding", "false"},
    {"dynamic_thresholding_ratio", "0.995"},
    {"sample_max_value", "1.0"},
    {"algorithm_type", "\"dpmsolver++\""},
    {"solver_type", "\"midpoint\""},
    {"lower_order_final", "true"},
    {"euler_at_final", "false"},
    {"use_karras_sigmas", "false"},
    {"use_exponential_sigmas", "false"},
    {"use_beta_sigmas", "false"},
    {"use_lu_lambdas", "false"},
    {"use_flow_sigmas", "false"},
    {"flow_shift", "1.0"},
    {"final_sigmas_type", "\"zero\""},
    {"lambda_min_clipped", "-1e999"},
    {"variance_type", "null"},
    {"timestep_spacing", "\"linspace\""},
    {"steps_offset", "0"},
    {"rescale_betas_zero_snr", "false"},
    {"use_dynamic_shifting", "false"},
    {"time_shift_type", "\"exponential\""},
};

// α_t and σ_t of the VP process from the noise level σ (float32, as diffusers' 0-dim tensors).
struct AlphaSigma {
  float alpha, sigma, lambda;
};

AlphaSigma FromSigma(float sigma) {
  const float alpha = 1.0f / f32::Sqrt(sigma * sigma + 1.0f);
  const float s = sigma * alpha;
  return {alpha, s, f32::Log(alpha) - f32::Log(s)};
}

}  // namespace

DPMSolverMultistepScheduler::DPMSolverMultistepScheduler(const std::string& configText, const std::string& overridesText,
                                                         const std::string& file) {
  EffectiveConfig cfg = BuildConfig(className(), kDefaults, configText, overridesText, file);
  auto& r = cfg.reader();
  InitCommon(cfg, {"linear", "scaled_linear", "squaredcos_cap_v2"}, true, true);
  solverOrder_ = r.Int("solver_order", 2);
  if (solverOrder_ < 1 || solverOrder_ > 3) r.Fail("solver_order", "must be 1, 2 or 3");
  if (predictionType_ != "epsilon" && predictionType_ != "v_prediction" && predictionType_ != "sample")
    r.Fail("prediction_type", "\"" + predictionType_ + "\" is not supported (choose \"epsilon\", \"v_prediction\" or \"sample\")");
  r.Expect("thresholding", "false", "dynamic thresholding is not implemented");
  r.Ignore({"dynamic_thresholding_ratio", "sample_max_value"});
  algorithmType_ = r.String("algorithm_type", "dpmsolver++");
  if (algorithmType_ == "deis") algorithmType_ = "dpmsolver++";  // diffusers maps it so
  if (algorithmType_ != "dpmsolver++" && algorithmType_ != "sde-dpmsolver++")
    r.Fail("algorithm_type", "\"" + algorithmType_ +
                                 "\" is not supported (choose \"dpmsolver++\" or \"sde-dpmsolver++\"; diffusers deprecates the "
                                 "noise-prediction variants)");
  solverType_ = r.String("solver_type", "midpoint");
  if (solverType_ == "logrho" || solverType_ == "bh1" || solverType_ == "bh2") solverType_ = "midpoint";  // as diffusers
  if (solverType_ != "midpoint" && solverType_ != "heun")
    r.Fail("solver_type", "\"" + solverType_ + "\" is not supported (choose \"midpoint\" or \"heun\")");
  lowerOrderFinal_ = r.Bool("lower_order_final", true);
  eulerAtFinal_ = r.Bool("euler_at_final", false);
  useKarrasSigmas_ = r.Bool("use_karras_sigmas", false);
  useExponentialSigmas_ = r.Bool("use_exponential_sigmas", false);
  r.Expect("use_beta_sigmas", "false", "beta sigmas are not implemented");
  r.Expect("use_flow_sigmas", "false", "flow-matching sigmas are not implemented");
  useLuLambdas_ = r.Bool("use_lu_lambdas", false);
  if (useKarrasSigmas_ && useExponentialSigmas_)
    r.Fail("use_karras_sigmas", "only one of use_karras_sigmas and use_exponential_sigmas can be set");
  // flow_shift is read only by flow sigmas; dynamic shifting only acts when set_timesteps gets mu.
  r.Ignore({"flow_shift", "use_dynamic_shifting", "time_shift_type"});
  finalSigmasType_ = r.String("final_sigmas_type", "zero");
  if (finalSigmasType_ != "zero" && finalSigmasType_ != "sigma_min")
    r.Fail("final_sigmas_type", "\"" + finalSigmasType_ + "\" is not supported (choose \"zero\" or \"sigma_min\")");
  lambdaMinClipped_ = r.Double("lambda_min_clipped", -std::numeric_limits<double>::infinity());
  const std::string varianceType = r.String("variance_type", "");
  if (varianceType == "learned" || varianceType == "learned_range")
    r.Fail("variance_type", "learned variances are not supported");
  r.Finish();
  timesteps_ = at::arange(numTrainTimesteps_ - 1, -1, -1, at::kLong);
}

void DPMSolverMultistepScheduler::setTimesteps(int n) {
  Require(n >= 1, "DPMSolverMultistepScheduler.setTimesteps: the number of steps must be at least 1");
  const int T = numTrainTimesteps_;
  // Clip the schedule where λ(t) falls below lambda_min_clipped (critical for cosine schedules).
  at::Tensor lambdaT = at::log(at::sqrt(alphasCumprod_)) - at::log(at::sqrt(at::rsub(alphasCumprod_, 1)));
  at::Tensor flipped = lambdaT.flip(0).contiguous();
  int64_t clippedIdx = 0;
  for (int64_t i = 0; i < flipped.numel(); ++i)
    if (static_cast<double>(flipped.data_ptr<float>()[i]) < lambdaMinClipped_) clippedIdx = i + 1;
  const int64_t last = T - clippedIdx;

  std::vector<double> ts;  // float64 like numpy, converted to int64 at the end
  if (timestepSpacing_ == "linspace") {
    std::vector<double> l = np::Linspace(0, static_cast<double>(last - 1), n + 1);
    for (int64_t i = n; i >= 1; --i) ts.push_back(np::Round(l[i]));
  } else if (timestepSpacing_ == "leading") {
    const int64_t ratio = last / (n + 1);
    for (int64_t i = n; i >= 1; --i) ts.push_back(static_cast<double>(i * ratio + stepsOffset_));
  } else {
    const double ratio = static_cast<double>(T) / n;
    for (double x : np::Arange(static_cast<double>(last), 0, -ratio)) ts.push_back(np::Round(x) - 1);
  }

  const std::vector<float> table = SigmaTable(alphasCumprod_);
  const std::vector<float> logSigmas = LogSigmaTable(table);
  const bool cosine = betaSchedule_ == "squaredcos_cap_v2";
  std::vector<double> sig;
  if (useKarrasSigmas_ || useExponentialSigmas_ || useLuLambdas_) {
    if (useKarrasSigmas_) sig = KarrasSigmas(table.front(), table.back(), n);
    else if (useExponentialSigmas_) sig = ExponentialSigmas(table.front(), table.back(), n);
    else {
      // Lu et al.'s uniform steps in log σ (diffusers calls them lambdas; ρ = 1).
      std::vector<double> ramp = np::Linspace(0, 1, n);
      const double lmin = logSigmas.front(), lmax = logSigmas.back();
      for (double r : ramp) sig.push_back(std::exp(lmax + r * (lmin - lmax)));  // numpy float64
    }
    ts.clear();
    for (double s : sig) {
      double t = SigmaToT(s, logSigmas);
      // diffusers rounds these (except for exponential sigmas and the cosine schedule).
      if (!useExponentialSigmas_ && !cosine) t = np::Round(t);
      ts.push_back(t);
    }
  } else {
    std::vector<double> fp(table.begin(), table.end());
    for (double t : ts) sig.push_back(np::InterpIndex(t, fp));
  }
  const float sigmaLast =
      finalSigmasType_ == "zero" ? 0.0f : f32::Sqrt((1.0f - AlphaCumprod(0)) / AlphaCumprod(0));
  sigmasHost_.clear();
  for (double s : sig) sigmasHost_.push_back(static_cast<float>(s));
  sigmasHost_.push_back(sigmaLast);
  sigmas_ = at::tensor(sigmasHost_, at::kFloat);
  std::vector<int64_t> its;
  for (double t : ts) its.push_back(static_cast<int64_t>(t));  // numpy's astype(int64) truncates
  timesteps_ = at::tensor(its, at::kLong);
  numInferenceSteps_ = static_cast<int>(its.size());

  modelOutputs_.assign(static_cast<size_t>(solverOrder_), at::Tensor());
  lowerOrderNums_ = 0;
  stepIndex_ = -1;
  beginIndex_ = -1;
}

at::Tensor DPMSolverMultistepScheduler::ConvertModelOutput(const at::Tensor& modelOutput, const at::Tensor& sample) const {
  if (predictionType_ == "sample") return modelOutput;
  const AlphaSigma s = FromSigma(Sigma(stepIndex_));
  if (predictionType_ == "epsilon") return (sample - modelOutput * s.sigma) / s.alpha;
  return sample * s.alpha - modelOutput * s.sigma;  // v_prediction
}

at::Tensor DPMSolverMultistepScheduler::FirstOrderUpdate(const at::Tensor& m0, const at::Tensor& sample,
                                                         const at::Tensor& noise) const {
  const AlphaSigma t = FromSigma(Sigma(stepIndex_ + 1));
  const AlphaSigma s = FromSigma(Sigma(stepIndex_));
  const float h = t.lambda - s.lambda;
  if (algorithmType_ == "dpmsolver++") return sample * (t.sigma / s.sigma) - m0 * (t.alpha * (f32::Exp(-h) - 1.0f));
  const float e2h = f32::Exp(-2.0f * h);
  return sample * (t.sigma / s.sigma * f32::Exp(-h)) + m0 * (t.alpha * (1.0f - e2h)) + noise * (t.sigma * f32::Sqrt(1.0f - e2h));
}

at::Tensor DPMSolverMultistepScheduler::SecondOrderUpdate(const at::Tensor& sample, const at::Tensor& noise) const {
  const AlphaSigma t = FromSigma(Sigma(stepIndex_ + 1));
  const AlphaSigma s0 = FromSigma(Sigma(stepIndex_));
  const AlphaSigma s1 = FromSigma(Sigma(stepIndex_ - 1));
  const at::Tensor& m0 = modelOutputs_[modelOutputs_.size() - 1];
  const at::Tensor& m1 = modelOutputs_[modelOutputs_.size() - 2];
  const float h = t.lambda - s0.lambda, h0 = s0.lambda - s1.lambda;
  const float r0 = h0 / h;
  const at::Tensor& d0 = m0;
  at::Tensor d1 = (m0 - m1) * (1.0f / r0);
  if (algorithmType_ == "dpmsolver++") {
    const float c0 = t.alpha * (f32::Exp(-h) - 1.0f);
    at::Tensor x = sample * (t.sigma / s0.sigma) - d0 * c0;
    if (solverType_ == "midpoint") return x - d1 * (0.5f * c0);
    return x + d1 * (t.alpha * ((f32::Exp(-h) - 1.0f) / h + 1.0f));
  }
  const float e2h = f32::Exp(-2.0f * h);
  const float c0 = t.alpha * (1.0f - e2h);
  at::Tensor x = sample * (t.sigma / s0.sigma * f32::Exp(-h)) + d0 * c0;
  if (solverType_ == "midpoint") x = x + d1 * (0.5f * c0);
  else x = x + d1 * (t.alpha * ((1.0f - e2h) / (-2.0f * h) + 1.0f));
  return x + noise * (t.sigma * f32::Sqrt(1.0f - e2h));
}

at::Tensor DPMSolverMultistepScheduler::ThirdOrderUpdate(const at::Tensor& sample) const {
  const AlphaSigma t = FromSigma(Sigma(stepIndex_ + 1));
  const AlphaSigma s0 = FromSigma(Sigma(stepIndex_));
  const AlphaSigma s1 = FromSigma(Sigma(stepIndex_ - 1));
  const AlphaSigma s2 = FromSigma(Sigma(stepIndex_ - 2));
  const size_t k = modelOutputs_.size();
  const at::Tensor &m0 = modelOutputs_[k - 1], &m1 = modelOutputs_[k - 2], &m2 = modelOutputs_[k - 3];
  const float h = t.lambda - s0.lambda, h0 = s0.lambda - s1.lambda, h1 = s1.lambda - s2.lambda;
  const float r0 = h0 / h, r1 = h1 / h;
  at::Tensor d10 = (m0 - m1) * (1.0f / r0);
  at::Tensor d11 = (m1 - m2) * (1.0f / r1);
  at::Tensor d1 = d10 + (d10 - d11) * (r0 / (r0 + r1));
  at::Tensor d2 = (d10 - d11) * (1.0f / (r0 + r1));
  const float em = f32::Exp(-h);
  return sample * (t.sigma / s0.sigma) - m0 * (t.alpha * (em - 1.0f)) + d1 * (t.alpha * ((em - 1.0f) / h + 1.0f)) -
         d2 * (t.alpha * ((em - 1.0f + h) / (h * h) - 0.5f));
}

at::Tensor DPMSolverMultistepScheduler::step(const at::Tensor& modelOutput, double t, const at::Tensor& sample,
                                             const StepOptions& options) {
  RequireTimesteps("step");
  if (stepIndex_ < 0) InitStepIndex(t, true);
  const int64_t n = timesteps_.numel();
  Require(stepIndex_ < n, "DPMSolverMultistepScheduler.step: the schedule of " + std::to_string(n) +
                              " steps is finished (call setTimesteps again)");
  // Lower orders at the end improve stability for few steps; the last step into σ = 0 must be first order.
  const bool lowerOrderFinal =
      stepIndex_ == n - 1 && (eulerAtFinal_ || (lowerOrderFinal_ && n < 15) || finalSigmasType_ == "zero");
  const bool lowerOrderSecond = stepIndex_ == n - 2 && lowerOrderFinal_ && n < 15;

  at::Tensor m = ConvertModelOutput(modelOutput, sample);
  for (int i = 0; i + 1 < solverOrder_; ++i) modelOutputs_[i] = modelOutputs_[i + 1];
  modelOutputs_.back() = m;

  at::Tensor x = sample.to(at::kFloat);
  at::Tensor noise;
  if (algorithmType_ == "sde-dpmsolver++") noise = StepNoise(m, options, at::kFloat);

  at::Tensor prev;
  if (solverOrder_ == 1 || lowerOrderNums_ < 1 || lowerOrderFinal) prev = FirstOrderUpdate(m, x, noise);
  else if (solverOrder_ == 2 || lowerOrderNums_ < 2 || lowerOrderSecond) prev = SecondOrderUpdate(x, noise);
  else {
    Require(algorithmType_ == "dpmsolver++", "DPMSolverMultistepScheduler: third order is implemented for dpmsolver++ only");
    prev = ThirdOrderUpdate(x);
  }
  if (lowerOrderNums_ < solverOrder_) ++lowerOrderNums_;
  ++stepIndex_;
  return prev.to(m.scalar_type());
}

at::Tensor DPMSolverMultistepScheduler::addNoise(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) {
  RequireTimesteps("addNoise");
  Require(timesteps.dim() <= 1, "addNoise: timesteps must be a scalar or a 1-D tensor");
  at::Tensor ts = timesteps.to(at::kCPU, at::kDouble).contiguous().view(-1);
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < ts.numel(); ++i) {
    if (beginIndex_ < 0) idx.push_back(IndexForTimestep(ts.data_ptr<double>()[i], true));
    else idx.push_back(stepIndex_ >= 0 ? stepIndex_ : beginIndex_);
  }
  at::Tensor sigma = sigmas_.to(x0.device(), x0.scalar_type()).index({at::tensor(idx, at::kLong).to(x0.device())}).flatten();
  while (sigma.dim() < x0.dim()) sigma = sigma.unsqueeze(-1);
  at::Tensor alphaT = at::reciprocal(at::pow(at::pow(sigma, 2) + 1, 0.5));
  at::Tensor sigmaT = sigma * alphaT;
  return alphaT * x0 + sigmaT * noise;
}

}  // namespace cd::schedulers
