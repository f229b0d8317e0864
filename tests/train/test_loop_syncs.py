"""Host reads of device values in the training loop: a fixed few per optimizer step, not one
per metric and micro-batch.

On a GPU every read of a device value (``.item()``, ``float(t)``, ``.tolist()``, ``bool(t)``)
makes the host wait until the device has caught up; the device then idles while the host
queues the next kernels. This CPU test counts such reads made by the loop and the stages'
tasks (frames of ``starpo.train`` and ``starpo.stages``) and fails if they grow with the
number of micro-batches per step. It proves the structure, not a GPU timing."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import random_docs, tiny_llama
from starpo.data.packing import layout_sft
from starpo.data.prefbatch import collate_prefix_shared
from starpo.model import attention as A
from starpo.model.logprobs import sequence_logprobs
from starpo.recipe import TrainSpec
from starpo.stages.sft import SFTTask
from starpo.train.loop import run_loop
from attention_cases import llama, pairs

WATCHED = ("starpo.train.", "starpo.stages.")


class HostReads:
    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(real))

    def _counted(self, real):
        def read(t, *a, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(WATCHED):
                self.n += 1
            return real(t, *a, **k)
        return read


def _reads(monkeypatch, tmp_path, grad_accum: int, steps: int) -> int:
    lay = layout_sft(random_docs(64, lo=8, hi=30, seed=0), mode="pack", loss_masking=True,
                     max_length=64)
    task = SFTTask(lay, batch_size=2, pad_id=0, seed=0, flat=True)
    spec = TrainSpec(lr=1e-3, max_steps=steps, batch_size=2, grad_accum=grad_accum,
                     log_every=1000)
    with monkeypatch.context() as m:
        reads = HostReads(m)
        run_loop(tiny_llama(100), task, spec, tmp_path / f"a{grad_accum}-{steps}", seed=0,
                 progress=False)
    return reads.n


def test_host_reads_do_not_grow_with_micro_batches(monkeypatch, tmp_path):
    # the last step is a logged one (one read of all the window's metrics): difference it out
    per_step = {a: _reads(monkeypatch, tmp_path, a, 4) - _reads(monkeypatch, tmp_path, a, 2)
                for a in (1, 4)}
    assert per_step[1] == per_step[4]
    assert per_step[1] / 2 <= 1          # one read per step: the non-finite check


def test_row_layouts_are_read_from_the_host_copy_of_the_positions(monkeypatch):
    """A batch moved to a device keeps its CPU position ids; the kernels read every row's
    documents from them, never from the device copy."""
    model = llama()
    b = collate_prefix_shared(pairs(6), dense_mask=False)
    moved = b.to("cpu")                     # same device: nothing kept
    assert "host_position_ids" not in moved.meta
    host = b.position_ids.clone()
    moved.meta["host_position_ids"] = host  # what .to("cuda") leaves
    lo, hi = host.data_ptr(), host.data_ptr() + host.numel() * host.element_size()
    seen = []
    real = A._segments

    def spy(row):
        seen.append(lo <= row.data_ptr() < hi)
        return real(row)
    monkeypatch.setattr(A, "_segments", spy)
    with torch.no_grad():
        got = sequence_logprobs(model, moved)[0]
        want = sequence_logprobs(model, b)[0]
    assert seen and seen[:host.shape[0]] == [True] * host.shape[0]
    assert len(seen) == 2 * host.shape[0]   # once per forward, not per layer
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moving_to_cuda_keeps_the_host_positions():
    b = collate_prefix_shared(pairs(3), dense_mask=False)
    moved = b.to("cuda")
    assert moved.meta["host_position_ids"] is b.position_ids
    assert moved.to("cuda").meta["host_position_ids"] is b.position_ids
