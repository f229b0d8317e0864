"""The recipe: its typed schema (:mod:`.schema`), how YAML becomes one (:mod:`.load`) and
the links between its stages (:mod:`.graph`)."""

# the package's public names (re-exported)
from starpo.recipe.load import (apply_override, dump_recipe, load_recipe,  # noqa: F401
                                recipe_from_dict)
from starpo.recipe.schema import (  # noqa: F401
    DPOStage, DataSpec, EvalStage, GenerationSpec, JudgeSpec, LoggingSpec,
    ModelSpec, OnlineStage, PackingSpec, PreferenceSpec, Recipe, RewardStage,
    SFTStage, STAGE_SPECS, STAGE_TYPES, SourceSpec, Stage, StageBase, Strict,
    TRACKERS, TinyModelSpec, Tracker, TrainSpec, WorldSpec, is_default, stage_spec
)
