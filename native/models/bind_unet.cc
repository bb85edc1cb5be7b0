// JS bindings of UNet2DConditionModel, as the addon's `unet` object. A loaded model is an opaque,
// type-tagged External handle that src/model/unet.ts wraps; loading and every pass run on worker
// threads and return promises.
#include <napi.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "core/async.h"
#include "core/dtype_device.h"
#include "core/errors.h"
#include "core/handle.h"
#include "core/registry.h"
#include "core/tensor.h"
#include "models/handles.h"
#include "models/load_args.h"
#include "models/unet_2d_condition.h"
#include "models/weights.h"

namespace cd {

namespace {

using models::UNet2DConditionModel;

const Handle<UNet2DConditionModel> kHandle({0x7c3e91a4d2b85f06ULL, 0x1f6a0d93c47e2b58ULL}, "UNet");

std::shared_ptr<UNet2DConditionModel> ModelFrom(const Napi::Value& v) { return kHandle.From(v); }

// A prepared context as JS holds it. Like a Tensor handle it tells V8 how much host memory it keeps
// alive, so forgotten contexts are collected in time. Created and destroyed on the JS thread only
// (queued passes hold the context itself, not the box).
struct ContextBox {
  std::shared_ptr<const models::CrossAttentionContext> context;
  napi_env env = nullptr;
  int64_t bytes = 0;
  ContextBox(std::shared_ptr<const models::CrossAttentionContext> c, napi_env e) : context(std::move(c)), env(e) {
    for (const auto& layer : context->layers)
      for (const at::Tensor* t : {&layer.key, &layer.value})
        if (t->device().is_cpu() && t->has_storage()) bytes += static_cast<int64_t>(t->storage().nbytes());
    if (bytes) Napi::MemoryManagement::AdjustExternalMemory(Napi::Env(env), bytes);
  }
  // The C call: a destructor (run by the garbage collector's finalizer) must not throw.
  ~ContextBox() {
    int64_t total = 0;
    if (bytes) napi_adjust_external_memory(env, -bytes, &total);
  }
  ContextBox(const ContextBox&) = delete;
  ContextBox& operator=(const ContextBox&) = delete;
};

const Handle<ContextBox> kContextHandle({0x3b9d27e4a1c6f085ULL, 0x6e02c8f5b7d94a13ULL}, "cross-attention context");

bool BoolOption(const Napi::Value& options, const char* key) {
  if (!options.IsObject()) return false;
  Napi::Value v = options.As<Napi::Object>().Get(key);
  if (v.IsUndefined() || v.IsNull()) return false;
  Require(v.IsBoolean(), std::string(key) + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

Napi::Array IntArray(Napi::Env env, const std::vector<int64_t>& v) {
  auto a = Napi::Array::New(env, v.size());
  for (size_t i = 0; i < v.size(); ++i) a.Set(static_cast<uint32_t>(i), Napi::Number::New(env, static_cast<double>(v[i])));
  return a;
}

// unet.load(configText, files: string[], {dtype?, device?, configFile?}) → Promise<handle>
Napi::Value Load(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    models::LoadArgs args = models::ParseLoadArgs(info);
    return Run(env, [args](const Progress&) -> ResultFn {
      // The config first: a refused option is reported before gigabytes of weights are read.
      auto config = models::UNetConfig::Parse(args.configText, args.configFile);
      auto weights = models::Weights::FromFiles(args.files, args.dtype, args.device);
      auto model = std::make_shared<UNet2DConditionModel>(std::move(config), std::move(weights));
      return [model](Napi::Env e) -> Napi::Value {
        return kHandle.Wrap(e, model);
      };
    });
  });
}

// unet.prepareContext(handle, encoderHiddenStates, weightSets?: {name: Tensor}[], assignment?: number[])
//   → Promise<context handle>
Napi::Value PrepareContext(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto model = ModelFrom(info[0]);
    at::Tensor states = TensorWrap::From(info[1], "encoderHiddenStates");
    std::vector<UNet2DConditionModel::KVWeights> weightSets;
    if (!info[2].IsUndefined() && !info[2].IsNull()) {
      Require(info[2].IsArray(), "weightSets must be an array of {name: Tensor} objects");
      auto sets = info[2].As<Napi::Array>();
      for (uint32_t s = 0; s < sets.Length(); ++s) {
        Napi::Value set = sets.Get(s);
        Require(set.IsObject() && !set.IsArray(),
                "weightSets[" + std::to_string(s) + "] must be a {name: Tensor} object");
        auto object = set.As<Napi::Object>();
        auto names = object.GetPropertyNames();
        UNet2DConditionModel::KVWeights weights;
        for (uint32_t i = 0; i < names.Length(); ++i) {
          const std::string name = names.Get(i).As<Napi::String>().Utf8Value();
          const std::string what = "weightSets[" + std::to_string(s) + "][\"" + name + "\"]";
          weights.emplace(name, TensorWrap::From(object.Get(name), what.c_str()));
        }
        weightSets.push_back(std::move(weights));
      }
    }
    std::vector<int64_t> assignment;
    if (!info[3].IsUndefined() && !info[3].IsNull()) {
      Require(info[3].IsArray(), "assignment must be an array of integers");
      auto a = info[3].As<Napi::Array>();
      for (uint32_t i = 0; i < a.Length(); ++i) {
        Napi::Value v = a.Get(i);
        const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : NAN;
        Require(std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15,
                "assignment[" + std::to_string(i) + "] must be an integer");
        assignment.push_back(static_cast<int64_t>(d));
      }
    }
    return Run(env, [model, states, weightSets, assignment](const Progress&) -> ResultFn {
      auto context = model->prepareContext(states, weightSets, assignment);
      return [context](Napi::Env e) -> Napi::Value {
        return kContextHandle.Wrap(e, std::make_shared<ContextBox>(context, e));
      };
    });
  });
}

