"""The stage registry: one module per stage kind, each with a runner
``run_<kind>(ctx, stage) -> summary dict``. The kinds themselves (their recipe sections and
traits) are :data:`starpo.recipe.schema.STAGE_SPECS`; adding a kind is a spec class there
and a runner here."""

from __future__ import annotations

from typing import Callable

from starpo.recipe import STAGE_TYPES, stage_spec
from starpo.stages.dpo import run_dpo
from starpo.stages.eval import run_eval
from starpo.stages.online import run_online
from starpo.stages.pairwise_rm import run_pairwise_rm
from starpo.stages.reward import run_reward
from starpo.stages.sft import run_sft

RUNNERS: dict[str, Callable] = {"sft": run_sft, "dpo": run_dpo, "reward": run_reward,
                                "pairwise_rm": run_pairwise_rm, "online": run_online,
                                "eval": run_eval}
if set(RUNNERS) != set(STAGE_TYPES):   # a kind without a runner (or the reverse) is a bug
    raise ImportError(f"stage runners {sorted(RUNNERS)} do not match the recipe's stage "
                      f"kinds {sorted(STAGE_TYPES)}")


def runner(kind: str) -> Callable:
    stage_spec(kind)        # an unknown kind: the recipe's one error for it
    return RUNNERS[kind]
