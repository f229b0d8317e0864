"""The ``starpo`` command. Thin: parse arguments, call the library, print errors in one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Align language models end to end: SFT, DPO/LN-DPO/SimPO/IPO, online "
                       "DPO, evaluation and reports, from one recipe.")

_DEBUG = {"on": False}


def _fail(err: BaseException) -> None:
    if _DEBUG["on"]:
        raise err
    msg = str(err).strip() or type(err).__name__
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _guard(fn):
    from starpo.errors import StarpoError
    try:
        return fn()
    except StarpoError as err:
        _fail(err)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume from the last checkpoint",
                   err=True)
        raise typer.Exit(130)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    _DEBUG["on"] = debug or bool(os.environ.get("STARPO_DEBUG"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' own per-file bars ("Loading weights", "Writing model shards") drown ours
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@app.command(context_settings={"allow_extra_args": False})
def run(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
        overrides: Optional[list[str]] = typer.Argument(
            None, help="Overrides key.path=value (e.g. stages.dpo.beta=0.3)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o",
                                           help="Run directory (default runs/<recipe stem>)."),
        stages: Optional[str] = typer.Option(None, "--stages",
                                             help="Comma-separated stage names to run."),
        dry_run: bool = typer.Option(False, "--dry-run",
                                     help="Print the resolved recipe and plan; train nothing."),
        resume: bool = typer.Option(True, "--resume/--restart",
                                    help="Continue a killed stage from its last checkpoint "
                                         "(default), or start unfinished stages over."),
        no_report: bool = typer.Option(False, "--no-report", help="Skip report.html."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")):
    """Run the stages of RECIPE in order; finished stages are skipped."""
    from starpo.run import pipeline
    from starpo.recipe import dump_recipe, load_recipe

    def go():
        rec = load_recipe(recipe, overrides or [])
        out_dir = out or Path("runs") / recipe.stem
        only = [s.strip() for s in stages.split(",")] if stages else None
        if dry_run:
            typer.echo("# resolved recipe")
            typer.echo(dump_recipe(rec))
            typer.echo(f"# plan (run directory {out_dir})")
            for name, kind, status in pipeline.plan(rec, out_dir, only):
                typer.echo(f"  {name:<12} {kind:<8} {status}")
            return
        pipeline.run(rec, out_dir, only=only, restart=not resume, progress=not quiet,
                     report=not no_report)
        typer.echo(f"done: {out_dir}")

    _guard(go)


@app.command("eval")
def eval_cmd(run_dir: Path = typer.Argument(..., help="A run directory."),
             models: Optional[str] = typer.Option(None, "--models",
                                                  help="Comma-separated stage names or paths."),
             n: Optional[int] = typer.Option(None, "--n", help="Number of eval prompts."),
             stage: Optional[str] = typer.Option(None, "--stage",
                                                 help="Which eval stage of the recipe to use."),
             no_report: bool = typer.Option(False, "--no-report", help="Skip report.html."),
             quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")):
    """Evaluate the models of RUN_DIR: gold score, win rates, KL to SFT, length."""
    def go():
        from starpo.run.pipeline import evaluate_run
        evaluate_run(run_dir, models=[m.strip() for m in models.split(",")] if models else None,
                     n=n, stage=stage, progress=not quiet, report=not no_report)
    _guard(go)


@app.command()
def sweep(sweep_file: Path = typer.Argument(..., help="Sweep YAML file."),
          overrides: Optional[list[str]] = typer.Argument(
              None, help="Overrides key.path=value applied to every trial (and the shared "
                         "stages)."),
          out: Optional[Path] = typer.Option(None, "--out", "-o",
                                             help="Sweep directory (default runs/<sweep "
                                                  "file stem>)."),
          dry_run: bool = typer.Option(False, "--dry-run",
                                       help="List the trials and their status; run nothing."),
          jobs: int = typer.Option(1, "--jobs", "-j", min=1,
                                   help="Trials run at once, each in its own process "
                                        "(default 1: one after another in this process)."),
          retry_failed: bool = typer.Option(False, "--retry-failed",
                                            help="Run failed trials again."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")):
    """Run a hyperparameter sweep: shared stages once, then one run per grid point, then the
    robustness analysis (DIR/trials.jsonl, DIR/analysis.json, DIR/report.html)."""
    from starpo.run import sweep as S

    def go():
        sw = S.load_sweep(sweep_file, overrides or [])
        out_dir = out or Path("runs") / sweep_file.stem
        plan = S.make_plan(sw, out_dir)
        if dry_run:
            for line in S.describe_plan(plan):
                typer.echo(line)
            return
        recs = S.run_sweep(plan, jobs=jobs, retry_failed=retry_failed, progress=not quiet,
                           raise_errors=_DEBUG["on"])
        S.finalize(plan.out)
        failed = sum(r.get("status") != "ok" for r in recs)
        typer.echo(f"done: {plan.out} ({len(recs) - failed} ok, {failed} failed of "
                   f"{len(plan.trials)} trials)")

    _guard(go)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run or sweep directory.")):
    """Write RUN_DIR/report.html from the run's metrics and evaluation; for a sweep
    directory, the sweep's analysis.json and report.html."""
    def go():
        from starpo.report import write_report
        typer.echo(str(write_report(run_dir)))
    _guard(go)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
