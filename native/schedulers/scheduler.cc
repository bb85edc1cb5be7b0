// Shared scheduler machinery: diffusers' from_config rules, the beta schedules, the forward process
// (add_noise / get_velocity), step bookkeeping, numpy-compatible timestep arithmetic and the factory.
#include "schedulers/scheduler.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>

#include "core/errors.h"
#include "schedulers/ddim.h"
#include "schedulers/ddpm.h"
#include "schedulers/dpm_solver_multistep.h"
#include "schedulers/euler_ancestral_discrete.h"
#include "schedulers/euler_discrete.h"
#include "schedulers/pndm.h"

namespace cd::schedulers {

namespace {

using json::Value;

[[noreturn]] void ConfigError(const std::string& file, const std::string& message) {
  throw Error("MODEL_CONFIG", "In " + file + ": " + message, {{"file", file}});
}

// Every __init__ key of the schedulers diffusers declares compatible with the Stable Diffusion
// ones (KarrasDiffusionSchedulers, diffusers 0.42), plus those of the other schedulers used with
// Stable Diffusion (LCM, TCD, SA-Solver, EDM DPM-Solver, IPNDM, the parallel and inverse DDIM/DDPM/
// DPM-Solver variants, consistency models). from_config drops the keys the target class lacks, so
// these are ignored when they are not the target's own; anything else is taken for a typo.
const std::set<std::string>& KnownForeignKeys() {
  static const std::set<std::string> keys = {
      "algorithm_type", "beta_end", "beta_schedule", "beta_start", "clip_sample", "clip_sample_range",
      "disable_corrector", "dynamic_thresholding_ratio", "euler_at_final", "final_sigmas_type", "flow_shift",
      "interpolation_type", "lambda_min_clipped", "lower_order_final", "num_train_timesteps", "predict_x0",
      "prediction_type", "rescale_betas_zero_snr", "rho", "sample_max_value", "set_alpha_to_one",
      "shift_terminal", "sigma_data", "sigma_max", "sigma_min", "sigma_schedule", "skip_prk_steps",
      "solver_order", "solver_p", "solver_type", "steps_offset", "thresholding", "time_shift_type",
      "timestep_spacing", "timestep_type", "trained_betas", "use_beta_sigmas", "use_dynamic_shifting",
      "use_exponential_sigmas", "use_flow_sigmas", "use_karras_sigmas", "use_lu_lambdas", "variance_type",
      "clip_denoised", "corrector_order", "original_inference_steps", "predictor_order", "s_noise", "tau_func",
      "timestep_scaling"};
  return keys;
}

// Python's json module writes ±Infinity and NaN as bare words (diffusers saves
// lambda_min_clipped = -Infinity). Outside strings, the infinities become ±1e999 (which strtod reads
// as ±inf); NaN has no meaning as an option and is refused.
std::string StrictJson(const std::string& text, const std::string& file) {
  std::string out;
  out.reserve(text.size());
  bool inString = false;
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (inString) {
      out += c;
      if (c == '\\' && i + 1 < text.size()) out += text[++i];
      else if (c == '"') inString = false;
      continue;
    }
    if (c == '"') {
      inString = true;
      out += c;
    } else if (text.compare(i, 9, "-Infinity") == 0) {
      out += "-1e999";
      i += 8;
    } else if (text.compare(i, 8, "Infinity") == 0) {
      out += "1e999";
      i += 7;
    } else if (text.compare(i, 3, "NaN") == 0) {
      ConfigError(file, "NaN is not a valid option value");
    } else {
      out += c;
    }
  }
  return out;
}

Value ParseObject(const std::string& text, const std::string& file, const char* what) {
  std::string strict = StrictJson(text, file);
  Value v;
  try {
    v = json::Parse(strict.data(), strict.size());
  } catch (const json::ParseError& e) {
    ConfigError(file, std::string(what) + " is not valid JSON (" + e.what() + ")");
  }
  if (v.kind != Value::Kind::Object) ConfigError(file, std::string(what) + " is not a JSON object");
  return v;
}

// A double as Python's repr writes it (shortest round-trip digits; "1.0", "0.0001", "1e-05"), so
// the effective config reads like the one diffusers holds. Infinities become ±1e999.
void AppendDouble(std::string& out, double v) {
  if (std::isinf(v)) {
    out += v < 0 ? "-1e999" : "1e999";
    return;
  }
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  std::string s(buf, r.ptr);
  bool neg = !s.empty() && s[0] == '-';
  if (neg) s.erase(0, 1);
  size_t e = s.find('e');
  std::string mant = s.substr(0, e);
  int exp = std::stoi(s.substr(e + 1));
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  if (neg) out += '-';
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out += "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
    } else if (static_cast<int>(digits.size()) <= exp + 1) {
      out += digits + std::string(static_cast<size_t>(exp + 1 - static_cast<int>(digits.size())), '0') + ".0";
    } else {
      out += digits.substr(0, static_cast<size_t>(exp + 1)) + "." + digits.substr(static_cast<size_t>(exp + 1));
    }
  } else {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof(eb), "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  }
}

