"""Hyperparameter sweeps: a grid of trials over one recipe, run and recorded.

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

import copy
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from starpo import losses
from starpo.metrics.names import EVAL_METRICS, HEADLINE_METRICS
from starpo.recipe import (STAGE_TYPES, PreferenceSpec, Recipe, apply_override, dump_recipe,
                           recipe_from_dict, stage_spec)
from starpo.errors import RecipeError, StarpoError
from starpo import fileio
from starpo.report.sweep_page import write_sweep_report
from starpo.run import pipeline



def _kind(st: dict):
    """The spec class of a raw stage dict: its declared traits (starpo.recipe.schema)."""
    return stage_spec(st["type"])


def _policy(st: dict) -> bool:
    return _kind(st).yields_policy


def _starts(st: dict) -> bool:
    return _kind(st).starts_from_model


def _refs(st: dict, field: str) -> bool:
    return field in _kind(st).refs


def _is_eval(st: dict) -> bool:
    return _kind(st).evaluates


class SweepError(StarpoError):
    """A sweep file key is unknown, has the wrong type, or a grid cannot be expanded."""


# =========================================================================== the file schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnalysisSpec(_Strict):
    metric: str = "mean_score"      # one of HEADLINE_METRICS

    @field_validator("metric")
    @classmethod
    def _headline(cls, v: str) -> str:
        if v not in HEADLINE_METRICS:
            raise ValueError(f"analysis.metric: {v!r} is not one of {', '.join(HEADLINE_METRICS)}")
        return v
    top_k_percent: float = Field(25.0, gt=0, le=100)
    reference_method: str | None = None   # best runs are compared with it in % (default dpo)


class ResourcesSpec(_Strict):
    """What one trial (and the shared run) needs from a Ray cluster or a SLURM allocation.
    The local executor does not read it (``--jobs`` splits this machine's cores and GPUs)."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)            # >1: the trial runs under `accelerate launch`
    memory_gb: float | None = Field(None, gt=0)

    @field_validator("gpu")
    @classmethod
    def _whole_gpus_above_one(cls, v: float) -> float:
        # a fraction of one GPU can be shared (Ray packs small trials), but a trial over
        # several GPUs runs one process per GPU, so it needs whole ones
        if v > 1 and v != int(v):
            raise ValueError(f"resources.gpu: {v} is more than one GPU but not a whole number")
        return v


class SlurmSpec(_Strict):
    """What ``starpo sweep --emit slurm`` writes into the sbatch scripts."""

    partition: str | None = None
    account: str | None = None
    time: str | None = None                  # the trials' --time (e.g. "04:00:00")
    shared_time: str | None = None           # the shared job's --time (default: time)
    max_parallel: int | None = Field(None, ge=1)   # array tasks at once (--array=…%N)
    sbatch: list[str] = []                   # further options, e.g. ["--qos=high"]
    setup: list[str] = []                    # shell lines run before starpo (module load …)
    command: str | None = None               # how to call starpo (default: this Python)


class SweepSpec(_Strict):
    """The sweep file (docs/sweep.md)."""

    name: str | None = None              # default: the file's stem
    recipe: str                          # the base recipe, relative to the sweep file
    stages: list[str] | None = None      # the recipe's stages a trial uses (default: all)
    shared: list[str] = []               # stages run once into DIR/shared, reused by all
    preference_stage: str | None = None  # whose loss a method sets (default: first dpo)
    overrides: dict[str, Any] = {}       # dotted key → value, for every trial
    methods: dict[str, dict[str, Any] | None] = Field(min_length=1)  # method → grid
    analysis: AnalysisSpec = AnalysisSpec()
    # where refcache/ and evalcache/ live (relative to this file; default the sweep
    # directory): point it at storage every machine mounts to share them between sweeps
    cache_dir: str | None = None
    resources: ResourcesSpec = ResourcesSpec()   # per trial, for --executor ray and SLURM
    max_retries: int = Field(2, ge=0)            # reruns of a trial whose Ray worker died
    slurm: SlurmSpec = SlurmSpec()

    @model_validator(mode="after")
    def _reference_method(self) -> "SweepSpec":
        ref = self.analysis.reference_method
        if ref is not None and ref not in self.methods:
            raise ValueError(f"analysis.reference_method: {ref!r} is not one of the sweep's "
                             f"methods {list(self.methods)}")
        return self

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: dict) -> dict:
        for name, grid in v.items():
            if name not in losses.LOSSES and not losses.is_import_path(name):
                raise ValueError(f"methods.{name}: unknown method {name!r}; a method is a "
                                 f"preference loss: {', '.join(losses.LOSSES)} or "
                                 f"module:function")
            if grid is None:
                v[name] = {}
        return v


