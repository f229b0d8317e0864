"""Every metric name starpo writes, in one place (the contract: README "Metrics").

The evaluation writes ``EVAL_METRICS`` (and ``EVAL_EXTRA``) per model to
``eval/summary.json``, each with ``<name>_ci`` (a bootstrap 95% interval); training stages
log ``TRAIN_METRICS`` (all) and ``PREFERENCE_METRICS`` (preference and reward stages) to
``metrics.jsonl``. The sweep analysis, the report's columns and curves, and the sweep
file's ``analysis.metric`` are derived from these tuples.
"""

EVAL_METRICS = ("mean_score", "win_vs_chosen", "win_vs_sft", "kl_vs_sft",
                "kl_vs_sft_per_token", "mean_length")
# per-model values that also get an interval: tie shares of the win rates, and the share
# of responses that ended with the end-of-turn token (not cut at max_new_tokens)
EVAL_EXTRA = ("tie_vs_chosen", "tie_vs_sft", "finished_rate")
# metrics a method wants high; the others (KL, length) describe a model, they are no goal
HEADLINE_METRICS = ("mean_score", "win_vs_chosen", "win_vs_sft")

TRAIN_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s")
PREFERENCE_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy",
                      "logp_chosen", "logp_rejected", "token_prob_margin", "len_chosen",
                      "len_rejected")
