"""Sweeps (starpo.run.sweep): the sweep file's schema and one-line errors, grid expansion,
the trial recipes that point at the shared stages, the executor's failure handling and
resume (with a stand-in runner), and one microscopic sweep end to end: 2 methods × 2
values on a tiny model, shared SFT trained once, reference cache shared, resumed, the
report written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from starpo.metrics.names import EVAL_METRICS
from starpo.run import sweep as S
from starpo.recipe import load_recipe, recipe_from_dict
from sweep_helpers import RECIPE, SWEEP, _fake_eval, load_error, write_sweep

# =========================================================================== schema / errors


def test_valid_sweep_expands_each_method_to_its_product(tmp_path):
    sw = S.load_sweep(write_sweep(tmp_path))
    assert [t.id for t in sw.trials] == ["dpo-beta0.1", "dpo-beta0.5", "simpo-gamma0.3",
                                         "simpo-gamma1"]
    t = sw.trial("simpo-gamma1")
    assert t.params == {"stages.dpo.gamma": 1.0, "stages.dpo.beta": 2.0}
    dpo = t.recipe.stage("dpo")
    assert dpo.loss == "simpo" and dpo.beta == 2.0 and dpo.gamma == 1.0
    assert sw.pref_stage == "dpo" and sw.shared == ["sft"]
    assert len({t.config_hash for t in sw.trials}) == 4


@pytest.mark.parametrize("changes, needle", [
    ({"metods": {}}, "metods: unknown key"),
    ({"methods": {"dpoo": {}}}, "methods.dpoo: unknown method 'dpoo'"),
    ({"methods": {}}, "methods: "),
    ({"methods": {"dpo": {"stages.dpo.betta": [0.1]}}},
     "methods.dpo.stages.dpo.betta: stages.dpo.betta: unknown key; did you mean `beta`?"),
    ({"methods": {"dpo": {"stages.dpo.beta": [0.1, -1]}}},
     "methods.dpo.stages.dpo.beta: value -1: stages.dpo.beta: Input should be greater than 0"),
    ({"methods": {"dpo": {"stages.ppo.beta": [0.1]}}},
     "methods.dpo.stages.ppo.beta: override stages.ppo.beta: no list item 'ppo'"),
    ({"methods": {"dpo": {"stages.dpo.beta": []}}},
     "methods.dpo.stages.dpo.beta: an empty list of values"),
    ({"methods": {"dpo": {"stages.sft.train.lr": [1e-3, 1e-4]}}},
     "methods.dpo.stages.sft.train.lr: sets the shared stage 'sft'"),
    ({"methods": {"dpo": {"stages.dpo.loss": ["ipo"]}}}, "the method name sets the loss"),
    ({"methods": {"ipo": {"stages.dpo.label_smoothing": [0.1]}}},
     "label_smoothing: not defined for the ipo loss"),
    ({"shared": ["rm"]}, "shared: no stage named 'rm'"),
    ({"shared": ["eval"]}, "shared: 'eval' is an eval stage"),
    ({"shared": ["dpo"]}, "shared: 'dpo' is the preference stage"),
    ({"stages": ["dpo", "evil"]}, "stages: no stage named 'evil'"),
    ({"stages": ["sft", "dpo"]}, "the trials have no eval stage"),
    ({"preference_stage": "sft"}, "preference_stage: 'sft' is not a dpo or online stage"),
    ({"overrides": {"stages.dpo.train.lrr": 1}},
     "the recipe micro.yaml with the sweep's overrides: stages.dpo.train.lrr: unknown key"),
    ({"recipe": "nope.yaml"}, "recipe: nope.yaml not found"),
    ({"analysis": {"top_k_percent": 0}}, "analysis.top_k_percent: Input should be greater"),
    ({"analysis": {"reference_method": "ipo"}}, "analysis.reference_method: 'ipo' is not one"),
])
def test_bad_sweep_files_fail_with_one_line_naming_file_and_key(tmp_path, changes, needle):
    assert needle in load_error(tmp_path, **changes)


def test_a_shared_stage_must_not_need_an_unshared_one(tmp_path):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"].insert(2, {"type": "reward", "model": "dpo", "max_length": 128,
                                "data": {"sources": [{"path": "world:preference", "n": 20}]}})
    path = write_sweep(tmp_path, {**SWEEP, "shared": ["sft", "reward"]}, recipe)
    with pytest.raises(S.SweepError, match=r"shared: stage 'reward' needs 'dpo' \(model\)"):
        S.load_sweep(path)


def test_a_kept_stage_must_not_need_a_stage_left_out(tmp_path):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][1]["reference"] = "sft"
    path = write_sweep(tmp_path, {**SWEEP, "shared": [], "stages": ["dpo", "eval"]}, recipe)
    with pytest.raises(S.SweepError, match=r"stages: stage 'dpo' needs 'sft' \(reference\), "
                                           r"which the sweep leaves out"):
        S.load_sweep(path)
    # an implicit starting model is not a need: without sft, dpo starts from the base model
    sw = S.load_sweep(write_sweep(tmp_path, {**SWEEP, "shared": [], "stages": ["dpo", "eval"]}))
    plan = S.make_plan(sw, tmp_path / "out")
    assert plan.trials[0][1].stage("dpo").model == "base"


def test_command_line_overrides_apply_to_every_trial(tmp_path):
    sw = S.load_sweep(write_sweep(tmp_path), ["stages.dpo.train.max_steps=7"])
    assert all(t.recipe.stage("dpo").train.max_steps == 7 for t in sw.trials)
    with pytest.raises(S.SweepError, match="must look like key.path=value"):
        S.load_sweep(write_sweep(tmp_path), ["nonsense"])


def test_cli_prints_one_line_and_exit_code_2_for_a_bad_sweep(tmp_path):
    path = write_sweep(tmp_path, {**SWEEP, "methods": {"dpo": {"stages.dpo.betta": [1]}}})
    p = subprocess.run([sys.executable, "-m", "starpo.cli", "sweep", str(path), "--dry-run"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr, p.stderr
    assert "methods.dpo.stages.dpo.betta" in p.stderr and str(path) in p.stderr


# =========================================================================== expansion / ids


def test_ids_use_the_shortest_unambiguous_key_names_and_stay_unique():
    assert S.short_names(["stages.dpo.beta", "stages.dpo.train.lr", "stages.sft.train.lr"]) == \
        {"stages.dpo.beta": "beta", "stages.dpo.train.lr": "dpo.train.lr",
         "stages.sft.train.lr": "sft.train.lr"}
    grid = {"dpo": {"stages.dpo.train.lr": [5e-5, 1.5e-4], "stages.dpo.beta": [0.1],
                    "seed": [0, True]},
            "ipo": {}}
    got = S.expand(grid)
    assert [g[2] for g in got] == ["dpo-lr5e-05-seed0", "dpo-lr5e-05-seedtrue",
                                   "dpo-lr0.00015-seed0", "dpo-lr0.00015-seedtrue", "ipo"]
    assert got[0][1] == {"stages.dpo.train.lr": 5e-5, "stages.dpo.beta": 0.1, "seed": 0}
    # values that print alike get a suffix instead of sharing a directory
    clash = S.expand({"dpo": {"stages.dpo.beta": [0.1, 0.1000000001]}})
    assert [c[2] for c in clash] == ["dpo-beta0.1", "dpo-beta0.1-2"]


def test_trial_recipes_point_at_the_shared_checkpoints(tmp_path):
    sw = S.load_sweep(write_sweep(tmp_path))
    plan = S.make_plan(sw, tmp_path / "out")
    shared_sft = str((tmp_path / "out").resolve() / "shared" / "sft" / "model")
    # the shared run: sft, then an evaluation of the SFT model alone (the baseline)
    assert [s.name for s in plan.shared.stages] == ["sft", "eval"]
    ev = plan.shared.stages[1]
    assert ev.models == ["sft"] and ev.sft == "sft"
    trial, rec = plan.trials[0]
    assert [s.name for s in rec.stages] == ["dpo", "eval"]
    dpo, ev = rec.stages
    assert dpo.model == shared_sft and dpo.reference is None   # the reference = the start
    assert ev.models == [shared_sft, "dpo"] and ev.sft == "sft"
    assert rec.name == "micro-sweep-dpo-beta0.1"


def test_implicit_starting_models_are_written_out():
    data = {"sources": [{"path": "world:sft"}]}
    rec = recipe_from_dict({"stages": [
        {"name": "sft", "type": "sft", "data": data}, {"name": "a", "type": "dpo", "data": data},
        {"name": "rm", "type": "reward", "model": "sft", "data": data},
        {"name": "b", "type": "online", "judge": {"path": "rm"}, "data": data},
        {"name": "eval", "type": "eval"}]})
    t = S.trial_recipe(rec, ["sft", "rm"], Path("/x/shared"))
    by = {s.name: s for s in t.stages}
    assert list(by) == ["a", "b", "eval"]
    assert by["a"].model == "/x/shared/sft/model"
    assert by["b"].model == "a"                             # was implicit: the previous
    assert by["b"].judge.path == "/x/shared/rm/model"
    assert by["eval"].models == ["/x/shared/sft/model", "a", "b"]
    assert by["eval"].sft == "sft"


# =========================================================================== executor


def _no_shared(tmp: Path) -> S.SweepPlan:
    path = write_sweep(tmp, {**SWEEP, "shared": []})
    return S.make_plan(S.load_sweep(path), tmp / "out")


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on_then_resume_skips(tmp_path):
    from starpo.errors import TrainingError
    plan = _no_shared(tmp_path)
    calls = []

    def runner(recipe, tdir):
        calls.append(tdir.name)
        assert (tdir / "recipe.yaml").is_file()        # a user can rerun it with starpo run
        if tdir.name == "dpo-beta0.5":
            raise TrainingError("loss is NaN at step 2; the last good checkpoint is kept")
        if tdir.name == "simpo-gamma0.3":
            raise RuntimeError("CUDA out of memory\nmore detail")
        _fake_eval(tdir, score=len(calls))

    logs: list[str] = []
    recs = S.run_sweep(plan, runner=runner, log=logs.append)
    assert calls == ["dpo-beta0.1", "dpo-beta0.5", "simpo-gamma0.3", "simpo-gamma1"]
    by = {r["id"]: r for r in recs}
    assert by["dpo-beta0.1"]["status"] == "ok" and by["dpo-beta0.1"]["metrics"][
        "mean_score"] == 1
    assert by["dpo-beta0.5"] == {**by["dpo-beta0.5"], "status": "failed", "error":
                                 "loss is NaN at step 2; the last good checkpoint is kept"}
    assert by["simpo-gamma0.3"]["error"] == "RuntimeError: CUDA out of memory"
    assert by["simpo-gamma1"]["sft"]["mean_score"] == -1.0
    assert by["simpo-gamma1"]["eval_file"] == "trials/simpo-gamma1/eval/dpo.jsonl"
    assert set(by["simpo-gamma1"]["metrics"]) == set(EVAL_METRICS)
    assert any("FAILED" in line and "dpo-beta0.5" in line for line in logs)

    # resume: nothing runs again; failed trials only with retry_failed
    calls.clear()
    S.run_sweep(plan, runner=runner, log=logs.append)
    assert calls == []
    recs = S.run_sweep(plan, runner=runner, log=logs.append, retry_failed=True)
    assert calls == ["dpo-beta0.5", "simpo-gamma0.3"]
    lines = (plan.out / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 6 and len(recs) == 4          # the last line of an id wins

    # a deleted trial directory is run again
    calls.clear()
    shutil.rmtree(plan.out / "trials" / "simpo-gamma1")
    S.run_sweep(plan, runner=runner, log=logs.append)
    assert calls == ["simpo-gamma1"]


def test_an_unexpected_error_propagates_with_raise_errors(tmp_path):
    plan = _no_shared(tmp_path)

    def runner(recipe, tdir):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        S.run_sweep(plan, runner=runner, log=lambda m: None, raise_errors=True)


def test_parallel_slots_run_every_trial_once(tmp_path):
    plan = _no_shared(tmp_path)
    seen = []

    def runner(recipe, tdir):
        seen.append(tdir.name)
        _fake_eval(tdir, 0.5)

    recs = S.run_sweep(plan, runner=runner, jobs=3, log=lambda m: None)
    assert sorted(seen) == sorted(t.id for t, _ in plan.trials)
    assert [r["id"] for r in recs] == [t.id for t, _ in plan.trials]    # the plan's order
    assert all(r["status"] == "ok" for r in recs)


def test_a_missing_evaluation_fails_the_trial(tmp_path):
    plan = _no_shared(tmp_path)
    recs = S.run_sweep(plan, runner=lambda r, d: None, log=lambda m: None)
    assert all(r["status"] == "failed" and "summary.json" in r["error"] for r in recs)


# =========================================================================== end to end


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    path = write_sweep(tmp)
    plan = S.make_plan(S.load_sweep(path), tmp / "out")
    logs: list[str] = []
    recs = S.run_sweep(plan, log=logs.append)
    S.finalize(plan.out, log=logs.append)
    return path, plan, recs, logs


def test_every_trial_is_recorded_with_the_contract_metrics(swept):
    path, plan, recs, logs = swept
    assert [r["id"] for r in recs] == ["dpo-beta0.1", "dpo-beta0.5", "simpo-gamma0.3",
                                       "simpo-gamma1"]
    for r in recs:
        assert r["status"] == "ok", r.get("error")
        assert set(r["metrics"]) == set(EVAL_METRICS)
        assert all(isinstance(r["metrics"][k], float) for k in EVAL_METRICS), r["metrics"]
        assert r["seconds"] > 0 and r["method"] in ("dpo", "simpo")
        per_prompt = (plan.out / r["eval_file"]).read_text().splitlines()
        assert len(per_prompt) == r["n_prompts"] == 8
    lines = (plan.out / "trials.jsonl").read_text().splitlines()
    assert [json.loads(l)["id"] for l in lines] == [r["id"] for r in recs]
    assert sum("ok in" in line for line in logs) == 4      # a progress line per trial


def test_sft_is_trained_and_evaluated_once_and_reused(swept):
    path, plan, recs, logs = swept
    out = plan.out
    assert (out / "shared" / "sft" / "stage.json").is_file()
    base = json.loads((out / "shared" / "eval" / "summary.json").read_text())
    assert list(base) == ["sft"]
    for r in recs:
        tdir = out / r["dir"]
        assert not (tdir / "sft").exists() and not (tdir / "base").exists()
        rec = load_recipe(tdir / "recipe.yaml")            # a normal, loadable recipe
        assert rec.stage("dpo").model == str(out / "shared" / "sft" / "model")
        assert "[sft]" not in (tdir / "log.txt").read_text()
        # the trial's own evaluation of the shared SFT model gives the baseline's numbers
        assert r["sft"]["mean_score"] == base["sft"]["mean_score"]
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["baseline"]["mean_score"] == base["sft"]["mean_score"]


def test_dpo_trials_share_one_reference_cache(swept):
    path, plan, recs, logs = swept
    out = plan.out
    assert len(list((out / "refcache").glob("ref-*.safetensors"))) == 1   # simpo needs none
    hits = [json.loads((out / "trials" / t / "dpo" / "stage.json").read_text())
            ["reference_cache_hit"] for t in ("dpo-beta0.1", "dpo-beta0.5")]
    assert hits == [False, True]
    assert (out / "trials" / "dpo-beta0.5" / "refcache").is_symlink()
    assert "prepared data: reusing" in (out / "trials" / "simpo-gamma1" / "log.txt").read_text()


def test_trials_reuse_the_shared_sft_samples(swept):
    """The SFT model is sampled once (by the shared evaluation); every trial reads it."""
    path, plan, recs, logs = swept
    out = plan.out
    # one file for the SFT samples + one per trial's own model
    assert len(list((out / "evalcache").glob("samples-*.json"))) == 1 + len(recs)
    for r in recs:
        assert (out / r["dir"] / "evalcache").is_symlink()
        assert "samples of sft: cache hit" in (out / r["dir"] / "log.txt").read_text()


def test_the_sweep_report_and_analysis_are_written(swept):
    path, plan, recs, logs = swept
    html = (plan.out / "report.html").read_text()
    assert "starpo sweep: micro-sweep" in html and "<svg" in html
    for r in recs:
        assert r["id"] in html and (plan.out / r["dir"] / "report.html").is_file()
    analysis = json.loads((plan.out / "analysis.json").read_text())
    assert analysis["methods"] == ["dpo", "simpo"] and analysis["finished"] == 4
    assert set(analysis["head_to_head"]["best"]["matrix"]) == {"dpo", "simpo"}


def test_rerun_skips_finished_trials_and_the_shared_stages(swept):
    """Through the CLI: nothing is trained again, the records stay, `report` works."""
    path, plan, recs, logs = swept
    out = plan.out
    sft_done = (out / "shared" / "sft" / "stage.json").read_text()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "starpo.cli", "sweep", str(path), "--out",
                        str(out), "-q"], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("ok, skipped") == 4 and "[sft] complete, skipped" in p.stdout
    assert (out / "shared" / "sft" / "stage.json").read_text() == sft_done
    assert len((out / "trials.jsonl").read_text().splitlines()) == 4
    assert "4 ok, 0 failed of 4 trials" in p.stdout
    dry = S.describe_plan(plan)
    assert sum(" ok " in line for line in dry) == 4

    (out / "report.html").unlink()
    p = subprocess.run([sys.executable, "-m", "starpo.cli", "report", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert "starpo sweep" in (out / "report.html").read_text()


def test_a_deleted_trial_reruns_in_a_child_process_with_jobs(swept):
    path, plan, recs, logs = swept
    out = plan.out
    shutil.rmtree(out / "trials" / "simpo-gamma1")
    new_logs: list[str] = []
    again = S.run_sweep(plan, jobs=2, log=new_logs.append)
    assert sum("running in a child process" in line for line in new_logs) == 1
    r = next(r for r in again if r["id"] == "simpo-gamma1")
    assert r["status"] == "ok", r.get("error")
    # the same recipe and seeds: the same numbers as the first time
    first = next(x for x in recs if x["id"] == "simpo-gamma1")
    assert r["metrics"]["mean_score"] == first["metrics"]["mean_score"]
    assert "-m starpo.cli run" in (out / "trials" / "simpo-gamma1" / "log.txt").read_text()


# =========================================================================== shipped sweeps


ROOT = Path(__file__).resolve().parents[2]


def _sweep_files():
    import yaml
    return [p for p in sorted((ROOT / "recipes" / "hitchhiker").glob("*.yaml"))
            if "methods" in (yaml.safe_load(p.read_text()) or {})]   # recipes sit next to them


@pytest.mark.parametrize("path", _sweep_files(), ids=lambda p: p.name)
def test_shipped_sweep_files_validate(path, tmp_path):
    sw = S.load_sweep(path)
    methods = {t.method for t in sw.trials}
    assert {"dpo", "ln_dpo", "simpo"} <= methods
    # the guide's design: steps, learning rate and beta vary for every method, SimPO's gamma
    for m in methods:
        keys = {k for t in sw.trials if t.method == m for k in t.params}
        assert {"stages.dpo.train.max_steps", "stages.dpo.train.lr", "stages.dpo.beta"} <= keys
    assert any("stages.dpo.gamma" in t.params for t in sw.trials if t.method == "simpo")
    plan = S.make_plan(sw, tmp_path / "out")
    assert plan.shared is not None and [s.name for s in plan.shared.stages] == ["sft", "eval"]
