"""The reference pass sized to the run: only the pairs max_steps reaches (and the held-out
ones) are computed, and a longer rerun adds only what it lacks."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_pairs, tiny_llama
from starpo.data import prefbatch as PB
from starpo.model.logprobs import sequence_logprobs
from starpo.recipe import PreferenceSpec, TrainSpec
from starpo.runtime import Runtime
from starpo.train.loop import run_loop, trained_microbatches
from starpo.train.preference import PreferenceTask
from starpo.train.refcache import reference_logps_for

VOCAB = 60


def _pairs(n, seed=0):
    return random_pairs(n, VOCAB, seed)


class _Recording(PreferenceTask):
    """The preference task, recording the pair indices of every micro-batch trained on."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: set[int] = set()

    def loss(self, module, batch):
        self.seen.update(int(i) for i in batch.meta["pairs"])
        return super().loss(module, batch)


@pytest.mark.parametrize("n,spec,some", [
    (40, dict(max_steps=3, batch_size=4), True),                # a few steps of one epoch
    (40, dict(max_steps=2, batch_size=4, grad_accum=3), True),  # accumulation
    (46, dict(max_steps=13, batch_size=4), False),              # into a second epoch
    (40, dict(epochs=0.3, batch_size=4), True),                 # a fraction of an epoch
    (12, dict(epochs=1, batch_size=4), False),                  # everything
])
def test_trained_pairs_are_the_pairs_the_loop_trains_on(n, spec, some, tmp_path, one_thread):
    ts = TrainSpec(lr=1e-3, log_every=100, **spec)
    pspec = PreferenceSpec(loss="simpo")       # no reference needed to run the loop
    task = _Recording(_pairs(n), pspec, batch_size=ts.batch_size, pad_id=0, seed=3)
    predicted = task.trained_pairs(ts)
    run_loop(tiny_llama(VOCAB), task, ts, tmp_path, seed=0, progress=False)
    assert predicted == sorted(task.seen)
    assert (len(predicted) < n) == some


def test_trained_microbatches_over_processes_is_the_union_of_the_ranks_shares():
    # the loop's own arithmetic, written out plainly: rank r takes [r::world][:per_proc],
    # step j of an epoch its micro-batches j·ga … (j+1)·ga
    n, world, ga, steps = 23, 3, 2, 5
    per_proc = n // world
    spe = math.ceil(per_proc / ga)
    want: dict[int, set[int]] = {}
    for step in range(steps):
        e, j = divmod(step, spe)
        for r in range(world):
            mine = list(range(n))[r::world][:per_proc]
            want.setdefault(e, set()).update(mine[j * ga:(j + 1) * ga])
    got = trained_microbatches(n, TrainSpec(max_steps=steps, grad_accum=ga), world)
    assert got == {e: sorted(v) for e, v in want.items()}


@torch.no_grad()
def _plain(model, pairs):
    b = PB.collate_padded([p.as_dict() for p in pairs], pad_id=0)
    lp, _, _ = sequence_logprobs(model, b)
    return lp[0::2], lp[1::2]


def test_a_subset_is_computed_alone_and_a_longer_rerun_adds_only_the_rest(tmp_path,
                                                                          one_thread):
    model = tiny_llama(VOCAB, seed=1)
    ref_dir = tmp_path / "ref"
    from starpo.model.loading import save_pretrained
    save_pretrained(model, None, ref_dir)

    class Tok:     # the fingerprint reads the vocabulary and the template
        chat_template = None
        def get_vocab(self):
            return {str(i): i for i in range(VOCAB)}

    pairs = _pairs(30, seed=4)
    loads = []

    def load():
        loads.append(1)
        return model

    rt = Runtime(torch.device("cpu"))
    kw = dict(cache_dir=tmp_path / "cache", runtime=rt, load_model=load, progress=False,
              log=lambda m: None, batch_size=4)
    first = [1, 5, 7, 20, 29]
    a = reference_logps_for(str(ref_dir), Tok(), pairs, first, **kw)
    pc, pr = _plain(model, pairs)
    for i in range(len(pairs)):
        if i in first:
            assert a.chosen[i].item() == pytest.approx(pc[i].item(), abs=1e-4)
            assert a.rejected[i].item() == pytest.approx(pr[i].item(), abs=1e-4)
        else:
            assert math.isnan(a.chosen[i].item()) and math.isnan(a.rejected[i].item())
    assert not a.hit and len(loads) == 1

    # a longer run: the five are read back, only the other ones computed
    second = list(range(0, 30, 2)) + first
    said: list[str] = []
    b = reference_logps_for(str(ref_dir), Tok(), pairs, second, **{**kw, "log": said.append})
    rest = len(set(second) - set(first))
    assert rest == 14 and any(f"computing for {rest} pairs" in m for m in said), said
    assert len(loads) == 2
    for i in set(second):
        assert b.chosen[i].item() == pytest.approx(pc[i].item(), abs=1e-4)
    for i in first:     # the same numbers as the first run (read, not recomputed)
        assert b.chosen[i].item() == a.chosen[i].item()

    # everything cached now: nothing is loaded
    c = reference_logps_for(str(ref_dir), Tok(), pairs, sorted(set(second)), **kw)
    assert c.hit and len(loads) == 2
    assert torch.equal(c.chosen[sorted(set(second))], b.chosen[sorted(set(second))])

    # an entry damaged outside starpo: its pairs are computed again, not read
    first_entry = kw["cache_dir"] / f"ref-{a.key}.safetensors"
    first_entry.write_bytes(b"not a safetensors file")
    said.clear()
    d = reference_logps_for(str(ref_dir), Tok(), pairs, first, **{**kw, "log": said.append})
    assert any("computing" in m for m in said) and len(loads) == 3
    torch.testing.assert_close(d.chosen[first], a.chosen[first])


def test_all_pairs_is_the_plain_cached_pass(tmp_path, one_thread):
    """needed=None writes the same entry reference_logps always wrote (same key)."""
    from starpo.model.loading import save_pretrained
    from starpo.train.refcache import cache_key
    model = tiny_llama(VOCAB, seed=2)
    save_pretrained(model, None, tmp_path / "ref")

    class Tok:
        chat_template = None
        def get_vocab(self):
            return {str(i): i for i in range(VOCAB)}

    pairs = _pairs(9, seed=5)
    r = reference_logps_for(str(tmp_path / "ref"), Tok(), pairs, None,
                            cache_dir=tmp_path / "cache", runtime=Runtime(torch.device("cpu")),
                            load_model=lambda: model, progress=False, log=lambda m: None)
    assert r.key == cache_key(str(tmp_path / "ref"), Tok(), pairs)
    assert not torch.isnan(r.chosen).any()
