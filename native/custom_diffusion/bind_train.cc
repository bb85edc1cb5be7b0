// JS bindings of custom_diffusion/train_step, as the addon's `trainer` object:
//   create(unet, textEncoder, vae | null, schedulerConfigJson, options) → handle
//   step(handle, batch, generator?) → Promise<{loss, lr, gradNorm, optimizerStepped, skipped, optimizerSteps, microSteps, textCacheHits, latentCacheHits, checkpointedSegments}>
//   trainables(handle) → Promise<{name: Tensor}>          setTrainables(handle, {name: Tensor}) → Promise<void>
//   optimizerState(handle) → Promise<{...}>              setOptimizerState(handle, state) → Promise<void>
//   info(handle), learningRateAt(handle, step), dispose(handle)
// The handles of the models are those of the model bindings (see models/handles.h); the trainer keeps
// the models alive. Everything that may wait for a running step goes through Run(), so the JS thread
// never blocks on the trainer's lock.
#include <napi.h>

#include <cmath>
#include <set>

#include "core/async.h"
#include "core/errors.h"
#include "core/js_options.h"
#include "core/handle.h"
#include "core/generator.h"
#include "core/registry.h"
#include "core/tensor.h"
#include "custom_diffusion/train_step.h"
#include "models/clip_text.h"
#include "models/autoencoder_kl.h"
#include "models/handles.h"
#include "schedulers/scheduler.h"

namespace cd {

namespace {

using custom_diffusion::TrainStep;

const Handle<TrainStep> kHandle({0x5a1c7e93b2d64f08ULL, 0xc3e5a7f9182b4d6eULL}, "trainer");

std::shared_ptr<TrainStep> TrainerFrom(const Napi::Value& v) { return kHandle.From(v); }


custom_diffusion::TrainStepOptions ParseOptions(const Napi::Value& v) {
  JsOptions o(v,
            {"freezeModel", "tokenIds", "learningRate", "tokenLearningRateScale", "warmupSteps", "adamBeta1", "adamBeta2", "adamEpsilon",
             "adamWeightDecay", "maxGradNorm", "gradientAccumulationSteps", "priorLossWeight", "lossWeighting",
             "mixedPrecision", "gradientCheckpointing", "cacheTextEmbeddings", "cacheClassLatents"},
            "trainer option");
  custom_diffusion::TrainStepOptions r;
  const std::string freeze = o.String("freezeModel", "crossattn_kv");
  auto mode = models::TrainableModeFromName(freeze);
  Require(mode.has_value() && *mode != models::TrainableMode::None,
          "freezeModel must be 'crossattn_kv' or 'crossattn', not \"" + freeze + "\"");
  r.freezeModel = *mode;
  if (o.Has("tokenIds")) {
    Require(o.Get("tokenIds").IsArray(), "tokenIds must be an array of token ids");
    auto arr = o.Get("tokenIds").As<Napi::Array>();
    for (uint32_t i = 0; i < arr.Length(); ++i) {
      Napi::Value x = arr.Get(i);
      Require(x.IsNumber() && x.As<Napi::Number>().DoubleValue() == std::floor(x.As<Napi::Number>().DoubleValue()),
              "tokenIds must hold integers");
      r.tokenIds.push_back(static_cast<int64_t>(x.As<Napi::Number>().DoubleValue()));
    }
  }
  r.learningRate = o.Number("learningRate", r.learningRate);
  r.tokenLearningRateScale = o.Number("tokenLearningRateScale", r.tokenLearningRateScale);
  r.warmupSteps = o.Int("warmupSteps", r.warmupSteps);
  r.adamBeta1 = o.Number("adamBeta1", r.adamBeta1);
  r.adamBeta2 = o.Number("adamBeta2", r.adamBeta2);
  r.adamEpsilon = o.Number("adamEpsilon", r.adamEpsilon);
  r.adamWeightDecay = o.Number("adamWeightDecay", r.adamWeightDecay);
  r.maxGradNorm = o.Number("maxGradNorm", r.maxGradNorm);
  r.gradientAccumulationSteps = o.Int("gradientAccumulationSteps", r.gradientAccumulationSteps);
  r.priorLossWeight = o.Number("priorLossWeight", r.priorLossWeight);
  const std::string lw = o.String("lossWeighting", "diffusers");
  Require(lw == "diffusers" || lw == "compvis", "lossWeighting must be 'diffusers' or 'compvis', not \"" + lw + "\"");
  r.lossWeighting = lw == "compvis" ? custom_diffusion::LossWeighting::CompVis : custom_diffusion::LossWeighting::Diffusers;
  const std::string mp = o.String("mixedPrecision", "no");
  Require(mp == "no" || mp == "fp16" || mp == "bf16", "mixedPrecision must be 'no', 'fp16' or 'bf16', not \"" + mp + "\"");
  r.mixedPrecision = mp == "fp16"   ? custom_diffusion::MixedPrecision::Fp16
                     : mp == "bf16" ? custom_diffusion::MixedPrecision::Bf16
                                    : custom_diffusion::MixedPrecision::No;
  r.cacheTextEmbeddings = o.Bool("cacheTextEmbeddings", true);
  r.cacheClassLatents = o.Bool("cacheClassLatents", true);
  r.gradientCheckpointing = o.Bool("gradientCheckpointing", false);
  return r;
}

// create(unet, textEncoder, vae | null, schedulerConfigJson, options) → handle
Napi::Value Create(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto unet = UNetFromJs(info[0]);
    auto text = TextEncoderFromJs(info[1]);
    std::shared_ptr<models::AutoencoderKL> vae;
    if (!info[2].IsUndefined() && !info[2].IsNull()) vae = VaeFromJs(info[2]);
    Require(info[3].IsString(), "schedulerConfig must be the scheduler's config JSON text");
    const std::string config = info[3].As<Napi::String>().Utf8Value();
    auto options = ParseOptions(info[4]);
    // Training always uses DDPMScheduler.from_config(the model's scheduler config), as the scripts do.
    auto scheduler = schedulers::CreateScheduler("ddpm", config, "", "the scheduler config");
    auto trainer = std::make_shared<TrainStep>(unet, text, vae, std::move(scheduler), options);
    return kHandle.Wrap(env, trainer);
  });
}

