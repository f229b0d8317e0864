"""Hyperparameter sweeps: a grid of trials over one recipe, run and recorded (the file's
schema, grid and trial recipes are :mod:`starpo.run.sweep_file`'s).

A sweep file names a base recipe and, per preference method, a grid of dotted overrides::

    name: my-sweep
    recipe: ../quickstart.yaml         # relative to the sweep file
    stages: [sft, dpo, eval]           # the recipe's stages a trial uses (default: all)
    shared: [sft]                      # run once into DIR/shared, reused by every trial
    preference_stage: dpo              # whose `loss` the method sets (default: first dpo)
    overrides: {stages.dpo.train.max_steps: 50}     # applied to every trial
    methods:
      dpo:   {stages.dpo.beta: [0.1, 0.5], stages.dpo.train.lr: [5.0e-5, 1.5e-4]}
      simpo: {stages.dpo.beta: [1.0, 2.5], stages.dpo.gamma: [0.3, 1.0]}
    analysis: {metric: mean_score, top_k_percent: 25}

Every method expands to the Cartesian product of its lists (a scalar is a fixed value);
the method name sets the preference stage's ``loss``. All of it is validated before
anything runs: each key and value with the recipe schema, then every trial's recipe.

Sweep directory::

    DIR/sweep.json           the resolved sweep: methods, trials (id, method, params), paths
    DIR/shared/              a normal run directory: the shared stages, and an evaluation of
                             the SFT model (the baseline of the analysis)
    DIR/trials/<id>/         a normal run directory per trial; its recipe.yaml points at the
                             shared checkpoints, so `starpo run DIR/trials/<id>/recipe.yaml
                             --out DIR/trials/<id>` re-runs it alone
    DIR/trials/<id>/log.txt  the trial's log
    DIR/refcache/            reference log-probs shared by every trial (trial refcache/ links)
    DIR/evalcache/           evaluation samples shared by every trial (the SFT model's, once);
                             both under ``cache_dir:`` instead when it is set
    DIR/prepared/<stage>/    tokenized data shared by every trial (trial <stage>/data links)
    DIR/trials.jsonl         one record per finished trial (see :func:`trial_record`)
    DIR/analysis.json        :mod:`starpo.metrics.analysis` of the records
    DIR/report.html          the sweep report

Resume: a trial with a record in ``trials.jsonl`` and a directory is finished and
skipped (a failed one too, unless ``retry_failed``); an interrupted trial has no record
and is run again, its finished stages skipped and its killed stage resumed by the
pipeline. Delete a trial's directory to redo it.

Executors: :func:`run_sweep` (this process, or ``--jobs`` child processes),
:mod:`starpo.run.sweep_ray` (Ray tasks) and :func:`run_one_trial` (``--trial``, the unit
of any other scheduler; :mod:`starpo.run.sweep_slurm` writes a SLURM array of them). All
run a trial with :func:`_run_trial` and record it with :func:`record_trial`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from starpo import fileio
from starpo.errors import DiskError, StarpoError
from starpo.metrics.registry import sweep_names
from starpo.recipe import Recipe, dump_recipe
from starpo.report.sweep_page import write_sweep_report
from starpo.run import pipeline
from starpo.train import preempt
# the sweep file's schema, grid and trial recipes (callers reach them as sweep.<name> too)
from starpo.run.sweep_file import (ResourcesSpec, Sweep, SweepError, Trial,  # noqa: F401
                                   _fmt_value, expand, load_sweep, shared_recipe, short_names,
                                   trial_recipe)


# =========================================================================== results


def trial_dir(out: Path, tid: str) -> Path:
    return Path(out) / "trials" / tid


class ResultStore:
    """``DIR/trials.jsonl``: appended one line per finished trial; the last line of an id
    wins (a retried trial appends again).

    Appends hold ``trials.jsonl.lock`` (:func:`starpo.fileio.exclusive`): the trials of a
    SLURM array finish on different machines, and NFS emulates ``O_APPEND`` on each client
    (size, then write at that offset), so two unlocked appends can overwrite each other."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def records(self) -> list[dict]:
        return fileio.read_jsonl(self.path)

    def latest(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for r in self.records():
            if r.get("id") is not None:
                out[str(r["id"])] = r
        return out

    def append(self, rec: dict) -> None:
        line = json.dumps(rec, default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, fileio.exclusive(self.path.with_name(self.path.name + ".lock"),
                                          stale_after=30.0):
            with self.path.open("a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())


def read_trial_eval(tdir: Path, eval_stage: str, model: str, out: Path) -> dict:
    """The metrics of ``model`` in a trial's evaluation, its SFT reference's, and the
    per-prompt file (relative to the sweep directory ``out``)."""
    d = tdir / eval_stage
    try:
        summary = json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        raise StarpoError(f"{d / 'summary.json'}: missing or unreadable; the trial's "
                          f"evaluation did not finish") from None
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        meta = {}
    if model not in summary:
        raise StarpoError(f"{d / 'summary.json'}: no evaluation of {model!r} (models: "
                          f"{list(summary)})")
    m = summary[model]
    ref = meta.get("reference")
    files = meta.get("files") or {}
    fname = files.get(model) or f"{model}.jsonl"
    names = sweep_names()            # read now: a metric added to the registry is recorded
    res = {"metrics": {k: m.get(k) for k in names},
           "ci": {k: m.get(f"{k}_ci") for k in names},
           "n_prompts": m.get("n"),
           "eval_file": os.path.relpath(d / fname, out),
           "sft": ({k: summary[ref].get(k) for k in names}
                   if ref and isinstance(summary.get(ref), dict) else None)}
    return res


def trial_record(trial: Trial, *, status: str, seconds: float, out: Path,
                 error: str | None = None, result: dict | None = None) -> dict:
    """One line of ``trials.jsonl``.

    ``id``, ``method``, ``params`` (the grid's dotted overrides), ``status`` (``ok`` or
    ``failed``), ``error`` (the failure's one-line message), ``metrics`` (the six contract
    metrics of the preference stage's model), ``ci`` (their 95% intervals), ``sft`` (the
    SFT reference's metrics in the same evaluation), ``n_prompts``, ``eval_file`` (the
    per-prompt records, relative to the sweep directory), ``dir``, ``seconds`` (wall time of
    the invocation that finished the trial), ``config_hash``, ``finished``.
    """
    rec: dict[str, Any] = {"id": trial.id, "method": trial.method, "params": trial.params,
                           "status": status}
    if error is not None:
        rec["error"] = error
    rec.update(result or {"metrics": None})
    rec.update({"dir": os.path.relpath(trial_dir(out, trial.id), out),
                "seconds": round(seconds, 1), "config_hash": trial.config_hash,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    return rec


# =========================================================================== running


def _link(target: Path, link: Path) -> bool:
    """``link`` → ``target`` (a directory symlink) unless ``link`` is a directory of its
    own; a link to somewhere else (the cache directory changed) is replaced. False when
    the filesystem refuses symlinks (the trial then keeps its own copy, correct but
    slower)."""
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    if link.is_symlink():
        if link.resolve() == target:
            return True
        # replaced in one rename, so a concurrent reader never finds no link at all
        tmp = link.with_name(f".{link.name}.link-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)
        return True
    if link.exists():
        return False
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(target, target_is_directory=True)
        return True
    except FileExistsError:
        return link.is_symlink()   # a concurrent process made it first
    except OSError:
        return False


def share_caches(run_dir: Path, out: Path, recipe: Recipe,
                 cache_dir: Path | None = None) -> None:
    """Point a run directory's caches at the sweep's shared ones.

    The reference log-prob cache lives in ``<run>/refcache/``, evaluation samples in
    ``<run>/evalcache/`` and the tokenized data in ``<run>/<stage>/data/``; all are keyed
    by content hashes (weights, tokenizer, data, lengths, sampling spec), so trials can
    share one directory safely (files are written to a temporary name and renamed). The
    shared evaluation's SFT samples are thereby reused by every trial's evaluation. The
    two caches live under ``cache_dir`` (default ``out``), which may be storage shared by
    several sweeps and machines; the tokenized data stays in ``out/prepared``."""
    cache_dir = Path(cache_dir) if cache_dir is not None else out
    _link(cache_dir / "refcache", run_dir / "refcache")
    _link(cache_dir / "evalcache", run_dir / "evalcache")
    for st in recipe.stages:
        if st.starts_from_model and not (run_dir / st.name / "stage.json").exists():
            _link(out / "prepared" / st.name, run_dir / st.name / "data")


@dataclass
class SweepPlan:
    """A sweep bound to an output directory: the recipes of the shared run and trials."""

    sweep: Sweep
    out: Path
    shared: Recipe | None
    trials: list[tuple[Trial, Recipe]]
    cache_dir: Path | None = None    # refcache/ and evalcache/ (None: out)

    @property
    def caches(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.out

    @property
    def shared_dir(self) -> Path:
        return self.out / "shared"

    def eval_stage(self, recipe: Recipe) -> str:
        return next(s.name for s in recipe.stages if s.evaluates)


def make_plan(sweep: Sweep, out: str | Path, cache_dir: str | Path | None = None) -> SweepPlan:
    """The shared run's recipe and every trial's recipe for sweep directory ``out``.
    ``cache_dir`` (the command line's, relative to the working directory) wins over the
    file's ``cache_dir:`` (relative to the sweep file); the default is ``out``."""
    out = Path(out).resolve()
    if cache_dir is not None:
        caches = Path(cache_dir).resolve()
    elif sweep.spec.cache_dir is not None:
        caches = (sweep.path.parent / sweep.spec.cache_dir).resolve()
    else:
        caches = None
    shared_dir = out / "shared"
    shared = shared_recipe(sweep.base, sweep.shared)
    if shared is not None:
        shared.name = f"{sweep.name}-shared"
    trials = []
    for t in sweep.trials:
        rec = trial_recipe(t.recipe, sweep.shared, shared_dir)
        rec.name = f"{sweep.name}-{t.id}"
        trials.append((t, rec))
    return SweepPlan(sweep, out, shared, trials, caches)


def trial_status(plan: SweepPlan, latest: dict[str, dict], trial: Trial) -> str:
    """``ok`` / ``failed`` (finished), ``partial`` (started, no record) or ``to run``."""
    tdir = trial_dir(plan.out, trial.id)
    rec = latest.get(trial.id)
    if rec is not None and (tdir / "recipe.yaml").is_file():
        return "ok" if rec.get("status") == "ok" else "failed"
    return "partial" if tdir.is_dir() else "to run"


def describe_plan(plan: SweepPlan) -> list[str]:
    """The lines ``--dry-run`` prints: the shared run and every trial with its status."""
    latest = ResultStore(plan.out / "trials.jsonl").latest()
    lines = [f"# sweep {plan.sweep.name}: {len(plan.trials)} trials → {plan.out}"]
    if plan.shared is not None:
        rows = pipeline.plan(plan.shared, plan.shared_dir, None)
        lines.append("shared  " + ", ".join(f"{n} ({s})" for n, _, s in rows))
    for k, (t, _) in enumerate(plan.trials, 1):
        params = " ".join(f"{key}={json.dumps(v)}" for key, v in t.params.items())
        lines.append(f"  {k:>3}  {t.id:<40} {trial_status(plan, latest, t):<8} {params}")
    return lines


def _headline(rec: dict) -> str:
    m = rec.get("metrics") or {}
    parts = []
    for k, label in (("mean_score", "score"), ("win_vs_sft", "win/sft"),
                     ("kl_vs_sft", "KL"), ("mean_length", "len")):
        v = m.get(k)
        if isinstance(v, (int, float)) and math.isfinite(v):
            parts.append(f"{label} {v:.3f}" if k != "mean_length" else f"{label} {v:.1f}")
    return ", ".join(parts)


def _one_line(err: BaseException) -> str:
    msg = str(err).strip().splitlines()
    text = msg[0] if msg else ""
    if not isinstance(err, StarpoError):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text


def run_trial_in_process(recipe: Recipe, tdir: Path, *, progress: bool,
                         force: bool = False) -> None:
    """Run a trial's recipe with the normal pipeline, its log lines into ``log.txt``."""
    with (tdir / "log.txt").open("a") as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} starting\n")

        def log(msg: str) -> None:
            f.write(msg + "\n")
            f.flush()
        try:
            pipeline.run(recipe, tdir, log=log, progress=progress, report=True, force=force)
        except (StarpoError, preempt.Preempted) as err:
            f.write(f"{err}\n")
            raise
        except BaseException:
            f.write(traceback.format_exc())
            raise


class TrialFailed(StarpoError):
    """A trial run in a child process exited non-zero."""


def trial_command(tdir: Path, processes: int = 1) -> list[str]:
    """``starpo run`` of a prepared trial directory; with ``processes > 1`` under
    ``accelerate launch`` (one process per GPU, the accelerate config's strategy)."""
    run = ["-m", "starpo.cli", "run", str(tdir / "recipe.yaml"), "--out", str(tdir), "-q"]
    if processes > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
                str(processes), *run]
    return [sys.executable, *run]


def run_trial_subprocess(recipe: Recipe, tdir: Path, *, env: dict[str, str],
                         processes: int = 1) -> None:
    """Run a trial with ``starpo run`` in a child process (``--jobs``, and a Ray trial
    over several GPUs); output → log.txt."""
    cmd = trial_command(tdir, processes)
    with (tdir / "log.txt").open("a") as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        with preempt.child(proc):      # a preemption signal reaches the trial too
            rc = proc.wait()
    if rc == 0:
        return
    lines = (tdir / "log.txt").read_text().splitlines()
    if rc == preempt.EXIT_STATUS:      # stopped at a safe point: not a failure
        said = [ln for ln in lines if "preempted" in ln]
        raise preempt.Preempted(said[-1] if said else f"trial {tdir.name}: preempted; "
                                "rerun the same command to resume")
    err = [ln[len("error: "):] for ln in lines if ln.startswith("error: ")]
    if rc == DiskError.exit_code and err:
        raise DiskError(err[-1])
    raise TrialFailed(err[-1] if err else f"starpo run exited with status {rc}; see "
                                          f"{tdir / 'log.txt'}")


def trial_processes(resources: ResourcesSpec) -> int:
    """Processes a trial (or the shared run) runs as: one per GPU when it asks for more
    than one (under ``accelerate launch``), else one."""
    return int(resources.gpu) if resources.gpu > 1 else 1


def trial_runner(resources: ResourcesSpec, *, progress: bool = False, force: bool = False
                 ) -> Callable[[Recipe, Path], None]:
    """How a trial runs where it was placed (a Ray task, a ``--trial`` task): in this
    process, or over several GPUs under ``accelerate launch`` in a child process (the
    scheduler has set ``CUDA_VISIBLE_DEVICES`` to the trial's GPUs)."""
    n = trial_processes(resources)
    if n > 1:
        return lambda rec, tdir: run_trial_subprocess(rec, tdir, env=dict(os.environ),
                                                      processes=n)
    return lambda rec, tdir: run_trial_in_process(rec, tdir, progress=progress, force=force)


def _worker_envs(jobs: int) -> list[dict[str, str]]:
    """One environment per parallel slot: threads split between slots (unless the user
    set OMP_NUM_THREADS), and one GPU per slot when there are GPUs."""
    base = dict(os.environ)
    if "OMP_NUM_THREADS" not in base:
        base["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    visible = base.get("CUDA_VISIBLE_DEVICES")
    gpus: list[str] = []
    if visible is not None:
        gpus = [g for g in visible.split(",") if g.strip()]
    else:
        try:
            import torch
            gpus = [str(i) for i in range(torch.cuda.device_count())]
        except Exception:  # no torch CUDA: CPU slots
            gpus = []
    envs = []
    for s in range(jobs):
        e = dict(base)
        if gpus:
            e["CUDA_VISIBLE_DEVICES"] = gpus[s % len(gpus)]
        envs.append(e)
    return envs


def _baseline_info(plan: SweepPlan) -> dict | None:
    """Where the shared evaluation of the SFT reference is (``None`` without one)."""
    if plan.shared is None:
        return None
    ev = next((s for s in plan.shared.stages if s.evaluates), None)
    if ev is None or not ev.sft:
        return None
    summary = plan.shared_dir / ev.name / "summary.json"
    return {"summary": os.path.relpath(summary, plan.out), "model": ev.sft}


def write_sweep_info(plan: SweepPlan) -> None:
    """``DIR/sweep.json``: what the analysis and the report need to read the directory."""
    sw = plan.sweep
    info = {
        "name": sw.name, "sweep_file": str(sw.path.resolve()),
        "recipe": str(sw.recipe_path), "preference_stage": sw.pref_stage,
        "shared": sw.shared, "stages": [s.name for s in sw.base.stages],
        "overrides": sw.spec.overrides, "cli_overrides": sw.cli_overrides,
        "methods": sw.spec.methods, "analysis": sw.spec.analysis.model_dump(),
        "baseline": _baseline_info(plan), "cache_dir": str(plan.caches),
        "trials": [{"id": t.id, "method": t.method, "params": t.params,
                    "dir": os.path.relpath(trial_dir(plan.out, t.id), plan.out)}
                   for t, _ in plan.trials],
    }
    fileio.write_json(plan.out / "sweep.json", info)


def run_shared(plan: SweepPlan, *, log: Callable[[str], None], progress: bool,
               processes: int = 1, force: bool = False) -> None:
    """The shared stages and the SFT baseline's evaluation, once (skipped when done);
    ``processes > 1``: under ``accelerate launch`` in a child process."""
    if plan.shared is None:
        return
    names = ", ".join(s.name for s in plan.shared.stages)
    log(f"[shared] {names} → {plan.shared_dir}")
    plan.shared_dir.mkdir(parents=True, exist_ok=True)
    share_caches(plan.shared_dir, plan.out, plan.shared, plan.caches)
    t0 = time.time()
    try:
        if processes > 1:
            # `starpo run` of the shared recipe under accelerate launch, like such a trial
            fileio.write_text(plan.shared_dir / "recipe.yaml", dump_recipe(plan.shared))
            log(f"  {processes} processes (accelerate launch); messages in "
                f"{plan.shared_dir / 'log.txt'}")
            run_trial_subprocess(plan.shared, plan.shared_dir, env=dict(os.environ),
                                 processes=processes)
        else:
            pipeline.run(plan.shared, plan.shared_dir, log=lambda m: log(f"  {m}"),
                         progress=progress, report=True, force=force)
    except DiskError:
        raise
    except StarpoError as err:
        raise StarpoError(f"shared stages ({plan.shared_dir}): {err}") from None
    log(f"[shared] ready ({time.time() - t0:.1f} s)")


def _pending(plan: SweepPlan, latest: dict[str, dict], retry_failed: bool,
             log: Callable[[str], None]) -> list[tuple[int, Trial, Recipe]]:
    """The trials to run, numbered in the plan; finished ones are logged as skipped."""
    todo = []
    total = len(plan.trials)
    for k, (t, rec) in enumerate(plan.trials, 1):
        status = trial_status(plan, latest, t)
        if status == "ok" or (status == "failed" and not retry_failed):
            note = "" if latest[t.id].get("config_hash") == t.config_hash else \
                " (its recipe changed since; delete the trial directory to redo it)"
            log(f"[{k}/{total}] {t.id}: {status}, skipped{note}")
            continue
        todo.append((k, t, rec))
    return todo


def _prepare_trial(plan: SweepPlan, t: Trial, rec: Recipe) -> Path:
    """The trial's directory with its recipe.yaml (rerunnable alone) and cache links."""
    tdir = trial_dir(plan.out, t.id)
    tdir.mkdir(parents=True, exist_ok=True)
    fileio.write_text(tdir / "recipe.yaml", dump_recipe(rec))
    share_caches(tdir, plan.out, rec, plan.caches)
    return tdir


def trial_outcome(plan: SweepPlan, rec: Recipe, tdir: Path,
                  err: BaseException | None) -> tuple[dict | None, str | None]:
    """``(evaluation result, None)`` for a trial that ran through, else ``(None, its
    one-line error)``; a run without a readable evaluation is an error too. Executors
    whose trials run elsewhere (Ray) call it where the trial ran."""
    if err is None:
        try:
            return read_trial_eval(tdir, plan.eval_stage(rec), plan.sweep.pref_stage,
                                   plan.out), None
        except StarpoError as e:
            err = e
    return None, _one_line(err)


def record_trial(plan: SweepPlan, store: ResultStore, k: int, t: Trial, seconds: float,
                 result: dict | None, error: str | None, log: Callable[[str], None]) -> dict:
    """Append a finished trial's record to ``trials.jsonl`` and print its line."""
    total = len(plan.trials)
    if error is None:
        r = trial_record(t, status="ok", seconds=seconds, out=plan.out, result=result)
        log(f"[{k}/{total}] {t.id}: ok in {seconds:.1f} s; {_headline(r)}")
    else:
        r = trial_record(t, status="failed", seconds=seconds, out=plan.out, error=error)
        log(f"[{k}/{total}] {t.id}: FAILED in {seconds:.1f} s: {error}")
    store.append(r)
    return r


def _record(plan: SweepPlan, store: ResultStore, k: int, t: Trial, rec: Recipe, tdir: Path,
            seconds: float, err: BaseException | None, log: Callable[[str], None]) -> dict:
    """Read a finished trial's evaluation, append its record and print its line."""
    return record_trial(plan, store, k, t, seconds, *trial_outcome(plan, rec, tdir, err), log)


def _run_trial(plan, k: int, t: Trial, rec: Recipe, run: Callable[[Recipe, Path], None], *,
               where: str, raise_errors: bool, log: Callable[[str], None]):
    """Prepare one trial's directory and run it: ``(k, t, rec, tdir, seconds, error)``.
    A :class:`StarpoError` is always returned as the trial's error; any other exception
    too, unless ``raise_errors``."""
    tdir = _prepare_trial(plan, t, rec)
    log(f"[{k}/{len(plan.trials)}] {t.id}: running{where} ({tdir})")
    t0, err = time.time(), None
    try:
        run(rec, tdir)
    except DiskError:
        raise     # not the trial's fault, and every trial after it would fail the same way
    except StarpoError as e:
        err = e
    except Exception as e:  # recorded; the sweep goes on
        if raise_errors:
            raise
        err = e
    return k, t, rec, tdir, time.time() - t0, err


def _run_sequential(plan, store, todo, *, runner, progress, raise_errors, log) -> None:
    """One trial after another in this process (the pipeline, or ``runner``)."""
    run = runner or (lambda rec, tdir: run_trial_in_process(rec, tdir, progress=progress))
    for k, t, rec in todo:
        _record(plan, store, *_run_trial(plan, k, t, rec, run, where="",
                                         raise_errors=raise_errors, log=log), log)


def _run_parallel(plan, store, todo, *, jobs, runner, log) -> None:
    """``jobs`` trials at a time, each in a child process with its own slot's environment
    (threads, GPU); records are written from this thread as trials finish."""
    envs = _worker_envs(jobs)
    slots = list(range(jobs))
    lock = threading.Lock()

    def work(k: int, t: Trial, rec: Recipe):
        with lock:
            slot = slots.pop()
        run = runner or (lambda rec, tdir: run_trial_subprocess(rec, tdir, env=envs[slot]))
        try:
            return _run_trial(plan, k, t, rec, run, where=" in a child process",
                              raise_errors=False, log=log)
        finally:
            with lock:
                slots.append(slot)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(work, k, t, rec) for k, t, rec in todo]
        for fut in as_completed(futures):
            _record(plan, store, *fut.result(), log)


def run_sweep(plan: SweepPlan, *, jobs: int = 1, retry_failed: bool = False,
              log: Callable[[str], None] = print, progress: bool = False,
              raise_errors: bool = False,
              runner: Callable[[Recipe, Path], None] | None = None) -> list[dict]:
    """Run the shared stages, then every unfinished trial; record each in trials.jsonl.

    A trial that fails (a :class:`StarpoError` such as a NaN loss, or any other exception
    unless ``raise_errors``) is recorded as ``failed`` with its one-line message and the
    sweep goes on. A full disk (:class:`~starpo.errors.DiskError`) and a preemption stop
    the sweep without a record: rerunning it resumes the trial. ``jobs > 1`` runs trials
    in that many child processes (``starpo run``). ``runner(recipe, trial_dir)`` replaces the in-process runner (tests). Returns the
    latest record of every trial of the plan; :func:`finalize` writes the analysis.
    """
    plan.out.mkdir(parents=True, exist_ok=True)
    write_sweep_info(plan)
    store = ResultStore(plan.out / "trials.jsonl")
    run_shared(plan, log=log, progress=progress and jobs == 1)
    todo = _pending(plan, store.latest(), retry_failed, log)
    if jobs <= 1:
        _run_sequential(plan, store, todo, runner=runner, progress=progress,
                        raise_errors=raise_errors, log=log)
    else:
        _run_parallel(plan, store, todo, jobs=jobs, runner=runner, log=log)
    latest = store.latest()
    return [latest[t.id] for t, _ in plan.trials if t.id in latest]


# =========================================================================== one trial


def shared_missing(plan: SweepPlan) -> list[str]:
    """The shared run's stages that are not complete yet (``[]``: trials can run)."""
    if plan.shared is None:
        return []
    return [name for name, _, status in pipeline.plan(plan.shared, plan.shared_dir, None)
            if not status.startswith("complete")]


def run_shared_only(plan: SweepPlan, *, log: Callable[[str], None] = print,
                    progress: bool = False, force: bool = False) -> None:
    """``--shared-only``: the shared stages and the SFT baseline's evaluation, no trial
    (the first job of a SLURM array sweep, before its ``--trial`` tasks)."""
    plan.out.mkdir(parents=True, exist_ok=True)
    write_sweep_info(plan)
    if plan.shared is None:
        log(f"[shared] {plan.sweep.path} has no shared stages; nothing to run")
        return
    run_shared(plan, log=log, progress=progress,
               processes=trial_processes(plan.sweep.spec.resources), force=force)


def run_one_trial(plan: SweepPlan, trial_id: str, *, retry_failed: bool = False,
                  log: Callable[[str], None] = print, progress: bool = False,
                  raise_errors: bool = False,
                  runner: Callable[[Recipe, Path], None] | None = None,
                  force: bool = False) -> dict | None:
    """``--trial ID``: run exactly one trial in this process and append its record; the
    unit a SLURM array task, a Kubernetes job or a W&B agent calls.

    Idempotent: a finished trial (record and directory) is skipped with a message, a
    failed one too unless ``retry_failed``; returns the new record, or ``None`` when it was
    skipped. The shared stages must be complete: they are not run here, because the
    tasks of an array start together and all but one would sit on their GPUs waiting
    for them; run ``--shared-only`` first (the emitted SLURM script does, as its first
    job). An unknown id is a :class:`SweepError`.
    """
    trial = plan.sweep.trial(trial_id)
    k, rec = next((k, rec) for k, (t, rec) in enumerate(plan.trials, 1) if t.id == trial.id)
    missing = shared_missing(plan)
    if missing:
        raise SweepError(f"{plan.shared_dir}: the shared stages {', '.join(missing)} are not "
                         f"complete, and --trial does not run them; run `starpo sweep "
                         f"{plan.sweep.path} --shared-only` (same --out and overrides) first")
    plan.out.mkdir(parents=True, exist_ok=True)
    write_sweep_info(plan)
    store = ResultStore(plan.out / "trials.jsonl")
    latest = store.latest()
    status = trial_status(plan, latest, trial)
    total = len(plan.trials)
    if status == "ok" or (status == "failed" and not retry_failed):
        last = latest[trial.id]
        why = "" if status == "ok" else f" ({last.get('error')}); --retry-failed runs it again"
        note = "" if last.get("config_hash") == trial.config_hash else \
            "; its recipe changed since (delete the trial directory to redo it)"
        log(f"[{k}/{total}] {trial.id}: already finished: {status}{why}{note}; nothing to do")
        return None
    run = runner or trial_runner(plan.sweep.spec.resources, progress=progress, force=force)
    res = _run_trial(plan, k, trial, rec, run, where="", raise_errors=raise_errors, log=log)
    return _record(plan, store, *res, log)


def finalize(out: Path, *, log: Callable[[str], None] = print) -> Path:
    """Write ``analysis.json`` and ``report.html`` of a sweep directory (one analysis for
    both); returns the report's path."""
    report = write_sweep_report(out)
    log(f"analysis → {Path(out) / 'analysis.json'}")
    log(f"report → {report}")
    return report
