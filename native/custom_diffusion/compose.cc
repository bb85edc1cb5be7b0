// See compose.h. All algebra runs in float64: C = KᵀK squares the condition number of the caption
// embeddings, and the constraint W k = v must hold to ~1e-6 relative after the merge.
#include "custom_diffusion/compose.h"


#include <map>

#include "core/errors.h"

namespace cd::custom_diffusion {

namespace {

// Solves A X = B for symmetric positive-definite A with a Cholesky factorisation; falls back to LU
// (partial pivoting) when A is not numerically positive-definite. Never forms A⁻¹.
struct SpdSolver {
  at::Tensor factor, pivots;
  bool cholesky = true;
  explicit SpdSolver(const at::Tensor& a) {
    auto [l, info] = at::linalg_cholesky_ex(a);
    if (info.item<int64_t>() == 0) {
      factor = l;
    } else {
      cholesky = false;
      auto [lu, piv] = at::linalg_lu_factor(a);
      factor = lu;
      pivots = piv;
    }
  }
  at::Tensor Solve(const at::Tensor& b) const {
    if (cholesky) return at::cholesky_solve(b, factor, /*upper=*/false);
    return at::linalg_lu_solve(factor, pivots, b);
  }
};

bool AllFinite(const at::Tensor& t) { return at::isfinite(t).all().item<bool>(); }

}  // namespace

std::vector<int64_t> UniqueRowIndices(const at::Tensor& kt) {
  const at::Tensor k = kt.to(at::kDouble).contiguous();
  const int64_t m = k.size(0);
  std::vector<bool> dropped(m, false);
  for (int64_t i = 0; i < m; ++i) {
    if (dropped[i]) continue;
    // Mean |difference| == 0 exactly, as the paper's code tests it (identical rows only).
    at::Tensor diff = (k.slice(0, i + 1) - k[i]).abs().mean(1);
    auto acc = diff.accessor<double, 1>();
    for (int64_t j = 0; j < diff.size(0); ++j)
      if (acc[j] == 0.0) dropped[i + 1 + j] = true;
  }
  std::vector<int64_t> keep;
  for (int64_t i = 0; i < m; ++i)
    if (!dropped[i]) keep.push_back(i);
  return keep;
}

ComposeResult Compose(const std::vector<std::pair<std::string, at::Tensor>>& base,
                      const std::vector<ComposeConcept>& concepts, const at::Tensor& reg_keys,
                      const ComposeOptions& options) {
  at::NoGradGuard no_grad;
  Require(!base.empty(), "compose: no base layers");
  Require(!concepts.empty(), "compose: no concepts");
  Require(reg_keys.dim() == 2, "compose: regKeys must be a 2-D [rows × width] tensor");
  const int64_t d = reg_keys.size(1);
  const auto dev = reg_keys.device();
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(dev);

  std::map<std::string, at::Tensor> base_by_name;
  for (const auto& [name, w] : base) {
    Require(w.dim() == 2 && w.size(1) == d,
            "compose: base layer " + name + " must be [out × " + std::to_string(d) + "], the width of regKeys");
    Require(base_by_name.emplace(name, w).second, "compose: duplicate base layer " + name);
  }

  // Stack K_t over concepts (path order), remembering which concept each row came from.
  std::vector<at::Tensor> kts;
  std::vector<int64_t> owner;
  std::vector<std::map<std::string, at::Tensor>> concept_weights(concepts.size());
  for (size_t c = 0; c < concepts.size(); ++c) {
    const auto& k = concepts[c].keys;
    Require(k.dim() == 2 && k.size(1) == d && k.size(0) > 0,
            "compose: concept " + std::to_string(c) + " keys must be [rows × " + std::to_string(d) + "]");
    kts.push_back(k.to(f64));
    for (int64_t r = 0; r < k.size(0); ++r) owner.push_back(static_cast<int64_t>(c));
    for (const auto& [name, w] : concepts[c].weights) {
      auto it = base_by_name.find(name);
      Require(it != base_by_name.end(), "compose: concept " + std::to_string(c) + " has layer " + name +
                                            " which is not among the base layers");
      Require(w.sizes() == it->second.sizes(), "compose: concept " + std::to_string(c) + " layer " + name +
                                                   " has shape " + c10::str(w.sizes()) + ", the base has " +
                                                   c10::str(it->second.sizes()));
      concept_weights[c][name] = w;
    }
  }
  const at::Tensor kt_all = at::cat(kts, 0);
  const std::vector<int64_t> keep = UniqueRowIndices(kt_all);
  const at::Tensor keep_idx = at::tensor(keep, at::TensorOptions().dtype(at::kLong)).to(dev);
  const at::Tensor kt = kt_all.index_select(0, keep_idx);  // [m × d]
  const int64_t m = kt.size(0);

  ComposeResult result;
  result.target_rows = m;
  result.duplicate_rows = kt_all.size(0) - m;
  result.reg_rows = reg_keys.size(0);

  const at::Tensor K = reg_keys.to(f64);
  Require(AllFinite(K) && AllFinite(kt), "compose: the embeddings contain NaN or Inf");
  // Shared across layers: C = KᵀK, X = C⁻¹K_tᵀ [d×m], e2 = K_t X [m×m], Y = e2⁻¹ Xᵀ [m×d], KYᵀ [N×m].
  const at::Tensor C = at::matmul(K.t(), K);
  SpdSolver c_solver(C);
  result.solver = c_solver.cholesky ? "cholesky" : "lu";
  const at::Tensor X = c_solver.Solve(kt.t().contiguous());
  const at::Tensor e2 = at::matmul(kt, X);
  const at::Tensor e2s = (e2 + e2.t()) * 0.5;  // symmetric in exact arithmetic
  SpdSolver e2_solver(e2s);
  const at::Tensor Y = e2_solver.Solve(X.t().contiguous());
  if (!AllFinite(Y))
    throw Error("INVALID_ARGUMENT",
                "compose: the regularisation embeddings do not determine the merge (KᵀK or the target system is "
                "singular); use more regularisation captions");
  const at::Tensor KY = at::matmul(K, Y.t());  // [N × m]

  // Row → concept selection for V_t: rows of concept c use W_c (or W0 when c did not train the layer).
  std::vector<std::vector<int64_t>> rows_of(concepts.size());
  for (int64_t r = 0; r < m; ++r) rows_of[owner[keep[r]]].push_back(r);

  const int64_t total = static_cast<int64_t>(base.size());
  int64_t done = 0;
  for (const auto& [name, w0_in] : base) {
    const at::Tensor W0 = w0_in.to(f64);
    at::Tensor vt = at::empty({m, W0.size(0)}, f64);  // V_t [m × out]
    for (size_t c = 0; c < concepts.size(); ++c) {
      if (rows_of[c].empty()) continue;
      const at::Tensor idx = at::tensor(rows_of[c], at::TensorOptions().dtype(at::kLong)).to(dev);
      auto it = concept_weights[c].find(name);
      const at::Tensor Wc = it == concept_weights[c].end() ? W0 : it->second.to(f64);
      vt.index_copy_(0, idx, at::matmul(kt.index_select(0, idx), Wc.t()));
    }
    const at::Tensor e1 = vt.t() - at::matmul(W0, kt.t());  // [out × m]
    const at::Tensor dW = at::matmul(e1, Y);               // [out × d]
    const at::Tensor W = W0 + dW;

    ComposeLayerReport rep;
    rep.name = name;
    const at::Tensor res = at::matmul(kt, W.t()) - vt;  // [m × out]
    rep.constraint_residual = res.norm(2, {1}).mean().item<double>();
    const double vnorm = vt.norm().item<double>();
    rep.rel_constraint_residual = vnorm == 0 ? res.norm().item<double>() : res.norm().item<double>() / vnorm;
    // K (W − W0)ᵀ = (K Yᵀ) e1ᵀ: N×m×out instead of N×d×out.
    if (K.size(0) > 0) rep.reg_error = at::matmul(KY, e1.t()).norm(2, {1}).mean().item<double>();
    result.layers.push_back(rep);
    result.weights.emplace_back(name, W.to(w0_in.device(), options.out_dtype));
    ++done;
    if (options.on_layer) options.on_layer(done, total);
  }
  return result;
}

}  // namespace cd::custom_diffusion