// step(handle, batch, generator?) → Promise<result>
Napi::Value Step(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto trainer = TrainerFrom(info[0]);
    JsOptions b(info[1], {"pixels", "latents", "masks", "inputIds", "instanceCount", "vaeNoise", "noise", "timesteps"},
              "batch field");
    Require(info[1].IsObject(), "batch must be an object");
    custom_diffusion::StepBatch batch;
    batch.pixels = b.Tensor("pixels");
    batch.latents = b.Tensor("latents");
    batch.masks = b.Tensor("masks");
    batch.inputIds = b.Tensor("inputIds");
    Require(b.Has("instanceCount"), "batch.instanceCount is required");
    batch.instanceCount = b.Int("instanceCount", 0);
    batch.vaeNoise = b.Tensor("vaeNoise");
    batch.noise = b.Tensor("noise");
    batch.timesteps = b.Tensor("timesteps");
    std::optional<at::Generator> gen = GeneratorWrap::From(info[2]);
    return Run(env, [trainer, batch, gen](const Progress& p) -> ResultFn {
      const custom_diffusion::StepResult r = trainer->Step(batch, gen, &p);
      return [r](Napi::Env e) -> Napi::Value {
        Napi::Object o = Napi::Object::New(e);
        o.Set("loss", r.loss);
        o.Set("lr", r.lr);
        o.Set("gradNorm", r.gradNorm);
        o.Set("optimizerStepped", r.optimizerStepped);
        o.Set("skipped", r.skipped);
        o.Set("optimizerSteps", static_cast<double>(r.optimizerSteps));
        o.Set("microSteps", static_cast<double>(r.microSteps));
        o.Set("textCacheHits", static_cast<double>(r.textCacheHits));
        o.Set("latentCacheHits", static_cast<double>(r.latentCacheHits));
        o.Set("checkpointedSegments", static_cast<double>(r.checkpointedSegments));
        return o;
      };
    });
  });
}

// trainables(handle) → Promise<{name: Tensor}> (copies, in optimizer order)
Napi::Value Trainables(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto trainer = TrainerFrom(info[0]);
    return Run(env, [trainer](const Progress&) -> ResultFn {
      auto values = std::make_shared<std::vector<std::pair<std::string, at::Tensor>>>(trainer->Trainables());
      return [values](Napi::Env e) -> Napi::Value {
        Napi::Object o = Napi::Object::New(e);
        for (const auto& [name, t] : *values) o.Set(name, TensorWrap::New(e, t));
        return o;
      };
    });
  });
}

// setTrainables(handle, {name: Tensor}) → Promise<void>
Napi::Value SetTrainables(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto trainer = TrainerFrom(info[0]);
    Require(info[1].IsObject(), "values must be an object of tensors by name");
    auto obj = info[1].As<Napi::Object>();
    auto keys = obj.GetPropertyNames();
    std::vector<std::pair<std::string, at::Tensor>> values;
    for (uint32_t i = 0; i < keys.Length(); ++i) {
      const std::string k = keys.Get(i).ToString().Utf8Value();
      values.emplace_back(k, TensorWrap::From(obj.Get(k), k.c_str()));
    }
    return Run(env, [trainer, values](const Progress&) -> ResultFn {
      trainer->SetTrainables(values);
      return nullptr;
    });
  });
}

