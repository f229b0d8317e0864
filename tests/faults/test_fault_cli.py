"""Real faults on the ``starpo run`` command, as a cluster delivers them: SIGKILL, a second
run on the same directory, a damaged latest checkpoint, SIGTERM (preemption), and a disk
that fills up. One run directory goes through the first four in turn; it must end at the
weights and metrics of a run that was never interrupted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from starpo import fileio

TIME_FIELDS = ("tokens_per_s", "elapsed_s")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _recipe(base_path: str) -> dict:
    return {"name": "faults", "seed": 0, "model": {"name_or_path": base_path}, "stages": [
        {"type": "sft", "data": {"sources": [{"path": "world:sft", "n": 200}]},
         "packing": {"max_length": 96},
         "train": {"max_steps": 60, "batch_size": 4, "lr": 1e-3, "log_every": 1,
                   "save_every": 20}}]}


def _cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "starpo.cli", "run", str(recipe), "--out", str(out), "-q",
            "--no-report"]


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(_cmd(recipe, out), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _steps(out: Path) -> list[int]:
    return [int(r["step"]) for r in fileio.read_jsonl(out / "sft" / "metrics.jsonl")]


def _metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS}
            for r in fileio.read_jsonl(out / "sft" / "metrics.jsonl")]


@pytest.fixture(scope="module")
def setup(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-faults")
    recipe = d / "faults.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(base["path"])))
    full = d / "full"
    subprocess.run(_cmd(recipe, full), check=True, env=ENV, capture_output=True, timeout=600)
    return {"recipe": recipe, "full": full, "dir": d}


def test_kill_second_run_damaged_checkpoint_and_sigterm_end_at_the_uninterrupted_run(setup):
    recipe, out = setup["recipe"], setup["dir"] / "faulty"
    ckpts = out / "sft" / "checkpoints"

    # 1. SIGKILL after the step-40 checkpoint; while it is stopped, a second run is refused
    proc = _start(recipe, out)
    _wait(proc, lambda: (ckpts / "step_0000040" / "manifest.json").is_file(), "step 40")
    os.killpg(proc.pid, signal.SIGSTOP)             # alive, holding the lock
    second = subprocess.run(_cmd(recipe, out), env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"error: {out} is in use by another starpo command (starpo run on")
    assert f"pid {proc.pid}," in line and "--force" in line
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "sft" / "stage.json").exists()

    # 2. the newest checkpoint is damaged (a copy cut short): the rerun says so and falls
    # back to step 20; 3. SIGTERM then stops it at a step of its own, with a checkpoint
    w = ckpts / "step_0000040" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    proc = _start(recipe, out)
    _wait(proc, lambda: max(_steps(out), default=0) >= 43, "step 43")
    os.killpg(proc.pid, signal.SIGSTOP)             # the signal lands mid-run, whatever
    os.killpg(proc.pid, signal.SIGTERM)             # the machine's speed
    os.killpg(proc.pid, signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr
    assert f"checkpoint {ckpts / 'step_0000040'} is damaged (model.safetensors has 1000 " \
           f"bytes" in stdout and "resuming from step_0000020 instead" in stdout
    (line,) = stderr.strip().splitlines()
    assert line.startswith("sft: preempted (SIGTERM) at step ")
    step = int(line.split(" at step ")[1].split()[0])
    assert 43 <= step < 60 and "checkpoint saved" in line and line.endswith(
        "rerun the same command to resume")
    assert (ckpts / f"step_{step:07d}" / "manifest.json").is_file()
    assert not (out / fileio.LOCK_NAME).exists()     # released on the way out

    # 4. the rerun finishes: the uninterrupted run's weights, and its log line for line
    done = subprocess.run(_cmd(recipe, out), env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    a = load_file(str(setup["full"] / "sft" / "model" / "model.safetensors"))
    b = load_file(str(out / "sft" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    assert _steps(out) == list(range(1, 61))
    assert _metrics(out) == _metrics(setup["full"])


def _small_fs_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k none /tmp"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _small_fs_available(), reason="needs unshare and a tmpfs mount")
def test_a_full_disk_is_one_line_and_no_checkpoint_that_looks_complete(setup):
    """A real small filesystem (a 1 MB tmpfs in a private mount namespace): the first
    checkpoint does not fit."""
    out = setup["dir"] / "small"
    out.mkdir()
    cmd = " ".join(_cmd(setup["recipe"], out))
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        f"mount -t tmpfs -o size=1m none {out} && {cmd} && ls -la {out}"],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 74, (p.stdout, p.stderr)
    (line,) = p.stderr.strip().splitlines()
    ck = out / "sft" / "checkpoints" / "step_0000020"
    assert line.startswith(f"error: {ck}: no space left on device")
    assert "it needs about" in line and "free there" in line
    assert line.endswith("rerun the same command: it resumes from the start of the stage")
