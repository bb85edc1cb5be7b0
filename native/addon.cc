// Module registration only: each area registers its own functions and classes.
#include <napi.h>

#include "core/addon_data.h"
#include "core/async.h"
#include "core/bindings.h"
#include "core/generator.h"
#include "core/tensor.h"

namespace {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData(new cd::AddonData());
  cd::TensorWrap::Init(env, exports);
  cd::GeneratorWrap::Init(env, exports);
  cd::CancelToken::Init(env, exports);
  cd::InitSafetensors(env, exports);
  cd::InitInfo(env, exports);
  cd::InitSelftest(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(custom_diffusion, Init)
