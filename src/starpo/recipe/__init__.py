"""The recipe: its typed schema (:mod:`.schema`) and how YAML becomes one (:mod:`.load`)."""

from starpo.recipe.load import (apply_override, dump_recipe, load_recipe,  # noqa: F401
                                recipe_from_dict)
from starpo.recipe.schema import *  # noqa: F401,F403
from starpo.recipe.schema import STAGE_SPECS, STAGE_TYPES, stage_spec  # noqa: F401
