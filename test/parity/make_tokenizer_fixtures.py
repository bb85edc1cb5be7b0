#!/usr/bin/env python3
"""Record Hugging Face transformers' CLIPTokenizer output on a prompt corpus, for the TS parity test.

Run ``python3 test/parity/make_clip_vocab.py`` first (it writes the tokenizer folders), then
``python3 test/parity/make_tokenizer_fixtures.py``. Writes ``test/fixtures/tokenizer/expected.json``:

* ``prompts``: the corpus (>= 250 prompts).
* ``variants.<name>`` for ``sd1`` (pads with ``<|endoftext|>``), ``sd2`` (pads with ``!``) and
  ``small`` (1000 merges), each loaded with ``CLIPTokenizer.from_pretrained(folder)`` exactly as
  diffusers loads a pipeline's ``tokenizer`` subfolder:
  * ``padded[i]``: ``tok(prompt, padding="max_length", truncation=True, max_length=77).input_ids``
  * ``unpadded[i]``: ``tok(prompt).input_ids`` (BOS + content + EOS, untruncated)
  * ``added``: the same after ``tok.add_tokens(["<new1>", "<new2>"])``; to keep the file small
    only the rows that differ from the rows without added tokens are stored (``rows`` holds their
    indices); every other prompt must tokenize identically with and without the added tokens.
* ``tokens[i]`` / ``decoded[i]`` / ``decodedSkip[i]``: for sd1 with the added tokens,
  ``tok.tokenize(prompt)``, ``tok.decode(unpadded)`` and ``tok.decode(unpadded, skip_special_tokens=True)``.
* ``rawVocab``: raw vocabulary lookups (``convert_tokens_to_ids``) of a few tokens.
"""

from __future__ import annotations

import json
import os
import random
import sys

import tokenizers
import transformers
from transformers import CLIPTokenizer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO, "test", "fixtures")
OUT = os.path.join(FIXTURES, "tokenizer", "expected.json")
VARIANTS = {"sd1": "clip-tokenizer", "sd2": "clip-tokenizer-sd2", "small": "clip-tokenizer-small"}
ADDED = ["<new1>", "<new2>"]
MAX_LENGTH = 77


