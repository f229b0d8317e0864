"""The sweep's robustness analysis (starpo.metrics.analysis) on hand-built trial records, with the
expected numbers worked out by hand; and the sweep report rendered from a hand-built
sweep directory (no model is trained here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from starpo.metrics import analysis as A


def _rec(tid, method, params, score=None, length=None, kl=None, status="ok", **extra):
    metrics = None
    if status == "ok":
        metrics = {"mean_score": score, "win_vs_chosen": None, "win_vs_sft": None,
                   "kl_vs_sft": kl, "kl_vs_sft_per_token": None if kl is None else kl / 10,
                   "mean_length": length}
    r = {"id": tid, "method": method, "params": params, "status": status, "metrics": metrics}
    if status != "ok":
        r["error"] = "training loss is NaN at step 3"
    r.update(extra)
    return r


# dpo: a 2x2 grid over beta and lr plus one diverged run; simpo: two runs and one failure
RECORDS = [
    _rec("d1", "dpo", {"beta": 0.1, "lr": 1}, score=1.0, length=10, kl=2.0),
    _rec("d2", "dpo", {"beta": 0.1, "lr": 2}, score=2.0, length=20, kl=4.0),
    _rec("d3", "dpo", {"beta": 0.5, "lr": 1}, score=3.0, length=30, kl=6.0),
    _rec("d4", "dpo", {"beta": 0.5, "lr": 2}, score=4.0, length=40, kl=8.0),
    _rec("d5", "dpo", {"beta": 1.0, "lr": 1}, status="failed"),
    _rec("s1", "simpo", {"gamma": 0.3}, score=2.5, length=5, kl=1.0),
    _rec("s2", "simpo", {"gamma": 1.0}, score=0.5, length=15, kl=3.0),
    _rec("s3", "simpo", {"gamma": 1.0}, status="failed"),
]
BASELINE = {"mean_score": 2.2, "mean_length": 12.0}


def _by_method():
    return A.group_by_method(RECORDS)


# =========================================================================== selection


def test_describe_uses_linear_quartiles_and_drops_missing_values():
    d = A.describe([4.0, None, 1.0, 3.0, float("nan"), 2.0])
    assert d == {"n": 4, "mean": 2.5, "min": 1.0, "q25": 1.75, "median": 2.5, "q75": 3.25,
                 "max": 4.0}
    assert A.describe([])["n"] == 0 and A.describe([])["median"] is None


def test_best_run_is_the_highest_score_and_ignores_failures():
    dpo, simpo = _by_method()["dpo"], _by_method()["simpo"]
    assert A.best_run(dpo)["id"] == "d4"
    assert A.best_run(simpo)["id"] == "s1"
    assert A.best_run([RECORDS[4]]) is None
    # other metrics can define "best"; ties keep the grid's order
    tied = [_rec("a", "dpo", {}, score=1.0), _rec("b", "dpo", {}, score=1.0)]
    assert A.best_run(tied)["id"] == "a"


def test_percentile_run_is_a_real_run_by_nearest_rank_rounded_half_up():
    dpo = _by_method()["dpo"]
    # ascending d1 d2 d3 d4: index round(0.75 * 3) = round(2.25) = 2 → d3
    assert A.percentile_run(dpo, 0.75)["id"] == "d3"
    assert A.percentile_run(dpo, 1.0)["id"] == "d4"
    assert A.percentile_run(dpo, 0.0)["id"] == "d1"
    # 7 runs: 0.75 * 6 = 4.5 rounds up to index 5 (Python's round would give 4)
    seven = [_rec(f"r{i}", "dpo", {}, score=float(i)) for i in range(7)]
    assert A.percentile_run(seven, 0.75)["id"] == "r5"
    with pytest.raises(ValueError):
        A.percentile_run(dpo, 1.5)


def test_top_runs_takes_the_ceiling_of_k_percent_and_at_least_one():
    dpo = _by_method()["dpo"]
    assert [r["id"] for r in A.top_runs(dpo, 25)] == ["d4"]
    assert [r["id"] for r in A.top_runs(dpo, 30)] == ["d4", "d3"]     # ceil(1.2) = 2
    assert [r["id"] for r in A.top_runs(dpo, 50)] == ["d4", "d3"]
    assert [r["id"] for r in A.top_runs(dpo, 1)] == ["d4"]
    assert len(A.top_runs(dpo, 100)) == 4


def test_latest_records_keeps_the_last_line_of_a_retried_trial_in_first_order():
    recs = [{"id": "a", "status": "failed"}, {"id": "b", "status": "ok"},
            {"id": "a", "status": "ok"}, {"no": "id"}]
    assert [(r["id"], r["status"]) for r in A.latest_records(recs)] == [("a", "ok"),
                                                                         ("b", "ok")]
    assert [r["id"] for r in A.latest_records(recs, ids=["b", "zz", "a"])] == ["b", "a"]


# =========================================================================== whole grid


def test_expected_performance_over_the_grid():
    e = A.expected_performance(_by_method()["dpo"])
    assert e["mean_score"] == {"n": 4, "mean": 2.5, "min": 1.0, "q25": 1.75, "median": 2.5,
                               "q75": 3.25, "max": 4.0}
    assert e["mean_length"]["median"] == 25.0 and e["kl_vs_sft"]["max"] == 8.0
    assert e["win_vs_sft"]["n"] == 0          # not measured: no values, not zeros


def test_robustness_counts_runs_below_sft_and_failures():
    r = A.robustness(_by_method()["dpo"], 2.2)
    # ok scores 1, 2, 3, 4: two below 2.2; one failed trial of five
    assert r == {"trials": 5, "ok": 4, "failed": 1, "baseline": 2.2, "worse": 2,
                 "share_worse": 0.5, "share_worse_or_failed": 0.6}
    s = A.robustness(_by_method()["simpo"], 2.2)
    assert s["worse"] == 1 and s["share_worse"] == 0.5
    assert s["share_worse_or_failed"] == pytest.approx(2 / 3)
    none = A.robustness(_by_method()["dpo"], None)
    assert none["share_worse"] is None and none["failed"] == 1


def test_sensitivity_means_per_value_and_spread():
    s = A.sensitivity(_by_method()["dpo"])
    beta = s["beta"]
    assert [v["value"] for v in beta["values"]] == [0.1, 0.5, 1.0]
    assert [v["mean"] for v in beta["values"]] == [1.5, 3.5, None]
    assert [v["failed"] for v in beta["values"]] == [0, 0, 1]
    assert beta["values"][1]["min"] == 3.0 and beta["values"][1]["max"] == 4.0
    assert beta["spread"] == 2.0
    lr = s["lr"]
    # lr=1: d1 (1.0), d3 (3.0), d5 failed; lr=2: d2 (2.0), d4 (4.0)
    assert [(v["value"], v["n"], v["failed"], v["mean"]) for v in lr["values"]] == \
        [(1, 2, 1, 2.0), (2, 2, 0, 3.0)]
    assert lr["spread"] == 1.0
    # other metrics too; a parameter with one value in the grid is left out
    assert A.sensitivity(_by_method()["dpo"], "mean_length")["beta"]["spread"] == 20.0
    one = [_rec("a", "dpo", {"beta": 0.1, "lr": 1}, score=1.0),
           _rec("b", "dpo", {"beta": 0.1, "lr": 2}, score=2.0)]
    assert set(A.sensitivity(one)) == {"lr"}


# =========================================================================== per prompt


def _prompts(scores, responses=None, ids=None, lengths=None, kl=None, n_tokens=None):
    n = len(scores)
    ids = ids or [f"p{i}" for i in range(n)]
    responses = responses or [f"r{i}-{s}" for i, s in enumerate(scores)]
    return [{"id": ids[i], "score": scores[i], "response": responses[i],
             "length": (lengths or [10] * n)[i], "kl": (kl or [0.0] * n)[i],
             "n_tokens": (n_tokens or [11] * n)[i]} for i in range(n)]


def test_pairwise_win_rate_counts_ties_half_and_matches_prompts_by_id():
    a = _prompts([1.0, 2.0, 3.0, 5.0], responses=["x", "y", "z", "same"])
    # b in another order, one prompt missing from a, and the same text as a on p3
    b = _prompts([1.0, 4.0, 2.0, 0.0, 9.0], responses=["same", "w", "v", "u", "q"],
                 ids=["p3", "p2", "p1", "p0", "extra"])
    w = A.pairwise_win_rate(a, b)
    # p0: 1 > 0 win; p1: 2 = 2 tie; p2: 3 < 4 loss; p3: same text → tie (5 vs 1)
    assert w == {"win": 0.5, "tie": 0.5, "n": 4}
    assert A.pairwise_win_rate(b, a)["win"] == 0.5
    assert A.pairwise_win_rate([], a) == {"win": None, "tie": None, "n": 0}


def test_pairwise_win_rate_falls_back_to_positions_when_ids_repeat():
    a = _prompts([1.0, 2.0], ids=["same", "same"])
    b = _prompts([0.0, 3.0], ids=["same", "same"])
    assert A.pairwise_win_rate(a, b) == {"win": 0.5, "tie": 0.0, "n": 2}


def _loader(table):
    return lambda rec: table.get(rec["id"])


PER_PROMPT = {
    "d4": _prompts([3.0, 3.0, 1.0, 0.0], lengths=[38, 42, 40, 40], kl=[8.0, 8.0, 8.0, 8.0],
                   n_tokens=[39, 43, 41, 41]),
    "d3": _prompts([2.0, 2.0, 2.0, 2.0], lengths=[30, 30, 30, 30], kl=[6.0, 6.0, 6.0, 6.0]),
    "s1": _prompts([1.0, 3.0, 2.0, 4.0], lengths=[5, 5, 5, 5], kl=[1.0, 1.0, 1.0, 1.0]),
    "s2": _prompts([0.0, 0.0, 0.0, 0.0], lengths=[15] * 4),
}


def test_head_to_head_between_best_and_percentile_runs():
    best = {"dpo": A.best_run(_by_method()["dpo"]), "simpo": A.best_run(_by_method()["simpo"])}
    h = A.head_to_head(best, _loader(PER_PROMPT))
    assert h["runs"] == {"dpo": "d4", "simpo": "s1"}
    # d4 vs s1 per prompt: 3>1 win, 3=3 tie, 1<2 loss, 0<4 loss → (1 + 0.5) / 4
    assert h["matrix"]["dpo"]["simpo"] == {"win": 0.375, "tie": 0.25, "n": 4}
    assert h["matrix"]["simpo"]["dpo"]["win"] == 0.625
    # a run without per-prompt records is left out of the matrix
    h2 = A.head_to_head(best, _loader({"d4": PER_PROMPT["d4"]}))
    assert h2["matrix"] == {"dpo": {}}


def test_topk_distributions_of_length_and_kl():
    t = A.topk_distributions(_by_method()["dpo"], 50, load=_loader(PER_PROMPT))
    assert t["runs"] == ["d4", "d3"]
    assert t["run_level"]["mean_length"]["mean"] == 35.0
    assert t["run_level"]["kl_vs_sft"]["min"] == 6.0
    pooled = t["per_prompt"]
    # lengths of d4 and d3 pooled: 30 30 30 30 38 40 40 42 (median (30 + 38) / 2)
    assert pooled["length"]["n"] == 8 and pooled["length"]["mean"] == 35.0
    assert pooled["length"]["median"] == 34.0 and pooled["length"]["max"] == 42.0
    # KL per token divides by the sampled tokens: d4 8/39, 8/43, 8/41, 8/41; d3 6/11 each
    assert pooled["kl_per_token"]["min"] == pytest.approx(8.0 / 43)
    assert pooled["kl_per_token"]["max"] == pytest.approx(6.0 / 11)


def test_analyze_puts_it_together_and_compares_best_runs_with_dpo():
    res = A.analyze(RECORDS, baseline=BASELINE, load=_loader(PER_PROMPT), top_k_percent=25)
    assert res["methods"] == ["dpo", "simpo"] and res["reference_method"] == "dpo"
    assert res["counts"] == {"dpo": {"trials": 5, "ok": 4, "failed": 1},
                             "simpo": {"trials": 3, "ok": 2, "failed": 1}}
    best = res["best"]
    assert best["dpo"]["id"] == "d4" and best["dpo"]["vs_sft"]["mean_score"] == \
        pytest.approx(1.8)
    # simpo's best (2.5, length 5) vs dpo's best (4.0, length 40), in percent
    assert best["simpo"]["vs_reference"]["mean_score_pct"] == pytest.approx(-37.5)
    assert best["simpo"]["vs_reference"]["mean_length_pct"] == pytest.approx(-87.5)
    assert res["percentile_run"]["dpo"]["id"] == "d3"
    # simpo's 75th-percentile run of two (0.5, 2.5): index round(0.75) = 1 → s1
    assert res["percentile_run"]["simpo"]["id"] == "s1"
    assert res["head_to_head"]["percentile"]["runs"] == {"dpo": "d3", "simpo": "s1"}
    # d3 (all 2.0) vs s1 (1, 3, 2, 4): win, loss, tie, loss
    assert res["head_to_head"]["percentile"]["matrix"]["dpo"]["simpo"]["win"] == 0.375
    assert res["robustness"]["dpo"]["share_worse"] == 0.5
    assert res["top_k"]["simpo"]["runs"] == ["s1"]
    assert res["sensitivity"]["mean_score"]["dpo"]["beta"]["spread"] == 2.0
    assert res["sensitivity"]["mean_length"]["simpo"]["gamma"]["spread"] == 10.0
    json.dumps(res)   # JSON-able as written to analysis.json
    with pytest.raises(ValueError):
        A.analyze(RECORDS, metric="mean_length")


def test_analyze_without_baseline_or_loader_leaves_those_parts_out():
    res = A.analyze(RECORDS)
    assert "head_to_head" not in res and "per_prompt" not in res["top_k"]["dpo"]
    assert res["robustness"]["dpo"]["share_worse"] is None
    assert "vs_sft" not in res["best"]["dpo"]


# =========================================================================== a sweep directory


def make_sweep_dir(root: Path, *, shared_eval: bool = True) -> Path:
    """A sweep directory as `starpo sweep` leaves it, written by hand."""
    root.mkdir(parents=True, exist_ok=True)
    trials = [{"id": r["id"], "method": r["method"], "params": r["params"],
               "dir": f"trials/{r['id']}"} for r in RECORDS]
    info = {"name": "hand", "recipe": "r.yaml", "preference_stage": "dpo", "shared": ["sft"],
            "methods": {"dpo": {}, "simpo": {}}, "analysis": {"top_k_percent": 25},
            "trials": trials,
            "baseline": {"summary": "shared/eval/summary.json", "model": "sft"}
            if shared_eval else None}
    (root / "sweep.json").write_text(json.dumps(info))
    lines = []
    for r in RECORDS:
        r = dict(r)
        if r["id"] in PER_PROMPT:
            r["eval_file"] = f"trials/{r['id']}/eval/dpo.jsonl"
            d = root / "trials" / r["id"] / "eval"
            d.mkdir(parents=True, exist_ok=True)
            (d / "dpo.jsonl").write_text("".join(json.dumps(p) + "\n"
                                                 for p in PER_PROMPT[r["id"]]))
        if r["status"] == "ok":
            r["sft"] = {"mean_score": 2.0, "mean_length": 11.0}
        lines.append(json.dumps(r))
    lines.append('{"id": "d1", "cut short by a ki')   # a line torn by a kill is skipped
    (root / "trials.jsonl").write_text("\n".join(lines) + "\n")
    if shared_eval:
        d = root / "shared" / "eval"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"sft": {**BASELINE, "n": 4}}))
    return root


def test_analyze_dir_reads_records_baseline_and_per_prompt_files(tmp_path):
    res = A.analyze_dir(make_sweep_dir(tmp_path / "s"))
    assert res["baseline"]["mean_score"] == 2.2
    assert res["baseline_source"] == "shared/eval/summary.json"
    assert res["planned"] == 8 and res["finished"] == 8
    assert res["head_to_head"]["best"]["matrix"]["dpo"]["simpo"]["win"] == 0.375
    assert res["top_k"]["dpo"]["per_prompt"]["length"]["n"] == 4
    # no shared evaluation: the trials' own SFT numbers (all 2.0) are the baseline
    res2 = A.analyze_dir(make_sweep_dir(tmp_path / "t", shared_eval=False))
    assert res2["baseline"]["mean_score"] == 2.0
    assert res2["robustness"]["dpo"]["worse"] == 1
    path = A.write_analysis(tmp_path / "s")
    assert json.loads(path.read_text())["best"]["dpo"]["id"] == "d4"


def test_sweep_report_renders_every_section(tmp_path):
    from starpo import report as R
    d = make_sweep_dir(tmp_path / "s")
    out = R.write_report(d)                      # a sweep directory gets the sweep page
    html = out.read_text()
    assert (d / "analysis.json").is_file()
    for section in ("best", "expected", "robustness", "head-to-head", "top-k", "sensitivity",
                    "score-kl", "trials"):
        assert f'id="{section}"' in html, section
    assert html.count("<svg") >= 8 and "http://" not in html.replace(
        "http://www.w3.org/2000/svg", "")
    assert 'href="trials/d4/report.html"' in html          # trials link to their reports
    assert "training loss is NaN" in html                  # failures are shown
    assert "<script" not in html
