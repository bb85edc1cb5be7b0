// DPMSolverMultistepScheduler (diffusers scheduling_dpmsolver_multistep.py): DPM-Solver++ (Lu et
// al. 2022), a multistep solver of the diffusion ODE in the data-prediction form; "DPM++ 2M" with
// solver_order 2, "DPM++ 2M Karras" with use_karras_sigmas, "DPM++ 2M SDE" with sde-dpmsolver++.
#pragma once

#include "schedulers/scheduler.h"

namespace cd::schedulers {

class DPMSolverMultistepScheduler : public Scheduler {
 public:
  DPMSolverMultistepScheduler(const std::string& configText, const std::string& overridesText, const std::string& file);
  const char* className() const override { return "DPMSolverMultistepScheduler"; }
  void setTimesteps(int n) override;
  at::Tensor step(const at::Tensor& modelOutput, double t, const at::Tensor& sample, const StepOptions& options) override;
  at::Tensor addNoise(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) override;

 private:
  // The data prediction x0 from the model output at the current step.
  at::Tensor ConvertModelOutput(const at::Tensor& modelOutput, const at::Tensor& sample) const;
  at::Tensor FirstOrderUpdate(const at::Tensor& m0, const at::Tensor& sample, const at::Tensor& noise) const;
  at::Tensor SecondOrderUpdate(const at::Tensor& sample, const at::Tensor& noise) const;
  at::Tensor ThirdOrderUpdate(const at::Tensor& sample) const;
  float Sigma(int64_t i) const { return sigmasHost_[static_cast<size_t>(i)]; }

  int solverOrder_ = 2;
  std::string algorithmType_;
  std::string solverType_;
  bool lowerOrderFinal_ = true;
  bool eulerAtFinal_ = false;
  bool useKarrasSigmas_ = false;
  bool useExponentialSigmas_ = false;
  bool useLuLambdas_ = false;
  std::string finalSigmasType_;
  double lambdaMinClipped_ = 0;
  std::vector<float> sigmasHost_;
  // Running state (reset by setTimesteps).
  std::vector<at::Tensor> modelOutputs_;  // solver_order slots, newest last
  int lowerOrderNums_ = 0;
};

}  // namespace cd::schedulers
