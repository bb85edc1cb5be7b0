// Each binding file registers its own init function with CD_REGISTER_BINDING, so adding a model
// part to the addon is one new file plus one line in native/sources.txt, and addon.cc never changes.
#pragma once

#include <napi.h>

#include <utility>
#include <vector>

namespace cd {

using BindingInit = void (*)(Napi::Env env, Napi::Object exports);

inline std::vector<std::pair<const char*, BindingInit>>& Bindings() {
  static std::vector<std::pair<const char*, BindingInit>> list;
  return list;
}

struct BindingRegistration {
  BindingRegistration(const char* name, BindingInit init) { Bindings().emplace_back(name, init); }
};

}  // namespace cd

#define CD_REGISTER_BINDING(name, init) static ::cd::BindingRegistration cd_binding_registration_##name(#name, init)
