"""``starpo sweep`` and ``starpo run`` resolve every stage's links to the same checkpoints:
one small grid run both ways (a plain run per grid point; a sweep that trains the SFT
stage once, shared), then every link of every stage (starting model, reference, the
evaluated models and the SFT reference) compared by the weights it resolved to."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from starpo.recipe import graph, load_recipe
from starpo.run import pipeline
from starpo.run import sweep as S
from conftest import FAST
from sweep_helpers import RECIPE, write_sweep

FEW = {**FAST, "max_steps": 2}


def _small_recipe() -> dict:
    r = copy.deepcopy(RECIPE)
    sft, dpo, ev = r["stages"]
    sft["data"]["sources"][0]["n"] = 48
    sft["train"] = {**FEW, "lr": 1e-3}
    dpo["data"] = {"sources": [{"path": "world:preference", "n": 24}]}
    dpo["reference"] = "sft"          # an explicit link besides the implicit ones
    dpo["train"] = {**FEW, "lr": 1e-4}
    ev["data"]["sources"][0]["n"] = 4
    ev["generation"] = {"max_new_tokens": 6, "batch_size": 4}
    ev["bootstrap"] = 0
    return r


SWEEP = {"name": "same", "recipe": "micro.yaml", "shared": ["sft"],
         "methods": {"dpo": {"stages.dpo.beta": [0.1, 0.5]}}}


def _weights(path: str | Path) -> str:
    """A digest of a checkpoint's weights (what a link resolved to)."""
    files = sorted(Path(path).glob("*.safetensors"))
    assert files, f"no weights in {path}"
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _resolved(recipe, run_dir: Path) -> dict[tuple[str, str], list[str]]:
    """(stage, field) → the weights each link of the run resolved to; an eval stage's
    evaluated models and SFT reference as its evaluation recorded them."""
    out: dict[tuple[str, str], list[str]] = {}
    for st in recipe.stages:
        if st.evaluates:
            meta = json.loads((run_dir / st.name / "meta.json").read_text())
            models = meta["models"]
            out[(st.name, "models")] = [_weights(models[k]) for k in models]
            out[(st.name, "sft")] = [_weights(models[meta["reference"]])]
            continue
        for e in graph.edges(recipe, st):
            path = graph.checkpoint(recipe, e.target, run_dir, needed_by=st.name)
            out.setdefault((st.name, e.field), []).append(_weights(path))
        out[(st.name, "itself")] = [_weights(graph.model_dir(run_dir, st.name))]
    return out


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("same")
    path = write_sweep(tmp, SWEEP, _small_recipe())
    plan = S.make_plan(S.load_sweep(path), tmp / "sweep")
    recs = S.run_sweep(plan, log=lambda m: None)
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    runs = {}
    for t, _ in plan.trials:
        overrides = [f"stages.dpo.loss={t.method}"] + [f"{k}={v}" for k, v in t.params.items()]
        recipe = load_recipe(tmp / "micro.yaml", overrides)     # what `starpo run` reads
        pipeline.run(recipe, tmp / "runs" / t.id, log=lambda m: None, progress=False,
                     report=False)
        runs[t.id] = recipe
    return tmp, plan, runs


def test_every_stage_resolves_to_the_same_checkpoints_both_ways(both_ways):
    tmp, plan, runs = both_ways
    shared = _resolved(plan.shared, plan.shared_dir)
    for t, trial_recipe in plan.trials:
        run = _resolved(runs[t.id], tmp / "runs" / t.id)
        swept = {**{k: v for k, v in shared.items() if k[0] in plan.sweep.shared},
                 **_resolved(trial_recipe, S.trial_dir(plan.out, t.id))}
        assert swept == run, t.id
        # every link was compared: the trial's written-out links and the run's implicit
        # ones are the same set
        assert set(run) == {("sft", "model"), ("sft", "itself"), ("dpo", "model"),
                            ("dpo", "reference"), ("dpo", "itself"), ("eval", "models"),
                            ("eval", "sft")}
        # and the trials differ from each other where the grid does
    dpos = {_resolved(rec, S.trial_dir(plan.out, t.id))[("dpo", "itself")][0]
            for t, rec in plan.trials}
    assert len(dpos) == len(plan.trials)


def test_both_ways_score_the_same(both_ways):
    tmp, plan, runs = both_ways
    for t, _ in plan.trials:
        a = json.loads((tmp / "runs" / t.id / "eval" / "summary.json").read_text())
        b = json.loads((S.trial_dir(plan.out, t.id) / "eval" / "summary.json").read_text())
        assert list(a) == list(b) == ["sft", "dpo"]
        assert a["dpo"]["mean_score"] == b["dpo"]["mean_score"]
        assert a["sft"]["mean_score"] == b["sft"]["mean_score"]
