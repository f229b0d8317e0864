"""The vLLM sampling backend (``generation.backend: vllm``) against a stand-in for vLLM.

What this proves: *our adapter* — that it renders prompts exactly as the HF backend does
and passes them as token ids, turns the spec into ``SamplingParams`` (n, temperature,
top_p, max_tokens, the HF backend's stop ids, one seed per prompt derived from the
prompt's global index), keeps stop tokens in ``token_ids``, decodes text the HF way,
repeats a greedy answer n times, gives the engine's memory back (sleep level 2, no
reference kept), plugs into evaluation and the pipeline, and that a missing vLLM is one
line naming the extra. What it does not prove: anything about vLLM itself (its kernels,
its sampler's draws, its memory behaviour, its version-to-version API) — the stand-in
implements only the part of ``vllm.LLM`` / ``vllm.SamplingParams`` the adapter uses, with
a plain transformers forward on the CPU; ``scripts/gpu_check.sh`` runs the real one.
"""

from __future__ import annotations

import gc
import sys
import types
import weakref

import pytest
import torch

from starpo.errors import StarpoError
from starpo.generate import vllm as V
from starpo.generate.backends import make_backend
from starpo.generate.sampling import HFBackend, render_prompt
from starpo.model.chat import stop_token_ids
from starpo.recipe import GenerationSpec

PROMPTS = [[{"role": "user", "content": t}] for t in
           ("tell me about the river", "what is a lantern", "hello", "name a colour",
            "why is the sky blue", "count to three")]


# --------------------------------------------------------------------------- the stand-in

class SamplingParams:
    """Stand-in for ``vllm.SamplingParams``: records the keyword arguments it is given."""

    def __init__(self, *, n=1, temperature=1.0, top_p=1.0, max_tokens=16, stop_token_ids=None,
                 seed=None, skip_special_tokens=True):
        self.n, self.temperature, self.top_p, self.max_tokens = n, temperature, top_p, max_tokens
        self.stop_token_ids, self.seed = list(stop_token_ids or []), seed
        self.skip_special_tokens = skip_special_tokens


class _Completion:
    def __init__(self, token_ids, finish_reason, stop_reason):
        self.token_ids, self.finish_reason, self.stop_reason = token_ids, finish_reason, \
            stop_reason
        self.text = "<the stand-in's text is not what the adapter reports>"


class _RequestOutput:
    def __init__(self, outputs):
        self.outputs = outputs


