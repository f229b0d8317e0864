"""The metric names of the documented contract (README "Metrics"), as constants for the
code that validates against them (a sweep file's ``analysis.metric``) or lists them.

They are derived from :mod:`starpo.metrics.registry`, where every evaluation metric is
defined; code that runs after import (the evaluation, the reports, the sweep) reads the
registry itself. Training stages log their own keys to ``metrics.jsonl`` (README
"Metrics"; the preference ones: :func:`starpo.train.preference.pair_metrics`).
"""

from starpo.metrics.registry import headline_names, sweep_names

# mean_score, win_vs_chosen, win_vs_sft, kl_vs_sft, kl_vs_sft_per_token, mean_length
EVAL_METRICS = sweep_names()
# the ones a method wants high (what "best" may mean); KL and length describe a model
HEADLINE_METRICS = headline_names()
