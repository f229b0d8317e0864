"""Extension without editing starpo: a recipe names a loss and an online pair rule as
``module:function`` and a judge as ``module:Class`` (all in tests/starpo_plugins.py), and the
pipeline trains, pairs and judges with them end to end."""

from __future__ import annotations

import json

import pytest

from starpo import fileio, losses
from starpo.errors import RecipeError
from starpo.recipe import recipe_from_dict
from starpo.run import pipeline

from starpo_plugins import WordCountJudge
from conftest import FAST, TINY, quiet

JUDGE = {"type": "starpo_plugins:WordCountJudge", "options": {"target": 6}}


def _recipe():
    return {"name": "plugins", "seed": 0, "model": {"name_or_path": "tiny", "tiny": TINY},
            "stages": [
                {"type": "sft", "data": {"sources": [{"path": "world:sft", "n": 60}]},
                 "packing": {"max_length": 128}, "train": {**FAST, "max_steps": 2}},
                {"type": "dpo", "loss": "starpo_plugins:hinge", "beta": 0.5,
                 "max_length": 128, "max_prompt_length": 64,
                 "data": {"sources": [{"path": "world:preference", "n": 40}]},
                 "train": {**FAST, "max_steps": 2, "lr": 1e-4}},
                {"type": "online", "loss": "starpo_plugins:hinge", "judge": JUDGE,
                 "pair_selection": "starpo_plugins:top_two",
                 "n_samples": 3, "rounds": 1, "max_length": 128, "max_prompt_length": 64,
                 "generation": {"max_new_tokens": 12},
                 "data": {"sources": [{"path": "world:prompt", "n": 8}]},
                 "train": {**FAST, "max_steps": 1}},
                {"type": "eval", "judge": JUDGE, "bootstrap": 0,
                 "generation": {"max_new_tokens": 12},
                 "data": {"sources": [{"path": "world:eval", "n": 6}]}},
            ]}


def test_a_user_loss_and_a_user_judge_run_end_to_end(tmp_path, one_thread):
    out = tmp_path / "run"
    pipeline.run(recipe_from_dict(_recipe()), out, log=quiet, progress=False, report=False)
    # the hinge loss trained the dpo stage: policy = reference at step 1, so every pair's
    # loss is exactly 1 (DPO's would be log 2)
    first = fileio.read_jsonl(out / "dpo" / "metrics.jsonl")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(1.0, abs=1e-6)
    # the online round ranked its samples with the user's judge
    judge = WordCountJudge(target=6)
    samples = fileio.read_jsonl(out / "online" / "round_1" / "samples.jsonl")
    assert samples
    for rec in samples:
        texts = [s["text"] for s in rec["samples"]]
        assert [s["score"] for s in rec["samples"]] == judge.score([rec["prompt"]] * len(texts),
                                                                  texts)
    # the user's pair rule picked the pairs, up to two per prompt, and is recorded
    pairs = fileio.read_jsonl(out / "online" / "round_1" / "pairs.jsonl")
    assert pairs and {p["rule"] for p in pairs} == {"starpo_plugins:top_two"}
    for rec in samples:
        scores = [s["score"] for s in rec["samples"]]
        assert all(scores[c] > scores[r] for c, r in rec["pairs"]) and len(rec["pairs"]) <= 2
    # and the eval stage scored every model with it
    summary = json.loads((out / "eval" / "summary.json").read_text())
    for name in ("sft", "dpo", "online"):
        recs = fileio.read_jsonl(out / "eval" / f"{name}.jsonl")
        scores = judge.score([None] * len(recs), [r["response"] for r in recs])
        assert summary[name]["mean_score"] == pytest.approx(sum(scores) / len(scores))


def test_import_paths_are_checked_when_the_recipe_loads():
    tree = _recipe()
    tree["stages"][1]["loss"] = "starpo_plugins:undeclared"
    with pytest.raises(RecipeError, match="decorate it with @starpo.losses.declare"):
        recipe_from_dict(tree)
    tree["stages"][1]["loss"] = "no_such_module:f"
    with pytest.raises(RecipeError, match="cannot import it"):
        recipe_from_dict(tree)
    tree = _recipe()
    tree["stages"][3]["judge"] = {"type": "starpo_plugins:hinge"}
    with pytest.raises(RecipeError, match="rank"):
        recipe_from_dict(tree)


def test_registry_declares_what_each_loss_reads():
    assert losses.get("dpo").needs_reference and not losses.get("dpo").needs_counts
    assert not losses.get("simpo").needs_reference and losses.get("simpo").needs_counts
    assert losses.get("ln_dpo").needs_reference and losses.get("ln_dpo").needs_counts
    assert losses.get("starpo_plugins:hinge").needs_reference
    assert not losses.get("ipo").takes_label_smoothing
