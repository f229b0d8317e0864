"""Loading a recipe: YAML → typed :class:`~starpo.recipe.schema.Recipe`.

Unknown keys and wrong types fail with the key's dotted path (``stages.1.train.lr``).
Command-line overrides ``key.path=value`` are applied to the raw YAML tree before
validation, so they are checked exactly like keys written in the file. List items are
addressed by index or, for stages, by name: ``stages.dpo.beta=0.3``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from starpo.errors import RecipeError
from starpo.recipe.schema import STAGE_TYPES, Recipe


def _parse_value(text: str) -> Any:
    """Parse an override value with YAML rules (numbers, bools, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``a.b.c``; stages may be named instead of indexed."""
    keys = dotted.split(".")
    node: Any = tree
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        path = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            idx = None
            if key.lstrip("-").isdigit():
                idx = int(key)
            else:  # address a stage (or any named list item) by its name or type
                for j, item in enumerate(node):
                    if isinstance(item, dict) and key in (item.get("name"), item.get("type")):
                        idx = j
                        break
            if idx is None or not -len(node) <= idx < len(node):
                raise RecipeError(f"override {dotted}: no list item {key!r} at {path}")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
        else:
            raise RecipeError(f"override {dotted}: {'.'.join(keys[:depth])} is not a mapping")


def _format_validation(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # drop pydantic's discriminator tags ("sft", "dpo", ...) that follow a stage index
        clean = []
        for j, p in enumerate(loc):
            if j > 0 and loc[j - 1].isdigit() and clean and clean[0] == "stages" and \
                    p in STAGE_TYPES:
                continue
            clean.append(p)
        where = ".".join(clean) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = e["msg"]
        lines.append(f"{origin}: {where}: {msg}")
    return "\n".join(lines)


def recipe_from_dict(tree: dict, origin: str = "recipe",
                     overrides: list[str] | None = None) -> Recipe:
    tree = copy.deepcopy(tree)
    for ov in overrides or []:
        if "=" not in ov:
            raise RecipeError(f"override {ov!r} must look like key.path=value")
        key, value = ov.split("=", 1)
        apply_override(tree, key.strip(), _parse_value(value))
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(_format_validation(err, origin)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping with a 'stages' list")
    recipe = recipe_from_dict(tree, origin=str(path), overrides=overrides)
    if recipe.name is None:
        recipe.name = path.stem
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
