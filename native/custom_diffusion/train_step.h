// One Custom Diffusion optimizer step in native code: the whole of the training loop body of the
// diffusers-based scripts (A-DF: adobe-research/custom-diffusion src/diffusers_training.py; HF-EX:
// diffusers examples/custom_diffusion/train_custom_diffusion.py), run in one call per micro-batch so
// that the batch crosses the JS/native boundary once and only the loss (and lr) come back:
//
//   latents = VAE.encode(pixels).latent_dist.sample() × scaling_factor     (a sample, not the mode)
//   noise ~ N(0, 1); t ~ U{0 … num_train_timesteps−1} per example
//   noisy = DDPM add_noise(latents, noise, t); target = noise | v (the scheduler's prediction type)
//   context = text_encoder(ids).last_hidden_state     (the added token rows are trainable)
//   pred = unet(noisy, t, context) with the cross-attention K/V of token 0 detached (BOS detach)
//   loss (below); backward; [every gradient_accumulation micro-batches:] clip, AdamW, lr schedule.
//
// Loss (the diffusers path, with the batch layout [B instance examples, then B class examples]):
//   per example L_i = Σ_{c,h,w} (pred − target)²·mask / Σ_{h,w} mask      (1-channel mask, so the
//   instance term is 4× the per-element masked mean, as in every original implementation);
//   loss = mean_{instance} L_i + prior_loss_weight · mean((pred − target)²) over the class half.
// The A-CV (CompVis) weighting, where class examples use the same masked per-example formula, is
// LossWeighting::CompVis: loss = mean_{instance} L_i + prior_loss_weight · mean_{class} L_j, halved
// (= the plain mean over the batch when prior_loss_weight is 1, as in A-CV). We default to the
// diffusers path because the batch layout [instance…, class…] and prior_loss_weight come from it,
// and the parity reference is built from diffusers components (see src/train/README.md).
//
// Trainable parameters: the UNet's attn2.to_k/to_v weights (freeze_model "crossattn_kv") or every
// attn2 parameter ("crossattn"), and the text encoder's added token rows (a separate tensor, see
// models/clip_text.h). Gradients reach the token rows only through that tensor, so AdamW's
// decoupled weight decay touches only the new rows (A-DF/HF-EX hand AdamW the whole embedding
// matrix and zero the old rows' gradients, so their decay also shrinks the 49408 pretrained rows a
// little each step; those rows are never saved, and we keep them bit-identical instead). All
// modifier tokens train (HF-EX; A-DF's loop leaves the last of ≥2 tokens frozen, a bug we do not
// reproduce). Frozen weights never get gradients and stay bit-identical.
//
// AdamW is torch.optim.AdamW's single-tensor formula (decoupled decay, bias correction, eps added
// after the bias-corrected square root), the path torch takes for CPU tensors. Gradient clipping is
// torch.nn.utils.clip_grad_norm_ (total 2-norm of the per-tensor norms, coefficient
// max_norm/(norm + 1e-6) clamped to 1, always multiplied). The learning rate follows diffusers'
// constant schedule with linear warmup (LambdaLR: optimizer step s uses lr·s/warmup while s < warmup,
// so a run with warmup starts at lr 0).
//
// Precision: float32 everywhere by default. MixedPrecision::Fp16/Bf16 runs the forward passes under
// autocast (CUDA; bf16 also on CPU) while the trainable weights, gradients and AdamW state stay
// float32 (the models must be loaded in float32); fp16 adds dynamic loss scaling as torch's
// GradScaler does (steps with inf/NaN gradients are skipped and the scale backs off).
// Gradient checkpointing (an option) recomputes each UNet resnet and transformer in the backward
// instead of keeping its activations: same gradients, less memory, one more forward of time.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/async.h"
#include "models/autoencoder_kl.h"
#include "models/unet_2d_condition.h"

namespace cd::models {
class ClipTextModel;
class AutoencoderKL;
}  // namespace cd::models

namespace cd::schedulers {
class Scheduler;
}

