"""Runs the stages of a recipe in order inside one run directory.

Run directory (the contract: README "Run directory")::

    DIR/recipe.yaml              the resolved recipe of the last invocation
    DIR/base/model/              the starting checkpoint when model.name_or_path is "tiny"
    DIR/<stage>/model/           Hugging Face checkpoint written by the stage
    DIR/<stage>/metrics.jsonl    one JSON object per logged step
    DIR/<stage>/stage.json       written last: the stage is complete (skipped on rerun)
    DIR/<stage>/checkpoints/     resumable state while the stage runs

A stage is complete when ``stage.json`` exists; the command can be rerun after a kill and
continues where it stopped (finished stages are skipped, a killed stage resumes from its
last checkpoint unless ``restart``). A stage's model is verified
(:func:`starpo.train.checkpoint.verify_model_dir`) before ``stage.json`` is written.

One command writes a run directory at a time: ``DIR/.starpo.lock``
(:func:`starpo.fileio.dir_lock`). A training stage runs as a deferred preemption section
(:mod:`starpo.train.preempt`): a SIGTERM waits for its next safe point.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from starpo.recipe import Recipe, dump_recipe
from starpo.errors import StarpoError, TrainingError, bad_rows_to
from starpo import fileio, stages
from starpo.recipe import graph, load_recipe
from starpo.stages import eval as eval_stage
from starpo.report import write_report
from starpo.runtime import Runtime
from starpo.generate import vllm as vllm_backend
from starpo.train import preempt
from starpo.train.checkpoint import verify_model_dir
from starpo.train.trackers import Tracking
from starpo.model import loading
from starpo.world import World
from starpo.run.plan import plan   # its own light module: `starpo run --dry-run`


def _default_log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class RunContext:
    recipe: Recipe
    out: Path
    restart: bool = False
    log: Callable[[str], None] = _default_log
    progress: bool = True
    # reference log-prob cache; default DIR/refcache. Entries are keyed by (reference
    # weights, tokenizer, tokenized pairs) and written atomically, so several runs (the
    # trials of a sweep) can share one directory safely.
    refcache_dir: Path | None = None
    # evaluation samples of checkpoints, keyed by everything they depend on
    # (starpo.metrics.samples.sample_cache_key); default DIR/evalcache, shareable like refcache
    sample_cache_dir: Path | None = None
    # where this process computes and whether it writes files: one per run
    runtime: Runtime = field(default_factory=Runtime.create)
    _world: object = field(default=None, repr=False)

    # ------------------------------------------------------------------ paths
    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def model_dir(self, name: str) -> Path:
        """Where stage ``name`` saves its model (what links to the stage resolve to)."""
        return graph.model_dir(self.out, name)

    @property
    def refcache(self) -> Path:
        return Path(self.refcache_dir) if self.refcache_dir is not None else self.out / "refcache"

    @property
    def sample_cache(self) -> Path:
        return Path(self.sample_cache_dir) if self.sample_cache_dir is not None else \
            self.out / "evalcache"

    def mark_complete(self, name: str, summary: dict) -> None:
        if not self.runtime.is_main:   # one writer: the main process
            return
        d = self.stage_dir(name)
        model = self.model_dir(name)
        why = verify_model_dir(model) if model.is_dir() else None
        if why is not None:
            raise TrainingError(f"{model}: the stage's saved model is damaged ({why}); the "
                                f"stage is not marked complete. Rerun the same command: it "
                                f"resumes from the stage's last checkpoint")
        fileio.write_text(d / "stage.json", json.dumps(
            {"complete": True, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
             "config_hash": self.stage_hash(name), **summary}, indent=2))

    def stage_hash(self, name: str) -> str:
        st = self.recipe.stage(name)
        blob = json.dumps(st.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def world(self):
        if self._world is None:
            self._world = World(self.recipe.world.seed)
        return self._world

    def seed_for(self, stage) -> int:
        return stage.seed if getattr(stage, "seed", None) is not None else self.recipe.seed

    # ------------------------------------------------------------------ models
    def base_model_path(self) -> str:
        """The recipe's starting model as a path or hub id ("tiny" is built once here)."""
        spec = self.recipe.model
        path = graph.base_model(self.recipe, self.out)
        if spec.name_or_path != "tiny":
            return path
        # built once, by the main process; the others wait and then read it
        with self.runtime.main_first():
            if not (Path(path) / "config.json").is_file():
                if not self.runtime.is_main:
                    raise StarpoError(f"{path}: the main process did not write the base model")
                self.log(f"building the tiny default model and training its tokenizer → {path}")
                model, tok = loading.build_or_load(
                    spec, lambda: self.world.corpus(), seed=self.recipe.seed, cache_dir=None)
                loading.save_pretrained(model, tok, path)
        return path

    def resolve_model(self, ref: str | None, *, before: str | None = None) -> str:
        """A stage name, "base", or a path → a checkpoint path (or hub id), for stage
        ``before``; ``None`` is its implicit starting model (:func:`starpo.recipe.graph.checkpoint`)."""
        return graph.checkpoint(self.recipe, ref, self.out, needed_by=before,
                                base=self.base_model_path)

    def resolver(self, stage) -> Callable[[str], str]:
        """:meth:`resolve_model` for ``stage``'s links, e.g. a judge's ``path`` (what
        :func:`starpo.judges.make_judge` takes): a stage must have been trained, ``base``
        is the starting model, a path or hub id stays as it is."""
        return lambda ref: self.resolve_model(ref, before=stage.name)