void AppendValue(std::string& out, const Value& v) {
  switch (v.kind) {
    case Value::Kind::Null: out += "null"; break;
    case Value::Kind::Bool: out += v.boolean ? "true" : "false"; break;
    case Value::Kind::Number:
      if (v.isInteger) out += std::to_string(v.integer);
      else AppendDouble(out, v.number);
      break;
    case Value::Kind::String: json::AppendString(out, v.string); break;
    case Value::Kind::Array:
      out += '[';
      for (size_t i = 0; i < v.array.size(); ++i) {
        if (i) out += ", ";
        AppendValue(out, v.array[i]);
      }
      out += ']';
      break;
    case Value::Kind::Object:
      out += '{';
      for (size_t i = 0; i < v.object.size(); ++i) {
        if (i) out += ", ";
        json::AppendString(out, v.object[i].first);
        out += ": ";
        AppendValue(out, v.object[i].second);
      }
      out += '}';
      break;
  }
}

Value StringValue(const std::string& s) {
  Value v;
  v.kind = Value::Kind::String;
  v.string = s;
  return v;
}

}  // namespace

EffectiveConfig BuildConfig(const std::string& className,
                            const std::vector<std::pair<const char*, const char*>>& defaults,
                            const std::string& configText, const std::string& overridesText,
                            const std::string& file) {
  Value root = ParseObject(configText, file, "The scheduler config");
  Value overrides;
  overrides.kind = Value::Kind::Object;
  if (!overridesText.empty()) overrides = ParseObject(overridesText, file, "The scheduler overrides");

  std::set<std::string> classKeys;
  for (const auto& [k, d] : defaults) classKeys.insert(k);
  for (const auto& [k, v] : overrides.object) {
    if (!classKeys.count(k))
      ConfigError(file, "the override \"" + k + "\" is not an option of " + className);
  }

  // diffusers' extract_init_dict: keys that took their default in the class that wrote this config
  // are dropped, so the new class applies its own default.
  std::set<std::string> dropped;
  if (const Value* used = root.find("_use_default_values")) {
    if (used->kind != Value::Kind::Array) ConfigError(file, "\"_use_default_values\" must be a list of keys");
    for (const auto& k : used->array)
      if (k.kind == Value::Kind::String) dropped.insert(k.string);
  }

  Value effective;
  effective.kind = Value::Kind::Object;
  Value usedDefaults;
  usedDefaults.kind = Value::Kind::Array;
  for (const auto& [key, def] : defaults) {
    const Value* o = overrides.find(key);
    const Value* c = dropped.count(key) ? nullptr : root.find(key);
    if (o) {
      effective.object.emplace_back(key, *o);
    } else if (c) {
      effective.object.emplace_back(key, *c);
    } else {
      std::string d = def;
      effective.object.emplace_back(key, json::Parse(d.data(), d.size()));
      usedDefaults.array.push_back(StringValue(key));
    }
  }
  std::vector<std::string> hidden;
  for (const auto& [k, v] : root.object) {
    if (classKeys.count(k) || dropped.count(k) || k == "_use_default_values" || k == "_class_name") continue;
    effective.object.emplace_back(k, v);
    if (KnownForeignKeys().count(k)) hidden.push_back(k);
  }
  effective.object.emplace_back("_class_name", StringValue(className));
  effective.object.emplace_back("_use_default_values", usedDefaults);

  EffectiveConfig cfg;
  if (const Value* tb = effective.find("trained_betas"); tb && tb->kind != Value::Kind::Null) {
    if (tb->kind != Value::Kind::Array) ConfigError(file, "\"trained_betas\": expected a list of numbers");
    std::vector<double> betas;
    for (const auto& x : tb->array) {
      if (x.kind != Value::Kind::Number) ConfigError(file, "\"trained_betas\": expected a list of numbers");
      betas.push_back(x.number);
    }
    cfg.trainedBetas_ = std::move(betas);
  }
  AppendValue(cfg.json_, effective);
  cfg.reader_ = std::make_unique<models::ConfigReader>(cfg.json_, file);
  cfg.reader_->Ignore({"trained_betas"});
  for (const auto& k : hidden) cfg.reader_->Ignore({k.c_str()});
  return cfg;
}

