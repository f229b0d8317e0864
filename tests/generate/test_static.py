"""The static-cache decoders (``generation.decoder: static | graph``, starpo.generate.static).

CPU (what runs in CI): the static loop, its decode step eager, gives the same tokens as
transformers ``generate`` (today's path, the reference) for the same seed — greedy,
sampled, top-p, with left padding, stop tokens, n samples per prompt, batch sizes that
leave a tail batch, float32 and float64 — so batching and order do not move a row's
random stream; the decode step traced once into a fixed sequence of ops (``make_fx``, as a
CUDA graph capture freezes it) and replayed gives the same tokens as running it eagerly,
which is what a CUDA graph relies on (no per-step host state outside the fixed buffers);
it stops when every row has ended; the choice of decoder and the recipe knobs.

GPU (``gpu``-marked, skipped without CUDA; ``scripts/gpu_check.sh`` runs them): that the
capture succeeds on that stack, that the replayed graph gives exactly the eager static
step's tokens in bf16 (and under bf16 autocast over fp32 weights), that static decoding
agrees with ``generate`` there up to bf16 round-off, and the throughput of each (printed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from starpo.errors import RecipeError, StarpoError
from starpo.generate import static
from starpo.generate.sampling import (HFBackend, generate, render_prompt, row_key,
                                      row_uniform, row_uniforms, stop_token_ids)
from starpo.recipe import GenerationSpec, recipe_from_dict
from sampling_cases import PROMPTS, Triggered, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.generation import time_generation

MORE_PROMPTS = PROMPTS + [
    [{"role": "user", "content": "apple banana cherry"}],
    [{"role": "system", "content": "you are a small robot who learns to paint"},
     {"role": "user", "content": "numbers like 1 2 3"}],
    [{"role": "user", "content": "a"}],
]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one thread


def _static(spec, rows, decoder="static"):
    return spec.model_copy(update={"decoder": decoder, "decode_batch_size": rows})


def _samples(gens):
    return [[(s.token_ids, s.text, s.finished) for s in g] for g in gens]


# --------------------------------------------------------------------------- random numbers

def test_row_uniforms_are_row_uniform_bit_for_bit():
    keys = [row_key(s, p, j) for s in (0, 7, 2 ** 63 + 5) for p in (0, 3, 2 ** 40)
            for j in (0, 1, 9)] + [0, 1, 2 ** 64 - 1]
    table = row_uniforms(keys, 200)
    assert table.shape == (len(keys), 200) and table.dtype == torch.float64
    expected = torch.tensor([[row_uniform(k, s) for s in range(200)] for k in keys],
                            dtype=torch.float64)
    assert torch.equal(table, expected)


# --------------------------------------------------------------------------- same tokens

SPECS = {
    "greedy": GenerationSpec(temperature=0, max_new_tokens=12, batch_size=4),
    "sampled": GenerationSpec(temperature=1.0, max_new_tokens=12, batch_size=3),
    "top_p": GenerationSpec(temperature=0.8, top_p=0.7, max_new_tokens=12, batch_size=5),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_static_equals_generate(tok, model, name):
    spec = SPECS[name]
    ref = generate(model, tok, MORE_PROMPTS, spec, n=3, seed=5, progress=False)
    # 21 rows: batches of 1, of 8 (a tail of 5), and all of them in one
    for rows in (1, 8, 21):
        got = generate(model, tok, MORE_PROMPTS, _static(spec, rows), n=3, seed=5,
                       progress=False)
        assert _samples(got) == _samples(ref), (name, rows)
        assert got.stats.tokens == ref.stats.tokens
    assert len({len(render_prompt(tok, p)) for p in MORE_PROMPTS}) > 3   # padding happened
    if name != "greedy":
        assert len({tuple(s.token_ids) for s in ref[0]}) > 1     # n samples really differ


def test_no_prompts(tok, model):
    gens = generate(model, tok, [], _static(SPECS["sampled"], "auto"), n=2, progress=False)
    assert gens == [] and gens.stats.sequences == 0


def test_static_equals_generate_in_float64(tok):
    model = tiny_model(len(tok), seed=3).double()
    spec = GenerationSpec(temperature=1.0, top_p=0.9, max_new_tokens=10, batch_size=2)
    ref = generate(model, tok, MORE_PROMPTS, spec, n=2, seed=1, progress=False)
    got = generate(model, tok, MORE_PROMPTS, _static(spec, 5), n=2, seed=1, progress=False)
    assert _samples(got) == _samples(ref)


def test_prompt_order_does_not_move_a_rows_stream(tok, model):
    """A prompt's samples depend on its stream index, not on where its row is batched."""
    spec = _static(GenerationSpec(temperature=1.0, max_new_tokens=10), 3)
    ref = generate(model, tok, MORE_PROMPTS, spec, n=2, seed=9, progress=False)
    order = [4, 0, 6, 2, 5, 1, 3]
    got = generate(model, tok, [MORE_PROMPTS[i] for i in order], spec, n=2, seed=9,
                   progress=False, indices=order)
    assert [_samples(got)[k] for k in range(len(order))] == [_samples(ref)[i] for i in order]


