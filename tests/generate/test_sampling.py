"""Batched sampling: seeds, greedy = argmax loop, left padding, stop tokens, shapes."""

from __future__ import annotations

import pytest
import torch

from starpo.recipe import GenerationSpec
from starpo.errors import StarpoError
from starpo.generate.sampling import (
    Backend, Generations, HFBackend, generate, render_prompt, row_key, row_uniform,
    sample_tokens, stop_token_ids,
)
from sampling_cases import PROMPTS, Triggered, ids_of, make_tokenizer, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one thread


def test_render_prompt_uses_template_without_double_bos():
    tok = make_tokenizer(bos="<s>")
    ids = render_prompt(tok, [{"role": "user", "content": "hi"}])
    bos = tok.convert_tokens_to_ids("<s>")
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.decode(ids) == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # plain tokenization would have added a second BOS
    assert tok(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True))["input_ids"].count(bos) == 2


def test_stop_ids_include_end_of_turn_eos_and_generation_config(tok, model):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [7, tok.eos_token_id]
    try:
        assert stop_token_ids(tok, model) == [im_end, tok.eos_token_id, 7]
    finally:
        model.generation_config.eos_token_id = None
    assert stop_token_ids(tok) == [im_end, tok.eos_token_id]


def test_no_chat_template_is_a_clear_error(tok):
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(StarpoError, match="chat template"):
        render_prompt(bare, [{"role": "user", "content": "hi"}])


def test_greedy_equals_manual_argmax_loop(tok, model):
    spec = GenerationSpec(temperature=0, max_new_tokens=6, batch_size=4)
    gens = generate(model, tok, PROMPTS[:2], spec, progress=False)
    stops = set(stop_token_ids(tok, model))
    for p, per_prompt in zip(PROMPTS[:2], gens):
        ids = render_prompt(tok, p)
        manual = []
        with torch.no_grad():
            for _ in range(6):
                logits = model(torch.tensor([ids + manual]), use_cache=False).logits[0, -1]
                manual.append(int(logits.argmax()))
                if manual[-1] in stops:
                    break
        assert per_prompt[0].token_ids == manual


def test_left_padding_matches_unbatched_greedy(tok, model):
    spec1 = GenerationSpec(temperature=0, max_new_tokens=8, batch_size=1)
    spec4 = GenerationSpec(temperature=0, max_new_tokens=8, batch_size=4)
    one = generate(model, tok, PROMPTS, spec1, progress=False)
    four = generate(model, tok, PROMPTS, spec4, progress=False)
    assert ids_of(one) == ids_of(four)
    assert len({len(render_prompt(tok, p)) for p in PROMPTS}) > 1  # padding really happened


def test_same_seed_same_samples_any_batch_size(tok, model):
    spec = GenerationSpec(temperature=1.0, max_new_tokens=8, batch_size=3)
    a = generate(model, tok, PROMPTS, spec, n=2, seed=11, progress=False)
    b = generate(model, tok, PROMPTS, spec, n=2, seed=11, progress=False)
    assert ids_of(a) == ids_of(b)
    c = generate(model, tok, PROMPTS, spec.model_copy(update={"batch_size": 8}), n=2, seed=11,
                 progress=False)
    assert ids_of(a) == ids_of(c)


