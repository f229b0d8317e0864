"""The stage registry: one module per stage kind, each with a runner
``run_<kind>(ctx, stage) -> summary dict``. The kinds themselves (their recipe sections and
traits) are :data:`starpo.recipe.schema.STAGE_SPECS`; adding a kind is a spec class there
and a runner here."""

from __future__ import annotations

from typing import Callable

from starpo.errors import RecipeError
from starpo.recipe import STAGE_TYPES
from starpo.stages.dpo import run_dpo
from starpo.stages.eval import run_eval
from starpo.stages.online import run_online
from starpo.stages.reward import run_reward
from starpo.stages.sft import run_sft

RUNNERS: dict[str, Callable] = {"sft": run_sft, "dpo": run_dpo, "reward": run_reward,
                                "online": run_online, "eval": run_eval}
if set(RUNNERS) != set(STAGE_TYPES):   # a kind without a runner (or the reverse) is a bug
    raise ImportError(f"stage runners {sorted(RUNNERS)} do not match the recipe's stage "
                      f"kinds {sorted(STAGE_TYPES)}")


def runner(kind: str) -> Callable:
    try:
        return RUNNERS[kind]
    except KeyError:
        raise RecipeError(f"unknown stage type {kind!r}; expected one of "
                          f"{', '.join(RUNNERS)}") from None