namespace f32 {
float Sqrt(float x) { return at::sqrt(at::scalar_tensor(x, at::kFloat)).item<float>(); }
float Log(float x) { return at::log(at::scalar_tensor(x, at::kFloat)).item<float>(); }
float Exp(float x) { return at::exp(at::scalar_tensor(x, at::kFloat)).item<float>(); }
}  // namespace f32

// ---------------------------------------------------------------------------------------------
// numpy-compatible arithmetic

namespace np {

std::vector<double> Linspace(double start, double stop, int64_t num) {
  std::vector<double> y(static_cast<size_t>(std::max<int64_t>(num, 0)));
  if (num <= 0) return y;
  const int64_t div = num - 1;
  const double delta = stop - start;
  if (div > 0) {
    const double step = delta / static_cast<double>(div);
    for (int64_t i = 0; i < num; ++i) {
      // numpy divides first when the step underflows to 0 (denormal ranges).
      y[i] = (step == 0 ? static_cast<double>(i) / static_cast<double>(div) * delta : static_cast<double>(i) * step) + start;
    }
    y[num - 1] = stop;
  } else {
    y[0] = 0.0 * delta + start;
  }
  return y;
}

std::vector<double> Arange(double start, double stop, double step) {
  const double len = std::ceil((stop - start) / step);
  if (!(len > 0)) return {};
  const auto n = static_cast<size_t>(len);
  std::vector<double> y(n);
  y[0] = start;
  if (n > 1) y[1] = start + step;
  // numpy fills from the first two values: start + i·(y[1] − y[0]).
  const double delta = n > 1 ? y[1] - start : step;
  for (size_t i = 2; i < n; ++i) y[i] = start + static_cast<double>(i) * delta;
  return y;
}

double Round(double x) { return std::nearbyint(x); }

double InterpIndex(double x, const std::vector<double>& fp) {
  const auto n = static_cast<int64_t>(fp.size());
  if (std::isnan(x)) return x;
  if (x < 0) return fp.front();
  if (x > static_cast<double>(n - 1)) return fp.back();
  auto j = static_cast<int64_t>(std::floor(x));
  if (j >= n - 1) return fp[n - 1];
  if (static_cast<double>(j) == x) return fp[j];
  const double slope = (fp[j + 1] - fp[j]) / (static_cast<double>(j + 1) - static_cast<double>(j));
  return slope * (x - static_cast<double>(j)) + fp[j];
}

}  // namespace np

