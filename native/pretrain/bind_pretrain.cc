// JS bindings of pretrain/full_train_step, as the addon's `pretrain` object:
//   createDiffusion(unet, textEncoder, vae | null, schedulerConfigJson, options) → handle
//   createVae(vae, options) → handle
//   step(handle, batch, generator?) → Promise<{loss, lr, gradNorm, step, recon?, kl?}>
//   swapEma(handle) → Promise<boolean (EMA weights now in the model)>
//   weights(handle, ema: boolean) → Promise<{name: Tensor}> (copies, names prefixed unet./text_encoder./vae.)
//   learningRateAt(handle, step), emaDecayAt(handle, k), info(handle), dispose(handle)
//   textEncoderTensors(textEncoderHandle), vaeTensors(vaeHandle) → {name: Tensor}: the models' own
//     tensors by the names of their files (no copies), for writing a model folder
// Model handles are those of the model bindings (models/handles.h); a trainer keeps its models
// alive. Everything that may wait for a running step goes through Run(), so the JS thread never
// blocks on a trainer's lock.
#include <napi.h>

#include <cmath>
#include <set>

#include "core/async.h"
#include "core/errors.h"
#include "core/js_options.h"
#include "core/generator.h"
#include "core/handle.h"
#include "core/registry.h"
#include "core/tensor.h"
#include "models/autoencoder_kl.h"
#include "models/clip_text.h"
#include "models/handles.h"
#include "pretrain/full_train_step.h"
#include "schedulers/scheduler.h"

namespace cd {

namespace {

using pretrain::DiffusionPretrainer;
using pretrain::FullOptimizer;
using pretrain::VaePretrainer;

// One handle type for both trainers: the calls they share need not guess which one they got.
struct Trainer {
  std::shared_ptr<DiffusionPretrainer> diffusion;
  std::shared_ptr<VaePretrainer> vae;
  std::mutex& mutex() const { return diffusion ? diffusion->mutex() : vae->mutex(); }
  FullOptimizer& optimizer() const { return diffusion ? diffusion->optimizer() : vae->optimizer(); }
};

const Handle<Trainer> kHandle({0x2b7e151628aed2a6ULL, 0xabf7158809cf4f3cULL}, "pretrainer");


const std::set<std::string> kOptimizerKeys = {"learningRate", "lrSchedule", "warmupSteps", "totalSteps",
                                              "adamBeta1",    "adamBeta2",  "adamEpsilon", "adamWeightDecay",
                                              "maxGradNorm",  "emaDecay"};

std::set<std::string> With(std::set<std::string> a, std::initializer_list<std::string> b) {
  a.insert(b.begin(), b.end());
  return a;
}

pretrain::OptimizerOptions ParseOptimizer(const JsOptions& f) {
  pretrain::OptimizerOptions o;
  o.learningRate = f.Number("learningRate", o.learningRate);
  const std::string schedule = f.String("lrSchedule", "cosine");
  Require(schedule == "cosine" || schedule == "constant",
          "lrSchedule must be 'cosine' or 'constant' (both with linear warmup), not \"" + schedule + "\"");
  o.schedule = schedule == "cosine" ? pretrain::LrSchedule::Cosine : pretrain::LrSchedule::Constant;
  o.warmupSteps = f.Int("warmupSteps", o.warmupSteps);
  o.totalSteps = f.Int("totalSteps", o.totalSteps);
  o.adamBeta1 = f.Number("adamBeta1", o.adamBeta1);
  o.adamBeta2 = f.Number("adamBeta2", o.adamBeta2);
  o.adamEpsilon = f.Number("adamEpsilon", o.adamEpsilon);
  o.adamWeightDecay = f.Number("adamWeightDecay", o.adamWeightDecay);
  o.maxGradNorm = f.Number("maxGradNorm", o.maxGradNorm);
  o.emaDecay = f.Number("emaDecay", o.emaDecay);
  return o;
}

Napi::Object StatsToJs(Napi::Env env, const pretrain::StepStats& s, bool vae) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("loss", s.loss);
  o.Set("lr", s.lr);
  o.Set("gradNorm", s.gradNorm);
  o.Set("step", static_cast<double>(s.step));
  if (vae) {
    o.Set("recon", s.recon);
    o.Set("kl", s.kl);
  }
  return o;
}

Napi::Object TensorsToJs(Napi::Env env, const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  Napi::Object o = Napi::Object::New(env);
  for (const auto& [name, t] : tensors) o.Set(name, TensorWrap::New(env, t));
  return o;
}

// createDiffusion(unet, textEncoder, vae | null, schedulerConfigJson, options) → handle
Napi::Value CreateDiffusion(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto unet = UNetFromJs(info[0]);
    auto text = TextEncoderFromJs(info[1]);
    std::shared_ptr<models::AutoencoderKL> vae;
    if (!info[2].IsUndefined() && !info[2].IsNull()) vae = VaeFromJs(info[2]);
    Require(info[3].IsString(), "schedulerConfig must be the scheduler's config JSON text");
    const JsOptions f(info[4], With(kOptimizerKeys, {"trainTextEncoder", "scalingFactor"}), "pretraining option");
    pretrain::DiffusionOptions options;
    options.optimizer = ParseOptimizer(f);
    options.trainTextEncoder = f.Bool("trainTextEncoder", true);
    if (f.Has("scalingFactor")) options.scalingFactor = f.Number("scalingFactor", 1.0);
    // Training draws with DDPMScheduler.from_config(the pipeline's scheduler config), as diffusers does.
    auto scheduler = schedulers::CreateScheduler("ddpm", info[3].As<Napi::String>().Utf8Value(), "", "the scheduler config");
    auto t = std::make_shared<Trainer>();
    t->diffusion = std::make_shared<DiffusionPretrainer>(unet, text, vae, std::move(scheduler), options);
    return kHandle.Wrap(env, t);
  });
}

