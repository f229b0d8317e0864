"""Base-model tokenizers (no chat template, no chat special tokens) on tiny models of four
architectures: ChatML and its tokens are added, embeddings grow, and the saved checkpoint's
tokenizer and config agree, reload with the Auto classes and feed the next stage."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import realdata
from starpo.model import loading as M
from starpo.recipe import ModelSpec
from starpo.data.tokenize import IGNORE, tokenize_conversation

CONV = [{"role": "user", "content": "Indent this:\nx = 1"},
        {"role": "assistant", "content": "Here:\n\n    x  =  1\n\tdone  "}]


def _config(arch: str, vocab: int):
    from transformers import GemmaConfig, GPTNeoXConfig, LlamaConfig, Qwen2Config
    small = dict(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=256)
    if arch == "llama":
        return LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**small)            # untied embed_out, as Pythia
    if arch == "qwen2":
        return Qwen2Config(**small, num_key_value_heads=2)
    return GemmaConfig(**small, num_key_value_heads=1, head_dim=8)


def _base_checkpoint(tmp_path, arch: str, *, trim_offsets: bool):
    """A 'base model': the real GPT-2 BPE as it ships (no template, no ChatML tokens; the
    GPT-NeoX one with trimmed offsets, as that family's tokenizers have) and a tiny model
    built from a config of ``arch`` with the tokenizer's vocabulary."""
    from tokenizers import processors
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(realdata("tokenizers", "gpt2")))
    assert tok.chat_template is None and "<|im_end|>" not in tok.get_vocab()
    if trim_offsets:
        tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, len(tok)))
    out = tmp_path / f"{arch}-base"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


ARCHS = [("llama", None, False), ("gpt_neox", None, True),
         ("qwen2", "qwen2_5", False), ("gemma", None, False)]


@pytest.mark.parametrize("arch,template,trim", ARCHS)
def test_base_tokenizer_gets_chatml_and_the_checkpoint_agrees(tmp_path, one_thread, arch,
                                                              template, trim):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = _base_checkpoint(tmp_path, arch, trim_offsets=trim)
    chat = None
    if template:   # Qwen2.5's own template (ChatML with tools) on the base tokenizer
        chat = json.loads(realdata("tokenizers", template, "tokenizer_config.json")
                          .read_text())["chat_template"]
    spec = ModelSpec(name_or_path=str(base), chat_template=chat)
    tok = M.load_tokenizer(str(base), spec)
    model = M.load_model(str(base), spec, tokenizer=tok)
    assert len(tok) == 50257 + 2
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert {im_start, im_end} == {50257, 50258}
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)

    # every assistant token is trained (the GPT-NeoX-style tokenizer trims its offsets)
    t = tokenize_conversation(tok, CONV)
    trained = tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE])
    assert trained == CONV[1]["content"] + "<|im_end|>"

    out = tmp_path / f"{arch}-sft"
    M.save_pretrained(model, tok, out)
    cfg = json.loads((out / "config.json").read_text())
    tok2 = AutoTokenizer.from_pretrained(str(out))
    model2 = AutoModelForCausalLM.from_pretrained(str(out))
    gen = json.loads((out / "generation_config.json").read_text())
    n = len(tok2)
    assert n == len(tok) and cfg["vocab_size"] == n
    assert model2.get_input_embeddings().num_embeddings == n
    assert model2.get_output_embeddings().weight.shape[0] == n
    assert cfg["pad_token_id"] == tok2.pad_token_id == tok2.convert_tokens_to_ids("<|endoftext|>")
    assert cfg["eos_token_id"] == tok2.eos_token_id == im_end
    assert cfg.get("bos_token_id") in (None, tok2.bos_token_id)
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert eos[0] == im_end and gen["pad_token_id"] == tok2.pad_token_id
    assert tok2.chat_template == tok.chat_template
    assert tok2.apply_chat_template(CONV, tokenize=False) == tok.apply_chat_template(
        CONV, tokenize=False)
    for name in ("<|im_start|>", "<|im_end|>"):
        assert tok2(name, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(name)]
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k

    # the next stage: loads it as its start, nothing grows, same labels, a finite loss
    tok3 = M.load_tokenizer(str(out), ModelSpec(name_or_path=str(out)))
    model3 = M.load_model(str(out), ModelSpec(name_or_path=str(out)), tokenizer=tok3)
    assert len(tok3) == n and model3.get_input_embeddings().num_embeddings == n
    assert tok3.eos_token_id == im_end and tok3.pad_token_id == tok2.pad_token_id
    t3 = tokenize_conversation(tok3, CONV)
    assert (t3.input_ids, t3.labels) == (t.input_ids, t.labels)
    ids = torch.tensor([t3.input_ids])
    labels = torch.tensor([t3.labels])
    loss = model3(input_ids=ids, labels=labels).loss
    assert torch.isfinite(loss)


def test_pipeline_on_a_base_tokenizer_trains_every_assistant_token(tmp_path, one_thread):
    """SFT (prompt + chosen of the real HH-RLHF rows) then DPO from a base GPT-NeoX-style
    checkpoint (GPT-2 BPE with trimmed offsets, no template): ChatML is installed, and every
    conversation and both responses of every pair are trained on exactly their text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from starpo.run import pipeline
    from starpo.recipe import SourceSpec, recipe_from_dict
    from starpo.data.sources import load_source
    base = _base_checkpoint(tmp_path, "gpt_neox", trim_offsets=True)
    hh = str(realdata("hh_rlhf.jsonl"))
    fast = {"max_steps": 1, "batch_size": 4, "warmup_ratio": 0.0, "log_every": 1}
    rec = recipe_from_dict({
        "name": "base-tok", "model": {"name_or_path": str(base)},
        "stages": [
            {"type": "sft", "data": {"sources": [{"path": hh, "use": "chosen"}]},
             "packing": {"max_length": 2048}, "train": fast},
            {"type": "dpo", "max_length": 2048, "max_prompt_length": 1536,
             "data": {"sources": [{"path": hh}]}, "train": fast}]})
    out = tmp_path / "run"
    pipeline.run(rec, out, log=lambda m: None, progress=False, report=False)

    tok = AutoTokenizer.from_pretrained(str(out / "sft" / "model"))
    eot = "<|im_end|>"
    trained = lambda ids, labels: tok.decode(
        [i for i, lab in zip(ids, labels) if lab != IGNORE])
    pairs = {r["row"]: r for r in load_source(SourceSpec(path=hh), "preference")}
    docs = json.loads(next((out / "sft" / "data").glob("sft-*.json")).read_text())
    assert sorted(d[3] for d in docs) == sorted(pairs)
    for ids, labels, _, row in docs:
        assert trained(ids, labels) == pairs[row]["chosen"][0]["content"] + eot
    prepared = json.loads(next((out / "dpo" / "data").glob("pairs-*.json")).read_text())
    assert len(prepared["train"]) == len(pairs)
    for p in prepared["train"]:
        for side in ("chosen", "rejected"):
            assert trained(p[f"{side}_ids"], p[f"{side}_labels"]) == \
                pairs[p["row"]][side][0]["content"] + eot
    for stage in ("sft", "dpo"):
        cfg = json.loads((out / stage / "model" / "config.json").read_text())
        t = AutoTokenizer.from_pretrained(str(out / stage / "model"))
        m = AutoModelForCausalLM.from_pretrained(str(out / stage / "model"))
        assert cfg["vocab_size"] == len(t) == m.get_input_embeddings().num_embeddings == 50259
        assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (t.eos_token_id, t.pad_token_id)
        assert t.eos_token == eot and t.chat_template is not None
