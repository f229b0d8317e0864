"""Assistant-only labels from token offsets, with real tokenizers."""

from __future__ import annotations

import json

import pytest

from conftest import CHATML, realdata
from starpo.data.tokenize import (IGNORE, PairStats, render, tokenize_conversation,
                                  tokenize_pair)
from starpo.errors import DataError


def _trained_text(tok, t):
    return tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE])


def test_labels_cover_each_assistant_turn_through_end_of_turn(gpt2_chatml):
    tok = gpt2_chatml
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "5"}]
    t = tokenize_conversation(tok, msgs)
    assert _trained_text(tok, t) == "Hello! How can I help?<|im_end|>5<|im_end|>"
    # one tokenization of the whole rendered text: ids equal a plain encode
    assert t.input_ids == tok(render(tok, msgs), add_special_tokens=False)["input_ids"]


def test_no_double_bos():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(realdata("tokenizers", "gpt2")))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    # a template that writes the BOS itself, as Llama/Gemma templates do
    tok.chat_template = "{{ bos_token }}" + CHATML
    tok.bos_token = "<|endoftext|>"
    t = tokenize_conversation(tok, [{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}])
    assert t.input_ids.count(tok.bos_token_id) == 1 and t.input_ids[0] == tok.bos_token_id


def test_merge_across_boundary_keeps_the_straddling_token(gpt2_chatml):
    # A template that joins prompt and answer with a plain space: GPT-2 merges the space
    # into the first answer word, so the boundary falls inside a token.
    tok = gpt2_chatml.__class__.from_pretrained(str(realdata("tokenizers", "gpt2")))
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q:{{ m['content'] }}"
                         "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %} {% endif %}")
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    t = tokenize_conversation(tok, msgs)
    text = render(tok, msgs)
    assert text == "Q:hello world<|endoftext|>"
    # " world" is one GPT-2 token covering the boundary; it is trained whole
    assert _trained_text(tok, t) == " world<|endoftext|>"
    alone = tok("Q:hello ", add_special_tokens=False)["input_ids"]
    assert t.input_ids[:len(alone)] != alone  # apart and together tokenize differently


def test_empty_assistant_mask_is_an_error_naming_the_row(gpt2_chatml):
    with pytest.raises(DataError, match=r"data.jsonl, row 7"):
        tokenize_conversation(gpt2_chatml, [{"role": "user", "content": "x"},
                                            {"role": "assistant", "content": ""}],
                              source="data.jsonl", row=7)
    # a template that silently drops assistant turns leaves an empty mask: also an error
    tok = gpt2_chatml.__class__.from_pretrained(str(realdata("tokenizers", "gpt2")))
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' %}"
                         "{{ m['content'] }}\n{% endif %}{% endfor %}")
    with pytest.raises(DataError, match=r"row 2.*no trainable"):
        tokenize_conversation(tok, [{"role": "user", "content": "x"},
                                    {"role": "assistant", "content": "y"}], source="d", row=2)


def test_world_tokenizer_labels(world_tokenizer):
    from starpo.world import World
    row = World(0).sft_rows(3)[0]
    t = tokenize_conversation(world_tokenizer, row["messages"])
    want = row["messages"][-1]["content"] + "<|im_end|>"
    assert world_tokenizer.decode([i for i, l in zip(t.input_ids, t.labels) if l != IGNORE]) \
        == want


def test_real_templates_render_and_label(world_tokenizer):
    """Qwen2.5's and Gemma's real chat templates: labels still land on assistant text."""
    for name in ("qwen2_5", "gemma"):
        cfg = json.loads(realdata("tokenizers", name, "tokenizer_config.json").read_text())
        tok = world_tokenizer.__class__(tokenizer_object=world_tokenizer.backend_tokenizer)
        tok.chat_template = cfg["chat_template"]
        tok.bos_token, tok.eos_token = "<|endoftext|>", "<|im_end|>"
        msgs = [{"role": "user", "content": "How many coins?"},
                {"role": "assistant", "content": "It holds 7 coins."},
                {"role": "user", "content": "And now?"},
                {"role": "assistant", "content": "Still 7."}]
        t = tokenize_conversation(tok, msgs)
        got = tok.decode([i for i, l in zip(t.input_ids, t.labels) if l != IGNORE])
        assert "It holds 7 coins." in got and "Still 7." in got, (name, got)
        assert "How many coins" not in got and "And now" not in got


def test_pair_shares_prompt_and_truncates_by_the_rules(gpt2_chatml):
    tok = gpt2_chatml
    row = {"prompt": [{"role": "user", "content": "one two three four five six seven"}],
           "chosen": [{"role": "assistant", "content": "alpha beta gamma delta"}],
           "rejected": [{"role": "assistant", "content": "alpha beta epsilon"}],
           "source": "f.jsonl", "row": 3}
    p = tokenize_pair(tok, row, max_length=512, max_prompt_length=256)
    full_c = tok(render(tok, row["prompt"] + row["chosen"]), add_special_tokens=False)["input_ids"]
    assert p.prompt_ids + p.chosen_ids == full_c
    assert tok.decode([i for i, l in zip(p.chosen_ids, p.chosen_labels) if l != IGNORE]) == \
        "alpha beta gamma delta<|im_end|>"
    stats = PairStats()
    q = tokenize_pair(tok, row, max_length=len(p.prompt_ids) - 2 + 3, max_prompt_length=len(
        p.prompt_ids) - 2, stats=stats)
    assert q.prompt_ids == p.prompt_ids[2:]              # cut from the left
    assert q.chosen_ids == p.chosen_ids[:3]               # response start kept
    assert stats.truncated == 1
    # truncated so far that both responses are the same "alpha beta" → dropped, counted
    stats = PairStats()
    assert tokenize_pair(tok, row, max_length=len(p.prompt_ids) + 2,
                         max_prompt_length=len(p.prompt_ids), stats=stats) is None
    assert stats.dropped_identical == 1


def test_sharegpt_weight_zero_turns_are_context_only(gpt2_chatml):
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "old answer"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "new answer"}]
    t = tokenize_conversation(gpt2_chatml, msgs, untrained=[1])
    assert _trained_text(gpt2_chatml, t) == "new answer<|im_end|>"