// createVae(vae, options) → handle
Napi::Value CreateVae(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto vae = VaeFromJs(info[0]);
    const JsOptions f(info[1], With(kOptimizerKeys, {"reconLoss", "klWeight"}), "pretraining option");
    pretrain::VaeOptions options;
    options.optimizer = ParseOptimizer(f);
    const std::string recon = f.String("reconLoss", "l1");
    Require(recon == "l1" || recon == "mse", "reconLoss must be 'l1' or 'mse', not \"" + recon + "\"");
    options.reconLoss = recon == "l1" ? pretrain::ReconLoss::L1 : pretrain::ReconLoss::Mse;
    options.klWeight = f.Number("klWeight", options.klWeight);
    auto t = std::make_shared<Trainer>();
    t->vae = std::make_shared<VaePretrainer>(vae, options);
    return kHandle.Wrap(env, t);
  });
}

// step(handle, batch, generator?) → Promise<stats>
Napi::Value Step(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto t = kHandle.From(info[0]);
    Require(info[1].IsObject(), "batch must be an object");
    const std::optional<at::Generator> gen = GeneratorWrap::From(info[2]);
    if (t->diffusion) {
      const JsOptions b(info[1],
                     {"inputIds", "latents", "latentMean", "latentStd", "pixels", "vaeNoise", "noise", "timesteps"},
                     "batch field");
      pretrain::DiffusionBatch batch;
      batch.inputIds = b.Tensor("inputIds");
      batch.latents = b.Tensor("latents");
      batch.latentMean = b.Tensor("latentMean");
      batch.latentStd = b.Tensor("latentStd");
      batch.pixels = b.Tensor("pixels");
      batch.vaeNoise = b.Tensor("vaeNoise");
      batch.noise = b.Tensor("noise");
      batch.timesteps = b.Tensor("timesteps");
      auto trainer = t->diffusion;
      return Run(env, [trainer, batch, gen](const Progress& p) -> ResultFn {
        const pretrain::StepStats s = trainer->Step(batch, gen, &p);
        return [s](Napi::Env e) -> Napi::Value { return StatsToJs(e, s, false); };
      });
    }
    const JsOptions b(info[1], {"pixels", "vaeNoise"}, "batch field");
    pretrain::VaeBatch batch;
    batch.pixels = b.Tensor("pixels");
    batch.vaeNoise = b.Tensor("vaeNoise");
    auto trainer = t->vae;
    return Run(env, [trainer, batch, gen](const Progress& p) -> ResultFn {
      const pretrain::StepStats s = trainer->Step(batch, gen, &p);
      return [s](Napi::Env e) -> Napi::Value { return StatsToJs(e, s, true); };
    });
  });
}

// swapEma(handle) → Promise<boolean>: whether the EMA weights are in the model afterwards.
Napi::Value SwapEma(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto t = kHandle.From(info[0]);
    return Run(env, [t](const Progress&) -> ResultFn {
      bool swapped;
      {
        std::lock_guard<std::mutex> lock(t->mutex());
        t->optimizer().SwapEma();
        swapped = t->optimizer().emaSwapped();
      }
      return [swapped](Napi::Env e) -> Napi::Value { return Napi::Boolean::New(e, swapped); };
    });
  });
}