def _schema_errors(err: ValidationError, origin: str) -> str:
    """Pydantic errors as ``origin: dotted.key: message`` lines (config.py's style)."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        # a validator's message may carry its own key path ("methods.x: ...")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            head = msg.split(": ", 1)[0]
            if ": " in msg and (where == "(top level)" or head.startswith(where + ".")) \
                    and " " not in head:
                where, msg = msg.split(": ", 1)
        lines.append(f"{origin}: {where}: {msg}")
    return "\n".join(lines)


def _inner(err: RecipeError) -> str:
    """The message of a recipe error raised for origin ``"trial"``, without that origin."""
    lines = [ln[len("trial: "):] if ln.startswith("trial: ") else ln
             for ln in str(err).splitlines()]
    return "; ".join(lines)


# =========================================================================== trials


@dataclass
class Trial:
    """One grid point: a method, its parameter values and its validated recipe tree."""

    id: str
    method: str
    params: dict[str, Any]
    tree: dict                    # the kept recipe with the method and params applied
    config_hash: str = ""


@dataclass
class Sweep:
    """A loaded, validated sweep file."""

    path: Path
    spec: SweepSpec
    name: str
    recipe_path: Path
    base: Recipe                  # overrides applied, kept stages only
    base_tree: dict
    pref_stage: str
    shared: list[str]
    trials: list[Trial]
    cli_overrides: list[str] = field(default_factory=list)

    def trial(self, trial_id: str) -> Trial:
        for t in self.trials:
            if t.id == trial_id:
                return t
        raise SweepError(f"{self.path}: no trial {trial_id!r} (of {len(self.trials)}; "
                         f"`starpo sweep {self.path} --dry-run` lists them)")


def _fmt_value(v: Any) -> str:
    """A parameter value as it appears in a trial id (5e-05, 0.1, 100, true, a_b)."""
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, float):
        s = f"{v:g}"
    elif isinstance(v, (list, tuple)):
        s = "_".join(_fmt_value(x) for x in v)
    else:
        s = str(v)
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", s).strip("_") or "x"


def short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with
    (``stages.dpo.beta`` → ``beta``; ``stages.dpo.train.lr`` and ``stages.sft.train.lr``
    → ``dpo.train.lr`` and ``sft.train.lr``)."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != k and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[k] = suffix
    return out


def trial_id(method: str, params: dict[str, Any], varied: list[str]) -> str:
    """``method-<short key><value>...`` over the keys that vary in the method's grid."""
    names = short_names(varied)
    parts = [method] + [f"{names[k].replace('.', '_')}{_fmt_value(params[k])}"
                        for k in varied]
    return "-".join(parts)


def _grid_values(v: Any) -> list[Any]:
    return list(v) if isinstance(v, list) else [v]


def expand(methods: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any], str]]:
    """``(method, params, id)`` for every grid point: the product within each method, in
    the file's order of methods, keys and values. Ids are unique (a clash gets ``-2``…)."""
    out = []
    seen: dict[str, int] = {}
    for method, grid in methods.items():
        keys = list(grid)
        values = [_grid_values(grid[k]) for k in keys]
        varied = [k for k, vs in zip(keys, values) if len(vs) > 1]
        for combo in itertools.product(*values):
            params = dict(zip(keys, combo))
            tid = trial_id(method, params, varied)
            if tid in seen:
                seen[tid] += 1
                tid = f"{tid}-{seen[tid]}"
            else:
                seen[tid] = 1
            out.append((method, params, tid))
    return out


