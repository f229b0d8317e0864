"""Judges score responses to prompts (higher is better); the online stage ranks samples
with one, the eval stage scores every model with one.

Built-in judges (``type:`` of a recipe's ``judge``; :data:`BUILDERS` below makes them):

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

What a recipe checks about a judge ``type`` (known? pointwise? which stage kind it loads)
is in :mod:`starpo.judge_kinds`, which the recipe imports instead of this package.
"""

from __future__ import annotations

import inspect
from typing import Callable

from starpo import extensions
from starpo.errors import StarpoError

__all__ = ["BUILDERS", "PAIRRM_NAMES", "make_judge"]

PAIRRM_NAMES = {"pairrm", "PairRM", "llm-blender/PairRM"}


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
    if spec.type in BUILDERS:
        return BUILDERS[spec.type](spec, path, model_spec, device)
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


def _build_reward_model(spec, path, model_spec, device):
    from starpo.judges.reward_model import RewardModelJudge
    if not path:
        raise StarpoError("judge.path: a reward_model judge needs the path (or stage name) "
                          "of a sequence-classification checkpoint")
    return RewardModelJudge(str(path), input_format=spec.input_format,
                            batch_size=spec.batch_size, device=device, model_spec=model_spec)


def _build_pairwise_rm(spec, path, model_spec, device):
    from starpo.judges.pairwise_rm import PairwiseRMJudge
    if not path:
        raise StarpoError("judge.path: a pairwise_rm judge needs the name of a pairwise_rm "
                          "stage (or that stage's model/ directory)")
    if spec.input_format != "chat_template":
        raise StarpoError("judge.input_format: a pairwise_rm judge reads its stage's layout "
                          "with the chat template; leave input_format unset")
    return PairwiseRMJudge(str(path), batch_size=spec.batch_size, device=device,
                           model_spec=model_spec)


# one builder per built-in judge of starpo.judge_kinds.BUILTIN: (spec, path, model_spec,
# device) -> judge; each imports its judge's module when called (torch, transformers)
BUILDERS: dict[str, Callable] = {
    "gold": _build_gold, "reward_model": _build_reward_model,
    "pairwise_rm": _build_pairwise_rm, "pairwise": _build_pairrm,
    "world_labeler": _build_world_labeler,
}
