#include "core/errors.h"

#include <c10/util/Exception.h>

#include <new>

namespace cd {

namespace {
bool LooksLikeOom(const std::string& msg) {
  return msg.find("out of memory") != std::string::npos ||
         msg.find("DefaultCPUAllocator: can't allocate memory") != std::string::npos ||
         msg.find("not enough memory") != std::string::npos;
}
}  // namespace

ErrorInfo CaptureCurrentException() {
  ErrorInfo info;
  try {
    throw;
  } catch (const Error& e) {
    info.code = e.code();
    info.message = e.what();
    info.props = e.props();
  } catch (const c10::OutOfMemoryError& e) {
    info.code = "OUT_OF_MEMORY";
    info.message = std::string("Out of memory: ") + e.what_without_backtrace() +
                   " Try a smaller batch or resolution, fp16/bf16, or free other work on the device.";
  } catch (const c10::Error& e) {
    // c10 messages carry a C++ backtrace; users need the sentence, not the frames.
    info.message = e.what_without_backtrace();
    info.code = LooksLikeOom(info.message) ? "OUT_OF_MEMORY" : "NATIVE";
  } catch (const std::bad_alloc&) {
    info.code = "OUT_OF_MEMORY";
    info.message = "Out of host memory (std::bad_alloc). Try a smaller batch or model, or close other programs.";
  } catch (const std::exception& e) {
    info.message = e.what();
    info.code = LooksLikeOom(info.message) ? "OUT_OF_MEMORY" : "NATIVE";
  } catch (...) {
    info.message = "Unknown native exception.";
  }
  return info;
}

Napi::Error ToJsError(Napi::Env env, const ErrorInfo& info) {
  Napi::Error err = Napi::Error::New(env, info.message);
  err.Set("code", Napi::String::New(env, info.code));
  for (const auto& [k, v] : info.props) err.Set(k, Napi::String::New(env, v));
  return err;
}

}  // namespace cd
