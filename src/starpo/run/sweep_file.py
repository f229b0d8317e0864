"""The sweep file: its schema, the grid expansion into trials, the checks of every
trial's recipe, and the recipes of the trials and of the shared run (what
:mod:`starpo.run.sweep` plans, runs and records; the file's format is documented there and
in docs/sweep.md)."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from starpo import extensions, losses
from starpo.metrics.registry import headline_names
from starpo.recipe import (STAGE_TYPES, PreferenceSpec, Recipe, apply_override, graph,
                           recipe_from_dict)
from starpo.errors import RecipeError, StarpoError


class SweepError(StarpoError):
    """A sweep file key is unknown, has the wrong type, or a grid cannot be expanded."""


# =========================================================================== the file schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnalysisSpec(_Strict):
    metric: str = "mean_score"      # a registry metric a method wants high

    @field_validator("metric")
    @classmethod
    def _headline(cls, v: str) -> str:
        if v not in headline_names():
            raise ValueError(f"analysis.metric: {v!r} is not one of {', '.join(headline_names())}")
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
    # seconds before the time limit at which SLURM signals a job (--signal=B:USR1@N) so it
    # checkpoints and requeues itself; 0: no signal
    signal_grace: int = Field(120, ge=0)


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
            if name not in losses.LOSSES and not extensions.is_import_path(name):
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
    """One grid point: a method, its parameter values and its validated recipe."""

    id: str
    method: str
    params: dict[str, Any]
    recipe: Recipe                # the kept stages with the method and params applied
    config_hash: str = ""


@dataclass
class Sweep:
    """A loaded, validated sweep file."""

    path: Path
    spec: SweepSpec
    name: str
    recipe_path: Path
    base: Recipe                  # overrides applied, kept stages only
    base_tree: dict               # base as YAML, where the grid's dotted keys apply
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


def _read_spec(path: Path) -> SweepSpec:
    try:
        return SweepSpec.model_validate(_read_yaml(path, "sweep"))
    except ValidationError as err:
        raise SweepError(_schema_errors(err, str(path))) from None


def _full_recipe(path: Path, spec: SweepSpec, overrides: list[str]) -> tuple[Path, Recipe]:
    """The base recipe with the file's, then the command line's overrides applied,
    validated as a whole."""
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
        return recipe_path, recipe_from_dict(tree, origin="trial")
    except RecipeError as err:
        raise SweepError(f"{path}: the recipe {recipe_path.name} with the sweep's overrides: "
                         f"{_inner(err)}") from None


def _keep_stages(path: Path, spec: SweepSpec, full: Recipe, recipe_name: str) -> Recipe:
    """The stages a trial uses (``stages:``, default all); nothing kept may need a stage
    left out, and one of them must be an eval stage."""
    names = graph.names(full)
    keep = spec.stages if spec.stages is not None else names
    for n in keep:
        if n not in names:
            raise SweepError(f"{path}: stages: no stage named {n!r} in {recipe_name}; it has "
                             f"{names}")
    dropped = set(names) - set(keep)
    for e in graph.edges(full):
        if e.stage in keep and not e.implicit and e.target in dropped:
            raise SweepError(f"{path}: stages: stage {e.stage!r} needs {e.target!r} "
                             f"({e.field}), which the sweep leaves out")
    if not any(full.stage(n).evaluates for n in keep):
        raise SweepError(f"{path}: the trials have no eval stage, so nothing would score "
                         f"them; add one to {recipe_name} (or to stages:)")
    try:
        return graph.select(full, keep)
    except RecipeError as err:
        raise SweepError(f"{path}: stages: {err}") from None


def _preference_stage(path: Path, spec: SweepSpec, base: Recipe) -> str:
    """The stage whose ``loss`` a method sets: named, or the first dpo stage; the eval
    stage must score it."""
    kinds = {st.name: st.type for st in base.stages}
    pref = spec.preference_stage or next((n for n, k in kinds.items() if k == "dpo"), None)
    preference_kinds = [t for t, cls in STAGE_TYPES.items() if issubclass(cls, PreferenceSpec)]
    if pref is None:
        raise SweepError(f"{path}: preference_stage: the trials have no dpo stage; name the "
                         f"stage whose loss the methods set")
    if kinds.get(pref) not in preference_kinds:
        raise SweepError(f"{path}: preference_stage: {pref!r} is not a "
                         f"{' or '.join(preference_kinds)} stage of the trials ({list(kinds)})")
    ev = next(st for st in base.stages if st.evaluates)
    if ev.models and pref not in ev.models:
        raise SweepError(f"{path}: the eval stage {ev.name!r} lists models {ev.models} "
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
        resolved = json.dumps(rec.model_dump(mode="json"), sort_keys=True)
        digest = hashlib.sha256(resolved.encode()).hexdigest()[:16]
        trials.append(Trial(tid, method, params, rec, digest))
    return trials


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file and expand its grid (nothing runs).

    Every error is one :class:`SweepError` line naming the sweep file and the key:
    schema errors, overrides, stage names, each grid key and value, and each trial's
    complete recipe.
    """
    path = Path(path)
    spec = _read_spec(path)
    recipe_path, full = _full_recipe(path, spec, list(overrides or []))
    base = _keep_stages(path, spec, full, recipe_path.name)
    pref = _preference_stage(path, spec, base)
    _check_shared(path, spec, base, pref)
    base_tree = base.model_dump(mode="json")
    pref_idx = [st["name"] for st in base_tree["stages"]].index(pref)
    _check_grid(path, spec, base_tree, pref_idx)
    return Sweep(path=path, spec=spec, name=spec.name or path.stem, recipe_path=recipe_path,
                 base=base, base_tree=base_tree, pref_stage=pref, shared=list(spec.shared),
                 trials=_make_trials(path, spec, base_tree, pref_idx),
                 cli_overrides=list(overrides or []))


