"""The links between a recipe's stages: which model each stage's fields name.

Every field that may name another stage is declared once, on its stage kind
(``refs`` in :mod:`starpo.recipe.schema`: ``model``, ``reference``, ``judge.path``, an eval
stage's ``models`` and ``sft``), with the traits that give the defaults (``yields_policy``,
``starts_from_model``, ``sft_baseline``). This module is the one place that reads them, for
the pipeline, the eval and online stages and the sweep alike, so ``starpo run`` and
``starpo sweep`` cannot disagree on what a name means:

* :func:`edges` — every link of a stage: ``(stage, field, target)``, the target a stage
  name, :data:`BASE` or a checkpoint path / hub id, and whether it is a default;
* the defaults: :func:`implicit_model` (the previous policy stage, else the base model),
  :func:`sft_reference` and :func:`eval_models` of an eval stage;
* :func:`problems` — a link to the stage itself, to a later stage, or a misspelt stage
  name (the recipe's validation reports the first, on one line);
* :func:`checkpoint` — the one resolver from a link's target to a checkpoint path in a run
  directory (``DIR/<stage>/model``; ``DIR/base/model`` for the tiny model);
* :func:`rewrite` — a recipe whose stages named in a mapping are replaced by their
  checkpoints (the sweep's trials, which reuse the shared stages).

Everything here works on a validated recipe and reads no file, except that
:func:`checkpoint` looks whether a stage's model has been written and :func:`problems`
whether a name that looks like a misspelt stage is a directory. (This module does not
import the schema, whose validation calls :func:`problems`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from starpo.errors import RecipeError, StarpoError, did_you_mean

# the recipe's starting model (``model.name_or_path``), by the name stages use for it
BASE = "base"

# fields whose value need be neither a stage nor a path, so it is never taken for a
# misspelt stage: an eval stage's ``sft`` may be the evaluation name of a checkpoint (see
# rewrite), and a judge reads its own ``path`` (``pairrm`` beside a ``pairwise_rm`` stage)
_FREE_FIELDS = ("sft", "judge.path")


@dataclass(frozen=True)
class Edge:
    """One link: stage ``stage``'s field ``field`` names ``target``."""

    stage: str
    field: str       # "model", "reference", "judge.path", "models" or "sft"
    target: str      # a stage name, BASE, or a checkpoint path / hub id
    implicit: bool = False   # the field is unset and this is its default


def names(recipe) -> list[str]:
    return [st.name for st in recipe.stages]


def _position(recipe, name: str | None) -> int:
    """Index of stage ``name``; past the end for a stage outside the recipe (the default
    evaluation of ``starpo eval``), which therefore sees every stage as earlier."""
    for i, st in enumerate(recipe.stages):
        if st.name == name:
            return i
    return len(recipe.stages)


def policy_stages(recipe) -> list[str]:
    """The stages whose model is a causal-LM policy, in recipe order."""
    return [st.name for st in recipe.stages if st.yields_policy]


def implicit_model(recipe, name: str | None) -> str:
    """The starting model of stage ``name`` when its ``model`` is unset: the last policy
    stage before it, else :data:`BASE`."""
    before = recipe.stages[:_position(recipe, name)]
    return next((st.name for st in reversed(before) if st.yields_policy), BASE)


def starting_model(recipe, stage) -> str | None:
    """What ``stage`` trains from (``None`` for a kind that starts from no model)."""
    if not type(stage).starts_from_model:
        return None
    return stage.model or implicit_model(recipe, stage.name)


def sft_reference(recipe, stage=None) -> str:
    """The SFT reference of an evaluation (``win_vs_sft``, ``kl_vs_sft``): the eval stage's
    ``sft`` when set, else the first stage whose kind is the SFT baseline (``sft``), else
    :data:`BASE`."""
    explicit = getattr(stage, "sft", None) if stage is not None else None
    if explicit:
        return explicit
    return next((st.name for st in recipe.stages if type(st).sft_baseline), BASE)


def eval_models(recipe, stage) -> list[str]:
    """The models an eval stage evaluates: its ``models``, else every policy stage."""
    return list(stage.models or policy_stages(recipe))


def _get(stage, field: str) -> Any:
    node = stage
    for part in field.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _set(stage, field: str, value: Any) -> None:
    *up, last = field.split(".")
    node = stage
    for part in up:
        node = getattr(node, part)
    setattr(node, last, value)


def _default(recipe, stage, field: str) -> list[str]:
    """What an unset field means (``[]``: nothing)."""
    if field == "model":
        start = starting_model(recipe, stage)
        return [start] if start is not None else []
    if field == "models":
        return policy_stages(recipe)
    if field == "sft":
        return [sft_reference(recipe, stage)]
    return []   # reference: the starting model; judge.path: the judge's own default


def edges(recipe, stage=None) -> list[Edge]:
    """Every link of ``stage`` (default: of every stage), set or defaulted, in the order
    of the kind's ``refs`` and of list values."""
    out: list[Edge] = []
    for st in recipe.stages if stage is None else [stage]:
        for field in type(st).refs:
            value = _get(st, field)
            if value:
                targets = value if isinstance(value, list) else [value]
                out += [Edge(st.name, field, t) for t in targets]
            else:
                out += [Edge(st.name, field, t, implicit=True)
                        for t in _default(recipe, st, field)]
    return out


def stage_edges(recipe, stage=None) -> list[Edge]:
    """The links of :func:`edges` that name another stage of the recipe."""
    known = set(names(recipe))
    return [e for e in edges(recipe, stage) if e.target in known]


def _looks_like_name(ref: str) -> bool:
    """Whether ``ref`` can only be meant as a stage name (no path separator, not a
    directory here)."""
    return not any(c in ref for c in "/\\.~") and not Path(ref).exists()


