#!/usr/bin/env python3
"""Reference Custom Diffusion optimizer steps, for the native training step's parity test.

    python3 test/parity/make_train_step_reference.py          # sd1 and sd2
    python3 test/parity/make_train_step_reference.py sd1      # one config

Writes test/fixtures/train-step/<config>.safetensors and test/fixtures/train-step/manifest.json.

The step is the loop body of diffusers' examples/custom_diffusion/train_custom_diffusion.py (HF-EX),
built from diffusers / transformers components on the committed tiny fixture models
(test/fixtures/parity/<config>/model, float16 weights upcast to float32):

* the tokenizer gets `<new1>`; the text encoder is resized and row `<new1>` is set to the row of the
  initializer token, looked up as a RAW vocabulary entry (convert_tokens_to_ids, as the slow
  tokenizer's encode([tok]) does; "man</w>" here since the tiny vocabulary has no "ktn");
* every attention processor is a CustomDiffusionAttnProcessor2_0 (attn1 plain; attn2 with
  train_kv: to_k/to_v_custom_diffusion initialised from to_k/to_v, start-token K/V detached);
* AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.1 for sd1 and 1e-2 for sd2) over the whole token-embedding matrix plus the
  processors' K/V weights, CPU single-tensor path; the gradient of every embedding row except
  `<new1>`'s is zeroed after backward; clip_grad_norm_(text encoder params + processor params, 1.0);
* loss with prior preservation, batch [B instance, B class]:
    mean_i Σ(pred−target)²·mask / Σ mask  +  prior_loss_weight · mse(pred_prior, target_prior);
* the randomness is injected: the posterior sample is mean + std · vae_noise.k (what
  DiagonalGaussianDistribution.sample computes), the diffusion noise is noise.k, the timesteps
  timesteps.k.

Two optimizer steps are taken (k = 0, 1) on the same images with fresh noise and timesteps, so the
second step exercises the AdamW moments and bias correction. Recorded per step: the loss, the total
gradient norm before clipping, and every K/V weight and the `<new1>` row after the step. sd2 has
v-prediction (its scheduler config), so its target is get_velocity.

Deterministic: single-threaded, every random tensor from a CRC32-seeded generator.
"""

from __future__ import annotations

import itertools
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
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402
import torch.nn.functional as F  # noqa: E402

transformers.logging.set_verbosity_error()
diffusers.logging.set_verbosity_error()

OUT_DIR = os.path.join(pc.REPO_ROOT, "test", "fixtures", "train-step")

MODIFIER = "<new1>"
INITIALIZER = "man</w>"
PROMPTS = [
    "photo of a <new1> man",
    "a far away photo of a <new1> man",
    "photo of a man",
    "a man",
]
INSTANCE_COUNT = 2
# lr 1e-3 makes the updates large enough to compare (the recipe's 1e-5 would vanish in float32
# rounding of the weights). sd1 uses a weight decay of 0.1 so that the decoupled decay is ~2% of the
# update (visible to the test), sd2 the recipe's 1e-2; sd2 also weights the prior term by 0.5.
PARAMS = {
    "sd1": dict(learning_rate=1e-3, prior_loss_weight=1.0, weight_decay=0.1),
    "sd2": dict(learning_rate=1e-3, prior_loss_weight=0.5, weight_decay=1e-2),
}
BETAS = (0.9, 0.999)
EPS = 1e-8
MAX_GRAD_NORM = 1.0
STEPS = 2


def custom_diffusion_processors(unet: UNet2DConditionModel) -> dict:
    """HF-EX's processor set for freeze_model='crossattn_kv'."""
    st = unet.state_dict()
    procs = {}
    for name in unet.attn_processors.keys():
        cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        layer = name.split(".processor")[0]
        if cross is not None:
            p = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=hidden, cross_attention_dim=cross)
            p.load_state_dict(
                {
                    "to_k_custom_diffusion.weight": st[layer + ".to_k.weight"],
                    "to_v_custom_diffusion.weight": st[layer + ".to_v.weight"],
                }
            )
            procs[name] = p
        else:
            procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False, hidden_size=None, cross_attention_dim=None)
    return procs


