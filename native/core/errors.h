// Errors that cross into JavaScript. Native code throws cd::Error (or lets c10::Error and
// std::exception escape); the binding layer turns each into a JS Error with a stable `code`, so the
// TypeScript side can map it to a typed subclass. Nothing is allowed to reach std::terminate.
#pragma once

#include <napi.h>

#include <exception>
#include <map>
#include <string>

namespace cd {

class Error : public std::runtime_error {
 public:
  Error(std::string code, const std::string& message, std::map<std::string, std::string> props = {})
      : std::runtime_error(message), code_(std::move(code)), props_(std::move(props)) {}
  const std::string& code() const { return code_; }
  const std::map<std::string, std::string>& props() const { return props_; }

 private:
  std::string code_;
  std::map<std::string, std::string> props_;
};

// A captured error that can be carried from a worker thread to the JS thread.
struct ErrorInfo {
  std::string code = "NATIVE";
  std::string message;
  std::map<std::string, std::string> props;
};

// Classifies the exception currently being handled (call inside a catch block).
ErrorInfo CaptureCurrentException();

Napi::Error ToJsError(Napi::Env env, const ErrorInfo& info);

// Runs fn and converts any exception into a pending JS exception (returns undefined then).
template <typename Fn>
Napi::Value Guard(Napi::Env env, Fn&& fn) {
  ErrorInfo info;
  try {
    return fn();
  } catch (const Napi::Error& e) {
    throw;  // already a JS error: node-addon-api rethrows it into JS
  } catch (...) {
    info = CaptureCurrentException();
  }
  throw ToJsError(env, info);
}

inline void Require(bool ok, const std::string& message) {
  if (!ok) throw Error("INVALID_ARGUMENT", message);
}

}  // namespace cd
