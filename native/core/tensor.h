// Tensor: a JS handle that owns one at::Tensor. Memory is freed by dispose() or, failing that, by
// the garbage collector; V8 is told how much host memory each handle holds so it collects in time.
#pragma once

#include <ATen/ATen.h>
#include <napi.h>

#include <atomic>

namespace cd {

class TensorWrap : public Napi::ObjectWrap<TensorWrap> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  // Wraps t in a new JS Tensor (call on the JS thread).
  static Napi::Object New(Napi::Env env, at::Tensor t);
  static bool IsTensor(Napi::Env env, const Napi::Value& v);
  // The tensor behind a JS value; throws a JS error when it is not a live Tensor.
  static at::Tensor& From(const Napi::Value& v, const char* what = "argument");
  static int64_t Live() { return live_.load(); }

  explicit TensorWrap(const Napi::CallbackInfo& info);
  ~TensorWrap() override;

 private:
  void Release(Napi::Env env);
  at::Tensor& Get(Napi::Env env);

  Napi::Value Shape(const Napi::CallbackInfo& info);
  Napi::Value Dtype(const Napi::CallbackInfo& info);
  Napi::Value Device(const Napi::CallbackInfo& info);
  Napi::Value Numel(const Napi::CallbackInfo& info);
  Napi::Value Disposed(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value ToArray(const Napi::CallbackInfo& info);
  Napi::Value Item(const Napi::CallbackInfo& info);
  Napi::Value To(const Napi::CallbackInfo& info);

  static Napi::Value FromArray(const Napi::CallbackInfo& info);
  static Napi::Value Zeros(const Napi::CallbackInfo& info);
  static Napi::Value Randn(const Napi::CallbackInfo& info);

  at::Tensor tensor_;
  bool live_counted_ = false;
  int64_t external_bytes_ = 0;
  static std::atomic<int64_t> live_;
};

// Reads a JS array of non-negative integers as a shape.
std::vector<int64_t> ShapeFrom(const Napi::Value& v);

}  // namespace cd
