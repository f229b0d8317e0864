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

from benchmarks import assets, run, worker


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
    configs = run.plan(run.TINY, {"sft", "sft_ablation", "dpo", "dpo_ablation", "profile",
                                  "compile", "pipeline"}, trl, run.data_maker(work))
    wanted = {"sft_starpo", "sft_starpo_noseg", "sft_starpo_plain", "dpo_starpo",
              "dpo_abl_inline", "dpo_abl_noseg", "dpo_abl_plain", "profile_dpo_seg",
              "pipeline"}
    if trl:
        wanted |= {"sft_trl_bfd", "sft_trl_bfd_gc", "dpo_trl"}
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
    # the pipeline suite: a row per quickstart stage, sampling and judging measured
    stages = {x["stage"]: x for x in res["pipeline"]["stages"]}
    assert list(stages) == ["sft", "dpo", "online", "eval"]
    assert all(x["seconds"] > 0 for x in stages.values())
    for st in ("online", "eval"):
        assert stages[st]["sampling_tokens_per_s"] > 0 and stages[st]["judging_per_s"] > 0
    text, ratios = run.report(res, {"sizes": run.TINY.__dict__})
    assert text.rsplit("\n\n", 1)[-1].startswith("Ratios starpo / TRL")
    assert "The quickstart stage by stage" in text
    if trl:
        assert {"sft_tokens_per_s", "dpo_pairs_per_s", "dpo_peak_rss"} <= set(ratios)
        assert res["sft_starpo"]["trainable_tokens"] == res["sft_trl_bfd"]["trainable_tokens"]
        # gradient checkpointing is set explicitly, both ways, and reported
        assert res["sft_trl_bfd"]["trl_settings"]["gradient_checkpointing"] is False
        assert res["sft_trl_bfd_gc"]["trl_settings"]["gradient_checkpointing"] is True
        assert res["dpo_trl"]["trl_settings"]["gradient_checkpointing"] is False
        assert "TRL settings used" in text


def test_compiled_profile_sees_inductor_kernels(bench):
    """The profile suite with ``train.compile``: blocks compiled, their fused kernels
    recorded as profiler events of their own (cold compile: the slow test of this file)."""
    work, model = bench
    (c,) = [c for c in run.plan(run.TINY, {"profile"}, False, run.data_maker(work))
            if c.name == "profile_sft_seg_compile"]
    r = worker.KINDS[c.kind]({"threads": 2, "model": str(model), **c.cfg, "name": c.name,
                              "kind": c.kind}, 0)
    assert r["compile"] and r["compile_stats"]["graphs"] > 0
    assert r["categories"].get("fused kernels (inductor)", 0) > 0
    assert r["flops"] > 0 and r["mm_flops"] > 0 and r["mm_s"] > 0


def test_compile_table_from_measurements():
    """The report's train.compile rows from given measurements (no run): overhead = extra
    first-step and reference-pass seconds, break-even = overhead / seconds saved a step."""
    eager = {"label": "e", "first_step_s": 1.0, "step_median_s": 0.5, "ref_s": 2.0}
    comp = {"label": "c", "first_step_s": 21.0, "step_median_s": 0.4, "ref_s": 12.0,
            "compile_stats": {"graphs": 4, "graph_breaks": 5}}
    text, ratios = run.report({"dpo_starpo": {**eager, **_dpo_fields()},
                               "dpo_starpo_compile": {**comp, **_dpo_fields()}},
                              {"sizes": run.TINY.__dict__})
    assert ratios["dpo_compile_overhead_s"] == 30.0
    assert ratios["dpo_compile_step_speedup"] == 1.25
    row = [line for line in text.splitlines() if line.startswith("| DPO ")][0]
    assert "| 300 " in row            # 30 s / 0.1 s saved per step


def _dpo_fields():
    return {"pairs_per_s": 1.0, "train_pairs_per_s": 1.0, "peak_rss_mib": 1.0,
            "rss_after_load_mib": 1.0, "padding_fraction": 0.0, "row_len_max": 10, "flops": 1.0,
            "pairs": 8, "e2e_s": 1.0, "tokens_real": 10}


def test_child_process_plumbing(bench, tmp_path):
    work, model = bench
    (work / "logs").mkdir(exist_ok=True)
    c = run.Config("matmul", "matmul", "peak", "matmul", {"n": 128})
    r = run.run_child(c, work, {"threads": 1, "model": str(model)}, log=print)
    assert r is not None and r["gflops_best"] > 0 and r["peak_rss_mib"] > 0
