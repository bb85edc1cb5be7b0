// The arguments every model binding's load() takes from TypeScript: the config.json text, the
// weights files (picked by src/model/files.ts), and {dtype?, device?, configFile?}.
#pragma once

#include <ATen/ATen.h>
#include <napi.h>

#include <string>
#include <vector>

#include "core/dtype_device.h"
#include "core/errors.h"

namespace cd::models {

struct LoadArgs {
  std::string configText;
  std::string configFile = "config.json";
  std::vector<std::string> files;
  at::ScalarType dtype = at::kFloat;
  c10::Device device = c10::Device(c10::kCPU);
};

// load(configText, files: string[], {dtype?, device?, configFile?}); throws INVALID_ARGUMENT.
inline LoadArgs ParseLoadArgs(const Napi::CallbackInfo& info) {
  LoadArgs a;
  Require(info[0].IsString(), "config must be the text of config.json");
  Require(info[1].IsArray(), "files must be an array of paths");
  a.configText = info[0].As<Napi::String>().Utf8Value();
  auto arr = info[1].As<Napi::Array>();
  for (uint32_t i = 0; i < arr.Length(); ++i) {
    Require(arr.Get(i).IsString(), "files must be an array of paths");
    a.files.push_back(arr.Get(i).As<Napi::String>().Utf8Value());
  }
  Require(!a.files.empty(), "at least one weights file is needed");
  if (info[2].IsObject()) {
    auto o = info[2].As<Napi::Object>();
    if (o.Get("dtype").IsString()) a.dtype = ParseDtype(o.Get("dtype").As<Napi::String>().Utf8Value());
    if (o.Get("device").IsString()) a.device = ParseDevice(o.Get("device").As<Napi::String>().Utf8Value());
    if (o.Get("configFile").IsString()) a.configFile = o.Get("configFile").As<Napi::String>().Utf8Value();
  }
  Require(at::isFloatingType(a.dtype), "dtype must be a floating-point type");
  return a;
}

}  // namespace cd::models