def run(recipe: Recipe, out: Path, *, only: list[str] | None = None, restart: bool = False,
        log: Callable[[str], None] = _default_log, progress: bool = True,
        report: bool = True, refcache_dir: Path | None = None,
        runtime: Runtime | None = None, force: bool = False) -> RunContext:
    """Run the stages of ``recipe`` into ``out`` (see the module docstring). The main
    process holds ``out``'s lock throughout; ``force`` takes it from a holder that is gone
    (:func:`starpo.fileio.dir_lock`)."""
    runtime = runtime or Runtime.create()
    lock = fileio.dir_lock(out, command="starpo run", force=force, log=log) \
        if runtime.is_main else contextlib.nullcontext()
    with lock:
        return _run(recipe, out, only=only, restart=restart, log=log, progress=progress,
                    report=report, refcache_dir=refcache_dir, runtime=runtime)


def _run(recipe: Recipe, out: Path, *, only: list[str] | None, restart: bool,
         log: Callable[[str], None], progress: bool, report: bool,
         refcache_dir: Path | None, runtime: Runtime) -> RunContext:
    main = runtime.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        fileio.write_text(out / "recipe.yaml", dump_recipe(recipe))
    else:
        # the other processes of `accelerate launch` compute the same things in step with
        # the main one: their log lines and progress bars would only repeat its own
        log, progress = (lambda msg: None), False
    ctx = RunContext(recipe, out, restart=restart, log=log, progress=progress,
                     refcache_dir=refcache_dir, runtime=runtime)
    tracking = Tracking(recipe, out)   # checks the trackers are installed; starts nothing yet
    wants_vllm = [n for n in vllm_backend.recipe_needs_vllm(recipe) if not only or n in only]
    if wants_vllm:   # before any stage runs, like the trackers
        vllm_backend.check_available(f"stages.{wants_vllm[0]}.generation.backend")
    steps = plan(recipe, out, only)
    runtime.wait()   # every process has read the plan before the main one changes the files
    for k, (name, kind, status) in enumerate(steps):
        if status.startswith("complete"):
            st_hash = json.loads((out / name / "stage.json").read_text()).get("config_hash")
            if st_hash and st_hash != ctx.stage_hash(name):
                log(f"[{name}] complete, but its recipe section changed since it ran; delete "
                    f"{out / name} to redo it")
            else:
                log(f"[{name}] complete, skipped")
            continue
        if main:
            if restart and (out / name).exists():
                shutil.rmtree(out / name)
            (out / name).mkdir(parents=True, exist_ok=True)
        runtime.wait()
        log(f"[{name}] {kind} stage → {out / name}")
        t0 = time.time()
        # a training stage holds its state in memory until its model is written: a
        # preemption signal waits for its next safe point (a checkpoint, the stage's end)
        trains = not recipe.stage(name).evaluates
        with tracking.stage(name), bad_rows_to(out / name / "bad_rows.jsonl", stage=name), \
                preempt.section(f"stage {name}", defer=trains):
            summary = stages.runner(kind)(ctx, recipe.stage(name)) or {}
            summary["seconds"] = round(time.time() - t0, 1)
            ctx.mark_complete(name, summary)
            runtime.wait()
        log(f"[{name}] done in {summary['seconds']} s")
        if k + 1 < len(steps):
            preempt.check(f"stage {name} (complete)", when="after")
    tracking.finish()
    if main and report and any((out / s.name / "stage.json").is_file() for s in recipe.stages):
        log(f"report → {write_report(out)}")
    return ctx


