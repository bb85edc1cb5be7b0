// Weights: the named tensors of one model, looked up by diffusers state-dict key while the model
// is built. Every lookup is recorded, so after construction Finish() can report in one error every
// missing key, every unexpected key and every shape mismatch. Modules keep handles to the same
// tensors, so an in-place update through Weights (a delta being applied) is seen by the model.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace cd::models {

class Weights {
 public:
  // `source` names where the tensors came from (a file or folder) for error messages.
  Weights(std::vector<std::pair<std::string, at::Tensor>> tensors, std::string source);

  // Loads weights files (several shards allowed): `.safetensors`, or torch.save pickles (`.bin`,
  // `.ckpt`, `.pt`, `.pth`) read by the restricted unpickler, with nested dicts flattened to dotted
  // names. Floating-point tensors are converted to `dtype` and moved to `device`.
  static Weights FromFiles(const std::vector<std::string>& files, std::optional<at::ScalarType> dtype,
                           c10::Device device);

  // A view that prefixes every name ("down_blocks.0" then "resnets.1" → "down_blocks.0.resnets.1.").
  class Scope {
   public:
    Scope sub(const std::string& name) const;
    Scope sub(int index) const { return sub(std::to_string(index)); }
    // The tensor `name` with exactly `shape`; records a problem (and returns an undefined tensor)
    // when it is missing or mis-shaped, so construction can go on and report everything at once.
    at::Tensor get(const std::string& name, at::IntArrayRef shape) const;
    bool has(const std::string& name) const;
    const std::string& prefix() const { return prefix_; }

   private:
    friend class Weights;
    Scope(Weights* w, std::string prefix) : w_(w), prefix_(std::move(prefix)) {}
    Weights* w_;
    std::string prefix_;
  };

  Scope root() { return Scope(this, ""); }

  // Throws MODEL_WEIGHTS listing missing, unexpected and mis-shaped keys, if there are any.
  void Finish() const;

  // All tensors by name, in key order.
  const std::map<std::string, at::Tensor>& tensors() const { return tensors_; }
  at::Tensor& at(const std::string& name);
  const std::string& source() const { return source_; }

 private:
  std::map<std::string, at::Tensor> tensors_;
  std::string source_;
  mutable std::set<std::string> used_;
  mutable std::vector<std::string> missing_;
  mutable std::vector<std::string> mismatched_;
};

}  // namespace cd::models
