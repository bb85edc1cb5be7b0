#!/usr/bin/env python3
"""Reference train-all-weights steps, for the native pretraining mode's parity test.

    python3 test/parity/make_pretrain_reference.py

Writes test/fixtures/pretrain/sd1.safetensors and test/fixtures/pretrain/manifest.json.

Built from diffusers / transformers components on the committed tiny sd1 fixture model
(test/fixtures/parity/sd1/model, float16 weights upcast to float32), two optimizer steps each:

* diffusion: the loop body of diffusers' examples/text_to_image/train_text_to_image.py with the text
  encoder unfrozen: latents = (mean + std · vae_noise.k) · scaling_factor from the posterior of
  `pixels` (recorded as latent_mean / latent_std, so the native step starts from the same
  posterior), noisy = DDPMScheduler.add_noise(latents, noise.k, timesteps.k), loss =
  mse(unet(noisy, t, text_encoder(ids)[0]), noise) (epsilon); AdamW over every UNet and text-encoder
  parameter (one group), clip_grad_norm_(all, 1.0), get_cosine_schedule_with_warmup(0 warmup, 3
  total steps) and diffusers' EMAModel(decay=0.9) stepped after each update. One caption is empty.
* vae: recon = decode(mean + std · vae_noise.k); loss = l1(recon, pixels) + kl_weight ·
  posterior.kl().mean(); AdamW over every VAE parameter, clip_grad_norm_(all, 1.0), constant lr.

Recorded per step: the loss and the total gradient norm; after each step, for every parameter (in
the manifest's `names` order), the values at up to 32 evenly spread positions (every element of
tensors with ≤ 128 elements), concatenated into one vector, and the float64 sums of the whole
tensors; the same for the EMA weights after the second step.

Deterministic: single-threaded, every random tensor from a CRC32-seeded generator.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parity_common as pc  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.optimization import get_constant_schedule, get_cosine_schedule_with_warmup  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402
import torch.nn.functional as F  # noqa: E402

transformers.logging.set_verbosity_error()
diffusers.logging.set_verbosity_error()

OUT_DIR = os.path.join(pc.REPO_ROOT, "test", "fixtures", "pretrain")
CONFIG = "sd1"
PROMPTS = ["a red circle on a blue background", "", "a man", "photo of a large square"]
STEPS = 2
SAMPLES = 32  # positions recorded per large tensor
SMALL = 128  # tensors up to this size are recorded whole
DIFFUSION = dict(learning_rate=1e-3, weight_decay=1e-2, warmup=0, total=3, ema_decay=0.9, max_grad_norm=1.0)
VAE = dict(learning_rate=1e-3, weight_decay=1e-2, kl_weight=1e-2, max_grad_norm=1.0)
BETAS = (0.9, 0.999)
EPS = 1e-8


def positions(n: int) -> torch.Tensor:
    """The recorded elements of a flattened tensor of n elements: all of a small one, else SAMPLES
    evenly spread positions floor((i + 0.5)·n / SAMPLES) (the test computes the same list)."""
    if n <= SMALL:
        return torch.arange(n, dtype=torch.int64)
    return torch.tensor([int((i + 0.5) * n / SAMPLES) for i in range(SAMPLES)], dtype=torch.int64)


def record(out: dict, tag: str, named: list[tuple[str, torch.Tensor]]) -> None:
    """One float32 vector of the recorded values of every tensor (in `named` order, concatenated)
    and one float64 vector of the tensors' sums."""
    values, sums = [], []
    for _, t in named:
        flat = t.detach().reshape(-1)
        values.append(flat[positions(flat.numel())].float())
        sums.append(flat.double().sum().reshape(1))
    out[f"{tag}.values"] = torch.cat(values)
    out[f"{tag}.sums"] = torch.cat(sums)


def load(model: str):
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    return tokenizer, text_encoder, vae, unet, scheduler


def te_names(text_encoder: CLIPTextModel) -> list[tuple[str, torch.nn.Parameter]]:
    # The fixture's file uses transformers 4 keys ("text_model.…"); transformers 5 drops the level in
    # module names, so name parameters as the file does, which is what the native model reports.
    out = []
    for n, p in text_encoder.named_parameters():
        out.append((n if n.startswith("text_model.") else "text_model." + n, p))
    return out


