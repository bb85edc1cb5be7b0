#include "schedulers/pndm.h"

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
    {"skip_prk_steps", "false"},
    {"set_alpha_to_one", "false"},
    {"prediction_type", "\"epsilon\""},
    {"timestep_spacing", "\"leading\""},
    {"steps_offset", "0"},
};

}  // namespace

PNDMScheduler::PNDMScheduler(const std::string& configText, const std::string& overridesText, const std::string& file) {
  EffectiveConfig cfg = BuildConfig(className(), kDefaults, configText, overridesText, file);
  auto& r = cfg.reader();
  InitCommon(cfg, {"linear", "scaled_linear", "squaredcos_cap_v2"}, false);
  skipPrkSteps_ = r.Bool("skip_prk_steps", false);
  finalAlphaCumprod_ = r.Bool("set_alpha_to_one", false) ? 1.0f : AlphaCumprod(0);
  if (predictionType_ != "epsilon" && predictionType_ != "v_prediction")
    r.Fail("prediction_type", "\"" + predictionType_ + "\" is not supported by PNDMScheduler (choose \"epsilon\" or \"v_prediction\")");
  r.Finish();
}

void PNDMScheduler::setTimesteps(int n) {
  Require(skipPrkSteps_ || n >= 4, "PNDMScheduler.setTimesteps: the Runge-Kutta warm-up (skip_prk_steps false) needs at least 4 steps");
  // The schedule in ascending order (diffusers' _timesteps).
  std::vector<int64_t> asc = SpacedTimesteps("PNDMScheduler", timestepSpacing_, numTrainTimesteps_, n, stepsOffset_);
  std::reverse(asc.begin(), asc.end());
  const auto m = static_cast<int64_t>(asc.size());
  std::vector<int64_t> all;
  prkTimesteps_.clear();
  if (skipPrkSteps_) {
    // PLMS needs one extra model evaluation to start: the second timestep is visited twice.
    std::vector<int64_t> plms(asc.begin(), asc.end() - 1);
    if (m >= 2) plms.push_back(asc[m - 2]);
    plms.push_back(asc[m - 1]);
    std::reverse(plms.begin(), plms.end());
    all = plms;
  } else {
    // Four Runge-Kutta steps on the last four timesteps, each with a half step between.
    const int64_t half = numTrainTimesteps_ / n / 2;
    std::vector<int64_t> prk;
    for (int64_t i = m - 4; i < m; ++i) {
      prk.push_back(asc[i]);
      prk.push_back(asc[i] + half);
    }
    prk.pop_back();
    std::vector<int64_t> rep;
    for (int64_t x : prk) {
      rep.push_back(x);
      rep.push_back(x);
    }
    prkTimesteps_.assign(rep.begin() + 1, rep.end() - 1);
    std::reverse(prkTimesteps_.begin(), prkTimesteps_.end());
    all = prkTimesteps_;
    for (int64_t i = m - 4; i >= 0; --i) all.push_back(asc[i]);
  }
  timesteps_ = at::tensor(all, at::kLong);
  numInferenceSteps_ = n;
  counter_ = 0;
  ets_.clear();
  curSample_ = at::Tensor();
  curModelOutput_ = at::Tensor();
}

float PNDMScheduler::Alpha(int64_t t, const char* what) const {
  if (t < 0 || t >= numTrainTimesteps_)
    throw Error("INVALID_ARGUMENT", std::string("PNDMScheduler.step: the ") + what + " timestep " + std::to_string(t) +
                                        " is outside [0, " + std::to_string(numTrainTimesteps_) + ")");
  return AlphaCumprod(t);
}

at::Tensor PNDMScheduler::PrevSample(const at::Tensor& sample, int64_t t, int64_t prevT, const at::Tensor& modelOutputIn) const {
  const float aT = Alpha(t, "current");
  const float aPrev = prevT >= 0 ? Alpha(prevT, "previous") : finalAlphaCumprod_;
  const float bT = 1.0f - aT;
  const float bPrev = 1.0f - aPrev;
  at::Tensor modelOutput = modelOutputIn;
  if (predictionType_ == "v_prediction") modelOutput = modelOutput * f32::Sqrt(aT) + sample * f32::Sqrt(bT);
  // (ᾱ_prev − ᾱ_t) / (sqrt(ᾱ_t)·(sqrt(ᾱ_prev) + sqrt(ᾱ_t))) rewritten as in the paper's formula (9).
  const float sampleCoeff = f32::Sqrt(aPrev / aT);
  const float denom = aT * f32::Sqrt(bPrev) + f32::Sqrt(aT * bT * aPrev);
  return sample * sampleCoeff - modelOutput * (aPrev - aT) / denom;
}