namespace cd::custom_diffusion {

enum class LossWeighting { Diffusers, CompVis };
enum class MixedPrecision { No, Fp16, Bf16 };

struct TrainStepOptions {
  models::TrainableMode freezeModel = models::TrainableMode::CrossAttnKV;
  // Ids of the modifier tokens; they must be exactly the text encoder's added rows, in order
  // (base_vocab, base_vocab + 1, …). Empty: the text encoder is frozen entirely.
  std::vector<int64_t> tokenIds;
  // The learning rate after scale_lr (the trainer applies the scaling rule).
  double learningRate = 1e-5;
  // The token rows' learning rate as a multiple of learningRate (1: one rate for all, as the paper).
  double tokenLearningRateScale = 1.0;
  int64_t warmupSteps = 0;
  double adamBeta1 = 0.9;
  double adamBeta2 = 0.999;
  double adamEpsilon = 1e-8;
  double adamWeightDecay = 1e-2;
  // ≤ 0 disables clipping.
  double maxGradNorm = 1.0;
  int64_t gradientAccumulationSteps = 1;
  double priorLossWeight = 1.0;
  LossWeighting lossWeighting = LossWeighting::Diffusers;
  MixedPrecision mixedPrecision = MixedPrecision::No;
  bool gradientCheckpointing = false;
  // GradScaler defaults (fp16 only).
  double initScale = 65536.0;
  double growthFactor = 2.0;
  double backoffFactor = 0.5;
  int64_t growthInterval = 2000;
  // Keep the text encoder's output for prompts without a trainable token (class prompts, or every
  // prompt when no token trains): those outputs never change during training. Each is computed on
  // its own (batch of one), so a cached and a fresh value are the same bits and resuming stays exact.
  bool cacheTextEmbeddings = true;
  // Keep the VAE posterior (mean, std) of each class example, keyed by its exact pixels: class
  // images are only flipped, so they recur; each is encoded alone once (same bits as fresh), and a
  // new posterior sample is still drawn every step. Instance examples are encoded every step.
  bool cacheClassLatents = true;
};

// One micro-batch. Examples [0, instanceCount) are instance examples, the rest class (prior)
// examples; without prior preservation instanceCount equals the batch size.
struct StepBatch {
  at::Tensor pixels;   // [N, 3, H, W] in [−1, 1]; or undefined when `latents` is given
  at::Tensor latents;  // [N, C, h, w] already × scaling_factor (cached encodings); else undefined
  at::Tensor masks;    // [N, 1, m, m]; resized (nearest) to the latent size when m differs
  at::Tensor inputIds; // integer [N, S]
  int64_t instanceCount = 0;
  // Injected randomness (parity tests): each replaces the corresponding draw from the generator.
  at::Tensor vaeNoise;   // [N, C, h, w]: the posterior sample is mean + std · vaeNoise
  at::Tensor noise;      // [N, C, h, w]
  at::Tensor timesteps;  // integer [N]
};

struct StepResult {
  double loss = 0;           // this micro-batch's loss (before the 1/accumulation scaling)
  double lr = 0;             // the learning rate of the optimizer step this micro-batch belongs to
  double gradNorm = -1;      // total gradient norm before clipping (optimizer steps only; −1 otherwise)
  bool optimizerStepped = false;  // this call ended an accumulation cycle and updated the weights
  bool skipped = false;      // fp16: the update was skipped (inf/NaN gradients) and the scale reduced
  int64_t optimizerSteps = 0;  // updates applied so far (after this call)
  int64_t microSteps = 0;      // micro-batches processed so far (after this call)
  int64_t textCacheHits = 0;   // prompt rows served from the text-embedding cache so far
  int64_t latentCacheHits = 0; // class examples served from the posterior cache so far
  int64_t checkpointedSegments = 0;  // UNet blocks run with gradient checkpointing so far
};

// AdamW state and counters, for checkpoints.
struct OptimizerState {
  std::vector<std::string> names;  // trainable names, in optimizer order
  std::vector<at::Tensor> expAvg, expAvgSq;
  int64_t optimizerSteps = 0;  // torch's per-parameter `step` (equal for every parameter here)
  int64_t microSteps = 0;
  at::Tensor scale;          // fp16 loss scale [1] (undefined otherwise)
  at::Tensor growthTracker;  // int32 [1] (undefined otherwise)
};

class TrainStep {
 public:
  // Sets the UNet's trainable set (setTrainable) and makes the added token rows trainable. `vae` may
  // be null when every batch brings latents.
  TrainStep(std::shared_ptr<models::UNet2DConditionModel> unet, std::shared_ptr<models::ClipTextModel> textEncoder,
            std::shared_ptr<models::AutoencoderKL> vae, std::unique_ptr<schedulers::Scheduler> scheduler,
            TrainStepOptions options);
  ~TrainStep();

