"""Stage runners: each takes (RunContext, stage config) and returns a summary dict."""

import importlib
import importlib.util


def register_all(registry: dict) -> None:
    from starpo.stages.dpo import run_dpo
    from starpo.stages.sft import run_sft
    registry["sft"] = run_sft
    registry["dpo"] = run_dpo
    # stages whose modules are optional in a partial checkout register when present
    for kind, mod, fn in (("reward", "starpo.stages.reward", "run_reward"),
                          ("online", "starpo.stages.online", "run_online"),
                          ("eval", "starpo.stages.eval", "run_eval")):
        if importlib.util.find_spec(mod) is not None:
            registry[kind] = getattr(importlib.import_module(mod), fn)
