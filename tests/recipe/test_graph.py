"""The links between stages (starpo.recipe.graph): edges from the declared refs, implicit
starting models, the SFT reference and default models of an eval stage, rewriting for the
sweep, the checkpoint resolver, and the one-line errors for impossible links."""

from __future__ import annotations

import pytest

from starpo.errors import RecipeError, StarpoError
from starpo.recipe import graph, recipe_from_dict
from starpo.recipe.graph import BASE, Edge

DATA = {"sources": [{"path": "world:preference", "n": 8}]}


def _recipe(*stages, model="tiny"):
    return recipe_from_dict({"model": {"name_or_path": model},
                             "stages": [{"data": DATA, **st} if st["type"] != "eval" else st
                                        for st in stages]})


# sft → dpo (its reference named) → rm (a reward model, not a policy) → online judged by
# rm → eval: every kind of link the schema declares
FULL = ({"type": "sft"}, {"type": "dpo", "reference": "sft"},
        {"type": "reward", "name": "rm", "model": "sft"},
        {"type": "online", "judge": {"path": "rm"}}, {"type": "eval"})


def test_edges_come_from_the_declared_refs_with_their_defaults():
    r = _recipe(*FULL)
    assert graph.edges(r) == [
        Edge("sft", "model", BASE, implicit=True),
        Edge("dpo", "model", "sft", implicit=True),
        Edge("dpo", "reference", "sft"),
        Edge("rm", "model", "sft"),
        Edge("online", "model", "dpo", implicit=True),    # rm is no policy: skipped
        Edge("online", "judge.path", "rm"),
        Edge("eval", "models", "sft", implicit=True),
        Edge("eval", "models", "dpo", implicit=True),
        Edge("eval", "models", "online", implicit=True),
        Edge("eval", "sft", "sft", implicit=True),
    ]
    # an unset reference means the starting model: no edge of its own
    assert [e.field for e in graph.edges(r, r.stage("online"))] == ["model", "judge.path"]
    # stage_edges leaves out the base model and paths
    assert Edge("sft", "model", BASE, implicit=True) not in graph.stage_edges(r)
    p = _recipe({"type": "sft", "model": "/ckpt/start"}, {"type": "eval"})
    assert graph.edges(p, p.stage("sft")) == [Edge("sft", "model", "/ckpt/start")]
    assert graph.stage_edges(p, p.stage("sft")) == []


def test_implicit_model_is_the_previous_policy_stage_else_base():
    r = _recipe(*FULL)
    assert [graph.implicit_model(r, n) for n in ("sft", "dpo", "rm", "online")] == \
        [BASE, "sft", "dpo", "dpo"]
    assert graph.implicit_model(r, None) == "online"     # outside the recipe: after all
    assert graph.starting_model(r, r.stage("rm")) == "sft"          # set: as set
    assert graph.starting_model(r, r.stage("online")) == "dpo"
    assert graph.starting_model(r, r.stage("eval")) is None         # starts from no model


def test_sft_reference_follows_the_declared_trait():
    r = _recipe(*FULL)
    assert graph.sft_reference(r, r.stage("eval")) == "sft"
    two = _recipe({"type": "dpo", "name": "d"}, {"type": "sft", "name": "a"},
                  {"type": "sft", "name": "b"}, {"type": "eval", "sft": "b"})
    assert graph.sft_reference(two) == "a"                           # the first sft stage
    assert graph.sft_reference(two, two.stage("eval")) == "b"        # the eval stage's own
    assert graph.sft_reference(_recipe({"type": "dpo"}, {"type": "eval"})) == BASE
    # the trait, not the type name, decides
    from starpo.recipe.schema import DPOStage
    try:
        DPOStage.sft_baseline = True
        assert graph.sft_reference(two) == "d"
    finally:
        del DPOStage.sft_baseline


