"""Stage runners: each takes (RunContext, stage config) and returns a summary dict."""


def register_all(registry: dict) -> None:
    from starpo.stages.sft import run_sft
    registry["sft"] = run_sft
    try:  # later stages register when their modules exist
        from starpo.stages.dpo import run_dpo
        registry["dpo"] = run_dpo
    except ImportError:
        pass
    try:
        from starpo.stages.reward import run_reward
        registry["reward"] = run_reward
    except ImportError:
        pass
    try:
        from starpo.stages.online import run_online
        registry["online"] = run_online
    except ImportError:
        pass
    try:
        from starpo.stages.evaluate import run_eval
        registry["eval"] = run_eval
    except ImportError:
        pass
