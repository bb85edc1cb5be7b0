// Registration functions of each binding file, called once from addon.cc.
#pragma once

#include <napi.h>

namespace cd {
void InitSafetensors(Napi::Env env, Napi::Object exports);
void InitInfo(Napi::Env env, Napi::Object exports);
void InitSelftest(Napi::Env env, Napi::Object exports);
}  // namespace cd
