"""Smoke test of the benchmark harness (``python -m benchmarks.run``) at a microscopic size.

Checks plumbing only (configurations run, results are collected, the ratio table is
printed last); it never asserts a timing. TRL configurations are skipped when TRL is not
installed. Also checks the segment-local attention prototype against the library path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
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
    configs = run.plan(run.TINY, {"sft", "dpo", "dpo_ablation", "proto"}, trl,
                       run.data_maker(work))
    wanted = {"sft_starpo", "dpo_starpo", "dpo_abl_inline", "dpo_proto_seg"}
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


def test_segment_attention_prototype_matches_library(bench):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.segattn import segment_sequence_logprobs
    from starpo import prefbatch as PB
    from starpo.logprobs import sequence_logprobs

    _, path = bench
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa")
    pairs, _ = worker._tokenize_pairs(tok, assets.preference_rows(5, lo=3, hi=30),
                                      {"max_length": 512})
    dicts = [p.as_dict() for p in pairs]
    for batch in (PB.collate_prefix_shared(dicts), PB.collate_padding_free(dicts),
                  PB.collate_prefix_shared(dicts, max_tokens_per_row=200)):
        grads = []
        for fn in (sequence_logprobs, segment_sequence_logprobs):
            model.zero_grad()
            lp = fn(model, batch)[0]
            lp.sum().backward()
            grads.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
        (a, ga), (b, gb) = grads
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
