"""``starpo sweep FILE --emit slurm``: sbatch scripts that run a sweep as a SLURM job array.

Written into ``DIR/slurm/`` (nothing is submitted)::

    shared.sbatch    one job: ``starpo sweep FILE --shared-only`` (the shared stages and
                     the SFT baseline's evaluation)
    trials.sbatch    the array, one task per trial: ``starpo sweep FILE --trial <id>``;
                     task i runs the i-th trial of ``--dry-run``'s list
    report.sbatch    one job: ``starpo report DIR`` (analysis.json and report.html)
    submit.sh        submits the three, each waiting for the one before: the array
                     starts when the shared job succeeded, the report when every task
                     ended (whether its trial succeeded or not)
    logs/            each job's output (``%x-%A_%a.out``)

Every command carries the same sweep file, overrides, ``--out`` and ``--cache-dir`` as
the command that emitted them, with absolute paths, so the jobs find the same directory
on every node (it must be on storage they all mount). ``--trial`` is idempotent, so
resubmitting the array after a failure only runs what has no record.

Preemption: the shared job and the trial tasks are ``--requeue``-able and ask for
``--signal=B:USR1@<slurm.signal_grace>``. The batch script runs starpo in the background
and passes a SIGUSR1 (the time limit is near) or SIGTERM (preemption) on to it; starpo
finishes its optimizer step, writes a checkpoint and exits with status 75
(:data:`starpo.train.preempt.EXIT_STATUS`), and the script then requeues its job with
``scontrol requeue``, so the task resumes by itself where it stopped.
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Callable

from starpo import fileio
from starpo.run import sweep as S
from starpo.train.preempt import EXIT_STATUS

# the batch shell runs starpo in the background so that it can pass a signal on (bash
# runs a trap only between foreground commands) and requeue the job when starpo stopped
# for preemption
REQUEUE_FUNCTION = f"""\
# SIGUSR1 (the time limit is near, --signal) or SIGTERM (preemption): starpo saves a
# checkpoint at its next safe point and exits {EXIT_STATUS}; the job is then requeued and
# resumes where it stopped
run_requeueable() {{
  local child="" rc=0
  trap '[ -z "$child" ] || kill -USR1 "$child" 2>/dev/null || true' USR1
  trap '[ -z "$child" ] || kill -TERM "$child" 2>/dev/null || true' TERM
  "$@" &
  child=$!
  while true; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null && continue   # a trapped signal cut the wait short
    # starpo has ended; if it ended right after a trapped signal, rc (> 128) is the
    # cut-short wait's, and one more wait reads starpo's own status (127: already read)
    if [ "$rc" -gt 128 ]; then
      local again=0
      wait "$child" || again=$?
      [ "$again" -eq 127 ] || rc=$again
    fi
    break
  done
  trap - USR1 TERM
  if [ "$rc" -eq {EXIT_STATUS} ] && [ -n "${{SLURM_JOB_ID:-}}" ]; then
    echo "starpo stopped for preemption; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || true
  fi
  return "$rc"
}}"""


def _q(x: object) -> str:
    return shlex.quote(str(x))


def starpo_command(plan: S.SweepPlan) -> str:
    """How the jobs call starpo: the file's ``slurm.command``, else this Python."""
    return plan.sweep.spec.slurm.command or f"{_q(sys.executable)} -m starpo.cli"


def sweep_args(plan: S.SweepPlan) -> str:
    """``sweep FILE [overrides] --out DIR [--cache-dir C]``, quoted for bash."""
    sw = plan.sweep
    parts = ["sweep", _q(sw.path.resolve()), *(_q(o) for o in sw.cli_overrides),
             "--out", _q(plan.out)]
    if plan.cache_dir is not None:
        parts += ["--cache-dir", _q(plan.cache_dir)]
    return " ".join(parts)


