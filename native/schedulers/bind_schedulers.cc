// JS bindings of the schedulers: createScheduler(kind, configJson, overridesJson?, file?) returns a
// handle whose methods wrap one C++ Scheduler. Steps are a few elementwise tensor ops, so they run
// synchronously on the JS thread; the handle is not shared with worker threads.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <napi.h>

#include <cmath>
#include <memory>
#include <set>

#include "core/errors.h"
#include "core/generator.h"
#include "core/registry.h"
#include "core/tensor.h"
#include "schedulers/scheduler.h"

namespace cd {

namespace {

using schedulers::Scheduler;

std::string StringArg(const Napi::Value& v, const char* what, bool optional = false) {
  if (optional && (v.IsUndefined() || v.IsNull())) return "";
  Require(v.IsString(), std::string(what) + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

double NumberArg(const Napi::Value& v, const char* what) {
  Require(v.IsNumber(), std::string(what) + " must be a number");
  const double x = v.As<Napi::Number>().DoubleValue();
  Require(std::isfinite(x), std::string(what) + " must be finite");
  return x;
}

// Timesteps for addNoise & co.: a Tensor, a number or an array of numbers (int64 when all are
// integers, float64 otherwise, as the Euler schedules use fractional timesteps).
at::Tensor TimestepsArg(const Napi::Value& v) {
  if (TensorWrap::IsTensor(v.Env(), v)) return TensorWrap::From(v, "timesteps");
  std::vector<double> xs;
  if (v.IsNumber()) {
    xs.push_back(NumberArg(v, "timesteps"));
  } else {
    Require(v.IsArray(), "timesteps must be a Tensor, a number or an array of numbers");
    auto arr = v.As<Napi::Array>();
    for (uint32_t i = 0; i < arr.Length(); ++i) xs.push_back(NumberArg(arr.Get(i), "each timestep"));
  }
  bool integral = true;
  for (double x : xs) integral = integral && x == std::floor(x);
  if (integral) {
    std::vector<int64_t> is(xs.begin(), xs.end());
    return at::tensor(is, at::kLong);
  }
  return at::tensor(xs, at::kDouble);
}

schedulers::StepOptions StepOptionsArg(const Napi::Value& v) {
  schedulers::StepOptions o;
  if (v.IsUndefined() || v.IsNull()) return o;
  Require(v.IsObject(), "step options must be an object");
  auto obj = v.As<Napi::Object>();
  static const std::set<std::string> known = {"noise", "generator", "eta", "useClippedModelOutput",
                                              "sChurn", "sTmin", "sTmax", "sNoise"};
  auto keys = obj.GetPropertyNames();
  for (uint32_t i = 0; i < keys.Length(); ++i) {
    std::string k = keys.Get(i).ToString().Utf8Value();
    Require(known.count(k) > 0, "Unknown step option \"" + k +
                                    "\" (known: noise, generator, eta, useClippedModelOutput, sChurn, sTmin, sTmax, sNoise)");
  }
  auto present = [&](const char* k) { return obj.Has(k) && !obj.Get(k).IsUndefined() && !obj.Get(k).IsNull(); };
  if (present("noise")) o.noise = TensorWrap::From(obj.Get("noise"), "noise");
  if (present("generator")) o.generator = GeneratorWrap::From(obj.Get("generator"));
  if (present("eta")) o.eta = NumberArg(obj.Get("eta"), "eta");
  Require(o.eta >= 0, "eta must be ≥ 0");
  if (present("useClippedModelOutput")) o.useClippedModelOutput = obj.Get("useClippedModelOutput").ToBoolean();
  if (present("sChurn")) o.sChurn = NumberArg(obj.Get("sChurn"), "sChurn");
  if (present("sTmin")) o.sTmin = NumberArg(obj.Get("sTmin"), "sTmin");
  if (present("sTmax")) {
    Napi::Value x = obj.Get("sTmax");
    Require(x.IsNumber(), "sTmax must be a number");
    o.sTmax = x.As<Napi::Number>().DoubleValue();  // may be Infinity
  }
  if (present("sNoise")) o.sNoise = NumberArg(obj.Get("sNoise"), "sNoise");
  return o;
}

Napi::Value NumberArray(Napi::Env env, const at::Tensor& t) {
  at::Tensor d = t.to(at::kCPU, at::kDouble).contiguous();
  auto arr = Napi::Array::New(env, static_cast<size_t>(d.numel()));
  for (int64_t i = 0; i < d.numel(); ++i) arr.Set(static_cast<uint32_t>(i), Napi::Number::New(env, d.data_ptr<double>()[i]));
  return arr;
}

using Method = std::function<Napi::Value(const Napi::CallbackInfo&, Scheduler&)>;

void AddMethod(Napi::Env env, Napi::Object obj, const char* name, const std::shared_ptr<Scheduler>& s, Method fn) {
  obj.Set(name, Napi::Function::New(
                    env,
                    [s, fn](const Napi::CallbackInfo& info) -> Napi::Value {
                      return Guard(info.Env(), [&]() -> Napi::Value {
                        at::NoGradGuard noGrad;
                        return fn(info, *s);
                      });
                    },
                    name));
}

Napi::Object MakeHandle(Napi::Env env, std::shared_ptr<Scheduler> s) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("className", s->className());
  o.Set("predictionType", s->predictionType());
  o.Set("numTrainTimesteps", s->numTrainTimesteps());
  AddMethod(env, o, "config", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    return Napi::String::New(info.Env(), s.configJson());
  });
  AddMethod(env, o, "setTimesteps", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    const double n = NumberArg(info[0], "numInferenceSteps");
    Require(n == std::floor(n) && n >= 1 && n <= 1e6, "numInferenceSteps must be a positive integer");
    s.setTimesteps(static_cast<int>(n));
    return info.Env().Undefined();
  });
  AddMethod(env, o, "numInferenceSteps", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    return Napi::Number::New(info.Env(), s.numInferenceSteps());
  });
  AddMethod(env, o, "timesteps", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    return NumberArray(info.Env(), s.timesteps());
  });
  AddMethod(env, o, "timestepsTensor", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    return TensorWrap::New(info.Env(), s.timesteps().clone());
  });
  AddMethod(env, o, "sigmas", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    if (!s.sigmas().defined()) return info.Env().Null();
    return TensorWrap::New(info.Env(), s.sigmas().clone());
  });
  AddMethod(env, o, "initNoiseSigma", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    return Napi::Number::New(info.Env(), s.initNoiseSigma());
  });
  AddMethod(env, o, "scaleModelInput", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    const at::Tensor& sample = TensorWrap::From(info[0], "sample");
    return TensorWrap::New(info.Env(), s.scaleModelInput(sample, NumberArg(info[1], "timestep")));
  });
  AddMethod(env, o, "step", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    const at::Tensor& modelOutput = TensorWrap::From(info[0], "modelOutput");
    const double t = NumberArg(info[1], "timestep");
    const at::Tensor& sample = TensorWrap::From(info[2], "sample");
    Require(modelOutput.sizes() == sample.sizes(), "step: modelOutput has shape " + c10::str(modelOutput.sizes()) +
                                                       " but sample has " + c10::str(sample.sizes()));
    Require(modelOutput.device() == sample.device(), "step: modelOutput and sample are on different devices");
    return TensorWrap::New(info.Env(), s.step(modelOutput, t, sample, StepOptionsArg(info[3])));
  });
  auto forward = [](at::Tensor (Scheduler::*fn)(const at::Tensor&, const at::Tensor&, const at::Tensor&)) {
    return [fn](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
      const at::Tensor& x0 = TensorWrap::From(info[0], "x0");
      const at::Tensor& noise = TensorWrap::From(info[1], "noise");
      Require(x0.sizes() == noise.sizes(), "x0 has shape " + c10::str(x0.sizes()) + " but noise has " + c10::str(noise.sizes()));
      return TensorWrap::New(info.Env(), (s.*fn)(x0, noise, TimestepsArg(info[2])));
    };
  };
  AddMethod(env, o, "addNoise", s, forward(&Scheduler::addNoise));
  AddMethod(env, o, "getVelocity", s, forward(&Scheduler::getVelocity));
  AddMethod(env, o, "trainingTarget", s, forward(&Scheduler::trainingTarget));
  AddMethod(env, o, "betas", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    return TensorWrap::New(info.Env(), s.betas().clone());
  });
  AddMethod(env, o, "alphasCumprod", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    return TensorWrap::New(info.Env(), s.alphasCumprod().clone());
  });
  AddMethod(env, o, "stepIndex", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    if (s.stepIndex() < 0) return info.Env().Null();
    return Napi::Number::New(info.Env(), static_cast<double>(s.stepIndex()));
  });
  AddMethod(env, o, "setBeginIndex", s, [](const Napi::CallbackInfo& info, Scheduler& s) -> Napi::Value {
    const double i = NumberArg(info[0], "beginIndex");
    Require(i == std::floor(i), "beginIndex must be an integer");
    s.setBeginIndex(static_cast<int64_t>(i));
    return info.Env().Undefined();
  });
  return o;
}

