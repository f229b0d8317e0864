"""Sweeps under any scheduler: ``--trial ID`` (one trial, idempotent), ``--shared-only``,
the emitted SLURM scripts (array size, the commands they run, submit.sh's dependency
chain, and the scripts themselves run with bash on a real tiny grid giving the local
executor's analysis.json), ``cache_dir``, the lock file of concurrent writers, and the
one-line errors of the new flags and keys."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from starpo import fileio
from starpo.cli import app
from starpo.errors import StarpoError
from starpo.run import sweep as S
from starpo.run import sweep_slurm
from starpo.runtime import Runtime
from starpo.train import refcache
from conftest import FAST
from sweep_helpers import RECIPE, SWEEP, _fake_eval, load_error, write_sweep

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _plan(tmp: Path, **changes) -> S.SweepPlan:
    path = write_sweep(tmp, {**SWEEP, "shared": [], **changes})
    return S.make_plan(S.load_sweep(path), tmp / "out")


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_line_error(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output)
    text = res.output.strip()
    assert text.count("\n") == 0 and text.startswith("error: "), text
    return text


# =========================================================================== --trial


def test_trial_runs_one_trial_and_twice_does_nothing_the_second_time(tmp_path):
    plan = _plan(tmp_path)
    calls: list[str] = []

    def runner(recipe, tdir):
        calls.append(tdir.name)
        _fake_eval(tdir, 0.25)

    logs: list[str] = []
    rec = S.run_one_trial(plan, "dpo-beta0.5", runner=runner, log=logs.append)
    assert calls == ["dpo-beta0.5"] and rec["status"] == "ok" and rec["id"] == "dpo-beta0.5"
    assert (plan.out / "sweep.json").is_file()           # `starpo report` can read DIR
    again = S.run_one_trial(plan, "dpo-beta0.5", runner=runner, log=logs.append)
    assert again is None and calls == ["dpo-beta0.5"]
    assert "[2/4] dpo-beta0.5: already finished: ok; nothing to do" in logs
    assert len(S.ResultStore(plan.out / "trials.jsonl").records()) == 1
    # the other trials are untouched, and the analysis reads what is recorded
    assert not (plan.out / "trials" / "dpo-beta0.1").exists()
    S.finalize(plan.out, log=lambda m: None)
    assert json.loads((plan.out / "analysis.json").read_text())["finished"] == 1


def test_a_failed_trial_is_rerun_only_with_retry_failed(tmp_path):
    plan = _plan(tmp_path)
    calls: list[str] = []

    def failing(recipe, tdir):
        calls.append(tdir.name)
        raise StarpoError("loss is NaN at step 1")

    logs: list[str] = []
    rec = S.run_one_trial(plan, "simpo-gamma1", runner=failing, log=logs.append)
    assert rec["status"] == "failed" and rec["error"] == "loss is NaN at step 1"
    assert S.run_one_trial(plan, "simpo-gamma1", runner=failing, log=logs.append) is None
    assert calls == ["simpo-gamma1"]
    assert any("already finished: failed (loss is NaN at step 1); --retry-failed runs it "
               "again" in line for line in logs)
    rec = S.run_one_trial(plan, "simpo-gamma1", runner=lambda r, d: _fake_eval(d, 1.0),
                          retry_failed=True, log=logs.append)
    assert rec["status"] == "ok"
    assert S.ResultStore(plan.out / "trials.jsonl").latest()["simpo-gamma1"]["status"] == "ok"


def test_trial_refuses_when_the_shared_stages_are_not_complete(tmp_path):
    path = write_sweep(tmp_path)               # shared: [sft]
    plan = S.make_plan(S.load_sweep(path), tmp_path / "out")
    with pytest.raises(S.SweepError) as err:
        S.run_one_trial(plan, "dpo-beta0.1", runner=lambda r, d: None, log=lambda m: None)
    msg = str(err.value)
    assert "\n" not in msg and "the shared stages sft, eval are not complete" in msg
    assert "--shared-only" in msg
    assert not (plan.out / "trials").exists()


def test_an_unknown_trial_id_is_one_line_and_exit_2(tmp_path):
    path = write_sweep(tmp_path, {**SWEEP, "shared": []})
    msg = _one_line_error(_cli("sweep", str(path), "--out", str(tmp_path / "o"),
                               "--trial", "dpo-beta9"))
    assert f"{path}: no trial 'dpo-beta9' (of 4;" in msg and "--dry-run" in msg


# =========================================================================== flags and keys


@pytest.mark.parametrize("flags, needle", [
    (["--executor", "slurm"], "--executor slurm: not one of local, ray"),
    (["--emit", "k8s"], "--emit k8s: not one of slurm"),
    (["--trial", "dpo-beta0.1", "--executor", "ray"], "--executor ray does not go with --trial"),
    (["--executor", "ray", "--jobs", "2"], "--executor ray does not go with --jobs"),
    (["--address", "auto"], "--address is the Ray cluster's; add --executor ray"),
    (["--trial", "dpo-beta0.1", "--emit", "slurm"], "--trial and --emit do not go together"),
    (["--shared-only", "--jobs", "2"], "--jobs does not go with --shared-only"),
])
def test_conflicting_flags_are_one_line(tmp_path, flags, needle):
    path = write_sweep(tmp_path)
    assert needle in _one_line_error(_cli("sweep", str(path), "--out", str(tmp_path / "o"),
                                          *flags))


@pytest.mark.parametrize("changes, needle", [
    ({"resources": {"gpus": 1}}, "resources.gpus: unknown key"),
    ({"resources": {"cpu": 0}}, "resources.cpu: Input should be greater than 0"),
    ({"resources": {"gpu": 1.5}}, "resources.gpu: 1.5 is more than one GPU but not a whole"),
    ({"max_retries": -1}, "max_retries: Input should be greater than or equal to 0"),
    ({"slurm": {"partion": "gpu"}}, "slurm.partion: unknown key"),
])
def test_bad_scheduler_keys_are_one_line(tmp_path, changes, needle):
    assert needle in load_error(tmp_path, **changes)


def test_executor_ray_without_ray_is_one_line(tmp_path):
    path = write_sweep(tmp_path, {**SWEEP, "shared": []})
    code = ("import sys; sys.modules['ray'] = None; from starpo.cli import main; "
            f"sys.argv = ['starpo', 'sweep', {str(path)!r}, '--out', "
            f"{str(tmp_path / 'o')!r}, '--executor', 'ray']; main()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=ENV)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == ("error: --executor ray needs Ray, which is not installed "
                                "here: pip install 'starpo[ray]' (or pip install ray)")
    assert not (tmp_path / "o" / "trials").exists()


def test_a_ray_address_where_nothing_listens_is_one_line(tmp_path):
    import socket
    from starpo.run import sweep_ray
    with socket.socket() as sock:          # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StarpoError, match=rf"--address 127.0.0.1:{port}: nothing answers "
                                          rf"at 127.0.0.1:{port} \("):
        sweep_ray.check_reachable(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(StarpoError, match="not auto, HOST:PORT or ray://HOST:PORT"):
        sweep_ray.check_reachable("head:port")
    with socket.socket() as sock:          # something listening: fine
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sweep_ray.check_reachable(f"ray://127.0.0.1:{sock.getsockname()[1]}", timeout=2)
    sweep_ray.check_reachable("auto")


def test_a_multi_gpu_trial_runs_under_accelerate_launch(tmp_path):
    assert S.trial_command(tmp_path, 1)[1:4] == ["-m", "starpo.cli", "run"]
    cmd = S.trial_command(tmp_path, 4)
    assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "4"]
    assert cmd[5:] == ["-m", "starpo.cli", "run", str(tmp_path / "recipe.yaml"), "--out",
                       str(tmp_path), "-q"]
    assert S.trial_processes(S.ResourcesSpec(gpu=0.5)) == 1
    assert S.trial_processes(S.ResourcesSpec(gpu=2)) == 2


# =========================================================================== cache_dir


def test_cache_dir_of_the_file_and_the_command_line(tmp_path):
    path = write_sweep(tmp_path, {**SWEEP, "shared": [], "cache_dir": "caches"})
    sw = S.load_sweep(path)
    plan = S.make_plan(sw, tmp_path / "out")
    assert plan.caches == (tmp_path / "caches").resolve()     # relative to the sweep file
    S.run_one_trial(plan, "dpo-beta0.1", runner=lambda r, d: _fake_eval(d, 0.0),
                    log=lambda m: None)
    tdir = plan.out / "trials" / "dpo-beta0.1"
    assert (tdir / "refcache").resolve() == tmp_path.resolve() / "caches" / "refcache"
    assert (tdir / "evalcache").resolve() == tmp_path.resolve() / "caches" / "evalcache"
    assert json.loads((plan.out / "sweep.json").read_text())["cache_dir"] == str(plan.caches)
    assert not (plan.out / "refcache").exists()

    # the command line wins; an existing trial's links follow the new directory
    other = S.make_plan(sw, tmp_path / "out", tmp_path / "elsewhere")
    assert other.caches == (tmp_path / "elsewhere").resolve()
    S._prepare_trial(other, *other.trials[0])
    assert (tdir / "refcache").resolve() == (tmp_path / "elsewhere" / "refcache").resolve()
    # without either: the sweep directory, as before
    plain = S.make_plan(S.load_sweep(write_sweep(tmp_path / "p", {**SWEEP, "shared": []})),
                        tmp_path / "p" / "out")
    assert plain.caches == plain.out


# =========================================================================== locks and caches


def test_the_lock_is_exclusive_between_threads(tmp_path):
    lock = tmp_path / "x.lock"
    inside, most = [0], [0]

    def work():
        for _ in range(5):
            with fileio.exclusive(lock, poll=0.01):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.01)
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and not lock.exists()


def test_a_lock_left_by_a_dead_holder_is_broken_and_a_live_one_is_not(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text("host pid 1 dead")               # nobody touches it any more
    waits: list[str] = []
    t0 = time.monotonic()
    with fileio.exclusive(lock, stale_after=0.5, poll=0.05, on_wait=waits.append):
        assert lock.read_text() != "host pid 1 dead"
    assert 0.5 <= time.monotonic() - t0 < 5 and waits == ["host pid 1 dead"]

    # a holder with a heartbeat is waited for however long it takes
    held = threading.Event()
    released = []

    def holder():
        with fileio.exclusive(lock, heartbeat=0.05):
            held.set()
            time.sleep(1.2)
            released.append(time.monotonic())

    t = threading.Thread(target=holder)
    t.start()
    held.wait()
    with fileio.exclusive(lock, stale_after=0.4, poll=0.05):
        got = time.monotonic()
    t.join()
    assert released and got >= released[0]


def _locked_compute(args):
    """In a child process: compute an entry once under the lock (two processes race)."""
    lock, entry, count = (Path(a) for a in args)
    if not entry.exists():
        with fileio.exclusive(lock, poll=0.02):
            if not entry.exists():
                with count.open("a") as f:
                    f.write("computed\n")
                time.sleep(0.5)
                fileio.write_text(entry, "value")
    return entry.read_text()


def test_two_processes_missing_the_same_entry_compute_it_once(tmp_path):
    args = (str(tmp_path / ".e.lock"), str(tmp_path / "e"), str(tmp_path / "count"))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        got = pool.map(_locked_compute, [args, args])
    assert got == ["value", "value"]
    assert (tmp_path / "count").read_text().splitlines() == ["computed"]


class _Tok:
    chat_template = "t"

    def get_vocab(self):
        return {"a": 0, "b": 1}


class _Runtime(Runtime):
    """One CPU process whose models are stand-ins (nothing to move)."""

    def __init__(self):
        super().__init__(torch.device("cpu"))

    def model(self, m):
        return m


def _pairs(n: int) -> list[dict]:
    return [{"prompt_ids": [1, i], "chosen_ids": [2], "chosen_labels": [2],
             "rejected_ids": [3], "rejected_labels": [3]} for i in range(n)]


def test_two_concurrent_misses_of_one_reference_entry_compute_it_once(tmp_path, monkeypatch):
    """Two trials needing the same reference pass at the same moment: one computes, the
    other waits for its file and reads it (before the lock both computed)."""
    computed = []

    def slow(model, pairs, runtime, **kw):
        computed.append(1)
        time.sleep(0.8)
        return torch.arange(len(pairs), dtype=torch.float32), -torch.ones(len(pairs))

    monkeypatch.setattr(refcache, "compute_reference", slow)
    out: dict[int, refcache.RefLogps] = {}
    logs: list[str] = []

    def trial(i):
        out[i] = refcache.reference_logps("hub-model", _Tok(), _pairs(3), cache_dir=tmp_path,
                                          load_model=lambda: object(), runtime=_Runtime(),
                                          progress=False, log=logs.append)

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(computed) == 1
    assert sorted(r.hit for r in out.values()) == [False, True]
    assert torch.equal(out[0].chosen, out[1].chosen)
    assert any("waiting for" in line for line in logs)
    assert [p.name for p in tmp_path.iterdir()] == [f"ref-{out[0].key}.safetensors"]


def test_a_damaged_reference_entry_is_computed_again_not_read(tmp_path, monkeypatch):
    computed = []

    def compute(model, pairs, runtime, **kw):
        computed.append(1)
        return torch.zeros(len(pairs)), torch.zeros(len(pairs))

    monkeypatch.setattr(refcache, "compute_reference", compute)
    kw = dict(cache_dir=tmp_path, load_model=lambda: object(), runtime=_Runtime(),
              progress=False, log=lambda m: None)
    first = refcache.reference_logps("hub-model", _Tok(), _pairs(2), **kw)
    entry = tmp_path / f"ref-{first.key}.safetensors"
    entry.write_bytes(entry.read_bytes()[:20])       # damaged outside starpo
    again = refcache.reference_logps("hub-model", _Tok(), _pairs(2), **kw)
    assert len(computed) == 2 and not again.hit
    assert refcache.reference_logps("hub-model", _Tok(), _pairs(2), **kw).hit


def test_appends_to_trials_jsonl_wait_for_the_lock(tmp_path):
    """Array tasks on several machines append at once, and NFS appends from different
    clients can overwrite each other, so an append waits while another writer (here: this
    test) holds trials.jsonl.lock, and every line arrives whole."""
    store = S.ResultStore(tmp_path / "trials.jsonl")
    done = threading.Event()
    t = threading.Thread(target=lambda: (store.append({"id": "a"}), done.set()))
    with fileio.exclusive(tmp_path / "trials.jsonl.lock"):
        t.start()
        assert not done.wait(0.6)                 # blocked while the lock is held
        assert not (tmp_path / "trials.jsonl").exists()
    t.join(10)
    assert done.is_set() and [r["id"] for r in store.records()] == ["a"]
    assert not (tmp_path / "trials.jsonl.lock").exists()
    code = ("import sys; from starpo.run.sweep import ResultStore; s = ResultStore(sys.argv[1])\n"
            "for i in range(30): s.append({'id': sys.argv[2] + str(i), 'pad': 'x' * 3000})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(store.path), f"p{j}-"], env=ENV)
             for j in range(3)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    assert len({r["id"] for r in store.records()}) == 91


# =========================================================================== SLURM


def _emit(tmp: Path, **changes) -> tuple[S.SweepPlan, Path]:
    path = write_sweep(tmp, {**SWEEP, **changes})
    plan = S.make_plan(S.load_sweep(path, ["stages.dpo.train.max_steps=2"]), tmp / "out",
                       tmp / "cache")
    return plan, sweep_slurm.emit_slurm(plan, log=lambda m: None)


def test_the_slurm_array_has_one_task_per_trial_and_runs_the_sweep_commands(tmp_path):
    plan, submit = _emit(tmp_path, resources={"cpu": 4, "gpu": 1, "memory_gb": 30.5},
                         slurm={"partition": "gpu", "time": "02:00:00", "max_parallel": 3,
                                "sbatch": ["--qos=high"], "setup": ["module load cuda"]})
    d = submit.parent
    trials = (d / "trials.sbatch").read_text()
    assert "#SBATCH --array=0-3%3" in trials
    for line in ("#SBATCH --cpus-per-task=4", "#SBATCH --gres=gpu:1", "#SBATCH --mem=31G",
                 "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00", "#SBATCH --qos=high",
                 "module load cuda", "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"):
        assert line in trials.splitlines(), line
    ids = re.search(r"TRIALS=\(\n(.*?)\n\)", trials, re.S).group(1).split()
    assert ids == [t.id for t, _ in plan.trials]
    base = (f"{sys.executable} -m starpo.cli sweep {plan.sweep.path.resolve()} "
            f"stages.dpo.train.max_steps=2 --out {plan.out} --cache-dir {plan.cache_dir}")
    assert trials.rstrip().endswith(f'{base} --trial "${{TRIALS[$SLURM_ARRAY_TASK_ID]}}" -q')
    shared = (d / "shared.sbatch").read_text()
    assert shared.rstrip().endswith(f"{base} --shared-only -q")
    assert "--array" not in shared and "#SBATCH --gres=gpu:1" in shared
    assert (d / "report.sbatch").read_text().rstrip().endswith(
        f"{sys.executable} -m starpo.cli report {plan.out}")
    assert (d / "logs").is_dir()


def test_submit_sh_chains_shared_then_array_then_report(tmp_path):
    plan, submit = _emit(tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(
        "#!/usr/bin/env bash\n"
        f'n=$(( $(wc -l < {tmp_path}/calls 2>/dev/null || echo 0) + 101 ))\n'
        f'echo "$*" >> {tmp_path}/calls\n'
        'echo "$n;cluster"\n')
    (fake / "sbatch").chmod(0o755)
    p = subprocess.run(["bash", str(submit)], capture_output=True, text=True,
                       env={**ENV, "PATH": f"{fake}:{os.environ['PATH']}"}, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        "--parsable shared.sbatch",
        "--parsable --dependency=afterok:101 trials.sbatch",
        "--parsable --dependency=afterany:102 report.sbatch"]
    assert "trial array 102 (4 tasks), report job 103" in p.stdout

    # without shared stages the array is submitted first
    plan, submit = _emit(tmp_path / "noshared", shared=[])
    assert not (submit.parent / "shared.sbatch").exists()
    assert "afterok" not in submit.read_text() and "trials=$(jobid trials.sbatch)" in \
        submit.read_text()


def test_the_array_task_runs_the_trial_of_its_index(tmp_path):
    """The bash of trials.sbatch itself: task i calls --trial with the i-th id."""
    rec = tmp_path / "argv.json"
    fake = tmp_path / "fake_starpo.py"
    fake.write_text(f"import json, sys; json.dump(sys.argv[1:], open({str(rec)!r}, 'w'))\n")
    plan, submit = _emit(tmp_path, slurm={"command": f"{sys.executable} {fake}"})
    p = subprocess.run(["bash", str(submit.parent / "trials.sbatch")], capture_output=True,
                       text=True, timeout=60, env={**ENV, "SLURM_ARRAY_TASK_ID": "2"})
    assert p.returncode == 0, p.stderr
    argv = json.loads(rec.read_text())
    assert argv == ["sweep", str(plan.sweep.path.resolve()), "stages.dpo.train.max_steps=2",
                    "--out", str(plan.out), "--cache-dir", str(plan.cache_dir),
                    "--trial", "simpo-gamma0.3", "-q"]


def test_the_emitted_scripts_run_the_sweep_and_match_the_local_analysis(tmp_path):
    """The scripts run with bash (no SLURM here) in the order submit.sh gives them, on two
    real trials of the tiny model; a task run twice does nothing the second time; the
    report job's analysis.json is the local executor's."""
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0]["train"] = {**FAST, "max_steps": 2, "lr": 1e-3}
    recipe["stages"][1]["train"] = {**FAST, "max_steps": 2, "lr": 1e-4}
    sweep = {**SWEEP, "methods": {"dpo": {"stages.dpo.beta": [0.1, 0.5]}}}
    path = write_sweep(tmp_path, sweep, recipe)
    sw = S.load_sweep(path)
    local = S.make_plan(sw, tmp_path / "local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # the array tasks get OMP_NUM_THREADS=1 (1 CPU each)
    try:
        S.run_sweep(local, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    S.finalize(local.out, log=lambda m: None)

    res = _cli("sweep", str(path), "--out", str(tmp_path / "slurm"), "--emit", "slurm")
    assert res.exit_code == 0, res.output
    d = tmp_path / "slurm" / "slurm"
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}

    def job(script: str, task: int | None = None) -> subprocess.CompletedProcess:
        e = {**env, **({"SLURM_ARRAY_TASK_ID": str(task)} if task is not None else {})}
        return subprocess.run(["bash", str(d / script)], capture_output=True, text=True,
                              timeout=600, env=e)

    early = job("trials.sbatch", 0)                  # before the shared job: refused
    assert early.returncode == 2 and "--shared-only" in early.stderr
    assert job("shared.sbatch").returncode == 0
    for task in (0, 1):
        p = job("trials.sbatch", task)
        assert p.returncode == 0, p.stderr
    jsonl = (tmp_path / "slurm" / "trials.jsonl").read_text()
    p = job("trials.sbatch", 1)                      # the same task again: nothing to do
    assert p.returncode == 0 and "dpo-beta0.5: already finished: ok; nothing to do" in p.stdout
    assert (tmp_path / "slurm" / "trials.jsonl").read_text() == jsonl
    assert job("report.sbatch").returncode == 0
    a = json.loads((local.out / "analysis.json").read_text())
    b = json.loads((tmp_path / "slurm" / "analysis.json").read_text())
    assert a == b and b["finished"] == 2
