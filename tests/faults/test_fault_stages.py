"""Preemption in every stage kind of a pipeline (sft, dpo with its reference pass, online
sampling, judging and training, eval), one after another in one run directory, each
rerun continuing where the last stopped; the finished directory must equal a run that was
never interrupted. Then ``starpo eval`` on that run: a subset merges instead of dropping
models, other settings go to a directory of their own, and a model directory evaluates
on its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from starpo import fileio
from starpo.recipe import recipe_from_dict
from starpo.run import pipeline
from starpo.stages import online_rounds as O
from starpo.train import metrics_log, preempt, refcache

pytestmark = pytest.mark.usefixtures("one_thread")

TIME_FIELDS = ("tokens_per_s", "elapsed_s")
FAST = {"batch_size": 4, "log_every": 1, "warmup_ratio": 0.0, "lr": 1e-3}


def _recipe(base_path: str) -> dict:
    return {"name": "faults", "seed": 0, "model": {"name_or_path": base_path}, "stages": [
        {"type": "sft", "data": {"sources": [{"path": "world:sft", "n": 60}]},
         "packing": {"max_length": 96}, "train": {**FAST, "max_steps": 5, "save_every": 4}},
        {"type": "dpo", "beta": 0.5, "max_length": 96, "max_prompt_length": 48,
         "data": {"sources": [{"path": "world:preference", "n": 40}], "eval_fraction": 0.1},
         "train": {**FAST, "max_steps": 4}},
        {"type": "online", "rounds": 2, "prompts_per_round": 24, "n_samples": 2,
         "max_length": 96, "max_prompt_length": 48,
         "generation": {"max_new_tokens": 10, "temperature": 1.0, "batch_size": 4},
         "judge": {"type": "world_labeler", "batch_size": 8},
         "data": {"sources": [{"path": "world:prompt", "n": 60}]},
         "train": {**FAST, "max_steps": 3, "batch_size": 2}},
        {"type": "eval", "data": {"sources": [{"path": "world:eval", "n": 12}],
                                  "shuffle": False},
         "generation": {"max_new_tokens": 10, "batch_size": 8}, "bootstrap": 20},
    ]}


def _run(recipe, out: Path, logs: list[str] | None = None):
    pipeline.run(recipe, out, progress=False, report=False,
                 log=(logs.append if logs is not None else lambda m: None))


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    recipe = recipe_from_dict(_recipe(base["path"]))
    full = tmp_path_factory.mktemp("full")
    _run(recipe, full)
    return {"recipe": recipe, "full": full}


def _term():
    os.kill(os.getpid(), signal.SIGTERM)


def _preempted(recipe, out: Path, monkeypatch, patch) -> tuple[str, list[str]]:
    """Run the pipeline with ``patch(monkeypatch)`` sending SIGTERM at some point; returns
    the Preempted message and the log."""
    logs: list[str] = []
    preempt.reset()
    with monkeypatch.context() as mp:
        patch(mp)
        with preempt.handling([signal.SIGTERM]), pytest.raises(preempt.Preempted) as err:
            _run(recipe, out, logs)
    preempt.reset()
    msg = str(err.value)
    assert "\n" not in msg and "rerun the same command to resume" in msg
    return msg, logs


def _at_step(stage_dir: str, step: int):
    """SIGTERM when the loop of ``stage_dir`` logs ``step``."""
    def patch(mp):
        real = metrics_log.MetricsLog.write

        def write(self, rec):
            real(self, rec)
            if self.path.parent.name == stage_dir and rec["step"] == step:
                _term()
        mp.setattr(metrics_log.MetricsLog, "write", write)
    return patch


def _on_call(module, name: str, call: int):
    """SIGTERM during the ``call``-th call of ``module.name``."""
    def patch(mp):
        real, calls = getattr(module, name), []

        def wrapped(*a, **k):
            calls.append(1)
            if len(calls) == call:
                _term()
            return real(*a, **k)
        mp.setattr(module, name, wrapped)
    return patch


def _summary(run: Path, d: str = "eval") -> dict:
    """eval/summary.json without "model" (the checkpoint's path, which names the run)."""
    s = json.loads((run / d / "summary.json").read_text())
    return {name: {k: v for k, v in m.items() if k != "model"} for name, m in s.items()}


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS}
            for r in fileio.read_jsonl(path)]


