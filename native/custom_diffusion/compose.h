// Closed-form multi-concept merge of cross-attention K/V weights (Custom Diffusion, "composenW").
// For every K/V layer: minimise ‖K Wᵀ − K W0ᵀ‖²_F subject to W K_tᵀ = V_tᵀ, where K holds the
// regularisation caption embeddings and K_t/V_t the target rows of every concept. With C = KᵀK the
// solution is W = W0 + (V_tᵀ − W0 K_tᵀ) (K_t C⁻¹ K_tᵀ)⁻¹ (C⁻¹ K_tᵀ)ᵀ. C and the small m×m matrix
// depend only on the embeddings, never on the layer, so both are factorised once and shared.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <functional>
#include <string>
#include <vector>

namespace cd::custom_diffusion {

struct ComposeConcept {
  at::Tensor keys;                                        // K_t,k [m_k × d]
  std::vector<std::pair<std::string, at::Tensor>> weights;  // fine-tuned full W_k,L [out × d]; a missing layer means W0
};

struct ComposeLayerReport {
  std::string name;
  double constraint_residual = 0;      // mean over target rows of ‖W k − v‖
  double rel_constraint_residual = 0;  // ‖W K_tᵀ − V_tᵀ‖_F / ‖V_tᵀ‖_F
  double reg_error = 0;                // mean over reg rows of ‖W k − W0 k‖
};

struct ComposeResult {
  std::vector<std::pair<std::string, at::Tensor>> weights;  // merged W, in out_dtype
  std::vector<ComposeLayerReport> layers;
  int64_t target_rows = 0;     // after duplicate removal
  int64_t duplicate_rows = 0;  // removed
  int64_t reg_rows = 0;
  std::string solver;          // "cholesky" or "lu" (the factorisation used for C)
};

struct ComposeOptions {
  at::ScalarType out_dtype = at::kFloat;
  // Called after each layer with (done, total); may throw to cancel.
  std::function<void(int64_t, int64_t)> on_layer;
};

// Indices of the rows of kt to keep: row j is dropped when an earlier row i has mean |kt[i]−kt[j]| == 0.
std::vector<int64_t> UniqueRowIndices(const at::Tensor& kt);

ComposeResult Compose(const std::vector<std::pair<std::string, at::Tensor>>& base,
                      const std::vector<ComposeConcept>& concepts, const at::Tensor& reg_keys,
                      const ComposeOptions& options);

}  // namespace cd::custom_diffusion
