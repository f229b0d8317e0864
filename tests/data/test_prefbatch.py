"""starpo.data.prefbatch: layouts by hand, and log-prob equality with the padded computation."""

from __future__ import annotations

import random

import pytest
import torch

from starpo.model.logprobs import model_attention_mask, plain_sequence_logprobs, sequence_logprobs
from starpo.data.prefbatch import (_best_fit, collate_padded, collate_padding_free,
                              collate_prefix_shared, split_pairs, tokens_saved)

VOCAB = 96


def pair(prompt, chosen, rejected, chosen_labels=None, rejected_labels=None):
    return {"prompt_ids": list(prompt), "chosen_ids": list(chosen),
            "chosen_labels": list(chosen if chosen_labels is None else chosen_labels),
            "rejected_ids": list(rejected),
            "rejected_labels": list(rejected if rejected_labels is None else rejected_labels)}


# Two small pairs used for the hand-checked layouts.
A = pair([10, 11, 12], [20, 21], [30])                 # P=3, C=2, R=1
B = pair([13], [22], [31, 32], rejected_labels=[-100, 32])


# ---------------------------------------------------------------------------------------
# layouts, checked by hand
# ---------------------------------------------------------------------------------------


def test_padded_layout():
    b = collate_padded([A, B], pad_id=0)
    assert b.input_ids.tolist() == [[10, 11, 12, 20, 21], [10, 11, 12, 30, 0],
                                    [13, 22, 0, 0, 0], [13, 31, 32, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0],
                                         [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    # (row, predictor position, target, sequence)
    got = list(zip(b.tgt_row.tolist(), b.tgt_pos.tolist(), b.tgt_ids.tolist(), b.tgt_seq.tolist()))
    assert got == [(0, 2, 20, 0), (0, 3, 21, 0), (1, 2, 30, 1), (2, 0, 22, 2), (3, 1, 32, 3)]
    assert b.num_seqs == 4 and b.num_pad == 20 - 14 and b.meta["tokens_real"] == 14
    assert b.meta["pair_index"].tolist() == [0, 0, 1, 1]
    assert b.meta["chosen_seq"].tolist() == [0, 2] and b.meta["rejected_seq"].tolist() == [1, 3]


def test_padding_free_layout_one_row():
    b = collate_padding_free([A, B])
    assert b.attention_mask is None and b.num_pad == 0
    assert b.input_ids.tolist() == [[10, 11, 12, 20, 21, 10, 11, 12, 30, 13, 22, 13, 31, 32]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 0, 1, 2]]
    got = list(zip(b.tgt_pos.tolist(), b.tgt_ids.tolist(), b.tgt_seq.tolist()))
    assert got == [(2, 20, 0), (3, 21, 0), (7, 30, 1), (9, 22, 2), (12, 32, 3)]


def test_padding_free_layout_rows_best_fit():
    # documents: A-chosen 5, A-rejected 4, B-chosen 2, B-rejected 3 tokens; rows of 6
    b = collate_padding_free([A, B], max_tokens_per_row=6, pad_id=7)
    assert b.meta["rows"] == [[0], [1, 2], [3]]      # 5 | 4+2 | 3  (best fit, largest first)
    assert b.input_ids.tolist() == [[10, 11, 12, 20, 21, 7], [10, 11, 12, 30, 13, 22],
                                    [13, 31, 32, 7, 7, 7]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert b.num_pad == 4
    got = list(zip(b.tgt_row.tolist(), b.tgt_pos.tolist(), b.tgt_ids.tolist(), b.tgt_seq.tolist()))
    assert got == [(0, 2, 20, 0), (0, 3, 21, 0), (1, 2, 30, 1), (1, 4, 22, 2), (2, 1, 32, 3)]


def test_prefix_shared_layout():
    b = collate_prefix_shared([A, B], max_tokens_per_row=None)
    # row: A = prompt 10 11 12 | chosen 20 21 | rejected 30 ; B = 13 | 22 | 31 32
    assert b.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 13, 22, 31, 32]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 1, 2]]
    m = b.attention_mask[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],   # chosen sees the prompt
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0, 0, 0],   # rejected sees the prompt, not the chosen tokens
        [0, 0, 0, 0, 0, 0, 1, 0, 0, 0],   # pair B: block-diagonal
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1, 0, 1, 1],
    ]
    got = list(zip(b.tgt_pos.tolist(), b.tgt_ids.tolist(), b.tgt_seq.tolist()))
    # first chosen and first rejected tokens are both predicted from the last prompt token
    assert got == [(2, 20, 0), (3, 21, 0), (2, 30, 1), (6, 22, 2), (8, 32, 3)]
    assert b.num_pad == 0 and b.meta["tokens_real"] == 10


