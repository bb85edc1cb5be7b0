#!/usr/bin/env python3
"""Random-weight Stable Diffusion models with the exact SD1.5 / SD2.1 (768-v) architectures.

    python3 test/parity/make_full_size.py OUT_DIR [--models sd15,sd21] [--no-variant]
                                                  [--main-dtype float16|float32] [--threads N]

Writes, for each model, OUT_DIR/<model>/ as a diffusers folder (model_index.json, unet/,
text_encoder/, vae/, scheduler/, tokenizer/) saved with save_pretrained as safetensors:
main files in --main-dtype (default float16) plus `variant="fp16"` files
(diffusion_pytorch_model.fp16.safetensors, model.fp16.safetensors) unless --no-variant.
Nothing here is committed: a model is ~2.1 GB per copy (SD1.5) / ~2.6 GB (SD2.1).

It then reloads the main files in float32 and records small references into
OUT_DIR/<model>/reference/{reference.safetensors, reference.json}:
  unet.sample [2,4,16,16], unet.timesteps int64 [10, 900], unet.encoder_hidden_states
  [2,77,ctx], unet.out; text.input_ids [2,77] (prompts "a photo of a cat" and ""),
  text.last_hidden_state, text.hidden_states_penultimate (raw hidden_states[-2]);
  vae.image [1,3,64,64] in [-1,1], vae.mean, vae.logvar, vae.latents [1,4,8,8],
  vae.decoded [1,3,64,64].
Weights are random (deterministic, see parity_common.randomize_module_) and rounded to
float16, so the float16 files hold exactly the values the references used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

sys.dont_write_bytecode = True  # keep test/parity/ free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parity_common as pc  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()
diffusers.logging.set_verbosity_error()

_COMMON_UNET = dict(
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
)

_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)

MODELS = {
    "sd15": {
        "unet": dict(
            _COMMON_UNET,
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            use_linear_projection=False,
            upcast_attention=False,
        ),
        "vae": dict(_VAE, sample_size=512),
        # hub config of openai/clip-vit-large-patch14's text tower as shipped in SD1.x
        # (bos/eos/pad ids 0/2/1 are the legacy values of that config)
        "text": dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=768,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        "tokenizer_dir": "clip-tokenizer",
        "pad_token": pc.EOS,
        "scheduler": pc.SD15_SCHEDULER_CONFIG,
    },
    "sd21": {
        "unet": dict(
            _COMMON_UNET,
            sample_size=96,
            cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True,
            upcast_attention=True,
        ),
        "vae": dict(_VAE, sample_size=768),
        # OpenCLIP ViT-H/14 text tower as converted for SD2.x: 23 of its 24 layers
        "text": dict(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=512,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        "tokenizer_dir": "clip-tokenizer-sd2",
        "pad_token": "!",
        "scheduler": pc.SD21_SCHEDULER_CONFIG,
    },
}


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def install_full_tokenizer(dst: str, spec: dict) -> str:
    src = os.path.join(pc.REPO_ROOT, "test", "fixtures", spec["tokenizer_dir"])
    if os.path.isfile(os.path.join(src, "vocab.json")) and os.path.isfile(os.path.join(src, "merges.txt")):
        shutil.copytree(src, dst)
        # the pad token is what distinguishes SD1 from SD2 tokenizers: enforce it
        cfg_path = os.path.join(dst, "tokenizer_config.json")
        pad = None
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                pad = json.load(f).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
        if pad != spec["pad_token"]:
            pc.write_tokenizer_configs(dst, spec["pad_token"])
        return f"test/fixtures/{spec['tokenizer_dir']}"
    vocab, merges = pc.derive_clip_bpe(None)
    pc.write_vocab_merges(dst, vocab, merges)
    pc.write_tokenizer_configs(dst, spec["pad_token"])
    return "derived from open_clip bpe_simple_vocab_16e6.txt.gz (all merges)"


def prefix_text_model(path: str) -> None:
    """transformers 5.x writes CLIPTextModel keys without the hub's 'text_model.' prefix."""
    sd = load_file(path)
    if not all(k.startswith("text_model.") for k in sd):
        sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
        save_file(sd, path, metadata={"format": "pt"})


