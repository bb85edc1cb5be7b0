// JS bindings of custom_diffusion/compose and compress, as the addon's `delta` object. Coarse API:
// tensors in, tensors out; both run on a worker thread.
//   compose(baseLayers: {name: Tensor}, concepts: [{keys: Tensor, weights: {name: Tensor}}], regKeys: Tensor,
//           {outDtype?}, onProgress?, cancelToken?)
//     → Promise<{weights: {name: Tensor}, layers: [{name, constraintResidual, relConstraintResidual, regError}],
//                targetRows, duplicateRows, regRows, solver}>
//   compress(tuned: {name: Tensor}, base: {name: Tensor}, {ratio?, rank?, keepCrossing?, outDtype?}, cancelToken?)
//     → Promise<{layers: [{name, u, v, rank, relError, keptFraction, zeroRank}]}>
//   assign(dst: Tensor[], src: Tensor[])        in place dst[i] ← src[i] (shapes must match; converts dtype/device)
//   addProduct(dst: Tensor, u: Tensor, v: Tensor)  in place dst += u·v (computed in float64, then converted)
//   clone(t: Tensor) → Tensor                     an exact copy (to restore tensors bit for bit)
// The in-place calls run on the JS thread (they take milliseconds) and must not overlap a forward pass.
#include <napi.h>

#include <cmath>
#include <map>

#include "core/async.h"
#include "core/dtype_device.h"
#include "core/errors.h"
#include "core/registry.h"
#include "core/tensor.h"
#include "custom_diffusion/compose.h"
#include "custom_diffusion/compress.h"

namespace cd {

namespace {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

NamedTensors NamedFrom(const Napi::Value& v, const char* what) {
  Require(v.IsObject() && !v.IsArray(), std::string(what) + " must be an object {name: Tensor}");
  Napi::Object o = v.As<Napi::Object>();
  Napi::Array keys = o.GetPropertyNames();
  NamedTensors out;
  for (uint32_t i = 0; i < keys.Length(); ++i) {
    const std::string k = keys.Get(i).ToString().Utf8Value();
    out.emplace_back(k, TensorWrap::From(o.Get(k), what));
  }
  return out;
}

at::ScalarType OutDtype(const Napi::Object& opts) {
  Napi::Value v = opts.Get("outDtype");
  if (v.IsUndefined() || v.IsNull()) return at::kFloat;
  Require(v.IsString(), "outDtype must be a string");
  const at::ScalarType t = ParseDtype(v.ToString().Utf8Value());
  Require(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
          "outDtype must be a floating-point dtype");
  return t;
}

void CheckKeys(const Napi::Object& opts, std::initializer_list<const char*> known, const char* what) {
  Napi::Array keys = opts.GetPropertyNames();
  for (uint32_t i = 0; i < keys.Length(); ++i) {
    const std::string k = keys.Get(i).ToString().Utf8Value();
    bool ok = false;
    for (const char* x : known) ok = ok || k == x;
    Require(ok, std::string("Unknown ") + what + " option \"" + k + "\"");
  }
}

Napi::Object OptionsFrom(const Napi::Value& v) {
  if (v.IsUndefined() || v.IsNull()) return Napi::Object::New(v.Env());
  Require(v.IsObject(), "options must be an object");
  return v.As<Napi::Object>();
}

Napi::Value Compose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    NamedTensors base = NamedFrom(info[0], "baseLayers");
    Require(info[1].IsArray(), "concepts must be an array");
    Napi::Array arr = info[1].As<Napi::Array>();
    std::vector<custom_diffusion::ComposeConcept> concepts;
    for (uint32_t i = 0; i < arr.Length(); ++i) {
      Require(arr.Get(i).IsObject(), "each concept must be {keys, weights}");
      Napi::Object c = arr.Get(i).As<Napi::Object>();
      custom_diffusion::ComposeConcept cc;
      cc.keys = TensorWrap::From(c.Get("keys"), "concept keys");
      cc.weights = NamedFrom(c.Get("weights"), "concept weights");
      concepts.push_back(std::move(cc));
    }
    at::Tensor reg = TensorWrap::From(info[2], "regKeys");
    Napi::Object opts = OptionsFrom(info[3]);
    CheckKeys(opts, {"outDtype"}, "compose");
    custom_diffusion::ComposeOptions o;
    o.out_dtype = OutDtype(opts);
    CancelFlag cancel = CancelFlagFrom(info[5]);
    return Run(
        env,
        [base, concepts, reg, o](const Progress& p) mutable -> ResultFn {
          p.ThrowIfCancelled();
          o.on_layer = [&p](int64_t done, int64_t total) {
            p.ThrowIfCancelled();
            p.Report({"layer", {{"done", static_cast<double>(done)}, {"total", static_cast<double>(total)}}});
          };
          auto r = std::make_shared<custom_diffusion::ComposeResult>(
              custom_diffusion::Compose(base, concepts, reg, o));
          return [r](Napi::Env e) -> Napi::Value {
            Napi::Object out = Napi::Object::New(e);
            Napi::Object w = Napi::Object::New(e);
            for (const auto& [name, t] : r->weights) w.Set(name, TensorWrap::New(e, t));
            Napi::Array layers = Napi::Array::New(e, r->layers.size());
            for (size_t i = 0; i < r->layers.size(); ++i) {
              Napi::Object l = Napi::Object::New(e);
              l.Set("name", r->layers[i].name);
              l.Set("constraintResidual", r->layers[i].constraint_residual);
              l.Set("relConstraintResidual", r->layers[i].rel_constraint_residual);
              l.Set("regError", r->layers[i].reg_error);
              layers.Set(static_cast<uint32_t>(i), l);
            }
            out.Set("weights", w);
            out.Set("layers", layers);
            out.Set("targetRows", static_cast<double>(r->target_rows));
            out.Set("duplicateRows", static_cast<double>(r->duplicate_rows));
            out.Set("regRows", static_cast<double>(r->reg_rows));
            out.Set("solver", r->solver);
            return out;
          };
        },
        info[4], cancel);
  });
}

