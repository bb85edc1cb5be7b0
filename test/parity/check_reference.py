#!/usr/bin/env python3
"""Consistency checks for the committed parity fixtures (test/fixtures/parity/).

    python3 test/parity/check_reference.py

1. every case file holds exactly the tensors its manifest lists (names, dtypes, shapes);
2. reloading each model folder with diffusers / transformers reproduces the stored
   UNet, text-encoder and VAE outputs (so the folder and the references agree);
3. the stochastic schedulers (DDPM, DDIM eta=1, Euler ancestral) and the Euler / DDIM eta=0
   runs are re-derived from the stored tables + noise with plain formulas written here,
   independently of diffusers' scheduler objects. This checks the README's claims about
   the fake model, the scale_model_input placement and the order in which noise is used.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.dont_write_bytecode = True  # keep test/parity/ free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parity_common as pc  # noqa: E402

torch.set_num_threads(1)

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

ROOT = os.path.join(pc.REPO_ROOT, "test", "fixtures", "parity")
failures: list[str] = []


def close(name: str, a: torch.Tensor, b: torch.Tensor, rtol=1e-5, atol=1e-5) -> None:
    scale = max(1.0, float(b.abs().max()))
    err = float((a.double() - b.double()).abs().max())
    if not err <= atol * scale + rtol * scale:
        failures.append(f"{name}: max abs err {err:.3e} (scale {scale:.3g})")


def fake_model(x_in: torch.Tensor, t: float, c: torch.Tensor) -> torch.Tensor:
    return 0.3 * x_in + (0.01 * (t / 1000.0)) * c


def check_files(cfg: str, man: dict) -> None:
    for name, case in man["cases"].items():
        path = os.path.join(ROOT, cfg, case["file"])
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
            listed = dict(case["inputs"], **case["expected"])
            if keys != set(listed):
                failures.append(f"{cfg}/{name}: tensors {sorted(keys ^ set(listed))} not matching manifest")
                continue
            for k, spec in listed.items():
                t = f.get_tensor(k)
                if list(t.shape) != spec["shape"] or str(t.dtype).replace("torch.", "") != spec["dtype"]:
                    failures.append(f"{cfg}/{name}/{k}: shape/dtype mismatch")


def check_models(cfg: str, man: dict) -> None:
    mdir = os.path.join(ROOT, cfg, man["model_dir"])
    unet = UNet2DConditionModel.from_pretrained(os.path.join(mdir, "unet"), dtype=torch.float32).eval()
    for case in ("unet_forward", "unet_forward_float_t", "unet_forward_odd"):
        t = load_file(os.path.join(ROOT, cfg, man["cases"][case]["file"]))
        with torch.no_grad():
            out = unet(t["sample"], t["timesteps"], encoder_hidden_states=t["encoder_hidden_states"]).sample
        close(f"{cfg}/{case}/out", out, t["out"])
    vae = AutoencoderKL.from_pretrained(os.path.join(mdir, "vae"), dtype=torch.float32).eval()
    t = load_file(os.path.join(ROOT, cfg, man["cases"]["vae"]["file"]))
    with torch.no_grad():
        post = vae.encode(t["image"]).latent_dist
        close(f"{cfg}/vae/mean", post.mean, t["mean"])
        close(f"{cfg}/vae/sample", t["mean"] + t["std"] * t["noise"], t["sample"])
        close(f"{cfg}/vae/std", torch.exp(0.5 * t["logvar"].clamp(-30, 20)), t["std"])
        close(f"{cfg}/vae/decoded", vae.decode(t["latents"]).sample, t["decoded"])
    te = CLIPTextModel.from_pretrained(os.path.join(mdir, "text_encoder"), dtype=torch.float32).eval()
    t = load_file(os.path.join(ROOT, cfg, man["cases"]["text_encoder"]["file"]))
    te.resize_token_embeddings(te.config.vocab_size + 1, mean_resizing=False)
    with torch.no_grad():
        te.get_input_embeddings().weight[-1] = t["new_token_row"]
        o = te(t["input_ids"], output_hidden_states=True)
    close(f"{cfg}/text_encoder/last_hidden_state", o.last_hidden_state, t["last_hidden_state"])
    close(f"{cfg}/text_encoder/penultimate", o.hidden_states[-2], t[f"hidden_states.{len(o.hidden_states) - 2}"])


def x0_eps(pred_type: str, x, out, a_t):
    """(x0, eps) from a model output, for an alphas_cumprod value a_t (DDPM/DDIM parameterisation)."""
    if pred_type == "epsilon":
        return (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t), out
    return math.sqrt(a_t) * x - math.sqrt(1 - a_t) * out, math.sqrt(a_t) * out + math.sqrt(1 - a_t) * x


def check_schedulers(cfg: str, man: dict) -> None:
    pred = man["scheduler_config"]["prediction_type"]
    tr = load_file(os.path.join(ROOT, cfg, man["cases"]["ddpm_training"]["file"]))
    ac = tr["alphas_cumprod"].double()
    # training helpers
    a = ac[tr["timesteps"]].view(-1, 1, 1, 1)
    close(f"{cfg}/ddpm_training/noisy", (a.sqrt() * tr["x0"] + (1 - a).sqrt() * tr["noise"]).float(), tr["noisy"])
    close(f"{cfg}/ddpm_training/velocity", (a.sqrt() * tr["noise"] - (1 - a).sqrt() * tr["x0"]).float(), tr["velocity"])
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    close(f"{cfg}/ddpm_training/betas", betas, tr["betas"], rtol=0, atol=0)
    close(f"{cfg}/ddpm_training/alphas_cumprod", torch.cumprod(1.0 - betas, 0), tr["alphas_cumprod"], rtol=0, atol=0)

    for sid in ("ddpm", "ddim_eta0", "ddim_eta1", "euler", "euler_ancestral"):
        case = man["cases"][f"sched_{sid}"]
        t = load_file(os.path.join(ROOT, cfg, case["file"]))
        ts = t["timesteps"]
        x = t["x_T"] * float(t["init_noise_sigma"][0])
        close(f"{cfg}/sched_{sid}/latents_0", x, t["latents_0"], rtol=0, atol=0)
        n = len(ts)
        for i in range(n):
            ti = float(ts[i])
            if sid.startswith("euler"):
                sig, sig_n = float(t["sigmas"][i]), float(t["sigmas"][i + 1])
                x_in = x / math.sqrt(sig**2 + 1)
                close(f"{cfg}/sched_{sid}/step.{i}.model_input", x_in, t[f"step.{i}.model_input"])
                out = fake_model(t[f"step.{i}.model_input"], ti, t["c"])
                x0 = x - sig * out if pred == "epsilon" else out * (-sig / math.sqrt(sig**2 + 1)) + x / (sig**2 + 1)
                d = (x - x0) / sig
                if sid == "euler":
                    x = x + d * (sig_n - sig)
                else:
                    up = math.sqrt(sig_n**2 * (sig**2 - sig_n**2) / sig**2)
                    down = math.sqrt(sig_n**2 - up**2)
                    x = x + d * (down - sig) + t[f"step.{i}.noise"] * up
            else:
                out = fake_model(x, ti, t["c"])
                ti_int = int(ts[i])
                prev = ti_int - 1000 // n
                a_t = float(ac[ti_int])
                x0, eps = x0_eps(pred, x, out, a_t)
                if sid == "ddpm":
                    a_p = float(ac[prev]) if prev >= 0 else 1.0
                    beta = 1 - a_t / a_p
                    mean = (math.sqrt(a_p) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_p) / (1 - a_t)) * x
                    var = max((1 - a_p) / (1 - a_t) * beta, 1e-20)
                    x = mean + math.sqrt(var) * t[f"step.{i}.noise"] if ti_int > 0 else mean
                else:
                    a_p = float(ac[prev]) if prev >= 0 else float(ac[0])  # set_alpha_to_one False
                    eta = 1.0 if sid == "ddim_eta1" else 0.0
                    std = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
                    x = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - std**2) * eps
                    if eta > 0:
                        x = x + std * t[f"step.{i}.noise"]
            close(f"{cfg}/sched_{sid}/step.{i}.model_output", fake_model(
                t[f"step.{i}.model_input"] if f"step.{i}.model_input" in t else t["latents_0"] if i == 0 else t[f"step.{i - 1}.prev_sample"],
                ti, t["c"]), t[f"step.{i}.model_output"])
            close(f"{cfg}/sched_{sid}/step.{i}.prev_sample", x.float(), t[f"step.{i}.prev_sample"], rtol=1e-5, atol=1e-5)
            x = t[f"step.{i}.prev_sample"]  # continue from the reference to avoid drift
        close(f"{cfg}/sched_{sid}/final", x, t["final"], rtol=0, atol=0)


def main() -> None:
    top = json.load(open(os.path.join(ROOT, "manifest.json")))
    for cfg in top["configs"]:
        man = json.load(open(os.path.join(ROOT, cfg, "manifest.json")))
        check_files(cfg, man)
        check_models(cfg, man)
        check_schedulers(cfg, man)
    if failures:
        print("\n".join(failures))
        raise SystemExit(f"{len(failures)} check(s) failed")
    print("all parity fixture checks passed")


if __name__ == "__main__":
    main()