def problems(recipe) -> list[str]:
    """Links that cannot work, one line each with the key: a stage naming itself or a
    later stage (it runs first), and a ``model``, ``reference`` or ``models`` entry that
    is no stage and no directory but close to a stage's name (a typo; a hub id with an
    owner, ``org/model``, is never one); and a stage called ``base``."""
    order = {n: i for i, n in enumerate(names(recipe))}
    out = []
    for i, st in enumerate(recipe.stages):
        if st.name == BASE:
            out.append(f"stages.{i}.name: {BASE!r} names the recipe's starting model "
                       f"(model.name_or_path); call the stage something else")
    for e in edges(recipe):
        if e.implicit:
            continue
        where = f"stages.{e.stage}.{e.field}"
        if e.target in order:
            if e.target == e.stage:
                out.append(f"{where}: stage {e.stage!r} names itself; name an earlier "
                           f"stage, {BASE} or a checkpoint")
            elif order[e.target] > order[e.stage]:
                out.append(f"{where}: stage {e.target!r} comes after {e.stage!r}, so its "
                           f"model does not exist yet when {e.stage!r} runs; put "
                           f"{e.target!r} before {e.stage!r}")
        elif e.target != BASE and e.field not in _FREE_FIELDS and \
                _looks_like_name(e.target):
            hint = did_you_mean(e.target, list(order) + [BASE])
            if hint:
                out.append(f"{where}: {e.target!r} is neither a stage of this recipe nor an "
                           f"existing directory{hint}")
    return out


# --------------------------------------------------------------------------- checkpoints


def model_dir(run_dir: str | Path, name: str) -> Path:
    """Where stage ``name`` of the run in ``run_dir`` writes its model."""
    return Path(run_dir) / name / "model"


def base_model(recipe, run_dir: str | Path) -> str:
    """The recipe's starting model: ``model.name_or_path``, or ``DIR/base/model`` where
    the pipeline builds the tiny default model."""
    spec = recipe.model
    return spec.name_or_path if spec.name_or_path != "tiny" else str(model_dir(run_dir, BASE))


def checkpoint(recipe, ref: str | None, run_dir: str | Path, *, needed_by: str | None = None,
               base: Callable[[], str] | None = None) -> str:
    """The checkpoint a link names, in the run directory ``run_dir``: a stage's
    ``DIR/<stage>/model`` (which must have been written), the base model (``base()``
    builds it when given; default :func:`base_model`), or the path or hub id itself.
    ``ref=None`` is the implicit starting model of stage ``needed_by``."""
    if ref is None:
        ref = implicit_model(recipe, needed_by)
    if ref == BASE:
        return base() if base is not None else base_model(recipe, run_dir)
    if ref in names(recipe):
        path = model_dir(run_dir, ref)
        if not (path / "config.json").is_file():
            raise StarpoError(f"stage {needed_by!r} needs the model of stage {ref!r}, which "
                              f"has not been trained yet ({path} missing); run it first "
                              f"(--stages {ref},{needed_by})")
        return str(path)
    return ref


# --------------------------------------------------------------------------- rewriting


def rewrite(recipe, mapping: dict[str, str]):
    """The recipe with the stages named in ``mapping`` replaced by their checkpoints
    (``name → DIR/<name>/model`` of another run): those stages are removed and every link
    to them, set or defaulted, names the checkpoint instead. Defaults that depend on the
    other stages are written out, since removing stages changes them: each starting
    ``model`` and each eval stage's ``models``. A replaced SFT reference stays the
    reference by its name (evaluation names a ``…/<name>/model`` checkpoint ``<name>``):
    its checkpoint is evaluated and ``sft`` names it."""
    for name, path in mapping.items():
        if name not in names(recipe):
            raise RecipeError(f"rewrite: no stage named {name!r}; stages are {names(recipe)}")
        if Path(path).name != "model" or Path(path).parent.name != name:
            raise ValueError(f"rewrite: {path} is not a run directory's {name}/model")

    def point(ref: str) -> str:
        return mapping.get(ref, ref)

    kept = []
    for st in recipe.stages:
        if st.name in mapping:
            continue
        new = st.model_copy(deep=True)
        for field in type(st).refs:
            value = _get(st, field)
            if field == "models":
                models = eval_models(recipe, st)
                ref = sft_reference(recipe, st)
                if ref in mapping and ref not in models:
                    models.insert(0, ref)
                new.models = [point(m) for m in models]
            elif field == "sft":
                ref = sft_reference(recipe, st)
                if ref in mapping:
                    new.sft = ref
            elif field == "model":
                start = starting_model(recipe, st)
                if start is not None:
                    new.model = point(start)
            elif value:
                _set(new, field, point(value))
        kept.append(new)
    return replace_stages(recipe, kept)


def select(recipe, keep: list[str]):
    """The recipe with only the stages ``keep`` (nothing written out: an unset ``model``
    now means the previous kept policy stage)."""
    return replace_stages(recipe, [st.model_copy(deep=True) for st in recipe.stages
                                   if st.name in keep])


def replace_stages(recipe, stages: list):
    """A validated copy of ``recipe`` whose stages are ``stages`` (stage objects)."""
    rest = {f: getattr(recipe, f) for f in type(recipe).model_fields if f != "stages"}
    try:
        return type(recipe)(**{k: v.model_copy(deep=True) if hasattr(v, "model_copy") else v
                               for k, v in rest.items()}, stages=stages)
    except ValidationError as err:
        first = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise RecipeError(f"the recipe with stages {[st.name for st in stages]}: "
                          f"{first}") from None