  // One micro-batch (see the file comment). Throws TRAIN_NAN, leaving every weight and the
  // optimizer state as they were before the accumulation cycle, when the loss or the gradient norm
  // is not finite (fp16 overflows are skipped instead). Calls run one at a time.
  StepResult Step(const StepBatch& batch, std::optional<at::Generator> generator, const Progress* progress);

  // The trainable tensors by name: the UNet's diffusers names, then kAddedRowsName for the added
  // token rows [n, hidden]. Copies (a checkpoint being written is not changed by later steps).
  std::vector<std::pair<std::string, at::Tensor>> Trainables() const;
  // Writes values into the trainable tensors (resume); every name must be trainable, shapes must match.
  void SetTrainables(const std::vector<std::pair<std::string, at::Tensor>>& values);

  // Copies of the AdamW state (no accumulation may be in progress).
  OptimizerState GetOptimizerState() const;
  void SetOptimizerState(const OptimizerState& state);

  // The learning rate optimizer step `s` (0-based) uses.
  double LearningRateAt(int64_t s) const;
  const TrainStepOptions& options() const { return options_; }
  const std::string& predictionType() const;
  std::vector<std::string> TrainableNames() const;

  static constexpr const char* kAddedRowsName = "text_encoder.token_embedding.added_rows";

 private:
  struct Param {
    std::string name;
    at::Tensor value;  // the model's own tensor (requires_grad), updated in place
    double lrScale;    // multiplies the scheduled learning rate
    at::Tensor expAvg, expAvgSq;
    at::Tensor accum;  // accumulated gradient of the current cycle (undefined between cycles)
  };

  at::Tensor Loss(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask, int64_t instances) const;
  void ResetAccumulation();
  // The running counters (optimizer steps, micro-steps, cache hits, checkpointed segments) into `r`.
  StepResult& WithCounters(StepResult& r) const;
  // The text encoder's last hidden state for the batch, from textCache_ where it may.
  at::Tensor EncodeText(const at::Tensor& inputIds);
  // The VAE posterior of the batch's pixels, class examples from latentCache_ where they may.
  models::AutoencoderKL::Posterior EncodeImages(const at::Tensor& pixels, int64_t instances);

  std::shared_ptr<models::UNet2DConditionModel> unet_;
  std::shared_ptr<models::ClipTextModel> text_;
  std::shared_ptr<models::AutoencoderKL> vae_;
  std::unique_ptr<schedulers::Scheduler> scheduler_;
  TrainStepOptions options_;
  c10::Device device_ = c10::Device(c10::kCPU);
  std::vector<Param> params_;
  bool trainTokens_ = false;
  // cacheTextEmbeddings: token ids of a prompt row → its last hidden state [1, L, D] (no autograd).
  std::map<std::vector<int64_t>, at::Tensor> textCache_;
  int64_t textCacheHits_ = 0;
  // cacheClassLatents: exact pixel bytes (+ shape, dtype) of a class example → posterior (mean, std).
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> latentCache_;
  int64_t latentCacheHits_ = 0;
  int64_t checkpointedSegments_ = 0;
  int64_t optimizerSteps_ = 0;
  int64_t microSteps_ = 0;
  int64_t cycleMicro_ = 0;  // micro-batches in the current accumulation cycle
  at::Tensor scale_, growthTracker_;
  mutable std::mutex mutex_;
};

}  // namespace cd::custom_diffusion
