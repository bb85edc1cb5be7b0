"""Float64 reference of Custom Diffusion's closed-form multi-concept merge on the tiny SD1 fixture.

Written from the paper's mathematics (and docs method-facts §3), independently of the TypeScript/C++
code: embeddings with transformers' CLIPTextModel, the closed form with numpy.linalg.solve in float64.

Writes test/fixtures/compose/:
  concept1.safetensors, concept2.safetensors  two single-concept deltas in our delta format (full K/V
                                              weights = W0 + perturbation, one token row `<new1>`)
  reg_captions.txt                            the regularisation captions
  reference.safetensors                       inputs and expected outputs:
      kt.c1, kt.c2        target rows of each concept (after the row-selection rule)
      kreg                regularisation rows
      merged.<layer>      merged weights (float64)
      token.<new1>, token.<new2>  the merged delta's token rows
  manifest.json                               prompts, categories, ids, diagnostics

Run: python3 test/parity/make_compose_reference.py
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from parity_common import REPO_ROOT, randn

MODEL = os.path.join(REPO_ROOT, "test", "fixtures", "parity", "sd1", "model")
OUT = os.path.join(REPO_ROOT, "test", "fixtures", "compose")

CATEGORIES = ["cat", "wooden pot"]
REG_CAPTIONS = [
    "a photo of a dog running on the beach",
    "a bowl of fruit on a wooden table",
    "a red car parked in front of a house",
    "people walking in a busy city street",
    "a painting of a mountain lake at sunset",
    "a man riding a bicycle in the park",
    "two birds sitting on a branch",
    "a plate of pasta with tomato sauce",
    "a train crossing a bridge over a river",
    "a child playing with a ball in the garden",
]


def fingerprint(kv: dict[str, torch.Tensor], emb_shape) -> str:
    h = hashlib.sha256()
    for name in sorted(kv):
        t = kv[name].to(torch.float32).contiguous()
        h.update(f"{name}\n{t.shape[0]}x{t.shape[1]}\n".encode())
        h.update(t.numpy().astype("<f4").tobytes())
    h.update(f"text_encoder.token_embedding {emb_shape[0]}x{emb_shape[1]}\n".encode())
    return h.hexdigest()


def rows_of(prompt: str, tok: CLIPTokenizer, model: CLIPTextModel) -> np.ndarray:
    # DF variant: no padding, truncation at 77, last hidden state; drop BOS, or positions 0-3 when
    # "photo of a" lies in the first 15 characters; keep through the first EOS (inclusive).
    ids = tok(prompt, padding="do_not_pad", truncation=True, max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h = model(ids).last_hidden_state[0].to(torch.float64).numpy()
    start = 4 if "photo of a" in prompt[:15] else 1
    eos = ids[0].tolist().index(tok.eos_token_id, 1)
    return h[start : eos + 1]


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    unet = load_file(os.path.join(MODEL, "unet", "diffusion_pytorch_model.safetensors"))
    kv = {k: v.to(torch.float32) for k, v in unet.items() if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    model = CLIPTextModel.from_pretrained(os.path.join(MODEL, "text_encoder"), dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(os.path.join(MODEL, "tokenizer"))
    vocab = model.get_input_embeddings().weight.shape
    fp = fingerprint(kv, vocab)

    # Two single-concept deltas, each trained with its own `<new1>`.
    deltas = []
    for c, cat in enumerate(CATEGORIES, start=1):
        tensors = {n: (w + randn(f"compose/c{c}/{n}", w.shape, 0.05)).contiguous() for n, w in kv.items()}
        row = randn(f"compose/c{c}/token", [vocab[1]], 1.0)
        tensors["<new1>"] = row
        meta = {
            "format": "custom-diffusion-delta",
            "version": "1",
            "kind": "full",
            "freeze_model": "crossattn_kv",
            "tokens": json.dumps([{"token": "<new1>", "id": vocab[0], "initializer": None, "initializer_id": None}]),
            "base_model_fingerprint": fp,
            "base_model_fingerprint_algorithm": "custom-diffusion-kv-sha256/1",
            "base_model": json.dumps({"tokenEmbeddingShape": list(vocab)}),
            "dtype": "float32",
            "training_options": json.dumps({"synthetic": True, "category": cat}),
        }
        save_file(tensors, os.path.join(OUT, f"concept{c}.safetensors"), metadata=meta)
        deltas.append(tensors)

    # The merged vocabulary: <new1> (concept 1) and <new2> (concept 2) appended in path order.
    tok.add_tokens(["<new1>", "<new2>"])
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[vocab[0]] = deltas[0]["<new1>"]
        emb[vocab[0] + 1] = deltas[1]["<new1>"]

    prompts = []
    kts = []
    for c, cat in enumerate(CATEGORIES, start=1):
        s = f"<new{c}> {cat}"
        ps = [s, "painting in the style of " + s] if "art" in s else [s, "photo of a " + s]
        prompts.append(ps)
        kts.append(np.concatenate([rows_of(p, tok, model) for p in ps], 0))
    kreg = np.concatenate([rows_of(p, tok, model) for p in REG_CAPTIONS], 0)

    kt = np.concatenate(kts, 0)
    # No duplicates expected here (the native test covers duplicates); assert it so the reference is exact.
    for i in range(len(kt)):
        for j in range(i + 1, len(kt)):
            assert np.abs(kt[i] - kt[j]).mean() != 0

    C = kreg.T @ kreg
    d = np.linalg.solve(C, kt.T).T  # K_t C^-1
    e2 = d @ kt.T
    out = {}
    diag = {}
    for n, w in kv.items():
        w0 = w.to(torch.float64).numpy()
        vt = np.concatenate([kts[c] @ deltas[c][n].to(torch.float64).numpy().T for c in range(2)], 0)
        e1 = vt.T - w0 @ kt.T
        wn = w0 + e1 @ np.linalg.solve(e2, d)
        out[f"merged.{n}"] = torch.from_numpy(wn)
        diag[n] = {
            "constraint_residual": float(np.linalg.norm(kt @ wn.T - vt, axis=1).mean()),
            "reg_error": float(np.linalg.norm(kreg @ (wn - w0).T, axis=1).mean()),
        }
    out["kt.c1"] = torch.from_numpy(kts[0])
    out["kt.c2"] = torch.from_numpy(kts[1])
    out["kreg"] = torch.from_numpy(kreg)
    out["token.<new1>"] = deltas[0]["<new1>"].clone()
    out["token.<new2>"] = deltas[1]["<new1>"].clone()
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "reg_captions.txt"), "w") as f:
        f.write("\n".join(REG_CAPTIONS) + "\n")
    manifest = {
        "categories": CATEGORIES,
        "prompts": prompts,
        "token_ids": {"<new1>": vocab[0], "<new2>": vocab[0] + 1},
        "target_rows": int(kt.shape[0]),
        "reg_rows": int(kreg.shape[0]),
        "base_model_fingerprint": fp,
        "cond_C": float(np.linalg.cond(C)),
        "diagnostics": diag,
    }
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps({k: manifest[k] for k in ("target_rows", "reg_rows", "cond_C")}))


def diffusers_to_compvis(name: str) -> str:
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.*)$", name)
    if name.startswith("mid_block.attentions.0."):
        return "model.diffusion_model.middle_block.1." + name[len("mid_block.attentions.0.") :]
    kind, b, a, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    i = 3 * b + 1 + a if kind == "down_blocks" else 3 * b + a
    blk = "input_blocks" if kind == "down_blocks" else "output_blocks"
    return f"model.diffusion_model.{blk}.{i}.1.{rest}"


def write_foreign() -> None:
    """concept1 in the original formats (docs/method-facts §2), for the foreign-reader tests."""
    d = load_file(os.path.join(OUT, "concept1.safetensors"))
    row = d.pop("<new1>")
    foreign = os.path.join(OUT, "foreign")
    os.makedirs(os.path.join(foreign, "attn_procs"), exist_ok=True)
    torch.save({"unet": d, "modifier_token": {"<new1>": row}}, os.path.join(foreign, "delta.bin"))
    torch.save({"state_dict": {**{diffusers_to_compvis(k): v for k, v in d.items()}, "embed": row[None]}},
               os.path.join(foreign, "delta_epoch=000001.ckpt"))
    procs = {k.replace("attn2.to_k.", "attn2.processor.to_k_custom_diffusion.").replace("attn2.to_v.", "attn2.processor.to_v_custom_diffusion."): v
             for k, v in d.items()}
    save_file(procs, os.path.join(foreign, "attn_procs", "pytorch_custom_diffusion_weights.safetensors"))
    save_file({"<new1>": row}, os.path.join(foreign, "attn_procs", "<new1>.safetensors"), metadata={"format": "pt"})
    # compressed delta.bin: full-rank factors of W - W0 (exact up to float32), so applying reproduces W.
    unet = load_file(os.path.join(MODEL, "unet", "diffusion_pytorch_model.safetensors"))
    comp = {}
    for k, v in d.items():
        dw = (v.double() - unet[k].double())
        U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
        comp[k] = {"u": (U * S).float().contiguous(), "v": Vh.float().contiguous()}
    torch.save({"unet": comp, "modifier_token": {"<new1>": row}}, os.path.join(foreign, "compressed_delta.bin"))


if __name__ == "__main__":
    main()
    write_foreign()
