"""Reference checks of the files exportDelta writes (test/delta/export.test.ts, test/core/torch-save.test.ts).

  python3 export_interop.py tree FILE...
      Loads each file the way the original tools do: torch files with torch.load(weights_only=True)
      (plus a ZIP integrity check: every CRC, and the offset of every data/ record), safetensors with
      safetensors.torch. Prints JSON {FILE: {"tree": STRUCTURE, "zip": {...}, "metadata": {...}}}, where
      STRUCTURE mirrors the value: dicts as {"__dict__": [[key, value], ...]} in their order, tensors
      as {"__tensor__": {"dtype", "shape", "sha256"}} (sha256 of the raw little-endian bytes), lists
      as lists, other values as themselves.

  python3 export_interop.py lora LORA_FILE DELTA_FILE BASE_UNET_FILE
      Rebuilds every layer the way kohya/A1111 apply a LoRA at multiplier 1,
      W = W0 + up @ down * (alpha / rank), in float64, and compares it with the delta's W (full
      weight, or W0 + u @ v for our compressed format). Prints JSON {"layers": {diffusers name:
      {"rel_error", "rank", "alpha"}}, "keys": [...], "metadata": {...}}.

  python3 export_interop.py embedding FILE
      Loads a textual-inversion file as A1111 does for a single-tensor safetensors file.
"""
import hashlib
import json
import re
import struct
import sys
import zipfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def tensor_record(t):
    t = t.detach()
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest()}


def structure(x):
    if isinstance(x, torch.Tensor):
        return {"__tensor__": tensor_record(x)}
    if isinstance(x, dict):
        return {"__dict__": [[k, structure(v)] for k, v in x.items()]}
    if isinstance(x, (list, tuple)):
        return [structure(v) for v in x]
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 2 ** 53:
        return {"__bigint__": str(x)}
    return x


def zip_info(path):
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        raw = open(path, "rb").read()
        entries = []
        for i in z.infolist():
            off = i.header_offset
            nl, el = struct.unpack("<HH", raw[off + 26 : off + 30])
            entries.append({"name": i.filename, "data_offset": off + 30 + nl + el, "size": i.file_size, "method": i.compress_type})
        records = {}
        for name in ("version", "byteorder", ".format_version", ".storage_alignment", ".data/serialization_id"):
            full = f"{z.namelist()[0].split('/')[0]}/{name}"
            if full in z.namelist():
                records[name] = z.read(full).decode()
    return {"testzip": bad, "entries": entries, "records": records}


def tree(paths):
    out = {}
    for p in paths:
        if p.endswith(".safetensors"):
            with safe_open(p, "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(p)
            out[p] = {"tree": {"__dict__": [[k, structure(v)] for k, v in sorted(tensors.items())]}, "metadata": meta}
        else:
            value = torch.load(p, map_location="cpu", weights_only=True)
            out[p] = {"tree": structure(value), "zip": zip_info(p)}
    print(json.dumps(out))


def lora(lora_file, delta_file, base_file):
    sd = load_file(lora_file)
    with safe_open(lora_file, "pt") as f:
        meta = f.metadata() or {}
    delta = load_file(delta_file)
    base = load_file(base_file)
    modules = sorted({k.split(".")[0] for k in sd})
    layers = {}
    for m in modules:
        down = sd[f"{m}.lora_down.weight"].double()
        up = sd[f"{m}.lora_up.weight"].double()
        alpha_t = sd[f"{m}.alpha"]
        assert alpha_t.dim() == 0, f"{m}.alpha must be a 0-dim tensor"
        alpha = float(alpha_t)
        rank = down.shape[0]
        # kohya module key -> diffusers parameter name, as diffusers' lora_conversion_utils does.
        name = m[len("lora_unet_"):]
        name = re.sub(r"^(down|up)_blocks_(\d+)_attentions_(\d+)_", r"\1_blocks.\2.attentions.\3.", name)
        name = re.sub(r"^mid_block_attentions_(\d+)_", r"mid_block.attentions.\1.", name)
        name = re.sub(r"transformer_blocks_(\d+)_attn2_to_([kv])$", r"transformer_blocks.\1.attn2.to_\2", name) + ".weight"
        w0 = base[name].double()
        if f"{name}.u" in delta:
            want = w0 + delta[f"{name}.u"].double() @ delta[f"{name}.v"].double()
        else:
            want = delta[name].double()
        got = w0 + up @ down * (alpha / rank)
        rel = float((got - want).norm() / want.norm())
        rel_delta = float((got - want).norm() / (want - w0).norm())
        layers[name] = {"rel_error": rel, "rel_error_of_delta": rel_delta, "rank": rank, "alpha": alpha}
    print(json.dumps({"layers": layers, "keys": sorted(sd.keys()), "metadata": meta}))


def embedding(path):
    data = load_file(path)
    # A1111 (textual_inversion.py): a single-tensor file is an embedding; its name is the file's.
    assert len(data) == 1, "embedding file has multiple terms in it"
    key, emb = next(iter(data.items()))
    if emb.dim() == 1:
        emb = emb.unsqueeze(0)
    print(json.dumps({"key": key, "vectors": emb.shape[0], "record": tensor_record(emb)}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "tree":
        tree(sys.argv[2:])
    elif cmd == "lora":
        lora(*sys.argv[2:5])
    elif cmd == "embedding":
        embedding(sys.argv[2])
    else:
        sys.exit(f"unknown command {cmd}")
