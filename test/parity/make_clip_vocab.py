#!/usr/bin/env python3
"""Derive Hugging Face style CLIP tokenizer folders from OpenAI's BPE merges file.

The CLIP byte-level BPE ships as ``bpe_simple_vocab_16e6.txt.gz`` (for instance inside the
PyPI wheel of ``open_clip_torch``; get it with
``pip download --no-deps -d /tmp/oc open_clip_torch`` and unzip the wheel, no install needed).
From it this script writes three tokenizer folders in exactly the layout of
``openai/clip-vit-large-patch14`` / Stable Diffusion's ``tokenizer`` subfolder:

* ``test/fixtures/clip-tokenizer/``      SD1: pads with ``<|endoftext|>`` (49407).
* ``test/fixtures/clip-tokenizer-sd2/``  SD2: identical, but pads with ``!`` (id 0), as
  ``stabilityai/stable-diffusion-2-1``'s tokenizer folder does.
* ``test/fixtures/clip-tokenizer-small/`` a tiny variant keeping only the first 1000 merges
  (512 byte tokens + 1000 merges + 2 specials = 1514 ids), for tiny test models.

Vocabulary layout (as CLIP's ``SimpleTokenizer`` builds it): the 256 byte-unicode characters in
``bytes_to_unicode`` order, the same 256 with ``</w>``, then every merge joined, then
``<|startoftext|>`` and ``<|endoftext|>``. ``merges.txt`` is a ``#version: 0.2`` line followed by
the merges (lines 1..48894 of the gz file, after its header line).

Usage: python3 test/parity/make_clip_vocab.py [path/to/bpe_simple_vocab_16e6.txt.gz]
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import zipfile
from glob import glob

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO, "test", "fixtures")

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77
# CLIP keeps 49152 - 256 - 2 merges: lines [1, 48895) of the gz file.
N_MERGES = 49152 - 256 - 2


def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map of the 256 byte values onto printable unicode characters.

    Printable latin-1 bytes map onto themselves; the others (control chars, space, ...) are
    shifted to code points 256 and up, in increasing byte order. The dict keeps the order in
    which CLIP lists them in its vocabulary: the printable ranges first.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def find_gz(argv: list[str]) -> str:
    if len(argv) > 1:
        return argv[1]
    for cand in ["/tmp/oc/bpe_simple_vocab_16e6.txt.gz"]:
        if os.path.isfile(cand):
            return cand
    wheels = sorted(glob("/tmp/oc/open_clip_torch-*.whl"))
    if wheels:
        with zipfile.ZipFile(wheels[-1]) as z:
            name = next(n for n in z.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
            out = "/tmp/oc/bpe_simple_vocab_16e6.txt.gz"
            with open(out, "wb") as f:
                f.write(z.read(name))
            return out
    sys.exit(
        "bpe_simple_vocab_16e6.txt.gz not found: run `pip download --no-deps -d /tmp/oc open_clip_torch` "
        "or pass the path of the gz file"
    )


def read_merges(gz_path: str) -> list[tuple[str, str]]:
    text = gzip.open(gz_path).read().decode("utf-8")
    lines = text.split("\n")[1 : N_MERGES + 1]
    merges = []
    for i, line in enumerate(lines):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"malformed merge on line {i + 1}: {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != N_MERGES:
        raise ValueError(f"expected {N_MERGES} merges, got {len(merges)}")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    chars = list(byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in the derived vocabulary")
    return vocab


def added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_json(path: str, obj, compact: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as f:
        if compact:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        else:
            json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def write_folder(dirname: str, vocab: dict[str, int], merges: list[tuple[str, str]], pad: str) -> None:
    """Write one tokenizer folder in the layout of SD's ``tokenizer`` subfolder.

    The json files follow SD1.5's (``runwayml/stable-diffusion-v1-5``, copied from
    ``openai/clip-vit-large-patch14``): bos/eos/unk as AddedToken dicts, pad as a plain string.
    """
    os.makedirs(dirname, exist_ok=True)
    # vocab.json: one object ordered by id, like the files on the Hub.
    write_json(os.path.join(dirname, "vocab.json"), vocab, compact=True)
    with open(os.path.join(dirname, "merges.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    bos, eos = {"__type": "AddedToken", **added_token(BOS)}, {"__type": "AddedToken", **added_token(EOS)}
    config = {
        "add_prefix_space": False,
        "bos_token": bos,
        "do_lower_case": True,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": pad,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": dict(eos),
    }
    write_json(os.path.join(dirname, "tokenizer_config.json"), config)
    special = {
        "bos_token": added_token(BOS),
        "eos_token": added_token(EOS),
        "pad_token": pad,
        "unk_token": added_token(EOS),
    }
    write_json(os.path.join(dirname, "special_tokens_map.json"), special)


def check(vocab: dict[str, int]) -> None:
    expect = {
        "photo</w>": 1125,
        "of</w>": 539,
        "a</w>": 320,
        "cat</w>": 2368,
        "!": 0,
        "ktn": 42170,
        "pll": 47629,
        "ucd": 44746,
        BOS: 49406,
        EOS: 49407,
    }
    for tok, want in expect.items():
        got = vocab.get(tok)
        if got != want:
            raise AssertionError(f"vocab[{tok!r}] = {got}, expected {want}")
    if len(vocab) != 49408:
        raise AssertionError(f"vocab size {len(vocab)}, expected 49408")


def main() -> None:
    gz = find_gz(sys.argv)
    merges = read_merges(gz)
    vocab = build_vocab(merges)
    check(vocab)
    write_folder(os.path.join(FIXTURES, "clip-tokenizer"), vocab, merges, pad=EOS)
    write_folder(os.path.join(FIXTURES, "clip-tokenizer-sd2"), vocab, merges, pad="!")

    small_merges = merges[:1000]
    small_vocab = build_vocab(small_merges)
    assert len(small_vocab) == 1514 and small_vocab[BOS] == 1512 and small_vocab[EOS] == 1513
    write_folder(os.path.join(FIXTURES, "clip-tokenizer-small"), small_vocab, small_merges, pad=EOS)
    print(f"wrote {len(vocab)}-token and {len(small_vocab)}-token tokenizer folders under {FIXTURES}")


if __name__ == "__main__":
    main()
