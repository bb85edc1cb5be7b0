// transformers CLIPTextModel (models/clip/modeling_clip.py): CLIPTextEmbeddings, CLIPEncoderLayer
// (CLIPAttention + CLIPMLP) and final_layer_norm. Read side by side with that file.
#include "models/clip_text.h"

#include <algorithm>
#include <set>
#include <sstream>

#include "core/errors.h"
#include "core/json.h"

namespace cd::models {

ClipTextConfig ClipTextConfig::Read(ConfigReader& r) {
  ClipTextConfig c;
  c.vocab_size = r.Int("vocab_size", c.vocab_size);
  c.hidden_size = r.Int("hidden_size", c.hidden_size);
  c.intermediate_size = r.Int("intermediate_size", c.intermediate_size);
  c.num_hidden_layers = r.Int("num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads = r.Int("num_attention_heads", c.num_attention_heads);
  c.max_position_embeddings = r.Int("max_position_embeddings", c.max_position_embeddings);
  c.hidden_act = r.String("hidden_act", c.hidden_act);
  c.layer_norm_eps = r.Double("layer_norm_eps", c.layer_norm_eps);
  r.Expect("model_type", "\"clip_text_model\"", "this is the config of a CLIPTextModel");
  // Dropout would only act in training mode, and Custom Diffusion trains the text encoder's new token
  // rows in train() mode: a non-zero rate would change the training computation.
  r.Expect("attention_dropout", "0", "dropout in the text encoder is not implemented");
  r.Expect("dropout", "0", "dropout in the text encoder is not implemented");
  r.Ignore({// The pooled output and the projection are not part of CLIPTextModel's last_hidden_state.
            "projection_dim", "pad_token_id", "bos_token_id", "eos_token_id",
            // Initialisation, storage dtype and bookkeeping.
            "initializer_range", "initializer_factor", "torch_dtype", "dtype", "architectures",
            "transformers_version", "name_or_path",
            // Generic PretrainedConfig fields that configs written by transformers 4.x list in full; CLIP's
            // text model reads none of them.
            "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16",
            "tf_legacy_loss", "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder",
            "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length",
            "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
            "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
            "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
            "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
            "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
            "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id",
            "decoder_start_token_id", "task_specific_params", "problem_type", "gradient_checkpointing",
            "use_cache"});
  const char* acts[] = {"quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"};
  if (std::find(std::begin(acts), std::end(acts), c.hidden_act) == std::end(acts))
    r.Fail("hidden_act", "\"" + c.hidden_act + "\" is not supported (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)");
  auto positive = [&](const char* key, int v) {
    if (v <= 0) r.Fail(key, "must be positive");
  };
  positive("vocab_size", c.vocab_size);
  positive("hidden_size", c.hidden_size);
  positive("intermediate_size", c.intermediate_size);
  positive("num_hidden_layers", c.num_hidden_layers);
  positive("num_attention_heads", c.num_attention_heads);
  positive("max_position_embeddings", c.max_position_embeddings);
  if (c.hidden_size % c.num_attention_heads != 0)
    r.Fail("num_attention_heads", "must divide hidden_size (" + std::to_string(c.hidden_size) + ")");
  if (!(c.layer_norm_eps > 0)) r.Fail("layer_norm_eps", "must be positive");
  return c;
}

ClipTextModel::ClipTextModel(const ClipTextConfig& config, Weights weights)
    : config_(config), weights_(std::move(weights)) {
  const int64_t H = config_.hidden_size, I = config_.intermediate_size, P = config_.max_position_embeddings;
  Weights::Scope root = weights_.root();
  // transformers 4.x saved CLIPTextModel under "text_model."; transformers 5 saves without it.
  if (root.has("text_model.embeddings.token_embedding.weight")) root = root.sub("text_model");
  Weights::Scope emb = root.sub("embeddings");
  token_embedding_ = emb.get("token_embedding.weight", {config_.vocab_size, H});
  position_embedding_ = emb.get("position_embedding.weight", {P, H});
  // Files from transformers < 4.31 also hold the position_ids buffer (always arange); current
  // transformers ignores it on load, and so do we.
  if (emb.has("position_ids")) emb.get("position_ids", {1, P});
  Weights::Scope enc = root.sub("encoder").sub("layers");
  for (int i = 0; i < config_.num_hidden_layers; ++i) {
    Weights::Scope s = enc.sub(i);
    Layer l;
    l.ln1_w = s.get("layer_norm1.weight", {H});
    l.ln1_b = s.get("layer_norm1.bias", {H});
    l.ln2_w = s.get("layer_norm2.weight", {H});
    l.ln2_b = s.get("layer_norm2.bias", {H});
    Weights::Scope a = s.sub("self_attn");
    l.q_w = a.get("q_proj.weight", {H, H});
    l.q_b = a.get("q_proj.bias", {H});
    l.k_w = a.get("k_proj.weight", {H, H});
    l.k_b = a.get("k_proj.bias", {H});
    l.v_w = a.get("v_proj.weight", {H, H});
    l.v_b = a.get("v_proj.bias", {H});
    l.o_w = a.get("out_proj.weight", {H, H});
    l.o_b = a.get("out_proj.bias", {H});
    Weights::Scope m = s.sub("mlp");
    l.fc1_w = m.get("fc1.weight", {I, H});
    l.fc1_b = m.get("fc1.bias", {I});
    l.fc2_w = m.get("fc2.weight", {H, I});
    l.fc2_b = m.get("fc2.bias", {H});
    layers_.push_back(std::move(l));
  }
  final_ln_w_ = root.get("final_layer_norm.weight", {H});
  final_ln_b_ = root.get("final_layer_norm.bias", {H});
  weights_.Finish();

  base_vocab_ = config_.vocab_size;
  dtype_ = token_embedding_.scalar_type();
  device_ = token_embedding_.device();
  added_ = at::empty({0, H}, token_embedding_.options());
}

std::shared_ptr<ClipTextModel> ClipTextModel::Load(const std::string& configText, const std::string& configFile,
                                                   const std::vector<std::string>& weightFiles, at::ScalarType dtype,
                                                   c10::Device device) {
  ConfigReader reader(configText, configFile);
  ClipTextConfig config = ClipTextConfig::Read(reader);
  reader.Finish();
  return std::make_shared<ClipTextModel>(config, Weights::FromFiles(weightFiles, dtype, device));
}

int64_t ClipTextModel::vocab_size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return base_vocab_ + added_.size(0);
}

at::Tensor ClipTextModel::Activation(const at::Tensor& x) const {
  const std::string& a = config_.hidden_act;
  if (a == "quick_gelu") return x * at::sigmoid(x * 1.702);
  if (a == "gelu") return at::gelu(x);
  return at::gelu(x, "tanh");  // gelu_new and gelu_pytorch_tanh: the tanh approximation
}

at::Tensor ClipTextModel::Embed(const at::Tensor& ids, const at::Tensor& added) const {
  if (added.size(0) == 0) return at::embedding(token_embedding_, ids);
  const at::Tensor is_added = ids >= base_vocab_;
  const at::Tensor base = at::embedding(token_embedding_, ids.masked_fill(is_added, 0));
  const at::Tensor extra = at::embedding(added, (ids - base_vocab_).masked_fill(is_added.logical_not(), 0));
  return at::where(is_added.unsqueeze(-1), extra, base);
}

at::Tensor ClipTextModel::RunLayer(const Layer& l, const at::Tensor& x) const {
  const int64_t B = x.size(0), S = x.size(1), H = config_.hidden_size;
  const int64_t heads = config_.num_attention_heads, hd = H / heads;
  const double eps = config_.layer_norm_eps;
  at::Tensor h = at::layer_norm(x, {H}, l.ln1_w, l.ln1_b, eps);
  auto split = [&](const at::Tensor& t) { return t.view({B, S, heads, hd}).transpose(1, 2); };
  const at::Tensor q = split(at::linear(h, l.q_w, l.q_b));
  const at::Tensor k = split(at::linear(h, l.k_w, l.k_b));
  const at::Tensor v = split(at::linear(h, l.v_w, l.v_b));
  // CLIP's text tower is causal; SD passes no padding mask. The scale is head_dim^-0.5 (SDPA's default).
  at::Tensor a = at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true);
  a = a.transpose(1, 2).reshape({B, S, H});
  at::Tensor y = x + at::linear(a, l.o_w, l.o_b);
  h = at::layer_norm(y, {H}, l.ln2_w, l.ln2_b, eps);
  h = at::linear(Activation(at::linear(h, l.fc1_w, l.fc1_b)), l.fc2_w, l.fc2_b);
  return y + h;
}

