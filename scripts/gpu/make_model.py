#!/usr/bin/env python3
"""A random-weight Stable Diffusion 1.5 folder for benchmarks, made in seconds on the device itself.

    python3 scripts/gpu/make_model.py OUT_DIR [--size sd15|tiny] [--device cuda|cpu] [--seed 0]

OUT_DIR becomes a diffusers folder (model_index.json, unet/, text_encoder/, vae/, scheduler/,
tokenizer/) with float16 safetensors, loadable by diffusers' StableDiffusionPipeline and by this
library alike. `sd15` is the exact stable-diffusion-v1-5 architecture (the configs of
test/parity/make_full_size.py: UNet 859.5M, VAE 83.7M, CLIP-L text 123.1M parameters) with the full
CLIP tokenizer of test/fixtures/clip-tokenizer; `tiny` keeps its structure (4 UNet blocks, VAE factor
8, quick_gelu CLIP) at a fraction of the width, for testing the benchmark scripts on a CPU.

Unlike make_full_size.py (bit-reproducible on the CPU, ~45 s), the weights are drawn on `--device`
with a seeded generator of that device: the same variance-preserving scheme (so activations keep
realistic magnitudes), not the same numbers. Nothing is compared against them; they only give both
implementations the same model to time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "test", "parity"))

import parity_common as pc  # noqa: E402
import make_full_size as mfs  # noqa: E402  (the exact SD1.5 configs)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

diffusers.logging.set_verbosity_error()
transformers.logging.set_verbosity_error()

SD15 = mfs.MODELS["sd15"]

TINY = {
    "unet": dict(
        SD15["unet"],
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=32,
        sample_size=8,
    ),
    "vae": dict(SD15["vae"], block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64),
    "text": dict(SD15["text"], hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
}


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """parity_common.randomize_module_'s scheme, drawn on the module's device in one pass."""
    dev = next(module.parameters()).device
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            for p_name, p in mod.named_parameters(recurse=False):
                v = torch.empty(p.shape, dtype=torch.float32, device=dev)
                if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    v.normal_(1.0 if p_name == "weight" else 0.0, 0.1, generator=g)
                elif isinstance(mod, torch.nn.Embedding):
                    v.normal_(0.0, 0.5, generator=g)
                elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)):
                    if p_name == "weight":
                        fan_in = p[0].numel()
                        v.normal_(0.0, fan_in**-0.5, generator=g)
                    else:
                        v.normal_(0.0, 0.05, generator=g)
                else:
                    v.normal_(0.0, 0.1, generator=g)
                p.copy_(v)


def prefix_text_model(path: str) -> None:
    """transformers 5.x writes CLIPTextModel keys without the hub's 'text_model.' prefix."""
    sd = load_file(path)
    if not all(k.startswith("text_model.") for k in sd):
        save_file({(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}, path, metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    spec = SD15 if a.size == "sd15" else TINY
    out = os.path.abspath(a.out_dir)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    t0 = time.time()
    dev = torch.device(a.device)
    params = {}
    for i, (comp, ctor) in enumerate(
        (
            ("unet", lambda: UNet2DConditionModel(**spec["unet"])),
            ("vae", lambda: AutoencoderKL(**spec["vae"])),
            ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**spec["text"]))),
        )
    ):
        with dev:
            m = ctor()
        randomize_(m, a.seed * 10 + i)
        params[comp] = sum(p.numel() for p in m.parameters())
        d = os.path.join(out, comp)
        m.to(device="cpu", dtype=torch.float16).save_pretrained(d, safe_serialization=True)
        if comp == "text_encoder":
            for f in os.listdir(d):
                if f.endswith(".safetensors"):
                    prefix_text_model(os.path.join(d, f))
        del m
    os.makedirs(os.path.join(out, "scheduler"))
    pc.write_json(os.path.join(out, "scheduler", "scheduler_config.json"), SD15["scheduler"])
    mfs.install_full_tokenizer(os.path.join(out, "tokenizer"), SD15)
    pc.write_json(
        os.path.join(out, "model_index.json"),
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", SD15["scheduler"]["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(
        json.dumps(
            {
                "dir": out,
                "size": a.size,
                "device": str(dev),
                "params": params,
                "seconds": round(time.time() - t0, 2),
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