def test_prefix_shared_row_padding_attends_to_itself_only():
    b = collate_prefix_shared([A, B], max_tokens_per_row=6)
    assert b.meta["rows"] == [[0], [1]] and b.input_ids.shape == (2, 6)
    m = b.attention_mask[1, 0]
    # B occupies 4 tokens, then 2 pads: each pad sees only itself (never a fully masked row)
    assert m[4].tolist() == [False] * 4 + [True, False]
    assert m[5].tolist() == [False] * 5 + [True]
    assert not m[:4, 4:].any()
    assert b.num_pad == 2


def test_tokens_saved_by_hand():
    # A: P=3, C=2, R=1 ; B: P=1, C=1, R=2 ; third: P=5, C=1, R=1
    C = pair([1, 2, 3, 4, 5], [6], [7])
    s = tokens_saved([A, B, C])
    # unshared = (6+2+1) + (2+1+2) + (10+1+1) = 9 + 5 + 12 = 26 ; saved = 3 + 1 + 5 = 9
    assert s == {"prompt_tokens_saved": 9, "tokens_unshared": 26, "tokens_shared": 17,
                 "fraction_saved": 9 / 26}
    # and it is what the two layouts really compute
    assert collate_padding_free([A, B, C]).meta["tokens_real"] == 26
    assert collate_prefix_shared([A, B, C]).meta["tokens_real"] == 17


def test_best_fit_decreasing():
    assert _best_fit([10, 6, 4, 3, 3], 10) == [[0], [1, 2], [3, 4]]
    assert _best_fit([2, 9, 3], None) == [[0, 1, 2]]
    # best fit picks the tightest row: 7 goes next to 3 (room 7), not next to 1 (room 9)
    assert _best_fit([3, 1, 7], 10) == [[0, 2], [1]]
    with pytest.raises(ValueError, match="does not fit"):
        _best_fit([11], 10)


def test_validation_errors():
    with pytest.raises(ValueError, match="empty"):
        collate_padded([], 0)
    with pytest.raises(ValueError, match="entries"):
        collate_padded([pair([1], [2, 3], [4], chosen_labels=[2])], 0)
    with pytest.raises(ValueError, match="the token is"):
        collate_padding_free([pair([1], [2], [4], chosen_labels=[5])])
    with pytest.raises(ValueError, match="no trained token"):
        collate_prefix_shared([pair([1], [2], [4], rejected_labels=[-100])])
    with pytest.raises(ValueError, match="nothing predicts"):
        collate_prefix_shared([pair([], [2, 3], [4])])
    with pytest.raises(ValueError, match="does not fit"):
        collate_prefix_shared([A], max_tokens_per_row=5)


def test_pair_objects_and_split():
    from types import SimpleNamespace

    b = collate_padded([SimpleNamespace(**A)], 0)
    assert b.num_seqs == 2
    c, r = split_pairs(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert c.tolist() == [1.0, 3.0] and r.tolist() == [2.0, 4.0]


# ---------------------------------------------------------------------------------------
# equality with the padded computation on a real (tiny) model
# ---------------------------------------------------------------------------------------


def tiny(kind="llama", attn="sdpa", seed=0):
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64)
    if kind == "llama":
        return T.LlamaForCausalLM._from_config(T.LlamaConfig(**common), attn_implementation=attn).eval()
    if kind == "qwen2_sliding":
        cfg = T.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
                            max_window_layers=1, **common)
        return T.Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn).eval()
    if kind == "phi3_sliding":        # every layer slides, no layer_types: one windowed mask
        cfg = T.Phi3Config(sliding_window=3, pad_token_id=0, eos_token_id=1, bos_token_id=2, **common)
        return T.Phi3ForCausalLM._from_config(cfg, attn_implementation=attn).eval()
    if kind == "gemma2":
        cfg = T.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=3,
                             final_logit_softcapping=5.0, **common)
        return T.Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    raise ValueError(kind)


