// JS binding of core/pickle: loadTorchFile(path, {dtype?, device?}) → Promise<tree>, unpickled on
// a worker thread and turned into JS values on the JS thread.
#include <napi.h>

#include <cmath>
#include <unordered_map>

#include "core/async.h"
#include "core/dtype_device.h"
#include "core/errors.h"
#include "core/pickle.h"
#include "core/registry.h"
#include "core/tensor.h"

namespace cd {

namespace {

using pickle::Value;
using Kind = Value::Kind;

// The tree was validated (acyclic, bounded depth and expanded size) before it gets here, so the
// recursion is bounded. A tensor node reached along several paths (tied weights) becomes one JS
// handle, as it is one object in Python.
class ToJs {
 public:
  explicit ToJs(Napi::Env env) : env_(env) {}

  Napi::Value Convert(const Value& v) {
    switch (v.kind) {
      case Kind::None: return env_.Null();
      case Kind::Bool: return Napi::Boolean::New(env_, v.boolean);
      case Kind::Int: {
        constexpr int64_t kSafe = (int64_t{1} << 53) - 1;
        if (v.integer >= -kSafe && v.integer <= kSafe) return Napi::Number::New(env_, static_cast<double>(v.integer));
        return Napi::BigInt::New(env_, v.integer);
      }
      case Kind::Float: return Napi::Number::New(env_, v.number);
      case Kind::String: return Napi::String::New(env_, v.text);
      case Kind::Bytes: return Napi::Buffer<uint8_t>::Copy(env_, reinterpret_cast<const uint8_t*>(v.text.data()), v.text.size());
      case Kind::Tensor: {
        auto it = tensors_.find(&v);
        if (it != tensors_.end()) return it->second;
        Napi::Object t = TensorWrap::New(env_, v.tensor);
        tensors_.emplace(&v, t);
        return t;
      }
      case Kind::List:
      case Kind::Tuple: {
        Napi::Array a = Napi::Array::New(env_, v.items.size());
        for (size_t i = 0; i < v.items.size(); ++i) a.Set(static_cast<uint32_t>(i), Convert(*v.items[i]));
        return a;
      }
      case Kind::Dict: {
        Napi::Object o = Napi::Object::New(env_);
        // Defined, not assigned: a key such as "__proto__" becomes an own property instead of
        // replacing the object's prototype.
        for (const auto& [k, x] : v.dict)
          o.DefineProperty(Napi::PropertyDescriptor::Value(pickle::KeyText(*k), Convert(*x), napi_default_jsproperty));
        return o;
      }
      default: {
        Napi::Object o = Napi::Object::New(env_);
        o.Set("__opaque__", Napi::String::New(env_, v.text));
        return o;
      }
    }
  }

 private:
  Napi::Env env_;
  std::unordered_map<const Value*, Napi::Object> tensors_;
};

// loadTorchFile(path, {dtype?, device?}) → Promise<tree>
Napi::Value LoadTorchFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    Require(info[0].IsString(), "path must be a string");
    const std::string path = info[0].As<Napi::String>().Utf8Value();
    pickle::LoadOptions opts;
    if (info[1].IsObject()) {
      auto o = info[1].As<Napi::Object>();
      if (o.Get("dtype").IsString()) opts.dtype = ParseDtype(o.Get("dtype").As<Napi::String>().Utf8Value());
      if (o.Get("device").IsString()) opts.device = ParseDevice(o.Get("device").As<Napi::String>().Utf8Value());
    }
    return Run(env, [path, opts](const Progress&) -> ResultFn {
      std::shared_ptr<pickle::Document> doc = pickle::LoadTorchFile(path, opts);
      return [doc](Napi::Env e) -> Napi::Value { return ToJs(e).Convert(*doc->root); };
    });
  });
}

}  // namespace

void InitPickle(Napi::Env env, Napi::Object exports) {
  exports.Set("loadTorchFile", Napi::Function::New(env, LoadTorchFile, "loadTorchFile"));
}

CD_REGISTER_BINDING(pickle, InitPickle);

}  // namespace cd
