// JS bindings of models/autoencoder_kl: exports.vae = {load, encode, sample, decode, dispose}. A loaded
// model travels to JS as a type-tagged External owning a shared_ptr (see bind_text_encoder.cc).
#include <napi.h>

#include "core/async.h"
#include "core/dtype_device.h"
#include "core/errors.h"
#include "core/generator.h"
#include "core/handle.h"
#include "core/registry.h"
#include "core/tensor.h"
#include "models/load_args.h"
#include "models/handles.h"
#include "models/autoencoder_kl.h"

namespace cd {

namespace {

using models::AutoencoderKL;

const Handle<AutoencoderKL> kHandle({0x2d5e7a9c1b3f4e60ULL, 0x9e8d7c6b5a493827ULL}, "VAE");

std::shared_ptr<AutoencoderKL> ModelFrom(const Napi::Value& v) { return kHandle.From(v); }

bool BoolOption(const Napi::Value& opts, const char* key) {
  return opts.IsObject() && opts.As<Napi::Object>().Get(key).ToBoolean().Value();
}

Napi::Object Describe(Napi::Env env, const std::shared_ptr<AutoencoderKL>& m) {
  Napi::Object o = Napi::Object::New(env);
  const auto& c = m->config();
  o.Set("handle", kHandle.Wrap(env, m));
  o.Set("scalingFactor", c.scaling_factor);
  o.Set("latentChannels", c.latent_channels);
  o.Set("inChannels", c.in_channels);
  o.Set("outChannels", c.out_channels);
  o.Set("spatialFactor", m->spatial_factor());
  o.Set("sampleSize", c.sample_size);
  o.Set("forceUpcast", c.force_upcast);
  o.Set("dtype", DtypeName(m->dtype()));
  o.Set("device", DeviceName(m->device()));
  return o;
}

// load(configText, weightFiles, {dtype?, device?, configFile?}) → Promise<{handle, scalingFactor, ...}>
Napi::Value Load(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    models::LoadArgs args = models::ParseLoadArgs(info);
    return Run(env, [args](const Progress&) -> ResultFn {
      auto m = AutoencoderKL::Load(args.configText, args.configFile, args.files, args.dtype, args.device);
      return [m](Napi::Env e) -> Napi::Value { return Describe(e, m); };
    });
  });
}

// encode(handle, images, {slice?}, cancelToken?) → Promise<{mean, logvar, std}>
Napi::Value Encode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto model = ModelFrom(info[0]);
    at::Tensor images = TensorWrap::From(info[1], "images");
    const bool slice = BoolOption(info[2], "slice");
    return Run(
        env,
        [model, images, slice](const Progress& progress) -> ResultFn {
          at::NoGradGuard no_grad;
          auto p = std::make_shared<AutoencoderKL::Posterior>(model->Encode(images, slice, &progress));
          return [p](Napi::Env e) -> Napi::Value {
            Napi::Object o = Napi::Object::New(e);
            o.Set("mean", TensorWrap::New(e, p->mean));
            o.Set("logvar", TensorWrap::New(e, p->logvar));
            o.Set("std", TensorWrap::New(e, p->std));
            return o;
          };
        },
        Napi::Value(), CancelFlagFrom(info[3]));
  });
}

// sample(mean, std, noise?, generator?) → Tensor (mean + std · noise)
Napi::Value Sample(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    AutoencoderKL::Posterior p;
    p.mean = TensorWrap::From(info[0], "mean");
    p.std = TensorWrap::From(info[1], "std");
    Require(p.mean.sizes() == p.std.sizes(), "mean and std must have the same shape");
    at::Tensor noise;
    if (!info[2].IsUndefined() && !info[2].IsNull()) noise = TensorWrap::From(info[2], "noise");
    std::optional<at::Generator> gen = GeneratorWrap::From(info[3]);
    at::NoGradGuard no_grad;
    return TensorWrap::New(env, AutoencoderKL::Sample(p, noise, gen));
  });
}

// decode(handle, latents, {slice?, tile?}, cancelToken?) → Promise<Tensor>
Napi::Value Decode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto model = ModelFrom(info[0]);
    at::Tensor latents = TensorWrap::From(info[1], "latents");
    const bool slice = BoolOption(info[2], "slice");
    const bool tile = BoolOption(info[2], "tile");
    return Run(
        env,
        [model, latents, slice, tile](const Progress& progress) -> ResultFn {
          at::NoGradGuard no_grad;
          at::Tensor out = model->Decode(latents, slice, tile, &progress);
          return [out](Napi::Env e) -> Napi::Value { return TensorWrap::New(e, out); };
        },
        Napi::Value(), CancelFlagFrom(info[3]));
  });
}

Napi::Value Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    kHandle.Dispose(info[0]);
    return env.Undefined();
  });
}

}  // namespace

std::shared_ptr<models::AutoencoderKL> VaeFromJs(const Napi::Value& handle) { return ModelFrom(handle); }

void InitVae(Napi::Env env, Napi::Object exports) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("load", Napi::Function::New(env, Load, "load"));
  o.Set("encode", Napi::Function::New(env, Encode, "encode"));
  o.Set("sample", Napi::Function::New(env, Sample, "sample"));
  o.Set("decode", Napi::Function::New(env, Decode, "decode"));
  o.Set("dispose", Napi::Function::New(env, Dispose, "dispose"));
  exports.Set("vae", o);
}

CD_REGISTER_BINDING(vae, InitVae);

}  // namespace cd
