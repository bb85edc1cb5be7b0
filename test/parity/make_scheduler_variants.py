"""Scheduler references beyond the Stable Diffusion defaults: every spacing, prediction type, beta
schedule and solver option the native schedulers implement, run through diffusers.

    python3 test/parity/make_scheduler_variants.py

writes test/fixtures/scheduler-variants/{variants.json, variants.safetensors} (about 80 KB). Each
variant is `Class.from_config(<sd1 hub scheduler config>, **overrides)`, `set_timesteps(steps)`,
then the loop of test/parity/README.md with the same fake model, x_T and c as the parity cases
(read from test/fixtures/parity/sd1/cases/sched_ddpm.safetensors). The noise of step i is that
case's `step.{i % 10}.noise`, so no noise is stored; it is fed through `variance_noise` where diffusers
takes it, else by replacing `randn_tensor` in the scheduler's module (DDPM, Euler, Euler-ancestral).

Stored per variant `<id>`: `<id>.timesteps` (float64), `<id>.sigmas` (float32, where the class has
them), `<id>.final` and `<id>.step0` (the first prev_sample). variants.json lists the class, steps,
overrides, step kwargs and init_noise_sigma. A few `addnoise_*` entries check the σ-based add_noise.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

import diffusers

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "test", "fixtures", "scheduler-variants")
HUB = os.path.join(ROOT, "test", "fixtures", "parity", "sd1", "model", "scheduler", "scheduler_config.json")
CASE = os.path.join(ROOT, "test", "fixtures", "parity", "sd1", "cases", "sched_ddpm.safetensors")

# id, class, steps, from_config overrides, step kwargs
VARIANTS = [
    ("ddpm_linspace_v", "DDPMScheduler", 12, {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}, {}),
    ("ddpm_trailing_sample_clip", "DDPMScheduler", 7,
     {"timestep_spacing": "trailing", "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5}, {}),
    ("ddpm_fixed_small_log_linear", "DDPMScheduler", 10,
     {"variance_type": "fixed_small_log", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, {}),
    ("ddpm_fixed_large_cosine", "DDPMScheduler", 10, {"variance_type": "fixed_large", "beta_schedule": "squaredcos_cap_v2"}, {}),
    ("ddpm_zero_snr_trailing_v", "DDPMScheduler", 10,
     {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, {}),
    ("ddpm_sigmoid", "DDPMScheduler", 10, {"beta_schedule": "sigmoid"}, {}),
    ("ddim_trailing_v_eta05", "DDIMScheduler", 9,
     {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "set_alpha_to_one": True}, {"eta": 0.5}),
    ("ddim_sample_clip", "DDIMScheduler", 10, {"prediction_type": "sample", "clip_sample": True}, {"eta": 0.0}),
    ("ddim_use_clipped", "DDIMScheduler", 10, {"clip_sample": True, "clip_sample_range": 0.8},
     {"eta": 1.0, "use_clipped_model_output": True}),
    ("ddim_linspace_zero_snr_v", "DDIMScheduler", 6,
     {"timestep_spacing": "linspace", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, {"eta": 0.0}),
    ("pndm_prk", "PNDMScheduler", 10, {"skip_prk_steps": False}, {}),
    ("pndm_prk_v_linspace", "PNDMScheduler", 6,
     {"skip_prk_steps": False, "prediction_type": "v_prediction", "timestep_spacing": "linspace"}, {}),
    ("pndm_trailing_v", "PNDMScheduler", 15, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, {}),
    ("pndm_1_step", "PNDMScheduler", 1, {}, {}),
    ("pndm_2_steps", "PNDMScheduler", 2, {}, {}),
    ("pndm_50_steps_alpha_one", "PNDMScheduler", 50, {"set_alpha_to_one": True}, {}),
    ("dpm_order3_20", "DPMSolverMultistepScheduler", 20, {"solver_order": 3}, {}),
    ("dpm_order1", "DPMSolverMultistepScheduler", 8, {"solver_order": 1}, {}),
    ("dpm_heun_v", "DPMSolverMultistepScheduler", 12, {"solver_type": "heun", "prediction_type": "v_prediction"}, {}),
    ("dpm_sde", "DPMSolverMultistepScheduler", 10, {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("dpm_sde_heun_karras", "DPMSolverMultistepScheduler", 15,
     {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "use_karras_sigmas": True}, {}),
    ("dpm_exponential", "DPMSolverMultistepScheduler", 10, {"use_exponential_sigmas": True}, {}),
    ("dpm_lu_lambdas", "DPMSolverMultistepScheduler", 10, {"use_lu_lambdas": True}, {}),
    ("dpm_sigma_min_final_20", "DPMSolverMultistepScheduler", 20, {"final_sigmas_type": "sigma_min", "lower_order_final": False}, {}),
    ("dpm_euler_at_final_16", "DPMSolverMultistepScheduler", 16, {"euler_at_final": True, "final_sigmas_type": "sigma_min"}, {}),
    ("dpm_leading", "DPMSolverMultistepScheduler", 10, {"timestep_spacing": "leading"}, {}),
    ("dpm_trailing_zero_snr_v", "DPMSolverMultistepScheduler", 10,
     {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, {}),
    ("dpm_cosine_lambda_clip", "DPMSolverMultistepScheduler", 10,
     {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, {}),
    ("dpm_order3_karras_25", "DPMSolverMultistepScheduler", 25, {"solver_order": 3, "use_karras_sigmas": True}, {}),
    ("dpm_sample", "DPMSolverMultistepScheduler", 10, {"prediction_type": "sample"}, {}),
    ("euler_karras", "EulerDiscreteScheduler", 12, {"use_karras_sigmas": True}, {}),
    ("euler_karras_minmax", "EulerDiscreteScheduler", 8, {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, {}),
    ("euler_exponential", "EulerDiscreteScheduler", 10, {"use_exponential_sigmas": True}, {}),
    ("euler_leading_v", "EulerDiscreteScheduler", 10, {"timestep_spacing": "leading", "prediction_type": "v_prediction"}, {}),
    ("euler_trailing_sigma_min", "EulerDiscreteScheduler", 10, {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, {}),
    ("euler_log_linear", "EulerDiscreteScheduler", 10, {"interpolation_type": "log_linear"}, {}),
    ("euler_continuous_v", "EulerDiscreteScheduler", 10, {"timestep_type": "continuous", "prediction_type": "v_prediction"}, {}),
    ("euler_churn", "EulerDiscreteScheduler", 10, {}, {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 10.0}),
    ("euler_zero_snr_trailing_v", "EulerDiscreteScheduler", 10,
     {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, {}),
    ("euler_25", "EulerDiscreteScheduler", 25, {}, {}),
    ("euler_sample", "EulerDiscreteScheduler", 10, {"prediction_type": "sample"}, {}),
    ("euler_a_leading_v", "EulerAncestralDiscreteScheduler", 10, {"timestep_spacing": "leading", "prediction_type": "v_prediction"}, {}),
    ("euler_a_trailing_25", "EulerAncestralDiscreteScheduler", 25, {"timestep_spacing": "trailing"}, {}),
    ("euler_a_zero_snr", "EulerAncestralDiscreteScheduler", 8, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, {}),
    ("euler_a_linear_betas", "EulerAncestralDiscreteScheduler", 10,
     {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, {}),
]

# σ-based add_noise: id, class, steps, overrides, schedule positions used as timesteps, begin index (or None)
ADD_NOISE = [
    ("addnoise_euler", "EulerDiscreteScheduler", 10, {}, [0, 3], None),
    ("addnoise_euler_karras", "EulerDiscreteScheduler", 10, {"use_karras_sigmas": True}, [2, 7], None),
    ("addnoise_euler_a_begin", "EulerAncestralDiscreteScheduler", 10, {}, [4, 4], 4),
    ("addnoise_dpm", "DPMSolverMultistepScheduler", 10, {}, [1, 9], None),
]

MODULES = {
    "DDPMScheduler": "diffusers.schedulers.scheduling_ddpm",
    "EulerDiscreteScheduler": "diffusers.schedulers.scheduling_euler_discrete",
    "EulerAncestralDiscreteScheduler": "diffusers.schedulers.scheduling_euler_ancestral_discrete",
}


def main() -> None:
    torch.set_num_threads(1)
    hub = json.load(open(HUB))
    case = load_file(CASE)
    x_T, c = case["x_T"], case["c"]
    noises = [case[f"step.{i}.noise"] for i in range(10)]
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    current = {"i": 0}

    def tapped(shape, generator=None, device=None, dtype=None, layout=None):
        n = noises[current["i"] % 10]
        assert tuple(n.shape) == tuple(shape), (shape, n.shape)
        return n.to(dtype=dtype or torch.float32).clone()

    for vid, cls_name, steps, overrides, kwargs in VARIANTS:
        cls = getattr(diffusers, cls_name)
        s = cls.from_config(hub, **overrides)
        s.set_timesteps(steps)
        mod = importlib.import_module(MODULES[cls_name]) if cls_name in MODULES else None
        saved = mod.randn_tensor if mod else None
        if mod:
            mod.randn_tensor = tapped
        try:
            x = x_T * s.init_noise_sigma
            first = None
            for i, t in enumerate(s.timesteps):
                current["i"] = i
                model_input = s.scale_model_input(x, t)
                out = 0.3 * model_input + (0.01 * (float(t) / 1000.0)) * c
                kw = dict(kwargs)
                if cls_name == "DDIMScheduler" and kw.get("eta", 0) > 0:
                    kw["variance_noise"] = noises[i % 10]
                if cls_name == "DPMSolverMultistepScheduler" and overrides.get("algorithm_type", "").startswith("sde"):
                    kw["variance_noise"] = noises[i % 10]
                x = s.step(out, t, x, **kw).prev_sample
                if first is None:
                    first = x.clone()
        finally:
            if mod:
                mod.randn_tensor = saved
        tensors[f"{vid}.timesteps"] = s.timesteps.to(torch.float64).contiguous()
        if isinstance(getattr(s, "sigmas", None), torch.Tensor) and cls_name not in ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler"):
            tensors[f"{vid}.sigmas"] = s.sigmas.to(torch.float32).contiguous()
        tensors[f"{vid}.final"] = x.contiguous()
        tensors[f"{vid}.step0"] = first.contiguous()
        ins = s.init_noise_sigma
        meta[vid] = {
            "class": cls_name,
            "steps": steps,
            "overrides": overrides,
            "step_kwargs": kwargs,
            "init_noise_sigma": float(ins),
            "noise": "step i uses sched_ddpm step.{i % 10}.noise",
        }

    x0 = torch.cat([x_T, c])
    noise = torch.cat([noises[0], noises[1]])
    for vid, cls_name, steps, overrides, positions, begin in ADD_NOISE:
        s = getattr(diffusers, cls_name).from_config(hub, **overrides)
        s.set_timesteps(steps)
        if begin is not None:
            s.set_begin_index(begin)
        ts = s.timesteps[positions]
        tensors[f"{vid}.timesteps"] = ts.to(torch.float64).contiguous()
        tensors[f"{vid}.noisy"] = s.add_noise(x0, noise, ts).contiguous()
        meta[vid] = {"class": cls_name, "steps": steps, "overrides": overrides, "positions": positions, "begin_index": begin,
                     "inputs": "x0 = cat(x_T, c), noise = cat(step.0.noise, step.1.noise)"}

    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, "variants.safetensors"))
    os.chmod(os.path.join(OUT, "variants.safetensors"), 0o644)
    with open(os.path.join(OUT, "variants.json"), "w") as fh:
        json.dump({"generator": "test/parity/make_scheduler_variants.py",
                   "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
                   "variants": meta}, fh, indent=1)
    print(f"{len(meta)} variants written to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
