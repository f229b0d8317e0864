"""scripts/gpu_check.sh as far as a CPU allows: the dry run checks the plan (the shrunk
phi-3-medium recipe validates, the tokenizer and data files exist, the installs it would
make are listed, the step limits fit in 8 minutes), and the model step builds a loadable
checkpoint with the real tokenizer (at a tiny width here). What needs the GPU — the
flash-attention/bf16/vLLM pipeline and the figures — runs only on the GPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert plan["steps"] == ["env", "install", "gpu-tests", "model", "pipeline", "table"]
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
