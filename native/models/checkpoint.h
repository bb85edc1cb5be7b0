// Gradient checkpointing, as torch.utils.checkpoint does it for diffusers' UNet blocks when
// `enable_gradient_checkpointing()` is on: a segment (one resnet or one transformer) runs without
// keeping its intermediate activations, and its backward runs the segment again to get them. Memory
// drops from every activation of the UNet to the segments' inputs; time grows by one more forward.
//
// Unlike PyTorch's reentrant checkpoint, the segment's trainable parameters are inputs of the
// recorded node, so gradients reach them through torch::autograd::grad(loss, params) as well as
// through backward(): the training step asks for its gradients that way.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

namespace cd::models {

// A segment: inputs (tensors the segment gets from outside) → one output. It must compute the same
// values every time it runs with the same inputs (no dropout, no random numbers).
using Segment = std::function<at::Tensor(const std::vector<at::Tensor>&)>;

// Checkpointing for one forward pass: it knows the pass's trainable parameters by diffusers name,
// so a segment gets exactly those under its prefix ("down_blocks.0.attentions.1.").
class GradientCheckpointing {
 public:
  // Keeps the tensors of `parameters` that require grad.
  explicit GradientCheckpointing(const std::map<std::string, at::Tensor>& parameters);
  // Runs `segment` on `inputs` without recording autograd and returns its output, attached to one
  // node whose backward runs the segment again with autograd on and returns the gradients of the
  // inputs and of the trainable parameters under `prefix`. With nothing that requires grad (or
  // grad mode off), it is just segment(inputs). The forward's autocast state is restored for the
  // recomputation, so mixed-precision segments recompute the same values.
  at::Tensor run(const Segment& segment, const std::vector<at::Tensor>& inputs, const std::string& prefix) const;
  // How many segments ran checkpointed (so callers and tests can see the memory-saving path ran).
  int64_t segments() const { return segments_; }

 private:
  std::map<std::string, at::Tensor> trainable_;
  mutable int64_t segments_ = 0;
};

}  // namespace cd::models
