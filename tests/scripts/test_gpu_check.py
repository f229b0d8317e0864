"""scripts/gpu_check.sh as far as a CPU allows: the dry run checks the plan (the shrunk
phi-3-medium recipe validates, the tokenizer and data files exist, the installs it would
make are listed, the step limits fit in 8 minutes, the starpo-vs-TRL bench's
configurations and data), the model step builds a loadable checkpoint with the real
tokenizer (at a tiny width here), and the bench's code runs end to end on CPU on that tiny
model (sdpa, fp32, no peak GPU memory): it proves the plumbing and the table, not a
figure. What needs the GPU — flash-attention, bf16, vLLM, compiled flex attention, the
figures — runs only on the GPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import realdata

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_checks_the_plan(tmp_path):
    realdata("tokenizers", "gpt2")
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run",
                          "--out", str(tmp_path / "gc")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    plan = json.loads((tmp_path / "gc" / "plan.json").read_text())
    assert plan["steps"] == ["env", "install", "gpu-tests", "model", "pipeline", "bench",
                             "table"]
    assert sum(plan["limits_s"].values()) <= 480          # 8 minutes
    assert plan["missing_files"] == []
    kinds = [s["type"] for s in plan["recipe"]["stages"]]
    assert kinds == ["sft", "dpo", "reward", "online", "eval"]
    stages = {s["type"]: s for s in plan["recipe"]["stages"]}
    assert stages["online"]["generation"]["backend"] == "vllm"
    assert stages["eval"]["generation"]["backend"] == "vllm"
    assert plan["recipe"]["model"]["attn_implementation"] == "flash_attention_2"
    # this CPU venv has neither: the dry run lists both installs
    wanted = " ".join(" ".join(c) for c in plan["installs"])
    for mod, req in (("vllm", "vllm"), ("flash_attn", "flash-attn")):
        if importlib.util.find_spec(mod) is None:
            assert req in wanted
    assert "would install" in res.stdout
    assert plan["recipe"]["model"]["dtype"] == "auto"      # fp32 master weights, bf16 autocast
    bench = plan["bench"]
    assert bench["configs"] == ["sft/starpo", "sft/trl", "dpo/starpo", "dpo/trl"]
    assert bench["rows"] == {"sft": bench["sizes"]["sft_convs"], "dpo": bench["sizes"]["dpo_pairs"]}
    assert sum(bench["limits_s"].values()) <= plan["limits_s"]["bench"]
    assert bench["peak_flops"] == 790e12


def test_installs_use_carried_wheels_without_a_registry():
    cmds = _module().install_plan("/wheels")
    for c in cmds:
        assert "--no-index" in c and c[c.index("--find-links") + 1] == "/wheels"


def test_model_step_builds_a_loadable_checkpoint(tmp_path, monkeypatch):
    realdata("tokenizers", "gpt2")
    gc = _module()
    monkeypatch.setattr(gc, "MODEL", {**gc.MODEL, "hidden_size": 32, "intermediate_size": 64,
                                      "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "num_key_value_heads": 2})
    path = gc.build_model(tmp_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert m.config.vocab_size == len(tok) and "<|im_end|>" in tok.get_vocab()
    assert json.loads((tmp_path / "model.json").read_text())["parameters"] > 0


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "scripts" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_SIZES = {"sft_convs": 16, "sft_batch": 2, "sft_len": 256, "dpo_pairs": 8,
              "dpo_batch": 2, "dpo_len": 256, "hi": 16}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    realdata("tokenizers", "gpt2")
    gc = _module()
    gc.MODEL = {**gc.MODEL, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2}
    return str(gc.build_model(tmp_path_factory.mktemp("bench")))


def test_bench_runners_measure_on_cpu(tiny_model):
    """Every configuration's runner (starpo and TRL, SFT and DPO) in this process, at a
    microscopic size, and the table from their results."""
    gb = _bench()
    sizes = {**gb.SIZES, **TINY_SIZES}
    kinds = [k for k in gb.CONFIGS if k[1] == "starpo" or importlib.util.find_spec("trl")]
    res = {f"{k}/{f}": gb.RUNNERS[(k, f)](tiny_model, sizes) for k, f in kinds}
    for r in res.values():
        assert r["steps"] >= 2 and r["tokens_per_s"] > 0 and r["peak_gib"] is None
    assert res["dpo/starpo"]["one_row"] and res["dpo/starpo"]["pairs"] == 8
    res["dpo/trl"] = {"error": "rc 1 (see bench-dpo-trl.log)"}
    t = gb.table(res)
    assert "(rc 1" in t and "DPO: starpo" not in t
    if "sft/trl" in res:
        assert "SFT: starpo / TRL = " in t
    assert f"{res['sft/starpo']['flops_per_s'] / 790e12:.1%}" in t


def test_bench_records_a_configuration_that_fails(tiny_model, tmp_path):
    """The ``all`` step: one child process per configuration, each under its limit; one
    that runs out of time is recorded in the table and the exit status, not fatal."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "all",
                          "--model", tiny_model, "--out", str(tmp_path / "b"), "--limit", "0.01"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    out = json.loads((tmp_path / "b" / "bench.json").read_text())["results"]
    assert set(out) == {"sft/starpo", "sft/trl", "dpo/starpo", "dpo/trl"}
    assert all(r["error"].startswith("rc 124") for r in out.values())
    assert (tmp_path / "b" / "bench.md").read_text().count("(rc 124") == 4