std::vector<int64_t> SpacedTimesteps(const char* className, const std::string& spacing, int T, int n, int stepsOffset) {
  const std::string who = std::string(className) + ".setTimesteps: ";
  Require(n >= 1, who + "the number of steps must be at least 1");
  Require(n <= T, who + std::to_string(n) + " steps exceed num_train_timesteps (" + std::to_string(T) + ")");
  std::vector<int64_t> ts;
  if (spacing == "linspace") {
    for (double x : np::Linspace(0, T - 1, n)) ts.push_back(static_cast<int64_t>(np::Round(x)));
    std::reverse(ts.begin(), ts.end());
  } else if (spacing == "leading") {
    const int64_t ratio = T / n;
    for (int64_t i = n - 1; i >= 0; --i) ts.push_back(i * ratio + stepsOffset);
  } else {
    const double ratio = static_cast<double>(T) / n;
    for (double x : np::Arange(T, 0, -ratio)) ts.push_back(static_cast<int64_t>(np::Round(x)) - 1);
  }
  return ts;
}

std::vector<float> SigmaTable(const at::Tensor& alphasCumprod) {
  at::Tensor s = at::pow(at::div(at::rsub(alphasCumprod, 1.0), alphasCumprod), 0.5).contiguous();
  return std::vector<float>(s.data_ptr<float>(), s.data_ptr<float>() + s.numel());
}

float NumpyLogf(float x) {
  if (std::isnan(x)) return x;
  if (x < 0) return -std::numeric_limits<float>::quiet_NaN();
  if (x == 0) return -std::numeric_limits<float>::infinity();
  if (std::isinf(x)) return x;
  // The rational approximation of numpy's AVX2/AVX512F kernel (npy_simd_data.h constants).
  static const float P[6] = {0.000000000000000000000e+00f, 9.999999999999998702752e-01f, 2.112677543073053063722e+00f,
                             1.480000633576506585156e+00f, 3.808837741388407920751e-01f, 2.589979117907922693523e-02f};
  static const float Q[6] = {1.000000000000000000000e+00f, 2.612677543073109236779e+00f, 2.453006071784736363091e+00f,
                             9.864942958519418960339e-01f, 1.546476374983906719538e-01f, 5.875095403124574342950e-03f};
  const float kLn2 = 0.693147180559945309417232121458176568f;
  const float kSqrtHalf = 0.707106781186547524400844362104849039f;
  float bias = 0;
  if (x < std::numeric_limits<float>::min()) {  // denormal: scale by 2^100 first
    x *= 0x1p100f;
    bias = 100;
  }
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  // x = m·2^e with m in [0.5, 1).
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126) - bias;
  const uint32_t mbits = (bits & 0x7fffffu) | (126u << 23);
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  if (m <= kSqrtHalf) {
    m = m + m;
    e = e - 1.0f;
  }
  m = m - 1.0f;
  float num = std::fma(P[5], m, P[4]);
  for (int i = 3; i >= 0; --i) num = std::fma(num, m, P[i]);
  float den = std::fma(Q[5], m, Q[4]);
  for (int i = 3; i >= 0; --i) den = std::fma(den, m, Q[i]);
  return std::fma(e, kLn2, num / den);
}

std::vector<float> LogSigmaTable(const std::vector<float>& sigmas) {
  std::vector<float> out(sigmas.size());
  for (size_t i = 0; i < sigmas.size(); ++i) out[i] = NumpyLogf(sigmas[i]);
  return out;
}

double SigmaToT(double sigma, const std::vector<float>& logSigmas) {
  const double logSigma = std::log(std::max(sigma, 1e-10));
  const auto n = static_cast<int64_t>(logSigmas.size());
  // cumsum(dists >= 0).argmax(): the last index whose log σ is ≤ log_sigma (0 when none).
  int64_t low = 0;
  for (int64_t i = 0; i < n; ++i)
    if (logSigma - static_cast<double>(logSigmas[i]) >= 0) low = i;
  low = std::min(low, n - 2);
  const int64_t high = low + 1;
  const float lo = logSigmas[low], hi = logSigmas[high];
  double w = (static_cast<double>(lo) - logSigma) / static_cast<double>(lo - hi);  // lo − hi in float32, as numpy
  w = std::clamp(w, 0.0, 1.0);
  return (1 - w) * static_cast<double>(low) + w * static_cast<double>(high);
}

