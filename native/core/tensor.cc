#include "core/tensor.h"

#include <cstring>

#include "core/addon_data.h"
#include "core/async.h"
#include "core/dtype_device.h"
#include "core/errors.h"
#include "core/generator.h"

namespace cd {

std::atomic<int64_t> TensorWrap::live_{0};

namespace {

// The dtype a typed array holds when no dtype is given.
std::optional<at::ScalarType> NaturalDtype(napi_typedarray_type t) {
  switch (t) {
    case napi_float32_array: return at::kFloat;
    case napi_float64_array: return at::kDouble;
    case napi_int32_array: return at::kInt;
    case napi_int16_array: return at::kShort;
    case napi_int8_array: return at::kChar;
    case napi_uint8_array: return at::kByte;
    case napi_bigint64_array: return at::kLong;
    default: return std::nullopt;  // Uint16Array: raw float16/bfloat16 bits, dtype required
  }
}

struct ParsedOptions {
  std::optional<at::ScalarType> dtype;
  std::optional<c10::Device> device;
  Napi::Value generator;
};

ParsedOptions OptionsFrom(const Napi::Value& v) {
  ParsedOptions o;
  if (v.IsUndefined() || v.IsNull()) return o;
  Require(v.IsObject(), "options must be an object");
  auto obj = v.As<Napi::Object>();
  if (obj.Has("dtype") && !obj.Get("dtype").IsUndefined())
    o.dtype = ParseDtype(obj.Get("dtype").ToString().Utf8Value());
  if (obj.Has("device") && !obj.Get("device").IsUndefined())
    o.device = ParseDevice(obj.Get("device").ToString().Utf8Value());
  o.generator = obj.Get("generator");
  return o;
}

}  // namespace

std::vector<int64_t> ShapeFrom(const Napi::Value& v) {
  Require(v.IsArray(), "shape must be an array of non-negative integers");
  auto arr = v.As<Napi::Array>();
  std::vector<int64_t> shape;
  for (uint32_t i = 0; i < arr.Length(); ++i) {
    Napi::Value d = arr.Get(i);
    Require(d.IsNumber(), "shape must be an array of non-negative integers");
    double x = d.As<Napi::Number>().DoubleValue();
    Require(x >= 0 && x == static_cast<double>(static_cast<int64_t>(x)) && x < 9.0e15,
            "shape must be an array of non-negative integers");
    shape.push_back(static_cast<int64_t>(x));
  }
  return shape;
}

void TensorWrap::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(
      env, "Tensor",
      {InstanceAccessor<&TensorWrap::Shape>("shape"), InstanceAccessor<&TensorWrap::Dtype>("dtype"),
       InstanceAccessor<&TensorWrap::Device>("device"), InstanceAccessor<&TensorWrap::Numel>("numel"),
       InstanceAccessor<&TensorWrap::Disposed>("disposed"), InstanceMethod<&TensorWrap::Dispose>("dispose"),
       InstanceMethod<&TensorWrap::ToArray>("toArray"), InstanceMethod<&TensorWrap::Item>("item"),
       InstanceMethod<&TensorWrap::To>("to"), StaticMethod<&TensorWrap::FromArray>("fromArray"),
       StaticMethod<&TensorWrap::Zeros>("zeros"), StaticMethod<&TensorWrap::Randn>("randn")});
  Data(env).tensorCtor = Napi::Persistent(ctor);
  exports.Set("Tensor", ctor);
}

Napi::Object TensorWrap::New(Napi::Env env, at::Tensor t) {
  auto ext = Napi::External<at::Tensor>::New(env, &t);
  return Data(env).tensorCtor.New({ext});
}

bool TensorWrap::IsTensor(Napi::Env env, const Napi::Value& v) {
  return v.IsObject() && v.As<Napi::Object>().InstanceOf(Data(env).tensorCtor.Value());
}

at::Tensor& TensorWrap::From(const Napi::Value& v, const char* what) {
  Napi::Env env = v.Env();
  if (!IsTensor(env, v)) throw Error("INVALID_ARGUMENT", std::string(what) + " must be a Tensor");
  return Unwrap(v.As<Napi::Object>())->Get(env);
}

