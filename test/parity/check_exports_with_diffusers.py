"""Loads the files exportDelta writes with the real tools' loaders (diffusers from the package registry),
for test/delta/export.test.ts. Needs diffusers and transformers; the test skips without them.

  python3 check_exports_with_diffusers.py MODEL_DIR DELTA_FILE ATTN_PROCS_DIR ATTN_PROCS_BIN_DIR DELTA_BIN LORA_DIR

MODEL_DIR is the diffusers folder the delta belongs to, DELTA_FILE our safetensors delta (full kind)
with the expected weights and token rows. Prints JSON with one entry per check:
  attn_procs[_bin]: unet.load_attn_procs(...) installs CustomDiffusionAttnProcessors whose K/V
      weights equal the delta's, and pipe.load_textual_inversion(dir, weight_name=<token>.*) adds the
      token with the delta's row;
  delta_bin: the original repository's CustomDiffusionPipeline.load_model logic (copy
      st['unet'][name] into every attn2 to_k/to_v parameter, add the modifier tokens) finds every
      name and shape in the real UNet;
  lora: diffusers' kohya converter maps every key onto a UNet Linear with matching shapes, and
      load_textual_inversion(embeddings/<trigger>.safetensors, token=...) loads the embedding.
"""
import glob
import json
import os
import sys

import torch
from safetensors.torch import load_file

from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from diffusers.utils import convert_unet_state_dict_to_peft


def main(model_dir, delta_file, procs_dir, procs_bin_dir, delta_bin, lora_dir):
    delta = load_file(delta_file)
    kv = {k: v for k, v in delta.items() if ".attn2." in k}
    tokens = {k: v for k, v in delta.items() if k.startswith("<")}
    out = {}

    for label, d, ext in (("attn_procs", procs_dir, "safetensors"), ("attn_procs_bin", procs_bin_dir, "bin")):
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
        res = {"error": None}
        try:
            pipe.unet.load_attn_procs(d, weight_name=f"pytorch_custom_diffusion_weights.{ext}", _pipeline=pipe)
            procs = pipe.unet.attn_processors
            worst = 0.0
            n = 0
            for name, w in kv.items():
                prefix, param = name.rsplit(".attn2.", 1)
                p = procs[f"{prefix}.attn2.processor"]
                assert isinstance(p, CustomDiffusionAttnProcessor), type(p).__name__
                got = getattr(p, f"{param.split('.')[0]}_custom_diffusion").weight
                worst = max(worst, float((got.detach() - w).abs().max()))
                n += 1
            res["layers"] = n
            res["max_abs_diff"] = worst
        except Exception as e:  # report, do not hide
            res["error"] = f"{type(e).__name__}: {e}"
        rows = {}
        for tok, row in tokens.items():
            pipe.load_textual_inversion(d, weight_name=f"{tok}.{ext}")
            tid = pipe.tokenizer.convert_tokens_to_ids(tok)
            got = pipe.text_encoder.get_input_embeddings().weight[tid].detach()
            # The text encoder keeps its dtype (the fixture's is float16): compare with the row in it.
            rows[tok] = {"id": tid, "max_abs_diff": float((got - row.to(got.dtype)).abs().max())}
        res["tokens"] = rows
        out[label] = res

    # The original repository's load_model (src/diffusers_model_pipeline.py): copy into attn2 to_k/to_v.
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    st = torch.load(delta_bin, weights_only=True)
    params = dict(pipe.unet.named_parameters())
    missing, bad_shape, copied = [], [], 0
    for name, p in params.items():
        if "attn2.to_k" in name or "attn2.to_v" in name:
            if name not in st["unet"]:
                missing.append(name)
            elif st["unet"][name].shape != p.shape:
                bad_shape.append(name)
            else:
                p.data.copy_(st["unet"][name])
                copied += 1
    out["delta_bin"] = {"copied": copied, "missing": missing, "bad_shape": bad_shape,
                        "extra": sorted(set(st["unet"]) - set(params)), "tokens": list(st["modifier_token"].keys())}

    # LoRA: diffusers' converter for kohya files, then the target modules must exist with these shapes.
    lora_file = [f for f in glob.glob(os.path.join(lora_dir, "*.safetensors"))][0]
    sd = load_file(lora_file)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(sd))
    assert all(k.startswith("unet.") for k in converted), list(converted)
    # What load_lora_weights does next: processor-style keys -> PEFT keys on the UNet's modules.
    peft = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in converted.items()})
    modules = dict(pipe.unet.named_modules())
    unmatched = []
    for key, t in peft.items():
        mod, kind = key.rsplit(".lora_", 1)
        m = modules.get(mod)
        ok = isinstance(m, torch.nn.Linear) and (
            (kind == "A.weight" and t.shape[1] == m.in_features) or (kind == "B.weight" and t.shape[0] == m.out_features)
        )
        if not ok:
            unmatched.append(key)
    emb = {}
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    meta_tokens = json.loads(__import__("safetensors").safe_open(lora_file, "pt").metadata()["custom_diffusion"])["tokens"]
    for t in meta_tokens:
        pipe.load_textual_inversion(os.path.join(lora_dir, t["embedding"]), token=t["token"])
        tid = pipe.tokenizer.convert_tokens_to_ids(t["token"])
        got = pipe.text_encoder.get_input_embeddings().weight[tid].detach()
        emb[t["token"]] = float((got - tokens[t["token"]].to(got.dtype)).abs().max())
    out["lora"] = {"converted": len(peft), "alphas": sorted(set(alphas.values())), "unmatched": unmatched, "embeddings": emb}
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:7])
