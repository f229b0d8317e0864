"""A real kill: SIGKILL the CLI mid-stage, rerun the same command, and end at the same
weights as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

TINY = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "intermediate_size": 96, "vocab_size": 400}
RECIPE = {"name": "kill", "seed": 0, "model": {"name_or_path": "tiny", "tiny": TINY},
          "stages": [{"type": "sft", "data": {"sources": [{"path": "world:sft", "n": 400}]},
                      "packing": {"max_length": 128},
                      "train": {"max_steps": 40, "batch_size": 4, "lr": 1e-3, "log_every": 1,
                                "save_every": 5, "keep_checkpoints": 2}}]}


def _cmd(recipe: Path, out: Path):
    return [sys.executable, "-m", "starpo.cli", "run", str(recipe), "--out", str(out), "-q",
            "--no-report"]


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(recipe, full), check=True, env=env, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cmd(recipe, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = killed / "sft" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len([p for p in ckpts.glob("step_*") if (p / "state.json").is_file()]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "sft" / "stage.json").exists()

    subprocess.run(_cmd(recipe, killed), check=True, env=env, capture_output=True, timeout=600)
    a = load_file(str(full / "sft" / "model" / "model.safetensors"))
    b = load_file(str(killed / "sft" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    steps = [int(l.split('"step": ')[1].split(",")[0])
             for l in (killed / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
