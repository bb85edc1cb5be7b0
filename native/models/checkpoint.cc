#include "models/checkpoint.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

#include "core/autocast.h"

namespace cd::models {

namespace {

using torch::autograd::variable_list;

// The autocast settings of one device type, captured at the forward and put back for the
// recomputation (the backward runs outside the training step's autocast scope).
struct AutocastState {
  c10::DeviceType device = c10::kCPU;
  bool enabled = false;
  at::ScalarType dtype = at::kFloat;

  static AutocastState Capture(c10::DeviceType device) {
    return {device, at::autocast::is_autocast_enabled(device), at::autocast::get_autocast_dtype(device)};
  }
};

class CheckpointBackward : public torch::autograd::Node {
 public:
  CheckpointBackward(Segment segment, std::vector<at::Tensor> inputs, std::vector<bool> inputNeedsGrad,
                     std::vector<at::Tensor> params, AutocastState autocast)
      : segment_(std::move(segment)),
        inputs_(std::move(inputs)),
        inputNeedsGrad_(std::move(inputNeedsGrad)),
        params_(std::move(params)),
        autocast_(autocast) {}

  std::string name() const override { return "CheckpointBackward"; }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& gradOut = grads.at(0);
    variable_list result(inputs_.size() + params_.size());
    if (!gradOut.defined()) return result;

    // Fresh leaves for the inputs, so the recomputed graph ends here and not in the outer graph.
    std::vector<at::Tensor> leaves;
    std::vector<at::Tensor> wrt;
    std::vector<size_t> slot;
    for (size_t i = 0; i < inputs_.size(); ++i) {
      at::Tensor leaf = inputs_[i].defined() ? inputs_[i].detach() : at::Tensor();
      if (inputNeedsGrad_[i]) {
        leaf.requires_grad_(true);
        wrt.push_back(leaf);
        slot.push_back(i);
      }
      leaves.push_back(std::move(leaf));
    }
    for (size_t p = 0; p < params_.size(); ++p) {
      wrt.push_back(params_[p]);
      slot.push_back(inputs_.size() + p);
    }

    at::Tensor out;
    {
      at::AutoGradMode gradMode(true);
      AutocastGuard autocast(autocast_.device, autocast_.enabled, autocast_.dtype);
      out = segment_(leaves);
    }
    if (!out.requires_grad()) return result;
    variable_list g = torch::autograd::grad({out}, wrt, {gradOut}, /*retain_graph=*/false,
                                            /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t k = 0; k < g.size(); ++k) result[slot[k]] = std::move(g[k]);
    return result;
  }

  void release_variables() override {
    inputs_.clear();
    params_.clear();
  }

 private:
  Segment segment_;
  std::vector<at::Tensor> inputs_;
  std::vector<bool> inputNeedsGrad_;
  std::vector<at::Tensor> params_;
  AutocastState autocast_;
};

// Autograd nodes are owned by std::shared_ptr in LibTorch up to 2.11 and by c10::intrusive_ptr in
// later releases; the addon builds against both (the GPU machines run 2.11, the registry's is newer).
template <typename T, typename... Args>
auto MakeNode(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, T>)
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  else
    return std::make_shared<T>(std::forward<Args>(args)...);
}

// `params`: the segment's parameters that require grad.
at::Tensor Checkpoint(const Segment& segment, const std::vector<at::Tensor>& inputs,
                      const std::vector<at::Tensor>& params) {
  std::vector<bool> needsGrad;
  bool any = false;
  for (const auto& x : inputs) {
    needsGrad.push_back(x.defined() && x.requires_grad());
    any = any || needsGrad.back();
  }
  any = any || !params.empty();
  if (!any || !at::GradMode::is_enabled()) return segment(inputs);

  c10::DeviceType device = c10::kCPU;
  for (const auto& x : inputs)
    if (x.defined()) {
      device = x.device().type();
      break;
    }
  const AutocastState autocast = AutocastState::Capture(device);

  at::Tensor out;
  {
    at::NoGradGuard noGrad;
    out = segment(inputs);
  }
  // Only the inputs are kept (detached: their own graphs stay reachable through the edges).
  std::vector<at::Tensor> saved;
  for (const auto& x : inputs) saved.push_back(x.defined() ? x.detach() : at::Tensor());
  auto node = MakeNode<CheckpointBackward>(segment, std::move(saved), needsGrad, params, autocast);
  std::vector<at::Tensor> edgesOf = inputs;
  edgesOf.insert(edgesOf.end(), params.begin(), params.end());
  for (size_t i = 0; i < inputs.size(); ++i)
    if (!needsGrad[i]) edgesOf[i] = at::Tensor();  // no edge: nothing to send back there
  node->set_next_edges(torch::autograd::collect_next_edges(edgesOf));
  torch::autograd::set_history(out, node);
  return out;
}

}  // namespace

GradientCheckpointing::GradientCheckpointing(const std::map<std::string, at::Tensor>& parameters) {
  for (const auto& [name, t] : parameters)
    if (t.requires_grad()) trainable_.emplace(name, t);
}

at::Tensor GradientCheckpointing::run(const Segment& segment, const std::vector<at::Tensor>& inputs,
                                      const std::string& prefix) const {
  ++segments_;
  std::vector<at::Tensor> params;
  for (auto it = trainable_.lower_bound(prefix); it != trainable_.end() && it->first.rfind(prefix, 0) == 0; ++it)
    params.push_back(it->second);
  return Checkpoint(segment, inputs, params);
}

}  // namespace cd::models