def test_stop_tokens_and_unfinished_rows_as_generate(tok):
    from transformers import LlamaForCausalLM

    cls = type("TriggeredLlama", (Triggered, LlamaForCausalLM), {})
    model = tiny_model(len(tok), cls=cls)
    spec = GenerationSpec(temperature=0, max_new_tokens=10, batch_size=4)
    free = generate(model, tok, MORE_PROMPTS, spec, progress=False)
    # the third token of the first prompt's greedy response ends that response from then on
    model.trigger = free[0][0].token_ids[2]
    model.target = tok.convert_tokens_to_ids("<|im_end|>")
    ref = generate(model, tok, MORE_PROMPTS, spec, progress=False)
    got = generate(model, tok, MORE_PROMPTS, _static(spec, 3), progress=False)
    assert _samples(got) == _samples(ref)
    assert ref[0][0].finished and ref[0][0].token_ids[-1] == model.target
    assert any(not g[0].finished for g in ref)            # and some ran to max_new_tokens


def _decoder(model, tok, prompts, *, T, check_every=1, temperature=1.0):
    ids = [render_prompt(tok, p) for p in prompts]
    dec = static.StaticDecoder(
        model, rows=len(ids), cache_len=static.cache_length([len(x) for x in ids], T),
        max_new_tokens=T, stops=stop_token_ids(tok, model), pad=tok.pad_token_id,
        temperature=temperature, top_p=1.0, graph=False, check_every=check_every)
    u = row_uniforms([row_key(0, i, 0) for i in range(len(ids))], T)
    return dec, ids, u


class _Counting:
    """Mixin: counts forward calls."""

    calls = 0

    def forward(self, *a, **kw):
        type(self).calls += 1
        return super().forward(*a, **kw)


@pytest.mark.parametrize("check_every", [1, 4])
def test_stops_when_every_row_has_ended(tok, check_every):
    from transformers import LlamaForCausalLM

    cls = type("EndsAtOnce", (_Counting, Triggered, LlamaForCausalLM), {})
    model = tiny_model(len(tok), cls=cls)
    dec, ids, u = _decoder(model, tok, PROMPTS, T=12, check_every=check_every)
    cls.calls = 0
    assert len(dec.run(ids, u)[0]) == 12 and cls.calls == 12    # unscripted: all the way
    # scripted: every prompt ends with the assistant header, which now ends the response
    assert len({p[-1] for p in ids}) == 1
    model.trigger, model.target = ids[0][-1], tok.convert_tokens_to_ids("<|im_end|>")
    cls.calls = 0
    out = dec.run(ids, u)
    # the prefill draws the stop token for every row; the host notices at the next check
    assert cls.calls == check_every
    assert out == [[model.target] + [tok.pad_token_id] * (check_every - 1)] * len(ids)


def test_decode_step_replays_as_a_frozen_trace(tok, model):
    """What a CUDA graph does, on the CPU: record the decode step's ops once (make_fx
    traces the aten ops with every tensor it reads held by reference, baking in every
    host value, as stream capture does) and replay that recording for every token. The
    tokens equal the eager step's only if the step keeps no per-token state on the host
    (a Python step counter, a mask rebuilt from Python ints, ...)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    for temperature in (0.0, 1.0):
        dec, ids, u = _decoder(model, tok, MORE_PROMPTS, T=10, temperature=temperature)
        ref = dec.run(ids, u)
        with torch.no_grad():
            dec._prefill(ids, u)
            replay = make_fx(lambda: dec._decode_step())()
            dec._prefill(ids, u)              # the trace ran the step once: start over
            for _ in range(9):
                replay()
        assert dec.out.tolist() == ref
        assert len({tuple(r) for r in ref}) > 1


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_decode_step_reads_no_device_value_on_the_host(tok, model, temperature, top_p):
    """Stream capture fails on any host read of a device value (``.item()``, ``bool(t)``,
    a data-dependent shape), in our step or in transformers' forward and mask code. A
    trace over fake tensors fails on exactly those reads, so it passing shows the step has
    none (on this transformers version); the control below shows it would notice one."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def fake_trace(step):
        return make_fx(step, tracing_mode="fake", _allow_non_fake_inputs=True)()

    dec, ids, u = _decoder(model, tok, PROMPTS, T=8, temperature=temperature)
    dec.top_p = top_p
    with torch.no_grad():
        dec._prefill(ids, u)
        assert len(fake_trace(lambda: dec._decode_step()).graph.nodes) > 50

        def with_a_host_read():
            if bool(dec.finished.any()):
                pass
            dec._decode_step()

        with pytest.raises(Exception, match="data-dependent"):
            fake_trace(with_a_host_read)


