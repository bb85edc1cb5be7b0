"""safetensors interop checks for test/core/safetensors.test.ts.

  python3 safetensors_interop.py write FILE   writes a file with every dtype using the reference writer
  python3 safetensors_interop.py read FILE    reads a file with the reference reader

Both print JSON: {"tensors": {name: {"dtype", "shape", "sha256"}}, "metadata": {...}}, where sha256 is
taken over the tensor's raw little-endian bytes, so the two sides can be compared bit for bit.
"""
import hashlib
import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def describe(tensors, metadata):
    out = {}
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest()}
    return {"tensors": out, "metadata": metadata or {}}


def make():
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(3, 5, 7, generator=g) * 100
    t = {
        "f64": base.double(),
        "f32": base.clone(),
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "i64": (base * 1e6).long(),
        "i32": (base * 1e3).int(),
        "i16": base.short(),
        "i8": (base / 4).to(torch.int8),
        "u8": (base.abs() % 256).to(torch.uint8),
        "bool": base > 0,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "f32_special": torch.tensor([float("inf"), float("-inf"), -0.0, 1e-45, 3.4e38]),
    }
    return t


def main():
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "write":
        tensors = make()
        meta = {"format": "pt", "note": "written by safetensors (Python) \u2713 \"quoted\""}
        save_file(tensors, path, metadata=meta)
        print(json.dumps(describe(tensors, meta)))
    elif mode == "read":
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        print(json.dumps(describe(tensors, meta)))
    else:
        raise SystemExit("usage: safetensors_interop.py write|read FILE")


if __name__ == "__main__":
    main()
