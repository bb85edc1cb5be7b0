"""Shared helpers for the parity fixture generators (make_reference.py, make_full_size.py).

Everything here is deterministic: random tensors come from torch.Generator objects
seeded from a CRC32 of a descriptive string, so a tensor's value depends only on its
name, never on the order in which tensors are created.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import subprocess
import zipfile
import zlib

import torch

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SMALL_TOKENIZER_DIR = os.path.join(REPO_ROOT, "test", "fixtures", "clip-tokenizer-small")

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


# --------------------------------------------------------------------------------------
# deterministic random tensors


def seed_of(key: str) -> int:
    return zlib.crc32(key.encode("utf-8")) & 0xFFFFFFFF


def gen(key: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed_of(key))
    return g


def randn(key: str, shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen(key), dtype=torch.float32) * scale


def uniform(key: str, shape, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=gen(key), dtype=torch.float32) * (hi - lo) + lo


# --------------------------------------------------------------------------------------
# weight randomisation

_NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm)


@torch.no_grad()
def randomize_module_(module: torch.nn.Module, tag: str, round_to_fp16: bool = True) -> None:
    """Overwrite every parameter of `module` with deterministic random values.

    * Linear / Conv weights: N(0, 1) / sqrt(fan_in)  (variance preserving, so nothing is
      zero, including layers diffusers initialises to zero)
    * biases of Linear / Conv: N(0, 0.05^2)
    * GroupNorm / LayerNorm: weight 1 + N(0, 0.1^2), bias N(0, 0.1^2)
    * Embedding tables: N(0, 0.5^2)
    * anything else: N(0, 0.1^2)

    With round_to_fp16 the values are rounded to the nearest float16 (kept in float32)
    so that a float16 checkpoint holds exactly the weights the references used.
    """
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            g = gen(f"{tag}/{full}")
            shape = tuple(p.shape)
            if isinstance(mod, _NORM_TYPES):
                if p_name == "weight":
                    v = 1.0 + 0.1 * torch.randn(shape, generator=g)
                else:
                    v = 0.1 * torch.randn(shape, generator=g)
            elif isinstance(mod, torch.nn.Embedding):
                v = 0.5 * torch.randn(shape, generator=g)
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)):
                if p_name == "weight":
                    fan_in = 1
                    for s in shape[1:]:
                        fan_in *= s
                    v = torch.randn(shape, generator=g) / (fan_in**0.5)
                else:
                    v = 0.05 * torch.randn(shape, generator=g)
            else:
                v = 0.1 * torch.randn(shape, generator=g)
            if round_to_fp16:
                v = v.to(torch.float16).to(torch.float32)
            p.copy_(v.to(p.dtype))


# --------------------------------------------------------------------------------------
# CLIP BPE vocabulary (fallback when test/fixtures/clip-tokenizer-small/ is absent)


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable unicode character table used by GPT-2 / CLIP BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    byte_order = printable[:]
    codepoints = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_order.append(b)
            codepoints.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(byte_order, codepoints)}


def find_bpe_gz() -> str:
    """Locate open_clip's bpe_simple_vocab_16e6.txt.gz, downloading the wheel if needed."""
    env = os.environ.get("CLIP_BPE_GZ")
    if env and os.path.isfile(env):
        return env
    cache = "/tmp/oc"
    gz = os.path.join(cache, "bpe_simple_vocab_16e6.txt.gz")
    if os.path.isfile(gz):
        return gz
    wheels = sorted(glob.glob(os.path.join(cache, "open_clip_torch-*.whl")))
    if not wheels:
        os.makedirs(cache, exist_ok=True)
        subprocess.run(
            ["python3", "-m", "pip", "download", "--no-deps", "-d", cache, "open_clip_torch"],
            check=True,
        )
        wheels = sorted(glob.glob(os.path.join(cache, "open_clip_torch-*.whl")))
    with zipfile.ZipFile(wheels[-1]) as z:
        name = [n for n in z.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz")][0]
        with open(gz, "wb") as f:
            f.write(z.read(name))
    return gz


def derive_clip_bpe(n_merges: int | None) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the CLIP BPE truncated to the first n_merges merges.

    n_merges=None gives the full CLIP vocabulary (48894 merges, 49408 tokens).
    """
    lines = gzip.open(find_bpe_gz()).read().decode("utf-8").split("\n")
    full = 49152 - 256 - 2
    merges = lines[1 : 1 + (full if n_merges is None else n_merges)]
    base = list(bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m.split(" ")) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_vocab_merges(dst: str, vocab: dict[str, int], merges: list[str]) -> None:
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(dst, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_tokenizer_configs(dst: str, pad_token: str, model_max_length: int = 77) -> None:
    """Hub-style tokenizer_config.json + special_tokens_map.json (plain-string tokens)."""
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    cfg = {
        "add_prefix_space": False,
        "bos_token": BOS,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(dst, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2, sort_keys=True)
        f.write("\n")


def install_small_tokenizer(dst: str, pad_token: str) -> str:
    """Fill `dst` with vocab.json + merges.txt of the 1000-merge CLIP BPE and hub-style configs.

    vocab.json / merges.txt are copied byte-for-byte from test/fixtures/clip-tokenizer-small/
    when that folder exists; otherwise they are derived from open_clip's BPE file.
    Returns a string naming the source used.
    """
    os.makedirs(dst, exist_ok=True)
    vsrc = os.path.join(SMALL_TOKENIZER_DIR, "vocab.json")
    msrc = os.path.join(SMALL_TOKENIZER_DIR, "merges.txt")
    if os.path.isfile(vsrc) and os.path.isfile(msrc):
        for src in (vsrc, msrc):
            with open(src, "rb") as f:
                data = f.read()
            with open(os.path.join(dst, os.path.basename(src)), "wb") as f:
                f.write(data)
        source = "test/fixtures/clip-tokenizer-small"
        # cross-check against our own derivation when the BPE file is at hand
        try:
            vocab, merges = derive_clip_bpe(1000)
        except Exception:  # no network / no cache: skip the check
            vocab = None
        if vocab is not None:
            with open(vsrc, encoding="utf-8") as f:
                theirs = json.load(f)
            with open(msrc, encoding="utf-8") as f:
                their_merges = [l for l in f.read().split("\n") if l and not l.startswith("#version")]
            if theirs != vocab or their_merges != merges:
                print("WARNING: clip-tokenizer-small differs from the derived 1000-merge CLIP BPE")
    else:
        vocab, merges = derive_clip_bpe(1000)
        write_vocab_merges(dst, vocab, merges)
        source = "derived from open_clip bpe_simple_vocab_16e6.txt.gz (first 1000 merges)"
    write_tokenizer_configs(dst, pad_token)
    return source


# --------------------------------------------------------------------------------------
# hub scheduler configs (written verbatim: keys that are absent matter, see README)

SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SD21_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def _dumps(obj, level: int = 0) -> str:
    """JSON with 2-space indentation, but lists of scalars and leaf dicts on one line."""
    pad, pad1 = "  " * level, "  " * (level + 1)
    scalar = (str, int, float, bool, type(None))
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        if all(isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(x, scalar) for x in v))
               for v in obj.values()) and len(obj) <= 4:
            return "{" + ", ".join(f"{json.dumps(k)}: {_dumps(v)}" for k, v in obj.items()) + "}"
        items = [f"{pad1}{json.dumps(k)}: {_dumps(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(isinstance(x, scalar) for x in obj):
            return "[" + ", ".join(json.dumps(x) for x in obj) + "]"
        return "[\n" + ",\n".join(pad1 + _dumps(x, level + 1) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def write_json(path: str, obj) -> None:
    text = _dumps(obj)
    assert json.loads(text) == json.loads(json.dumps(obj))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