ClipTextModel::Output ClipTextModel::Forward(const at::Tensor& input_ids, int clip_skip,
                                             bool output_hidden_states) const {
  const int N = config_.num_hidden_layers;
  Require(input_ids.defined() && input_ids.dim() == 2, "input_ids must be a 2-D tensor [batch, sequence]");
  Require(!at::isFloatingType(input_ids.scalar_type()) && input_ids.scalar_type() != at::kBool,
          "input_ids must hold integers (int64)");
  const int64_t S = input_ids.size(1);
  Require(S >= 1 && S <= config_.max_position_embeddings,
          "input_ids has " + std::to_string(S) + " positions; this text encoder takes 1 to " +
              std::to_string(config_.max_position_embeddings));
  Require(clip_skip >= 0 && clip_skip <= N,
          "clipSkip must be between 0 and the number of layers (" + std::to_string(N) + ")");
  at::Tensor added;
  {
    std::lock_guard<std::mutex> lock(mu_);
    added = added_;
  }
  const int64_t vocab = base_vocab_ + added.size(0);
  if (input_ids.numel() > 0) {
    // Checked where the ids already are (the tokenizer's output is on the host), before the copy
    // to the model's device, so a CUDA model pays no device sync for it.
    const auto [loT, hiT] = at::aminmax(input_ids.to(at::kLong));
    const int64_t lo = loT.item<int64_t>(), hi = hiT.item<int64_t>();
    Require(lo >= 0 && hi < vocab, "input_ids holds token id " + std::to_string(lo < 0 ? lo : hi) +
                                       ", outside the vocabulary of " + std::to_string(vocab) + " tokens");
  }
  const at::Tensor ids = input_ids.to(device_, at::kLong);

  Output out;
  at::Tensor x = Embed(ids, added) + position_embedding_.narrow(0, 0, S);
  const int run = output_hidden_states ? N : N - clip_skip;
  if (output_hidden_states) out.hidden_states.push_back(x);
  at::Tensor selected = x;  // hidden_states[N - clip_skip]
  for (int i = 0; i < run; ++i) {
    x = RunLayer(layers_[i], x);
    if (output_hidden_states) out.hidden_states.push_back(x);
    if (i + 1 == N - clip_skip) selected = x;
  }
  out.last_hidden_state =
      at::layer_norm(selected, {config_.hidden_size}, final_ln_w_, final_ln_b_, config_.layer_norm_eps);
  return out;
}

