// See compress.h. The SVD runs in float64 (thin SVD: the discarded columns of a full SVD never matter).
#include "custom_diffusion/compress.h"

#include <algorithm>

#include "core/errors.h"

namespace cd::custom_diffusion {

int64_t RankForRatio(const at::Tensor& singular_values, double ratio, bool keep_crossing) {
  const at::Tensor s = singular_values.to(at::kDouble).contiguous().cpu();
  const int64_t n = s.numel();
  const double total = s.sum().item<double>();
  if (n == 0 || total <= 0) return 0;
  // A cumulative fraction "> 1" can only come from rounding; it must not drop the last component.
  if (ratio >= 1) return n;
  auto a = s.accessor<double, 1>();
  double cum = 0;
  for (int64_t i = 0; i < n; ++i) {
    cum += a[i];
    if (cum / total > ratio) return keep_crossing ? i + 1 : i;
  }
  // The fraction never exceeds the ratio (ratio ≥ 1): nothing is worth dropping, keep every component.
  return n;
}

CompressResult Compress(const at::Tensor& tuned, const at::Tensor& base, const CompressOptions& options) {
  at::NoGradGuard no_grad;
  Require(tuned.dim() == 2 && tuned.sizes() == base.sizes(),
          "compress: the tuned weight " + c10::str(tuned.sizes()) + " and the base weight " + c10::str(base.sizes()) +
              " must be 2-D with the same shape");
  Require(options.rank >= 0 || (options.ratio > 0 && options.ratio <= 1),
          "compress: ratio must lie in (0, 1] (or give a fixed rank)");
  const at::Tensor dW = tuned.to(at::kDouble) - base.to(at::kDouble);
  auto [U, S, Vh] = at::linalg_svd(dW, /*full_matrices=*/false);
  const int64_t full = S.numel();
  int64_t r = options.rank >= 0 ? std::min(options.rank, full) : RankForRatio(S, options.ratio, options.keep_crossing);
  CompressResult out;
  out.rank = r;
  out.zero_rank = r == 0;
  const at::Tensor u = U.slice(1, 0, r) * S.slice(0, 0, r).unsqueeze(0);
  const at::Tensor v = Vh.slice(0, 0, r);
  const double norm = dW.norm().item<double>();
  const at::Tensor err = dW - at::matmul(u, v);
  out.rel_error = norm == 0 ? 0 : err.norm().item<double>() / norm;
  const double ssum = S.sum().item<double>();
  out.kept_fraction = ssum == 0 ? 1 : S.slice(0, 0, r).sum().item<double>() / ssum;
  out.u = u.to(tuned.device(), options.out_dtype).contiguous();
  out.v = v.to(tuned.device(), options.out_dtype).contiguous();
  return out;
}

}  // namespace cd::custom_diffusion