# =========================================================================== stage references


def implicit_model(stages: list[dict], i: int) -> str:
    """The starting model of stage ``i`` when its ``model`` is unset: the last trained
    policy stage before it, else ``base`` (what the pipeline resolves)."""
    prev = "base"
    for st in stages[:i]:
        if _policy(st):
            prev = st["name"]
    return prev


def default_eval_models(stages: list[dict]) -> list[str]:
    """An eval stage's default models: every policy stage of the recipe, in order."""
    return [st["name"] for st in stages if _policy(st)]


def eval_reference(stages: list[dict], ev: dict) -> str:
    """The SFT reference of an eval stage (evaluation.reference_name's rule)."""
    if ev.get("sft"):
        return ev["sft"]
    for st in stages:
        if st["type"] == "sft":
            return st["name"]
    return "base"


def stage_refs(stages: list[dict], i: int) -> list[tuple[str, str]]:
    """``(field, stage name)`` for every other stage that stage ``i`` needs."""
    st = stages[i]
    names = {s["name"] for s in stages}
    refs: list[tuple[str, str]] = []
    if _starts(st):
        refs.append(("model", st.get("model") or implicit_model(stages, i)))
    if _refs(st, "reference") and st.get("reference"):
        refs.append(("reference", st["reference"]))
    judge = st.get("judge") or {}
    if _refs(st, "judge.path") and judge.get("path"):
        refs.append(("judge.path", judge["path"]))
    if _is_eval(st):
        for m in st.get("models") or default_eval_models(stages):
            refs.append(("models", m))
        refs.append(("sft", eval_reference(stages, st)))
    return [(f, r) for f, r in refs if r in names]


# =========================================================================== loading


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise SweepError(f"{path}: {what} file not found")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "parse error"
        raise SweepError(f"{path}: not valid YAML: {first}") from None
    if not isinstance(tree, dict):
        raise SweepError(f"{path}: a {what} must be a mapping")
    return tree


def _stages_addressed(tree: dict, key: str) -> set[int]:
    """Indices of the stages a dotted key addresses, found by writing a marker there
    (so it follows apply_override's own addressing: index, name or type)."""
    marker = object()
    t = copy.deepcopy(tree)
    apply_override(t, key, marker)

    def has(node: Any) -> bool:
        if node is marker:
            return True
        if isinstance(node, dict):
            return any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    stages = t.get("stages")
    if stages is marker:   # the whole list replaced: every stage
        return set(range(len(tree.get("stages") or [])))
    return {i for i, st in enumerate(stages or []) if has(st)}


def _parse_cli_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise SweepError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _named_tree(tree: dict) -> dict:
    """The tree with every stage's ``name`` filled in (defaults to its type), so stages can
    be addressed and compared by name before and after removing some."""
    t = copy.deepcopy(tree)
    for st in t.get("stages") or []:
        if isinstance(st, dict) and not st.get("name") and st.get("type"):
            st["name"] = st["type"]
    return t


def _read_spec(path: Path) -> SweepSpec:
    try:
        return SweepSpec.model_validate(_read_yaml(path, "sweep"))
    except ValidationError as err:
        raise SweepError(_schema_errors(err, str(path))) from None


def _recipe_tree(path: Path, spec: SweepSpec, overrides: list[str]) -> tuple[Path, dict]:
    """The base recipe's raw tree with the file's, then the command line's overrides
    applied, validated as a whole, stage names filled in."""
    recipe_path = (path.parent / spec.recipe).resolve()
    if not recipe_path.is_file():
        raise SweepError(f"{path}: recipe: {spec.recipe} not found (looked for {recipe_path})")
    tree = _read_yaml(recipe_path, "recipe")
    for key, value in spec.overrides.items():
        try:
            apply_override(tree, key, value)
        except RecipeError as err:
            raise SweepError(f"{path}: overrides.{key}: {err}") from None
    for text in overrides:
        key, value = _parse_cli_override(text)
        try:
            apply_override(tree, key, value)
        except RecipeError as err:
            raise SweepError(str(err)) from None
    try:
        recipe_from_dict(tree, origin="trial")
    except RecipeError as err:
        raise SweepError(f"{path}: the recipe {recipe_path.name} with the sweep's overrides: "
                         f"{_inner(err)}") from None
    return recipe_path, _named_tree(tree)


