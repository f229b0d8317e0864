"""Smoke test of the benchmark harness (``python -m benchmarks.run``) at a microscopic size.

Checks plumbing only (configurations run, results are collected, the ratio table is
printed last); it never asserts a timing. TRL configurations are skipped when TRL is not
installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import assets, run, worker  # noqa: E402


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    model = assets.build_assets(work, corpus_passes=3, model=dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128))
    return work, model


def _have_trl() -> bool:
    try:
        import trl  # noqa: F401
        return True
    except ImportError:
        return False


def test_harness_runs_and_prints_ratios_last(bench):
    work, model = bench
    trl = _have_trl()
    configs = run.plan(run.TINY, {"sft", "sft_ablation", "dpo", "dpo_ablation", "profile"},
                       trl, run.data_maker(work))
    wanted = {"sft_starpo", "sft_starpo_noseg", "sft_starpo_plain", "dpo_starpo",
              "dpo_abl_inline", "dpo_abl_noseg", "dpo_abl_plain", "profile_dpo_seg"}
    if trl:
        wanted |= {"sft_trl_bfd", "dpo_trl"}
    res = {}
    for c in configs:
        if c.name not in wanted:
            continue
        cfg = {"threads": 2, "model": str(model), **c.cfg, "name": c.name, "kind": c.kind}
        r = worker.KINDS[c.kind](cfg, 0)
        r.update(name=c.name, suite=c.suite, label=c.label, peak_rss_mib=worker.rss_mib())
        json.dumps(r)                                   # results must be JSON-serialisable
        res[c.name] = r
    assert set(res) == wanted
    assert res["dpo_starpo"]["padding_fraction"] == 0.0
    # the library's SFT path: one row per micro-batch, no padding; the ablation pads rows
    assert res["sft_starpo"]["padding_fraction"] == 0.0
    assert res["sft_starpo"]["rows_shape_max"][0] == 1
    assert res["sft_starpo_noseg"]["rows_shape_max"][0] > 1
    assert res["sft_starpo"]["trainable_tokens"] == res["sft_starpo_noseg"]["trainable_tokens"]
    assert res["dpo_starpo"]["pairs"] == run.TINY.dpo_pairs
    text, ratios = run.report(res, {"sizes": run.TINY.__dict__})
    assert text.rsplit("\n\n", 1)[-1].startswith("Ratios starpo / TRL")
    if trl:
        assert {"sft_tokens_per_s", "dpo_pairs_per_s", "dpo_peak_rss"} <= set(ratios)
        assert res["sft_starpo"]["trainable_tokens"] == res["sft_trl_bfd"]["trainable_tokens"]


def test_child_process_plumbing(bench, tmp_path):
    work, model = bench
    (work / "logs").mkdir(exist_ok=True)
    c = run.Config("matmul", "matmul", "peak", "matmul", {"n": 128})
    r = run.run_child(c, work, {"threads": 1, "model": str(model)}, log=print)
    assert r is not None and r["gflops_best"] > 0 and r["peak_rss_mib"] > 0