def corpus() -> list[str]:
    p: list[str] = []
    # Typical Stable Diffusion / Custom Diffusion prompts.
    p += [
        "a photo of a cat",
        "photo of a <new1> cat",
        "a photo of a <new1> dog",
        "<new1> cat playing with a ball",
        "a <new1> cat in the style of <new2> art",
        "painting of dog in the style of <new2> art",
        "A photograph of an astronaut riding a horse",
        "a high quality photo of a corgi wearing sunglasses, studio lighting, 4k, trending on artstation",
        "portrait of a beautiful woman, highly detailed, digital painting, artstation, concept art, smooth, sharp focus, illustration, art by greg rutkowski and alphonse mucha",
        "a cozy cabin in the woods at night, snow, warm light from the windows, cinematic",
        "An oil painting of a tortoise wearing a tiny hat",
        "Cyberpunk city street, neon lights, rain, reflections, 8k uhd, octane render",
        "a bowl of ramen, food photography, 50mm, f/1.8, bokeh",
        "an isometric low-poly island with palm trees",
        "watercolor of a fox in a misty forest",
        "a teddy bear on a skateboard in times square",
        "a DSLR photo of a red sports car parked by the sea",
        "ultra-realistic photo of a wooden chair, product shot, white background",
        "a corgi's face, close up, 85mm",
        "the moon over a lake, long exposure",
        "masterpiece, best quality, 1girl, solo, looking at viewer",
        "(masterpiece:1.2), (best quality), [blurry], {sharp}",
        "a cat :: a dog :: 0.5",
        "close up photo of a tortoise plushy",
        "a far away photo of a <new1> cat",
        "very small photo of a <new1> cat",
        "zoomed in photo of a <new1> cat",
        "close up photo of a <new1> cat",
        "a <new1> cat sitting on a <new2> chair",
        "photo of a <new2> wooden pot",
        "<new1> cat and <new2> dog playing in the garden",
        "a painting of a <new1> barn in the style of van gogh",
        "an illustration of a <new1> teddybear on the moon",
    ]
    # Punctuation and contractions.
    p += [
        "hello, world!",
        "Hello World!!!",
        "wow!!!",
        "!",
        "!!",
        "! ! !",
        "what?!",
        "yes... no... maybe...",
        "it's a dog's life",
        "IT'S A DOG'S LIFE",
        "don't won't can't shouldn't",
        "DON'T WON'T CAN'T",
        "we're they're you're",
        "I've we've they've",
        "I'm you'm",
        "I'll we'll you'll",
        "I'd you'd he'd",
        "'s 't 're 've 'm 'll 'd",
        "'S 'T 'RE 'VE 'M 'LL 'D",
        "rock'n'roll",
        "o'clock o'neil",
        "it’s curly ‘quotes’ and “double”",
        "''' ''s '''s",
        "the cat's' toy",
        "she said \"hello\"",
        "(parentheses) [brackets] {braces} <angles>",
        "a-b_c.d,e;f:g/h\\i|j",
        "#hashtag ##double #",
        "@mention email@example.com",
        "http://example.com/path?q=1&r=2#frag",
        "C:\\Users\\name\\file.txt",
        "~`^*+=%$",
        "--- *** ___ ...",
        "a...b---c___d",
        "end.",
        ".start",
        "tabs\tand\nnewlines\r\nmixed",
        "multiple     spaces    between   words",
        "   leading and trailing spaces   ",
        "\n\n\nnewlines only before",
        "\t\t",
        "",
        " ",
        "a",
        "A",
        "I",
        "ALL CAPS PROMPT OF A CAT",
        "MiXeD CaSe PrOmPt",
        "camelCaseWordsTogether",
        "snake_case_words_together",
        "kebab-case-words-together",
        "UPPER_SNAKE_CASE",
    ]
    # Numbers.
    p += [
        "1234567890",
        "3.14159",
        "1,000,000 stars",
        "year 2023",
        "4k 8k 16k uhd",
        "f/1.8 50mm iso100",
        "1girl 2boys",
        "3d render",
        "v1.5 v2.1",
        "-273.15 degrees",
        "½ ¼ ¾",
        "x² y³ 10⁻⁶",
        "Ⅻ Ⅳ ⅷ",
        "① ② ③",
        "٣ ٤ ٥",
        "१२३",
        "০১২",
        "12th 21st 3rd 2nd",
        "0x1F 0b1010",
        "1e-5 2e10",
    ]
    # HTML entities and markup (the v5 CLIPTokenizer does NOT unescape them).
    p += [
        "cats &amp; dogs",
        "a &lt;b&gt; c",
        "&quot;quoted&quot;",
        "&#39;single&#39; &#x27;hex&#x27;",
        "&amp;amp; double escaped",
        "&nbsp;nbsp",
        "<b>bold</b> <i>italic</i>",
        "<br/>line<br />break",
    ]
    # Unicode.
    p += [
        "café crème brûlée",
        "cafe\u0301 (decomposed accent)",
        "naïve résumé façade",
        "Ångström Ærø Øresund",
        "straße STRASSE Straße",
        "ẞ capital sharp s",
        "İstanbul ıstanbul",
        "ΣΑΣ ΟΔΥΣΣΕΥΣ σας",
        "Ελληνικά γράμματα",
        "Привет, мир! Кошка и собака",
        "ПРИВЕТ МИР",
        "Ёлка ёжик",
        "مرحبا بالعالم",
        "قطة على الشاطئ",
        "שלום עולם",
        "你好，世界！",
        "一只猫坐在桌子上",
        "猫と犬の写真",
        "こんにちは世界",
        "カタカナ ひらがな",
        "안녕하세요 세계",
        "\u1100\u1161\u11a8 decomposed hangul",
        "สวัสดีชาวโลก",
        "नमस्ते दुनिया",
        "হ্যালো বিশ্ব",
        "Xin chào thế giới",
        "Zażółć gęślą jaźń",
        "Příliš žluťoučký kůň",
        "Ǆ ǅ ǆ titlecase digraphs",
        "ﬁ ﬂ ﬃ ligatures",
        "Ａｂｃ １２３ full width",
        "ｶﾀｶﾅ half width",
        "𝔣𝔯𝔞𝔨𝔱𝔲𝔯 𝐛𝐨𝐥𝐝",
        "™ © ® ℃ ℉",
        "→ ← ↑ ↓ ⇒",
        "∑ ∫ √ ∞ ≠ ≤",
        "€100 £50 ¥1000 ₹500 $20",
        "😀",
        "a cat 🐱 and a dog 🐶",
        "🔥🔥🔥 fire",
        "👍🏽 thumbs up medium skin",
        "👨‍👩‍👧‍👦 family",
        "🇺🇸 🇯🇵 🇫🇷 flags",
        "❤️ heart with variation selector",
        "✨sparkles✨",
        "emoji😀inside😀words",
        "zero\u200bwidth\u200bspace",
        "zero\u200dwidth\u200djoiner",
        "bom\ufeffinside",
        "nbsp\u00a0between",
        "ideographic\u3000space",
        "next\u0085line",
        "line\u2028separator\u2029paragraph",
        "mongolian\u180evowel separator",
        "em\u2003space and thin\u2009space",
        "vertical\x0btab and form\x0cfeed",
        "file\x1cseparator\x1dgroup",
        "control\x00null\x07bell\x1bescape",
        "delete\x7fchar",
        "soft\u00adhyphen",
        "combining a\u0300\u0301\u0302 marks",
        "Ωmega Ω ohm sign",
        "Å angstrom sign",
        "\u00c5 vs A\u030a",
        "\ud55c\uad6d\uc5b4",
    ]
    # Special-token text appearing literally.
    p += [
        "<|startoftext|>",
        "<|endoftext|>",
        "<|startoftext|>a photo<|endoftext|>",
        "x<|endoftext|>y",
        "<|ENDOFTEXT|> upper",
        "<|STARTOFTEXT|> upper",
        "<|startoftext|> <|endoftext|> <|endoftext|>",
        "<|endoftext",
        "<|",
        "|>",
    ]
    # Added tokens adjacent to words and punctuation.
    p += [
        "a<new1>cat",
        "<new1>s",
        "<new1>'s toy",
        "the <new1>'s bowl",
        "<new1>",
        "<new2>",
        "<new1><new2>",
        "<new1> <new2>",
        "<new1>,<new2>.",
        "x<new1>,<new2>!",
        "(<new1>)",
        "[<new2>]",
        "<<new1>>",
        "<new1>>",
        "<<new2>",
        "<new12>",
        "<new1 >",
        "< new1>",
        "<new3>",
        "<NEW1> upper case",
        "<New2> title case",
        "new1 without brackets",
        "<new1>!!!",
        "!!!<new2>",
        "<new1>123",
        "456<new2>",
        "café<new1>crème",
        "猫<new1>犬",
        "😀<new2>😀",
        "a <new1>\n<new2>\tcat",
        "<new1>-<new2>_<new1>",
        "photo of a <new1> cat and a <new1> cat and a <new1> cat",
        "<new1>" * 10,
        "<new2> " * 40,
        "a photo of <new1> cat, " * 8,
    ]
    # Repeated characters / long words (BPE merge-order corner cases).
    p += [
        "aaaaaaaaaa",
        "a" * 100,
        "abababababab",
        "lollollollol",
        "hahahahahahaha",
        "zzzzzzzzzzzz",
        "mississippi",
        "supercalifragilisticexpialidocious",
        "pneumonoultramicroscopicsilicovolcanoconiosis",
        "xqzjvkw",
        "thequickbrownfoxjumpsoverthelazydog",
        "!!!!!!!!!!!!!!!!!!!!",
        "..........",
        "????",
        "-" * 50,
        "😀" * 20,
    ]
    # Very long prompts (> 77 tokens).
    long_base = (
        "a highly detailed matte painting of a majestic castle on a cliff above the stormy sea, "
        "dramatic lighting, volumetric clouds, by greg rutkowski, thomas kinkade, trending on artstation, "
    )
    p += [
        long_base * 3,
        ("photo of a cat " * 30).strip(),
        " ".join(str(i) for i in range(100)),
        "word " * 74 + "end",
        "word " * 75 + "end",
        "word " * 76 + "end",
        "one two three " * 25,
        "Привет " * 50,
        "猫" * 80,
        "<new1> " * 76,
        "a, " * 80,
        "!" * 200,
    ]
    # Seeded generated prompts: templates x subjects x styles.
    rng = random.Random(1234)
    subjects = [
        "cat", "dog", "teddy bear", "wooden chair", "tortoise plushy", "barn", "flower vase", "sunglasses",
        "<new1> cat", "<new2> chair", "<new1> dog", "mountain lake", "robot", "old man", "little girl",
    ]
    styles = [
        "in the style of van gogh", "oil painting", "watercolor", "pencil sketch", "pixel art", "3D render",
        "studio ghibli style", "by <new2> artist", "cinematic lighting", "HDR, 8K", "Ukiyo-e", "Art Déco",
    ]
    places = [
        "on the beach", "in Times Square", "on the moon", "in a forest", "at night", "under water",
        "in Paris", "in 東京", "in Москва", "next to a river", "on a table", "in the snow",
    ]
    templates = [
        "a photo of a {s} {p}, {st}",
        "{s} {p}",
        "A {S} {p}!!",
        "{st}: a {s}",
        "a {s}'s portrait, {st}",
        "{S}, {P}, {ST}",
        "a {s}  {p}\n{st}",
        "({s}:1.3) {p} [{st}]",
    ]
    dupes = [x for i, x in enumerate(p) if x in p[:i]]
    assert not dupes, f"duplicate hand-written prompts: {dupes}"
    seen = set(p)
    while len(p) < 300:
        t = rng.choice(templates)
        s, st, pl = rng.choice(subjects), rng.choice(styles), rng.choice(places)
        prompt = t.format(s=s, p=pl, st=st, S=s.upper(), P=pl.upper(), ST=st.title())
        if prompt not in seen:
            seen.add(prompt)
            p.append(prompt)
    return p