def evaluate_run(run_dir: str | Path, models: list[str] | None = None, n: int | None = None, *,
                 stage: str | None = None, progress: bool = True,
                 log: Callable[[str], None] = print, report: bool = True,
                 out: str | Path | None = None, force: bool = False):
    """Evaluate the models of the run in ``run_dir`` (``starpo eval RUN_DIR``).

    Uses the run's resolved recipe (``RUN_DIR/recipe.yaml``): its eval stage (``stage``
    names one when there are several) for data, judge, sampling and bootstrap, or
    :func:`starpo.stages.eval.default_eval_stage` when it has none. ``models`` (stage names, ``base`` or
    checkpoint paths) defaults to every trained stage; ``n`` caps the prompts. Writes
    ``RUN_DIR/<eval stage>/`` (``eval`` by default) and, with ``report``, the report.

    Nothing evaluated before is dropped: models already in the eval directory's
    ``summary.json`` and not asked for are evaluated again with the new ones (their
    samples come from the evaluation cache), so the summary and the paired gaps cover all
    of them. When that earlier evaluation used other settings (prompts, sampling, judge,
    seed) or one of its models is gone, this one goes to ``RUN_DIR/<eval stage>-<models>/``
    instead and the earlier one is left as it was; the log says which.

    ``run_dir`` may also be a model directory (``config.json``, no ``recipe.yaml``): see
    :func:`evaluate_checkpoint` (``out`` is then its run directory).
    """
    run_dir = Path(run_dir)
    rpath = run_dir / "recipe.yaml"
    if not rpath.is_file():
        if (run_dir / "config.json").is_file():
            return evaluate_checkpoint(run_dir, models=models, n=n, progress=progress,
                                       log=log, report=report, out=out, force=force)
        raise StarpoError(f"{run_dir}: neither a run directory (no recipe.yaml) nor a model "
                          f"directory (no config.json)")
    with fileio.dir_lock(run_dir, command="starpo eval", force=force, log=log):
        return _evaluate_run(run_dir, rpath, models, n, stage=stage, progress=progress,
                             log=log, report=report)


class _OtherSettings(Exception):
    """The earlier evaluation in the eval directory cannot be merged with this one."""


def _previous_eval(d: Path) -> tuple[dict, dict] | None:
    """``(summary, meta)`` of the evaluation in ``d``, if there is a readable one."""
    summary, meta = fileio.read_json(d / "summary.json"), fileio.read_json(d / "meta.json")
    if isinstance(summary, dict) and summary and isinstance(meta, dict):
        return summary, meta
    return None


def _evaluate_run(run_dir: Path, rpath: Path, models, n, *, stage, progress, log, report):
    recipe = load_recipe(rpath)
    evals = [s for s in recipe.stages if s.evaluates]
    if stage is not None:
        chosen = [s for s in evals if s.name == stage]
        if not chosen:
            raise StarpoError(f"{rpath}: no eval stage named {stage!r}; eval stages: "
                              f"{[s.name for s in evals]}")
        st = chosen[0]
    elif evals:
        st = evals[0]
    else:
        st = eval_stage.default_eval_stage(n)
    ctx = RunContext(recipe, run_dir, log=log, progress=progress)
    out_dir = run_dir / st.name
    wanted = list(models or eval_stage.default_models(recipe, run_dir, st, log=log))
    res = None
    prev = _previous_eval(out_dir)
    if prev is not None:
        kept, refs, why = _earlier_models(prev, wanted, recipe, run_dir)
        if kept and why is None:
            def check(now: dict) -> None:
                _same_settings(prev[1], now)
                log(f"[{st.name}] merging {wanted} into {out_dir / 'summary.json'}, which "
                    f"keeps {kept} (evaluated again from the evaluation cache)")
            try:
                res = eval_stage.run_evaluation(ctx, st, models=refs, n=n,
                                                out_dir=out_dir, check=check)
            except _OtherSettings as err:
                why = f"other settings: {err}"
        if kept and res is None:
            out_dir = _separate_dir(run_dir, st.name, wanted)
            log(f"[{st.name}] {run_dir / st.name} holds an evaluation of {kept} that cannot "
                f"be merged with this one ({why}); writing this one to {out_dir} instead, "
                f"and {run_dir / st.name} is unchanged")
    if res is None:
        log(f"[{st.name}] eval → {out_dir}")
        res = eval_stage.run_evaluation(ctx, st, models=wanted, n=n, out_dir=out_dir)
    if report:
        log(f"report → {write_report(run_dir)}")
    return res


