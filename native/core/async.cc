#include "core/async.h"

#include "core/addon_data.h"

namespace cd {

namespace {

// AsyncProgressQueueWorker delivers every queued progress event before OnOK/OnError, so a
// caller never sees progress after its promise settled.
class Job : public Napi::AsyncProgressQueueWorker<ProgressEvent> {
 public:
  Job(Napi::Env env, WorkFn work, Napi::Value onProgress, CancelFlag cancel)
      : Napi::AsyncProgressQueueWorker<ProgressEvent>(env),
        deferred_(Napi::Promise::Deferred::New(env)),
        work_(std::move(work)),
        cancel_(std::move(cancel)) {
    if (onProgress.IsFunction()) onProgress_ = Napi::Persistent(onProgress.As<Napi::Function>());
  }

  Napi::Promise Promise() const { return deferred_.Promise(); }

 protected:
  void Execute(const ExecutionProgress& progress) override {
    try {
      const bool wantsProgress = !onProgress_.IsEmpty();
      Progress p(wantsProgress ? std::function<void(ProgressEvent)>(
                                     [&progress](ProgressEvent ev) { progress.Send(&ev, 1); })
                               : std::function<void(ProgressEvent)>(),
                 cancel_);
      result_ = work_(p);
    } catch (...) {
      error_ = CaptureCurrentException();
      failed_ = true;
    }
  }

  void OnProgress(const ProgressEvent* events, size_t count) override {
    if (onProgress_.IsEmpty()) return;
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    for (size_t i = 0; i < count; ++i) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("kind", events[i].kind);
      for (const auto& [k, v] : events[i].values) o.Set(k, v);
      // A throwing listener must not take the process down; the error is reported by Node as an
      // uncaught exception of that listener, and the work goes on.
      try {
        onProgress_.Call({o});
      } catch (const Napi::Error& e) {
        e.ThrowAsJavaScriptException();
        return;
      }
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
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

  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  WorkFn work_;
  CancelFlag cancel_;
  Napi::FunctionReference onProgress_;
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