TensorWrap::TensorWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TensorWrap>(info) {
  Napi::Env env = info.Env();
  if (info.Length() != 1 || !info[0].IsExternal()) {
    throw Napi::TypeError::New(env, "Tensors are made by Tensor.fromArray, Tensor.zeros, Tensor.randn or library calls");
  }
  tensor_ = *info[0].As<Napi::External<at::Tensor>>().Data();
  live_counted_ = true;
  ++live_;
  if (tensor_.defined() && tensor_.device().is_cpu() && tensor_.has_storage()) {
    external_bytes_ = static_cast<int64_t>(tensor_.storage().nbytes());
    Napi::MemoryManagement::AdjustExternalMemory(env, external_bytes_);
  }
}

TensorWrap::~TensorWrap() { Release(Env()); }

void TensorWrap::Release(Napi::Env env) {
  tensor_ = at::Tensor();
  if (external_bytes_) {
    Napi::MemoryManagement::AdjustExternalMemory(env, -external_bytes_);
    external_bytes_ = 0;
  }
  if (live_counted_) {
    live_counted_ = false;
    --live_;
  }
}

at::Tensor& TensorWrap::Get(Napi::Env env) {
  if (!tensor_.defined()) {
    Napi::Error e = Napi::Error::New(env, "This tensor was disposed; it can no longer be used.");
    e.Set("code", Napi::String::New(env, "DISPOSED"));
    throw e;
  }
  return tensor_;
}

Napi::Value TensorWrap::Shape(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto& t = Get(env);
  auto arr = Napi::Array::New(env, static_cast<size_t>(t.dim()));
  for (int64_t i = 0; i < t.dim(); ++i) arr.Set(static_cast<uint32_t>(i), Napi::Number::New(env, static_cast<double>(t.size(i))));
  return arr;
}

Napi::Value TensorWrap::Dtype(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), DtypeName(Get(info.Env()).scalar_type()));
}

Napi::Value TensorWrap::Device(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), DeviceName(Get(info.Env()).device()));
}

Napi::Value TensorWrap::Numel(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(Get(info.Env()).numel()));
}

Napi::Value TensorWrap::Disposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), !tensor_.defined());
}

Napi::Value TensorWrap::Dispose(const Napi::CallbackInfo& info) {
  Release(info.Env());
  return info.Env().Undefined();
}

// A copy of the data in a typed array of the tensor's dtype (float16/bfloat16: raw bits in a
// Uint16Array; bool: Uint8Array of 0/1).
Napi::Value TensorWrap::ToArray(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor t = Get(env);
  return Guard(env, [&]() -> Napi::Value {
    at::Tensor c = t.detach().to(c10::Device(c10::kCPU)).contiguous();
    const size_t n = static_cast<size_t>(c.numel());
    const size_t bytes = n * c.element_size();
    auto fill = [&](auto arr) -> Napi::Value {
      if (bytes) std::memcpy(arr.Data(), c.data_ptr(), bytes);
      return arr;
    };
    switch (c.scalar_type()) {
      case at::kFloat: return fill(Napi::Float32Array::New(env, n));
      case at::kDouble: return fill(Napi::Float64Array::New(env, n));
      case at::kHalf:
      case at::kBFloat16: return fill(Napi::Uint16Array::New(env, n));
      case at::kInt: return fill(Napi::Int32Array::New(env, n));
      case at::kShort: return fill(Napi::Int16Array::New(env, n));
      case at::kChar: return fill(Napi::Int8Array::New(env, n));
      case at::kByte:
      case at::kBool: return fill(Napi::Uint8Array::New(env, n));
      case at::kLong: return fill(Napi::BigInt64Array::New(env, n));
      default: throw Error("INVALID_ARGUMENT", "toArray does not support dtype " + DtypeName(c.scalar_type()));
    }
  });
}