def _keep_stages(path: Path, spec: SweepSpec, tree: dict, recipe_name: str) -> list[dict]:
    """The stages a trial uses (``stages:``, default all); nothing kept may need a stage
    left out, and one of them must be an eval stage."""
    names = [st["name"] for st in tree["stages"]]
    keep = spec.stages if spec.stages is not None else names
    for n in keep:
        if n not in names:
            raise SweepError(f"{path}: stages: no stage named {n!r} in {recipe_name}; it has "
                             f"{names}")
    kept = [st for st in tree["stages"] if st["name"] in keep]
    dropped = set(names) - set(keep)
    for i, st in enumerate(kept):
        for fld, ref in _dangling_refs(kept, i, dropped):
            raise SweepError(f"{path}: stages: stage {st['name']!r} needs {ref!r} ({fld}), "
                             f"which the sweep leaves out")
    if not any(_is_eval(st) for st in kept):
        raise SweepError(f"{path}: the trials have no eval stage, so nothing would score "
                         f"them; add one to {recipe_name} (or to stages:)")
    return kept


def _preference_stage(path: Path, spec: SweepSpec, kept: list[dict]) -> str:
    """The stage whose ``loss`` a method sets: named, or the first dpo stage; the eval
    stage must score it."""
    kinds = {st["name"]: st["type"] for st in kept}
    pref = spec.preference_stage or next((n for n, k in kinds.items() if k == "dpo"), None)
    preference_kinds = [t for t, cls in STAGE_TYPES.items() if issubclass(cls, PreferenceSpec)]
    if pref is None:
        raise SweepError(f"{path}: preference_stage: the trials have no dpo stage; name the "
                         f"stage whose loss the methods set")
    if kinds.get(pref) not in preference_kinds:
        raise SweepError(f"{path}: preference_stage: {pref!r} is not a "
                         f"{' or '.join(preference_kinds)} stage of the trials ({list(kinds)})")
    ev = next(st for st in kept if _is_eval(st))
    if ev.get("models") and pref not in ev["models"]:
        raise SweepError(f"{path}: the eval stage {ev['name']!r} lists models {ev['models']} "
                         f"without the preference stage {pref!r}, so no trial would be scored")
    return pref


def _with_method(base_tree: dict, pref_idx: int, method: str,
                 params: dict[str, Any]) -> dict:
    t = copy.deepcopy(base_tree)
    t["stages"][pref_idx]["loss"] = method
    for k, v in params.items():
        apply_override(t, k, v)
    return t


def _check_grid(path: Path, spec: SweepSpec, base_tree: dict, pref_idx: int) -> None:
    """Every grid key and value on its own, so an error names exactly one key: the key
    must exist, must not touch a shared stage or the loss, and each value must validate."""
    shared_idx = {i for i, st in enumerate(base_tree["stages"]) if st["name"] in spec.shared}
    for method, grid in spec.methods.items():
        for key, values in grid.items():
            where = f"{path}: methods.{method}.{key}"
            if isinstance(values, list) and not values:
                raise SweepError(f"{where}: an empty list of values")
            try:
                idx = _stages_addressed(base_tree, key)
            except RecipeError as err:
                raise SweepError(f"{where}: {err}") from None
            hit = sorted(idx & shared_idx)
            if hit:
                raise SweepError(f"{where}: sets the shared stage "
                                 f"{base_tree['stages'][hit[0]]['name']!r}, which runs once "
                                 f"for every trial; move it to overrides: or out of shared:")
            probe = copy.deepcopy(base_tree)
            apply_override(probe, key, "__probe__")
            if probe["stages"][pref_idx].get("loss") == "__probe__":
                raise SweepError(f"{where}: the method name sets the loss; list the method "
                                 f"under methods: instead")
            for v in _grid_values(values):
                try:
                    recipe_from_dict(_with_method(base_tree, pref_idx, method, {key: v}),
                                     origin="trial")
                except RecipeError as err:
                    msg = _inner(err)
                    # a misspelt key fails for every value: naming one would mislead
                    what = "" if "unknown key" in msg else f"value {v!r}: "
                    raise SweepError(f"{where}: {what}{msg}") from None


