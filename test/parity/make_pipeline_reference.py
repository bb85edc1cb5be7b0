#!/usr/bin/env python3
"""Whole-generation references for the sampling pipeline (issue 6).

For each tiny fixture model (test/fixtures/parity/{sd1,sd2}/model, written by make_reference.py)
this runs diffusers' StableDiffusionPipeline end to end with given initial latents, guidance 6,
for DDIM, PNDM, DPM-Solver++ (2M) and Euler, and records the decoded image (output_type "pt",
float32, in [0, 1]).  It does the same with a Custom Diffusion delta installed: the reference
writes the delta's K/V weights straight into the UNet and its token row into the text encoder,
because diffusers' own custom-diffusion loader silently drops K/V weights in current versions.

Output (deterministic; torch single-threaded):
  test/fixtures/parity/<cfg>/pipeline/
    delta.safetensors          the delta in this project's format (kind full, token <new1>)
    cases.safetensors          latents.<case>, image.<case>  (float32)
    manifest.json              per case: scheduler class, prompts, steps, guidance, delta or not

Run: python3 test/parity/make_pipeline_reference.py   (a few seconds)
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

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from safetensors.torch import save_file  # noqa: E402

ROOT = os.path.join(pc.REPO_ROOT, "test", "fixtures", "parity")
STEPS = 6
GUIDANCE = 6.0
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
PROMPTS = ["a photo of a cat", "a red dog on the grass"]
NEGATIVE = ["", "blurry"]
DELTA_PROMPT = "a photo of a <new1> cat"


def load(model_dir: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, scheduler_cls, prompts, negatives, latents):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler_config_base)
    with torch.no_grad():
        return pipe(
            prompt=prompts,
            negative_prompt=negatives,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=latents.clone(),
            height=latents.shape[2] * 4,
            width=latents.shape[3] * 4,
            output_type="pt",
        ).images


def make_delta(cfg: str, pipe) -> tuple[dict, dict]:
    """Random trained-looking K/V weights (base + N(0, 0.05²)·rms) and a <new1> token row."""
    tensors = {}
    for name, p in pipe.unet.named_parameters():
        if ".attn2.to_k." in name or ".attn2.to_v." in name:
            noise = pc.randn(f"{cfg}/pipeline/delta/{name}", p.shape) * 0.2 * p.detach().pow(2).mean().sqrt()
            tensors[name] = (p.detach() + noise).contiguous()
    hidden = pipe.text_encoder.config.hidden_size
    token_id = len(pipe.tokenizer)
    tensors["<new1>"] = pc.randn(f"{cfg}/pipeline/delta/<new1>", (hidden,), 0.5)
    metadata = {
        "format": "custom-diffusion-delta",
        "version": "1",
        "kind": "full",
        "freeze_model": "crossattn_kv",
        "dtype": "float32",
        "tokens": json.dumps([{"token": "<new1>", "id": token_id, "initializer": None, "initializer_id": None}]),
    }
    return tensors, metadata


def install_delta(pipe, tensors) -> None:
    params = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for name, w in tensors.items():
            if name.startswith("<"):
                continue
            params[name].copy_(w)
        pipe.tokenizer.add_tokens(["<new1>"])
        token_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
        pipe.text_encoder.get_input_embeddings().weight[token_id] = tensors["<new1>"]


def generate(cfg: str) -> None:
    model_dir = os.path.join(ROOT, cfg, "model")
    out_dir = os.path.join(ROOT, cfg, "pipeline")
    os.makedirs(out_dir, exist_ok=True)
    pipe = load(model_dir)
    pipe.scheduler_config_base = pipe.scheduler.config
    tensors: dict[str, torch.Tensor] = {}
    cases = {}

    def record(name, sched, prompts, negatives, batch, delta):
        latents = pc.randn(f"{cfg}/pipeline/{name}/latents", (batch, 4, 8, 8))
        img = run(pipe, SCHEDULERS[sched], prompts, negatives, latents)
        tensors[f"latents.{name}"] = latents.contiguous()
        tensors[f"image.{name}"] = img.detach().float().contiguous()
        cases[name] = {
            "scheduler": sched,
            "scheduler_class": SCHEDULERS[sched].__name__,
            "prompts": prompts,
            "negative_prompts": negatives,
            "steps": STEPS,
            "guidance_scale": GUIDANCE,
            "delta": delta,
        }

    for sched in SCHEDULERS:
        record(sched, sched, PROMPTS[:1], NEGATIVE[:1], 1, False)
    record("ddim_batch2", "ddim", PROMPTS, NEGATIVE, 2, False)

    delta_tensors, metadata = make_delta(cfg, pipe)
    save_file(delta_tensors, os.path.join(out_dir, "delta.safetensors"), metadata=metadata)
    install_delta(pipe, delta_tensors)
    for sched in ("ddim", "euler"):
        record(f"{sched}_delta", sched, [DELTA_PROMPT], [""], 1, True)

    save_file(tensors, os.path.join(out_dir, "cases.safetensors"))
    pc.write_json(
        os.path.join(out_dir, "manifest.json"),
        {
            "generator": "test/parity/make_pipeline_reference.py",
            "description": "StableDiffusionPipeline(prompt, negative_prompt, num_inference_steps, guidance_scale, "
            "latents=latents.<case>, output_type='pt').images with Scheduler.from_config(the folder's scheduler "
            "config); *_delta cases ran after the delta's K/V weights and <new1> row were written into the models.",
            "cases": cases,
        },
    )
    print(f"{cfg}: {len(cases)} pipeline cases")


if __name__ == "__main__":
    for c in sys.argv[1:] or ["sd1", "sd2"]:
        generate(c)