Napi::Value TensorWrap::Item(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor t = Get(env);
  return Guard(env, [&]() -> Napi::Value {
    Require(t.numel() == 1, "item() needs a tensor with exactly one element, this one has " + std::to_string(t.numel()));
    if (t.scalar_type() == at::kBool) return Napi::Boolean::New(env, t.item<bool>());
    return Napi::Number::New(env, t.item<double>());
  });
}

// to({dtype?, device?}) → Promise<Tensor>: a converted copy, made on a worker thread.
Napi::Value TensorWrap::To(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor t = Get(env);
  return Guard(env, [&]() -> Napi::Value {
    ParsedOptions o = OptionsFrom(info[0]);
    return Run(env, [t, o](const Progress&) -> ResultFn {
      at::Tensor r = t.to(o.device.value_or(t.device()), o.dtype.value_or(t.scalar_type()), /*non_blocking=*/false,
                          /*copy=*/true);
      return [r](Napi::Env e) -> Napi::Value { return TensorWrap::New(e, r); };
    });
  });
}

// Tensor.fromArray(typedArray, shape, dtype?)
Napi::Value TensorWrap::FromArray(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    Require(info[0].IsTypedArray(), "fromArray expects a typed array (Float32Array, Int32Array, ...)");
    auto arr = info[0].As<Napi::TypedArray>();
    std::vector<int64_t> shape = ShapeFrom(info[1]);
    std::optional<at::ScalarType> asked;
    if (info[2].IsString()) asked = ParseDtype(info[2].As<Napi::String>().Utf8Value());
    std::optional<at::ScalarType> natural = NaturalDtype(arr.TypedArrayType());
    at::ScalarType storeAs;
    if (arr.TypedArrayType() == napi_uint16_array) {
      Require(asked == at::kHalf || asked == at::kBFloat16,
              "A Uint16Array holds raw float16 or bfloat16 bits: pass dtype 'float16' or 'bfloat16'");
      storeAs = *asked;
    } else {
      Require(natural.has_value(), "Unsupported typed array type");
      storeAs = *natural;
      if (asked == at::kBool && storeAs == at::kByte) storeAs = at::kBool;
    }
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    Require(static_cast<size_t>(numel) == arr.ElementLength(),
            "shape holds " + std::to_string(numel) + " elements but the array has " + std::to_string(arr.ElementLength()));
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(storeAs));
    if (numel) {
      const uint8_t* src = static_cast<const uint8_t*>(arr.ArrayBuffer().Data()) + arr.ByteOffset();
      std::memcpy(t.data_ptr(), src, arr.ByteLength());
    }
    if (asked && *asked != storeAs) t = t.to(*asked);
    return New(env, t);
  });
}

// Tensor.zeros(shape, {dtype?, device?})
Napi::Value TensorWrap::Zeros(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    std::vector<int64_t> shape = ShapeFrom(info[0]);
    ParsedOptions o = OptionsFrom(info[1]);
    return New(env, at::zeros(shape, at::TensorOptions()
                                         .dtype(o.dtype.value_or(at::kFloat))
                                         .device(o.device.value_or(c10::Device(c10::kCPU)))));
  });
}

// Tensor.randn(shape, {dtype?, device?, generator?}): standard normal samples; with a generator the
// draw is reproducible.
Napi::Value TensorWrap::Randn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    std::vector<int64_t> shape = ShapeFrom(info[0]);
    ParsedOptions o = OptionsFrom(info[1]);
    std::optional<at::Generator> gen;
    if (!o.generator.IsEmpty()) gen = GeneratorWrap::From(o.generator);
    c10::Device device = o.device.value_or(gen ? gen->device() : c10::Device(c10::kCPU));
    if (gen && gen->device().type() != device.type())
      throw Error("INVALID_ARGUMENT", "The generator is on " + DeviceName(gen->device()) + " but the tensor is asked on " +
                                          DeviceName(device));
    auto opts = at::TensorOptions().dtype(o.dtype.value_or(at::kFloat)).device(device);
    return New(env, at::randn(shape, gen, opts));
  });
}

}  // namespace cd
