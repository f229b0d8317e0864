from starpo.losses.preference import *  # noqa: F401,F403  (registry: next commit)
from starpo.losses.preference import LOSSES, preference_loss, needs_reference, sft_loss  # noqa: F401