def varied_pairs(seed=0):
    """Different prompt lengths, one-token responses, untrained leading tokens."""
    rng = random.Random(seed)

    def toks(k):
        return [rng.randrange(3, VOCAB) for _ in range(k)]

    pairs = [pair(toks(1), toks(1), toks(1)),                        # one-token everything
             pair(toks(9), toks(1), toks(5)),
             pair(toks(4), toks(6), toks(1)),
             pair(toks(2), toks(3), toks(3))]
    c = toks(4)
    pairs.append(pair(toks(6), c, toks(2), chosen_labels=[-100, -100] + c[2:]))
    # same prompt and first response token for chosen and rejected
    p, first = toks(5), toks(1)
    pairs.append(pair(p, first + toks(3), first + toks(2)))
    return pairs


LAYOUTS = {
    "padding_free_one_row": lambda ps: collate_padding_free(ps),
    "padding_free_rows": lambda ps: collate_padding_free(ps, max_tokens_per_row=14),
    "prefix_shared_one_row": lambda ps: collate_prefix_shared(ps),
    "prefix_shared_rows": lambda ps: collate_prefix_shared(ps, max_tokens_per_row=20),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("llama", "eager"),
                                       ("qwen2_sliding", "sdpa"), ("phi3_sliding", "sdpa"),
                                       ("gemma2", "eager")])
def test_layouts_equal_padded(layout, kind, attn):
    model = tiny(kind, attn)
    pairs = varied_pairs()
    ref_sums, ref_counts, _ = plain_sequence_logprobs(model, collate_padded(pairs, pad_id=0))
    batch = LAYOUTS[layout](pairs)
    if layout.endswith("_rows"):
        assert batch.input_ids.shape[0] > 1 and any(len(r) > 1 for r in batch.meta["rows"])
    sums, counts, _ = sequence_logprobs(model, batch, chunk_size=4)
    torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=1e-5)
    assert torch.equal(counts, ref_counts)
    plain, _, _ = plain_sequence_logprobs(model, batch)
    torch.testing.assert_close(plain, ref_sums, atol=1e-5, rtol=1e-5)


def test_prefix_shared_gradients_equal_padded():
    model = tiny("llama")
    pairs = varied_pairs(3)
    grads = []
    for batch in (collate_padded(pairs, 0), collate_prefix_shared(pairs, max_tokens_per_row=24)):
        model.zero_grad()
        sums = sequence_logprobs(model, batch)[0]
        c, r = split_pairs(sums)
        (c - 0.5 * r).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_controls_show_the_masks_matter():
    """Negative controls: the tests above would catch a leak between documents."""
    model = tiny("llama", "eager")
    pairs = varied_pairs()
    ref = plain_sequence_logprobs(model, collate_padded(pairs, 0))[0]
    # rejected seeing the chosen tokens
    b = collate_prefix_shared(pairs)
    b.attention_mask = torch.ones_like(b.attention_mask).tril()
    assert (sequence_logprobs(model, b)[0] - ref).abs().max() > 1e-3
    # eager attention given the raw bool mask (transformers adds it to the scores)
    b = collate_prefix_shared(pairs)
    out = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                position_ids=b.position_ids, use_cache=False).logits
    lp = torch.log_softmax(out.float(), -1)[b.tgt_row, b.tgt_pos, b.tgt_ids]
    raw = torch.zeros(b.num_seqs).index_add(0, b.tgt_seq, lp)
    assert (raw - ref).abs().max() > 1e-3
    # packed documents with continuous positions: no document boundary, attention leaks
    b = collate_padding_free(pairs)
    b.position_ids = torch.arange(b.input_ids.shape[1])[None]
    assert (sequence_logprobs(model, b)[0] - ref).abs().max() > 1e-3


def test_sliding_window_applied_to_4d_masks():
    model = tiny("gemma2")
    b = collate_prefix_shared(varied_pairs())
    masks = model_attention_mask(model, b)
    assert isinstance(masks, dict) and set(masks) == {"full_attention", "sliding_attention"}
    # the sliding layers' mask drops keys 3+ positions back; the full layers' does not
    assert (masks["full_attention"] == 0).sum() > (masks["sliding_attention"] == 0).sum()
    # without the window the sliding layers would see too far back and the numbers change
    ref = plain_sequence_logprobs(model, collate_padded(varied_pairs(), 0))[0]
    full = masks["full_attention"]
    out = model(input_ids=b.input_ids, attention_mask=full, position_ids=b.position_ids,
                use_cache=False).logits
    lp = torch.log_softmax(out.float(), -1)[b.tgt_row, b.tgt_pos, b.tgt_ids]
    unwindowed = torch.zeros(b.num_seqs).index_add(0, b.tgt_seq, lp)
    assert (unwindowed - ref).abs().max() > 1e-3