// weights(handle, ema) → Promise<{name: Tensor}>
Napi::Value Weights(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto t = kHandle.From(info[0]);
    const bool ema = info[1].IsBoolean() && info[1].As<Napi::Boolean>().Value();
    return Run(env, [t, ema](const Progress&) -> ResultFn {
      std::shared_ptr<std::vector<std::pair<std::string, at::Tensor>>> values;
      {
        std::lock_guard<std::mutex> lock(t->mutex());
        values = std::make_shared<std::vector<std::pair<std::string, at::Tensor>>>(
            ema ? t->optimizer().EmaWeights() : t->optimizer().Weights());
      }
      return [values](Napi::Env e) -> Napi::Value { return TensorsToJs(e, *values); };
    });
  });
}

void StepArgument(const Napi::CallbackInfo& info, int64_t* out) {
  Require(info[1].IsNumber(), "step must be a number");
  const double s = info[1].As<Napi::Number>().DoubleValue();
  Require(s >= 0 && s == std::floor(s) && s <= 9007199254740991.0, "step must be a non-negative integer");
  *out = static_cast<int64_t>(s);
}

// learningRateAt(handle, s): the rate of optimizer step s (0-based). The options never change, so
// no lock is needed.
Napi::Value LearningRateAt(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto t = kHandle.From(info[0]);
    int64_t s = 0;
    StepArgument(info, &s);
    return Napi::Number::New(env, t->optimizer().LearningRateAt(s));
  });
}

// emaDecayAt(handle, k): the EMA decay of update k (1-based).
Napi::Value EmaDecayAt(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto t = kHandle.From(info[0]);
    int64_t k = 0;
    StepArgument(info, &k);
    return Napi::Number::New(env, t->optimizer().EmaDecayAt(k));
  });
}

// info(handle) → {kind, parameterNames, parameterCount, hasEma, predictionType?, scalingFactor?}
Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto t = kHandle.From(info[0]);
    const FullOptimizer& opt = t->optimizer();
    Napi::Object o = Napi::Object::New(env);
    o.Set("kind", t->diffusion ? "diffusion" : "vae");
    Napi::Array names = Napi::Array::New(env, opt.names().size());
    double count = 0;
    for (size_t i = 0; i < opt.names().size(); ++i) {
      names.Set(static_cast<uint32_t>(i), opt.names()[i]);
      count += static_cast<double>(opt.values()[i].numel());
    }
    o.Set("parameterNames", names);
    o.Set("parameterCount", count);
    o.Set("hasEma", opt.hasEma());
    if (t->diffusion) {
      o.Set("predictionType", t->diffusion->predictionType());
      const double sf = t->diffusion->scalingFactor();
      o.Set("scalingFactor", std::isnan(sf) ? env.Null() : Napi::Number::New(env, sf));
    }
    return o;
  });
}

Napi::Value Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    kHandle.Dispose(info[0]);
    return env.Undefined();
  });
}

Napi::Value TextEncoderTensors(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto m = TextEncoderFromJs(info[0]);
    Require(m->vocab_size() == m->base_vocab_size(),
            "The text encoder has added token rows, which its weights file would not hold");
    std::vector<std::pair<std::string, at::Tensor>> out(m->weights().tensors().begin(), m->weights().tensors().end());
    return TensorsToJs(env, out);
  });
}

Napi::Value VaeTensors(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto m = VaeFromJs(info[0]);
    std::vector<std::pair<std::string, at::Tensor>> out(m->weights().tensors().begin(), m->weights().tensors().end());
    return TensorsToJs(env, out);
  });
}

}  // namespace

void InitPretrain(Napi::Env env, Napi::Object exports) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("createDiffusion", Napi::Function::New(env, CreateDiffusion, "createDiffusion"));
  o.Set("createVae", Napi::Function::New(env, CreateVae, "createVae"));
  o.Set("step", Napi::Function::New(env, Step, "step"));
  o.Set("swapEma", Napi::Function::New(env, SwapEma, "swapEma"));
  o.Set("weights", Napi::Function::New(env, Weights, "weights"));
  o.Set("learningRateAt", Napi::Function::New(env, LearningRateAt, "learningRateAt"));
  o.Set("emaDecayAt", Napi::Function::New(env, EmaDecayAt, "emaDecayAt"));
  o.Set("info", Napi::Function::New(env, Info, "info"));
  o.Set("dispose", Napi::Function::New(env, Dispose, "dispose"));
  o.Set("textEncoderTensors", Napi::Function::New(env, TextEncoderTensors, "textEncoderTensors"));
  o.Set("vaeTensors", Napi::Function::New(env, VaeTensors, "vaeTensors"));
  exports.Set("pretrain", o);
}

CD_REGISTER_BINDING(pretrain, InitPretrain);

}  // namespace cd
