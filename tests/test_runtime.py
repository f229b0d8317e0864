"""The device travels explicitly: every model and batch that reaches a training-side
forward (training steps, the reference pass, held-out preference and reward evaluation)
was put there by the run's :class:`~starpo.runtime.Runtime`.

On a CPU-only machine every tensor is on the CPU whatever the code does, so comparing
devices proves nothing. Instead the test runtime records the models it placed and the
storage of every batch tensor it placed, and the forward entry point all those paths share
(``body_hidden_states``) checks its model and batch against those records. Code that loads
a model or builds a batch without the runtime (the reference pass before this runtime
existed, the held-out evaluation whose batches stayed on the CPU) fails here exactly as
it would fail on a GPU. What it does not prove: that CUDA kernels run (no GPU here), and
it does not cover sampling, judging and the eval stage, which get ``runtime.device``
passed as an argument (their models are loaded onto it by ``load_model(device=...)``).
"""

from __future__ import annotations

import pytest
import torch

from starpo.model import logprobs
from starpo.recipe import recipe_from_dict
from starpo.run import pipeline
from starpo.runtime import Runtime
from starpo.stages import reward as reward_stage

from conftest import FAST, TINY, quiet


class AuditRuntime(Runtime):
    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.modules: set[int] = set()
        self.storages: set[int] = set()
        # what was placed is kept alive: ids and data pointers of freed objects are reused,
        # and a model or batch made without the runtime could otherwise pass for a placed one
        self._alive: list = []

    def model(self, model):
        model = super().model(model)
        self.modules.update(id(m) for m in model.modules())
        self._alive.append(model)
        return model

    def batch(self, batch):
        batch = super().batch(batch)
        for t in _tensors(batch):
            self.storages.add(t.untyped_storage().data_ptr())
        self._alive.append(batch)
        return batch


def _tensors(batch):
    return [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]


@pytest.fixture
def audited(monkeypatch):
    rt = AuditRuntime()
    seen = {"forwards": 0}
    real = logprobs.body_hidden_states

    def checked(core, body, batch):
        assert id(core) in rt.modules, \
            f"a forward of {type(core).__name__} that the runtime never placed"
        stray = [k for k, v in vars(batch).items() if isinstance(v, torch.Tensor)
                 and v.numel() and v.untyped_storage().data_ptr() not in rt.storages]
        assert not stray, f"batch tensors {stray} reached a forward without the runtime"
        seen["forwards"] += 1
        return real(core, body, batch)

    monkeypatch.setattr(logprobs, "body_hidden_states", checked)
    monkeypatch.setattr(reward_stage, "body_hidden_states", checked)
    return rt, seen


def _recipe():
    return {"name": "audit", "seed": 0, "model": {"name_or_path": "tiny", "tiny": TINY},
            "stages": [
                {"type": "sft", "data": {"sources": [{"path": "world:sft", "n": 60}]},
                 "packing": {"max_length": 128}, "train": {**FAST, "max_steps": 2}},
                # eval_fraction: held-out accuracy before and after; a reference cache miss
                {"type": "dpo", "max_length": 128, "max_prompt_length": 64,
                 "data": {"sources": [{"path": "world:preference", "n": 40}],
                          "eval_fraction": 0.25}, "train": {**FAST, "max_steps": 2}},
                {"type": "reward", "model": "sft", "max_length": 128,
                 "data": {"sources": [{"path": "world:preference", "n": 40}],
                          "eval_fraction": 0.25}, "train": {**FAST, "max_steps": 2}},
            ]}


def test_every_training_side_forward_runs_where_the_runtime_put_it(tmp_path, audited,
                                                                    one_thread):
    rt, seen = audited
    pipeline.run(recipe_from_dict(_recipe()), tmp_path / "run", runtime=rt, log=quiet,
                 progress=False, report=False)
    # sft steps, reference pass, held-out before/after, dpo steps, reward probes and steps
    assert seen["forwards"] >= 12


def test_the_audit_catches_a_batch_that_skipped_the_runtime(tmp_path, audited, one_thread,
                                                            monkeypatch):
    """The check can fail: a held-out evaluation that builds its batches on the CPU (what
    the code did before the runtime) is refused."""
    from starpo.stages import preference as stage_pref
    rt, _ = audited
    real = stage_pref.evaluate_pairs
    monkeypatch.setattr(stage_pref, "evaluate_pairs",
                        lambda model, task, runtime, **kw: real(model, task, Runtime.cpu(), **kw))
    with pytest.raises(AssertionError, match="without the runtime"):
        pipeline.run(recipe_from_dict(_recipe()), tmp_path / "run", runtime=rt, log=quiet,
                     progress=False, report=False)


def test_the_audit_catches_a_model_that_skipped_the_runtime(tmp_path, audited, one_thread,
                                                            monkeypatch):
    """A reference model loaded without the runtime (the bug this replaces) is refused."""
    from starpo.stages import preference as stage_pref
    rt, _ = audited
    real = stage_pref.reference_logps_for
    monkeypatch.setattr(stage_pref, "reference_logps_for",
                        lambda *a, runtime, **kw: real(*a, runtime=Runtime.cpu(), **kw))
    with pytest.raises(AssertionError, match="never placed"):
        pipeline.run(recipe_from_dict(_recipe()), tmp_path / "run", runtime=rt, log=quiet,
                     progress=False, report=False)


# --------------------------------------------------------------------------- decisions made without a run

def test_local_runtime_device():
    assert Runtime.local("cpu").device == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert Runtime.local().device.type == want
    assert not Runtime.local().distributed and Runtime.local().is_main


def test_dtype_of_auto_and_named():
    cpu = Runtime.cpu()
    assert cpu.dtype("auto") == torch.float32 and cpu.mixed_precision("auto") == "no"
    assert cpu.dtype("bfloat16") == torch.bfloat16 and cpu.dtype("float16") == torch.float16
    assert cpu.dtype("float32") == torch.float32
    gpu = Runtime(torch.device("cuda"))
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert gpu.dtype("auto") == (torch.bfloat16 if bf16 else torch.float32)
    assert gpu.mixed_precision("auto") == ("bf16" if bf16 else "no")


def test_is_main_process_without_accelerate_state(monkeypatch):
    import accelerate

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("no state")

    monkeypatch.setattr(accelerate, "PartialState", Broken)
    monkeypatch.setenv("RANK", "1")
    assert Runtime.is_main_process() is False
    monkeypatch.setenv("RANK", "0")
    assert Runtime.is_main_process() is True