def build(name: str, spec: dict, out: str, main_dtype: torch.dtype, variant: bool, t0: float) -> None:
    mdir = os.path.join(out, name)
    if os.path.isdir(mdir):
        shutil.rmtree(mdir)
    os.makedirs(mdir)

    for comp, ctor in (
        ("unet", lambda: UNet2DConditionModel(**spec["unet"])),
        ("vae", lambda: AutoencoderKL(**spec["vae"])),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**spec["text"]))),
    ):
        m = ctor()
        pc.randomize_module_(m, f"full/{name}/{comp}")
        log(f"{name}: built {comp} ({sum(p.numel() for p in m.parameters()) / 1e6:.1f}M params)", t0)
        d = os.path.join(mdir, comp)
        m.to(main_dtype).save_pretrained(d, safe_serialization=True)
        if variant:
            m.to(torch.float16).save_pretrained(d, safe_serialization=True, variant="fp16")
        if comp == "text_encoder":
            for f in os.listdir(d):
                if f.endswith(".safetensors"):
                    prefix_text_model(os.path.join(d, f))
        del m
        log(f"{name}: saved {comp}", t0)

    os.makedirs(os.path.join(mdir, "scheduler"))
    pc.write_json(os.path.join(mdir, "scheduler", "scheduler_config.json"), spec["scheduler"])
    tok_src = install_full_tokenizer(os.path.join(mdir, "tokenizer"), spec)
    pc.write_json(
        os.path.join(mdir, "model_index.json"),
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", spec["scheduler"]["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )

    # ---- references, from the saved main files reloaded in float32
    ref: dict[str, torch.Tensor] = {}
    key = f"full/{name}/ref"
    unet = UNet2DConditionModel.from_pretrained(os.path.join(mdir, "unet"), dtype=torch.float32).eval()
    ctx = unet.config.cross_attention_dim
    ref["unet.sample"] = pc.randn(f"{key}/sample", (2, 4, 16, 16))
    ref["unet.timesteps"] = torch.tensor([10, 900], dtype=torch.int64)
    ref["unet.encoder_hidden_states"] = pc.randn(f"{key}/ehs", (2, 77, ctx))
    with torch.no_grad():
        ref["unet.out"] = unet(
            ref["unet.sample"], ref["unet.timesteps"], encoder_hidden_states=ref["unet.encoder_hidden_states"]
        ).sample
    del unet
    log(f"{name}: unet reference", t0)

    tok = CLIPTokenizer.from_pretrained(os.path.join(mdir, "tokenizer"))
    te = CLIPTextModel.from_pretrained(os.path.join(mdir, "text_encoder"), dtype=torch.float32).eval()
    ids = tok(["a photo of a cat", ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ref["text.input_ids"] = ids.input_ids.to(torch.int64)
    with torch.no_grad():
        o = te(ref["text.input_ids"], output_hidden_states=True)
    ref["text.last_hidden_state"] = o.last_hidden_state
    ref["text.hidden_states_penultimate"] = o.hidden_states[-2]
    del te
    log(f"{name}: text encoder reference", t0)

    vae = AutoencoderKL.from_pretrained(os.path.join(mdir, "vae"), dtype=torch.float32).eval()
    ref["vae.image"] = pc.uniform(f"{key}/image", (1, 3, 64, 64), -1.0, 1.0)
    ref["vae.latents"] = pc.randn(f"{key}/latents", (1, 4, 8, 8))
    with torch.no_grad():
        post = vae.encode(ref["vae.image"]).latent_dist
        ref["vae.mean"] = post.mean
        ref["vae.logvar"] = post.logvar
        ref["vae.decoded"] = vae.decode(ref["vae.latents"]).sample
    del vae
    log(f"{name}: vae reference", t0)

    rdir = os.path.join(mdir, "reference")
    os.makedirs(rdir)
    ref = {k: v.detach().contiguous() for k, v in ref.items()}
    save_file(ref, os.path.join(rdir, "reference.safetensors"))
    pc.write_json(
        os.path.join(rdir, "reference.json"),
        {
            "model": name,
            "main_dtype": str(main_dtype).replace("torch.", ""),
            "fp16_variant": variant,
            "tokenizer_source": tok_src,
            "prompts": ["a photo of a cat", ""],
            "versions": {
                "torch": torch.__version__.split("+")[0],
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
            "tensors": {
                k: {
                    "dtype": str(v.dtype).replace("torch.", ""),
                    "shape": list(v.shape),
                    **({"absmax": float(v.abs().max())} if v.is_floating_point() else {}),
                }
                for k, v in ref.items()
            },
        },
    )
    log(f"{name}: done -> {mdir}", t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--models", default="sd15,sd21", help="comma list of: " + ",".join(MODELS))
    ap.add_argument("--no-variant", action="store_true", help='skip the variant="fp16" files')
    ap.add_argument("--main-dtype", choices=["float16", "float32"], default="float16")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = [n for n in a.models.split(",") if n]
    for n in names:
        if n not in MODELS:
            raise SystemExit(f"unknown model {n}")
    os.makedirs(a.out_dir, exist_ok=True)
    t0 = time.time()
    for n in names:
        build(n, MODELS[n], a.out_dir, getattr(torch, a.main_dtype), not a.no_variant, t0)


if __name__ == "__main__":
    main()
