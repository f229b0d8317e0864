"""Shared fixtures: small tokenizers and models built locally (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"

from starpo.model.loading import CHATML_TEMPLATE as CHATML
# the pipeline tests' micro model, settings and recipe, re-exported (tests/micro.py holds
# them without this file's side effects)
from micro import FAST as FAST, TINY as TINY, micro_recipe as micro_recipe


def realdata(*parts: str) -> Path:
    p = REALDATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


@pytest.fixture(scope="session")
def gpt2_chatml():
    """The real GPT-2 BPE with ChatML special tokens and template added."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(realdata("tokenizers", "gpt2")))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def world_tokenizer():
    """The tiny default tokenizer: byte-level BPE trained on the world's corpus."""
    from starpo.model import loading
    from starpo.world import World
    return loading.train_tokenizer(World(0).corpus(2000), vocab_size=512, seed=0)


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=2 * hidden,
                      max_position_embeddings=1024, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    m = LlamaForCausalLM(cfg).float().eval()
    return m


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: OpenMP's spinning threads make
    millisecond-sized ops many times slower when the 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- shared helpers

def quiet(msg):
    """A pipeline ``log`` that prints nothing."""


def random_docs(n=12, vocab=100, seed=0, lo=5, hi=40):
    """Tokenized SFT documents of random ids: a prompt part (untrained) and a response."""
    import random

    from starpo.data.tokenize import IGNORE, TokenizedSFT
    rng = random.Random(seed)
    out = []
    for i in range(n):
        L = rng.randint(lo, hi)
        ids = [rng.randrange(3, vocab) for _ in range(L)]
        k = rng.randint(1, L - 2)  # prompt length
        labels = [IGNORE] * k + ids[k:]
        out.append(TokenizedSFT(ids, labels, "mem", i))
    return out


def random_pairs(n=6, vocab=60, seed=0):
    """Tokenized preference pairs of random ids (prompt 2–6 tokens, each response 1–5),
    every response token trained."""
    import random

    from starpo.data.tokenize import TokenizedPair
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))]
        c = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 5))]
        r = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 5))]
        out.append(TokenizedPair(p, c, list(c), r, list(r), "t", i))
    return out


# the tiny default model of the stage tests (reward, online)
def _stage_tiny():
    from starpo.recipe import TinyModelSpec
    return TinyModelSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=128)


STAGE_TINY = _stage_tiny()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The stage tests' tiny model and its world tokenizer, also saved as a checkpoint."""
    from starpo import world
    from starpo.model import loading
    tok = loading.train_tokenizer(world.World(0).corpus(500), 400)
    model = loading.build_tiny_model(STAGE_TINY, tok, seed=0)
    path = tmp_path_factory.mktemp("base") / "model"
    loading.save_pretrained(model, tok, path)
    return {"tok": tok, "model": model, "path": str(path)}


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests need CUDA: skipped here without one (scripts/gpu_check.sh runs
    them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