Napi::Value Compress(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    NamedTensors tuned = NamedFrom(info[0], "tuned");
    NamedTensors base_list = NamedFrom(info[1], "base");
    std::map<std::string, at::Tensor> base(base_list.begin(), base_list.end());
    for (const auto& [name, t] : tuned)
      Require(base.count(name), "compress: layer " + name + " has no base weight");
    Napi::Object opts = OptionsFrom(info[2]);
    CheckKeys(opts, {"ratio", "rank", "keepCrossing", "outDtype"}, "compress");
    custom_diffusion::CompressOptions o;
    o.out_dtype = OutDtype(opts);
    if (opts.Has("ratio") && !opts.Get("ratio").IsUndefined()) o.ratio = opts.Get("ratio").ToNumber().DoubleValue();
    if (opts.Has("rank") && !opts.Get("rank").IsUndefined() && !opts.Get("rank").IsNull()) {
      const double r = opts.Get("rank").ToNumber().DoubleValue();
      Require(r >= 0 && r == std::floor(r), "rank must be a non-negative integer");
      o.rank = static_cast<int64_t>(r);
    }
    o.keep_crossing = opts.Get("keepCrossing").ToBoolean().Value();
    CancelFlag cancel = CancelFlagFrom(info[3]);
    return Run(
        env,
        [tuned, base, o](const Progress& p) -> ResultFn {
          auto rs = std::make_shared<std::vector<std::pair<std::string, custom_diffusion::CompressResult>>>();
          for (const auto& [name, t] : tuned) {
            p.ThrowIfCancelled();
            rs->emplace_back(name, custom_diffusion::Compress(t, base.at(name), o));
          }
          return [rs](Napi::Env e) -> Napi::Value {
            Napi::Array layers = Napi::Array::New(e, rs->size());
            for (size_t i = 0; i < rs->size(); ++i) {
              const auto& [name, r] = (*rs)[i];
              Napi::Object l = Napi::Object::New(e);
              l.Set("name", name);
              l.Set("u", TensorWrap::New(e, r.u));
              l.Set("v", TensorWrap::New(e, r.v));
              l.Set("rank", static_cast<double>(r.rank));
              l.Set("relError", r.rel_error);
              l.Set("keptFraction", r.kept_fraction);
              l.Set("zeroRank", r.zero_rank);
              layers.Set(static_cast<uint32_t>(i), l);
            }
            Napi::Object out = Napi::Object::New(e);
            out.Set("layers", layers);
            return out;
          };
        },
        Napi::Value(), cancel);
  });
}

Napi::Value Assign(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    Require(info[0].IsArray() && info[1].IsArray(), "assign(dst[], src[])");
    Napi::Array d = info[0].As<Napi::Array>(), s = info[1].As<Napi::Array>();
    Require(d.Length() == s.Length(), "assign: dst and src differ in length");
    std::vector<at::Tensor> dst, src;
    for (uint32_t i = 0; i < d.Length(); ++i) {
      dst.push_back(TensorWrap::From(d.Get(i), "dst"));
      src.push_back(TensorWrap::From(s.Get(i), "src"));
      Require(dst.back().sizes() == src.back().sizes(), "assign: shape " + c10::str(src.back().sizes()) +
                                                           " does not match " + c10::str(dst.back().sizes()));
    }
    // Checked first, then written: a failure leaves every tensor untouched.
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < dst.size(); ++i) dst[i].copy_(src[i]);
    return env.Undefined();
  });
}

Napi::Value AddProduct(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    at::Tensor dst = TensorWrap::From(info[0], "dst");
    at::Tensor u = TensorWrap::From(info[1], "u");
    at::Tensor v = TensorWrap::From(info[2], "v");
    Require(dst.dim() == 2 && u.dim() == 2 && v.dim() == 2 && u.size(0) == dst.size(0) && v.size(1) == dst.size(1) &&
                u.size(1) == v.size(0),
            "addProduct: u " + c10::str(u.sizes()) + " · v " + c10::str(v.sizes()) + " does not fit " +
                c10::str(dst.sizes()));
    at::NoGradGuard no_grad;
    const auto f64 = at::TensorOptions().dtype(at::kDouble).device(dst.device());
    dst.copy_(dst.to(at::kDouble) + at::matmul(u.to(f64), v.to(f64)));
    return env.Undefined();
  });
}

Napi::Value Clone(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    at::NoGradGuard no_grad;
    return TensorWrap::New(env, TensorWrap::From(info[0], "tensor").detach().clone());
  });
}

void InitDelta(Napi::Env env, Napi::Object exports) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("compose", Napi::Function::New(env, Compose, "compose"));
  o.Set("compress", Napi::Function::New(env, Compress, "compress"));
  o.Set("assign", Napi::Function::New(env, Assign, "assign"));
  o.Set("addProduct", Napi::Function::New(env, AddProduct, "addProduct"));
  o.Set("clone", Napi::Function::New(env, Clone, "clone"));
  exports.Set("delta", o);
}

}  // namespace

}  // namespace cd

CD_REGISTER_BINDING(delta, cd::InitDelta);
