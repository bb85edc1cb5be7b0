#include "core/generator.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cstring>
#include <mutex>

#include "core/addon_data.h"
#include "core/dtype_device.h"
#include "core/errors.h"

namespace cd {

void GeneratorWrap::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "Generator",
                                    {InstanceAccessor<&GeneratorWrap::Seed>("seed"),
                                     InstanceAccessor<&GeneratorWrap::Device>("device"),
                                     InstanceMethod<&GeneratorWrap::GetState>("getState"),
                                     InstanceMethod<&GeneratorWrap::SetState>("setState")});
  Data(env).generatorCtor = Napi::Persistent(ctor);
  exports.Set("Generator", ctor);
}

std::optional<at::Generator> GeneratorWrap::From(const Napi::Value& v) {
  if (v.IsUndefined() || v.IsNull()) return std::nullopt;
  Napi::Env env = v.Env();
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(Data(env).generatorCtor.Value()))
    throw Napi::TypeError::New(env, "Expected a Generator");
  return Unwrap(v.As<Napi::Object>())->gen_;
}

// new Generator(seed: bigint | number, device = "cpu")
GeneratorWrap::GeneratorWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GeneratorWrap>(info) {
  Napi::Env env = info.Env();
  Guard(env, [&]() -> Napi::Value {
    uint64_t seed = 0;
    if (info[0].IsBigInt()) {
      bool lossless = true;
      seed = info[0].As<Napi::BigInt>().Uint64Value(&lossless);
      Require(lossless, "Generator seed must fit in 64 bits");
    } else if (info[0].IsNumber()) {
      double d = info[0].As<Napi::Number>().DoubleValue();
      Require(d >= 0 && d == static_cast<double>(static_cast<uint64_t>(d)) && d <= 9007199254740991.0,
              "Generator seed must be a non-negative integer (use a bigint above 2^53)");
      seed = static_cast<uint64_t>(d);
    } else {
      throw Error("INVALID_ARGUMENT", "Generator needs a seed (number or bigint)");
    }
    const c10::Device device = ParseDevice(info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "cpu");
    if (device.is_cpu()) {
      gen_ = at::make_generator<at::CPUGeneratorImpl>(seed);
    } else {
      gen_ = at::globalContext().defaultGenerator(device).clone();
      std::lock_guard<std::mutex> lock(gen_.mutex());
      gen_.set_current_seed(seed);
    }
    return env.Undefined();
  });
}

Napi::Value GeneratorWrap::Seed(const Napi::CallbackInfo& info) {
  return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(gen_.current_seed()));
}

Napi::Value GeneratorWrap::Device(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), DeviceName(gen_.device()));
}

// The full generator state as bytes (for checkpoints).
Napi::Value GeneratorWrap::GetState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    at::Tensor state;
    {
      std::lock_guard<std::mutex> lock(gen_.mutex());
      state = gen_.get_state();
    }
    auto out = Napi::Uint8Array::New(env, static_cast<size_t>(state.numel()));
    std::memcpy(out.Data(), state.data_ptr(), static_cast<size_t>(state.numel()));
    return out;
  });
}

Napi::Value GeneratorWrap::SetState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    Require(info[0].IsTypedArray() && info[0].As<Napi::TypedArray>().TypedArrayType() == napi_uint8_array,
            "setState expects the Uint8Array returned by getState()");
    auto bytes = info[0].As<Napi::Uint8Array>();
    at::Tensor state = at::empty({static_cast<int64_t>(bytes.ElementLength())}, at::kByte);
    std::memcpy(state.data_ptr(), bytes.Data(), bytes.ElementLength());
    std::lock_guard<std::mutex> lock(gen_.mutex());
    try {
      gen_.set_state(state);
    } catch (const c10::Error& e) {
      throw Error("INVALID_ARGUMENT", std::string("Not a valid generator state: ") + e.what_without_backtrace());
    }
    return env.Undefined();
  });
}

}  // namespace cd
