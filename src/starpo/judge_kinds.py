"""What a recipe needs to know about a judge ``type`` before anything runs: whether it is
known (a built-in name or an importable ``module:Class``), whether it scores each
response on its own (the eval stage needs that), and which stage kind's model it loads.

This is the recipe-time half of the judges; :mod:`starpo.judges` builds them. It sits
above ``recipe/`` in the layer order (so the schema can validate a judge without
importing the judges, which load models) and imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from starpo import extensions
from starpo.errors import RecipeError, did_you_mean


@dataclass(frozen=True)
class JudgeKind:
    name: str
    pointwise: bool                       # has a score of its own (the eval stage needs one)
    # the stage kind whose model it loads: its `path` is required and, when it names a
    # stage of the recipe, that stage must be of this kind (checked when the recipe loads)
    stage_kind: str | None = None


# the built-in judges; starpo.judges has one builder per name (a test checks both agree)
BUILTIN = {k.name: k for k in (
    JudgeKind("gold", True),
    JudgeKind("reward_model", True),
    JudgeKind("pairwise_rm", False, stage_kind="pairwise_rm"),
    JudgeKind("pairwise", False),
    JudgeKind("world_labeler", False),
)}


def check_name(name: str) -> str:
    """Recipe-time check of a judge ``type`` (imports a ``module:Class``)."""
    if name in BUILTIN:
        return name
    if extensions.is_import_path(name):
        cls = extensions.load(name, "judge")
        if not callable(getattr(cls, "rank", None)):
            raise RecipeError(f"judge {name!r}: a judge class needs a rank(prompt, candidates) "
                              f"method (subclass starpo.judges.base.PointwiseJudge or "
                              f"PairwiseJudge)")
        return name
    raise RecipeError(f"unknown judge type {name!r}; expected one of {', '.join(BUILTIN)} or "
                      f"an importable module:Class{did_you_mean(name, BUILTIN)}")


def is_pointwise(name: str) -> bool:
    """Whether the judge scores each response on its own (rather than only comparing).

    A ``module:Class`` says so with a class attribute ``pointwise`` (the judge bases set
    it: :class:`~starpo.judges.base.PointwiseJudge` True,
    :class:`~starpo.judges.base.PairwiseJudge` False); a class without one is pointwise
    when it has a ``score`` method."""
    if name in BUILTIN:
        return BUILTIN[name].pointwise
    cls = extensions.load(name, "judge")
    declared = getattr(cls, "pointwise", None)
    if isinstance(declared, bool):
        return declared
    return callable(getattr(cls, "score", None))


def stage_kind(name: str) -> str | None:
    """The stage kind a built-in judge loads its model from (None: any path, or none)."""
    kind = BUILTIN.get(name)
    return kind.stage_kind if kind else None