# --------------------------------------------------------------------------- the choice

def test_choose_decoder(tok, model):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert static.choose_decoder("auto", model, cpu).kind == "generate"
    assert static.choose_decoder("generate", model, cuda).kind == "generate"
    assert static.choose_decoder("static", model, cpu).kind == "static"
    graph_on_cpu = static.choose_decoder("graph", model, cpu)
    assert graph_on_cpu.kind == "static" and "CUDA" in graph_on_cpu.why
    # on CUDA with sdpa: a graph (only the choice is made here; nothing runs on the device)
    assert static.choose_decoder("auto", model, cuda).kind == "graph"
    model.config._attn_implementation = "flash_attention_2"
    try:
        c = static.choose_decoder("graph", model, cuda)
        assert c.kind == "static" and "flash_attention_2" in c.why
    finally:
        model.config._attn_implementation = "sdpa"


def test_model_without_static_cache_support(tok, model, monkeypatch):
    monkeypatch.setattr(type(model), "_can_compile_fullgraph", False)
    assert static.choose_decoder("auto", model, torch.device("cuda")).kind == "generate"
    with pytest.raises(StarpoError, match="static KV cache.*decoder: generate"):
        static.choose_decoder("static", model, torch.device("cpu"))


def test_sharded_model_keeps_generate(tok):
    model = tiny_model(len(tok))
    next(model.parameters()).ds_id = 0          # what DeepSpeed ZeRO-3 tags parameters with
    c = static.choose_decoder("auto", model, torch.device("cuda"))
    assert c.kind == "generate" and "sharded" in c.why


def test_backend_reports_its_decoder_and_rows(tok, model):
    backend = HFBackend(model, tok)
    spec = GenerationSpec(temperature=1.0, max_new_tokens=4, batch_size=3)
    backend.generate(PROMPTS, spec, n=2, progress=False)
    assert backend.last_decoder["decoder"] == "generate"
    assert backend.last_decoder["rows_per_batch"] == 3
    backend.generate(PROMPTS, _static(spec, "auto"), n=2, progress=False)
    assert backend.last_decoder == {"decoder": "static", "rows_per_batch": 3,
                                    "why": "static KV cache, eager decode step",
                                    "graph": "not used"}


def test_auto_rows_halve_on_out_of_memory(tok, model, monkeypatch):
    """decode_batch_size auto: a batch that runs out of GPU memory is retried with half the
    rows (same samples); an explicit decode_batch_size is the user's, so the error stands."""
    run = static.StaticDecoder.run

    def small_memory(self, prompts, uniforms):
        if self.rows > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return run(self, prompts, uniforms)

    spec = GenerationSpec(temperature=1.0, max_new_tokens=6, batch_size=8)
    ref = generate(model, tok, MORE_PROMPTS, spec, n=2, seed=4, progress=False)
    monkeypatch.setattr(static.StaticDecoder, "run", small_memory)
    backend = HFBackend(model, tok)
    got = backend.generate(MORE_PROMPTS, _static(spec, "auto"), n=2, seed=4, progress=False)
    assert backend.last_decoder["rows_per_batch"] == 2            # 8 → 4 → 2
    assert _samples(got) == _samples(ref)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        backend.generate(MORE_PROMPTS, _static(spec, 8), n=2, seed=4, progress=False)


def test_recipe_knobs():
    def recipe(gen):
        return recipe_from_dict({"name": "x", "model": {"name_or_path": "tiny"},
                                 "stages": [{"type": "eval", "generation": gen}]})

    spec = recipe({"decoder": "graph", "decode_batch_size": 64}).stages[0].generation
    assert spec.decoder == "graph" and spec.decode_batch_size == 64
    # the defaults stay out of dumps: stage hashes and sample-cache keys do not move
    assert set(GenerationSpec().model_dump()) == {"temperature", "top_p", "max_new_tokens",
                                                  "batch_size"}
    for bad, field in (({"decoder": "fast"}, "decoder"),
                       ({"decode_batch_size": 0}, "decode_batch_size"),
                       ({"decode_batch_size": "many"}, "decode_batch_size")):
        with pytest.raises(RecipeError, match=field):
            recipe(bad)


def test_timing_helper_reports_throughput(tok, model):
    r = time_generation(model, tok, prompts=PROMPTS, new_tokens=6, n=2, decoder="static",
                        decode_batch_size=3)
    assert r["decoder"] == "static" and r["rows_per_batch"] == 3 and r["sequences"] == 8
    assert 0 < r["tokens"] <= r["max_tokens"] == 48
    assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    assert r["wall_s"] >= r["seconds"] > 0 and r["device"] == "cpu"