def test_sampling_leaves_global_rng_untouched(tok, model):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    generate(model, tok, PROMPTS[:1], GenerationSpec(temperature=1.0, max_new_tokens=4),
             progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_different_seeds_differ(tok, model):
    spec = GenerationSpec(temperature=1.0, max_new_tokens=8, batch_size=4)
    a = generate(model, tok, PROMPTS, spec, seed=0, progress=False)
    b = generate(model, tok, PROMPTS, spec, seed=1, progress=False)
    assert ids_of(a) != ids_of(b)


def test_n_samples_per_prompt_shape_and_order(tok, model):
    spec = GenerationSpec(temperature=1.0, max_new_tokens=5, batch_size=5)
    gens = generate(model, tok, PROMPTS, spec, n=3, seed=0, progress=False)
    assert isinstance(gens, Generations) and len(gens) == len(PROMPTS)
    for i, per_prompt in enumerate(gens):
        assert len(per_prompt) == 3
        for s in per_prompt:
            assert s.prompt_index == i and s.num_tokens == len(s.token_ids) <= 5
            assert s.text == tok.decode(s.token_ids, skip_special_tokens=True).strip()
        assert len({tuple(s.token_ids) for s in per_prompt}) > 1  # samples differ
    st = gens.stats
    assert st.sequences == 12 and st.tokens == sum(s.num_tokens for p in gens for s in p)
    assert st.seconds > 0 and st.tokens_per_s > 0


def test_tiny_top_p_is_greedy(tok, model):
    greedy = generate(model, tok, PROMPTS, GenerationSpec(temperature=0, max_new_tokens=6),
                      progress=False)
    nucleus = generate(model, tok, PROMPTS,
                       GenerationSpec(temperature=1.0, top_p=1e-6, max_new_tokens=6),
                       n=2, seed=3, progress=False)
    for g, per_prompt in zip(greedy, nucleus):
        assert all(s.token_ids == g[0].token_ids for s in per_prompt)


def test_sample_tokens_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    u = torch.tensor([row_uniform(row_key(0, 0, 0), s) for s in range(4000)])
    draws = sample_tokens(logits.expand(4000, -1), u, temperature=1.0)
    freq = torch.bincount(draws, minlength=4).double() / 4000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64),
                          atol=0.03)
    # top_p 0.5 keeps {0.4, 0.3} only, renormalised to 4/7, 3/7
    draws = sample_tokens(logits.expand(4000, -1), u, temperature=1.0, top_p=0.5)
    freq = torch.bincount(draws, minlength=4).double() / 4000
    assert freq[0] == 0 and freq[1] == 0 and abs(freq[3] - 4 / 7) < 0.03
    # the inverse CDF at the edges
    edge = sample_tokens(logits.expand(2, -1), torch.tensor([0.0, 1 - 1e-16]), temperature=1.0)
    assert edge.tolist() == [0, 3]


def test_stops_at_im_end_and_reports_unfinished(tok):
    from transformers import LlamaForCausalLM

    cls = type("TriggeredLlama", (Triggered, LlamaForCausalLM), {})
    model = tiny_model(len(tok), cls=cls)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    spec = GenerationSpec(temperature=0, max_new_tokens=10, batch_size=4)
    free = generate(model, tok, PROMPTS, spec, progress=False)
    # pick a prompt whose greedy response has a fresh token at some step k >= 1
    prompt_i, k = None, None
    for i, per_prompt in enumerate(free):
        toks, prompt_ids = per_prompt[0].token_ids, render_prompt(tok, PROMPTS[i])
        for step in range(1, len(toks) - 1):
            t = toks[step]
            if t not in toks[:step] and t not in prompt_ids and t != im_end:
                prompt_i, k = i, step
                break
        if prompt_i is not None:
            break
    assert prompt_i is not None
    base = free[prompt_i][0].token_ids
    model.trigger, model.target = base[k], im_end
    gens = generate(model, tok, PROMPTS, spec, progress=False)
    s = gens[prompt_i][0]
    assert s.token_ids == base[: k + 1] + [im_end]
    assert s.finished and s.num_tokens == k + 2
    assert s.text == tok.decode(base[: k + 1], skip_special_tokens=True).strip()
    assert "<|im_end|>" not in s.text
    # a row without the trigger runs to max_new_tokens and is marked unfinished
    others = [g[0] for g in gens if model.trigger not in g[0].token_ids
              and not set(g[0].token_ids) & set(stop_token_ids(tok))]
    assert others and all(not o.finished and o.num_tokens == 10 for o in others)


def test_training_mode_is_restored(tok, model):
    model.train()
    try:
        generate(model, tok, PROMPTS[:1], GenerationSpec(temperature=0, max_new_tokens=2),
                 progress=False)
        assert model.training
    finally:
        model.eval()


def test_backend_protocol(tok, model):
    assert isinstance(HFBackend(model, tok), Backend)

    class Canned:
        def generate(self, prompts, spec, *, n=1, seed=0, progress=True, desc="sampling"):
            return Generations([[] for _ in prompts])

    assert generate(None, None, PROMPTS, GenerationSpec(), backend=Canned()) == [[]] * 4