def _make_trials(path: Path, spec: SweepSpec, base_tree: dict, pref_idx: int) -> list[Trial]:
    """Every grid point as a validated trial (combinations can fail where single values
    passed, e.g. ipo with label smoothing)."""
    trials = []
    for method, params, tid in expand(spec.methods):
        try:
            rec = recipe_from_dict(_with_method(base_tree, pref_idx, method, params),
                                   origin="trial")
        except RecipeError as err:
            raise SweepError(f"{path}: methods.{method}: trial {tid}: {_inner(err)}") from None
        resolved = _named_tree(rec.model_dump(mode="json"))
        digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
        trials.append(Trial(tid, method, params, resolved, digest))
    return trials


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file and expand its grid (nothing runs).

    Every error is one :class:`SweepError` line naming the sweep file and the key:
    schema errors, overrides, stage names, each grid key and value, and each trial's
    complete recipe.
    """
    path = Path(path)
    spec = _read_spec(path)
    recipe_path, tree = _recipe_tree(path, spec, list(overrides or []))
    kept = _keep_stages(path, spec, tree, recipe_path.name)
    pref = _preference_stage(path, spec, kept)
    _check_shared(path, spec, kept, pref)
    tree["stages"] = kept
    base = recipe_from_dict(tree, origin=str(recipe_path))
    base_tree = _named_tree(base.model_dump(mode="json"))
    pref_idx = [st["name"] for st in base_tree["stages"]].index(pref)
    _check_grid(path, spec, base_tree, pref_idx)
    return Sweep(path=path, spec=spec, name=spec.name or path.stem, recipe_path=recipe_path,
                 base=base, base_tree=base_tree, pref_stage=pref, shared=list(spec.shared),
                 trials=_make_trials(path, spec, base_tree, pref_idx),
                 cli_overrides=list(overrides or []))


def _dangling_refs(stages: list[dict], i: int, dropped: set[str]) -> list[tuple[str, str]]:
    """References of stage ``i`` to stages the sweep dropped (``stages:``)."""
    st = stages[i]
    refs = []
    if _starts(st) and st.get("model") in dropped:
        refs.append(("model", st["model"]))
    if st.get("reference") in dropped:
        refs.append(("reference", st["reference"]))
    if (st.get("judge") or {}).get("path") in dropped:
        refs.append(("judge.path", st["judge"]["path"]))
    if _is_eval(st):
        for m in st.get("models") or []:
            if m in dropped:
                refs.append(("models", m))
        if st.get("sft") in dropped:
            refs.append(("sft", st["sft"]))
    return refs


def _check_shared(path: Path, spec: SweepSpec, kept: list[dict], pref: str) -> None:
    """Shared stages exist, are trained stages other than the swept one, and need nothing
    but other shared stages (they run once, before any trial)."""
    names = [st["name"] for st in kept]
    for n in spec.shared:
        if n not in names:
            raise SweepError(f"{path}: shared: no stage named {n!r} among the trials' stages "
                             f"{names}")
        st = kept[names.index(n)]
        if _is_eval(st):
            raise SweepError(f"{path}: shared: {n!r} is an eval stage; eval runs in every "
                             f"trial (the SFT baseline is evaluated once automatically)")
        if n == pref:
            raise SweepError(f"{path}: shared: {n!r} is the preference stage the methods "
                             f"change; it cannot be shared")
    for n in spec.shared:
        i = names.index(n)
        for fld, ref in stage_refs(kept, i):
            if ref not in spec.shared:
                raise SweepError(f"{path}: shared: stage {n!r} needs {ref!r} ({fld}), which "
                                 f"is not shared; share it too or set {n}.{fld}")


# =========================================================================== trial recipes


def _point(ref: str, shared: set[str], shared_dir: Path) -> str:
    """A stage name of the shared run → its checkpoint path; other names unchanged."""
    return str(shared_dir / ref / "model") if ref in shared else ref


def trial_recipe_tree(tree: dict, shared: list[str], shared_dir: Path) -> dict:
    """The trial's own recipe: the shared stages removed, every reference to them (model,
    reference, judge, eval models and SFT reference) replaced by their checkpoint under
    ``shared_dir``, implicit starting models written out (removing a stage would change
    what "the previous stage" means)."""
    t = copy.deepcopy(tree)
    stages = t["stages"]
    sh = set(shared)
    out = []
    for i, st in enumerate(stages):
        if st["name"] in sh:
            continue
        st = copy.deepcopy(st)
        if _starts(st):
            st["model"] = _point(st.get("model") or implicit_model(stages, i), sh, shared_dir)
        if _refs(st, "reference") and st.get("reference"):
            st["reference"] = _point(st["reference"], sh, shared_dir)
        if _refs(st, "judge.path") and (st.get("judge") or {}).get("path"):
            st["judge"]["path"] = _point(st["judge"]["path"], sh, shared_dir)
        if _is_eval(st):
            ref = eval_reference(stages, st)
            models = list(st.get("models") or default_eval_models(stages))
            if ref in sh:
                # evaluation names a checkpoint path ".../<name>/model" by <name>, so the
                # shared SFT model keeps its name in summary.json and stays the reference
                if ref not in models:
                    models.insert(0, ref)
                st["sft"] = ref
            st["models"] = [_point(m, sh, shared_dir) for m in models]
        out.append(st)
    t["stages"] = out
    return t


def shared_recipe_tree(tree: dict, shared: list[str]) -> dict | None:
    """The shared run: the shared stages, plus the trials' eval stage evaluating the shared
    policies (so the SFT baseline is scored once). ``None`` without shared stages."""
    if not shared:
        return None
    t = copy.deepcopy(tree)
    stages = t["stages"]
    out = []
    for i, st in enumerate(stages):
        if st["name"] not in shared:
            continue
        st = copy.deepcopy(st)
        if _starts(st) and not st.get("model"):
            st["model"] = implicit_model(stages, i)
        out.append(st)
    # the SFT baseline is evaluated here only when the SFT reference is itself shared;
    # otherwise every trial evaluates its own and the analysis averages those
    ev = next((st for st in stages if _is_eval(st)), None)
    policies = [st["name"] for st in out if _policy(st)]
    ref = eval_reference(stages, ev) if ev is not None else None
    names = {st["name"] for st in stages}
    judge = ((ev or {}).get("judge") or {}).get("path")
    judged_by_trial = judge in names and judge not in shared   # a reward model each trial trains
    if ev is not None and ref in policies and not judged_by_trial:
        ev = copy.deepcopy(ev)
        ev["models"] = policies
        ev["sft"] = ref
        out.append(ev)
    t["stages"] = out
    return t


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
    res = {"metrics": {k: m.get(k) for k in EVAL_METRICS},
           "ci": {k: m.get(f"{k}_ci") for k in EVAL_METRICS},
           "n_prompts": m.get("n"),
           "eval_file": os.path.relpath(d / fname, out),
           "sft": ({k: summary[ref].get(k) for k in EVAL_METRICS}
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


def share_caches(run_dir: Path, out: Path, stages: list[dict],
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
    for st in stages:
        if _starts(st) and not (run_dir / st["name"] / "stage.json").exists():
            _link(out / "prepared" / st["name"], run_dir / st["name"] / "data")


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
    st = shared_recipe_tree(sweep.base_tree, sweep.shared)
    shared = None
    if st is not None:
        st["name"] = f"{sweep.name}-shared"
        shared = recipe_from_dict(st, origin=f"{sweep.path} (shared run)")
    trials = []
    for t in sweep.trials:
        tt = trial_recipe_tree(t.tree, sweep.shared, shared_dir)
        tt["name"] = f"{sweep.name}-{t.id}"
        trials.append((t, recipe_from_dict(tt, origin=f"{sweep.path} (trial {t.id})")))
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


def run_trial_in_process(recipe: Recipe, tdir: Path, *, progress: bool) -> None:
    """Run a trial's recipe with the normal pipeline, its log lines into ``log.txt``."""
    with (tdir / "log.txt").open("a") as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} starting\n")

        def log(msg: str) -> None:
            f.write(msg + "\n")
            f.flush()
        try:
            pipeline.run(recipe, tdir, log=log, progress=progress, report=True)
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
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        err = [ln[len("error: "):] for ln in (tdir / "log.txt").read_text().splitlines()
               if ln.startswith("error: ")]
        raise TrialFailed(err[-1] if err else f"starpo run exited with status {rc}; see "
                                              f"{tdir / 'log.txt'}")


