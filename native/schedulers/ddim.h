// DDIMScheduler (diffusers scheduling_ddim.py): denoising diffusion implicit models, with η
// controlling how much fresh noise each step adds (0 = deterministic).
#pragma once

#include "schedulers/scheduler.h"

namespace cd::schedulers {

class DDIMScheduler : public Scheduler {
 public:
  DDIMScheduler(const std::string& configText, const std::string& overridesText, const std::string& file);
  const char* className() const override { return "DDIMScheduler"; }
  void setTimesteps(int n) override;
  at::Tensor step(const at::Tensor& modelOutput, double t, const at::Tensor& sample, const StepOptions& options) override;

 private:
  bool clipSample_ = true;
  double clipSampleRange_ = 1.0;
  // ᾱ used for the step that lands before timestep 0: 1 (set_alpha_to_one) or ᾱ_0.
  float finalAlphaCumprod_ = 1.0f;
};

}  // namespace cd::schedulers
