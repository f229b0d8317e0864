"""Tokenizer, tiny model, loading, atomic saving and reward models (all local, no network)."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from starpo.model import chat
from conftest import realdata
from starpo.model import loading as M
from starpo.recipe import ModelSpec, TinyModelSpec
from starpo.errors import StarpoError

# --------------------------------------------------------------------------- fixtures

def _make_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Varied text with a few hundred distinct words: enough merges for a 1024 vocab."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(600)]
    words += ["the", "a", "is", "what", "how", "answer", "question", "über", "naïve", "日本語"]
    out = []
    for _ in range(n):
        sent = " ".join(rng.choice(words) for _ in range(rng.randint(3, 25)))
        out.append(sent[0].upper() + sent[1:] + rng.choice([".", "?", "!", " 42.", ", ok."]))
    return out


@pytest.fixture(scope="module")
def corpus():
    return _make_corpus()


@pytest.fixture(scope="module")
def tok(corpus):
    return M.train_tokenizer(corpus, vocab_size=1024, seed=0)


@pytest.fixture(scope="module")
def model(tok):
    return M.build_tiny_model(TinyModelSpec(), tok, seed=0).eval()


CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And  über 日本? 🙂"},
        {"role": "assistant", "content": "Sure:\n  - yes"}]


def _logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor([ids])).logits


# --------------------------------------------------------------------------- chat template

def test_chatml_renders_exactly(tok):
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4.<|im_end|>\n"
                    "<|im_start|>user\nAnd  über 日本? 🙂<|im_end|>\n"
                    "<|im_start|>assistant\nSure:\n  - yes<|im_end|>\n")
    gen = tok.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    assert gen == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                   "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(CONV[:2], tokenize=False) + "<|im_start|>assistant\n" == gen


def test_generation_markers_render_nothing(tok):
    plain = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", M.CHATML_TEMPLATE)
    assert "endgeneration" not in plain and "{%- generation %}" in M.CHATML_TEMPLATE
    for msgs in (CONV, CONV[:3], CONV[1:3], [{"role": "user", "content": ""}]):
        for agp in (False, True):
            assert (tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
                    == tok.apply_chat_template(msgs, tokenize=False, chat_template=plain,
                                               add_generation_prompt=agp))


def test_assistant_mask_from_markers_matches_offset_labels(tok):
    from starpo.data.tokenize import IGNORE, tokenize_conversation
    out = tok.apply_chat_template(CONV, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert tok.decode([i for i, k in zip(ids, mask) if k]) == "4.<|im_end|>Sure:\n  - yes<|im_end|>"
    # the offset route (any template) selects exactly the same tokens
    t = tokenize_conversation(tok, CONV)
    assert t.input_ids == list(ids)
    assert [lab != IGNORE for lab in t.labels] == [bool(k) for k in mask]


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_is_deterministic(corpus, tok):
    again = M.train_tokenizer(list(corpus), vocab_size=1024, seed=123)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert again.get_vocab() == tok.get_vocab()
    other = M.train_tokenizer(_make_corpus(seed=1), vocab_size=1024, seed=0)
    assert other.get_vocab() != tok.get_vocab()


def test_special_tokens(tok):
    assert len(tok) == 1024
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert ids == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for t, i in ids.items():
        assert tok(t, add_special_tokens=False)["input_ids"] == [i]
        assert i in tok.all_special_ids
    assert tok("x<|im_end|>y<|im_start|>", add_special_tokens=False)["input_ids"][1::2] == [2, 1]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.bos_token is None
    assert tok.model_max_length == 1024
    assert chat.end_of_turn_token(tok) == "<|im_end|>" and chat.stop_token_ids(tok) == [2]


def test_any_text_round_trips(tok):
    rng = random.Random(0)
    texts = ["", " ", "  leading and trailing  ", "\t\n\r\x00\x1b[0m", "naïve café ñ",
             "日本語のテキスト", "emoji 🙂👩‍👩‍👧 flags 🇫🇷", "combining e\u0301 a\u0308",
             "zero\u200bwidth", "rtl עברית العربية", "<|im_start|> not quite <|im_end",
             "math ∑∫√ 𝔘𝔫𝔦", "\ufeffbom", "a" * 500]
    texts.append("".join(chr(rng.randint(1, 0xD7FF)) for _ in range(300)))
    texts.append(bytes(rng.randrange(256) for _ in range(300)).decode("latin-1"))
    texts.append(bytes(rng.randrange(256) for _ in range(300)).decode("utf-8", "replace"))
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.decode(ids) == text


def test_no_bos_is_added(tok):
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]
    ids = tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] not in tok("x")["input_ids"]
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert list(ids) == tok(text)["input_ids"]


def test_offsets_map_back_to_the_text(tok):
    text = tok.apply_chat_template(CONV, tokenize=False) + "  spaces\n\nand naïve 日本語 🙂!"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    assert offs[0][0] == 0 and offs[-1][1] == len(text)
    checked = 0
    for k, (i, (a, b)) in enumerate(zip(ids, offs)):
        assert 0 <= a < b <= len(text)
        if k:
            pa, pb = offs[k - 1]
            # contiguous; pieces of one multi-byte character share that character's span
            assert a == pb or (a, b) == (pa, pb) or a == pa or b == pb
        piece = tok.decode([i])
        if "\ufffd" not in piece:
            assert text[a:b] == piece
            checked += 1
    assert checked > 0.8 * len(ids)
    for a, b in offs:
        if text[a:b] in ("<|im_start|>", "<|im_end|>"):
            assert tok.convert_tokens_to_ids(text[a:b]) in ids


# --------------------------------------------------------------------------- tiny model

def _distinct_parameters(model) -> int:
    """Parameters counted once each (tied embeddings are one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_tiny_model_size_and_ids(tok, model):
    n = _distinct_parameters(model)
    print(f"tiny model (default TinyModelSpec, vocab {len(tok)}): {n:,} parameters")
    assert 500_000 < n < 5_000_000
    cfg = model.config
    assert cfg.vocab_size == len(tok) == model.get_input_embeddings().num_embeddings
    assert cfg.eos_token_id == 2 and cfg.pad_token_id == 0 and cfg.bos_token_id == 0
    assert model.generation_config.eos_token_id == 2
    assert model.generation_config.pad_token_id == 0
    assert cfg._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32


def test_tiny_model_is_deterministic_per_seed(tok, model):
    before = torch.get_rng_state()
    same = M.build_tiny_model(TinyModelSpec(), tok, seed=0)
    other = M.build_tiny_model(TinyModelSpec(), tok, seed=1)
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is not consumed
    sd, sd_same, sd_other = model.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_same[k]) for k in sd)
    assert not torch.equal(sd["model.embed_tokens.weight"], sd_other["model.embed_tokens.weight"])