def _header(plan: S.SweepPlan, job: str, logs: Path, *, time_limit: str | None,
            array: str | None = None) -> list[str]:
    """The ``#SBATCH`` lines and set-up of a job that runs starpo (requeued when
    preempted), ending with :data:`REQUEUE_FUNCTION`."""
    spec = plan.sweep.spec
    res, sl = spec.resources, spec.slurm
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={job}"]
    if array is not None:
        lines.append(f"#SBATCH --array={array}")
    lines.append(f"#SBATCH --cpus-per-task={max(1, math.ceil(res.cpu))}")
    if res.gpu > 0:
        # SLURM hands out whole GPUs: a fractional Ray request is one GPU here
        lines.append(f"#SBATCH --gres=gpu:{max(1, math.ceil(res.gpu))}")
    if res.memory_gb is not None:
        lines.append(f"#SBATCH --mem={math.ceil(res.memory_gb)}G")
    for opt, value in (("partition", sl.partition), ("account", sl.account),
                       ("time", time_limit)):
        if value:
            lines.append(f"#SBATCH --{opt}={value}")
    lines.append(f"#SBATCH --output={logs}/%x-%A_%a.out" if array is not None
                 else f"#SBATCH --output={logs}/%x-%j.out")
    lines.append("#SBATCH --requeue")
    if sl.signal_grace:
        lines.append(f"#SBATCH --signal=B:USR1@{sl.signal_grace}")
    lines += [f"#SBATCH {opt}" for opt in sl.sbatch]
    lines += ["set -euo pipefail",
              "# torch's threads: the cores SLURM gave this task",
              "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
              *sl.setup, REQUEUE_FUNCTION]
    return lines


def emit_slurm(plan: S.SweepPlan, *, log: Callable[[str], None] = print) -> Path:
    """Write ``DIR/slurm/`` (see the module's docstring); returns ``submit.sh``'s path."""
    sw = plan.sweep
    sl = sw.spec.slurm
    d = plan.out / "slurm"
    logs = d / "logs"
    logs.mkdir(parents=True, exist_ok=True)   # SLURM does not create the output's folder
    cmd = starpo_command(plan)
    args = sweep_args(plan)
    name = f"starpo-{S._fmt_value(sw.name)}"
    ids = [t.id for t, _ in plan.trials]
    n = len(ids)
    array = f"0-{n - 1}" + (f"%{sl.max_parallel}" if sl.max_parallel else "")

    shared = _header(plan, f"{name}-shared", logs, time_limit=sl.shared_time or sl.time) + [
        "# the shared stages and the SFT baseline's evaluation, once; skipped when done",
        f"run_requeueable {cmd} {args} --shared-only -q"]
    trials = _header(plan, f"{name}-trials", logs, time_limit=sl.time, array=array) + [
        f"# one trial per array task, in the order of `starpo sweep ... --dry-run` ({n})",
        "TRIALS=(",
        *(f"  {_q(i)}" for i in ids),
        ")",
        f"run_requeueable {cmd} {args} --trial \"${{TRIALS[$SLURM_ARRAY_TASK_ID]}}\" -q"]
    report = ["#!/usr/bin/env bash", f"#SBATCH --job-name={name}-report",
              "#SBATCH --cpus-per-task=1",
              *(f"#SBATCH --{o}={v}" for o, v in (("partition", sl.partition),
                                                  ("account", sl.account)) if v),
              f"#SBATCH --output={logs}/%x-%j.out",
              *(f"#SBATCH {opt}" for opt in sl.sbatch),
              "set -euo pipefail", *sl.setup,
              "# analysis.json and report.html over every trial's record",
              f"{cmd} report {_q(plan.out)}"]
    has_shared = plan.shared is not None
    submit = ["#!/usr/bin/env bash",
              f"# Submits the sweep {sw.name} ({n} trials) from {sw.path.resolve()}:",
              "# the shared stages, then the trial array once they succeeded, then the",
              "# analysis once every trial task ended.",
              "set -euo pipefail",
              'cd "$(dirname "$0")"',
              # --parsable prints "jobid" or "jobid;cluster"
              'jobid() { local out; out=$(sbatch --parsable "$@"); echo "${out%%;*}"; }']
    if has_shared:
        submit += ["shared=$(jobid shared.sbatch)",
                   "trials=$(jobid --dependency=afterok:$shared trials.sbatch)"]
    else:
        submit += ["trials=$(jobid trials.sbatch)"]
    submit += ["report=$(jobid --dependency=afterany:$trials report.sbatch)",
               'echo "submitted:' + (' shared job $shared,' if has_shared else '') +
               f' trial array $trials ({n} tasks), report job $report"']
    files = {"trials.sbatch": trials, "report.sbatch": report, "submit.sh": submit}
    if has_shared:
        files["shared.sbatch"] = shared
    for fname, lines in files.items():
        path = fileio.write_text(d / fname, "\n".join(lines) + "\n")
        path.chmod(0o755)
    if not has_shared:
        (d / "shared.sbatch").unlink(missing_ok=True)   # from an earlier emit
    log(f"SLURM scripts for {n} trials → {d}")
    log(f"submit with: bash {_q(d / 'submit.sh')}")
    return d / "submit.sh"
