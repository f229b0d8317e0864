"""The one way a recipe names code of its own: ``module:attribute``, imported from the
user's environment (nothing is downloaded; ``trust_remote_code`` is not involved). Losses
(:mod:`starpo.losses`), online pair rules (:mod:`starpo.pair_rules`) and judges
(:mod:`starpo.judges`) resolve their import paths here.

This module imports no torch: recipes validate through it."""

from __future__ import annotations

import importlib

from starpo.errors import RecipeError


def is_import_path(name: str) -> bool:
    return ":" in name


def load(path: str, what: str):
    """The attribute ``path`` (``module:attribute``) names; ``what`` names it in the one
    error line when the module or the attribute cannot be imported."""
    mod_name, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as err:
        raise RecipeError(f"{what} {path!r}: cannot import it ({err}); the module must be "
                          "importable in this environment") from None
