// diffusers pipelines/stable_diffusion/pipeline_stable_diffusion.py `StableDiffusionPipeline.__call__`:
// the denoising loop (latents × init_noise_sigma, classifier-free guidance, one scheduler step per
// timestep) and the image post-processing of VaeImageProcessor. Prompt encoding, the VAE decode and
// the image files are orchestrated by src/sample/ (TypeScript).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <vector>

#include "core/async.h"
#include "models/unet_2d_condition.h"
#include "schedulers/scheduler.h"

namespace cd::pipelines {

// The UNet call of one step: (scaled latent input [B', C, h, w], timestep) → model output. The caller
// binds the text conditioning (encoder hidden states or a prepared cross-attention context).
using UNetCall = std::function<at::Tensor(const at::Tensor& sample, const at::Tensor& timestep)>;

struct DenoiseArgs {
  // [N, C, h, w]: initial noise as drawn (before × init_noise_sigma), in any dtype/device.
  at::Tensor latents;
  // > 1 runs classifier-free guidance: the UNet batch is [negative × N, positive × N] and the
  // conditioning bound in UNetCall must be laid out the same way.
  double guidanceScale = 7.5;
  int steps = 50;
  // eta and the per-image generators of stochastic steps (one per latent, so image i reproduces alone).
  schedulers::StepOptions stepOptions;
  // Every this many steps a low-resolution RGB preview of the latents goes out with the progress event.
  int previewEvery = 0;
  // The model's dtype and device (latents are moved there, as diffusers draws them in the UNet's dtype).
  at::TensorOptions modelOptions;
};

// Runs the loop and returns the final latents [N, C, h, w]. Reports a "step" event per step (step,
// steps, timestep; plus `data`, `previewWidth`, `previewHeight` on preview steps) and stops with
// ABORT_ERR between steps when cancelled.
at::Tensor Denoise(schedulers::Scheduler& scheduler, const UNetCall& unet, const DenoiseArgs& args,
                   const Progress& progress);

// A cheap RGB approximation of SD latents (4 channels → 3 by a fixed linear map), uint8 [N, h, w, 3],
// for progress previews; other channel counts show the first channel as grey.
at::Tensor LatentPreview(const at::Tensor& latents);

// VaeImageProcessor.postprocess: decoded [N, 3, H, W] in [-1, 1] → clamp(x / 2 + 0.5, 0, 1), float32.
at::Tensor Denormalize(const at::Tensor& decoded);

// numpy_to_pil's (x · 255).round() as uint8, laid out [N, H, W, 3] (what image files hold).
at::Tensor ToUint8(const at::Tensor& images01);

}  // namespace cd::pipelines
