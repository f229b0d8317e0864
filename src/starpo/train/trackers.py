"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through accelerate's tracker API.

``metrics.jsonl`` stays the record every stage writes; trackers get the same numbers. The
recipe chooses them (top-level key ``logging``, :class:`starpo.recipe.schema.LoggingSpec`)::

    logging:
      trackers: [tensorboard, wandb, mlflow]   # default [tensorboard]; [] = metrics.jsonl only
      run_per: stage          # stage: one tracker run per stage | pipeline: one run, keys
                              # prefixed with the stage name (sft/loss, dpo/loss, ...)
      project: my-project     # wandb project / MLflow experiment (default: the recipe name)
      mlflow_tracking_uri: …  # default $MLFLOW_TRACKING_URI, else DIR/mlruns (a local file
                              # store; MLFLOW_ALLOW_FILE_STORE is set for it)
      init_kwargs: {wandb: {entity: me, tags: [a]}, mlflow: {tags: {team: x}}}

Each run's configuration is the resolved recipe (nested for wandb; flattened to dotted keys
such as ``stages.dpo.beta`` for MLflow parameters and TensorBoard hparams, which take
scalars only). Metric keys are the ``metrics.jsonl`` names; an online stage's rounds are
``round_<k>/<name>``. TensorBoard keeps the layout it always had: with runs per stage, event
files sit next to each ``metrics.jsonl`` (``<stage>/tensorboard/``, ``online/round_k/
tensorboard/``); with one run per pipeline, in ``DIR/tensorboard/``.

wandb and MLflow are optional extras (``pip install 'starpo[wandb]'``, ``'starpo[mlflow]'``,
both: ``'starpo[trackers]'``); asking for one that is not installed fails before any stage
runs, in one line naming the extra. Trackers start lazily, at a stage's first logged step, on
the process that writes ``metrics.jsonl`` (the main one), so stages that train nothing (eval)
and skipped stages open no run. A resumed stage opens a new run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from starpo.errors import StarpoError
from starpo.recipe import LoggingSpec

# tracker -> (module it needs, how to install it)
_NEEDS = {"tensorboard": ("tensorboard", "pip install tensorboard"),
          "wandb": ("wandb", "pip install 'starpo[wandb]'"),
          "mlflow": ("mlflow", "pip install 'starpo[mlflow]'")}


def check_installed(trackers: list[str]) -> None:
    """One line naming the extra to install for the first tracker whose package is missing."""
    for name in trackers:
        module, how = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise StarpoError(f"logging.trackers: {name} is not installed; {how}")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested recipe → ``{"stages.dpo.beta": 0.1, ...}`` with scalar values (lists of
    scalars as JSON text; stages keyed by name)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list) and tree and all(isinstance(x, dict) and "name" in x
                                                 for x in tree):
        for item in tree:
            out.update(flatten(item, f"{prefix}{item['name']}."))
    elif isinstance(tree, list):
        out[prefix[:-1]] = json.dumps(tree)
    else:
        out[prefix[:-1]] = tree
    return out


class _Run:
    """The started wandb/MLflow trackers of one tracker run (a stage, or the pipeline)."""

    def __init__(self):
        self.trackers: dict[str, Any] = {}
        self.defined: set[str] = set()   # wandb keys given their step metric


_CURRENT: ContextVar["Tracking | None"] = ContextVar("starpo_tracking", default=None)


def current() -> "Tracking | None":
    """The trackers of the stage being run by the pipeline, or None (plain library use:
    ``MetricsLog`` then writes TensorBoard itself, as it always did)."""
    return _CURRENT.get()