def build(config: str, device: str = "cpu") -> tuple[dict, dict]:
    """The fixture's tensors; `device` other than cpu is for scripts/gpu/reference_drift.py (how far
    the reference itself moves on a GPU), never for the committed fixture."""
    model = os.path.join(pc.REPO_ROOT, "test", "fixtures", "parity", config, "model")
    p = PARAMS[config]
    key = lambda name: f"train_step/{config}/{name}"  # noqa: E731

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoder.to(device)
    vae.to(device)

    base_vocab = len(tokenizer)
    assert tokenizer.add_tokens(MODIFIER) == 1
    new_id = tokenizer.convert_tokens_to_ids(MODIFIER)
    init_id = tokenizer.convert_tokens_to_ids(INITIALIZER)
    assert new_id == base_vocab and init_id != tokenizer.unk_token_id, (new_id, init_id)
    text_encoder.resize_token_embeddings(len(tokenizer))
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        emb[new_id] = emb[init_id]
    init_row = emb[new_id].detach().clone()

    vae.requires_grad_(False)
    unet.requires_grad_(False)
    # transformers 5 drops the `text_model` level (4.x: text_encoder.text_model.encoder, ...).
    tm = getattr(text_encoder, "text_model", text_encoder)
    for m in (tm.encoder, tm.final_layer_norm, tm.embeddings.position_embedding):
        m.requires_grad_(False)
    unet.set_attn_processor(custom_diffusion_processors(unet))
    unet.to(device)
    layers = [(n, m) for n, m in unet.attn_processors.items() if isinstance(m, torch.nn.Module) and m.train_kv]
    # Processor name "X.attn2.processor" ↔ UNet parameter "X.attn2.to_k.weight".
    kv_params = []
    for n, m in layers:
        base = n[: -len(".processor")]
        kv_params.append((base + ".to_k.weight", m.to_k_custom_diffusion.weight))
        kv_params.append((base + ".to_v.weight", m.to_v_custom_diffusion.weight))
    kv_params.sort(key=lambda x: x[0])
    processor_params = [q for _, m in layers for q in m.parameters()]

    optimizer = torch.optim.AdamW(
        itertools.chain(text_encoder.get_input_embeddings().parameters(), processor_params),
        lr=p["learning_rate"],
        betas=BETAS,
        weight_decay=p["weight_decay"],
        eps=EPS,
    )

    inputs: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    n = len(PROMPTS)
    size = 32
    lat = size // 4
    inputs["pixels"] = pc.uniform(key("pixels"), [n, 3, size, size], -1.0, 1.0)
    masks = torch.ones(n, 1, lat, lat)
    masks[0] = 0
    masks[0, :, 1:6, 2:7] = 1  # a pasted-small instance: its mask covers part of the latent
    inputs["masks"] = masks
    ids = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    assert (ids[:INSTANCE_COUNT] == new_id).any(dim=1).all() and not (ids[INSTANCE_COUNT:] == new_id).any()
    inputs["input_ids"] = ids.to(torch.int64)
    inputs["initial_token_row"] = init_row.cpu()

    start = {name: w.detach().cpu().clone() for name, w in kv_params}
    losses, norms = [], []
    for k in range(STEPS):
        vae_noise = pc.randn(key(f"vae_noise.{k}"), [n, 4, lat, lat])
        noise = pc.randn(key(f"noise.{k}"), [n, 4, lat, lat])
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=pc.gen(key(f"timesteps.{k}")))
        inputs[f"vae_noise.{k}"] = vae_noise
        inputs[f"noise.{k}"] = noise
        inputs[f"timesteps.{k}"] = timesteps

        vae_noise, noise, timesteps = vae_noise.to(device), noise.to(device), timesteps.to(device)
        dist = vae.encode(inputs["pixels"].to(device)).latent_dist
        latents = (dist.mean + dist.std * vae_noise) * vae.config.scaling_factor
        noisy = scheduler.add_noise(latents, noise, timesteps)
        context = text_encoder(inputs["input_ids"].to(device))[0]
        pred = unet(noisy, timesteps, context).sample
        if scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = scheduler.get_velocity(latents, noise, timesteps)

        pred_i, pred_p = torch.chunk(pred, 2, dim=0)
        target_i, target_p = torch.chunk(target, 2, dim=0)
        mask = torch.chunk(inputs["masks"].to(device), 2, dim=0)[0]
        loss = F.mse_loss(pred_i.float(), target_i.float(), reduction="none")
        loss = ((loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
        prior = F.mse_loss(pred_p.float(), target_p.float(), reduction="mean")
        loss = loss + p["prior_loss_weight"] * prior
        loss.backward()

        grads = text_encoder.get_input_embeddings().weight.grad
        zero = torch.arange(len(tokenizer), device=grads.device) != new_id
        grads.data[zero, :] = grads.data[zero, :].fill_(0)
        norm = torch.nn.utils.clip_grad_norm_(itertools.chain(text_encoder.parameters(), processor_params), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()

        losses.append(loss.item())
        norms.append(norm.item())
        expected[f"loss.{k}"] = loss.detach().reshape(1).cpu()
        expected[f"grad_norm.{k}"] = norm.detach().reshape(1).cpu()
        for name, w in kv_params:
            expected[f"after.{k}.{name}"] = w.detach().cpu().clone()
        expected[f"after.{k}.{MODIFIER}"] = text_encoder.get_input_embeddings().weight[new_id].detach().cpu().clone()

    params = {
        "freeze_model": "crossattn_kv",
        "learning_rate": p["learning_rate"],
        "adam_beta1": BETAS[0],
        "adam_beta2": BETAS[1],
        "adam_weight_decay": p["weight_decay"],
        "adam_epsilon": EPS,
        "max_grad_norm": MAX_GRAD_NORM,
        "prior_loss_weight": p["prior_loss_weight"],
        "instance_count": INSTANCE_COUNT,
        "steps": STEPS,
        "prompts": PROMPTS,
        "modifier_token": MODIFIER,
        "modifier_token_id": new_id,
        "initializer_token": INITIALIZER,
        "initializer_token_id": init_id,
        "prediction_type": scheduler.config.prediction_type,
        "scaling_factor": vae.config.scaling_factor,
        "kv_names": [nm for nm, _ in kv_params],
        "losses": losses,
        "grad_norms": norms,
    }
    return {"inputs": inputs, "expected": expected, "start": start}, params


def main() -> None:
    configs = sys.argv[1:] or ["sd1", "sd2"]
    os.makedirs(OUT_DIR, exist_ok=True)
    manifest_path = os.path.join(OUT_DIR, "manifest.json")
    manifest = {"generator": "test/parity/make_train_step_reference.py", "configs": {}}
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest["configs"] = json.load(f).get("configs", {})
    manifest["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    for config in configs:
        data, params = build(config)
        tensors = {**data["inputs"], **data["expected"]}
        for k, v in tensors.items():
            assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT_DIR, f"{config}.safetensors"))
        manifest["configs"][config] = {
            "file": f"{config}.safetensors",
            "params": params,
            "inputs": sorted(data["inputs"].keys()),
            "expected": sorted(data["expected"].keys()),
        }
        print(f"{config}: losses {params['losses']}, grad norms {params['grad_norms']}")
    manifest["configs"] = dict(sorted(manifest["configs"].items()))
    pc.write_json(manifest_path, manifest)


if __name__ == "__main__":
    main()