// unet.disposeContext(context): frees the keys and values once no pass still uses them.
Napi::Value DisposeContext(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    kContextHandle.Dispose(info[0]);
    return env.Undefined();
  });
}

// unet.forward(handle, sample, timesteps, encoderHiddenStates | context, {bosDetach?}) → Promise<Tensor>
Napi::Value Forward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto model = ModelFrom(info[0]);
    at::Tensor sample = TensorWrap::From(info[1], "sample");
    at::Tensor timesteps = TensorWrap::From(info[2], "timesteps");
    if (info[3].IsExternal()) {
      // The box stays with JS; the pass holds the keys and values themselves.
      std::shared_ptr<const models::CrossAttentionContext> prepared = kContextHandle.From(info[3])->context;
      return Run(env, [model, sample, timesteps, prepared](const Progress&) -> ResultFn {
        at::Tensor out = model->forward(sample, timesteps, *prepared);
        return [out](Napi::Env e) -> Napi::Value { return TensorWrap::New(e, out); };
      });
    }
    at::Tensor context = TensorWrap::From(info[3], "encoderHiddenStates");
    models::AttentionOptions options;
    options.bosDetach = BoolOption(info[4], "bosDetach");
    return Run(env, [model, sample, timesteps, context, options](const Progress&) -> ResultFn {
      at::NoGradGuard noGrad;
      at::Tensor out = model->forward(sample, timesteps, context, options);
      return [out](Napi::Env e) -> Napi::Value { return TensorWrap::New(e, out); };
    });
  });
}

// unet.forwardBackward(handle, sample, timesteps, encoderHiddenStates, gradOut, {bosDetach?, ctxRequiresGrad?, gradientCheckpointing?})
//   → Promise<{out, grads: {name: Tensor}, gradEncoderHiddenStates?}>
Napi::Value ForwardBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto model = ModelFrom(info[0]);
    at::Tensor sample = TensorWrap::From(info[1], "sample");
    at::Tensor timesteps = TensorWrap::From(info[2], "timesteps");
    at::Tensor context = TensorWrap::From(info[3], "encoderHiddenStates");
    at::Tensor gradOut = TensorWrap::From(info[4], "gradOut");
    models::AttentionOptions options;
    options.bosDetach = BoolOption(info[5], "bosDetach");
    const bool ctxGrad = BoolOption(info[5], "ctxRequiresGrad");
    const bool checkpointing = BoolOption(info[5], "gradientCheckpointing");
    return Run(env, [model, sample, timesteps, context, gradOut, options, ctxGrad,
                     checkpointing](const Progress&) -> ResultFn {
      auto r = std::make_shared<UNet2DConditionModel::BackwardResult>(
          model->forwardBackward(sample, timesteps, context, gradOut, options, ctxGrad, checkpointing));
      return [r](Napi::Env e) -> Napi::Value {
        Napi::Object o = Napi::Object::New(e);
        o.Set("out", TensorWrap::New(e, r->out));
        Napi::Object grads = Napi::Object::New(e);
        for (const auto& [name, g] : r->grads) grads.Set(name, TensorWrap::New(e, g));
        o.Set("grads", grads);
        o.Set("checkpointedSegments", Napi::Number::New(e, static_cast<double>(r->checkpointedSegments)));
        if (r->gradEncoderHiddenStates.defined())
          o.Set("gradEncoderHiddenStates", TensorWrap::New(e, r->gradEncoderHiddenStates));
        return o;
      };
    });
  });
}

