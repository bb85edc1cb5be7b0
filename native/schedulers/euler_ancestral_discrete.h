// EulerAncestralDiscreteScheduler (diffusers scheduling_euler_ancestral_discrete.py): Euler steps
// down to σ_down followed by fresh noise of scale σ_up (k-diffusion's "euler_a").
#pragma once

#include "schedulers/euler_discrete.h"

namespace cd::schedulers {

class EulerAncestralDiscreteScheduler : public EulerSigmaScheduler {
 public:
  EulerAncestralDiscreteScheduler(const std::string& configText, const std::string& overridesText, const std::string& file);
  const char* className() const override { return "EulerAncestralDiscreteScheduler"; }
  void setTimesteps(int n) override;
  at::Tensor step(const at::Tensor& modelOutput, double t, const at::Tensor& sample, const StepOptions& options) override;
};

}  // namespace cd::schedulers
