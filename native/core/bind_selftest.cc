// Small native routines that exist to prove the async machinery from tests: an error thrown on a
// worker thread, and a long cancellable loop that reports progress. They are part of the binding
// so `customdiff doctor` can also exercise them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <napi.h>

#include <chrono>
#include <thread>

#include "core/async.h"
#include "core/registry.h"
#include "core/errors.h"

namespace cd {

namespace {

// selftest.throwInWorker(kind): "c10" | "std" | "cd" | "alloc" | "shape"
// The intra-op thread count ATen uses on a worker thread (setNumThreads runs on the JS thread).
Napi::Value WorkerNumThreads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    return Run(env, [](const Progress&) -> ResultFn {
      const int n = at::get_num_threads();
      return [n](Napi::Env e) -> Napi::Value { return Napi::Number::New(e, n); };
    });
  });
}

Napi::Value ThrowInWorker(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    std::string kind = info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "std";
    return Run(env, [kind](const Progress&) -> ResultFn {
      if (kind == "c10") TORCH_CHECK(false, "a c10 error raised on purpose");
      if (kind == "cd") throw Error("INVALID_ARGUMENT", "a library error raised on purpose", {{"detail", "x"}});
      if (kind == "alloc") throw std::bad_alloc();
      if (kind == "shape") (void)at::matmul(at::ones({2, 3}), at::ones({4, 5}));
      throw std::runtime_error("a std::runtime_error raised on purpose");
    });
  });
}

// selftest.countdown(steps, msPerStep, onProgress?, cancelToken?) → Promise<number of steps done>
Napi::Value Countdown(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    Require(info[0].IsNumber() && info[1].IsNumber(), "countdown(steps, msPerStep, onProgress?, token?)");
    const int steps = info[0].As<Napi::Number>().Int32Value();
    const int ms = info[1].As<Napi::Number>().Int32Value();
    CancelFlag cancel = CancelFlagFrom(info[3]);
    return Run(
        env,
        [steps, ms](const Progress& p) -> ResultFn {
          int done = 0;
          for (int i = 0; i < steps; ++i) {
            p.ThrowIfCancelled();
            std::this_thread::sleep_for(std::chrono::milliseconds(ms));
            done = i + 1;
            p.Report({"step", {{"step", static_cast<double>(done)}, {"total", static_cast<double>(steps)}}});
          }
          return [done](Napi::Env e) -> Napi::Value { return Napi::Number::New(e, done); };
        },
        info[2], cancel);
  });
}

}  // namespace

void InitSelftest(Napi::Env env, Napi::Object exports) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("throwInWorker", Napi::Function::New(env, ThrowInWorker, "throwInWorker"));
  o.Set("countdown", Napi::Function::New(env, Countdown, "countdown"));
  o.Set("workerNumThreads", Napi::Function::New(env, WorkerNumThreads, "workerNumThreads"));
  exports.Set("selftest", o);
}

CD_REGISTER_BINDING(selftest, InitSelftest);

}  // namespace cd
