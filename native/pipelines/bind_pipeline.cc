// JS bindings of pipelines/stable_diffusion, as the addon's `pipeline` object:
//   denoise(unet, schedulerKind, schedulerConfig, latents, conditioning: Tensor | context,
//           {guidanceScale, steps, eta?, generators?, previewEvery?}, onProgress?, cancelToken?) → Promise<Tensor>
//   cat(tensors, dim) → Tensor   divide(x, s) → Tensor          denormalize(decoded) → Tensor          toUint8(images01) → Buffer[]
// Each denoise call builds its own scheduler from the config, so concurrent calls share no state.
#include <ATen/ATen.h>
#include <napi.h>

#include <cmath>
#include <set>

#include "core/async.h"
#include "core/errors.h"
#include "core/generator.h"
#include "core/registry.h"
#include "core/tensor.h"
#include "models/handles.h"
#include "models/unet_2d_condition.h"
#include "pipelines/stable_diffusion.h"
#include "schedulers/scheduler.h"

namespace cd {

namespace {

double NumberOption(const Napi::Object& o, const char* key, double fallback) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return fallback;
  Require(v.IsNumber() && std::isfinite(v.As<Napi::Number>().DoubleValue()), std::string(key) + " must be a finite number");
  return v.As<Napi::Number>().DoubleValue();
}

std::string StringArg(const Napi::Value& v, const char* what) {
  Require(v.IsString(), std::string(what) + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

Napi::Value Denoise(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto unet = UNetFromJs(info[0]);
    const std::string kind = StringArg(info[1], "schedulerKind");
    const std::string config = StringArg(info[2], "schedulerConfig");
    at::Tensor latents = TensorWrap::From(info[3], "latents");
    // The text conditioning: encoder hidden states, or a context prepared by unet.prepareContext
    // (keys and values computed once for all steps, per-row concept weights).
    at::Tensor states;
    std::shared_ptr<const models::CrossAttentionContext> prepared;
    if (info[4].IsExternal()) {
      prepared = CrossAttentionContextFromJs(info[4]);
    } else {
      states = TensorWrap::From(info[4], "conditioning");
    }
    Require(info[5].IsObject(), "denoise options must be an object");
    auto o = info[5].As<Napi::Object>();
    static const std::set<std::string> known = {"guidanceScale", "steps", "eta", "generators", "previewEvery"};
    auto keys = o.GetPropertyNames();
    for (uint32_t i = 0; i < keys.Length(); ++i) {
      const std::string k = keys.Get(i).ToString().Utf8Value();
      Require(known.count(k) > 0, "Unknown denoise option \"" + k + "\"");
    }

    pipelines::DenoiseArgs args;
    args.guidanceScale = NumberOption(o, "guidanceScale", 7.5);
    const double steps = NumberOption(o, "steps", 50);
    Require(steps >= 1 && steps <= 10000 && steps == std::floor(steps), "steps must be an integer from 1 to 10000");
    args.steps = static_cast<int>(steps);
    args.stepOptions.eta = NumberOption(o, "eta", 0.0);
    Require(args.stepOptions.eta >= 0, "eta must be ≥ 0");
    const double preview = NumberOption(o, "previewEvery", 0);
    Require(preview >= 0 && preview == std::floor(preview), "previewEvery must be a non-negative integer");
    args.previewEvery = static_cast<int>(preview);
    Napi::Value gens = o.Get("generators");
    if (!gens.IsUndefined() && !gens.IsNull()) {
      Require(gens.IsArray(), "generators must be an array of Generators");
      auto arr = gens.As<Napi::Array>();
      for (uint32_t i = 0; i < arr.Length(); ++i) {
        auto g = GeneratorWrap::From(arr.Get(i));
        Require(g.has_value(), "each entry of generators must be a Generator");
        args.stepOptions.generators.push_back(*g);
      }
      Require(static_cast<int64_t>(args.stepOptions.generators.size()) == latents.size(0),
              "generators must hold one Generator per latent");
    }

    Require(latents.dim() == 4 && latents.size(1) == unet->config().inChannels,
            "latents must be [N, " + std::to_string(unet->config().inChannels) + ", h, w], got " + c10::str(latents.sizes()));
    const bool guided = args.guidanceScale > 1.0;
    // Classifier-free guidance runs [negative × N, positive × N] in one batch.
    Require(prepared || states.dim() == 3, "conditioning must be [B, L, D], got " + c10::str(states.sizes()));
    const int64_t rows = prepared ? prepared->batchSize : states.size(0);
    Require(rows == latents.size(0) * (guided ? 2 : 1),
            "the conditioning has " + std::to_string(rows) + " rows; " + std::to_string(latents.size(0)) + " latents need " +
                std::to_string(latents.size(0) * (guided ? 2 : 1)) + (guided ? " (negative then positive, for guidance)" : ""));
    args.latents = latents;
    args.modelOptions = unet->options();
    // Validated now, on the JS thread, so a bad config is a synchronous error.
    std::shared_ptr<schedulers::Scheduler> scheduler = schedulers::CreateScheduler(kind, config, "", "the scheduler config");
    CancelFlag cancel = CancelFlagFrom(info[7]);
    return Run(
        env,
        [unet, scheduler, args, states, prepared](const Progress& progress) -> ResultFn {
          at::NoGradGuard noGrad;
          pipelines::UNetCall call;
          if (prepared) {
            call = [&](const at::Tensor& x, const at::Tensor& t) { return unet->forward(x, t, *prepared); };
          } else {
            const at::Tensor ctx = states.to(unet->options());
            call = [&, ctx](const at::Tensor& x, const at::Tensor& t) { return unet->forward(x, t, ctx); };
          }
          at::Tensor out = pipelines::Denoise(*scheduler, call, args, progress);
          return [out](Napi::Env e) -> Napi::Value { return TensorWrap::New(e, out); };
        },
        info[6], cancel);
  });
}

Napi::Value Divide(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    at::NoGradGuard noGrad;
    const at::Tensor& x = TensorWrap::From(info[0], "x");
    Require(info[1].IsNumber(), "divisor must be a number");
    const double s = info[1].As<Napi::Number>().DoubleValue();
    Require(std::isfinite(s) && s != 0, "divisor must be finite and non-zero");
    return TensorWrap::New(env, x / s);
  });
}