def test_generation_stops_at_im_end_by_default(tok, model):
    from transformers import LogitsProcessor, LogitsProcessorList

    class EndAfterTwo(LogitsProcessor):  # force <|im_end|> as the third new token
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - self.start == 2:
                scores = torch.full_like(scores, -1e9)
                scores[:, 2] = 0.0
            return scores

    ids = tok.apply_chat_template(CONV[:2], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False,
                         logits_processor=LogitsProcessorList([EndAfterTwo(ids.shape[1])]))
    assert out.shape[1] == ids.shape[1] + 3 and out[0, -1].item() == 2  # no eos_token_id passed


# --------------------------------------------------------------------------- save / load

def test_save_and_reload_with_auto_classes(tmp_path, tok, model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run" / "sft" / "model"
    M.save_pretrained(model, tok, out)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temp leftovers
    m2 = AutoModelForCausalLM.from_pretrained(out).eval()
    t2 = AutoTokenizer.from_pretrained(out)
    assert t2.chat_template == tok.chat_template == M.CHATML_TEMPLATE
    assert t2.apply_chat_template(CONV, tokenize=False) == tok.apply_chat_template(CONV, tokenize=False)
    ids = tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert t2.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"] == ids
    assert torch.equal(_logits(model, ids), _logits(m2, ids))
    assert (t2.eos_token, t2.pad_token, t2.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert m2.generation_config.eos_token_id == 2 and m2.config.pad_token_id == 0


def test_save_is_atomic_when_writing_fails(tmp_path, tok, model, monkeypatch):
    out = tmp_path / "model"

    def broken(self, save_directory, *a, **k):
        Path(save_directory, "tokenizer.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        M.save_pretrained(model, tok, out)
    assert list(tmp_path.iterdir()) == []  # neither the model dir nor a temp dir
    monkeypatch.undo()

    M.save_pretrained(model, tok, out)        # a good checkpoint
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = M.build_tiny_model(TinyModelSpec(), tok, seed=5)
    monkeypatch.setattr(type(tok), "save_pretrained", broken)
    with pytest.raises(OSError):
        M.save_pretrained(other, tok, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old one intact
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    monkeypatch.undo()

    M.save_pretrained(other, tok, out)        # replacing works and leaves nothing behind
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


def test_load_model_and_tokenizer_from_local_checkpoint(tmp_path, tok, model):
    out = tmp_path / "ckpt"
    M.save_pretrained(model, tok, out)
    spec = ModelSpec(name_or_path=str(out))
    t2 = M.load_tokenizer(str(out), spec)
    assert t2.chat_template == M.CHATML_TEMPLATE and t2.get_vocab() == tok.get_vocab()
    ref = M.load_model(str(out), spec, for_training=False)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert next(ref.parameters()).dtype == torch.float32
    assert ref.config._attn_implementation == "sdpa"
    ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    assert torch.equal(_logits(ref, ids), _logits(model, ids))
    pol = M.load_model(str(out), spec, for_training=True)
    assert pol.training and all(p.requires_grad for p in pol.parameters())
    # a chat-template override wins over the checkpoint's own template
    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    t3 = M.load_tokenizer(str(out), ModelSpec(name_or_path=str(out), chat_template=custom))
    assert t3.apply_chat_template(CONV[1:3], tokenize=False) == "[user] What is 2+2?\n[assistant] 4.\n"


def test_load_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec()
    for bad in ("./no/such/checkpoint", str(tmp_path / "missing"), "runs/x/sft/model",
                "~/nope-starpo"):
        with pytest.raises(StarpoError, match=re.escape(
                f"model.name_or_path: {bad!r} is neither a local checkpoint directory nor "
                "reachable on the hub")):
            M.load_model(bad, spec)
        with pytest.raises(StarpoError, match="neither a local checkpoint"):
            M.load_tokenizer(bad, spec)
    # a plausible hub id that is not in the local cache, offline: still one clear line
    with pytest.raises(StarpoError) as err:
        M.load_model("starpo-test-owner/definitely-not-a-model", spec)
    msg = str(err.value)
    assert msg.startswith("model.name_or_path: 'starpo-test-owner/definitely-not-a-model' is "
                          "neither a local checkpoint directory nor reachable on the hub")
    assert "\n" not in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StarpoError, match="not a Hugging Face checkpoint"):
        M.load_model(str(empty), spec, what="stages.1.model")
    with pytest.raises(StarpoError, match=r"^stages.1.model: "):
        M.load_model(str(empty), spec, what="stages.1.model")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(StarpoError, match="is a file"):
        M.load_model(str(f), spec)


def test_checkpoint_without_weights_is_a_clear_error(tmp_path, tok, model):
    out = tmp_path / "ckpt"
    M.save_pretrained(model, tok, out)
    (out / "model.safetensors").unlink()
    with pytest.raises(StarpoError, match=r"cannot load the model from checkpoint"):
        M.load_model(str(out), ModelSpec())


# --------------------------------------------------------------------------- tokenizers without ChatML

def _base_checkpoint(tmp_path, corpus) -> Path:
    """A 'base model' checkpoint whose tokenizer knows no ChatML and has no template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(corpus[:500], trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      tie_word_embeddings=True, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    out = tmp_path / "base"
    M.save_pretrained(LlamaForCausalLM(cfg), tok, out)
    return out


def test_base_checkpoint_gets_chatml_and_resized_embeddings(tmp_path, corpus):
    base = _base_checkpoint(tmp_path, corpus)
    spec = ModelSpec(name_or_path=str(base))
    tok = M.load_tokenizer(str(base), spec)
    n_old = json.loads((base / "config.json").read_text())["vocab_size"]
    assert tok.chat_template == M.CHATML_TEMPLATE and len(tok) == n_old + 2
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for t in ("<|im_start|>", "<|im_end|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    model = M.load_model(str(base), spec, tokenizer=tok, for_training=False)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) and model.get_output_embeddings().weight.shape[0] == len(tok)
    from safetensors.torch import load_file
    old = load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(emb[:n_old], old)  # existing rows untouched
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.config.eos_token_id == im_end
    assert model.generation_config.eos_token_id == [im_end, 0]  # end of turn, then old eos
    assert model.config.pad_token_id == tok.pad_token_id == 0
    # loading twice gives the same new rows (seeded)
    again = M.load_model(str(base), spec, for_training=False)
    assert torch.equal(again.get_input_embeddings().weight, emb)
    from starpo.data.tokenize import IGNORE, tokenize_conversation
    t = tokenize_conversation(tok, CONV[1:3])
    assert tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE]) == "4.<|im_end|>"


def test_gpt2_tokenizer_gets_chatml():
    path = realdata("tokenizers", "gpt2")
    tok = M.load_tokenizer(str(path), ModelSpec())
    assert tok.chat_template == M.CHATML_TEMPLATE
    assert len(tok) == 50257 + 2
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert {start, end} == {50257, 50258}
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = tok.apply_chat_template(CONV[1:3], tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == start and ids.count(start) == 2 and ids.count(end) == 2  # no BOS added
    assert tok.decode(ids) == text
    assert chat.stop_token_ids(tok) == [end]
    raw = M.load_tokenizer(str(path), ModelSpec(), chat=False)  # judges: left as it was
    assert raw.chat_template is None and len(raw) == 50257 and raw.eos_token == "<|endoftext|>"
    assert raw.pad_token is not None


def test_template_installed_on_a_base_tokenizer_sets_its_end_of_turn_as_eos(tmp_path, corpus):
    base = _base_checkpoint(tmp_path, corpus)
    custom = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                  "<|im_end|>\n{% endfor %}")
    tok = M.load_tokenizer(str(base), ModelSpec(chat_template=custom))
    assert tok.chat_template == custom and tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    # chat=False: untouched (judges with their own input format)
    raw = M.load_tokenizer(str(base), ModelSpec(), chat=False)
    assert raw.chat_template is None and raw.eos_token == "<|endoftext|>" and len(raw) < len(tok)
    rm = M.load_reward_model(str(base), ModelSpec(), chat=False)
    assert rm.config.pad_token_id == raw.pad_token_id
    assert rm.get_input_embeddings().num_embeddings == len(raw)


def test_a_classifier_of_several_labels_is_no_reward_model(tmp_path, tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      num_labels=2, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    with pytest.raises(StarpoError, match="judge.path: .*clf.* more than one label"):
        M.load_reward_model(str(tmp_path / "clf"), ModelSpec())


def test_stop_tokens_of_a_gemma_style_template(corpus):
    cfg = json.loads(realdata("tokenizers", "gemma", "tokenizer_config.json").read_text())
    tok = M.train_tokenizer(corpus[:300], vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = cfg["chat_template"]
    assert chat.end_of_turn_token(tok) == "<end_of_turn>"
    assert chat.stop_token_ids(tok) == [tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id]


@pytest.mark.parametrize("name", ["qwen2_5", "gemma"])
def test_real_model_templates_render(tok, name):
    cfg = json.loads(realdata("tokenizers", name, "tokenizer_config.json").read_text())
    tpl = cfg["chat_template"]
    msgs = CONV[1:3]
    full = tok.apply_chat_template(msgs, tokenize=False, chat_template=tpl)
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, chat_template=tpl,
                                  add_generation_prompt=True)
    if name == "qwen2_5":
        system = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                  "helpful assistant.<|im_end|>\n")
        assert gen == system + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        assert full == gen + "4.<|im_end|>\n"
    else:  # Gemma writes {{ bos_token }}: our tokenizer has none, so nothing is written
        assert gen == "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
        assert full == gen + "4.<end_of_turn>\n"
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == full


# --------------------------------------------------------------------------- build_or_load

def test_build_or_load_tiny_with_cache(tmp_path, corpus):
    spec = ModelSpec()
    calls = []

    def corpus_fn():
        calls.append(1)
        return corpus

    m1, t1 = M.build_or_load(spec, corpus_fn, seed=0, cache_dir=tmp_path)
    assert m1.training and len(t1) == 1024
    assert [p.name.startswith("tiny-") for p in tmp_path.iterdir()] == [True]
    m2, t2 = M.build_or_load(spec, corpus_fn, seed=0, cache_dir=tmp_path, for_training=False)
    assert not m2.training and t2.get_vocab() == t1.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert len(list(tmp_path.iterdir())) == 1  # the second call read the cache
    M.build_or_load(spec, corpus_fn, seed=1, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # another seed, another entry
    m4, _ = M.build_or_load(spec, corpus_fn, seed=0)  # no cache: same weights as built
    assert torch.equal(m4.model.embed_tokens.weight, m1.model.embed_tokens.weight)
    with pytest.raises(StarpoError, match="non-empty corpus"):
        M.build_or_load(spec, lambda: [], seed=0)


def test_build_or_load_checkpoint_path(tmp_path, tok, model):
    out = tmp_path / "ckpt"
    M.save_pretrained(model, tok, out)
    m, t = M.build_or_load(ModelSpec(name_or_path=str(out)), lambda: pytest.fail("no corpus"),
                           seed=0)
    ids = tok("What is it?", add_special_tokens=False)["input_ids"]
    assert torch.equal(_logits(m.eval(), ids), _logits(model, ids))


# --------------------------------------------------------------------------- reward models

def test_reward_model_from_causal(tmp_path, tok, model):
    from transformers import AutoModelForSequenceClassification
    rm = M.reward_model_from_causal(model, seed=0)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    assert torch.equal(rm.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(rm.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    rm_again = M.reward_model_from_causal(model, seed=0)
    assert torch.equal(rm.score.weight, rm_again.score.weight)
    rm.eval()
    # right-padded batch: the score is read at the last non-pad token
    a = tok.apply_chat_template(CONV[1:3], tokenize=True, return_dict=True)["input_ids"]
    b = tok.apply_chat_template(CONV[3:5], tokenize=True, return_dict=True)["input_ids"]
    L = max(len(a), len(b))
    pad = tok.pad_token_id
    batch = torch.tensor([a + [pad] * (L - len(a)), b + [pad] * (L - len(b))])
    mask = (batch != pad).long()
    with torch.no_grad():
        scores = rm(input_ids=batch, attention_mask=mask).logits
        alone = torch.cat([rm(input_ids=torch.tensor([x])).logits for x in (a, b)])
    assert scores.shape == (2, 1)
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-5)
    # saved and reloaded through the Auto class and through load_reward_model
    out = tmp_path / "rm"
    M.save_pretrained(rm, tok, out)
    rm2 = AutoModelForSequenceClassification.from_pretrained(out).eval()
    rm3 = M.load_reward_model(str(out), ModelSpec())
    assert not rm3.training and rm3.config.pad_token_id == pad
    with torch.no_grad():
        torch.testing.assert_close(rm2(input_ids=batch, attention_mask=mask).logits, scores)
        torch.testing.assert_close(rm3(input_ids=batch, attention_mask=mask).logits, scores)


def test_reward_model_from_causal_checkpoint(tmp_path, tok, model):
    out = tmp_path / "sft"
    M.save_pretrained(model, tok, out)
    rm = M.load_reward_model(str(out), ModelSpec())
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    assert torch.equal(rm.model.embed_tokens.weight, model.model.embed_tokens.weight)
    rm_b = M.reward_model_from_causal(str(out), seed=0)
    rm_c = M.reward_model_from_causal(str(out), seed=0)
    assert torch.equal(rm_b.score.weight, rm_c.score.weight)


# --------------------------------------------------------------------------- LoRA

def test_lora_trains_adapters_and_saves_merged(tmp_path, corpus):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    spec = ModelSpec(lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    model, tok = M.build_or_load(spec, lambda: corpus, seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.1 * _distinct_parameters(model)
    with torch.no_grad():  # make the adapter do something (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    model.eval()
    ids = tok("What is the answer?", add_special_tokens=False)["input_ids"]
    expected = _logits(model, ids)
    merged = M.save_pretrained(model, tok, tmp_path / "final")
    assert not hasattr(merged, "peft_config")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert not any("lora" in k for k in reloaded.state_dict())
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_lora_without_peft_is_a_clear_error(monkeypatch, tok, model):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(StarpoError, match="peft is not installed"):
        M.apply_lora(model, {"r": 4})
