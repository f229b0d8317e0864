"""Judges score responses to prompts (higher is better); the online stage ranks samples
with one, the eval stage scores every model with one.

Built-in judges (the registry below; ``type:`` of a recipe's ``judge``):

* ``gold`` (:class:`~starpo.judges.gold.GoldJudge`): the embedded world's known gold
  reward, for the CPU quickstart and as the upper bound the other judges are measured by.
* ``reward_model`` (:class:`~starpo.judges.reward_model.RewardModelJudge`): any
  ``AutoModelForSequenceClassification`` checkpoint (a reward stage of the run, a local
  directory or a hub id), rendered with its chat template or the OpenAssistant format.
* ``pairwise_rm`` (:class:`~starpo.judges.pairwise_rm.PairwiseRMJudge`): a pairwise
  preference model trained by a ``pairwise_rm`` stage of the run (``path``: that stage's
  name or its ``model/`` directory); reads the prompt and both responses at once, both
  orders averaged. Pairwise.
* ``pairwise`` (:class:`~starpo.judges.pairrm.PairRMJudge`): llm-blender's PairRM;
  compares responses, so it ranks but cannot score.
* ``world_labeler`` (:class:`~starpo.judges.world_labeler.WorldLabelerJudge`): the
  embedded world's simulated annotator (noisy, length-biased; never the gold reward
  itself), a stand-in for an AI annotator on the CPU quickstart. Pairwise.

Any other ``type`` is an importable ``module:Class``: the class is called with the judge's
``options`` as keyword arguments (plus ``path``, resolved like a built-in's, and
``device`` when its constructor takes them) and must have ``rank(prompt, candidates)``;
one with ``score(prompts, responses)`` also serves the eval stage. Subclassing
:class:`~starpo.judges.base.PointwiseJudge` (implement ``score``) or
:class:`~starpo.judges.base.PairwiseJudge` (implement ``prefer``) gives the rest.

This module imports no torch: recipes validate judge names through it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from starpo import extensions
from starpo.errors import RecipeError, StarpoError, did_you_mean


@dataclass(frozen=True)
class JudgeKind:
    name: str
    pointwise: bool                       # has a score of its own (the eval stage needs one)
    build: str                            # "module:function" making it from a spec
    # the stage kind whose model it loads: its `path` is required and, when it names a
    # stage of the recipe, that stage must be of this kind (checked when the recipe loads)
    stage_kind: str | None = None


BUILTIN = {k.name: k for k in (
    JudgeKind("gold", True, "starpo.judges:_build_gold"),
    JudgeKind("reward_model", True, "starpo.judges:_build_reward_model"),
    JudgeKind("pairwise_rm", False, "starpo.judges:_build_pairwise_rm",
              stage_kind="pairwise_rm"),
    JudgeKind("pairwise", False, "starpo.judges:_build_pairrm"),
    JudgeKind("world_labeler", False, "starpo.judges:_build_world_labeler"),
)}
PAIRRM_NAMES = {"pairrm", "PairRM", "llm-blender/PairRM"}


def check_name(name: str) -> str:
    """Recipe-time check of a judge ``type`` (imports a ``module:Class``)."""
    if name in BUILTIN:
        return name
    if ":" in name:
        cls = extensions.load(name, "judge")
        if not callable(getattr(cls, "rank", None)):
            raise RecipeError(f"judge {name!r}: a judge class needs a rank(prompt, candidates) "
                              f"method (subclass starpo.judges.base.PointwiseJudge or "
                              f"PairwiseJudge)")
        return name
    raise RecipeError(f"unknown judge type {name!r}; expected one of {', '.join(BUILTIN)} or "
                      f"an importable module:Class{did_you_mean(name, BUILTIN)}")


def is_pointwise(name: str) -> bool:
    """Whether the judge scores each response on its own (rather than only comparing)."""
    if name in BUILTIN:
        return BUILTIN[name].pointwise
    cls = extensions.load(name, "judge")
    from starpo.judges.base import PairwiseJudge
    if isinstance(cls, type) and issubclass(cls, PairwiseJudge):
        return False
    return callable(getattr(cls, "score", None))


def stage_kind(name: str) -> str | None:
    """The stage kind a built-in judge loads its model from (None: any path, or none)."""
    kind = BUILTIN.get(name)
    return kind.stage_kind if kind else None


def make_judge(spec, *, resolve_path: Callable[[str], str | None] | None = None,
               model_spec=None, device=None):
    """The judge a recipe's :class:`~starpo.recipe.schema.JudgeSpec` asks for.

    ``resolve_path`` maps ``spec.path`` (a stage name of the run, or a path / hub id) to a
    checkpoint location; it may return ``None`` to mean "not a stage, use as is".
    ``model_spec`` supplies dtype, attention implementation and ``trust_remote_code`` for a
    reward model; ``device`` is the runtime's.
    """
    path = spec.path
    if path and resolve_path is not None and path not in PAIRRM_NAMES:
        path = resolve_path(path) or path
    if spec.type in BUILTIN:
        return extensions.load(BUILTIN[spec.type].build, "judge")(spec, path, model_spec, device)
    cls = extensions.load(spec.type, "judge")
    kwargs = dict(spec.options)
    params = inspect.signature(cls).parameters
    if "path" in params and path is not None:
        kwargs.setdefault("path", str(path))
    if "device" in params:
        kwargs.setdefault("device", device)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise StarpoError(f"judge {spec.type}: {err} (judge.options are its keyword "
                          f"arguments)") from None


def _build_gold(spec, path, model_spec, device):
    from starpo.judges.gold import GoldJudge
    return GoldJudge()


def _build_world_labeler(spec, path, model_spec, device):
    from starpo.judges.world_labeler import WorldLabelerJudge
    return WorldLabelerJudge(**spec.options)


def _build_pairrm(spec, path, model_spec, device):
    from starpo.judges.pairrm import PairRMJudge
    target = path or "llm-blender/PairRM"
    if target in PAIRRM_NAMES:
        target = "llm-blender/PairRM"
    return PairRMJudge(str(target), device=device, batch_size=spec.batch_size)


def _load_kwargs(model_spec) -> dict:
    """dtype, attention implementation and trust_remote_code of the recipe's model, for a
    judge that loads a checkpoint."""
    kwargs = {}
    if model_spec is not None:
        kwargs["trust_remote_code"] = bool(getattr(model_spec, "trust_remote_code", False))
        dtype = getattr(model_spec, "dtype", None)
        if dtype and dtype != "auto":
            kwargs["dtype"] = dtype
        attn = getattr(model_spec, "attn_implementation", None)
        if attn:
            kwargs["attn_implementation"] = attn
    return kwargs


def _build_reward_model(spec, path, model_spec, device):
    from starpo.judges.reward_model import RewardModelJudge
    if not path:
        raise StarpoError("judge.path: a reward_model judge needs the path (or stage name) "
                          "of a sequence-classification checkpoint")
    return RewardModelJudge(str(path), input_format=spec.input_format,
                            batch_size=spec.batch_size, device=device,
                            **_load_kwargs(model_spec))


def _build_pairwise_rm(spec, path, model_spec, device):
    from starpo.judges.pairwise_rm import PairwiseRMJudge
    if not path:
        raise StarpoError("judge.path: a pairwise_rm judge needs the name of a pairwise_rm "
                          "stage (or that stage's model/ directory)")
    if spec.input_format != "chat_template":
        raise StarpoError("judge.input_format: a pairwise_rm judge reads its stage's layout "
                          "with the chat template; leave input_format unset")
    return PairwiseRMJudge(str(path), batch_size=spec.batch_size, device=device,
                           **_load_kwargs(model_spec))
