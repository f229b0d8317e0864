"""Sweep trials on a Ray cluster: ``starpo sweep FILE --executor ray [--address …]``.

The driver (this process) does what the local executor does — it writes ``sweep.json``,
decides which trials are pending (resume, ``--retry-failed``), appends every record to
``trials.jsonl`` and leaves ``analysis.json``/``report.html`` to :func:`sweep.finalize` —
but each unit of work runs as a Ray task that asks for the sweep file's ``resources``:

* the shared stages first, as one task the trials wait for (skipped when complete);
* then every pending trial as its own task, all submitted at once, so Ray starts them as
  resources free up. A task prepares the trial directory and runs the trial with the
  same code as the local executor (:func:`sweep._run_trial`), reads its evaluation
  (:func:`sweep.trial_outcome`) and returns the result; the driver records it.

A trial that raises is a failed trial (its one-line error, like locally; not retried). A
task whose *worker process dies* (killed, out of memory, its node lost) is retried by Ray
up to ``max_retries`` times — the pipeline resumes the trial's stages from their last
checkpoints — and then recorded as failed with Ray's reason.

Every node reads and writes the sweep directory, so it must be on storage every node
mounts at the same path (the trial recipes hold absolute paths to the shared
checkpoints), and starpo must be installed on every node.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from starpo.errors import StarpoError
from starpo.recipe import Recipe
from starpo.run import sweep as S


RAY_MISSING = ("--executor ray needs Ray, which is not installed here: "
               "pip install 'starpo[ray]' (or pip install ray)")


def import_ray():
    """The ``ray`` module, or the one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise StarpoError(RAY_MISSING) from None
    return ray


def task_options(resources: S.ResourcesSpec, max_retries: int) -> dict[str, Any]:
    """Ray task options of a trial: its resources, and retries on worker death only (an
    exception inside a trial is the trial's result, not a reason to run it again)."""
    opts: dict[str, Any] = {"num_cpus": resources.cpu, "num_gpus": resources.gpu,
                            "max_retries": max_retries, "retry_exceptions": False}
    if resources.memory_gb is not None:
        opts["memory"] = int(resources.memory_gb * 1024 ** 3)
    return opts


def _describe(resources: S.ResourcesSpec) -> str:
    parts = [f"{resources.cpu:g} CPU", f"{resources.gpu:g} GPU"]
    if resources.memory_gb is not None:
        parts.append(f"{resources.memory_gb:g} GB")
    return ", ".join(parts)


def _fits_somewhere(ray, resources: S.ResourcesSpec) -> str | None:
    """``None`` when some live node of the cluster has room for one trial, else what the
    largest node has (then the tasks wait for a node that fits, e.g. from an autoscaler)."""
    best = None
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources") or {}
        cpu, gpu, mem = have.get("CPU", 0), have.get("GPU", 0), have.get("memory", 0)
        if cpu >= resources.cpu and gpu >= resources.gpu and (
                resources.memory_gb is None or mem >= resources.memory_gb * 1024 ** 3):
            return None
        if best is None or (gpu, cpu) > (best[1], best[0]):
            best = (cpu, gpu)
    return "no live node" if best is None else f"{best[0]:g} CPU, {best[1]:g} GPU"


# --------------------------------------------------------------------------- on the workers


class _Starts:
    """A Ray actor the tasks report their start to, so the driver can tell running trials
    from queued ones and count a trial's attempts (a retry after a worker death starts
    it again)."""

    def __init__(self):
        self.starts: dict[str, list[tuple[str, float]]] = {}

    def started(self, tid: str, host: str) -> int:
        self.starts.setdefault(tid, []).append((host, time.time()))
        return len(self.starts[tid])

    def snapshot(self) -> dict[str, list[tuple[str, float]]]:
        return self.starts