# --------------------------------------------------------------------------- on CUDA

def _gpu_model(tok, *, dtype, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
                      max_position_embeddings=512, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.to(device="cuda", dtype=dtype).eval()


def _gpu_prompts(k=48):
    words = "the cat sat on the mat and looked at the dog apple banana cherry".split()
    return [[{"role": "user", "content": " ".join(words[: 1 + (i * 7) % len(words)])
              + f" {i}"}] for i in range(k)]


def _agree(a, b) -> float:
    rows = [(x.token_ids, y.token_ids) for ga, gb in zip(a, b) for x, y in zip(ga, gb)]
    return sum(x == y for x, y in rows) / len(rows)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_gpu_graph_replay_equals_eager_static_bf16(tok, temperature):
    """The replayed graph runs the eager step's kernels on the same buffers: the same
    tokens, bit for bit (bf16 weights, as evaluation loads a model on a GPU)."""
    model = _gpu_model(tok, dtype=torch.bfloat16)
    spec = GenerationSpec(temperature=temperature, top_p=0.95, max_new_tokens=48)
    backend = HFBackend(model, tok)
    graph = backend.generate(_gpu_prompts(), _static(spec, 32, "graph"), n=2, seed=3,
                             progress=False)
    assert backend.last_decoder["graph"] == "replayed", backend.last_decoder
    eager = generate(model, tok, _gpu_prompts(), _static(spec, 32, "static"), n=2, seed=3,
                     progress=False)
    assert _samples(graph) == _samples(eager)


@pytest.mark.gpu
def test_gpu_graph_with_one_to_three_new_tokens(tok):
    """The capture's warm-up must not step past the last token (a device-side assert)."""
    model = _gpu_model(tok, dtype=torch.bfloat16)
    for T in (1, 2, 3):
        spec = GenerationSpec(temperature=0.8, max_new_tokens=T)
        graph = generate(model, tok, _gpu_prompts(8), _static(spec, 8, "graph"), n=2,
                         seed=2, progress=False)
        eager = generate(model, tok, _gpu_prompts(8), _static(spec, 8, "static"), n=2,
                         seed=2, progress=False)
        assert _samples(graph) == _samples(eager)


@pytest.mark.gpu
def test_gpu_graph_under_autocast_over_fp32_weights(tok):
    """Online rounds sample the training policy (fp32 weights); under bf16 autocast the
    graph must not keep autocast's cached weight casts (they are freed when the block
    ends): the graph equals the eager static step, and a second call still does."""
    model = _gpu_model(tok, dtype=torch.float32)
    spec = GenerationSpec(temperature=0.8, max_new_tokens=32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = generate(model, tok, _gpu_prompts(24), _static(spec, 16, "static"), n=2,
                         seed=1, progress=False)
        graph = generate(model, tok, _gpu_prompts(24), _static(spec, 16, "graph"), n=2,
                         seed=1, progress=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        again = generate(model, tok, _gpu_prompts(24), _static(spec, 16, "graph"), n=2,
                         seed=1, progress=False)
    assert _samples(graph) == _samples(eager) == _samples(again)


@pytest.mark.gpu
def test_gpu_static_agrees_with_generate_and_is_faster(tok):
    """bf16 on CUDA: the static decoders attend over a wider (masked) cache than generate,
    so round-off may move a near-tie; most rows must still match exactly. Prints the
    throughput of generate (today's path), the eager static loop and the graph."""
    model = _gpu_model(tok, dtype=torch.bfloat16)
    spec = GenerationSpec(temperature=0.8, max_new_tokens=64, batch_size=32)
    prompts = _gpu_prompts(64)
    ref = generate(model, tok, prompts, spec.model_copy(update={"decoder": "generate"}),
                   n=2, seed=0, progress=False)
    auto = HFBackend(model, tok)
    got = auto.generate(prompts, spec, n=2, seed=0, progress=False)      # auto → graph
    assert auto.last_decoder["decoder"] == "graph"
    assert auto.last_decoder["rows_per_batch"] == 128          # auto: all rows fit
    rate = _agree(ref, got)
    speeds = {d: time_generation(model, tok, prompts=prompts, new_tokens=64, n=2,
                                 decoder=d, temperature=0.8)
              for d in ("generate", "static", "graph")}
    print(f"\nstatic vs generate, rows with identical tokens: {rate:.2%}")
    for d, r in speeds.items():
        print(f"{d:8s} {r['tokens_per_s']:10,.0f} tokens/s  {r['rows_per_batch']} rows/batch"
              f"  graph: {r['graph']}  ({r['tokens']} tokens, {r['seconds']:.3f}s)")
    assert rate >= 0.75
    assert speeds["graph"]["tokens_per_s"] > speeds["generate"]["tokens_per_s"]
