"""The shipped quickstart recipe, every stage, shrunk by overrides to run in CI time:
sft → dpo → online → eval → report, through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from starpo.run import pipeline
from starpo.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
SHRINK = [
    "model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2",
    "model.tiny.num_attention_heads=4", "model.tiny.num_key_value_heads=4",
    "model.tiny.intermediate_size=128",
    "stages.sft.data.sources.0.n=400", "stages.sft.train.max_steps=40",
    "stages.sft.train.save_every=null",
    "stages.dpo.data.sources.0.n=120", "stages.dpo.train.max_steps=4",
    "stages.dpo.train.batch_size=8", "stages.dpo.train.save_every=null",
    "stages.online.rounds=1", "stages.online.prompts_per_round=12",
    "stages.online.n_samples=3", "stages.online.generation.max_new_tokens=16",
    "stages.online.train.batch_size=4",
    "stages.eval.data.sources.0.n=24", "stages.eval.generation.max_new_tokens=24",
    "stages.eval.bootstrap=100",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    rec = load_recipe(ROOT / "recipes" / "quickstart.yaml", SHRINK)
    pipeline.run(rec, out, log=lambda m: None, progress=False)
    return out


def test_every_stage_completes_with_its_artifacts(run_dir):
    for stage in ("sft", "dpo", "online", "eval"):
        assert (run_dir / stage / "stage.json").is_file(), stage
    for stage in ("sft", "dpo", "online"):
        assert (run_dir / stage / "model" / "config.json").is_file()
    rnd = run_dir / "online" / "round_1"
    samples = [json.loads(l) for l in (rnd / "samples.jsonl").open()]
    assert samples and all(len(s["samples"]) == 3 for s in samples)
    assert (rnd / "pairs.jsonl").is_file()


def test_eval_summary_has_the_contracted_metrics(run_dir):
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert {"sft", "dpo", "online"} <= set(summary)
    for name, m in summary.items():
        for k in ("mean_score", "win_vs_chosen", "win_vs_sft", "kl_vs_sft",
                  "kl_vs_sft_per_token", "mean_length"):
            assert k in m and f"{k}_ci" in m, (name, k)
    assert summary["sft"]["kl_vs_sft"] == 0.0 and summary["sft"]["win_vs_sft"] == 0.5
    recs = [json.loads(l) for l in (run_dir / "eval" / "dpo.jsonl").open()]
    assert len(recs) == summary["dpo"]["n"]


def test_report_is_written(run_dir):
    html = (run_dir / "report.html").read_text()
    assert "<table" in html and "<svg" in html
    for name in ("sft", "dpo", "online"):
        assert name in html


def test_rerun_skips_everything(run_dir):
    logs = []
    rec = load_recipe(ROOT / "recipes" / "quickstart.yaml", SHRINK)
    pipeline.run(rec, run_dir, log=logs.append, progress=False, report=False)
    assert sum("complete, skipped" in l for l in logs) == 4
