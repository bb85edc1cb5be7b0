#!/usr/bin/env python3
"""How far the reference itself moves on a GPU: diffusers' Custom Diffusion step (the one behind
test/fixtures/train-step, computed on a CPU) run again on CUDA in float32, compared with the
committed CPU fixture by the same measures as scripts/gpu/parity.js (loss, gradient norm, and the
K/V update after − before, whose relative error is the strictest of them).

    python3 scripts/gpu/reference_drift.py [--device cuda] [--json FILE]

Run it with and without NVIDIA_TF32_OVERRIDE=0 (cuBLAS and cuDNN then never use TF32): the gap
between the two is what TF32 alone costs, which is the yardstick for our own float32 rows on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, as the fixture asks
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "test", "parity"))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import make_train_step_reference as ref  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den else (a - b).norm().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    a = ap.parse_args()
    manifest = json.load(open(os.path.join(ref.OUT_DIR, "manifest.json"), encoding="utf-8"))
    out = {
        "device": a.device,
        "torch": torch.__version__,
        "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE"),
        "cudnnAllowTF32": torch.backends.cudnn.allow_tf32,
        "matmulAllowTF32": torch.backends.cuda.matmul.allow_tf32,
        "configs": {},
    }
    for config, entry in manifest["configs"].items():
        fixture = load_file(os.path.join(ref.OUT_DIR, entry["file"]))
        data, params = ref.build(config, a.device)
        got = data["expected"]
        rows = {}
        prev = data["start"]
        for k in range(params["steps"]):
            rows[f"loss {k + 1}"] = rel(got[f"loss.{k}"], fixture[f"loss.{k}"])
            rows[f"grad norm {k + 1}"] = rel(got[f"grad_norm.{k}"], fixture[f"grad_norm.{k}"])
            # parity.js's measure: the relative error of the update (after − before, this run's before).
            worst = max(rel(got[f"after.{k}.{n}"] - prev[n], fixture[f"after.{k}.{n}"] - prev[n]) for n in params["kv_names"])
            rows[f"K/V update {k + 1} (worst of {len(params['kv_names'])})"] = worst
            prev = {name: got[f"after.{k}.{name}"] for name in params["kv_names"]}
        out["configs"][config] = rows
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
