// Generator: a seeded random number generator (CPU or CUDA) whose state can be saved and restored,
// so training can resume exactly and every sampled image can be reproduced from its seed.
#pragma once

#include <ATen/ATen.h>
#include <napi.h>

namespace cd {

class GeneratorWrap : public Napi::ObjectWrap<GeneratorWrap> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  // The generator behind a JS value, or nullopt for undefined/null.
  static std::optional<at::Generator> From(const Napi::Value& v);

  explicit GeneratorWrap(const Napi::CallbackInfo& info);
  at::Generator& generator() { return gen_; }

 private:
  Napi::Value Seed(const Napi::CallbackInfo& info);
  Napi::Value Device(const Napi::CallbackInfo& info);
  Napi::Value GetState(const Napi::CallbackInfo& info);
  Napi::Value SetState(const Napi::CallbackInfo& info);

  at::Generator gen_;
};

}  // namespace cd