def _earlier_models(prev: tuple[dict, dict], wanted: list[str], recipe: Recipe,
                    run_dir: Path) -> tuple[list[str], list[str], str | None]:
    """For merging ``wanted`` into an earlier evaluation: the earlier models it leaves out
    (summary keys), the models to evaluate (the earlier ones in their order, each by its
    stage name or checkpoint path, then the new ones), and why that is not possible
    (``None``: it is)."""
    summary, meta = prev
    names = set(graph.names(recipe)) | {graph.BASE}
    asked = {eval_stage.model_key(ref, names): ref for ref in wanted}
    kept = [k for k in summary if k not in asked]
    order = []
    for k in summary:
        if k in asked:
            order.append(asked[k])
        elif k in names:
            if k != graph.BASE and not (graph.model_dir(run_dir, k) / "config.json").is_file():
                return kept, [], f"the model of stage {k} is gone"
            order.append(k)
        else:
            path = (meta.get("models") or {}).get(k)
            if not path or not Path(path).exists():
                return kept, [], f"{k}'s checkpoint {path} is gone"
            order.append(path)
    order += [ref for k, ref in asked.items() if k not in summary]
    return kept, order, None


def _separate_dir(run_dir: Path, stage: str, models: list[str]) -> Path:
    tag = "+".join(fileio.safe_name(eval_stage.display_name(m)) for m in models)
    return run_dir / f"{stage}-{tag[:80]}"


# what an evaluation merged into an earlier one must share with it
_MERGE_KEYS = ("prompts", "seed", "bootstrap", "generation", "judge", "judge_source",
               "reference")


def _same_settings(before: dict, now: dict) -> None:
    now = json.loads(json.dumps(now, default=str))    # as meta.json holds it
    for k in _MERGE_KEYS:
        if k in before and before.get(k) != now.get(k):
            raise _OtherSettings(f"{k} {before.get(k)!r} then, {now.get(k)!r} now")


def evaluate_checkpoint(model_dir: str | Path, models: list[str] | None = None,
                        n: int | None = None, *, progress: bool = True,
                        log: Callable[[str], None] = print, report: bool = True,
                        out: str | Path | None = None, force: bool = False):
    """``starpo eval MODEL_DIR``: evaluate a saved model (a Hugging Face checkpoint
    directory) outside any run, with the default evaluation (the guide's metrics on the
    world's held-out prompts, gold judge), in a run directory of its own: ``out``, by
    default ``runs/eval-<name>`` (``<name>``: the directory's name, or its stage's for a
    run's ``<stage>/model``). ``models`` are more checkpoints to evaluate beside it. There
    is no SFT reference, so ``win_vs_sft`` and ``kl_vs_sft`` are left out."""
    from starpo.recipe import ModelSpec
    model_dir = Path(model_dir).resolve()
    name = fileio.safe_name(eval_stage.display_name(str(model_dir)))
    out = Path(out) if out is not None else Path("runs") / f"eval-{name}"
    st = eval_stage.default_eval_stage(n)
    st.models = [str(model_dir)] + [str(Path(m).resolve()) if Path(m).exists() else m
                                    for m in models or []]
    recipe = Recipe(name=f"eval-{name}", model=ModelSpec(name_or_path=str(model_dir)),
                    stages=[st])
    rpath = out / "recipe.yaml"
    if rpath.is_file():
        before = load_recipe(rpath)
        if before.model.name_or_path != str(model_dir):
            raise StarpoError(f"{out}: a run directory of another model "
                              f"({before.model.name_or_path}); choose another --out")
    log(f"evaluating the checkpoint {model_dir} in the run directory {out}")
    with fileio.dir_lock(out, command="starpo eval", force=force, log=log):
        fileio.write_text(rpath, dump_recipe(recipe))
        return _evaluate_run(out, rpath, st.models, n, stage=None, progress=progress,
                             log=log, report=report)
