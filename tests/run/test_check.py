"""``starpo run --check`` (starpo.run.check): expected results next to a recipe, compared
with a run's evaluation; and the quickstart's shipped expectations hold for every run they
were measured from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from starpo.errors import StarpoError
from starpo.run import check as K

ROOT = Path(__file__).resolve().parents[2]


def _eval_dir(run: Path, gaps: list[dict], models: dict[str, dict], n: int = 665) -> Path:
    d = run / "eval"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({m: {"n": n, **v} for m, v in models.items()}))
    (d / "gaps.json").write_text(json.dumps(gaps))
    return run


def _gap(model, base, gap, lo, hi):
    return {"model": model, "baseline": base, "n": 665, "gap": gap, "gap_ci": [lo, hi]}


def _expected(tmp_path: Path, tree: dict) -> K.Expected:
    (tmp_path / "r.yaml").write_text("stages: []\n")
    (tmp_path / "r.expected.yaml").write_text(yaml.safe_dump(tree))
    return K.load_expected(tmp_path / "r.yaml")


def test_each_kind_of_expectation_passes_and_fails(tmp_path):
    exp = _expected(tmp_path, {
        "prompts": 665,
        "gaps": [{"model": "dpo", "baseline": "sft", "gap": [0.03, 0.2], "interval_above": 0},
                 {"model": "online", "baseline": "dpo", "gap": [-0.1, 0.1],
                  "interval_not_below": 0},
                 {"model": "bad", "baseline": "sft", "interval_below": 0}],
        "models": {"dpo": {"kl_vs_sft": [0.01, 0.5]}}})
    run = _eval_dir(tmp_path / "a", [_gap("dpo", "sft", 0.11, 0.06, 0.16),
                                     _gap("online", "dpo", -0.0004, -0.04, 0.04),
                                     _gap("bad", "sft", -0.2, -0.3, -0.1)],
                    {"sft": {"kl_vs_sft": 0.0}, "dpo": {"kl_vs_sft": 0.13}, "online": {},
                     "bad": {}})
    res = K.check_run(run, exp)
    assert res.ok and res.lines[-1] == "as expected"
    assert "  ok      online − dpo: 0.000 [−0.040, +0.040]; expected gap −0.100 to +0.100, " \
           "interval not wholly below 0.000" in res.lines
    # each check failing on its own
    run = _eval_dir(tmp_path / "b", [_gap("dpo", "sft", 0.11, -0.01, 0.2),     # interval
                                     _gap("online", "dpo", 0.15, 0.1, 0.2),    # gap range
                                     _gap("bad", "sft", -0.2, -0.3, 0.01)],    # below 0
                    {"dpo": {"kl_vs_sft": 0.9}}, n=600)                        # KL, prompts
    res = K.check_run(run, exp)
    assert res.differences == 5 and not res.ok
    assert res.lines[-1] == "5 of 5 checks differ from the expected results"
    assert "  DIFFERS prompts: 600; expected 665" in res.lines
    assert any(l.startswith("  DIFFERS dpo kl_vs_sft: 0.900") for l in res.lines)
    # online clearly worse than dpo: only the not-below check fails
    run = _eval_dir(tmp_path / "c", [_gap("dpo", "sft", 0.11, 0.06, 0.16),
                                     _gap("online", "dpo", -0.06, -0.09, -0.02),
                                     _gap("bad", "sft", -0.2, -0.3, -0.1)],
                    {"dpo": {"kl_vs_sft": 0.13}})
    res = K.check_run(run, exp)
    assert res.differences == 1
    assert any(l.startswith("  DIFFERS online − dpo: −0.060 [−0.090, −0.020]") for l in res.lines)


def test_missing_results_are_differences_and_a_missing_evaluation_an_error(tmp_path):
    exp = _expected(tmp_path, {"gaps": [{"model": "online", "baseline": "dpo"}],
                               "models": {"online": {"mean_score": [-1, 1]}}})
    run = _eval_dir(tmp_path / "a", [], {"sft": {"mean_score": 0.0}})
    res = K.check_run(run, exp)
    assert res.differences == 2
    assert "  DIFFERS online − dpo: not in gaps.json; expected a paired gap" in res.lines
    assert "  DIFFERS online mean_score: missing; expected -1.000 to 1.000" in res.lines
    with pytest.raises(StarpoError, match="has no evaluation to check"):
        K.check_run(tmp_path / "empty", exp)


def test_overrides_beyond_what_the_ranges_cover_are_noted(tmp_path):
    exp = _expected(tmp_path, {"holds_for": ["seed", "world.seed"]})
    run = _eval_dir(tmp_path / "a", [], {"sft": {}})
    assert not any("note:" in l for l in K.check_run(run, exp, ["seed=3"]).lines)
    lines = K.check_run(run, exp, ["seed=3", "stages.dpo.beta=0.3"]).lines
    assert any("(with seed, world.seed changed); this run also overrides stages.dpo.beta, so"
               in l for l in lines)


def test_bad_expected_files_are_one_line_errors(tmp_path):
    with pytest.raises(StarpoError, match=r"r\.expected\.yaml not found"):
        K.load_expected(tmp_path / "r.yaml")
    (tmp_path / "r.expected.yaml").write_text("gaps: [")
    with pytest.raises(StarpoError, match="not valid YAML"):
        K.load_expected(tmp_path / "r.yaml")
    (tmp_path / "r.expected.yaml").write_text(yaml.safe_dump({"gapz": []}))
    with pytest.raises(StarpoError, match=r"r\.expected\.yaml: gapz: Extra inputs"):
        K.load_expected(tmp_path / "r.yaml")


# =========================================================================== the shipped file


def test_the_quickstarts_expectations_hold_for_every_run_they_were_measured_from(tmp_path):
    """recipes/quickstart.expected.yaml lists the runs its ranges come from (seeds, thread
    counts, CPUs); each of them, written back as an evaluation, checks as expected."""
    exp = K.load_expected(ROOT / "recipes" / "quickstart.yaml")
    assert len(exp.runs) >= 12 and len({r.threads for r in exp.runs}) >= 2
    from starpo.recipe import load_recipe
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    policies = [s.name for s in recipe.stages if s.yields_policy]
    for g in exp.gaps:
        assert g.model in policies and g.baseline in policies
    for i, r in enumerate(exp.runs):
        run = _eval_dir(tmp_path / f"r{i}", [_gap(*g) for g in r.gaps],
                        {m: {"mean_score": s, **r.metrics.get(m, {})}
                         for m, s in r.scores.items()})
        # every metric the run recorded (an older run lacks some)
        recorded = exp.model_copy(update={"models": {
            m: {k: rng for k, rng in ms.items() if k in r.metrics.get(m, {})}
            for m, ms in exp.models.items()}})
        res = K.check_run(run, recorded, [r.overrides] if r.overrides else [])
        assert res.ok, (r, res.lines)
        assert sum(line.startswith("  ok") for line in res.lines) >= 4