def ids_of(tok, prompt: str) -> tuple[list[int], list[int]]:
    padded = tok(prompt, padding="max_length", truncation=True, max_length=MAX_LENGTH)["input_ids"]
    unpadded = tok(prompt)["input_ids"]
    assert len(padded) == MAX_LENGTH
    return list(padded), list(unpadded)


def main() -> None:
    prompts = corpus()
    assert len(prompts) >= 250, len(prompts)
    assert len(set(prompts)) == len(prompts), "duplicate prompts"
    out: dict = {
        "generator": "test/parity/make_tokenizer_fixtures.py",
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "maxLength": MAX_LENGTH,
        "addedTokens": ADDED,
        "prompts": prompts,
        "variants": {},
    }
    for name, folder in VARIANTS.items():
        tok = CLIPTokenizer.from_pretrained(os.path.join(FIXTURES, folder))
        base = [ids_of(tok, s) for s in prompts]
        entry = {
            "folder": folder,
            "vocabSize": len(tok),
            "bosTokenId": tok.bos_token_id,
            "eosTokenId": tok.eos_token_id,
            "padTokenId": tok.pad_token_id,
            "modelMaxLength": tok.model_max_length,
            "padded": [b[0] for b in base],
            "unpadded": [b[1] for b in base],
        }
        tok.add_tokens(ADDED)
        added_ids = tok.convert_tokens_to_ids(ADDED)
        rows, padded, unpadded = [], [], []
        for i, s in enumerate(prompts):
            pa, un = ids_of(tok, s)
            if (pa, un) != base[i]:
                rows.append(i)
                padded.append(pa)
                unpadded.append(un)
            elif any(a.lower() in s.lower() for a in ADDED):
                raise AssertionError(f"{name}: prompt {s!r} mentions an added token but tokenizes alike")
        entry["added"] = {"ids": added_ids, "vocabSize": len(tok), "rows": rows, "padded": padded, "unpadded": unpadded}
        if name == "sd1":
            out["tokens"] = [tok.tokenize(s) for s in prompts]
            unp = [tok(s)["input_ids"] for s in prompts]
            out["decoded"] = [tok.decode(u) for u in unp]
            out["decodedSkip"] = [tok.decode(u, skip_special_tokens=True) for u in unp]
            raw = ["ktn", "pll", "ucd", "ucd</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", "!", "!</w>"]
            out["rawVocab"] = dict(zip(raw, tok.convert_tokens_to_ids(raw)))
        out["variants"][name] = entry
        print(f"{name}: {len(prompts)} prompts, {len(rows)} rows differ with added tokens", file=sys.stderr)

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    # Compact but line-oriented: one array per line keeps diffs readable.
    text = json.dumps(out, ensure_ascii=False, separators=(",", ":"))
    text = text.replace("],[", "],\n[")
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
