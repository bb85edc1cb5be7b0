// Per-environment state of the addon (constructors of our wrapped classes), kept as instance data
// so the addon works in worker_threads too.
#pragma once

#include <napi.h>

namespace cd {

struct AddonData {
  Napi::FunctionReference tensorCtor;
  Napi::FunctionReference generatorCtor;
  Napi::FunctionReference cancelTokenCtor;
};

inline AddonData& Data(Napi::Env env) { return *env.GetInstanceData<AddonData>(); }

}  // namespace cd