// cat(tensors, dim): batches assembled from per-request pieces (embeddings, per-image latents).
Napi::Value Cat(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    at::NoGradGuard noGrad;
    Require(info[0].IsArray(), "tensors must be an array of Tensors");
    auto arr = info[0].As<Napi::Array>();
    Require(arr.Length() > 0, "cat needs at least one tensor");
    std::vector<at::Tensor> ts;
    for (uint32_t i = 0; i < arr.Length(); ++i) ts.push_back(TensorWrap::From(arr.Get(i), "each tensor"));
    Require(info[1].IsNumber(), "dim must be a number");
    return TensorWrap::New(env, at::cat(ts, info[1].As<Napi::Number>().Int64Value()));
  });
}

Napi::Value DenormalizeJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    at::NoGradGuard noGrad;
    return TensorWrap::New(env, pipelines::Denormalize(TensorWrap::From(info[0], "decoded")));
  });
}

Napi::Value ToUint8Js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    at::NoGradGuard noGrad;
    at::Tensor u8 = pipelines::ToUint8(TensorWrap::From(info[0], "images"));
    auto arr = Napi::Array::New(env, static_cast<size_t>(u8.size(0)));
    for (int64_t i = 0; i < u8.size(0); ++i) {
      at::Tensor one = u8[i].contiguous();
      arr.Set(static_cast<uint32_t>(i), Napi::Buffer<uint8_t>::Copy(env, one.data_ptr<uint8_t>(), static_cast<size_t>(one.numel())));
    }
    return arr;
  });
}

void Init(Napi::Env env, Napi::Object exports) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("denoise", Napi::Function::New(env, Denoise, "denoise"));
  o.Set("cat", Napi::Function::New(env, Cat, "cat"));
  o.Set("divide", Napi::Function::New(env, Divide, "divide"));
  o.Set("denormalize", Napi::Function::New(env, DenormalizeJs, "denormalize"));
  o.Set("toUint8", Napi::Function::New(env, ToUint8Js, "toUint8"));
  exports.Set("pipeline", o);
}

}  // namespace

CD_REGISTER_BINDING(pipeline, Init);

}  // namespace cd
