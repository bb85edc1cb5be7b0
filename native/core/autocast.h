// Sets the autocast state of one device type for a scope and puts the previous state back, as
// `with torch.autocast(...)` does: the training step's mixed-precision forwards, and gradient
// checkpointing's recomputation (which must run under the state its forward ran under).
#pragma once

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

namespace cd {

class AutocastGuard {
 public:
  AutocastGuard(c10::DeviceType device, bool enabled, at::ScalarType dtype)
      : device_(device),
        prevEnabled_(at::autocast::is_autocast_enabled(device)),
        prevDtype_(at::autocast::get_autocast_dtype(device)),
        nested_(enabled) {
    at::autocast::set_autocast_enabled(device, enabled);
    at::autocast::set_autocast_dtype(device, dtype);
    if (nested_) at::autocast::increment_nesting();
  }
  ~AutocastGuard() {
    // Leaving the outermost autocast region drops its cache of casted weights, as torch does.
    if (nested_ && at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device_, prevEnabled_);
    at::autocast::set_autocast_dtype(device_, prevDtype_);
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType device_;
  bool prevEnabled_;
  at::ScalarType prevDtype_;
  bool nested_;
};

}  // namespace cd