def diffusion_case(model: str, inputs: dict, expected: dict, params: dict) -> None:
    tokenizer, text_encoder, vae, unet, scheduler = load(model)
    key = lambda name: f"pretrain/{CONFIG}/diffusion/{name}"  # noqa: E731
    n = len(PROMPTS)
    size = 32
    pixels = pc.uniform(key("pixels"), [n, 3, size, size], -1.0, 1.0)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    inputs["diffusion.latent_mean"] = dist.mean.detach().clone()
    inputs["diffusion.latent_std"] = dist.std.detach().clone()
    ids = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(torch.int64)
    inputs["diffusion.input_ids"] = ids

    unet.train()
    text_encoder.train()
    named = [("unet." + k, p) for k, p in unet.named_parameters()] + [("text_encoder." + k, p) for k, p in te_names(text_encoder)]
    for _, p in named:
        p.requires_grad_(True)
    all_params = [p for _, p in named]
    d = DIFFUSION
    optimizer = torch.optim.AdamW(all_params, lr=d["learning_rate"], betas=BETAS, weight_decay=d["weight_decay"], eps=EPS)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=d["warmup"], num_training_steps=d["total"])
    ema = EMAModel(all_params, decay=d["ema_decay"])

    losses, norms, lrs = [], [], []
    for k in range(STEPS):
        vae_noise = pc.randn(key(f"vae_noise.{k}"), list(dist.mean.shape))
        noise = pc.randn(key(f"noise.{k}"), list(dist.mean.shape))
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=pc.gen(key(f"timesteps.{k}")))
        inputs[f"diffusion.vae_noise.{k}"] = vae_noise
        inputs[f"diffusion.noise.{k}"] = noise
        inputs[f"diffusion.timesteps.{k}"] = timesteps

        latents = (inputs["diffusion.latent_mean"] + inputs["diffusion.latent_std"] * vae_noise) * vae.config.scaling_factor
        noisy = scheduler.add_noise(latents, noise, timesteps)
        context = text_encoder(ids)[0]
        pred = unet(noisy, timesteps, context).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(all_params, d["max_grad_norm"])
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(all_params)
        losses.append(loss.item())
        norms.append(norm.item())
        expected[f"diffusion.loss.{k}"] = loss.detach().reshape(1)
        expected[f"diffusion.grad_norm.{k}"] = norm.detach().reshape(1)
        record(expected, f"diffusion.after.{k}", named)
    record(expected, "diffusion.ema", [(name, s) for (name, _), s in zip(named, ema.shadow_params)])
    params["diffusion"] = {
        **d,
        "adam_beta1": BETAS[0],
        "adam_beta2": BETAS[1],
        "adam_epsilon": EPS,
        "prompts": PROMPTS,
        "scaling_factor": vae.config.scaling_factor,
        "prediction_type": scheduler.config.prediction_type,
        "names": [name for name, _ in named],
        "losses": losses,
        "grad_norms": norms,
        "lrs": lrs,
    }


def vae_case(model: str, inputs: dict, expected: dict, params: dict) -> None:
    _, _, vae, _, _ = load(model)
    key = lambda name: f"pretrain/{CONFIG}/vae/{name}"  # noqa: E731
    n = 3
    pixels = pc.uniform(key("pixels"), [n, 3, 32, 32], -1.0, 1.0)
    inputs["vae.pixels"] = pixels
    vae.train()
    named = [("vae." + k, p) for k, p in vae.named_parameters()]
    all_params = [p for _, p in named]
    v = VAE
    optimizer = torch.optim.AdamW(all_params, lr=v["learning_rate"], betas=BETAS, weight_decay=v["weight_decay"], eps=EPS)
    lr_scheduler = get_constant_schedule(optimizer)
    losses, norms, recons, kls = [], [], [], []
    for k in range(STEPS):
        posterior = vae.encode(pixels).latent_dist
        vae_noise = pc.randn(key(f"vae_noise.{k}"), list(posterior.mean.shape))
        inputs[f"vae.vae_noise.{k}"] = vae_noise
        z = posterior.mean + posterior.std * vae_noise
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, pixels, reduction="mean")
        kl = posterior.kl().mean()
        loss = rec + v["kl_weight"] * kl
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(all_params, v["max_grad_norm"])
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        norms.append(norm.item())
        recons.append(rec.item())
        kls.append(kl.item())
        expected[f"vae.loss.{k}"] = loss.detach().reshape(1)
        expected[f"vae.grad_norm.{k}"] = norm.detach().reshape(1)
        record(expected, f"vae.after.{k}", named)
    params["vae"] = {
        **v,
        "adam_beta1": BETAS[0],
        "adam_beta2": BETAS[1],
        "adam_epsilon": EPS,
        "recon_loss": "l1",
        "names": [name for name, _ in named],
        "losses": losses,
        "grad_norms": norms,
        "recons": recons,
        "kls": kls,
    }


def main() -> None:
    model = os.path.join(pc.REPO_ROOT, "test", "fixtures", "parity", CONFIG, "model")
    os.makedirs(OUT_DIR, exist_ok=True)
    inputs: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    params: dict = {"steps": STEPS}
    diffusion_case(model, inputs, expected, params)
    vae_case(model, inputs, expected, params)
    tensors = {**inputs, **expected}
    for k, t in tensors.items():
        assert t.dtype in (torch.float32, torch.float64, torch.int64), (k, t.dtype)
    save_file({k: t.contiguous() for k, t in tensors.items()}, os.path.join(OUT_DIR, f"{CONFIG}.safetensors"))
    manifest = {
        "generator": "test/parity/make_pretrain_reference.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "configs": {CONFIG: {"file": f"{CONFIG}.safetensors", "params": params}},
    }
    pc.write_json(os.path.join(OUT_DIR, "manifest.json"), manifest)
    print(f"diffusion: losses {params['diffusion']['losses']}, grad norms {params['diffusion']['grad_norms']}")
    print(f"vae: losses {params['vae']['losses']}, grad norms {params['vae']['grad_norms']}")
    print(f"wrote {os.path.getsize(os.path.join(OUT_DIR, CONFIG + '.safetensors'))} bytes")


if __name__ == "__main__":
    main()
