#include "core/async.h"

#include <ATen/Parallel.h>

#include "core/addon_data.h"

#include <condition_variable>
#include <mutex>

namespace cd {

namespace {

// A plain AsyncWorker settles the promise from node's work-completion callback, which runs inside a
// proper callback scope (so promise reactions run at once; settling from a thread-safe function's
// finalizer, as AsyncProgressQueueWorker does, can leave them pending). Progress goes through a
// thread-safe function, and the worker thread waits until every event it sent was delivered, so no
// progress arrives after the promise settled.
class Job : public Napi::AsyncWorker {
 public:
  Job(Napi::Env env, WorkFn work, Napi::Value onProgress, CancelFlag cancel)
      : Napi::AsyncWorker(env, "custom-diffusion"),
        deferred_(Napi::Promise::Deferred::New(env)),
        work_(std::move(work)),
        cancel_(std::move(cancel)) {
    if (onProgress.IsFunction()) {
      tsfn_ = Napi::ThreadSafeFunction::New(env, onProgress.As<Napi::Function>(), "custom-diffusion:progress", 0, 1);
      hasProgress_ = true;
    }
  }

  Napi::Promise Promise() const { return deferred_.Promise(); }

 protected:
  void Execute() override {
    try {
      // OpenMP thread counts are per thread: setNumThreads() ran on the JS thread, so each libuv
      // worker takes ATen's global setting here, or its ops would use the OpenMP default instead.
      at::init_num_threads();
      std::function<void(ProgressEvent)> send;
      if (hasProgress_) send = [this](ProgressEvent ev) { Send(std::move(ev)); };
      Progress p(send, cancel_);
      result_ = work_(p);
    } catch (...) {
      error_ = CaptureCurrentException();
      failed_ = true;
    }
    if (hasProgress_) {
      std::unique_lock<std::mutex> lock(mutex_);
      delivered_.wait(lock, [this] { return pending_ == 0; });
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    if (hasProgress_) tsfn_.Release();
    if (failed_) {
      deferred_.Reject(ToJsError(env, error_).Value());
      return;
    }
    try {
      deferred_.Resolve(result_ ? result_(env) : env.Undefined());
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    } catch (...) {
      deferred_.Reject(ToJsError(env, CaptureCurrentException()).Value());
    }
  }

  void OnError(const Napi::Error& e) override {
    if (hasProgress_) tsfn_.Release();
    deferred_.Reject(e.Value());
  }

 private:
  struct Delivery {
    ProgressEvent event;
    Job* job;
  };

  void Send(ProgressEvent ev) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++pending_;
    }
    auto* d = new Delivery{std::move(ev), this};
    if (tsfn_.NonBlockingCall(d, &Job::CallJs) != napi_ok) {
      delete d;
      Delivered();
    }
  }

  void Delivered() {
    std::lock_guard<std::mutex> lock(mutex_);
    --pending_;
    delivered_.notify_all();
  }

  // Runs on the JS thread; env is null when the environment is shutting down.
  static void CallJs(Napi::Env env, Napi::Function fn, Delivery* d) {
    if (env != nullptr && fn != nullptr) {
      Napi::HandleScope scope(env);
      Napi::Object o = Napi::Object::New(env);
      o.Set("kind", d->event.kind);
      for (const auto& [k, v] : d->event.values) o.Set(k, v);
      if (!d->event.data.empty()) o.Set("data", Napi::Buffer<uint8_t>::Copy(env, d->event.data.data(), d->event.data.size()));
      try {
        fn.Call({o});
      } catch (const Napi::Error& e) {
        // A throwing listener is reported as an uncaught exception; the work goes on.
        e.ThrowAsJavaScriptException();
      }
    }
    Job* job = d->job;
    delete d;
    job->Delivered();
  }

  Napi::Promise::Deferred deferred_;
  WorkFn work_;
  CancelFlag cancel_;
  Napi::ThreadSafeFunction tsfn_;
  bool hasProgress_ = false;
  std::mutex mutex_;
  std::condition_variable delivered_;
  int pending_ = 0;
  ResultFn result_;
  ErrorInfo error_;
  bool failed_ = false;
};

}  // namespace

Napi::Promise Run(Napi::Env env, WorkFn work, Napi::Value onProgress, CancelFlag cancel) {
  auto* job = new Job(env, std::move(work), onProgress, std::move(cancel));
  Napi::Promise promise = job->Promise();
  job->Queue();  // the worker deletes itself after OnOK/OnError
  return promise;
}

CancelFlag CancelFlagFrom(const Napi::Value& v) {
  if (v.IsUndefined() || v.IsNull()) return nullptr;
  Napi::Env env = v.Env();
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(Data(env).cancelTokenCtor.Value()))
    throw Napi::TypeError::New(env, "Expected a CancelToken");
  return CancelToken::Unwrap(v.As<Napi::Object>())->flag();
}

void CancelToken::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "CancelToken",
                                    {InstanceMethod<&CancelToken::Cancel>("cancel"),
                                     InstanceAccessor<&CancelToken::Cancelled>("cancelled")});
  Data(env).cancelTokenCtor = Napi::Persistent(ctor);
  exports.Set("CancelToken", ctor);
}

CancelToken::CancelToken(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CancelToken>(info) {}

Napi::Value CancelToken::Cancel(const Napi::CallbackInfo& info) {
  flag_->store(true);
  return info.Env().Undefined();
}

Napi::Value CancelToken::Cancelled(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), flag_->load());
}

}  // namespace cd