def _check_shared(path: Path, spec: SweepSpec, base: Recipe, pref: str) -> None:
    """Shared stages exist, are trained stages other than the swept one, and need nothing
    but other shared stages (they run once, before any trial)."""
    names = graph.names(base)
    for n in spec.shared:
        if n not in names:
            raise SweepError(f"{path}: shared: no stage named {n!r} among the trials' stages "
                             f"{names}")
        if base.stage(n).evaluates:
            raise SweepError(f"{path}: shared: {n!r} is an eval stage; eval runs in every "
                             f"trial (the SFT baseline is evaluated once automatically)")
        if n == pref:
            raise SweepError(f"{path}: shared: {n!r} is the preference stage the methods "
                             f"change; it cannot be shared")
    for n in spec.shared:
        for e in graph.stage_edges(base, base.stage(n)):
            if e.target not in spec.shared:
                raise SweepError(f"{path}: shared: stage {n!r} needs {e.target!r} "
                                 f"({e.field}), which is not shared; share it too or set "
                                 f"{n}.{e.field}")


# =========================================================================== trial recipes


def trial_recipe(recipe: Recipe, shared: list[str], shared_dir: Path) -> Recipe:
    """The trial's own recipe: the shared stages removed and every link to them (model,
    reference, judge, eval models and SFT reference) naming their checkpoint under
    ``shared_dir``, implicit starting models written out (:func:`starpo.recipe.graph.rewrite`)."""
    return graph.rewrite(recipe, {n: str(graph.model_dir(shared_dir, n)) for n in shared})


def shared_recipe(recipe: Recipe, shared: list[str]) -> Recipe | None:
    """The shared run: the shared stages (implicit starting models written out), plus the
    trials' eval stage evaluating the shared policies (so the SFT baseline is scored
    once). ``None`` without shared stages."""
    if not shared:
        return None
    stages = []
    for st in recipe.stages:
        if st.name in shared:
            st = st.model_copy(deep=True)
            start = graph.starting_model(recipe, st)
            if start is not None:
                st.model = start
            stages.append(st)
    # the SFT baseline is evaluated here only when the SFT reference is itself shared;
    # otherwise every trial evaluates its own and the analysis averages those
    ev = next((st for st in recipe.stages if st.evaluates), None)
    policies = [st.name for st in stages if st.yields_policy]
    ref = graph.sft_reference(recipe, ev) if ev is not None else None
    judge = ev.judge.path if ev is not None else None
    # a reward model each trial trains
    judged_by_trial = judge in graph.names(recipe) and judge not in shared
    if ev is not None and ref in policies and not judged_by_trial:
        ev = ev.model_copy(deep=True)
        ev.models = policies
        ev.sft = ref
        stages.append(ev)
    return graph.replace_stages(recipe, stages)