// optimizerState(handle) → Promise<{names, expAvg, expAvgSq, optimizerSteps, microSteps, scale?, growthTracker?}>
Napi::Value GetOptimizerState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto trainer = TrainerFrom(info[0]);
    return Run(env, [trainer](const Progress&) -> ResultFn {
      auto s = std::make_shared<custom_diffusion::OptimizerState>(trainer->GetOptimizerState());
      return [s](Napi::Env e) -> Napi::Value {
        Napi::Object o = Napi::Object::New(e);
        Napi::Array names = Napi::Array::New(e, s->names.size());
        Napi::Array m = Napi::Array::New(e, s->names.size());
        Napi::Array v = Napi::Array::New(e, s->names.size());
        for (size_t i = 0; i < s->names.size(); ++i) {
          names.Set(static_cast<uint32_t>(i), s->names[i]);
          m.Set(static_cast<uint32_t>(i), TensorWrap::New(e, s->expAvg[i]));
          v.Set(static_cast<uint32_t>(i), TensorWrap::New(e, s->expAvgSq[i]));
        }
        o.Set("names", names);
        o.Set("expAvg", m);
        o.Set("expAvgSq", v);
        o.Set("optimizerSteps", static_cast<double>(s->optimizerSteps));
        o.Set("microSteps", static_cast<double>(s->microSteps));
        if (s->scale.defined()) {
          o.Set("scale", TensorWrap::New(e, s->scale));
          o.Set("growthTracker", TensorWrap::New(e, s->growthTracker));
        }
        return o;
      };
    });
  });
}

// setOptimizerState(handle, state) → Promise<void>
Napi::Value SetOptimizerState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto trainer = TrainerFrom(info[0]);
    JsOptions o(info[1], {"names", "expAvg", "expAvgSq", "optimizerSteps", "microSteps", "scale", "growthTracker"},
              "optimizer state field");
    Require(info[1].IsObject() && o.Get("names").IsArray() && o.Get("expAvg").IsArray() && o.Get("expAvgSq").IsArray(),
            "The optimizer state needs names, expAvg and expAvgSq arrays");
    custom_diffusion::OptimizerState s;
    auto names = o.Get("names").As<Napi::Array>();
    auto m = o.Get("expAvg").As<Napi::Array>();
    auto v = o.Get("expAvgSq").As<Napi::Array>();
    Require(m.Length() == names.Length() && v.Length() == names.Length(),
            "names, expAvg and expAvgSq must have the same length");
    for (uint32_t i = 0; i < names.Length(); ++i) {
      Require(names.Get(i).IsString(), "names must hold strings");
      s.names.push_back(names.Get(i).As<Napi::String>().Utf8Value());
      s.expAvg.push_back(TensorWrap::From(m.Get(i), "expAvg"));
      s.expAvgSq.push_back(TensorWrap::From(v.Get(i), "expAvgSq"));
    }
    s.optimizerSteps = o.Int("optimizerSteps", 0);
    s.microSteps = o.Int("microSteps", s.optimizerSteps);
    s.scale = o.Tensor("scale");
    s.growthTracker = o.Tensor("growthTracker");
    return Run(env, [trainer, s](const Progress&) -> ResultFn {
      trainer->SetOptimizerState(s);
      return nullptr;
    });
  });
}

// info(handle) → {trainableNames, predictionType, learningRate, ...}
Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto trainer = TrainerFrom(info[0]);
    const auto& op = trainer->options();
    Napi::Object o = Napi::Object::New(env);
    auto names = trainer->TrainableNames();
    Napi::Array arr = Napi::Array::New(env, names.size());
    for (size_t i = 0; i < names.size(); ++i) arr.Set(static_cast<uint32_t>(i), names[i]);
    o.Set("trainableNames", arr);
    o.Set("addedRowsName", TrainStep::kAddedRowsName);
    o.Set("predictionType", trainer->predictionType());
    o.Set("learningRate", op.learningRate);
    o.Set("warmupSteps", static_cast<double>(op.warmupSteps));
    o.Set("gradientAccumulationSteps", static_cast<double>(op.gradientAccumulationSteps));
    o.Set("freezeModel", models::TrainableModeName(op.freezeModel));
    return o;
  });
}

Napi::Value LearningRateAt(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto trainer = TrainerFrom(info[0]);
    Require(info[1].IsNumber(), "step must be a number");
    const double s = info[1].As<Napi::Number>().DoubleValue();
    Require(s >= 0 && s == std::floor(s), "step must be a non-negative integer");
    return Napi::Number::New(env, trainer->LearningRateAt(static_cast<int64_t>(s)));
  });
}

// dispose(handle): drops this handle's reference (a running step keeps its own).
Napi::Value Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    kHandle.Dispose(info[0]);
    return env.Undefined();
  });
}

}  // namespace

void InitTrainer(Napi::Env env, Napi::Object exports) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("create", Napi::Function::New(env, Create, "create"));
  o.Set("step", Napi::Function::New(env, Step, "step"));
  o.Set("trainables", Napi::Function::New(env, Trainables, "trainables"));
  o.Set("setTrainables", Napi::Function::New(env, SetTrainables, "setTrainables"));
  o.Set("optimizerState", Napi::Function::New(env, GetOptimizerState, "optimizerState"));
  o.Set("setOptimizerState", Napi::Function::New(env, SetOptimizerState, "setOptimizerState"));
  o.Set("info", Napi::Function::New(env, Info, "info"));
  o.Set("learningRateAt", Napi::Function::New(env, LearningRateAt, "learningRateAt"));
  o.Set("dispose", Napi::Function::New(env, Dispose, "dispose"));
  exports.Set("trainer", o);
}

CD_REGISTER_BINDING(trainer, InitTrainer);

}  // namespace cd
