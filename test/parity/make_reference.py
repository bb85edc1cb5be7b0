#!/usr/bin/env python3
"""Regenerate the committed parity fixtures under test/fixtures/parity/.

    python3 test/parity/make_reference.py            # both configs
    python3 test/parity/make_reference.py sd2        # one config

For each config (sd1, sd2) this builds a tiny random-weight Stable Diffusion pipeline
with diffusers / transformers, saves it as a real diffusers folder (float16 safetensors),
reloads it in float32 and records inputs + expected outputs of the UNet, text encoder,
VAE, schedulers and a whole pipeline run as float32/int64 safetensors files, described
by manifest.json.  The format is documented in test/parity/README.md.

Output is deterministic: every random tensor comes from a generator seeded by the CRC32
of its name, and torch runs single-threaded.  Running the script twice gives identical
bytes (for the same torch / diffusers / transformers versions).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch

sys.dont_write_bytecode = True  # keep test/parity/ free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parity_common as pc  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()
diffusers.logging.set_verbosity_error()

OUT_ROOT = os.path.join(pc.REPO_ROOT, "test", "fixtures", "parity")

# --------------------------------------------------------------------------------------
# configurations

CONFIGS = {
    "sd1": {
        "description": "SD1.x-like: conv proj_in/out, int attention_head_dim (= heads), quick_gelu CLIP, "
        "EOS padding, PNDM scheduler config of stable-diffusion-v1-5, epsilon prediction",
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=4,
            cross_attention_dim=32,
            use_linear_projection=False,
            upcast_attention=False,
        ),
        "text": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="quick_gelu",
        ),
        "pad_token": pc.EOS,
        "scheduler": pc.SD15_SCHEDULER_CONFIG,
    },
    "sd2": {
        "description": "SD2.x-like: linear proj_in/out, per-block attention_head_dim list (= heads per block; "
        "mid block uses the LAST entry, up blocks the reversed list), upcast_attention, gelu CLIP, "
        "'!' padding (id 0), DDIM scheduler config of stable-diffusion-2-1, v_prediction",
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=[2, 4, 8],
            cross_attention_dim=48,
            use_linear_projection=True,
            upcast_attention=True,
        ),
        "text": dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="gelu",
        ),
        "pad_token": "!",
        "scheduler": pc.SD21_SCHEDULER_CONFIG,
    },
}

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16),  # 3 blocks -> 2 downsamplers -> spatial factor 4
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,  # deliberately != the UNet's 8 (and != SD's 32): read it from the config
    sample_size=32,
    scaling_factor=0.18215,
)
VAE_FACTOR = 4
LATENT = 8  # latent side; image side = 32

TE_PROMPTS = ["a photo of a cat", "a <new1> cat playing with a ball"]
PIPE_PROMPT = "a photo of a cat"


# --------------------------------------------------------------------------------------
# case writer


def _spec(t: torch.Tensor, with_stats: bool) -> dict:
    d = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
    if with_stats and t.is_floating_point() and t.numel() > 0:
        d["absmax"] = float(t.abs().max())
    return d


class Case:
    def __init__(self, cfg: str, name: str, description: str):
        self.cfg = cfg
        self.name = name
        self.description = description
        self.params: dict = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.expected: dict[str, torch.Tensor] = {}

    def key(self, tensor_name: str) -> str:
        return f"{self.cfg}/{self.name}/{tensor_name}"

    def randn(self, tensor_name: str, shape, scale: float = 1.0) -> torch.Tensor:
        t = pc.randn(self.key(tensor_name), shape, scale)
        self.inp(tensor_name, t)
        return t

    def inp(self, name: str, t: torch.Tensor) -> None:
        assert name not in self.inputs and name not in self.expected, name
        self.inputs[name] = t.detach().clone().contiguous()

    def exp(self, name: str, t: torch.Tensor) -> None:
        assert name not in self.inputs and name not in self.expected, name
        self.expected[name] = t.detach().clone().contiguous()

    def save(self, cfg_dir: str) -> dict:
        tensors = {}
        for d in (self.inputs, self.expected):
            for k, v in d.items():
                assert v.dtype in (torch.float32, torch.int64), (self.name, k, v.dtype)
                tensors[k] = v
        rel = f"cases/{self.name}.safetensors"
        save_file(tensors, os.path.join(cfg_dir, rel))
        return {
            "file": rel,
            "description": self.description,
            "params": self.params,
            "inputs": {k: _spec(v, False) for k, v in self.inputs.items()},
            "expected": {k: _spec(v, True) for k, v in self.expected.items()},
        }


# --------------------------------------------------------------------------------------
# model folder


def build_model_folder(cfg_name: str, cfg: dict, model_dir: str) -> dict:
    """Create the random-weight diffusers folder; returns info for the manifest."""
    unet = UNet2DConditionModel(**cfg["unet"])
    pc.randomize_module_(unet, f"{cfg_name}/unet")
    vae = AutoencoderKL(**VAE_CONFIG)
    pc.randomize_module_(vae, f"{cfg_name}/vae")

    tok_tmp = model_dir + ".tok_tmp"
    tok_source = pc.install_small_tokenizer(tok_tmp, cfg["pad_token"])
    tokenizer = CLIPTokenizer.from_pretrained(tok_tmp)
    vocab_size = len(tokenizer)

    te_cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg["text"]["hidden_size"],
        **cfg["text"],
    )
    text_encoder = CLIPTextModel(te_cfg)
    pc.randomize_module_(text_encoder, f"{cfg_name}/text_encoder")

    scheduler = PNDMScheduler.from_config(pc.SD15_SCHEDULER_CONFIG)  # placeholder, replaced below
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    snapshot = {
        name: {k: v.detach().clone() for k, v in m.state_dict().items()}
        for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    }
    pipe.to(torch.float16)
    pipe.save_pretrained(model_dir, safe_serialization=True)

    # tokenizer/: hub layout (vocab.json + merges.txt + configs) instead of tokenizer.json
    shutil.rmtree(os.path.join(model_dir, "tokenizer"))
    shutil.move(tok_tmp, os.path.join(model_dir, "tokenizer"))
    # scheduler/: the hub json verbatim (absent keys change from_config() behaviour)
    sched_cfg = dict(cfg["scheduler"])
    pc.write_json(os.path.join(model_dir, "scheduler", "scheduler_config.json"), sched_cfg)
    # text_encoder/: transformers 5.x saves CLIPTextModel keys without the "text_model." prefix that
    # every hub SD checkpoint (and transformers 4.x) uses; restore the hub layout (5.x strips the
    # prefix again on load).
    te_file = os.path.join(model_dir, "text_encoder", "model.safetensors")
    te_sd = load_file(te_file)
    if not all(k.startswith("text_model.") for k in te_sd):
        te_sd = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in te_sd.items()}
        save_file(te_sd, te_file, metadata={"format": "pt"})
    # model_index.json must name the scheduler class the json declares
    mi_path = os.path.join(model_dir, "model_index.json")
    with open(mi_path, encoding="utf-8") as f:
        mi = json.load(f)
    mi["scheduler"] = ["diffusers", sched_cfg["_class_name"]]
    pc.write_json(mi_path, mi)

    return {"tokenizer_source": tok_source, "vocab_size": vocab_size, "snapshot": snapshot}


def load_pipeline(model_dir: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval()
        m.requires_grad_(False)
        for p in m.parameters():
            assert p.dtype == torch.float32
    return pipe


# --------------------------------------------------------------------------------------
# UNet cases


def unet_inputs(case: Case, ctx_dim: int, batch: int = 2, hw=(LATENT, LATENT), timesteps=None, shared=None):
    """sample / timesteps / encoder_hidden_states; `shared` names a key prefix so that several
    cases get bit-identical inputs (their `out` tensors are then identical too)."""
    def r(name, shape):
        t = pc.randn(f"{case.cfg}/{shared}/{name}", shape) if shared else pc.randn(case.key(name), shape)
        case.inp(name, t)
        return t

    sample = r("sample", (batch, 4) + tuple(hw))
    if timesteps is None:
        timesteps = torch.tensor([10, 900], dtype=torch.int64)[:batch]
    case.inp("timesteps", timesteps)
    ehs = r("encoder_hidden_states", (batch, 77, ctx_dim))
    grad_out = r("grad_out", (batch, 4) + tuple(hw)) if shared else None
    return sample, timesteps, ehs, grad_out


def _custom_diffusion_processors(unet, train_q_out: bool) -> dict:
    """diffusers' CustomDiffusionAttnProcessor on every attention layer, as the Custom Diffusion
    training script installs them (attn1: plain; attn2: train_kv, optionally train_q_out), with the
    processor's own weights copied from the layer's weights."""
    attn_mods = {n: m for n, m in unet.named_modules() if n.endswith((".attn1", ".attn2"))}
    procs = {}
    for pname in unet.attn_processors:
        mname = pname[: -len(".processor")]
        m = attn_mods[mname]
        if mname.endswith(".attn2"):
            p = CustomDiffusionAttnProcessor(
                train_kv=True,
                train_q_out=train_q_out,
                hidden_size=m.to_q.out_features,
                cross_attention_dim=m.to_k.in_features,
            )
            with torch.no_grad():
                p.to_k_custom_diffusion.weight.copy_(m.to_k.weight)
                p.to_v_custom_diffusion.weight.copy_(m.to_v.weight)
                if train_q_out:
                    p.to_q_custom_diffusion.weight.copy_(m.to_q.weight)
                    p.to_out_custom_diffusion[0].weight.copy_(m.to_out[0].weight)
                    p.to_out_custom_diffusion[0].bias.copy_(m.to_out[0].bias)
        else:
            p = CustomDiffusionAttnProcessor(
                train_kv=False, train_q_out=False, hidden_size=m.to_q.out_features, cross_attention_dim=None
            )
        procs[pname] = p
    return procs


def unet_cases(cfg_name: str, pipe) -> list[Case]:
    unet = pipe.unet
    ctx = unet.config.cross_attention_dim
    cases = []

    c = Case(cfg_name, "unet_forward", "UNet forward, batch 2, int64 timesteps [10, 900].")
    s, t, e, _ = unet_inputs(c, ctx)
    with torch.no_grad():
        c.exp("out", unet(s, t, encoder_hidden_states=e).sample)
    cases.append(c)

    c = Case(
        cfg_name,
        "unet_forward_float_t",
        "UNet forward with ONE float32 timestep (shape [1], value 537.25) broadcast over the batch of 2.",
    )
    s, t, e, _ = unet_inputs(c, ctx, timesteps=torch.tensor([537.25], dtype=torch.float32))
    with torch.no_grad():
        c.exp("out", unet(s, t, encoder_hidden_states=e).sample)
    cases.append(c)

    c = Case(
        cfg_name,
        "unet_forward_odd",
        "UNet forward on a 6x10 latent (not divisible by 4): down 6x10 -> 3x5 -> 2x3; each upsampler "
        "interpolates (mode 'nearest') to the spatial size of the skip it is concatenated with next "
        "(2x3 -> 3x5 -> 6x10).",
    )
    s, t, e, _ = unet_inputs(c, ctx, batch=1, hw=(6, 10), timesteps=torch.tensor([500], dtype=torch.int64))
    with torch.no_grad():
        c.exp("out", unet(s, t, encoder_hidden_states=e).sample)
    cases.append(c)

    attn2_names = [n for n, _ in unet.named_parameters() if ".attn2." in n]
    kv_names = [n for n in attn2_names if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    params = dict(unet.named_parameters())

    # ---- plain diffusers attention: gradients of all attn2 parameters
    c = Case(
        cfg_name,
        "unet_backward",
        "loss = sum(out * grad_out) with plain diffusers attention; gradients of every attn2 parameter "
        "(to_q.weight, to_k.weight, to_v.weight, to_out.0.weight, to_out.0.bias) and of "
        "encoder_hidden_states. A parameter's gradient does not depend on which other parameters require "
        "grad, so freeze_model='crossattn_kv' checks params.kv_params and freeze_model='crossattn' checks "
        "params.crossattn_params. Inputs are identical to unet_backward_bos_detach.",
    )
    s, t, e, g_out = unet_inputs(c, ctx, shared="unet_backward_inputs")
    for n in attn2_names:
        params[n].requires_grad_(True)
        params[n].grad = None
    e = e.clone().requires_grad_(True)
    out = unet(s, t, encoder_hidden_states=e).sample
    (out * g_out).sum().backward()
    c.exp("out", out)
    for n in attn2_names:
        c.exp(f"grad.{n}", params[n].grad)
        params[n].requires_grad_(False)
        params[n].grad = None
    c.exp("grad.encoder_hidden_states", e.grad)
    c.params.update({"kv_params": kv_names, "crossattn_params": attn2_names})
    cases.append(c)

    # ---- Custom Diffusion training attention: K/V rows of token 0 (BOS) detached in attn2
    c = Case(
        cfg_name,
        "unet_backward_bos_detach",
        "Same inputs as unet_backward, but every attention layer runs diffusers' CustomDiffusionAttnProcessor "
        "(the Custom Diffusion training attention): in attn2 the key/value rows of token 0 are detached "
        "(k = m*k + (1-m)*k.detach() with m = 0 at position 0, same for v). The forward output is unchanged; "
        "no gradient flows through K/V of position 0, so grad.encoder_hidden_states[:, 0] is exactly 0. "
        "Gradients of attn2 to_k/to_v weights (reported under their plain diffusers names) and of "
        "encoder_hidden_states. to_q / to_out gradients are unaffected by the detach and equal those in "
        "unet_backward (checked by the generator).",
    )
    s, t, e, g_out = unet_inputs(c, ctx, shared="unet_backward_inputs")
    old_procs = unet.attn_processors
    procs = _custom_diffusion_processors(unet, train_q_out=True)
    unet.set_attn_processor(dict(procs))  # set_attn_processor pops from the dict it is given
    mapping = {}
    for pname, p in procs.items():
        base = pname[: -len(".processor")]
        if not base.endswith(".attn2"):
            continue
        own = dict(p.named_parameters())
        for a, b in (
            ("to_k_custom_diffusion.weight", "to_k.weight"),
            ("to_v_custom_diffusion.weight", "to_v.weight"),
            ("to_q_custom_diffusion.weight", "to_q.weight"),
            ("to_out_custom_diffusion.0.weight", "to_out.0.weight"),
            ("to_out_custom_diffusion.0.bias", "to_out.0.bias"),
        ):
            own[a].requires_grad_(True)
            mapping[f"{base}.{b}"] = own[a]
    assert sorted(mapping) == sorted(attn2_names)
    e = e.clone().requires_grad_(True)
    out = unet(s, t, encoder_hidden_states=e).sample
    (out * g_out).sum().backward()
    unet.set_attn_processor(dict(old_procs))
    plain = cases[-1]
    torch.testing.assert_close(out, plain.expected["out"], rtol=1e-5, atol=1e-5)
    for n in attn2_names:
        if n not in kv_names:
            torch.testing.assert_close(mapping[n].grad, plain.expected[f"grad.{n}"], rtol=1e-4, atol=1e-5)
    c.exp("out", out)
    for n in kv_names:
        c.exp(f"grad.{n}", mapping[n].grad)
    c.exp("grad.encoder_hidden_states", e.grad)
    assert float(e.grad[:, 0].abs().max()) == 0.0
    c.params.update({"kv_params": kv_names})
    cases.append(c)
    return cases


# --------------------------------------------------------------------------------------
# text encoder


def text_encoder_case(cfg_name: str, pipe) -> Case:
    tok = CLIPTokenizer.from_pretrained(os.path.join(pipe._parity_dir, "tokenizer"))
    te = CLIPTextModel.from_pretrained(os.path.join(pipe._parity_dir, "text_encoder"), dtype=torch.float32)
    te.eval()
    c = Case(
        cfg_name,
        "text_encoder",
        "CLIP text encoder on two prompts tokenised by the folder's tokenizer after "
        "tokenizer.add_tokens('<new1>') (id = vocab_size) and resize_token_embeddings(vocab_size + 1) "
        "with row vocab_size set to new_token_row. No attention mask (as in SD).",
    )
    n_added = tok.add_tokens("<new1>")
    assert n_added == 1
    new_id = tok.convert_tokens_to_ids("<new1>")
    assert new_id == te.config.vocab_size
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    row = c.randn("new_token_row", (te.config.hidden_size,), 0.5)
    with torch.no_grad():
        te.get_input_embeddings().weight[new_id] = row
    ids = tok(TE_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    c.inp("input_ids", ids.to(torch.int64))
    with torch.no_grad():
        o = te(ids, output_hidden_states=True)
    c.exp("last_hidden_state", o.last_hidden_state)
    for i, h in enumerate(o.hidden_states):
        c.exp(f"hidden_states.{i}", h)
    with torch.no_grad():
        # transformers 5.x flattened CLIPTextModel (no .text_model); diffusers' own clip_skip code
        # (text_encoder.text_model.final_layer_norm) therefore fails with it - do the same by hand.
        fln = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
        c.exp("clip_skip_1", fln(o.hidden_states[-2]))
    c.params.update(
        {
            "prompts": TE_PROMPTS,
            "added_token": "<new1>",
            "added_token_id": new_id,
            "pad_token_id": tok.pad_token_id,
            "num_hidden_layers": te.config.num_hidden_layers,
            "hidden_states_note": "hidden_states.0 = token+position embeddings; hidden_states.i = output of "
            "encoder layer i (before final_layer_norm); last_hidden_state = final_layer_norm(hidden_states.N); "
            "clip_skip_1 = final_layer_norm(hidden_states.(N-1)) = diffusers encode_prompt(clip_skip=1)",
        }
    )
    return c


# --------------------------------------------------------------------------------------
# VAE


def vae_case(cfg_name: str, pipe) -> Case:
    vae = pipe.vae
    c = Case(
        cfg_name,
        "vae",
        "AutoencoderKL: encode(image) posterior (mean/logvar/std after the logvar clamp to [-30, 20]), "
        "sample = mean + std * noise; decoded = decode(latents) with latents used as-is (no scaling_factor).",
    )
    side = LATENT * VAE_FACTOR
    img = pc.uniform(c.key("image"), (2, 3, side, side), -1.0, 1.0)
    c.inp("image", img)
    noise = c.randn("noise", (2, 4, LATENT, LATENT))
    lat = c.randn("latents", (2, 4, LATENT, LATENT))
    with torch.no_grad():
        post = vae.encode(img).latent_dist
        c.exp("mean", post.mean)
        c.exp("logvar", post.logvar)
        c.exp("std", post.std)
        c.exp("sample", post.mean + post.std * noise)
        c.exp("decoded", vae.decode(lat).sample)
    c.params.update({"scaling_factor": vae.config.scaling_factor, "spatial_factor": VAE_FACTOR})
    return c


# --------------------------------------------------------------------------------------
# schedulers

import diffusers.schedulers.scheduling_ddpm as _m_ddpm  # noqa: E402
import diffusers.schedulers.scheduling_euler_ancestral_discrete as _m_eula  # noqa: E402
import diffusers.schedulers.scheduling_euler_discrete as _m_eul  # noqa: E402


class NoiseTap:
    """Replaces `randn_tensor` inside scheduler modules; returns named deterministic noise."""

    def __init__(self, case: Case, store: bool):
        self.case = case
        self.store = store
        self.step = None
        self.calls_this_step = 0
        self.saved = {}

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert self.step is not None
        assert self.calls_this_step == 0, "more than one noise draw in a step"
        self.calls_this_step += 1
        name = f"step.{self.step}.noise"
        t = pc.randn(self.case.key(name), tuple(shape))
        if self.store:
            self.case.inp(name, t)
        return t.to(dtype or torch.float32)


SCHEDULER_RUNS = [
    # id, class, steps, extra from_config kwargs, ddim eta, module whose randn_tensor is tapped, store noise
    ("ddpm", DDPMScheduler, 10, {}, None, _m_ddpm, True),
    ("ddim_eta0", DDIMScheduler, 10, {}, 0.0, None, False),
    ("ddim_eta1", DDIMScheduler, 10, {}, 1.0, None, True),
    ("pndm", PNDMScheduler, 10, {}, None, None, False),
    ("dpmpp_2m", DPMSolverMultistepScheduler, 10, {}, None, None, False),
    ("dpmpp_2m_25", DPMSolverMultistepScheduler, 25, {}, None, None, False),
    ("dpmpp_2m_karras", DPMSolverMultistepScheduler, 10, {"use_karras_sigmas": True}, None, None, False),
    ("euler", EulerDiscreteScheduler, 10, {}, None, _m_eul, False),
    ("euler_ancestral", EulerAncestralDiscreteScheduler, 10, {}, None, _m_eula, True),
]


def _clean_config(cfg) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items() if k != "_use_default_values"}


def scheduler_cases(cfg_name: str, pipe) -> list[Case]:
    base_cfg = pipe.scheduler.config
    cases = []
    for sid, cls, steps, extra, eta, tap_mod, store_noise in SCHEDULER_RUNS:
        c = Case(cfg_name, f"sched_{sid}", "")
        sched = cls.from_config(base_cfg, **extra)
        sched.set_timesteps(steps)
        x_T = pc.randn(f"{cfg_name}/sched/x_T", (1, 4, LATENT, LATENT))
        cc = pc.randn(f"{cfg_name}/sched/c", (1, 4, LATENT, LATENT))
        c.inp("x_T", x_T)
        c.inp("c", cc)
        c.exp("timesteps", sched.timesteps)
        if hasattr(sched, "sigmas") and isinstance(getattr(sched, "sigmas"), torch.Tensor):
            c.exp("sigmas", sched.sigmas.to(torch.float32))
        ins = sched.init_noise_sigma
        ins_t = torch.as_tensor(ins, dtype=torch.float32).reshape(1)
        c.exp("init_noise_sigma", ins_t)
        x = x_T * ins
        c.exp("latents_0", x)

        tap = NoiseTap(c, store_noise) if tap_mod is not None else None
        saved_fn = tap_mod.randn_tensor if tap_mod is not None else None
        if tap_mod is not None:
            tap_mod.randn_tensor = tap
        try:
            for i, t in enumerate(sched.timesteps):
                if tap is not None:
                    tap.step, tap.calls_this_step = i, 0
                xin = sched.scale_model_input(x, t)
                eps = 0.3 * xin + (0.01 * (float(t) / 1000.0)) * cc
                kw = {}
                if eta is not None:
                    kw["eta"] = eta
                    if eta > 0:
                        noise = c.randn(f"step.{i}.noise", x.shape)
                        kw["variance_noise"] = noise
                out = sched.step(eps, t, x, **kw)
                if not torch.equal(xin, x):  # stored only where scale_model_input is not the identity
                    c.exp(f"step.{i}.model_input", xin)
                c.exp(f"step.{i}.model_output", eps)
                x = out.prev_sample
                c.exp(f"step.{i}.prev_sample", x)
        finally:
            if tap_mod is not None:
                tap_mod.randn_tensor = saved_fn
        c.exp("final", x)
        noise_steps = sorted(int(k.split(".")[1]) for k in c.inputs if k.endswith(".noise"))
        c.description = (
            f"{cls.__name__}.from_config(pipeline scheduler config"
            + (f", {extra}" if extra else "")
            + f"), set_timesteps({steps}); latents_0 = x_T * init_noise_sigma; for each i, t = timesteps[i]: "
            "model_input = scale_model_input(x, t); model_output = 0.3 * model_input + (0.01 * (t / 1000)) * c; "
            "x = step(model_output, t, x"
            + (f", eta={eta}" + (", variance_noise=step.i.noise" if eta and eta > 0 else "") if eta is not None else "")
            + ").prev_sample."
        )
        c.params.update(
            {
                "scheduler_class": cls.__name__,
                "num_inference_steps": steps,
                "num_loop_steps": len(sched.timesteps),
                "init_noise_sigma": float(ins_t[0]),
                "eta": eta,
                "noise_steps": noise_steps,
                "effective_config": _clean_config(sched.config),
            }
        )
        cases.append(c)

    # DDPM training helpers
    c = Case(
        cfg_name,
        "ddpm_training",
        "DDPMScheduler.from_config(pipeline scheduler config): betas / alphas_cumprod tables (float32) and "
        "the training helpers noisy = add_noise(x0, noise, timesteps), velocity = get_velocity(x0, noise, "
        "timesteps); target = noise for epsilon, velocity for v_prediction.",
    )
    ddpm = DDPMScheduler.from_config(base_cfg)
    x0 = c.randn("x0", (4, 4, LATENT, LATENT))
    noise = c.randn("noise", (4, 4, LATENT, LATENT))
    ts = torch.tensor([0, 1, 500, 999], dtype=torch.int64)
    c.inp("timesteps", ts)
    c.exp("betas", ddpm.betas.to(torch.float32))
    c.exp("alphas_cumprod", ddpm.alphas_cumprod.to(torch.float32))
    c.exp("noisy", ddpm.add_noise(x0, noise, ts))
    vel = ddpm.get_velocity(x0, noise, ts)
    c.exp("velocity", vel)
    pt = ddpm.config.prediction_type
    c.exp("target", noise if pt == "epsilon" else vel)
    c.params.update({"prediction_type": pt, "effective_config": _clean_config(ddpm.config)})
    cases.append(c)
    return cases


# --------------------------------------------------------------------------------------
# whole pipeline


def pipeline_case(cfg_name: str, pipe) -> Case:
    c = Case(cfg_name, "pipeline", "")
    steps, guidance = 4, 6.0
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = c.randn("latents", (1, 4, LATENT, LATENT))
    tok = pipe.tokenizer
    c.inp("prompt_ids", tok([PIPE_PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids)
    c.inp("negative_prompt_ids", tok([""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids)
    with torch.no_grad():
        pe, npe = pipe.encode_prompt(PIPE_PROMPT, torch.device("cpu"), 1, True, "")
    c.exp("prompt_embeds", pe)
    c.exp("negative_prompt_embeds", npe)

    unet_calls = []

    def hook(_m, args, kwargs, output):
        unet_calls.append((args[0].detach().clone(), args[1], output[0].detach().clone()))

    h = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    step_latents = []

    def cb(_p, i, t, kw):
        step_latents.append(kw["latents"].detach().clone())
        return kw

    try:
        with torch.no_grad():
            img = pipe(
                prompt=PIPE_PROMPT,
                negative_prompt="",
                num_inference_steps=steps,
                guidance_scale=guidance,
                latents=latents.clone(),
                height=LATENT * VAE_FACTOR,
                width=LATENT * VAE_FACTOR,
                output_type="pt",
                callback_on_step_end=cb,
            ).images
    finally:
        h.remove()
    c.exp("timesteps", pipe.scheduler.timesteps)
    assert len(unet_calls) == steps
    for i, (xin, t, out) in enumerate(unet_calls):
        c.exp(f"step.{i}.unet_input", xin)
        c.exp(f"step.{i}.unet_output", out)
        c.exp(f"step.{i}.latents", step_latents[i])
    with torch.no_grad():
        c.exp("decoded", pipe.vae.decode(step_latents[-1] / pipe.vae.config.scaling_factor).sample)
    c.exp("image", img)
    c.description = (
        f"StableDiffusionPipeline(prompt={PIPE_PROMPT!r}, negative_prompt='', guidance_scale={guidance}, "
        f"num_inference_steps={steps}, latents=latents, output_type='pt') with "
        "DDIMScheduler.from_config(pipeline scheduler config), eta 0. unet batch = [uncond, cond]; "
        "noise_pred = u + g * (c - u); step.i.latents = latents after step i; decoded = vae.decode(step.3.latents / "
        "scaling_factor); image = clamp(decoded / 2 + 0.5, 0, 1)."
    )
    c.params.update(
        {
            "prompt": PIPE_PROMPT,
            "negative_prompt": "",
            "guidance_scale": guidance,
            "num_inference_steps": steps,
            "eta": 0.0,
            "height": LATENT * VAE_FACTOR,
            "width": LATENT * VAE_FACTOR,
            "scheduler_effective_config": _clean_config(pipe.scheduler.config),
        }
    )
    return c


# --------------------------------------------------------------------------------------


def generate(cfg_name: str) -> None:
    cfg = CONFIGS[cfg_name]
    cfg_dir = os.path.join(OUT_ROOT, cfg_name)
    if os.path.isdir(cfg_dir):
        shutil.rmtree(cfg_dir)
    os.makedirs(os.path.join(cfg_dir, "cases"))
    model_dir = os.path.join(cfg_dir, "model")
    info = build_model_folder(cfg_name, cfg, model_dir)

    pipe = load_pipeline(model_dir)
    pipe._parity_dir = model_dir

    # the reloaded float32 weights must equal the randomised (fp16-rounded) ones
    for comp, ref in info.pop("snapshot").items():
        got = getattr(pipe, comp).state_dict()
        assert sorted(got) == sorted(ref), comp
        for k, v in ref.items():
            assert got[k].dtype == torch.float32 and torch.equal(got[k], v), (comp, k)

    cases = []
    cases += unet_cases(cfg_name, pipe)
    cases.append(text_encoder_case(cfg_name, pipe))
    cases.append(vae_case(cfg_name, pipe))
    cases += scheduler_cases(cfg_name, pipe)
    cases.append(pipeline_case(cfg_name, pipe))

    manifest = {
        "config": cfg_name,
        "description": cfg["description"],
        "model_dir": "model",
        "weights_dtype": "float16",
        "weights_note": "model/ weights are float16 safetensors; load and upcast to float32. All references "
        "were computed in float32 from exactly these (upcast) values.",
        "tokenizer_source": info["tokenizer_source"],
        "vocab_size": info["vocab_size"],
        "unet_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg["unet"].items()},
        "text_encoder_config": dict(cfg["text"], vocab_size=info["vocab_size"], max_position_embeddings=77),
        "vae_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in VAE_CONFIG.items()},
        "vae_spatial_factor": VAE_FACTOR,
        "scheduler_config": cfg["scheduler"],
        "cases": {},
    }
    for c in cases:
        manifest["cases"][c.name] = c.save(cfg_dir)
    pc.write_json(os.path.join(cfg_dir, "manifest.json"), manifest)
    print(f"{cfg_name}: {len(cases)} cases")


def main(argv: list[str]) -> None:
    names = argv or list(CONFIGS)
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"unknown config {n}; choose from {list(CONFIGS)}")
    os.makedirs(OUT_ROOT, exist_ok=True)
    for n in names:
        generate(n)
    pc.write_json(
        os.path.join(OUT_ROOT, "manifest.json"),
        {
            "generator": "test/parity/make_reference.py",
            "format": "see test/parity/README.md",
            "versions": {
                "torch": torch.__version__.split("+")[0],
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
            "configs": list(CONFIGS),
        },
    )


if __name__ == "__main__":
    main(sys.argv[1:])
