"""Loading a recipe: YAML → typed :class:`~starpo.recipe.schema.Recipe`.

Unknown keys and wrong types fail with the key's dotted path, stages by name
(``stages.dpo.train.lr``), and an unknown key or value gets the closest valid one ("did you
mean `beta`?"). Command-line overrides ``key.path=value`` are applied to the raw YAML tree
before validation, so they are checked exactly like keys written in the file. List items
are addressed by index or, for stages, by name: ``stages.dpo.beta=0.3``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from starpo.errors import RecipeError, did_you_mean
from starpo.recipe.schema import STAGE_TYPES, Recipe


def _parse_value(text: str) -> Any:
    """Parse an override value with YAML rules (numbers, bools, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _item_index(node: list, key: str) -> int | None:
    """The list item ``key`` addresses: an index, else the item whose ``name`` is ``key``,
    else the first whose ``type`` is (a stage's name defaults to its type)."""
    if key.lstrip("-").isdigit():
        idx = int(key)
        return idx if -len(node) <= idx < len(node) else None
    for field in ("name", "type"):
        for j, item in enumerate(node):
            if isinstance(item, dict) and item.get(field) == key:
                return j
    return None


def _item_labels(node: list) -> list[str]:
    return [str(item.get("name") or item.get("type")) for item in node
            if isinstance(item, dict) and (item.get("name") or item.get("type"))]


def apply_override(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``a.b.c``; stages may be named instead of indexed."""
    keys = dotted.split(".")
    node: Any = tree
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        path = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            idx = _item_index(node, key)
            if idx is None:
                labels = _item_labels(node)
                known = (f"; there are {', '.join(labels)}{did_you_mean(key, labels)}"
                         if labels else f"; the list has {len(node)} items")
                raise RecipeError(f"override {dotted}: no list item {key!r} at {path}{known}")
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


def _unwrap(t: Any) -> Any:
    """``Annotated[X, …]`` → X and ``X | None`` → X."""
    while True:
        if get_origin(t) is Annotated:
            t = get_args(t)[0]
        elif get_origin(t) in (Union, UnionType) and type(None) in get_args(t) and \
                len(get_args(t)) == 2:
            t = next(a for a in get_args(t) if a is not type(None))
        else:
            return t


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class at a validation error's location (pydantic's ``loc``: field names,
    list indices, and a discriminated union's tag after a stage's index), or None."""
    t: Any = Recipe
    for part in loc:
        t = _unwrap(t)
        if _is_model(t):
            field = t.model_fields.get(str(part))
            if field is None:
                return None
            t = field.annotation
        elif get_origin(t) in (list, tuple):
            t = get_args(t)[0]
        elif get_origin(t) is dict:
            t = get_args(t)[1]
        elif get_origin(t) in (Union, UnionType):   # the stage kinds, chosen by their tag
            tagged = [m for m in get_args(t) if _is_model(m) and "type" in m.model_fields
                      and part in get_args(m.model_fields["type"].annotation)]
            if not tagged:
                return None
            t = tagged[0]
        else:
            return None
    t = _unwrap(t)
    return t if _is_model(t) else None


def _stage_label(tree: Any, idx: int) -> str:
    """How a user names stage ``idx``: its name, else its type (the name it defaults to)
    when that is a known kind and no other stage goes by it, else the index."""
    stages = tree.get("stages") if isinstance(tree, dict) else None
    if not isinstance(stages, list) or not 0 <= idx < len(stages) or \
            not isinstance(stages[idx], dict):
        return str(idx)
    st = stages[idx]
    label = st.get("name") or (st.get("type") if st.get("type") in STAGE_TYPES else None)
    if not isinstance(label, str) or _item_labels(stages).count(label) != 1:
        return str(idx)
    return label


def _where(loc: tuple, tree: Any) -> str:
    """A dotted path the user can type: stages by name, pydantic's union tag dropped."""
    parts: list[str] = []
    for j, p in enumerate(loc):
        prev = loc[j - 1] if j else None
        if j == 1 and loc[0] == "stages" and isinstance(p, int):
            parts.append(_stage_label(tree, p))
            continue
        if j == 2 and loc[0] == "stages" and isinstance(prev, int) and p in STAGE_TYPES:
            continue        # pydantic's discriminator tag ("sft", "dpo", …)
        parts.append(str(p))
    return ".".join(parts)


def _format_validation(err: ValidationError, origin: str, tree: Any = None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = _where(loc, tree) or "(top level)"
        kind = e["type"]
        msg = e["msg"]
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            msg = "unknown key" + (did_you_mean(str(loc[-1]), parent.model_fields)
                                   if parent is not None else "")
        elif kind == "union_tag_invalid":
            ctx = e.get("ctx") or {}
            msg += did_you_mean(str(ctx.get("tag")), STAGE_TYPES)
        elif kind == "literal_error" and isinstance(e.get("input"), str):
            allowed = re.findall(r"'([^']*)'", (e.get("ctx") or {}).get("expected", ""))
            msg += did_you_mean(e["input"], allowed)
        elif kind == "value_error":
            msg = msg.removeprefix("Value error, ")
            # a recipe-level check names its own key: "stages.online.judge.path: …"
            head, sep, rest = msg.partition(": ")
            if sep and where == "(top level)" and re.fullmatch(r"[\w.]+", head) and "." in head:
                where, msg = head, rest
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
        raise RecipeError(_format_validation(err, origin, tree)) from None


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
