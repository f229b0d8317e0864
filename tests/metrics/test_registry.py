"""The metric registry: the summary's keys in their order (``summary.json`` is part of the
contract), the names derived from it, and the registry as the one place a metric is
defined: metrics added there (and nowhere else) show in the eval summary, the
per-category table, the run page, the sweep analysis and the sweep page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from starpo import report as R
from starpo.metrics import analysis as A
from starpo.metrics import names
from starpo.metrics import registry as MR
from starpo.run import sweep as S

CONTRACT = ("mean_score", "win_vs_chosen", "win_vs_sft", "kl_vs_sft", "kl_vs_sft_per_token",
            "mean_length")

# two models on six prompts; the dpo model is compared with the sft one
SFT = {"scores": [0.1, 0.5, -0.2, 0.9, 0.0, 0.3], "lengths": [3, 8, 2, 12, 4, 6]}
DPO = {"scores": [0.4, 0.5, 0.2, 0.7, 0.6, 0.3], "lengths": [4, 3, 2, 9, 3, 10]}
CHOSEN = [0.2, None, 0.0, 1.0, 0.1, 0.3]


def _summary(model: dict, *, sft: dict, kl: list[float] | None, n_boot: int = 200) -> dict:
    lengths = model["lengths"]
    return MR.summarize_model(
        model["scores"], lengths, [n + 1 for n in lengths], finished=[n < 10 for n in lengths],
        chosen_scores=CHOSEN, same_as_chosen=[False] * 6, sft_scores=sft["scores"],
        same_as_sft=[a == b for a, b in zip(model["scores"], sft["scores"])], kl=kl,
        n_boot=n_boot, seed=0)


def test_summary_keys_keep_their_order_and_the_derived_names_are_the_contract():
    m = _summary(DPO, sft=SFT, kl=[1.0, 0.5, 0.0, 2.0, 1.5, 0.2])
    assert list(m) == [
        "n", "mean_score", "mean_score_ci", "win_vs_chosen", "win_vs_chosen_ci",
        "tie_vs_chosen", "tie_vs_chosen_ci", "n_chosen", "win_vs_sft", "win_vs_sft_ci",
        "tie_vs_sft", "tie_vs_sft_ci", "kl_vs_sft", "kl_vs_sft_ci", "kl_vs_sft_per_token",
        "kl_vs_sft_per_token_ci", "mean_length", "mean_length_ci", "length_quantiles",
        "finished_rate", "finished_rate_ci"]
    assert m["n_chosen"] == 5
    # dpo vs sft: win, tie (same score), win, loss, win, tie -> (1 + .5 + 1 + 0 + 1 + .5) / 6
    assert m["win_vs_sft"] == pytest.approx(4 / 6) and m["tie_vs_sft"] == pytest.approx(2 / 6)
    assert names.EVAL_METRICS == MR.sweep_names() == CONTRACT
    assert names.HEADLINE_METRICS == MR.headline_names() == CONTRACT[:3]
    assert len({m.name for m in MR.METRICS}) == len(MR.METRICS)
    assert MR.get("win_vs_sft").tie == "tie_vs_sft"
    with pytest.raises(KeyError, match="no metric 'nope'"):
        MR.get("nope")


def test_no_finished_flags_or_reference_gives_none_not_a_guess():
    m = MR.summarize_model([0.5, 1.0], [2, 3], [3, 4], n_boot=0)
    assert m["finished_rate"] is None and m["win_vs_sft"] is None and m["tie_vs_sft"] is None
    assert m["win_vs_chosen"] is None and "n_chosen" not in m
    assert m["mean_score"] == 0.75 and m["mean_score_ci"] is None


# --------------------------------------------------------------------------- a new metric


SHORT = MR.Metric("short_rate", "short", lambda v: (v.lengths < 5).astype(np.float64),
                  higher_is_better=True, label="share of short responses", percent=True,
                  description="short = share of responses under 5 tokens")
# no interval, the median instead of the mean, per category from the records' n_tokens
TOKENS = MR.Metric("median_tokens", "median tokens", lambda v: v.n_tokens,
                   aggregate=lambda values, idx: (float(np.median(values)), None),
                   record="n_tokens", sweep=False)


@pytest.fixture
def added(monkeypatch):
    """The registry with two more entries: the only change a new metric needs."""
    monkeypatch.setattr(MR, "METRICS", MR.METRICS + (SHORT, TOKENS))


def _run_dir(root: Path, summary: dict) -> Path:
    root.mkdir(parents=True)
    (root / "recipe.yaml").write_text(
        "name: extra\nstages:\n- {type: sft}\n- {type: dpo}\n- {type: eval}\n")
    (root / "eval").mkdir()
    (root / "eval" / "summary.json").write_text(json.dumps(summary))
    (root / "eval" / "meta.json").write_text(json.dumps({"prompts": 6, "reference": "sft"}))
    return root


def _sweep_dir(root: Path, summary: dict) -> Path:
    """A sweep directory as ``starpo sweep`` leaves it: each trial's record read from its
    evaluation by the sweep's own reader (here the two summaries' models)."""
    root.mkdir(parents=True)
    trials = [{"id": f"t{i}", "method": "dpo", "params": {"dpo.beta": b}, "dir": f"trials/t{i}"}
              for i, b in enumerate((0.1, 0.5))]
    (root / "sweep.json").write_text(json.dumps(
        {"name": "extra", "methods": {"dpo": {}}, "trials": trials, "analysis": {}}))
    recs = []
    for t, model in zip(trials, ("sft", "dpo")):      # recorded as the sweep records them
        ev = root / t["dir"] / "eval"
        ev.mkdir(parents=True)
        (ev / "summary.json").write_text(json.dumps(summary))
        (ev / "meta.json").write_text(json.dumps({"reference": "sft"}))
        recs.append({**t, "status": "ok", **S.read_trial_eval(root / t["dir"], "eval",
                                                                model, root)})
    (root / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def test_a_metric_added_to_the_registry_shows_everywhere(added, tmp_path):
    summary = {"sft": _summary(SFT, sft=SFT, kl=[0.0] * 6),
               "dpo": _summary(DPO, sft=SFT, kl=[1.0, 0.5, 0.0, 2.0, 1.5, 0.2])}
    sft, dpo = summary["sft"], summary["dpo"]
    # the eval summary: after the built-in metrics, in the registry's order
    assert list(dpo)[-4:] == ["short_rate", "short_rate_ci", "median_tokens",
                              "median_tokens_ci"]
    assert sft["short_rate"] == pytest.approx(3 / 6) and dpo["short_rate"] == pytest.approx(4 / 6)
    lo, hi = dpo["short_rate_ci"]
    assert 0.0 <= lo <= 4 / 6 <= hi <= 1.0
    assert dpo["median_tokens"] == 4.5 and dpo["median_tokens_ci"] is None  # its aggregate
    # the per-category table, from per-prompt records
    recs = [{"category": "a", "score": 1.0, "n_tokens": n} for n in (3, 9, 4)]
    assert MR.by_category(recs, n_boot=0)["a"]["median_tokens"] == 4.0

    # the run page: a column with its header, as a percentage, the best in bold, explained
    page = R.write_report(_run_dir(tmp_path / "run", summary)).read_text()
    table = re.search(r'<table class="metrics">.*?</table>', page, flags=re.S).group(0)
    assert "<th>short</th>" in table and "<th>median tokens</th>" in table
    assert '<td class="best"><span class="v">67%</span>' in table
    assert '<td><span class="v">50%</span>' in table
    assert "short = share of responses under 5 tokens" in page

    # the sweep: analysed over the grid, selectable as what "best" means, on the page
    res = A.analyze_dir(_sweep_dir(tmp_path / "sweep", summary))
    assert res["expected"]["dpo"]["short_rate"]["n"] == 2
    assert res["best"]["dpo"]["metrics"]["short_rate"] == pytest.approx(4 / 6)
    records = [json.loads(line) for line in (tmp_path / "sweep" / "trials.jsonl").open()]
    assert A.analyze(records, metric="short_rate")["best"]["dpo"]["id"] == "t1"
    html = R.write_report(tmp_path / "sweep").read_text()
    # best run, expected performance and every trial: one column each
    assert html.count("<th>short</th>") == 3 and "<th>median tokens</th>" not in html
    assert "<td>67%</td>" in html and "<td>50%</td>" in html


def test_without_the_entry_nothing_knows_the_metric(tmp_path):
    summary = {"dpo": _summary(DPO, sft=SFT, kl=None)}
    assert "short_rate" not in summary["dpo"]
    page = R.write_report(_run_dir(tmp_path / "run", summary)).read_text()
    assert "<th>short</th>" not in page
    with pytest.raises(ValueError, match="analysis metric"):
        A.analyze([], metric="short_rate")
