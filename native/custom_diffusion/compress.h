// Low-rank compression of a fine-tuned K/V weight: SVD of ΔW = W − W0, keep the leading singular
// components, store u = U_r·diag(s_r) [out×r] and v = Vᵀ_r [r×in]; the weight is rebuilt as W0 + u·v.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

namespace cd::custom_diffusion {

struct CompressOptions {
  // ratio mode (rank < 0): the paper's rule on the cumulative fraction of the SUM of singular values.
  double ratio = 0.6;
  // The paper's code breaks at the first 0-based i with cumulative fraction > ratio and keeps r = i,
  // dropping the crossing component (kept fraction ≤ ratio). We keep that by default so compressed
  // files match the published sizes and behaviour; keep_crossing = true keeps r = i + 1 instead.
  bool keep_crossing = false;
  int64_t rank = -1;  // ≥ 0: a fixed rank (clamped to min(out, in)), ratio ignored
  at::ScalarType out_dtype = at::kFloat;
};

struct CompressResult {
  at::Tensor u, v;
  int64_t rank = 0;
  double rel_error = 0;        // ‖ΔW − u·v‖_F / ‖ΔW‖_F (0 when ΔW = 0)
  double kept_fraction = 0;    // Σ_{i<r} s_i / Σ s (1 when ΔW = 0)
  bool zero_rank = false;      // r = 0: the delta of this layer is dropped entirely
};

// Rank chosen by the ratio rule from descending singular values (exposed for tests and tools).
int64_t RankForRatio(const at::Tensor& singular_values, double ratio, bool keep_crossing);

CompressResult Compress(const at::Tensor& tuned, const at::Tensor& base, const CompressOptions& options);

}  // namespace cd::custom_diffusion
