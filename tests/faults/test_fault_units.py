"""Faults one piece at a time: a preemption signal in the loop, a damaged checkpoint, a
full disk while checkpointing, the run directory's lock, chunked online sampling stopped
and continued, and the SLURM script's requeue. Each asserts that nothing finished is lost
and that the resumed result is the uninterrupted one."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import random_docs, tiny_llama
from starpo import fileio
from starpo.data.packing import layout_sft
from starpo.errors import DiskError, RunDirBusy
from starpo.recipe import GenerationSpec, TrainSpec
from starpo.stages.sft import SFTTask
from starpo.train import checkpoint as C
from starpo.train import preempt
from starpo.train.loop import LoopHooks, run_loop

pytestmark = pytest.mark.usefixtures("one_thread")

TIME_FIELDS = ("tokens_per_s", "elapsed_s")


def _task():
    lay = layout_sft(random_docs(32, lo=8, hi=30, seed=0), mode="pad", loss_masking=True,
                     max_length=64)
    return SFTTask(lay, batch_size=4, pad_id=0, seed=0)


SPEC = TrainSpec(lr=5e-3, max_steps=7, batch_size=4, save_every=2, log_every=1)


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def _metrics(d: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS}
            for r in fileio.read_jsonl(d / "metrics.jsonl")]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    d = tmp_path_factory.mktemp("full")
    m = tiny_llama(100)
    run_loop(m, _task(), SPEC, d, seed=1, progress=False)
    return {"weights": _weights(m), "metrics": _metrics(d)}


@pytest.fixture
def sigterm():
    """SIGTERM handled as a preemption for the test; the flag is cleared after."""
    preempt.reset()
    with preempt.handling([signal.SIGTERM]):
        yield lambda: os.kill(os.getpid(), signal.SIGTERM)
    preempt.reset()


# ------------------------------------------------------------------ preemption in the loop

def test_sigterm_finishes_the_step_checkpoints_and_resumes_to_the_same_run(full, tmp_path,
                                                                          sigterm):
    def on_step(step, rec):
        if step == 3:          # between two periodic checkpoints (2 and 4)
            sigterm()
    with pytest.raises(preempt.Preempted) as err:
        run_loop(tiny_llama(100), _task(), SPEC, tmp_path, seed=1, progress=False,
                 hooks=LoopHooks(on_step=on_step))
    msg = str(err.value)
    assert "preempted (SIGTERM) at step 3 of 7; checkpoint saved" in msg
    assert "rerun the same command to resume" in msg and "\n" not in msg
    assert C.latest_checkpoint(tmp_path / "checkpoints").name == "step_0000003"
    preempt.reset()
    resumed = tiny_llama(100)       # a fresh process: initial weights, then the checkpoint
    run_loop(resumed, _task(), SPEC, tmp_path, seed=1, progress=False, resume=True)
    _same(full["weights"], _weights(resumed))
    # the log of the resumed run is the uninterrupted one, values included
    assert _metrics(tmp_path) == full["metrics"]


def test_a_signal_outside_a_deferred_section_stops_at_once(sigterm):
    with pytest.raises(preempt.Preempted, match="preempted .SIGTERM. during start-up"):
        sigterm()
        time.sleep(5)      # the handler raises before this ends
    preempt.reset()
    with preempt.section("stage sft", defer=True):
        sigterm()          # only noted; the code stops at its next check
    with pytest.raises(preempt.Preempted, match="after stage sft"):
        preempt.check("stage sft", when="after")


def test_preemption_signals_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(preempt.ENV, "usr1, SIGTERM,15")
    assert preempt.signals_from_env() == [signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM]
    monkeypatch.setenv(preempt.ENV, "none")
    assert preempt.signals_from_env() == []
    monkeypatch.setenv(preempt.ENV, "TREM")
    with pytest.raises(Exception, match="not a signal name"):
        preempt.signals_from_env()


# ------------------------------------------------------------------ damaged checkpoints

def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(full, tmp_path):
    run_loop(tiny_llama(100), _task(), SPEC, tmp_path, seed=1, progress=False,
             hooks=LoopHooks(stop_after=5))              # "killed" after step 5
    ck = tmp_path / "checkpoints"
    assert [p.name for p in sorted(ck.glob("step_*"))] == ["step_0000002", "step_0000004"]
    latest = ck / "step_0000004" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])        # a copy cut short
    assert "model.safetensors has 1000 bytes" in C.verify_checkpoint(ck / "step_0000004")
    logs: list[str] = []
    resumed = tiny_llama(100)
    run_loop(resumed, _task(), SPEC, tmp_path, seed=1, progress=False, resume=True,
             log=logs.append)
    (line,) = [x for x in logs if "damaged" in x]
    assert "step_0000004 is damaged (model.safetensors has 1000 bytes" in line
    assert "resuming from step_0000002 instead" in line
    _same(full["weights"], _weights(resumed))
    assert _metrics(tmp_path) == full["metrics"]


def test_verification_catches_a_changed_byte_and_a_missing_file(tmp_path):
    m = tiny_llama(100)
    opt = torch.optim.AdamW(m.parameters())
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    d = C.save_checkpoint(tmp_path, 1, m, opt, sch, {}, keep=1)
    assert C.verify_checkpoint(d) is None
    data = bytearray((d / "optimizer.pt").read_bytes())
    data[-40] ^= 0xFF                                      # same size, one bit flipped
    (d / "optimizer.pt").write_bytes(bytes(data))
    assert C.verify_checkpoint(d) == "optimizer.pt does not match its recorded sha256"
    (d / "rng.pt").unlink()
    assert C.verify_checkpoint(d) == "rng.pt is missing"
    (d / C.MANIFEST).unlink()
    (d / "state.json").unlink()
    assert "not completely written" in C.verify_checkpoint(d)
    # at least two are kept, whatever keep_checkpoints says
    for step in (2, 3, 4):
        C.save_checkpoint(tmp_path, step, m, opt, sch, {}, keep=1)
    assert [p.name for p in sorted(tmp_path.glob("step_*"))] == ["step_0000003",
                                                                 "step_0000004"]


def test_a_saved_model_is_checked_before_its_stage_counts(tmp_path):
    from starpo.model import loading
    from starpo.world import World
    tok = loading.train_tokenizer(World(0).corpus(200), vocab_size=300, seed=0)
    loading.save_pretrained(tiny_llama(len(tok)), tok, tmp_path / "model")
    assert C.verify_model_dir(tmp_path / "model") is None
    w = tmp_path / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    assert "expected from its header" in C.verify_model_dir(tmp_path / "model")
    w.write_bytes(b"\x10")
    assert "too short" in C.verify_model_dir(tmp_path / "model")


# ------------------------------------------------------------------ a full disk

def _fill_after(real, limit_calls: int):
    """A safetensors writer that works ``limit_calls`` times, then writes part of the
    file and fails the way safetensors reports a full disk."""
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) <= limit_calls:
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 1000)
        raise RuntimeError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")
    return save_file


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_half_checkpoint(
        full, tmp_path, monkeypatch):
    import safetensors.torch as st
    monkeypatch.setattr(st, "save_file", _fill_after(st.save_file, 1))   # step 2 fits
    with pytest.raises(DiskError) as err:
        run_loop(tiny_llama(100), _task(), SPEC, tmp_path, seed=1, progress=False)
    msg = str(err.value)
    ck = tmp_path / "checkpoints"
    assert msg.startswith(f"{ck / 'step_0000004'}: no space left on device")
    assert "it needs about" in msg and "MB free there" in msg and "\n" not in msg
    assert "rerun the same command: it resumes from step_0000002" in msg
    assert sorted(p.name for p in ck.iterdir()) == ["step_0000002"]   # no tmp, no half
    assert C.verify_checkpoint(ck / "step_0000002") is None
    monkeypatch.undo()
    resumed = tiny_llama(100)             # on a disk with room again
    run_loop(resumed, _task(), SPEC, tmp_path, seed=1, progress=False, resume=True)
    _same(full["weights"], _weights(resumed))


def test_fileio_writes_name_the_file_on_a_full_disk(tmp_path):
    def fills(tmp: Path) -> None:
        (tmp / "a.bin").write_bytes(b"x" * 3_000_000)
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskError, match=r"model: no space left .* while writing a model "
                                        r"\(it needs more than the 2\.9 MB written"):
        fileio.atomic_dir(tmp_path / "model", fills, what="a model")
    assert list(tmp_path.iterdir()) == []
    assert fileio.disk_full(RuntimeError("x")) is False
    assert fileio.disk_full(OSError(errno.EDQUOT, "Disk quota exceeded")) is True


# ------------------------------------------------------------------ one writer per directory

HOLD = ("import sys, time\nfrom starpo.fileio import dir_lock\n"
        "with dir_lock(sys.argv[1], command='starpo run'):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")


def test_a_second_writer_is_refused_until_the_first_is_gone(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy) as err:
            with fileio.dir_lock(tmp_path, command="starpo run"):
                pass
        msg = str(err.value)
        assert f"starpo run on {socket.gethostname()}, pid {holder.pid}" in msg
        assert "--force" in msg and "\n" not in msg
    finally:
        holder.kill()
        holder.wait()
    # its process is gone (killed: the lock file is still there): taken over, with a line
    logs: list[str] = []
    with fileio.dir_lock(tmp_path, command="starpo run", log=logs.append):
        rec = json.loads((tmp_path / fileio.LOCK_NAME).read_text())
        assert rec["pid"] == os.getpid()
    assert f"its process {holder.pid} has ended" in logs[0]
    assert not (tmp_path / fileio.LOCK_NAME).exists()        # released


def _foreign_lock(d: Path, **rec) -> Path:
    lock = d / fileio.LOCK_NAME
    lock.write_text(json.dumps({"host": "another-node", "pid": 4242, "command": "starpo run",
                                "started": "then", **rec}))
    return lock


def test_a_lock_of_another_machine_is_stale_only_when_not_refreshed(tmp_path, monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    lock = _foreign_lock(tmp_path)
    with pytest.raises(RunDirBusy, match="another-node, pid 4242"):
        with fileio.dir_lock(tmp_path, command="starpo run"):
            pass
    logs: list[str] = []
    with fileio.dir_lock(tmp_path, command="starpo run", force=True, log=logs.append):
        pass
    assert "taking over the lock of starpo run on another-node (pid 4242): --force" in logs[0]
    lock = _foreign_lock(tmp_path)
    old = time.time() - fileio.LOCK_STALE - 60
    os.utime(lock, (old, old))
    logs.clear()
    with fileio.dir_lock(tmp_path, command="starpo run", log=logs.append):
        pass
    assert "has not refreshed it for" in logs[0]
    # a requeued SLURM job finds the lock of its own earlier run
    _foreign_lock(tmp_path, slurm_job="77_3")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    logs.clear()
    with fileio.dir_lock(tmp_path, command="starpo run", log=logs.append):
        pass
    assert "earlier run of this SLURM job 77_3" in logs[0]


def test_sweep_and_eval_commands_refuse_a_directory_in_use(tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from starpo.cli import app
    from sweep_helpers import write_sweep
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    path = write_sweep(tmp_path)
    out = tmp_path / "sweep-out"
    out.mkdir()
    _foreign_lock(out)
    res = CliRunner().invoke(app, ["sweep", str(path), "--out", str(out), "-q"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: {out} is in use by another starpo command (starpo run on another-node, "
        f"pid 4242, since then); wait for it to finish, or if that process is gone (its "
        f"machine died) rerun with --force"]
    assert not (out / "trials.jsonl").exists()
    (out / "recipe.yaml").write_text("stages: [{type: eval}]\n")
    res = CliRunner().invoke(app, ["eval", str(out), "-q"])
    assert res.exit_code == 2 and "is in use by another starpo command" in res.output


# ------------------------------------------------------------------ online sampling

def test_chunked_sampling_equals_one_call_and_continues_after_a_stop(base, tmp_path,
                                                                    monkeypatch):
    """Chunks of prompts draw exactly the samples of one call over all prompts; a stop
    after the first chunk keeps it, and the rerun samples only the second."""
    from starpo import world
    from starpo.generate.sampling import HFBackend
    from starpo.stages import online
    from starpo.stages import online_rounds as O
    prompts = [r["prompt"] for r in world.rows("prompt", 20, seed=0)]
    spec = GenerationSpec(temperature=1.0, top_p=0.95, max_new_tokens=10, batch_size=4)
    assert online.chunk_prompts(3, 4) == 12                # 36 rows: 9 batches of 4
    one = O.sample_responses(base["model"], base["tok"], prompts, spec, n=3, seed=5,
                             progress=False)
    ctx = SimpleNamespace(log=lambda m: None, progress=False)
    stage = SimpleNamespace(name="online", generation=spec, n_samples=3)
    backend = HFBackend(base["model"], base["tok"])
    calls: list[list[int]] = []
    real = O.sample_responses

    def counted(*a, **k):
        calls.append(list(k["indices"]))
        out = real(*a, **k)
        if len(calls) == 1:
            preempt._state["signal"] = signal.SIGTERM     # arrives during the first chunk
        return out
    monkeypatch.setattr(O, "sample_responses", counted)
    with pytest.raises(preempt.Preempted, match="after sampling 12 of 20 prompts"):
        online._sample_resumable(ctx, stage, 1, prompts, base["tok"], backend, 5,
                                 rdir=tmp_path)
    preempt.reset()
    got = online._sample_resumable(ctx, stage, 1, prompts, base["tok"], backend, 5,
                                   rdir=tmp_path)
    assert len(calls) == 2 and not set(calls[0]) & set(calls[1])    # nothing drawn twice
    assert sorted(calls[0] + calls[1]) == list(range(20))           # none skipped
    assert [[s.token_ids for s in g] for g in got] == [[s.token_ids for s in g] for g in one]
    assert [[s.text for s in g] for g in got] == [[s.text for s in g] for g in one]


# ------------------------------------------------------------------ SLURM requeue

def test_the_slurm_task_passes_the_signal_on_and_requeues_itself(tmp_path):
    from starpo.run import sweep as S
    from starpo.run import sweep_slurm
    from sweep_helpers import SWEEP, write_sweep
    fake = tmp_path / "fake_starpo.py"
    fake.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
        # ready only once the handler is in: a signal before it would kill (status 138)
        f"open({str(tmp_path / 'started')!r}, 'w').close()\n"
        "time.sleep(60)\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$*" > {tmp_path}/requeue\n')
    (bin_dir / "scontrol").chmod(0o755)
    path = write_sweep(tmp_path, {**SWEEP, "slurm": {"command": f"{sys.executable} {fake}"}})
    plan = S.make_plan(S.load_sweep(path), tmp_path / "out")
    submit = sweep_slurm.emit_slurm(plan, log=lambda m: None)
    script = (submit.parent / "trials.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@120" in script
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "555",
           "SLURM_ARRAY_TASK_ID": "0"}
    job = subprocess.Popen(["bash", str(submit.parent / "trials.sbatch")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)            # what --signal=B:USR1@120 does
    out, err = job.communicate(timeout=30)
    assert job.returncode == 75, err
    assert (tmp_path / "requeue").read_text().split() == ["requeue", "555"]
    assert "requeueing job 555" in out


@pytest.mark.parametrize("slow_kill", [False, True])
def test_the_requeue_wrapper_returns_starpos_status_when_it_ends_right_after_the_signal(
        tmp_path, slow_kill):
    """The batch script's wrapper passes SIGUSR1 on and returns starpo's status (75), also
    when starpo ends between the forwarded signal and the wrapper's liveness check: a slow
    ``kill`` (a shell function over the builtin) holds that window open, which under load
    made the wrapper return the cut-short wait's 138 and skip the requeue."""
    from starpo.run.sweep_slurm import REQUEUE_FUNCTION
    child = tmp_path / "child.py"
    child.write_text("import os, signal, time\n"
                     "signal.signal(signal.SIGUSR1, lambda *a: os._exit(75))\n"
                     f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
                     "time.sleep(30)\n")
    slow = 'kill() { builtin kill "$@"; local r=$?; sleep 0.5; return $r; }\n' if slow_kill \
        else ""
    script = tmp_path / "job.sh"
    script.write_text(f"{slow}{REQUEUE_FUNCTION}\n"
                      f"run_requeueable {sys.executable} {child}\necho status $?\n")
    job = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "SLURM_JOB_ID": ""})
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)                              # the wrapper is in its wait
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=30)
    assert "status 75" in out, out
