"""What a run would do, read from the recipe and the run directory alone.

Kept apart from :mod:`starpo.run.pipeline` (which imports torch and every stage) so that
``starpo run --dry-run`` answers in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

from starpo.errors import RecipeError
from starpo.recipe import Recipe


def plan(recipe: Recipe, out: Path, only: list[str] | None) -> list[tuple[str, str, str]]:
    """(stage name, type, status) for every stage that the run would touch."""
    names = [s.name for s in recipe.stages]
    for n in only or []:
        if n not in names:
            raise RecipeError(f"--stages: no stage named {n!r}; the recipe has {names}")
    rows = []
    for st in recipe.stages:
        if only and st.name not in only:
            continue
        d = out / st.name
        if (d / "stage.json").is_file():
            status = "complete (skipped)"
        elif (d / "checkpoints").is_dir() and any((d / "checkpoints").glob("step_*")):
            status = "partial (resumes)"
        else:
            status = "to run"
        rows.append((st.name, st.type, status))
    return rows
