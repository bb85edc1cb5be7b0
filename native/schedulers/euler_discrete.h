// EulerDiscreteScheduler (diffusers scheduling_euler_discrete.py): Euler's method on the
// probability-flow ODE in σ (Karras et al. 2022, Algorithm 2, with optional churn).
#pragma once

#include "schedulers/scheduler.h"

namespace cd::schedulers {

// The float32 timesteps of the Euler schedulers for a spacing (before any σ re-spacing).
std::vector<float> EulerTimesteps(const std::string& spacing, int numTrain, int n, int stepsOffset);

// What both Euler schedulers share: a σ per step (kept on the host, as diffusers indexes it), model
// inputs scaled to unit variance, initial noise of the largest σ.
class EulerSigmaScheduler : public Scheduler {
 public:
  double initNoiseSigma() const override;
  at::Tensor scaleModelInput(const at::Tensor& sample, double t) override;
  // x0 + σ(t)·noise, with σ looked up by timestep (or the current step) as diffusers does.
  at::Tensor addNoise(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) override;

 protected:
  std::vector<float> sigmasHost_;
};

class EulerDiscreteScheduler : public EulerSigmaScheduler {
 public:
  EulerDiscreteScheduler(const std::string& configText, const std::string& overridesText, const std::string& file);
  const char* className() const override { return "EulerDiscreteScheduler"; }
  void setTimesteps(int n) override;
  at::Tensor step(const at::Tensor& modelOutput, double t, const at::Tensor& sample, const StepOptions& options) override;

 private:
  void SetSigmas(std::vector<float> sigmas);
  std::string interpolationType_;
  bool useKarrasSigmas_ = false;
  bool useExponentialSigmas_ = false;
  std::optional<double> sigmaMin_, sigmaMax_;
  bool continuousV_ = false;  // timestep_type "continuous" with v_prediction: t = ¼·log σ
  std::string finalSigmasType_;
};

// Shared by both Euler schedulers: diffusers' add_noise for σ schedules, x0 + σ(t)·noise.
at::Tensor SigmaAddNoise(const Scheduler& s, const std::vector<int64_t>& indices, const at::Tensor& x0, const at::Tensor& noise);

}  // namespace cd::schedulers
