"""Every recipe shipped in recipes/ validates and plans (the GPU recipes cannot run here:
they need the hub; their schema and stage wiring are still checked); every sweep file
there expands into trials."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from starpo.run import pipeline
from starpo.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
# a recipe's expected results (<stem>.expected.yaml, `starpo run --check`) are not recipes
FILES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml")
               if not p.name.endswith(".expected.yaml"))
SWEEPS = [p for p in FILES if "methods" in (yaml.safe_load(p.read_text()) or {})]
RECIPES = [p for p in FILES if p not in SWEEPS]


def test_recipes_are_shipped():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert {"quickstart.yaml", "lion/gemma-2b.yaml", "lion/llama-3-8b.yaml",
            "hitchhiker/phi-3-medium.yaml"} <= names
    assert {p.relative_to(ROOT / "recipes").as_posix() for p in SWEEPS} >= {
        "hitchhiker/cpu-sweep.yaml", "hitchhiker/phi-3-medium-sweep.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_file_passes_the_cli_dry_run(path, tmp_path):
    """``starpo run X --dry-run`` / ``starpo sweep X --dry-run`` as a user types them."""
    from typer.testing import CliRunner
    from starpo.cli import app
    cmd = "sweep" if path in SWEEPS else "run"
    res = CliRunner().invoke(app, [cmd, str(path), "--out", str(tmp_path / "o"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "to run" in res.output
    assert not (tmp_path / "o").exists()        # a dry run writes nothing


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_recipe_validates_and_plans(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.stages
    steps = pipeline.plan(recipe, tmp_path, None)
    assert [s[0] for s in steps] == [st.name for st in recipe.stages]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_sweep_file_expands(path):
    from starpo.run.sweep import load_sweep
    assert load_sweep(path).trials


def test_lion_recipes_follow_the_paper():
    g = load_recipe(ROOT / "recipes/lion/gemma-2b.yaml")
    lm = load_recipe(ROOT / "recipes/lion/llama-3-8b.yaml")
    for r in (g, lm):
        sft = r.stage("sft")
        assert sft.packing.mode == "concat" and sft.packing.max_length == 8192
        assert sft.packing.loss_masking and sft.train.lr == 2e-5
        assert r.stage("dpo").reference_cache and r.stage("dpo").train.lr == 5e-7
        assert r.stage("online").n_samples == 5 and r.stage("online").generation.temperature == 0.8
    assert (g.stage("dpo").beta, g.stage("sft").train.epochs) == (0.05, 3)
    assert (lm.stage("dpo").beta, lm.stage("sft").train.epochs) == (0.01, 1)
    assert lm.stage("dpo").max_prompt_length == 1024


def test_phi_3_medium_recipe_follows_the_guide():
    r = load_recipe(ROOT / "recipes/hitchhiker/phi-3-medium.yaml")
    assert r.model.name_or_path == "microsoft/Phi-3-medium-4k-instruct"
    for name in ("sft", "dpo"):
        st = r.stage(name)
        src = st.data.sources[0]
        assert src.path == "PKU-Alignment/PKU-SafeRLHF" and src.safety_filter
        # global batch 256 on 8 GPUs
        assert st.train.batch_size * st.train.grad_accum * 8 == 256
    ev = r.stage("eval")
    assert ev.data.sources[0].path == "Anthropic/hh-rlhf" and ev.data.sources[0].split == "test"
    assert ev.judge.path == "OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5"
    assert ev.judge.input_format == "openassistant"
    assert ev.generation.max_new_tokens == 256
    from starpo.run.sweep import load_sweep
    sw = load_sweep(ROOT / "recipes/hitchhiker/phi-3-medium-sweep.yaml")
    assert {t.method for t in sw.trials} == {"dpo", "ln_dpo", "simpo", "ipo"}