// unet.setTrainable(handle, mode: 'none' | 'crossattn_kv' | 'crossattn')
Napi::Value SetTrainable(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto model = ModelFrom(info[0]);
    Require(info[1].IsString(), "mode must be 'none', 'crossattn_kv' or 'crossattn'");
    auto mode = models::TrainableModeFromName(info[1].As<Napi::String>().Utf8Value());
    Require(mode.has_value(), "mode must be 'none', 'crossattn_kv' or 'crossattn'");
    model->setTrainable(*mode);
    return env.Undefined();
  });
}

// unet.parameters(handle, trainableOnly: boolean) → {name: Tensor}, the model's own tensors (no copies).
Napi::Value Parameters(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto model = ModelFrom(info[0]);
    const bool trainableOnly = info[1].IsBoolean() && info[1].As<Napi::Boolean>().Value();
    const auto mode = model->trainable();
    Napi::Object o = Napi::Object::New(env);
    for (const auto& [name, p] : model->parameters())
      if (!trainableOnly || models::IsTrainable(mode, name)) o.Set(name, TensorWrap::New(env, p));
    return o;
  });
}

// unet.info(handle) → {config and state}
Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto model = ModelFrom(info[0]);
    const auto& c = model->config();
    Napi::Object o = Napi::Object::New(env);
    o.Set("inChannels", static_cast<double>(c.inChannels));
    o.Set("outChannels", static_cast<double>(c.outChannels));
    o.Set("crossAttentionDim", static_cast<double>(c.crossAttentionDim));
    o.Set("blockOutChannels", IntArray(env, c.blockOutChannels));
    o.Set("layersPerBlock", IntArray(env, c.layersPerBlock));
    o.Set("attentionHeads", IntArray(env, c.heads));
    o.Set("sampleSize", IntArray(env, c.sampleSize));
    o.Set("useLinearProjection", c.useLinearProjection);
    o.Set("upcastAttention", c.upcastAttention);
    o.Set("dtype", DtypeName(model->options().dtype().toScalarType()));
    o.Set("device", DeviceName(model->options().device()));
    o.Set("trainable", models::TrainableModeName(model->trainable()));
    double count = 0;
    for (const auto& [name, p] : model->parameters()) count += static_cast<double>(p.numel());
    o.Set("parameterCount", count);
    return o;
  });
}

// unet.dispose(handle): frees the model once no pass still uses it.
Napi::Value Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    kHandle.Dispose(info[0]);
    return env.Undefined();
  });
}

}  // namespace

// For native code handed a JS UNet (the Custom Diffusion trainer); declared in models/handles.h.
std::shared_ptr<UNet2DConditionModel> UNetFromJs(const Napi::Value& handle) { return ModelFrom(handle); }

std::shared_ptr<const models::CrossAttentionContext> CrossAttentionContextFromJs(const Napi::Value& handle) {
  return kContextHandle.From(handle)->context;
}

void InitUNet(Napi::Env env, Napi::Object exports) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("load", Napi::Function::New(env, Load, "load"));
  o.Set("prepareContext", Napi::Function::New(env, PrepareContext, "prepareContext"));
  o.Set("disposeContext", Napi::Function::New(env, DisposeContext, "disposeContext"));
  o.Set("forward", Napi::Function::New(env, Forward, "forward"));
  o.Set("forwardBackward", Napi::Function::New(env, ForwardBackward, "forwardBackward"));
  o.Set("setTrainable", Napi::Function::New(env, SetTrainable, "setTrainable"));
  o.Set("parameters", Napi::Function::New(env, Parameters, "parameters"));
  o.Set("info", Napi::Function::New(env, Info, "info"));
  o.Set("dispose", Napi::Function::New(env, Dispose, "dispose"));
  exports.Set("unet", o);
}

CD_REGISTER_BINDING(unet, InitUNet);

}  // namespace cd
