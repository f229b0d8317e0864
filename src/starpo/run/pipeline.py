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
last checkpoint unless ``restart``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from starpo.recipe import Recipe, dump_recipe
from starpo.errors import StarpoError, bad_rows_to
from starpo import stages
from starpo.recipe import load_recipe
from starpo.stages import eval as eval_stage
from starpo.report import write_report
from starpo.runtime import Runtime
from starpo.generate import vllm as vllm_backend
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
    # (starpo.metrics.evaluation.sample_cache_key); default DIR/evalcache, shareable like refcache
    sample_cache_dir: Path | None = None
    # where this process computes and whether it writes files: one per run
    runtime: Runtime = field(default_factory=Runtime.create)
    _world: object = field(default=None, repr=False)

    # ------------------------------------------------------------------ paths
    def stage_dir(self, name: str) -> Path:
        return self.out / name

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
        tmp = d / ".stage.json.tmp"
        tmp.write_text(json.dumps({"complete": True, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                   "config_hash": self.stage_hash(name), **summary}, indent=2))
        tmp.replace(d / "stage.json")

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
        if spec.name_or_path != "tiny":
            return spec.name_or_path
        path = self.out / "base" / "model"
        # built once, by the main process; the others wait and then read it
        with self.runtime.main_first():
            if not (path / "config.json").is_file():
                if not self.runtime.is_main:
                    raise StarpoError(f"{path}: the main process did not write the base model")
                self.log(f"building the tiny default model and training its tokenizer → {path}")
                model, tok = loading.build_or_load(
                    spec, lambda: self.world.corpus(), seed=self.recipe.seed, cache_dir=None)
                loading.save_pretrained(model, tok, path)
        return str(path)

    def resolve_model(self, ref: str | None, *, before: str | None = None) -> str:
        """A stage name, "base", or a path → a checkpoint path (or hub id).

        ``None`` means the model of the last trained stage before ``before`` (or the base
        model when there is none).
        """
        names = [s.name for s in self.recipe.stages]
        if ref is None:
            prev = None
            for s in self.recipe.stages:
                if s.name == before:
                    break
                if s.yields_policy:
                    prev = s.name
            ref = prev or "base"
        if ref == "base":
            return self.base_model_path()
        if ref in names:
            path = self.stage_dir(ref) / "model"
            if not (path / "config.json").is_file():
                raise StarpoError(f"stage {before!r} needs the model of stage {ref!r}, which "
                                  f"has not been trained yet ({path} missing); run it first "
                                  f"(--stages {ref},{before})")
            return str(path)
        return ref  # a local path or a hub id


def run(recipe: Recipe, out: Path, *, only: list[str] | None = None, restart: bool = False,
        log: Callable[[str], None] = _default_log, progress: bool = True,
        report: bool = True, refcache_dir: Path | None = None,
        runtime: Runtime | None = None) -> RunContext:
    runtime = runtime or Runtime.create()
    main = runtime.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
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
    for name, kind, status in steps:
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
        with tracking.stage(name), bad_rows_to(out / name / "bad_rows.jsonl", stage=name):
            summary = stages.runner(kind)(ctx, recipe.stage(name)) or {}
        summary["seconds"] = round(time.time() - t0, 1)
        ctx.mark_complete(name, summary)
        runtime.wait()
        log(f"[{name}] done in {summary['seconds']} s")
    tracking.finish()
    if main and report and any((out / s.name / "stage.json").is_file() for s in recipe.stages):
        log(f"report → {write_report(out)}")
    return ctx


def evaluate_run(run_dir: str | Path, models: list[str] | None = None, n: int | None = None, *,
                 stage: str | None = None, progress: bool = True,
                 log: Callable[[str], None] = print, report: bool = True):
    """Evaluate the models of the run in ``run_dir`` (``starpo eval RUN_DIR``).

    Uses the run's resolved recipe (``RUN_DIR/recipe.yaml``): its eval stage (``stage``
    names one when there are several) for data, judge, sampling and bootstrap, or
    :func:`starpo.stages.eval.default_eval_stage` when it has none. ``models`` (stage names, ``base`` or
    checkpoint paths) defaults to every trained stage; ``n`` caps the prompts. Writes
    ``RUN_DIR/<eval stage>/`` (``eval`` by default) and, with ``report``, the report.
    """
    run_dir = Path(run_dir)
    rpath = run_dir / "recipe.yaml"
    if not rpath.is_file():
        raise StarpoError(f"{run_dir}: not a run directory (no recipe.yaml)")
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
    log(f"[{st.name}] eval → {run_dir / st.name}")
    res = eval_stage.run_evaluation(ctx, st, models=models, n=n, out_dir=run_dir / st.name)
    if report:
        log(f"report → {write_report(run_dir)}")
    return res
