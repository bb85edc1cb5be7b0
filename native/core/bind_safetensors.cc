// JS bindings of core/safetensors: readHeader, load and save, each on a worker thread.
#include <napi.h>

#include "core/async.h"
#include "core/registry.h"
#include "core/dtype_device.h"
#include "core/errors.h"
#include "core/safetensors.h"
#include "core/tensor.h"

namespace cd {

namespace {

Napi::Object MetadataToJs(Napi::Env env, const std::vector<std::pair<std::string, std::string>>& metadata) {
  Napi::Object o = Napi::Object::New(env);
  for (const auto& [k, v] : metadata) o.Set(k, v);
  return o;
}

std::string PathArg(const Napi::CallbackInfo& info) {
  Require(info[0].IsString(), "path must be a string");
  return info[0].As<Napi::String>().Utf8Value();
}

// safetensorsReadHeader(path) → Promise<{entries, metadata, headerSize, dataSize}>
Napi::Value ReadHeader(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    std::string path = PathArg(info);
    return Run(env, [path](const Progress&) -> ResultFn {
      auto h = std::make_shared<safetensors::Header>(safetensors::ReadHeader(path));
      return [h](Napi::Env e) -> Napi::Value {
        Napi::Object o = Napi::Object::New(e);
        Napi::Array entries = Napi::Array::New(e, h->entries.size());
        for (size_t i = 0; i < h->entries.size(); ++i) {
          const auto& en = h->entries[i];
          Napi::Object x = Napi::Object::New(e);
          x.Set("name", en.name);
          x.Set("dtype", en.dtype);
          Napi::Array shape = Napi::Array::New(e, en.shape.size());
          for (size_t d = 0; d < en.shape.size(); ++d) shape.Set(static_cast<uint32_t>(d), static_cast<double>(en.shape[d]));
          x.Set("shape", shape);
          Napi::Array off = Napi::Array::New(e, 2);
          off.Set(0u, static_cast<double>(en.begin));
          off.Set(1u, static_cast<double>(en.end));
          x.Set("dataOffsets", off);
          entries.Set(static_cast<uint32_t>(i), x);
        }
        o.Set("entries", entries);
        o.Set("metadata", MetadataToJs(e, h->metadata));
        o.Set("headerSize", static_cast<double>(h->headerSize));
        o.Set("dataSize", static_cast<double>(h->dataSize));
        return o;
      };
    });
  });
}

// safetensorsLoad(path, {dtype?, device?, names?}) → Promise<{tensors: {name: Tensor}, metadata}>
Napi::Value Load(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    std::string path = PathArg(info);
    safetensors::LoadOptions opts;
    if (info[1].IsObject()) {
      auto o = info[1].As<Napi::Object>();
      if (o.Get("dtype").IsString()) opts.dtype = ParseDtype(o.Get("dtype").As<Napi::String>().Utf8Value());
      if (o.Get("device").IsString()) opts.device = ParseDevice(o.Get("device").As<Napi::String>().Utf8Value());
      if (o.Get("names").IsArray()) {
        auto names = o.Get("names").As<Napi::Array>();
        for (uint32_t i = 0; i < names.Length(); ++i) opts.only.push_back(names.Get(i).ToString().Utf8Value());
      }
    }
    return Run(env, [path, opts](const Progress&) -> ResultFn {
      auto loaded = std::make_shared<safetensors::Loaded>(safetensors::Load(path, opts));
      return [loaded](Napi::Env e) -> Napi::Value {
        Napi::Object tensors = Napi::Object::New(e);
        for (auto& [name, t] : loaded->tensors) tensors.Set(name, TensorWrap::New(e, t));
        Napi::Object o = Napi::Object::New(e);
        o.Set("tensors", tensors);
        o.Set("metadata", MetadataToJs(e, loaded->metadata));
        return o;
      };
    });
  });
}

// safetensorsSave(path, names: string[], tensors: Tensor[], metadata: {string: string}) → Promise<void>
Napi::Value Save(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    std::string path = PathArg(info);
    Require(info[1].IsArray() && info[2].IsArray(), "names and tensors must be arrays");
    auto names = info[1].As<Napi::Array>();
    auto tensors = info[2].As<Napi::Array>();
    Require(names.Length() == tensors.Length(), "names and tensors differ in length");
    std::vector<std::pair<std::string, at::Tensor>> items;
    for (uint32_t i = 0; i < names.Length(); ++i) {
      std::string name = names.Get(i).ToString().Utf8Value();
      for (const auto& it : items) Require(it.first != name, "Duplicate tensor name \"" + name + "\"");
      items.emplace_back(name, TensorWrap::From(tensors.Get(i), ("tensor \"" + name + "\"").c_str()));
    }
    std::vector<std::pair<std::string, std::string>> metadata;
    if (info[3].IsObject()) {
      auto m = info[3].As<Napi::Object>();
      auto keys = m.GetPropertyNames();
      for (uint32_t i = 0; i < keys.Length(); ++i) {
        std::string k = keys.Get(i).ToString().Utf8Value();
        Napi::Value v = m.Get(k);
        Require(v.IsString(), "metadata value \"" + k + "\" must be a string");
        metadata.emplace_back(k, v.As<Napi::String>().Utf8Value());
      }
    }
    return Run(env, [path, items, metadata](const Progress&) -> ResultFn {
      safetensors::Save(path, items, metadata);
      return nullptr;
    });
  });
}

}  // namespace

void InitSafetensors(Napi::Env env, Napi::Object exports) {
  exports.Set("safetensorsReadHeader", Napi::Function::New(env, ReadHeader, "safetensorsReadHeader"));
  exports.Set("safetensorsLoad", Napi::Function::New(env, Load, "safetensorsLoad"));
  exports.Set("safetensorsSave", Napi::Function::New(env, Save, "safetensorsSave"));
}

CD_REGISTER_BINDING(safetensors, InitSafetensors);

}  // namespace cd