def test_eval_models_default_to_every_policy_stage():
    r = _recipe(*FULL)
    assert graph.eval_models(r, r.stage("eval")) == ["sft", "dpo", "online"]
    listed = _recipe({"type": "sft"}, {"type": "dpo"}, {"type": "eval", "models": ["dpo"]})
    assert graph.eval_models(listed, listed.stage("eval")) == ["dpo"]
    assert graph.edges(listed, listed.stage("eval"))[0] == Edge("eval", "models", "dpo")


def test_rewrite_points_links_at_the_replaced_stages_checkpoints():
    r = _recipe(*FULL)
    sft, rm = "/x/shared/sft/model", "/x/shared/rm/model"
    t = graph.rewrite(r, {"sft": sft, "rm": rm})
    by = {s.name: s for s in t.stages}
    assert list(by) == ["dpo", "online", "eval"]
    assert by["dpo"].model == sft and by["dpo"].reference == sft
    assert by["online"].model == "dpo" and by["online"].judge.path == rm
    # the replaced SFT reference is evaluated from its checkpoint and keeps its name
    assert by["eval"].models == [sft, "dpo", "online"] and by["eval"].sft == "sft"
    # the original is untouched, and the rewritten recipe resolves to the same things
    assert r.stage("dpo").model is None and len(r.stages) == 5
    assert graph.starting_model(t, by["online"]) == graph.starting_model(r, r.stage("online"))
    # nothing replaced: defaults that depend on other stages are written out all the same
    same = graph.rewrite(r, {})
    assert [s.model for s in same.stages if s.type != "eval"] == [BASE, "sft", "sft", "dpo"]
    assert same.stage("eval").models == ["sft", "dpo", "online"] and \
        same.stage("eval").sft is None
    with pytest.raises(RecipeError, match="no stage named 'sfft'"):
        graph.rewrite(r, {"sfft": "/x/sfft/model"})
    with pytest.raises(ValueError, match="not a run directory's sft/model"):
        graph.rewrite(r, {"sft": "/x/elsewhere"})


@pytest.mark.parametrize("stages, needle", [
    (({"type": "sft"}, {"type": "dpo", "model": "later"}, {"type": "sft", "name": "later"}),
     "recipe: stages.dpo.model: stage 'later' comes after 'dpo', so its model does not "
     "exist yet when 'dpo' runs; put 'later' before 'dpo'"),
    (({"type": "dpo", "reference": "sft"}, {"type": "sft"}),
     "stages.dpo.reference: stage 'sft' comes after 'dpo'"),
    (({"type": "online", "judge": {"path": "rm"}}, {"type": "reward", "name": "rm"}),
     "stages.online.judge.path: stage 'rm' comes after 'online'"),
    (({"type": "sft"}, {"type": "eval", "models": ["sft", "dpo"]}, {"type": "dpo"}),
     "stages.eval.models: stage 'dpo' comes after 'eval'"),
    (({"type": "dpo", "model": "dpo"},), "stages.dpo.model: stage 'dpo' names itself"),
    (({"type": "sft"}, {"type": "dpo", "model": "sftt"}),
     "stages.dpo.model: 'sftt' is neither a stage of this recipe nor an existing directory; "
     "did you mean `sft`?"),
    (({"type": "sft", "name": "base"},), "stages.0.name: 'base' names the recipe's starting"),
])
def test_impossible_links_fail_validation_with_one_line(stages, needle):
    with pytest.raises(RecipeError) as err:
        _recipe(*stages)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_paths_and_hub_ids_are_not_taken_for_misspelt_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sftt").mkdir()                 # a directory of that name: meant as a path
    for ref in ("sftt", "org/sft", "/ckpt/sft", "./sft", BASE, "gpt2"):
        assert _recipe({"type": "sft"}, {"type": "dpo", "model": ref}).stage("dpo").model == ref
    # an eval stage's sft names an evaluated model (a checkpoint's name), and a judge reads
    # its own path: both are free
    assert _recipe({"type": "dpo"}, {"type": "eval", "sft": "sftx"}).stage("eval").sft == "sftx"
    pw = _recipe({"type": "pairwise_rm"}, {"type": "online",
                                           "judge": {"type": "pairwise", "path": "pairrm"}})
    assert pw.stage("online").judge.path == "pairrm"


