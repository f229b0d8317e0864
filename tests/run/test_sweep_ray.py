"""The Ray executor (starpo.run.sweep_ray) on a local Ray cluster of 2 CPUs: a tiny grid end
to end with the same records and analysis.json as the local executor, a worker killed
mid-trial and retried, a worker that keeps dying recorded as failed, resume, and one real
2-trial grid on the tiny model (shared SFT as a Ray task) whose analysis.json equals the
local executor's."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from starpo.metrics.names import EVAL_METRICS
from starpo.run import sweep as S
from starpo.run import sweep_ray as R
from micro import FAST
from sweep_helpers import SWEEP, RECIPE, write_sweep

TESTS = Path(__file__).resolve().parents[1]
# pytest imports this file as a module named after its path from the repository root
# (importlib import mode), so the workers need the root and tests/ (for sweep_helpers)
ROOT = TESTS.parent


@pytest.fixture(scope="module", autouse=True)
def cluster():
    # the workers import this module (the runners below are pickled by reference), so
    # they need the tests directory on their path; they inherit the raylet's environment
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(TESTS), *([p for p in sys.path if p.endswith("src")][:1]), *([old] if old else [])])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 ** 2,
             configure_logging=False)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


# --------------------------------------------------------------------------- runners
# They run inside Ray worker processes: every side effect goes to files.


def _score(tid: str) -> float:
    """A deterministic score per trial, so both executors must record the same numbers."""
    return int(hashlib.sha256(tid.encode()).hexdigest()[:6], 16) / 16 ** 6 - 0.5


def fake_eval(tdir: Path, score: float) -> None:
    d = tdir / "eval"
    d.mkdir(parents=True, exist_ok=True)
    m = {k: round(score / 3 + 0.5, 6) for k in EVAL_METRICS}
    (d / "summary.json").write_text(json.dumps({"sft": {**m, "mean_score": -0.25},
                                                "dpo": {**m, "mean_score": score, "n": 3}}))
    (d / "meta.json").write_text(json.dumps({"reference": "sft", "files": {"dpo": "dpo.jsonl"}}))
    (d / "dpo.jsonl").write_text("".join(
        json.dumps({"id": str(i), "score": score + i / 10, "length": 5 + i, "kl": 0.1 * i,
                    "kl_per_token": 0.01 * i, "response": f"r{i}"}) + "\n" for i in range(3)))
    (tdir / "report.html").write_text("<html></html>")


def _calls(tdir: Path) -> Path:
    return tdir.parents[1] / "calls.txt"


def scoring_runner(recipe, tdir: Path) -> None:
    with _calls(tdir).open("a") as f:
        f.write(tdir.name + "\n")
    fake_eval(tdir, _score(tdir.name))


def dies_once_runner(recipe, tdir: Path) -> None:
    """The first attempt of dpo-beta0.5 kills its own worker process mid-trial."""
    marker = tdir / "attempts.txt"
    n = len(marker.read_text().splitlines()) + 1 if marker.exists() else 1
    marker.write_text("x\n" * n)
    if tdir.name == "dpo-beta0.5" and n == 1:
        os._exit(1)
    scoring_runner(recipe, tdir)


def always_dies_runner(recipe, tdir: Path) -> None:
    marker = tdir / "attempts.txt"
    with marker.open("a") as f:
        f.write("x\n")
    if tdir.name == "simpo-gamma1":
        os._exit(3)
    scoring_runner(recipe, tdir)


def raising_runner(recipe, tdir: Path) -> None:
    with (tdir / "attempts.txt").open("a") as f:
        f.write("x\n")
    raise RuntimeError("a bug in the trial")


def _plan(tmp: Path, name: str, **changes) -> S.SweepPlan:
    sweep = {**SWEEP, "shared": [], **changes}
    path = write_sweep(tmp, sweep, name=f"{name}.yaml")
    return S.make_plan(S.load_sweep(path), tmp / name)


# --------------------------------------------------------------------------- fake trials


def test_a_tiny_grid_on_ray_records_what_the_local_executor_records(tmp_path):
    local = _plan(tmp_path, "local")
    on_ray = _plan(tmp_path, "ray")
    S.run_sweep(local, runner=scoring_runner, log=lambda m: None)
    S.finalize(local.out, log=lambda m: None)
    logs: list[str] = []
    recs = R.run_sweep_ray(on_ray, runner=scoring_runner, log=logs.append)
    S.finalize(on_ray.out, log=lambda m: None)

    assert [r["id"] for r in recs] == [t.id for t, _ in on_ray.trials]
    assert all(r["status"] == "ok" for r in recs)
    strip = ("seconds", "finished")
    mine = [{k: v for k, v in r.items() if k not in strip}
            for r in S.ResultStore(local.out / "trials.jsonl").records()]
    theirs = {r["id"]: {k: v for k, v in r.items() if k not in strip} for r in recs}
    assert [theirs[r["id"]] for r in mine] == mine
    a = json.loads((local.out / "analysis.json").read_text())
    b = json.loads((on_ray.out / "analysis.json").read_text())
    assert a == b
    assert (on_ray.out / "report.html").is_file() and (on_ray.out / "sweep.json").is_file()
    # progress on the driver: a line per start and per finish, and the counts with an ETA
    assert sum(": running on " in line for line in logs) == 4
    assert sum(": ok in " in line for line in logs) == 4
    assert any(line.startswith("[ray] 4/4 done (0 failed), 0 running, 0 waiting")
               for line in logs), logs
    assert any("ETA" in line for line in logs)

    # resume: nothing runs again
    calls = (on_ray.out / "calls.txt").read_text().splitlines()
    logs.clear()
    R.run_sweep_ray(on_ray, runner=scoring_runner, log=logs.append)
    assert (on_ray.out / "calls.txt").read_text().splitlines() == calls
    assert sum("ok, skipped" in line for line in logs) == 4
    assert len((on_ray.out / "trials.jsonl").read_text().splitlines()) == 4


def test_a_worker_killed_mid_trial_is_retried(tmp_path):
    plan = _plan(tmp_path, "killed")
    logs: list[str] = []
    recs = R.run_sweep_ray(plan, runner=dies_once_runner, log=logs.append)
    by = {r["id"]: r for r in recs}
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    killed = plan.out / "trials" / "dpo-beta0.5"
    assert len((killed / "attempts.txt").read_text().splitlines()) == 2
    assert len((plan.out / "trials" / "dpo-beta0.1" / "attempts.txt").read_text()
               .splitlines()) == 1
    assert by["dpo-beta0.5"]["metrics"]["mean_score"] == _score("dpo-beta0.5")
    assert any("dpo-beta0.5: running on" in line and "attempt 2" in line for line in logs)
    # one record per trial: the dead attempt left none
    assert len((plan.out / "trials.jsonl").read_text().splitlines()) == 4


def test_a_worker_that_keeps_dying_is_recorded_failed_after_max_retries(tmp_path):
    plan = _plan(tmp_path, "dying", max_retries=1)
    logs: list[str] = []
    recs = R.run_sweep_ray(plan, runner=always_dies_runner, log=logs.append)
    by = {r["id"]: r for r in recs}
    bad = by["simpo-gamma1"]
    assert bad["status"] == "failed"
    assert bad["error"].startswith("the Ray worker died (2 attempts, max_retries 1): "), bad
    assert len((plan.out / "trials" / "simpo-gamma1" / "attempts.txt").read_text()
               .splitlines()) == 2
    assert all(by[t]["status"] == "ok" for t in ("dpo-beta0.1", "dpo-beta0.5",
                                                 "simpo-gamma0.3"))
    assert any("simpo-gamma1: FAILED" in line for line in logs)
    assert any(line.startswith("[ray] 4/4 done (1 failed)") for line in logs)

    # a failed trial is skipped on resume, and run again with retry_failed
    R.run_sweep_ray(plan, runner=always_dies_runner, log=lambda m: None)
    assert len((plan.out / "trials" / "simpo-gamma1" / "attempts.txt").read_text()
               .splitlines()) == 2
    R.run_sweep_ray(plan, runner=always_dies_runner, log=lambda m: None, retry_failed=True)
    assert len((plan.out / "trials" / "simpo-gamma1" / "attempts.txt").read_text()
               .splitlines()) == 4
    assert len((plan.out / "trials.jsonl").read_text().splitlines()) == 5


def test_an_exception_in_a_trial_is_its_result_not_a_reason_to_retry(tmp_path):
    plan = _plan(tmp_path, "raising", methods={"dpo": {"stages.dpo.beta": [0.1]}})
    recs = R.run_sweep_ray(plan, runner=raising_runner, log=lambda m: None)
    assert [(r["status"], r["error"]) for r in recs] == [
        ("failed", "RuntimeError: a bug in the trial")]
    assert len((plan.out / "trials" / "dpo" / "attempts.txt").read_text().splitlines()) == 1


def test_a_task_runs_with_the_threads_of_its_cpus_whatever_the_worker_had():
    """A reused worker may carry another torch thread count (an earlier task, a module it
    imported set it): each task pins it to its CPUs (at least one)."""
    import torch
    before = torch.get_num_threads()
    try:
        for cpu, want in ((1, 1), (0.5, 1), (2, 2)):
            torch.set_num_threads(3)
            R._pin_threads(S.ResourcesSpec(cpu=cpu))
            assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


def test_a_trial_asking_for_more_than_any_node_has_is_reported(tmp_path):
    """No node of the 2-CPU cluster fits a 3-CPU trial: the driver says so (an autoscaler
    could still add one, so it is a line, not an error; the test does not wait for it)."""
    plan = _plan(tmp_path, "big", resources={"cpu": 3})
    assert R._fits_somewhere(ray, plan.sweep.spec.resources) == "2 CPU, 0 GPU"
    assert R._fits_somewhere(ray, S.ResourcesSpec(cpu=2)) is None


# --------------------------------------------------------------------------- real trials


def test_real_tiny_grid_on_ray_gives_the_local_executors_analysis(tmp_path):
    """Two DPO trials on the tiny model, the shared SFT stage and its evaluation run as a
    Ray task first: the same analysis.json as the local executor (same seeds, one thread
    per trial in both)."""
    import torch

    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0]["train"] = {**FAST, "max_steps": 2, "lr": 1e-3}
    recipe["stages"][1]["train"] = {**FAST, "max_steps": 2, "lr": 1e-4}
    sweep = {**SWEEP, "methods": {"dpo": {"stages.dpo.beta": [0.1, 0.5]}},
             "resources": {"cpu": 1}}
    path = write_sweep(tmp_path, sweep, recipe)
    sw = S.load_sweep(path)
    local = S.make_plan(sw, tmp_path / "local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # a Ray task with cpu: 1 runs with one thread
    try:
        S.run_sweep(local, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    S.finalize(local.out, log=lambda m: None)

    on_ray = S.make_plan(sw, tmp_path / "ray")
    logs: list[str] = []
    recs = R.run_sweep_ray(on_ray, log=logs.append)
    S.finalize(on_ray.out, log=lambda m: None)
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    assert (on_ray.out / "shared" / "sft" / "stage.json").is_file()
    assert any(line.startswith("[shared] ready on ") for line in logs), logs
    assert "[sft] sft stage" in (on_ray.out / "shared" / "log.txt").read_text()
    a = json.loads((local.out / "analysis.json").read_text())
    b = json.loads((on_ray.out / "analysis.json").read_text())
    assert a == b
    # the second trial read the first one's reference log-probs
    hits = [json.loads((on_ray.out / "trials" / t / "dpo" / "stage.json").read_text())
            ["reference_cache_hit"] for t in ("dpo-beta0.1", "dpo-beta0.5")]
    assert sorted(hits) == [False, True]
