// DDPMScheduler (diffusers scheduling_ddpm.py): ancestral sampling of Ho et al. 2020, and the
// forward process used for training (add_noise, get_velocity).
#pragma once

#include "schedulers/scheduler.h"

namespace cd::schedulers {

class DDPMScheduler : public Scheduler {
 public:
  DDPMScheduler(const std::string& configText, const std::string& overridesText, const std::string& file);
  const char* className() const override { return "DDPMScheduler"; }
  void setTimesteps(int n) override;
  at::Tensor step(const at::Tensor& modelOutput, double t, const at::Tensor& sample, const StepOptions& options) override;

 private:
  int64_t PreviousTimestep(int64_t t) const;
  // The variance of step t → prev_t in the form the noise is multiplied by (std or log-std form).
  float NoiseScale(int64_t t, int64_t prevT) const;

  std::string varianceType_;
  bool clipSample_ = true;
  double clipSampleRange_ = 1.0;
};

}  // namespace cd::schedulers
