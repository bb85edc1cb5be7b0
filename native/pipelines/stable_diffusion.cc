#include "pipelines/stable_diffusion.h"

#include <string>

#include "core/errors.h"

namespace cd::pipelines {

at::Tensor Denoise(schedulers::Scheduler& scheduler, const UNetCall& unet, const DenoiseArgs& args,
                   const Progress& progress) {
  Require(args.latents.defined() && args.latents.dim() == 4, "latents must be [N, C, h, w]");
  Require(args.steps >= 1, "steps must be at least 1");
  const bool guided = args.guidanceScale > 1.0;
  scheduler.setTimesteps(args.steps);
  const at::Tensor timesteps = scheduler.timesteps();
  const int64_t n = timesteps.numel();

  // As prepare_latents: the drawn noise, in the model's dtype, times the scheduler's initial σ.
  at::Tensor latents = args.latents.to(args.modelOptions) * scheduler.initNoiseSigma();
  for (int64_t i = 0; i < n; ++i) {
    progress.ThrowIfCancelled();
    const at::Tensor t = timesteps[i];
    const double tv = t.item<double>();
    at::Tensor input = guided ? at::cat({latents, latents}, 0) : latents;
    input = scheduler.scaleModelInput(input, tv);
    at::Tensor out = unet(input, t);
    if (guided) {
      auto halves = out.chunk(2, 0);
      // noise_pred_uncond + guidance_scale · (noise_pred_text − noise_pred_uncond)
      out = halves[0] + args.guidanceScale * (halves[1] - halves[0]);
    }
    latents = scheduler.step(out, tv, latents, args.stepOptions);

    ProgressEvent ev{"step", {{"step", static_cast<double>(i + 1)}, {"steps", static_cast<double>(n)}, {"timestep", tv}}, {}};
    if (args.previewEvery > 0 && ((i + 1) % args.previewEvery == 0 || i + 1 == n)) {
      at::Tensor p = LatentPreview(latents);
      ev.values.emplace_back("previewHeight", static_cast<double>(p.size(1)));
      ev.values.emplace_back("previewWidth", static_cast<double>(p.size(2)));
      ev.values.emplace_back("previewCount", static_cast<double>(p.size(0)));
      ev.data.assign(p.data_ptr<uint8_t>(), p.data_ptr<uint8_t>() + p.numel());
    }
    progress.Report(std::move(ev));
  }
  return latents;
}

at::Tensor LatentPreview(const at::Tensor& latents) {
  at::Tensor x = latents.detach().to(at::kCPU, at::kFloat);
  at::Tensor rgb;
  if (x.size(1) == 4) {
    // Least-squares fit of SD1.x latents to their decoded RGB (a widely used approximation).
    static const float kFactors[4][3] = {
        {0.3512f, 0.2297f, 0.3227f}, {0.3250f, 0.4974f, 0.2350f}, {-0.2829f, 0.1762f, 0.2721f}, {-0.2120f, -0.2616f, -0.7177f}};
    at::Tensor m = at::from_blob(const_cast<float*>(&kFactors[0][0]), {4, 3}, at::kFloat);
    rgb = at::einsum("nchw,cd->nhwd", {x, m});
  } else {
    rgb = x.select(1, 0).unsqueeze(-1).expand({x.size(0), x.size(2), x.size(3), 3});
  }
  return ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(at::kByte).contiguous();
}

at::Tensor Denormalize(const at::Tensor& decoded) {
  Require(decoded.dim() == 4 && decoded.size(1) == 3, "decoded images must be [N, 3, H, W]");
  return (decoded.to(at::kFloat) / 2 + 0.5).clamp(0, 1);
}

at::Tensor ToUint8(const at::Tensor& images01) {
  Require(images01.dim() == 4 && images01.size(1) == 3, "images must be [N, 3, H, W]");
  return (images01.to(at::kCPU, at::kFloat).permute({0, 2, 3, 1}) * 255).round().to(at::kByte).contiguous();
}

}  // namespace cd::pipelines
