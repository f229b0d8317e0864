"""A microscopic sweep (recipe, sweep file, a trial's hand-written evaluation) shared by
the sweep tests of every executor (tests/run/test_sweep*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from micro import micro_recipe
from starpo.metrics.names import EVAL_METRICS
from starpo.run import sweep as S

# the pipeline tests' sft → dpo recipe and an evaluation of both
RECIPE = micro_recipe()
RECIPE["stages"].append(
    {"type": "eval", "data": {"sources": [{"path": "world:eval", "n": 8}], "shuffle": False},
     "generation": {"max_new_tokens": 12, "batch_size": 8}, "bootstrap": 20})
SWEEP = {"name": "micro-sweep", "recipe": "micro.yaml", "shared": ["sft"],
         "methods": {"dpo": {"stages.dpo.beta": [0.1, 0.5]},
                     "simpo": {"stages.dpo.gamma": [0.3, 1.0], "stages.dpo.beta": 2.0}}}


def write_sweep(tmp: Path, sweep: dict | None = None, recipe: dict | None = None,
                name: str = "sweep.yaml") -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "micro.yaml").write_text(yaml.safe_dump(recipe or RECIPE, sort_keys=False))
    path = tmp / name
    path.write_text(yaml.safe_dump(sweep or SWEEP, sort_keys=False))
    return path


def load_error(tmp: Path, **changes) -> str:
    sweep = {**SWEEP, **changes}
    sweep = {k: v for k, v in sweep.items() if v is not None}
    path = write_sweep(tmp, sweep)
    with pytest.raises(S.SweepError) as err:
        S.load_sweep(path)
    msg = str(err.value)
    assert "\n" not in msg, msg            # one line
    assert str(path) in msg, msg           # naming the sweep file
    return msg


def _fake_eval(tdir: Path, score: float, model: str = "dpo") -> None:
    """What a trial's eval stage leaves behind, written by hand."""
    d = tdir / "eval"
    d.mkdir(parents=True, exist_ok=True)
    m = {k: 0.1 for k in EVAL_METRICS}
    (d / "summary.json").write_text(json.dumps({"sft": {**m, "mean_score": -1.0},
                                                model: {**m, "mean_score": score, "n": 2}}))
    (d / "meta.json").write_text(json.dumps({"reference": "sft",
                                             "files": {model: f"{model}.jsonl"}}))
    (d / f"{model}.jsonl").write_text(json.dumps({"id": "0", "score": score}) + "\n")
    (tdir / "report.html").write_text("<html></html>")
