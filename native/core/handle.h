// A native object handed to JavaScript as a type-tagged External that owns a shared_ptr. The tag
// tells our handles apart from any other External (a wrong handle is an error, not a crash);
// dispose() drops the handle's reference while queued work keeps its own.
#pragma once

#include <napi.h>

#include <memory>
#include <string>

#include "core/errors.h"

namespace cd {

template <typename T>
class Handle {
 public:
  // `what` names the object in errors ("UNet", "VAE", ...).
  constexpr Handle(napi_type_tag tag, const char* what) : tag_(tag), what_(what) {}

  Napi::Value Wrap(Napi::Env env, std::shared_ptr<T> object) const {
    auto ext = Napi::External<Holder>::New(env, new Holder{std::move(object)}, [](Napi::Env, Holder* h) { delete h; });
    ext.TypeTag(&tag_);
    return ext;
  }

  // The object behind a handle; INVALID_ARGUMENT for anything else, DISPOSED after dispose().
  std::shared_ptr<T> From(const Napi::Value& v) const {
    Holder* h = HolderOf(v);
    if (!h) throw Error("INVALID_ARGUMENT", std::string("Expected a ") + what_ + " handle");
    if (!h->object) throw Error("DISPOSED", std::string("This ") + what_ + " was disposed; it can no longer be used.");
    return h->object;
  }

  // Drops the handle's reference; other values are ignored (dispose is idempotent).
  void Dispose(const Napi::Value& v) const {
    if (Holder* h = HolderOf(v)) h->object.reset();
  }

 private:
  struct Holder {
    std::shared_ptr<T> object;
  };

  Holder* HolderOf(const Napi::Value& v) const {
    if (!v.IsExternal()) return nullptr;
    auto ext = v.As<Napi::External<Holder>>();
    return ext.CheckTypeTag(&tag_) ? ext.Data() : nullptr;
  }

  napi_type_tag tag_;
  const char* what_;
};

}  // namespace cd
