// Running native work off the JS thread. Run() executes `work` on a libuv worker thread and returns
// a Promise. The work may report progress (delivered, in order and before the promise settles, to
// an optional JS callback) and must poll for cancellation, which a CancelToken (tied to an
// AbortSignal on the TypeScript side) requests. Exceptions of any kind reject the promise.
#pragma once

#include <napi.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/errors.h"

namespace cd {

using CancelFlag = std::shared_ptr<std::atomic<bool>>;

struct ProgressEvent {
  std::string kind;
  std::vector<std::pair<std::string, double>> values;
  // An optional binary payload (e.g. a preview image), delivered to JS as the Buffer `data`.
  std::vector<uint8_t> data;
};

class Progress {
 public:
  Progress(std::function<void(ProgressEvent)> send, CancelFlag cancel)
      : send_(std::move(send)), cancel_(std::move(cancel)) {}
  void Report(ProgressEvent ev) const {
    if (send_) send_(std::move(ev));
  }
  bool Cancelled() const { return cancel_ && cancel_->load(); }
  // Throws ABORT_ERR when cancellation was requested; call between units of work.
  void ThrowIfCancelled() const {
    if (Cancelled()) throw Error("ABORT_ERR", "The operation was aborted.");
  }

 private:
  std::function<void(ProgressEvent)> send_;
  CancelFlag cancel_;
};

// Converts a worker's result to JS; built on the worker thread, called on the JS thread.
using ResultFn = std::function<Napi::Value(Napi::Env)>;
using WorkFn = std::function<ResultFn(const Progress&)>;

// onProgress may be undefined; cancel may be null.
Napi::Promise Run(Napi::Env env, WorkFn work, Napi::Value onProgress = Napi::Value(), CancelFlag cancel = nullptr);

// The flag of a CancelToken argument (undefined/null → no cancellation).
CancelFlag CancelFlagFrom(const Napi::Value& v);

class CancelToken : public Napi::ObjectWrap<CancelToken> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit CancelToken(const Napi::CallbackInfo& info);
  CancelFlag flag() const { return flag_; }

 private:
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  Napi::Value Cancelled(const Napi::CallbackInfo& info);
  CancelFlag flag_ = std::make_shared<std::atomic<bool>>(false);
};

}  // namespace cd