def trial_processes(resources: ResourcesSpec) -> int:
    """Processes a trial (or the shared run) runs as: one per GPU when it asks for more
    than one (under ``accelerate launch``), else one."""
    return int(resources.gpu) if resources.gpu > 1 else 1


def trial_runner(resources: ResourcesSpec, *, progress: bool = False
                 ) -> Callable[[Recipe, Path], None]:
    """How a trial runs where it was placed (a Ray task, a ``--trial`` task): in this
    process, or over several GPUs under ``accelerate launch`` in a child process (the
    scheduler has set ``CUDA_VISIBLE_DEVICES`` to the trial's GPUs)."""
    n = trial_processes(resources)
    if n > 1:
        return lambda rec, tdir: run_trial_subprocess(rec, tdir, env=dict(os.environ),
                                                      processes=n)
    return lambda rec, tdir: run_trial_in_process(rec, tdir, progress=progress)


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
        except Exception:  # noqa: BLE001 - no torch CUDA: CPU slots
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
               processes: int = 1) -> None:
    """The shared stages and the SFT baseline's evaluation, once (skipped when done);
    ``processes > 1``: under ``accelerate launch`` in a child process."""
    if plan.shared is None:
        return
    names = ", ".join(s.name for s in plan.shared.stages)
    log(f"[shared] {names} → {plan.shared_dir}")
    plan.shared_dir.mkdir(parents=True, exist_ok=True)
    share_caches(plan.shared_dir, plan.out, plan.shared.model_dump(mode="json")["stages"],
                 plan.caches)
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
                         progress=progress, report=True)
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
    share_caches(tdir, plan.out, rec.model_dump(mode="json")["stages"], plan.caches)
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
    except StarpoError as e:
        err = e
    except Exception as e:  # noqa: BLE001 - recorded; the sweep goes on
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
    sweep goes on. ``jobs > 1`` runs trials in that many child processes (``starpo run``).
    ``runner(recipe, trial_dir)`` replaces the in-process runner (tests). Returns the
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
                    progress: bool = False) -> None:
    """``--shared-only``: the shared stages and the SFT baseline's evaluation, no trial
    (the first job of a SLURM array sweep, before its ``--trial`` tasks)."""
    plan.out.mkdir(parents=True, exist_ok=True)
    write_sweep_info(plan)
    if plan.shared is None:
        log(f"[shared] {plan.sweep.path} has no shared stages; nothing to run")
        return
    run_shared(plan, log=log, progress=progress,
               processes=trial_processes(plan.sweep.spec.resources))


def run_one_trial(plan: SweepPlan, trial_id: str, *, retry_failed: bool = False,
                  log: Callable[[str], None] = print, progress: bool = False,
                  raise_errors: bool = False,
                  runner: Callable[[Recipe, Path], None] | None = None) -> dict | None:
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
    run = runner or trial_runner(plan.sweep.spec.resources, progress=progress)
    res = _run_trial(plan, k, trial, rec, run, where="", raise_errors=raise_errors, log=log)
    return _record(plan, store, *res, log)


def finalize(out: Path, *, log: Callable[[str], None] = print) -> Path:
    """Write ``analysis.json`` and ``report.html`` of a sweep directory (one analysis for
    both); returns the report's path."""
    report = write_sweep_report(out)
    log(f"analysis → {Path(out) / 'analysis.json'}")
    log(f"report → {report}")
    return report