def test_checkpoint_resolves_a_link_in_a_run_directory(tmp_path):
    r = _recipe(*FULL)
    with pytest.raises(StarpoError) as err:
        graph.checkpoint(r, "sft", tmp_path, needed_by="dpo")
    assert str(err.value) == (f"stage 'dpo' needs the model of stage 'sft', which has not "
                              f"been trained yet ({tmp_path / 'sft' / 'model'} missing); run "
                              f"it first (--stages sft,dpo)")
    (tmp_path / "sft" / "model").mkdir(parents=True)
    (tmp_path / "sft" / "model" / "config.json").write_text("{}")
    assert graph.checkpoint(r, "sft", tmp_path, needed_by="dpo") == str(tmp_path / "sft" / "model")
    assert graph.checkpoint(r, None, tmp_path, needed_by="dpo") == str(tmp_path / "sft" / "model")
    assert graph.checkpoint(r, "/ckpt", tmp_path) == "/ckpt"
    assert graph.checkpoint(r, BASE, tmp_path) == str(tmp_path / "base" / "model")
    assert graph.checkpoint(r, None, tmp_path, needed_by="sft", base=lambda: "built") == "built"
    hub = _recipe({"type": "sft"}, model="org/model")
    assert graph.checkpoint(hub, BASE, tmp_path) == "org/model"


def test_judges_of_the_eval_and_online_stages_resolve_alike(tmp_path):
    """Both judges resolve judge.path with the run's resolver: a stage must have been
    trained (the eval stage's used to pass a missing directory on to the loader), ``base``
    is the starting model (the eval stage's used to look for a hub model "base")."""
    from starpo.run.pipeline import RunContext
    from starpo.stages import eval as eval_stage
    r = _recipe({"type": "reward", "name": "rm"},
                {"type": "online", "judge": {"path": "rm"}},
                {"type": "eval", "judge": {"type": "reward_model", "path": "rm"},
                 "data": {"sources": [{"path": "world:eval", "n": 2}]}}, model="org/model")
    ctx = RunContext(r, tmp_path, log=lambda m: None, progress=False)
    for name in ("online", "eval"):
        resolve = ctx.resolver(r.stage(name))
        with pytest.raises(StarpoError, match=f"stage '{name}' needs the model of stage 'rm'"):
            resolve("rm")
        assert resolve(BASE) == "org/model" and resolve("/judge/dir") == "/judge/dir"
    # the eval stage stops there, before loading anything
    with pytest.raises(StarpoError, match="stage 'eval' needs the model of stage 'rm', which "
                                          "has not been trained yet"):
        eval_stage.run_evaluation(ctx, r.stage("eval"), models=[str(tmp_path / "m")])
    (tmp_path / "rm" / "model").mkdir(parents=True)
    (tmp_path / "rm" / "model" / "config.json").write_text("{}")
    assert ctx.resolver(r.stage("online"))("rm") == str(tmp_path / "rm" / "model")


def test_select_and_replace_stages_give_validated_recipes():
    r = _recipe(*FULL)
    kept = graph.select(r, ["dpo", "eval"])
    assert [s.name for s in kept.stages] == ["dpo", "eval"]
    assert graph.starting_model(kept, kept.stage("dpo")) == BASE    # nothing written out
    assert kept.stage("dpo") is not r.stage("dpo")                  # copies
    with pytest.raises(RecipeError, match=r"^the recipe with stages \['sft', 'sft'\]: "
                                          r"stages\.1\.name: duplicate stage name 'sft'$"):
        graph.replace_stages(r, [r.stage("sft"), r.stage("sft").model_copy()])