class LLM:
    """Stand-in for ``vllm.LLM``: loads the checkpoint with transformers (CPU) and samples
    each request from its own ``torch.Generator`` seeded by the request's seed (vLLM's
    per-request seed semantics); a request's draws never depend on the other requests.
    ``drop_stop_token`` mimics an engine that leaves the stop token out of ``token_ids``;
    ``stop_at`` makes every sequence emit its first stop id at that step (an untrained
    model rarely ends a turn by itself)."""

    instances: list = []
    drop_stop_token = False
    stop_at: int | None = None

    def __init__(self, *, model, tokenizer, dtype, seed, gpu_memory_utilization,
                 enable_sleep_mode, **kw):
        from transformers import AutoModelForCausalLM
        self.kwargs = dict(model=model, tokenizer=tokenizer, dtype=dtype, seed=seed,
                           gpu_memory_utilization=gpu_memory_utilization,
                           enable_sleep_mode=enable_sleep_mode, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(model).float().eval()
        self.slept = None
        self.requests: list = []
        LLM.instances.append(weakref.ref(self))
        LLM.last_kwargs = self.kwargs
        LLM.last = weakref.ref(self)

    @torch.no_grad()
    def _one(self, ids, p: SamplingParams, gen: torch.Generator):
        out = []
        x = torch.tensor([ids])
        for step in range(p.max_tokens):
            logits = self.model(x).logits[0, -1].double()
            if step == LLM.stop_at:
                t = p.stop_token_ids[0]
            elif p.temperature == 0:
                t = int(logits.argmax())
            else:
                probs = torch.softmax(logits / p.temperature, -1)
                if p.top_p < 1:
                    sp, order = torch.sort(probs, descending=True)
                    keep = (sp.cumsum(0) - sp) < p.top_p
                    probs = torch.zeros_like(probs).scatter(0, order[keep], sp[keep])
                t = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
            out.append(t)
            x = torch.cat([x, torch.tensor([[t]])], 1)
            if t in p.stop_token_ids:
                if LLM.drop_stop_token:
                    out.pop()
                return out, "stop", t
        return out, "length", None

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.requests.append((prompts, sampling_params))
        results = []
        for pr, p in zip(prompts, sampling_params):
            gen = torch.Generator().manual_seed(p.seed)
            results.append(_RequestOutput([_Completion(*self._one(pr["prompt_token_ids"], p, gen))
                                           for _ in range(p.n)]))
        LLM.last_requests = self.requests
        return results

    def sleep(self, level=1):
        self.slept = level
        LLM.last_sleep = level
        self.model = None


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    mod.__spec__ = types.SimpleNamespace(name="vllm")   # find_spec sees it
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(V, "available", lambda: True)
    LLM.instances.clear()
    LLM.drop_stop_token, LLM.stop_at = False, None
    return mod


def _spec(**kw):
    return GenerationSpec(**{"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12,
                             "backend": "vllm", **kw})


# --------------------------------------------------------------------------- the adapter

def test_sampling_params_prompts_and_seeds(fake_vllm, base):
    be = make_backend(_spec(), tokenizer=base["tok"], path=base["path"])
    assert isinstance(be, V.VLLMBackend)
    gens = be.generate(PROMPTS, _spec(), n=3, seed=7, progress=False)
    prompts, params = LLM.last_requests[0]
    # the same token ids as the HF backend renders, no text prompts
    assert [p["prompt_token_ids"] for p in prompts] == [render_prompt(base["tok"], m)
                                                        for m in PROMPTS]
    stops = stop_token_ids(base["tok"])
    for i, p in enumerate(params):
        assert (p.n, p.temperature, p.top_p, p.max_tokens) == (3, 1.0, 0.9, 12)
        assert p.stop_token_ids[:len(stops)] == stops
        assert p.seed == V.prompt_seed(7, i)
    assert len({p.seed for p in params}) == len(PROMPTS)    # one seed per prompt
    assert LLM.last_kwargs["model"] == base["path"] and LLM.last_kwargs["enable_sleep_mode"]
    assert "distributed_executor_backend" not in LLM.last_kwargs   # one process
    assert len(gens) == len(PROMPTS) and all(len(g) == 3 for g in gens)
    for g in gens:
        for s in g:
            assert s.num_tokens == len(s.token_ids) <= 12
            assert s.finished == (bool(s.token_ids) and s.token_ids[-1] in stops)
            assert s.text == base["tok"].decode(s.token_ids, skip_special_tokens=True).strip()


def test_samples_do_not_depend_on_batch_or_block(fake_vllm, base):
    """A prompt's samples are the same alone, in another order, or as a block of a sharded
    list (its global index as the stream): one seed per prompt."""
    be = V.VLLMBackend(base["path"], base["tok"])
    spec = _spec()
    full = be.generate(PROMPTS, spec, n=2, seed=3, progress=False)
    block = be.generate(PROMPTS[2:5], spec, n=2, seed=3, progress=False, indices=[2, 3, 4])
    rev = be.generate(PROMPTS[::-1], spec, n=2, seed=3, progress=False,
                      indices=list(range(len(PROMPTS)))[::-1])
    ids = lambda g: [[s.token_ids for s in grp] for grp in g]
    assert ids(block) == ids(full)[2:5]
    assert ids(rev) == ids(full)[::-1]
    other = be.generate(PROMPTS, spec, n=2, seed=4, progress=False)
    assert ids(other) != ids(full)


def test_greedy_equals_the_hf_backend(fake_vllm, base):
    """Temperature 0: the stand-in's argmax loop and our HF backend agree token for token,
    so rendering, stopping and decoding are the same in both adapters; n greedy samples
    are one answer repeated."""
    spec = _spec(temperature=0.0, max_new_tokens=10)
    v = V.VLLMBackend(base["path"], base["tok"]).generate(PROMPTS, spec, n=2, seed=0,
                                                           progress=False)
    h = HFBackend(base["model"].float().eval(), base["tok"]).generate(
        PROMPTS, spec.model_copy(update={"backend": "hf"}), n=2, seed=0, progress=False)
    assert LLM.last_requests[0][1][0].n == 1
    for gv, gh in zip(v, h):
        assert [(s.token_ids, s.text, s.finished) for s in gv] == \
            [(s.token_ids, s.text, s.finished) for s in gh]


def test_stop_token_is_kept_when_the_engine_leaves_it_out(fake_vllm, base):
    spec = _spec(temperature=0.0, max_new_tokens=12)
    LLM.stop_at = 5
    keep = V.VLLMBackend(base["path"], base["tok"]).generate(PROMPTS, spec, progress=False)
    LLM.drop_stop_token = True
    drop = V.VLLMBackend(base["path"], base["tok"]).generate(PROMPTS, spec, progress=False)
    assert all(g[0].finished and g[0].num_tokens == 6 for g in keep)
    assert [(g[0].token_ids, g[0].finished) for g in drop] == \
        [(g[0].token_ids, g[0].finished) for g in keep]


def test_memory_is_given_back(fake_vllm, base):
    V.VLLMBackend(base["path"], base["tok"]).generate(PROMPTS[:2], _spec(), progress=False)
    gc.collect()
    assert LLM.last_sleep == 2                      # weights and KV cache freed
    assert all(r() is None for r in LLM.instances)  # and no reference to the engine kept


def test_several_processes_use_the_external_launcher(fake_vllm, base):
    from starpo.runtime import Runtime
    rt = Runtime(torch.device("cpu"), process_index=1, num_processes=2)
    V.VLLMBackend(base["path"], base["tok"], runtime=rt).generate(PROMPTS[:1], _spec(),
                                                                  progress=False)
    assert LLM.last_kwargs["distributed_executor_backend"] == "external_launcher"
    assert LLM.last_kwargs["tensor_parallel_size"] == 1


def test_evaluation_samples_through_vllm(fake_vllm, base, tmp_path):
    from starpo.judges.gold import GoldJudge
    from starpo.metrics.evaluation import evaluate_models
    rows = [{"prompt": m, "chosen": None, "id": str(i)} for i, m in enumerate(PROMPTS)]
    res = evaluate_models({"m": base["path"]}, rows, GoldJudge(), _spec(max_new_tokens=8),
                          seed=0, bootstrap=0, out_dir=tmp_path / "eval", device="cpu")
    assert len(res.samples["m"].responses) == len(PROMPTS)
    assert len(LLM.last_requests[0][0]) == len(PROMPTS)
    assert (tmp_path / "eval" / "summary.json").is_file()


# --------------------------------------------------------------------------- without vLLM

def test_missing_vllm_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    from starpo.recipe import recipe_from_dict
    from starpo.run import pipeline
    from conftest import TINY
    monkeypatch.setattr(V, "available", lambda: False)
    with pytest.raises(StarpoError) as err:
        V.VLLMBackend("x", object())
    assert "pip install 'starpo[vllm]'" in str(err.value) and "\n" not in str(err.value)
    recipe = recipe_from_dict({
        "name": "v", "model": {"name_or_path": "tiny", "tiny": TINY},
        "stages": [{"type": "eval", "data": {"sources": [{"path": "world:eval", "n": 4}]},
                    "generation": {"backend": "vllm"}}]})
    with pytest.raises(StarpoError, match=r"stages\.eval\.generation\.backend: vllm is not "
                                          r"installed; pip install 'starpo\[vllm\]'"):
        pipeline.run(recipe, tmp_path / "run", log=lambda m: None, progress=False,
                     report=False)
    assert not (tmp_path / "run" / "base").exists()      # stopped before any stage


def test_hf_stays_the_default():
    assert GenerationSpec().backend == "hf"
    assert "backend" not in GenerationSpec().model_dump()    # old cache keys unchanged


def test_online_round_samples_its_checkpoint_through_vllm(fake_vllm, tmp_path):
    """An online round with ``backend: vllm`` samples the saved policy checkpoint (not the
    model in memory), then trains; the round's samples are the stand-in's."""
    from conftest import FAST, TINY, quiet
    from starpo.recipe import recipe_from_dict
    from starpo.run import pipeline
    recipe = recipe_from_dict({
        "name": "v", "seed": 0, "model": {"name_or_path": "tiny", "tiny": TINY},
        "stages": [
            {"type": "sft", "data": {"sources": [{"path": "world:sft", "n": 60}]},
             "packing": {"max_length": 128}, "train": {**FAST, "lr": 1e-3}},
            {"type": "online", "beta": 0.5, "max_length": 128, "max_prompt_length": 64,
             "rounds": 1, "prompts_per_round": 6, "n_samples": 2,
             "generation": {"backend": "vllm", "max_new_tokens": 8},
             "judge": {"type": "gold"}, "data": {"sources": [{"path": "world:prompt", "n": 20}]},
             "train": {**FAST, "max_steps": 1, "batch_size": 2, "lr": 1e-4}}]})
    out = tmp_path / "run"
    pipeline.run(recipe, out, log=quiet, progress=False, report=False)
    assert LLM.last_kwargs["model"] == str(out / "sft" / "model")
    assert len(LLM.last_requests[0][0]) == 6 and LLM.last_sleep == 2
    assert (out / "online" / "round_1" / "model" / "config.json").is_file()