class Tracking:
    """The trackers of one pipeline run. ``stage(name)`` wraps a stage; ``log`` is called by
    ``MetricsLog`` for every logged step; ``finish`` ends what is still open."""

    def __init__(self, recipe, out: str | os.PathLike):
        self.spec: LoggingSpec = getattr(recipe, "logging", None) or LoggingSpec()
        check_installed(self.spec.trackers)
        self.out = Path(out)
        self.name = recipe.name or self.out.resolve().name
        self.config = recipe.model_dump(mode="json")
        self.stage_types = {s.name: s.type for s in recipe.stages}
        self._stage: str | None = None
        self._runs: dict[str, _Run] = {}
        self._tensorboard: dict[Path, Any] = {}

    # ------------------------------------------------------------------ stages
    @contextmanager
    def stage(self, name: str):
        self._stage = name
        token = _CURRENT.set(self)
        ok = False
        try:
            yield self
            ok = True
        finally:
            _CURRENT.reset(token)
            self._stage = None
            if not ok:
                self.finish(failed=True)     # the pipeline stops here: close every run
            elif self.spec.run_per == "stage":
                self._close(name, failed=False)

    def finish(self, failed: bool = False) -> None:
        for key in list(self._runs):
            self._close(key, failed=failed)
        for tb in self._tensorboard.values():
            tb.finish()
        self._tensorboard.clear()

    # ------------------------------------------------------------------ logging
    def log(self, rec: dict, where: str | os.PathLike) -> None:
        """One logged step of the ``metrics.jsonl`` in directory ``where``."""
        if self._stage is None or not self.spec.trackers:
            return
        step = int(rec.get("step", 0))
        values = {k: float(v) for k, v in rec.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v)}
        per_pipeline = self.spec.run_per == "pipeline"
        parts = [self._stage] if per_pipeline else []
        sub = self._sub_run(Path(where))
        if sub:
            parts.append(sub)
        prefix = "".join(p + "/" for p in parts)
        keyed = {prefix + k: v for k, v in values.items()}
        if "tensorboard" in self.spec.trackers:
            self._tensorboard_for(self.out if per_pipeline else Path(where)).log(keyed, step=step)
        run = self._run()
        for name, tracker in run.trackers.items():
            if name == "wandb":
                # wandb wants one increasing step per run, and online rounds (or stages,
                # in one pipeline run) each count from 1: every key gets its own step key
                step_key = prefix + "step"
                for k in keyed:
                    if k not in run.defined:
                        tracker.tracker.define_metric(k, step_metric=step_key)
                        run.defined.add(k)
                tracker.log({**keyed, step_key: step})
            else:
                tracker.log(keyed, step=step)

    def _sub_run(self, where: Path) -> str:
        stage_dir = (self.out / self._stage).resolve()
        try:
            rel = where.resolve().relative_to(stage_dir)
        except ValueError:
            return ""
        return "/".join(rel.parts)

    # ------------------------------------------------------------------ runs
    def _run(self) -> _Run:
        key = "pipeline" if self.spec.run_per == "pipeline" else self._stage
        run = self._runs.get(key)
        if run is None:
            run = self._runs[key] = _Run()
            stage = None if key == "pipeline" else key
            for name in self.spec.trackers:
                if name != "tensorboard":
                    run.trackers[name] = self._start(name, stage)
        return run

    def _start(self, name: str, stage: str | None):
        from accelerate.tracking import MLflowTracker, WandBTracker

        project = self.spec.project or self.name
        run_name = self.name if stage is None else f"{self.name}/{stage}"
        extra = dict(self.spec.init_kwargs.get(name, {}))
        if name == "wandb":
            kwargs = {"name": run_name, "dir": str(self.out), "group": self.name}
            if stage is not None:
                kwargs["job_type"] = self.stage_types.get(stage, stage)
            self.out.mkdir(parents=True, exist_ok=True)
            tracker = WandBTracker(project, **{**kwargs, **extra})
            tracker.start()
            tracker.store_init_configuration(self.config)
            return tracker
        import mlflow
        uri = self.spec.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # the local default needs no server and no database package (mlflow-skinny has
            # none); MLflow 3 refuses file stores unless this opt-in is set
            uri = (self.out / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        tags = {"starpo.run": self.name, **({"starpo.stage": stage} if stage else {}),
                **extra.pop("tags", {})}
        tracker = MLflowTracker(experiment_name=project, run_name=run_name, tags=tags,
                                **extra)
        tracker.start()
        tracker.store_init_configuration(flatten(self.config))
        return tracker

    def _tensorboard_for(self, directory: Path):
        tb = self._tensorboard.get(directory)
        if tb is None:
            from accelerate.tracking import TensorBoardTracker
            tb = TensorBoardTracker("tensorboard", str(directory),
                                    **self.spec.init_kwargs.get("tensorboard", {}))
            tb.start()
            # hparams take scalars only: the flattened recipe, without unset keys
            tb.store_init_configuration({k: v for k, v in flatten(self.config).items()
                                         if v is not None})
            self._tensorboard[directory] = tb
        return tb

    def _close(self, key: str, failed: bool) -> None:
        run = self._runs.pop(key, None)
        if key != "pipeline":
            stage_dir = (self.out / key).resolve()
            for d in [d for d in self._tensorboard if d.resolve().is_relative_to(stage_dir)]:
                self._tensorboard.pop(d).finish()
        if run is None:
            return
        for name, tracker in run.trackers.items():
            if name == "wandb":
                tracker.tracker.finish(exit_code=1 if failed else 0)
            else:
                import mlflow
                mlflow.end_run(status="FAILED" if failed else "FINISHED")