def _quiet_worker() -> None:
    """The CLI's settings for library output, which a Ray worker process does not inherit
    (Ray forwards a worker's stderr to the driver)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _pin_threads(resources: S.ResourcesSpec) -> None:
    """torch's intra-op threads = the CPUs Ray gave the task (at least one). Ray sets
    ``OMP_NUM_THREADS`` so when it starts a worker, but a reused worker keeps whatever an
    earlier task (or a module it imported) set, and the thread count changes a trial's
    numbers in the last bits: pinned, a trial gives what the local executor gives."""
    import torch
    torch.set_num_threads(max(1, int(resources.cpu)))


def _shared_task(plan: S.SweepPlan) -> dict:
    """The shared stages (and the SFT baseline's evaluation), their messages → log.txt."""
    _quiet_worker()
    _pin_threads(plan.sweep.spec.resources)
    lines: list[str] = []
    plan.shared_dir.mkdir(parents=True, exist_ok=True)
    with (plan.shared_dir / "log.txt").open("a") as f:
        def log(msg: str) -> None:
            lines.append(msg)
            f.write(msg + "\n")
            f.flush()
        try:
            S.run_shared(plan, log=log, progress=False,
                         processes=S.trial_processes(plan.sweep.spec.resources))
        except StarpoError as err:
            return {"error": str(err), "lines": lines, "host": socket.gethostname()}
    return {"error": None, "lines": lines, "host": socket.gethostname()}


def _trial_task(plan: S.SweepPlan, k: int, trial: S.Trial, recipe: Recipe, runner, starts
                ) -> dict:
    """One trial, where Ray placed it: ``{seconds, result, error}`` for the driver."""
    import ray
    ray.get(starts.started.remote(trial.id, socket.gethostname()))  # before any work
    _quiet_worker()
    _pin_threads(plan.sweep.spec.resources)
    run = runner or S.trial_runner(plan.sweep.spec.resources)
    *_, tdir, seconds, err = S._run_trial(plan, k, trial, recipe, run, where="",
                                          raise_errors=False, log=lambda m: None)
    result, error = S.trial_outcome(plan, recipe, tdir, err)
    return {"seconds": seconds, "result": result, "error": error}


# --------------------------------------------------------------------------- the driver


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Trials done / running / failed, and an ETA from this invocation's throughput
    (finished trials per second since the first trial started, so it counts the trials
    running side by side)."""

    def __init__(self, total: int, done_before: int, failed_before: int, todo: int):
        self.total, self.todo = total, todo
        self.done, self.failed = done_before, failed_before
        self.done_here = 0
        self.first_start: float | None = None
        self.running: set[str] = set()

    def started(self, tid: str, at: float) -> None:
        self.running.add(tid)
        self.first_start = at if self.first_start is None else min(self.first_start, at)

    def finished(self, tid: str, ok: bool) -> None:
        self.running.discard(tid)
        self.done += 1
        self.done_here += 1
        self.failed += not ok

    def eta(self, now: float) -> float | None:
        left = self.todo - self.done_here
        if left <= 0:
            return 0.0
        if not self.done_here or self.first_start is None:
            return None
        return left * (now - self.first_start) / self.done_here

    def line(self, now: float) -> str:
        waiting = self.todo - self.done_here - len(self.running)
        eta = self.eta(now)
        tail = "" if eta is None else f"; ETA {_duration(eta)}"
        return (f"[ray] {self.done}/{self.total} done ({self.failed} failed), "
                f"{len(self.running)} running, {max(0, waiting)} waiting{tail}")


def check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """A ``HOST:PORT`` (or ``ray://HOST:PORT``) address must accept a connection: Ray
    itself keeps retrying an address where nothing listens for minutes, printing warnings,
    instead of saying so."""
    if not address or address == "auto" or ":" not in address:
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        raise StarpoError(f"--address {address}: not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise StarpoError(f"--address {address}: nothing answers at {host}:{port} "
                          f"({err.strerror or err}); is the Ray head running there "
                          f"(ray start --head)?") from None


def _connect(ray, address: str | None) -> bool:
    """Connect to (or, without an address, start) a cluster; True when we started it
    here, so we shut it down at the end. An already initialised Ray (tests) is used."""
    if ray.is_initialized():
        return False
    check_reachable(address)
    try:
        ray.init(address=address)
    except ConnectionError as err:
        raise StarpoError(f"--address {address}: cannot connect to a Ray cluster: "
                          f"{str(err).splitlines()[0] if str(err) else err}") from None
    return True


def _run_shared_on_ray(ray, plan: S.SweepPlan, opts: dict, *, log, poll: float) -> None:
    if plan.shared is None:
        return
    missing = S.shared_missing(plan)
    if not missing:
        log(f"[shared] {', '.join(s.name for s in plan.shared.stages)}: complete, skipped")
        return
    log(f"[shared] {', '.join(missing)} → {plan.shared_dir} (a Ray task; the trials start "
        f"when it is done)")
    t0 = time.time()
    ref = ray.remote(_shared_task).options(**opts).remote(plan)
    try:
        while True:
            ready, _ = ray.wait([ref], timeout=max(poll, 30.0))
            if ready:
                break
            log(f"[shared] running for {_duration(time.time() - t0)}")
        out = ray.get(ref)
    except ray.exceptions.RayError as err:
        raise StarpoError(f"shared stages ({plan.shared_dir}): the Ray task failed: "
                          f"{S._one_line(err)}") from None
    for line in out["lines"]:
        log(f"  {line}")
    if out["error"]:
        raise StarpoError(f"shared stages ({plan.shared_dir}): {out['error']}")
    log(f"[shared] ready on {out['host']} ({time.time() - t0:.1f} s)")


def run_sweep_ray(plan: S.SweepPlan, *, address: str | None = None,
                  retry_failed: bool = False, log: Callable[[str], None] = print,
                  runner: Callable[[Recipe, Path], None] | None = None,
                  poll: float = 1.0, status_every: float = 60.0) -> list[dict]:
    """:func:`sweep.run_sweep` with every trial a Ray task; returns the latest record of
    every trial of the plan. ``address`` is Ray's (``auto``, ``HOST:PORT``, ``ray://…``;
    ``None``: ``RAY_ADDRESS`` or a local cluster of this machine). ``runner(recipe,
    trial_dir)`` replaces the trial runner inside the task (tests)."""
    ray = import_ray()
    spec = plan.sweep.spec
    started_here = _connect(ray, address)      # before writing anything: it may fail
    try:
        log(f"[ray] cluster: {cluster_line(ray)}")
        plan.out.mkdir(parents=True, exist_ok=True)
        S.write_sweep_info(plan)
        store = S.ResultStore(plan.out / "trials.jsonl")
        opts = task_options(spec.resources, spec.max_retries)
        short = _fits_somewhere(ray, spec.resources)
        if short is not None:
            log(f"[ray] no node has room for a trial ({_describe(spec.resources)}; the "
                f"largest has {short}): the tasks wait until such a node joins the cluster")
        _run_shared_on_ray(ray, plan, opts, log=log, poll=poll)
        latest = store.latest()
        todo = S._pending(plan, latest, retry_failed, log)
        _run_trials(ray, plan, store, todo, latest, opts, runner=runner, log=log,
                    poll=poll, status_every=status_every)
    finally:
        if started_here:
            ray.shutdown()
    latest = store.latest()
    return [latest[t.id] for t, _ in plan.trials if t.id in latest]


def _run_trials(ray, plan, store, todo, latest, opts, *, runner, log, poll,
                status_every) -> None:
    if not todo:
        return
    total = len(plan.trials)
    pending_ids = {t.id for _, t, _ in todo}
    finished = [latest[t.id] for t, _ in plan.trials if t.id in latest
                and t.id not in pending_ids]
    prog = Progress(total, len(finished), sum(r.get("status") != "ok" for r in finished),
                    len(todo))
    starts = ray.remote(num_cpus=0)(_Starts).remote()
    task = ray.remote(_trial_task).options(**opts)
    plan_ref = ray.put(plan)            # one copy in the object store for every task
    pending = {task.remote(plan_ref, k, t, rec, runner, starts): (k, t)
               for k, t, rec in todo}
    log(f"[ray] {len(todo)} trials submitted ({_describe(plan.sweep.spec.resources)} each, "
        f"up to {opts['max_retries']} retries when a worker dies)")
    number = {t.id: k for k, t, _ in todo}
    attempts: dict[str, int] = {}
    first_seen: dict[str, float] = {}   # on the driver's clock (nodes' clocks may differ)
    last_status = time.time()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll)
        for tid, tries in ray.get(starts.snapshot.remote()).items():
            if len(tries) > attempts.get(tid, 0):
                attempts[tid] = len(tries)
                host = tries[-1][0]
                again = f" (attempt {len(tries)}, after its worker died)" if len(tries) > 1 \
                    else ""
                log(f"[{number[tid]}/{total}] {tid}: running on {host}{again}")
                first_seen.setdefault(tid, time.time())
                prog.started(tid, first_seen[tid])
        for ref in ready:
            k, t = pending.pop(ref)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayError as err:
                out = {"seconds": time.time() - first_seen.get(t.id, time.time()),
                       "result": None, "error": _task_error(ray, err, attempts.get(t.id, 0),
                                                            opts["max_retries"])}
            rec = S.record_trial(plan, store, k, t, out["seconds"], out["result"],
                                 out["error"], log)
            prog.finished(t.id, rec["status"] == "ok")
        now = time.time()
        if ready or now - last_status >= status_every:
            log(prog.line(now))
            last_status = now
    ray.kill(starts)


def _task_error(ray, err: Exception, attempts: int, max_retries: int) -> str:
    """A trial task's failure as its record's one line: an exception that escaped the
    trial (not an ``Exception``: SystemExit and the like), or the worker's death."""
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = getattr(err, "cause", None)
        return S._one_line(cause if isinstance(cause, BaseException) else err)
    return (f"the Ray worker died ({attempts} attempt{'s' * (attempts != 1)}, max_retries "
            f"{max_retries}): {S._one_line(err)}")


def cluster_line(ray) -> str:
    """What the connected cluster has, for the driver's first line."""
    res = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    return (f"{nodes} node{'s' * (nodes != 1)}, {res.get('CPU', 0):g} CPU, "
            f"{res.get('GPU', 0):g} GPU")