// createScheduler(kind, configJson, overridesJson?, file?) → handle
Napi::Value CreateSchedulerJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    const std::string kind = StringArg(info[0], "kind");
    const std::string config = StringArg(info[1], "config");
    const std::string overrides = StringArg(info[2], "overrides", true);
    std::string file = StringArg(info[3], "file", true);
    if (file.empty()) file = "the scheduler config";
    std::shared_ptr<Scheduler> s = schedulers::CreateScheduler(kind, config, overrides, file);
    return MakeHandle(env, std::move(s));
  });
}

// schedulerTestOps.fakeModelOutput(x, t, c): the parity fixtures' stand-in for a UNet,
// 0.3·x + (0.01·t/1000)·c, with the scalar in float64 and the tensor ops in the tensors' dtype.
Napi::Value FakeModelOutput(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    at::NoGradGuard noGrad;
    const at::Tensor& x = TensorWrap::From(info[0], "x");
    const double t = NumberArg(info[1], "t");
    const at::Tensor& c = TensorWrap::From(info[2], "c");
    return TensorWrap::New(env, x * 0.3 + c * (0.01 * (t / 1000.0)));
  });
}

// schedulerTestOps.scale(x, s): x·s in x's dtype (the pipeline's latents × init_noise_sigma).
Napi::Value Scale(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    at::NoGradGuard noGrad;
    const at::Tensor& x = TensorWrap::From(info[0], "x");
    return TensorWrap::New(env, x * NumberArg(info[1], "s"));
  });
}

void Init(Napi::Env env, Napi::Object exports) {
  exports.Set("createScheduler", Napi::Function::New(env, CreateSchedulerJs, "createScheduler"));
  Napi::Object ops = Napi::Object::New(env);
  ops.Set("fakeModelOutput", Napi::Function::New(env, FakeModelOutput, "fakeModelOutput"));
  ops.Set("scale", Napi::Function::New(env, Scale, "scale"));
  exports.Set("schedulerTestOps", ops);
}

}  // namespace

CD_REGISTER_BINDING(schedulers, Init);

}  // namespace cd
