// CLIPTextModel as transformers (modeling_clip.py) defines it, with its parameter names, so a Stable
// Diffusion `text_encoder/` folder loads as it is: token + learned position embeddings, pre-LN encoder
// layers with a causal mask, and final_layer_norm.
//
// Token embeddings are kept in two parts so that Custom Diffusion can train only the rows of the
// tokens it adds (`<new1>`, ...):
//   * the base matrix: the `token_embedding.weight` tensor of the loaded file (the very handle that
//     Weights holds), never trainable here;
//   * the added rows: a separate tensor with one row per token appended by ResizeTokenEmbeddings.
// The lookup reads ids below the base vocabulary from the first and the others from the second
// (two gathers and a select, no concatenation of the 49408×768 matrix on every call). Marking the
// added rows trainable (SetAddedRowsTrainable) makes that tensor a leaf that requires grad, so an
// optimizer can be given exactly the new rows: no gradient mask is needed, and weight decay cannot
// touch the pretrained rows. (The reference trainers hand the whole matrix to AdamW and zero the
// gradient of old rows, so its decoupled weight decay shrinks the old rows slightly during training;
// this split does not reproduce that side effect, which the saved deltas never contain.)
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "models/config.h"
#include "models/weights.h"

namespace cd::models {

struct ClipTextConfig {
  int vocab_size = 49408;
  int hidden_size = 512;
  int intermediate_size = 2048;
  int num_hidden_layers = 12;
  int num_attention_heads = 8;
  int max_position_embeddings = 77;
  std::string hidden_act = "quick_gelu";
  double layer_norm_eps = 1e-5;

  // Reads a transformers CLIPTextConfig strictly (defaults are transformers' own).
  static ClipTextConfig Read(ConfigReader& r);
};

class ClipTextModel {
 public:
  // Builds the model over `weights` (keys with or without the "text_model." prefix) and calls
  // weights.Finish(), so a folder that does not match its config fails with every bad key listed.
  ClipTextModel(const ClipTextConfig& config, Weights weights);

  // Builds the model from its config.json text and weights files (safetensors or torch.save
  // pickles; the TypeScript side picks them), converting floating-point weights to `dtype` on `device`.
  static std::shared_ptr<ClipTextModel> Load(const std::string& configText, const std::string& configFile,
                                             const std::vector<std::string>& weightFiles, at::ScalarType dtype,
                                             c10::Device device);

  struct Output {
    at::Tensor last_hidden_state;           // final_layer_norm of the selected layer (see clip_skip)
    std::vector<at::Tensor> hidden_states;  // embeddings, then each layer's output (when asked)
  };

  // input_ids: integer [B, S] with S ≤ max_position_embeddings. clip_skip k (0 ≤ k ≤ layers) returns
  // final_layer_norm(hidden_states[-(k+1)]) as diffusers' encode_prompt(clip_skip=k) does; only the
  // layers needed are run. Follows the calling thread's grad mode (inference callers use
  // at::NoGradGuard; training leaves it on so gradients reach the trainable added rows).
  Output Forward(const at::Tensor& input_ids, int clip_skip = 0, bool output_hidden_states = false) const;

  // Grows (or shrinks, down to the loaded vocabulary) the vocabulary to n rows. Old rows are kept;
  // new rows are the mean of the loaded rows (transformers' mean_resizing without its 1e-9-scaled
  // random perturbation), and are normally overwritten with SetTokenRows at once.
  void ResizeTokenEmbeddings(int64_t n);
  // Writes rows ([ids.size(), hidden]) in place, without recording gradients.
  void SetTokenRows(const std::vector<int64_t>& ids, const at::Tensor& rows);
  // A copy of the rows of `ids`, [ids.size(), hidden].
  at::Tensor TokenRows(const std::vector<int64_t>& ids) const;

  // The rows appended by ResizeTokenEmbeddings ([vocab - base_vocab, hidden]), the same tensor the
  // forward pass reads. SetAddedRowsTrainable(true) makes it require grad; it stays the same tensor
  // until the next ResizeTokenEmbeddings (which keeps the flag on the new tensor).
  at::Tensor AddedRows() const;
  void SetAddedRowsTrainable(bool trainable);
  bool AddedRowsTrainable() const;

  const ClipTextConfig& config() const { return config_; }
  int64_t vocab_size() const;
  int64_t base_vocab_size() const { return base_vocab_; }
  at::ScalarType dtype() const { return dtype_; }
  c10::Device device() const { return device_; }
  // Every loaded tensor by its name in the file (the model holds the same handles).
  Weights& weights() { return weights_; }

 private:
  struct Layer {
    at::Tensor ln1_w, ln1_b, ln2_w, ln2_b;
    at::Tensor q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b;
    at::Tensor fc1_w, fc1_b, fc2_w, fc2_b;
  };

  at::Tensor Embed(const at::Tensor& ids, const at::Tensor& added) const;
  at::Tensor RunLayer(const Layer& l, const at::Tensor& x) const;
  at::Tensor Activation(const at::Tensor& x) const;
  void CheckIds(const std::vector<int64_t>& ids) const;

  ClipTextConfig config_;
  Weights weights_;
  at::ScalarType dtype_ = at::kFloat;
  c10::Device device_ = c10::Device(c10::kCPU);
  int64_t base_vocab_ = 0;
  at::Tensor token_embedding_;     // [base_vocab, H]
  at::Tensor position_embedding_;  // [P, H]
  std::vector<Layer> layers_;
  at::Tensor final_ln_w_, final_ln_b_;

  // Guards added_ (the handle, not the data): the forward pass takes a snapshot of the handle, so a
  // resize on the JS thread never waits for a running forward pass. Callers must not write rows
  // while a forward pass that reads them is running.
  mutable std::mutex mu_;
  at::Tensor added_;  // [vocab - base_vocab, H]
  bool added_trainable_ = false;
};

}  // namespace cd::models