at::Tensor PNDMScheduler::step(const at::Tensor& modelOutput, double tIn, const at::Tensor& sample, const StepOptions&) {
  RequireTimesteps("step");
  const int64_t t = IntTimestep(tIn);
  if (counter_ < static_cast<int64_t>(prkTimesteps_.size()) && !skipPrkSteps_) return StepPrk(modelOutput, t, sample);
  return StepPlms(modelOutput, t, sample);
}

at::Tensor PNDMScheduler::StepPrk(const at::Tensor& modelOutputIn, int64_t t, const at::Tensor& sample) {
  const int64_t diffToPrev = counter_ % 2 ? 0 : numTrainTimesteps_ / numInferenceSteps_ / 2;
  const int64_t prevT = t - diffToPrev;
  const int64_t rkT = prkTimesteps_[static_cast<size_t>(counter_ / 4 * 4)];
  at::Tensor modelOutput = modelOutputIn;
  auto accumulate = [&](double w) {
    at::Tensor term = modelOutput * w;
    curModelOutput_ = curModelOutput_.defined() ? curModelOutput_ + term : term;
  };
  switch (counter_ % 4) {
    case 0:
      accumulate(1.0 / 6);
      ets_.push_back(modelOutput);
      curSample_ = sample;
      break;
    case 1:
    case 2: accumulate(1.0 / 3); break;
    default: {
      at::Tensor term = modelOutput * (1.0 / 6);
      modelOutput = curModelOutput_.defined() ? curModelOutput_ + term : term;
      curModelOutput_ = at::Tensor();
    }
  }
  const at::Tensor& curSample = curSample_.defined() ? curSample_ : sample;
  at::Tensor prev = PrevSample(curSample, rkT, prevT, modelOutput);
  ++counter_;
  return prev;
}

at::Tensor PNDMScheduler::StepPlms(const at::Tensor& modelOutputIn, int64_t tIn, const at::Tensor& sampleIn) {
  if (!skipPrkSteps_ && ets_.size() < 3)
    throw Error("INVALID_ARGUMENT", "PNDMScheduler: the linear multistep steps can only run after the 12 Runge-Kutta steps");
  const int64_t stride = numTrainTimesteps_ / numInferenceSteps_;
  int64_t t = tIn;
  int64_t prevT = t - stride;
  if (counter_ != 1) {
    if (ets_.size() > 3) ets_.erase(ets_.begin(), ets_.end() - 3);
    ets_.push_back(modelOutputIn);
  } else {
    // The repeated warm-up step: it evaluates the model at the same timestep again and averages the
    // two ε to make one step from the previous timestep.
    prevT = t;
    t = t + stride;
  }
  at::Tensor modelOutput = modelOutputIn;
  at::Tensor sample = sampleIn;
  const size_t k = ets_.size();
  if (k == 1 && counter_ == 0) {
    curSample_ = sample;
  } else if (k == 1 && counter_ == 1) {
    modelOutput = (modelOutput + ets_[k - 1]) / 2;
    sample = curSample_;
    curSample_ = at::Tensor();
  } else if (k == 2) {
    modelOutput = (ets_[k - 1] * 3 - ets_[k - 2]) / 2;
  } else if (k == 3) {
    modelOutput = (ets_[k - 1] * 23 - ets_[k - 2] * 16 + ets_[k - 3] * 5) / 12;
  } else {
    modelOutput = (ets_[k - 1] * 55 - ets_[k - 2] * 59 + ets_[k - 3] * 37 - ets_[k - 4] * 9) * (1.0 / 24);
  }
  at::Tensor prev = PrevSample(sample, t, prevT, modelOutput);
  ++counter_;
  return prev;
}

}  // namespace cd::schedulers
