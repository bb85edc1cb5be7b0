// Strict reading of a JS options object for the bindings: an unknown key is an error naming the
// known ones (a typo would otherwise be silently ignored), and each getter checks its type.
#pragma once

#include <ATen/ATen.h>
#include <napi.h>

#include <cmath>
#include <cstdint>
#include <set>
#include <string>

#include "core/errors.h"
#include "core/tensor.h"

namespace cd {

class JsOptions {
 public:
  // `what` names one entry in messages, e.g. "trainer option" → Unknown trainer option "x".
  JsOptions(const Napi::Value& v, const std::set<std::string>& known, const char* what) {
    if (v.IsUndefined() || v.IsNull()) return;
    Require(v.IsObject() && !v.IsArray(), std::string(what) + "s must be an object");
    o_ = v.As<Napi::Object>();
    auto keys = o_.GetPropertyNames();
    for (uint32_t i = 0; i < keys.Length(); ++i) {
      const std::string k = keys.Get(i).ToString().Utf8Value();
      if (known.count(k)) continue;
      std::string list;
      for (const auto& x : known) list += (list.empty() ? "" : ", ") + x;
      throw Error("INVALID_ARGUMENT", "Unknown " + std::string(what) + " \"" + k + "\" (known: " + list + ")");
    }
  }
  bool Has(const char* k) const {
    if (o_.IsEmpty()) return false;
    const Napi::Value v = o_.Get(k);
    return !v.IsUndefined() && !v.IsNull();
  }
  Napi::Value Get(const char* k) const { return o_.Get(k); }
  double Number(const char* k, double fallback) const {
    if (!Has(k)) return fallback;
    Require(Get(k).IsNumber(), std::string(k) + " must be a number");
    const double d = Get(k).As<Napi::Number>().DoubleValue();
    Require(std::isfinite(d), std::string(k) + " must be finite");
    return d;
  }
  int64_t Int(const char* k, int64_t fallback) const {
    const double d = Number(k, static_cast<double>(fallback));
    Require(d == std::floor(d) && std::fabs(d) <= 9007199254740991.0, std::string(k) + " must be an integer");
    return static_cast<int64_t>(d);
  }
  std::string String(const char* k, const std::string& fallback) const {
    if (!Has(k)) return fallback;
    Require(Get(k).IsString(), std::string(k) + " must be a string");
    return Get(k).As<Napi::String>().Utf8Value();
  }
  bool Bool(const char* k, bool fallback) const {
    if (!Has(k)) return fallback;
    Require(Get(k).IsBoolean(), std::string(k) + " must be a boolean");
    return Get(k).As<Napi::Boolean>().Value();
  }
  at::Tensor Tensor(const char* k) const { return Has(k) ? TensorWrap::From(Get(k), k) : at::Tensor(); }

 private:
  Napi::Object o_;
};

}  // namespace cd
