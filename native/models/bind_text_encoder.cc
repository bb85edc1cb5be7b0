// JS bindings of models/clip_text: exports.textEncoder = {load, encode, resizeTokenEmbeddings,
// setTokenRows, tokenRows, vocabSize, dispose}. A loaded model travels to JS as a type-tagged External
// owning a shared_ptr, so work already queued on a worker thread keeps the model alive after dispose().
#include <napi.h>

#include "core/async.h"
#include "core/dtype_device.h"
#include "core/errors.h"
#include "core/handle.h"
#include "core/registry.h"
#include "core/tensor.h"
#include "models/load_args.h"
#include "models/handles.h"
#include "models/clip_text.h"

namespace cd {

namespace {

using models::ClipTextModel;

const Handle<ClipTextModel> kHandle({0x8f3c2b1a6d4e4f10ULL, 0xa7b9c1d2e3f40516ULL}, "text encoder");

std::shared_ptr<ClipTextModel> ModelFrom(const Napi::Value& v) { return kHandle.From(v); }

std::vector<int64_t> IdsFrom(const Napi::Value& v, const char* what) {
  Require(v.IsArray(), std::string(what) + " must be an array of token ids");
  const auto arr = v.As<Napi::Array>();
  std::vector<int64_t> ids;
  for (uint32_t i = 0; i < arr.Length(); ++i) {
    const Napi::Value x = arr.Get(i);
    Require(x.IsNumber(), std::string(what) + " must hold integers");
    const double d = x.As<Napi::Number>().DoubleValue();
    Require(d == static_cast<double>(static_cast<int64_t>(d)), std::string(what) + " must hold integers");
    ids.push_back(static_cast<int64_t>(d));
  }
  return ids;
}

Napi::Object Describe(Napi::Env env, const std::shared_ptr<ClipTextModel>& m) {
  Napi::Object o = Napi::Object::New(env);
  const auto& c = m->config();
  o.Set("handle", kHandle.Wrap(env, m));
  o.Set("vocabSize", static_cast<double>(m->vocab_size()));
  o.Set("baseVocabSize", static_cast<double>(m->base_vocab_size()));
  o.Set("hiddenSize", c.hidden_size);
  o.Set("numHiddenLayers", c.num_hidden_layers);
  o.Set("numAttentionHeads", c.num_attention_heads);
  o.Set("maxPositionEmbeddings", c.max_position_embeddings);
  o.Set("hiddenAct", c.hidden_act);
  o.Set("dtype", DtypeName(m->dtype()));
  o.Set("device", DeviceName(m->device()));
  return o;
}

// load(configText, weightFiles, {dtype?, device?, configFile?}) → Promise<{handle, vocabSize, hiddenSize, ...}>
Napi::Value Load(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    models::LoadArgs args = models::ParseLoadArgs(info);
    return Run(env, [args](const Progress&) -> ResultFn {
      auto m = ClipTextModel::Load(args.configText, args.configFile, args.files, args.dtype, args.device);
      return [m](Napi::Env e) -> Napi::Value { return Describe(e, m); };
    });
  });
}

// encode(handle, inputIds, {clipSkip?, outputHiddenStates?})
//   → Promise<Tensor> or, with outputHiddenStates, Promise<{lastHiddenState, hiddenStates}>
Napi::Value Encode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto model = ModelFrom(info[0]);
    at::Tensor ids = TensorWrap::From(info[1], "inputIds");
    int clip_skip = 0;
    bool hidden = false;
    if (info[2].IsObject()) {
      auto o = info[2].As<Napi::Object>();
      const Napi::Value cs = o.Get("clipSkip");
      if (!cs.IsUndefined() && !cs.IsNull()) {
        Require(cs.IsNumber(), "clipSkip must be a non-negative integer");
        const double d = cs.As<Napi::Number>().DoubleValue();
        Require(d >= 0 && d == static_cast<double>(static_cast<int>(d)), "clipSkip must be a non-negative integer");
        clip_skip = static_cast<int>(d);
      }
      hidden = o.Get("outputHiddenStates").ToBoolean().Value();
    }
    return Run(env, [model, ids, clip_skip, hidden](const Progress&) -> ResultFn {
      at::NoGradGuard no_grad;
      auto out = std::make_shared<ClipTextModel::Output>(model->Forward(ids, clip_skip, hidden));
      return [out, hidden](Napi::Env e) -> Napi::Value {
        if (!hidden) return TensorWrap::New(e, out->last_hidden_state);
        Napi::Object o = Napi::Object::New(e);
        o.Set("lastHiddenState", TensorWrap::New(e, out->last_hidden_state));
        Napi::Array hs = Napi::Array::New(e, out->hidden_states.size());
        for (size_t i = 0; i < out->hidden_states.size(); ++i)
          hs.Set(static_cast<uint32_t>(i), TensorWrap::New(e, out->hidden_states[i]));
        o.Set("hiddenStates", hs);
        return o;
      };
    });
  });
}

// resizeTokenEmbeddings(handle, n) → new vocabulary size
Napi::Value Resize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto model = ModelFrom(info[0]);
    Require(info[1].IsNumber(), "resizeTokenEmbeddings needs a token count");
    const double d = info[1].As<Napi::Number>().DoubleValue();
    Require(d >= 0 && d == static_cast<double>(static_cast<int64_t>(d)),
            "resizeTokenEmbeddings needs an integer count");
    model->ResizeTokenEmbeddings(static_cast<int64_t>(d));
    return Napi::Number::New(env, static_cast<double>(model->vocab_size()));
  });
}

// setTokenRows(handle, ids: number[], rows: Tensor [n, hidden])
Napi::Value SetRows(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto model = ModelFrom(info[0]);
    const std::vector<int64_t> ids = IdsFrom(info[1], "ids");
    const at::Tensor rows = TensorWrap::From(info[2], "rows");
    model->SetTokenRows(ids, rows);
    return env.Undefined();
  });
}

// tokenRows(handle, ids: number[]) → Tensor [n, hidden] (a copy)
Napi::Value GetRows(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    auto model = ModelFrom(info[0]);
    return TensorWrap::New(env, model->TokenRows(IdsFrom(info[1], "ids")));
  });
}

Napi::Value VocabSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    return Napi::Number::New(env, static_cast<double>(ModelFrom(info[0])->vocab_size()));
  });
}

// dispose(handle): drops this handle's reference (queued work keeps its own).
Napi::Value Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, [&]() -> Napi::Value {
    kHandle.Dispose(info[0]);
    return env.Undefined();
  });
}

}  // namespace

std::shared_ptr<models::ClipTextModel> TextEncoderFromJs(const Napi::Value& handle) { return ModelFrom(handle); }

void InitTextEncoder(Napi::Env env, Napi::Object exports) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("load", Napi::Function::New(env, Load, "load"));
  o.Set("encode", Napi::Function::New(env, Encode, "encode"));
  o.Set("resizeTokenEmbeddings", Napi::Function::New(env, Resize, "resizeTokenEmbeddings"));
  o.Set("setTokenRows", Napi::Function::New(env, SetRows, "setTokenRows"));
  o.Set("tokenRows", Napi::Function::New(env, GetRows, "tokenRows"));
  o.Set("vocabSize", Napi::Function::New(env, VocabSize, "vocabSize"));
  o.Set("dispose", Napi::Function::New(env, Dispose, "dispose"));
  exports.Set("textEncoder", o);
}

CD_REGISTER_BINDING(text_encoder, InitTextEncoder);

}  // namespace cd
