// Module registration only: each area registers its own functions and classes.
#include <napi.h>

#include "core/addon_data.h"
#include "core/async.h"
#include "core/registry.h"
#include "core/generator.h"
#include "core/tensor.h"

namespace {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData(new cd::AddonData());
  cd::TensorWrap::Init(env, exports);
  cd::GeneratorWrap::Init(env, exports);
  cd::CancelToken::Init(env, exports);
  for (const auto& [name, init] : cd::Bindings()) init(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(custom_diffusion, Init)
