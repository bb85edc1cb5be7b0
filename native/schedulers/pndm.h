// PNDMScheduler (diffusers scheduling_pndm.py): pseudo numerical methods for diffusion models.
// With skip_prk_steps (Stable Diffusion's config) it is PLMS, a linear multistep method on ε whose
// warm-up repeats the second timestep; without it, 12 Runge-Kutta (PRK) steps start the schedule.
#pragma once

#include "schedulers/scheduler.h"

namespace cd::schedulers {

class PNDMScheduler : public Scheduler {
 public:
  PNDMScheduler(const std::string& configText, const std::string& overridesText, const std::string& file);
  const char* className() const override { return "PNDMScheduler"; }
  void setTimesteps(int n) override;
  at::Tensor step(const at::Tensor& modelOutput, double t, const at::Tensor& sample, const StepOptions& options) override;

 private:
  at::Tensor StepPrk(const at::Tensor& modelOutput, int64_t t, const at::Tensor& sample);
  at::Tensor StepPlms(const at::Tensor& modelOutput, int64_t t, const at::Tensor& sample);
  // Formula (9) of Liu et al. 2022: x_{t−δ} from x_t and ε.
  at::Tensor PrevSample(const at::Tensor& sample, int64_t t, int64_t prevT, const at::Tensor& modelOutput) const;
  float Alpha(int64_t t, const char* what) const;

  bool skipPrkSteps_ = false;
  float finalAlphaCumprod_ = 1.0f;
  std::vector<int64_t> prkTimesteps_;
  // Running state (reset by setTimesteps).
  int64_t counter_ = 0;
  std::vector<at::Tensor> ets_;     // past ε, oldest first
  at::Tensor curSample_;            // undefined = None
  at::Tensor curModelOutput_;       // undefined = 0 (the PRK accumulator)
};

}  // namespace cd::schedulers