void ClipTextModel::CheckIds(const std::vector<int64_t>& ids) const {
  const int64_t vocab = vocab_size();
  std::set<int64_t> seen;
  for (int64_t id : ids) {
    Require(id >= 0 && id < vocab,
            "Token id " + std::to_string(id) + " is outside the vocabulary of " + std::to_string(vocab) + " tokens");
    Require(seen.insert(id).second, "Token id " + std::to_string(id) + " is given twice");
  }
}

void ClipTextModel::ResizeTokenEmbeddings(int64_t n) {
  Require(n >= base_vocab_, "resizeTokenEmbeddings(" + std::to_string(n) +
                                "): the vocabulary can grow, or shrink back to the loaded " +
                                std::to_string(base_vocab_) + " tokens, but not below");
  at::NoGradGuard no_grad;
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t current = base_vocab_ + added_.size(0);
  at::Tensor next;
  if (n <= current) {
    next = added_.narrow(0, 0, n - base_vocab_).clone();
  } else {
    // Mean of every current row, accumulated in float32 as transformers does.
    at::Tensor sum = token_embedding_.sum(0, false, at::kFloat) + added_.sum(0, false, at::kFloat);
    at::Tensor mean = (sum / static_cast<double>(current)).to(dtype_);
    next = at::cat({added_.detach(), mean.unsqueeze(0).expand({n - current, -1})});
  }
  if (added_trainable_) next.requires_grad_(true);
  added_ = next;
}

void ClipTextModel::SetTokenRows(const std::vector<int64_t>& ids, const at::Tensor& rows) {
  CheckIds(ids);
  const int64_t n = static_cast<int64_t>(ids.size());
  Require(rows.defined() && rows.dim() == 2 && rows.size(0) == n && rows.size(1) == config_.hidden_size,
          "setTokenRows needs rows of shape [" + std::to_string(n) + ", " + std::to_string(config_.hidden_size) + "]");
  Require(at::isFloatingType(rows.scalar_type()), "setTokenRows needs floating-point rows");
  at::NoGradGuard no_grad;
  const at::Tensor src = rows.to(device_, dtype_);
  std::lock_guard<std::mutex> lock(mu_);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    at::Tensor dst = id < base_vocab_ ? token_embedding_.select(0, id) : added_.select(0, id - base_vocab_);
    dst.copy_(src.select(0, i));
  }
}

at::Tensor ClipTextModel::TokenRows(const std::vector<int64_t>& ids) const {
  CheckIds(ids);
  at::NoGradGuard no_grad;
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<at::Tensor> rows;
  for (int64_t id : ids)
    rows.push_back(id < base_vocab_ ? token_embedding_.select(0, id) : added_.select(0, id - base_vocab_));
  if (rows.empty()) return at::empty({0, config_.hidden_size}, token_embedding_.options());
  return at::stack(rows).detach().clone();
}

at::Tensor ClipTextModel::AddedRows() const {
  std::lock_guard<std::mutex> lock(mu_);
  return added_;
}

void ClipTextModel::SetAddedRowsTrainable(bool trainable) {
  std::lock_guard<std::mutex> lock(mu_);
  added_trainable_ = trainable;
  added_.requires_grad_(trainable);
}

bool ClipTextModel::AddedRowsTrainable() const {
  std::lock_guard<std::mutex> lock(mu_);
  return added_trainable_;
}

}  // namespace cd::models