def test_each_stage_kind_preempted_and_resumed_equals_the_uninterrupted_run(runs, tmp_path,
                                                                            monkeypatch):
    recipe, out = runs["recipe"], tmp_path / "run"
    from starpo.metrics import evaluation

    msg, _ = _preempted(recipe, out, monkeypatch, _at_step("sft", 2))
    assert msg.startswith("sft: preempted (SIGTERM) at step 2 of 5; checkpoint saved")
    assert (out / "sft" / "checkpoints" / "step_0000002").is_dir()

    # the reference pass (sized to the run: the 16 pairs its 4 steps reach and the 4
    # held-out ones, in batches of 8): stopped after its second batch
    msg, _ = _preempted(recipe, out, monkeypatch,
                        _on_call(refcache, "sequence_logprobs", 2))
    assert msg.startswith("reference log-probs: preempted (SIGTERM) after 16 of 20 pairs")
    assert (out / "sft" / "stage.json").is_file()

    msg, logs = _preempted(recipe, out, monkeypatch, _at_step("dpo", 2))
    assert any("continuing from pair 16 of 20" in line for line in logs)
    assert msg.startswith("dpo: preempted (SIGTERM) at step 2 of 4")

    # online round 1: sampling (2 chunks of 16 and 8 prompts), judging, training
    msg, _ = _preempted(recipe, out, monkeypatch, _on_call(O, "sample_responses", 1))
    assert msg.startswith("online round 1: preempted (SIGTERM) after sampling 16 of 24")
    sampled: list[list[int]] = []
    real_sample = O.sample_responses

    def judging(mp):
        mp.setattr(O, "sample_responses",
                   lambda *a, **k: sampled.append(k["indices"]) or real_sample(*a, **k))
        _on_call(O, "rank_groups", 1)(mp)
    msg, logs = _preempted(recipe, out, monkeypatch, judging)
    assert msg.startswith("preempted (SIGTERM) during online round 1 judging")
    assert any("reusing the samples of 1 of 2 chunks" in line for line in logs)
    assert len(sampled) == 1 and len(sampled[0]) == 8       # only the unfinished chunk

    msg, _ = _preempted(recipe, out, monkeypatch, _at_step("round_1", 2))
    assert msg.startswith("online round 1: preempted (SIGTERM) at step 2 of 3")
    # a signal in the round's last step: the round finishes and saves its model first
    msg, _ = _preempted(recipe, out, monkeypatch, _at_step("round_1", 3))
    assert msg.startswith("preempted (SIGTERM) after online round 1 (finished)")
    assert (out / "online" / "round_1" / "round.json").is_file()

    # eval: stopped at once while its second model is sampled; the first is cached
    msg, _ = _preempted(recipe, out, monkeypatch, _on_call(evaluation, "sample_model", 2))
    assert msg.startswith("preempted (SIGTERM) during stage eval")
    assert (out / "online" / "stage.json").is_file()
    assert not (out / "eval" / "summary.json").exists()
    _run(recipe, out)

    full = runs["full"]
    for model in ("sft", "dpo", "online/round_1", "online/round_2", "online"):
        a = load_file(str(full / model / "model" / "model.safetensors"))
        b = load_file(str(out / model / "model" / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=f"{model} {k}")
    for stage in ("sft", "dpo", "online"):
        assert _metrics(out / stage / "metrics.jsonl") == _metrics(full / stage /
                                                                   "metrics.jsonl")
    for k in (1, 2):
        rd = Path("online") / f"round_{k}"
        assert (out / rd / "samples.jsonl").read_text() == \
            (full / rd / "samples.jsonl").read_text()
        assert not (out / rd / "sampled.partial.jsonl").exists()
    assert _summary(out) == _summary(full)
    assert not list(out.glob("refcache/.*partial*"))


# --------------------------------------------------------------------------- starpo eval

def test_eval_of_a_subset_merges_into_the_summary(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["full"], run)
    before = _summary(run)
    assert list(before) == ["sft", "dpo", "online"]
    logs: list[str] = []
    pipeline.evaluate_run(run, models=["dpo"], progress=False, log=logs.append, report=False)
    assert _summary(run) == before                    # nothing dropped, nothing changed
    assert any("merging ['dpo'] into" in line and "keeps ['sft', 'online']" in line
               for line in logs)
    gaps = json.loads((run / "eval" / "gaps.json").read_text())
    assert {(g["model"], g["baseline"]) for g in gaps} >= {("online", "dpo"),
                                                          ("online", "sft")}

    # other settings (fewer prompts): a directory of its own; eval/ is left as it was
    logs.clear()
    res = pipeline.evaluate_run(run, models=["dpo"], n=5, progress=False, log=logs.append,
                                report=False)
    assert list(res.summary) == ["sft", "dpo"] and res.summary["dpo"]["n"] == 5
    assert json.loads((run / "eval-dpo" / "summary.json").read_text())["dpo"]["n"] == 5
    assert _summary(run) == before
    assert any("writing this one to" in line and "eval-dpo" in line for line in logs)


def test_eval_of_a_model_directory_writes_its_own_run(runs, tmp_path):
    from typer.testing import CliRunner
    from starpo.cli import app
    out = tmp_path / "ckpt-eval"
    res = CliRunner().invoke(app, ["eval", str(runs["full"] / "dpo" / "model"), "--n", "6",
                                   "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert list(summary) == ["dpo"] and summary["dpo"]["n"] == 6
    assert summary["dpo"]["mean_score"] is not None and summary["dpo"]["win_vs_sft"] is None
    assert (out / "recipe.yaml").is_file() and (out / "report.html").is_file()
    assert "win_vs_sft and kl_vs_sft are left out" in res.output