std::vector<double> KarrasSigmas(double sigmaMin, double sigmaMax, int n) {
  const double rho = 7.0;
  std::vector<double> ramp = np::Linspace(0, 1, n);
  const double minInvRho = std::pow(sigmaMin, 1 / rho);
  const double maxInvRho = std::pow(sigmaMax, 1 / rho);
  std::vector<double> out(ramp.size());
  for (size_t i = 0; i < ramp.size(); ++i) out[i] = std::pow(maxInvRho + ramp[i] * (minInvRho - maxInvRho), rho);
  return out;
}

std::vector<double> ExponentialSigmas(double sigmaMin, double sigmaMax, int n) {
  std::vector<double> out = np::Linspace(std::log(sigmaMax), std::log(sigmaMin), n);
  for (auto& x : out) x = std::exp(x);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Scheduler base

namespace {

// betas_for_alpha_bar: computed in Python floats (double), then stored as float32.
at::Tensor BetasForAlphaBar(int n, const std::string& transform) {
  auto alphaBar = [&](double t) -> double {
    if (transform == "cosine") return std::pow(std::cos((t + 0.008) / 1.008 * M_PI / 2), 2.0);
    // laplace
    const double lmb = -0.5 * std::copysign(1.0, 0.5 - t) * std::log(1 - 2 * std::fabs(0.5 - t) + 1e-6);
    const double snr = std::exp(lmb);
    return std::sqrt(snr / (1 + snr));
  };
  std::vector<double> betas(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    const double t1 = static_cast<double>(i) / n, t2 = static_cast<double>(i + 1) / n;
    betas[i] = std::min(1 - alphaBar(t2) / alphaBar(t1), 0.999);
  }
  return at::tensor(betas, at::kDouble).to(at::kFloat);
}

// rescale_zero_terminal_snr (float32 tensor ops, as diffusers).
at::Tensor RescaleZeroTerminalSnr(const at::Tensor& betas) {
  at::Tensor alphas = at::rsub(betas, 1.0);
  at::Tensor abarSqrt = at::cumprod(alphas, 0).sqrt();
  at::Tensor a0 = abarSqrt[0].clone();
  at::Tensor aT = abarSqrt[-1].clone();
  abarSqrt.sub_(aT);
  abarSqrt.mul_(a0 / (a0 - aT));
  at::Tensor abar = at::pow(abarSqrt, 2);
  at::Tensor ratios = abar.slice(0, 1) / abar.slice(0, 0, -1);
  return at::rsub(at::cat({abar.slice(0, 0, 1), ratios}), 1);
}

}  // namespace

void Scheduler::InitCommon(EffectiveConfig& cfg, const std::vector<std::string>& schedules, bool hasRescale,
                           bool floorLastAlpha) {
  auto& r = cfg.reader();
  numTrainTimesteps_ = r.Int("num_train_timesteps", 1000);
  if (numTrainTimesteps_ < 2) r.Fail("num_train_timesteps", "must be at least 2");
  const double betaStart = r.Double("beta_start", 0.0001);
  const double betaEnd = r.Double("beta_end", 0.02);
  betaSchedule_ = r.String("beta_schedule", "linear");
  const bool rescale = hasRescale && r.Bool("rescale_betas_zero_snr", false);
  stepsOffset_ = r.Int("steps_offset", 0);
  timestepSpacing_ = r.String("timestep_spacing", "leading");
  if (timestepSpacing_ != "leading" && timestepSpacing_ != "trailing" && timestepSpacing_ != "linspace")
    r.Fail("timestep_spacing", "\"" + timestepSpacing_ + "\" is not supported (choose \"leading\", \"trailing\" or \"linspace\")");
  predictionType_ = r.String("prediction_type", "epsilon");

  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (cfg.trainedBetas()) {
    if (static_cast<int>(cfg.trainedBetas()->size()) != numTrainTimesteps_)
      r.Fail("trained_betas", "has " + std::to_string(cfg.trainedBetas()->size()) + " entries but num_train_timesteps is " +
                                  std::to_string(numTrainTimesteps_));
    betas_ = at::tensor(*cfg.trainedBetas(), at::kDouble).to(at::kFloat);
  } else {
    bool allowed = false;
    for (const auto& s : schedules) allowed = allowed || s == betaSchedule_;
    if (!allowed) {
      std::string list;
      for (const auto& s : schedules) list += (list.empty() ? "\"" : ", \"") + s + "\"";
      r.Fail("beta_schedule", "\"" + betaSchedule_ + "\" is not supported by " + className() + " (choose " + list + ")");
    }
    if (betaSchedule_ == "linear") {
      betas_ = at::linspace(betaStart, betaEnd, numTrainTimesteps_, f32);
    } else if (betaSchedule_ == "scaled_linear") {
      // Python's beta_start**0.5 is pow(), which can differ from sqrt() in the last bit.
      betas_ = at::pow(at::linspace(std::pow(betaStart, 0.5), std::pow(betaEnd, 0.5), numTrainTimesteps_, f32), 2);
    } else if (betaSchedule_ == "squaredcos_cap_v2") {
      betas_ = BetasForAlphaBar(numTrainTimesteps_, "cosine");
    } else if (betaSchedule_ == "laplace") {
      betas_ = BetasForAlphaBar(numTrainTimesteps_, "laplace");
    } else if (betaSchedule_ == "sigmoid") {
      betas_ = at::sigmoid(at::linspace(-6, 6, numTrainTimesteps_, f32)) * (betaEnd - betaStart) + betaStart;
    }
  }
  if (rescale) betas_ = RescaleZeroTerminalSnr(betas_);
  alphas_ = at::rsub(betas_, 1.0);
  alphasCumprod_ = at::cumprod(alphas_, 0);
  if (rescale && floorLastAlpha) alphasCumprod_[-1] = std::ldexp(1.0, -24);
  alphasCumprodHost_.assign(alphasCumprod_.data_ptr<float>(), alphasCumprod_.data_ptr<float>() + alphasCumprod_.numel());
  configJson_ = cfg.json();
}

int64_t Scheduler::IntTimestep(double t) const {
  if (!(t == std::floor(t)) || t < 0 || t >= numTrainTimesteps_)
    throw Error("INVALID_ARGUMENT", std::string(className()) + ": the timestep " + std::to_string(t) +
                                        " is not an integer in [0, " + std::to_string(numTrainTimesteps_) + ")");
  return static_cast<int64_t>(t);
}

void Scheduler::RequireTimesteps(const char* what) const {
  if (numInferenceSteps_ <= 0)
    throw Error("INVALID_ARGUMENT", std::string(className()) + "." + what +
                                        ": call setTimesteps(numInferenceSteps) first (the schedule is not set)");
}

at::Tensor Scheduler::StepNoise(const at::Tensor& like, const StepOptions& options, at::ScalarType dtype) {
  if (options.noise) {
    const at::Tensor& n = *options.noise;
    if (n.sizes() != like.sizes())
      throw Error("INVALID_ARGUMENT", "The step noise has shape " + c10::str(n.sizes()) + " but the model output has " +
                                          c10::str(like.sizes()));
    return n.to(like.device(), dtype);
  }
  if (!options.generators.empty()) {
    if (static_cast<int64_t>(options.generators.size()) != like.size(0))
      throw Error("INVALID_ARGUMENT", "The step has " + std::to_string(options.generators.size()) +
                                          " generators for a batch of " + std::to_string(like.size(0)));
    std::vector<int64_t> one = like.sizes().vec();
    one[0] = 1;
    std::vector<at::Tensor> parts;
    for (const at::Generator& g : options.generators)
      parts.push_back(at::randn(one, g, at::TensorOptions().dtype(dtype).device(g.device())).to(like.device()));
    return at::cat(parts, 0);
  }
  if (options.generator && options.generator->device() != like.device()) {
    // As diffusers' randn_tensor: draw on the generator's device, then move.
    return at::randn(like.sizes(), *options.generator, at::TensorOptions().dtype(dtype).device(options.generator->device()))
        .to(like.device());
  }
  return at::randn(like.sizes(), options.generator, at::TensorOptions().dtype(dtype).device(like.device()));
}

std::vector<int64_t> Scheduler::TimestepPositions(double t) const {
  at::Tensor ts = timesteps_.to(at::kDouble).contiguous();
  const double* p = ts.data_ptr<double>();
  std::vector<int64_t> hits;
  for (int64_t i = 0; i < ts.numel(); ++i)
    if (p[i] == t) hits.push_back(i);
  return hits;
}

int64_t Scheduler::IndexForTimestep(double t, bool fallbackLast) const {
  std::vector<int64_t> hits = TimestepPositions(t);
  if (hits.empty()) {
    if (fallbackLast) return timesteps_.numel() - 1;
    throw Error("INVALID_ARGUMENT", std::string(className()) + ": the timestep " + std::to_string(t) +
                                        " is not one of the scheduler's timesteps (pass the values of timesteps())");
  }
  return hits.size() > 1 ? hits[1] : hits[0];
}

void Scheduler::InitStepIndex(double t, bool fallbackLast) {
  stepIndex_ = beginIndex_ >= 0 ? beginIndex_ : IndexForTimestep(t, fallbackLast);
}

void Scheduler::setBeginIndex(int64_t i) {
  Require(i >= 0 && i < timesteps_.numel(), "setBeginIndex: the index " + std::to_string(i) + " is outside the schedule of " +
                                                std::to_string(timesteps_.numel()) + " timesteps");
  beginIndex_ = i;
}

namespace {

// alphas_cumprod[timesteps] as a [B, 1, ..., 1] tensor on x's device and dtype.
std::pair<at::Tensor, at::Tensor> SqrtAlphas(const at::Tensor& alphasCumprod, const at::Tensor& x,
                                             const at::Tensor& timesteps, int numTrain, const char* what) {
  Require(!at::isFloatingType(timesteps.scalar_type()) && timesteps.scalar_type() != at::kBool,
          std::string(what) + ": timesteps must be an integer tensor");
  Require(timesteps.dim() <= 1, std::string(what) + ": timesteps must be a scalar or a 1-D tensor");
  at::Tensor ts = timesteps.to(x.device(), at::kLong);
  if (ts.numel() > 0) {
    const int64_t lo = ts.min().item<int64_t>(), hi = ts.max().item<int64_t>();
    Require(lo >= 0 && hi < numTrain, std::string(what) + ": timesteps must lie in [0, " + std::to_string(numTrain) + ")");
  }
  at::Tensor ac = alphasCumprod.to(x.device()).to(x.scalar_type());
  at::Tensor a = ac.index({ts});
  at::Tensor sa = at::pow(a, 0.5).flatten();
  at::Tensor s1ma = at::pow(at::rsub(a, 1), 0.5).flatten();
  while (sa.dim() < x.dim()) sa = sa.unsqueeze(-1);
  while (s1ma.dim() < x.dim()) s1ma = s1ma.unsqueeze(-1);
  return {sa, s1ma};
}

}  // namespace

at::Tensor Scheduler::addNoise(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) {
  auto [sa, s1ma] = SqrtAlphas(alphasCumprod_, x0, timesteps, numTrainTimesteps_, "addNoise");
  return sa * x0 + s1ma * noise;
}

at::Tensor Scheduler::getVelocity(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) {
  auto [sa, s1ma] = SqrtAlphas(alphasCumprod_, x0, timesteps, numTrainTimesteps_, "getVelocity");
  return sa * noise - s1ma * x0;
}

at::Tensor Scheduler::trainingTarget(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) {
  if (predictionType_ == "epsilon") return noise;
  if (predictionType_ == "v_prediction") return getVelocity(x0, noise, timesteps);
  if (predictionType_ == "sample") return x0;
  throw Error("INVALID_ARGUMENT", "No training target for prediction_type \"" + predictionType_ + "\"");
}

// ---------------------------------------------------------------------------------------------

std::unique_ptr<Scheduler> CreateScheduler(const std::string& kindIn, const std::string& configText,
                                           const std::string& overridesText, const std::string& file) {
  std::string kind = kindIn;
  if (kind == "auto") {
    Value root = ParseObject(configText, file, "The scheduler config");
    const Value* cls = root.find("_class_name");
    if (!cls || cls->kind != Value::Kind::String)
      ConfigError(file, "the config has no \"_class_name\": name the scheduler kind explicitly");
    kind = cls->string;
  }
  if (kind == "ddpm" || kind == "DDPMScheduler") return std::make_unique<DDPMScheduler>(configText, overridesText, file);
  if (kind == "ddim" || kind == "DDIMScheduler") return std::make_unique<DDIMScheduler>(configText, overridesText, file);
  if (kind == "pndm" || kind == "PNDMScheduler") return std::make_unique<PNDMScheduler>(configText, overridesText, file);
  if (kind == "dpmsolver++" || kind == "dpmsolver_multistep" || kind == "DPMSolverMultistepScheduler")
    return std::make_unique<DPMSolverMultistepScheduler>(configText, overridesText, file);
  if (kind == "euler" || kind == "EulerDiscreteScheduler")
    return std::make_unique<EulerDiscreteScheduler>(configText, overridesText, file);
  if (kind == "euler_ancestral" || kind == "EulerAncestralDiscreteScheduler")
    return std::make_unique<EulerAncestralDiscreteScheduler>(configText, overridesText, file);
  const std::string msg = "the scheduler \"" + kind +
                          "\" is not implemented (available: ddpm, ddim, pndm, dpmsolver++, euler, euler_ancestral, or "
                          "their diffusers class names)";
  if (kindIn == "auto") ConfigError(file, msg);
  throw Error("INVALID_ARGUMENT", "Unknown scheduler kind: " + msg);
}

at::Tensor TrainingTimesteps(const Scheduler& scheduler, const at::Tensor& given, int64_t n,
                             const std::optional<at::Generator>& generator, c10::Device device) {
  const int64_t T = scheduler.numTrainTimesteps();
  if (given.defined()) {
    Require(given.dim() == 1 && given.size(0) == n, "timesteps must be a tensor [" + std::to_string(n) + "]");
    Require(!at::isFloatingType(given.scalar_type()) && !given.is_complex() && given.scalar_type() != at::kBool,
            "timesteps must hold integers");
    const at::Tensor ts = given.to(at::kCPU, at::kLong);
    Require(ts.min().item<int64_t>() >= 0 && ts.max().item<int64_t>() < T, "timesteps must lie in [0, " + std::to_string(T) + ")");
    return ts.to(device);
  }
  if (generator)
    return at::randint(0, T, {n}, *generator, at::TensorOptions().dtype(at::kLong).device(generator->device())).to(device);
  return at::randint(0, T, {n}, at::TensorOptions().dtype(at::kLong).device(device));
}

TrainingSample NoiseForTraining(const Scheduler& scheduler, const at::Tensor& latents, const at::Tensor& noise,
                                const at::Tensor& timesteps) {
  at::NoGradGuard noGrad;
  const at::Tensor a = scheduler.alphasCumprod().to(latents.device()).to(at::kFloat).index({timesteps});
  at::Tensor sa = at::pow(a, 0.5).flatten();
  at::Tensor s1ma = at::pow(at::rsub(a, 1), 0.5).flatten();
  while (sa.dim() < latents.dim()) sa = sa.unsqueeze(-1);
  while (s1ma.dim() < latents.dim()) s1ma = s1ma.unsqueeze(-1);
  TrainingSample r;
  r.noisy = sa * latents + s1ma * noise;
  const std::string& pt = scheduler.predictionType();
  if (pt == "epsilon") r.target = noise;
  else if (pt == "v_prediction") r.target = sa * noise - s1ma * latents;
  else r.target = latents;
  return r;
}

}  // namespace cd::schedulers
