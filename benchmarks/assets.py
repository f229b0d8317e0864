"""The shared inputs of every configuration: synthetic data, one tokenizer, one model.

Everything is built once by the parent (``build_assets``) into a work directory and read
back by each child, so starpo and TRL see byte-identical weights, tokenizer and rows.

Data. Text is made of pseudo-words from a fixed list of ``N_WORDS`` words; the byte-level
BPE (``starpo.model.loading.train_tokenizer``, the tiny default's tokenizer) is trained on that
text with a vocabulary large enough that every word (with its leading space) is one
token, so a segment of ``n`` words is ``n`` tokens and lengths are controlled. Segment
lengths are drawn log-uniformly in ``[lo, hi]`` tokens (default 10–400): many short
segments and a long tail, as in real chat data (mean ≈ 106 tokens for 10–400).

* SFT rows: one user turn and one assistant turn; with probability 0.3 a second exchange
  follows. Conversations over ``SFT_MAX_TOKENS`` tokens are redrawn, so neither trainer
  truncates anything and both train on exactly the same tokens.
* Preference rows: one user prompt, a chosen and a rejected assistant reply, each length
  drawn independently.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

N_WORDS = 3000
VOCAB_SIZE = 8192
SFT_MAX_TOKENS = 1000          # conversations are redrawn above this (rows hold 1024)

# The model: the same tiny Llama for both frameworks (fp32, sdpa).
MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, intermediate_size=1024,
             max_position_embeddings=4096, tie_word_embeddings=True)


def _words(seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    cons, vows = "bcdfghjklmnprstvwz", "aeiou"
    out, seen = [], set()
    while len(out) < N_WORDS:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(1, 3)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


WORDS = _words()


def _length(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _text(rng: random.Random, n: int) -> str:
    # n words -> n tokens with the benchmark tokenizer (" word" is one token)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def sft_rows(n: int, *, seed: int = 0, lo: int = 10, hi: int = 400) -> list[dict]:
    rng = random.Random(f"sft:{seed}")
    rows = []
    while len(rows) < n:
        turns = 2 if rng.random() < 0.3 else 1
        lens = [_length(rng, lo, hi) for _ in range(2 * turns)]
        if sum(lens) + 6 * turns > SFT_MAX_TOKENS:
            continue
        msgs = []
        for t in range(turns):
            msgs.append({"role": "user", "content": _text(rng, lens[2 * t])})
            msgs.append({"role": "assistant", "content": _text(rng, lens[2 * t + 1])})
        rows.append({"messages": msgs})
    return rows


def preference_rows(n: int, *, seed: int = 0, lo: int = 10, hi: int = 400) -> list[dict]:
    rng = random.Random(f"pref:{seed}")
    rows = []
    for _ in range(n):
        p, c, r = (_length(rng, lo, hi) for _ in range(3))
        rows.append({"prompt": [{"role": "user", "content": _text(rng, p)}],
                     "chosen": [{"role": "assistant", "content": _text(rng, c)}],
                     "rejected": [{"role": "assistant", "content": _text(rng, r)}]})
    return rows


def _corpus(passes: int = 400, seed: int = 99) -> list[str]:
    rng = random.Random(seed)
    # every word many times, in varied company, so BPE learns each whole word
    texts = []
    for _ in range(passes):
        words = WORDS[:]
        rng.shuffle(words)
        texts.append(" ".join(words))
    return texts


def build_assets(work: Path, *, corpus_passes: int = 400, model: dict | None = None) -> Path:
    """Tokenizer + model checkpoint at ``work/model`` (built once, reused).

    ``corpus_passes`` < 400 (tests) gives a smaller vocabulary in which words may take
    several tokens, and ``model`` overrides entries of ``MODEL``; the benchmark itself
    always uses the defaults."""
    from starpo.model import loading
    from starpo.recipe import TinyModelSpec

    target = work / "model"
    dims = {**MODEL, **(model or {})}
    stamp = json.dumps({"model": dims, "vocab": VOCAB_SIZE, "words": N_WORDS, "v": 1,
                        "passes": corpus_passes}, sort_keys=True)
    if (target / "stamp.json").is_file() and (target / "stamp.json").read_text() == stamp:
        return target
    tok = loading.train_tokenizer(_corpus(corpus_passes), VOCAB_SIZE, 0,
                                   model_max_length=MODEL["max_position_embeddings"])
    spec = TinyModelSpec(vocab_size=VOCAB_SIZE, **dims)
    model = loading.build_tiny_model(spec, tok, seed=0, attn_implementation="sdpa")
    loading.save_pretrained(model, tok, target)
    (target / "stamp.json").write_text(stamp)
    return target


def token_length_check(tokenizer, n: int = 200) -> dict:
    """How many tokens an n-word segment takes (should be n)."""
    rng = random.Random(5)
    ratios = []
    for _ in range(50):
        k = rng.randint(10, n)
        ids = tokenizer(" " + _text(rng, k), add_special_tokens=False)["input_ids"]
        ratios.append(len(ids) / (k))
    return {"tokens_per_word_min": min(ratios), "tokens_per_word_max": max(ratios)}
