"""The shared loop: accumulation keeps the loss scale, resume reproduces, NaN stops safely."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_docs, tiny_llama
from starpo.recipe import TrainSpec
from starpo.data.packing import layout_sft
from starpo.errors import TrainingError
from starpo.stages.sft import SFTTask
from starpo.train.checkpoint import latest_checkpoint
from starpo.train.loop import LoopHooks, run_loop


def _task(batch_size, n=32, seed=0):
    lay = layout_sft(random_docs(n, lo=8, hi=30, seed=seed), mode="pad", loss_masking=True,
                     max_length=64)
    return SFTTask(lay, batch_size=batch_size, pad_id=0, seed=0)


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _close(a, b, atol):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_gradient_accumulation_keeps_the_loss_scale(tmp_path):
    """4 rows in one micro-batch == 2 micro-batches of 2 rows (documents of unequal length:
    a per-micro-batch mean would weight them differently)."""
    # plain SGD: the weight change is lr × gradient, so weights compare gradients directly
    # (Adam's g/√v would turn float noise in near-zero gradients into ±lr steps)
    sgd = lambda m, s: torch.optim.SGD(m.parameters(), lr=s.lr)
    spec = dict(lr=1.0, max_steps=3, warmup_ratio=0, scheduler="constant", log_every=1,
                max_grad_norm=None)
    m0, m1, m2 = tiny_llama(100), tiny_llama(100), tiny_llama(100)
    run_loop(m1, _task(4), TrainSpec(batch_size=4, grad_accum=1, **spec), tmp_path / "a",
             seed=0, progress=False, hooks=LoopHooks(make_optimizer=sgd))
    run_loop(m2, _task(2), TrainSpec(batch_size=2, grad_accum=2, **spec), tmp_path / "b",
             seed=0, progress=False, hooks=LoopHooks(make_optimizer=sgd))
    _close(_weights(m1), _weights(m2), atol=1e-5)
    moved = max((_weights(m1)[k] - _weights(m0)[k]).abs().max() for k in _weights(m0))
    assert moved > 1e-2  # the comparison is not vacuous
    la = [json.loads(l)["loss"] for l in (tmp_path / "a" / "metrics.jsonl").open()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "b" / "metrics.jsonl").open()]
    assert la == pytest.approx(lb, abs=1e-5)


def test_kill_and_resume_reaches_the_same_weights(tmp_path):
    spec = TrainSpec(lr=5e-3, max_steps=7, batch_size=4, save_every=2, log_every=1,
                     keep_checkpoints=2)
    full = tiny_llama(100)
    run_loop(full, _task(4), spec, tmp_path / "full", seed=1, progress=False)
    # "killed" after 5 steps: the last checkpoint is step 4, step 5 is lost
    part = tiny_llama(100)
    run_loop(part, _task(4), spec, tmp_path / "part", seed=1, progress=False,
             hooks=LoopHooks(stop_after=5))
    assert latest_checkpoint(tmp_path / "part" / "checkpoints").name == "step_0000004"
    resumed = tiny_llama(100)   # a fresh process: initial weights, then the checkpoint
    run_loop(resumed, _task(4), spec, tmp_path / "part", seed=1, progress=False, resume=True)
    _close(_weights(full), _weights(resumed), atol=1e-6)
    steps = [json.loads(l)["step"] for l in (tmp_path / "part" / "metrics.jsonl").open()]
    assert steps == list(range(1, 8))   # no duplicated or missing log lines


class _NaNAt(SFTTask):
    def __init__(self, step, *a, **k):
        super().__init__(*a, **k)
        self.calls, self.at = 0, step

    def loss(self, module, batch):
        loss, m = super().loss(module, batch)
        self.calls += 1
        if self.calls == self.at:
            loss = loss * float("nan")
        return loss, m


def test_nan_loss_stops_and_keeps_the_last_good_state(tmp_path):
    spec = TrainSpec(lr=5e-3, max_steps=6, batch_size=4, log_every=1)
    ref = tiny_llama(100)
    run_loop(ref, _task(4), TrainSpec(lr=5e-3, max_steps=6, batch_size=4, log_every=1),
             tmp_path / "ref", seed=0, progress=False, hooks=LoopHooks(stop_after=2))
    m = tiny_llama(100)
    lay = _task(4).layout
    with pytest.raises(TrainingError, match=r"NaN/inf at step 3.*after step 2"):
        run_loop(m, _NaNAt(3, lay, batch_size=4, pad_id=0, seed=0), spec, tmp_path / "nan",
                 seed=0, progress=False)
    ck = latest_checkpoint(tmp_path / "nan" / "checkpoints")
    from safetensors.torch import load_file
    saved = load_file(str(ck / "model.safetensors"))
    _close(_weights(ref), saved, atol=0)
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_metrics_have_the_expected_fields(tmp_path):
    run_loop(tiny_llama(100), _task(4), TrainSpec(max_steps=2, batch_size=4, log_every=1),
             tmp_path, seed=0, progress=False)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for k in ("step", "lr", "loss", "grad_norm", "tokens_per_s", "trained_tokens"):
        assert k in rec
    assert (tmp_path / "tensorboard").is_dir()


def test_adamw_is_fused_only_for_plain_cuda_parameters(monkeypatch):
    """The fused kernel needs every parameter on CUDA and floating; a sharded (DTensor-like)
    parameter, a CPU one or an integer buffer keeps the foreach implementation, so the CPU
    quickstart's figures do not move; so does a run accelerate launched with FSDP or
    DeepSpeed."""
    from starpo.train.loop import fused_adamw, make_optimizer, sharded_launch
    assert not sharded_launch()
    for launch in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(launch, "true")
            assert sharded_launch()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not sharded_launch()

    class Sharded(torch.Tensor):
        pass
    assert not fused_adamw([])
    assert not fused_adamw([torch.nn.Parameter(torch.zeros(2))])
    assert not fused_adamw([torch.zeros(2, dtype=torch.long)])
    assert not fused_adamw([torch.zeros(2).as_subclass(Sharded)])
    opt = make_optimizer(tiny_llama(100), TrainSpec())
    assert not opt.defaults["fused"]
    if torch.cuda.is_available():
        cuda = [torch.nn.Parameter(torch.zeros(2, device="cuda"))]
        assert fused_adamw(cuda)
        assert make_optimizer(tiny_llama(100).cuda(), TrainSpec()).defaults["fused"]
        for launch in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv(launch, "true")
                assert not fused_adamw(cuda)


def _fused_against_plain(tmp_path, monkeypatch, device: str, *, force: bool) -> dict:
    """Train the same tiny model twice on ``device`` (4 steps: weight decay on matrices
    only, warmup, clipping; fp32): with make_optimizer as it decides (``force``: told the
    parameters are fusable) and with the foreach kernel. Returns the optimizer
    make_optimizer built and both runs' start and end weights."""
    import starpo.train.loop as L
    spec = TrainSpec(lr=5e-3, max_steps=4, batch_size=4, log_every=1, weight_decay=0.1,
                     warmup_ratio=0.25, max_grad_norm=1.0, mixed_precision="no")
    fused, plain = tiny_llama(100).to(device), tiny_llama(100).to(device)
    start = _weights(plain)
    made = []
    with monkeypatch.context() as mp:
        if force:
            mp.setattr(L, "fused_adamw", lambda params: True)
        run_loop(fused, _task(4), spec, tmp_path / "fused", seed=0, progress=False,
                 hooks=LoopHooks(make_optimizer=lambda m, s: made.append(
                     L.make_optimizer(m, s)) or made[-1]))
        mp.setattr(L, "fused_adamw", lambda params: False)
        run_loop(plain, _task(4), spec, tmp_path / "plain", seed=0, progress=False)
    return {"optimizer": made[0], "start": start, "fused": _weights(fused),
            "plain": _weights(plain)}


def test_fused_adamw_takes_the_same_steps_as_the_plain_one(tmp_path, monkeypatch):
    """make_optimizer's fused AdamW against the foreach one over a few loop steps: same
    weights within float noise. Run with torch's CPU fused kernel here; on a GPU the CUDA
    one is what the loop picks (the gpu twin below)."""
    r = _fused_against_plain(tmp_path, monkeypatch, "cpu", force=True)
    assert r["optimizer"].defaults["fused"]
    _close(r["plain"], r["fused"], atol=1e-5)
    assert max((r["plain"][k] - r["start"][k]).abs().max() for k in r["start"]) > 1e-2


@pytest.mark.gpu
def test_the_loop_on_cuda_runs_fused_adamw_equal_to_the_plain_one(tmp_path, monkeypatch):
    """On CUDA parameters make_optimizer picks the fused kernel by itself; its steps equal
    the foreach kernel's (fp32, no autocast, so only the optimizer differs)."""
    r = _fused_against_plain(tmp_path, monkeypatch, "cuda", force=False)
    assert r["optimizer"].defaults["fused"]
    _close(r["plain"], r["fused"], atol=1e-4)
    assert max((r["plain"][k] - r["start"][k]).abs().max() for k in r["start"]) > 1e-2
