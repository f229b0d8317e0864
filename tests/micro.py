"""The micro model, training settings and sft → dpo recipe of the pipeline and sweep tests
(seconds per stage).

A module of its own, without conftest's side effects (it sets torch's thread count when
imported): Ray workers import the sweep tests' helpers to unpickle them, and a trial that
ran with two threads instead of the one its task was given would not give the local
executor's numbers (tests/run/test_sweep_ray.py compares them exactly)."""

TINY = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "intermediate_size": 96, "vocab_size": 400}
FAST = {"max_steps": 3, "batch_size": 4, "log_every": 1, "warmup_ratio": 0.0}


def micro_recipe(**dpo) -> dict:
    """The microscopic sft → dpo recipe (as a dict); ``dpo`` adds or replaces fields of its
    DPO stage."""
    return {
        "name": "micro", "seed": 0, "model": {"name_or_path": "tiny", "tiny": TINY},
        "stages": [
            {"type": "sft", "data": {"sources": [{"path": "world:sft", "n": 120}]},
             "packing": {"max_length": 128}, "train": {**FAST, "lr": 1e-3}},
            {"type": "dpo", "beta": 0.5, "max_length": 128, "max_prompt_length": 64,
             "data": {"sources": [{"path": "world:preference", "n": 60}], "eval_fraction": 0.2},
             "train": {**FAST, "lr": 1e-4}, **dpo},
        ]}
