"""Evaluation: hand-checked metric maths, SFT against itself (KL 0, win ½), KL log-probs
equal a plain forward on the sampled tokens, gold and reward-model judges, the eval stage
and ``evaluate_run`` on a run directory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from starpo import fileio
from starpo.metrics import evaluation as E
from starpo.metrics import registry as MR
from starpo.metrics import samples as SM
from starpo.metrics import stats as ST
from starpo.run import pipeline
from starpo.recipe import GenerationSpec, JudgeSpec, TinyModelSpec
from starpo.errors import StarpoError
from starpo.judges.gold import GoldJudge
from starpo.judges.base import PairwiseJudge
from starpo.judges import make_judge

SPEC = GenerationSpec(temperature=0.7, top_p=0.9, max_new_tokens=12, batch_size=4)
TINY = TinyModelSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=128)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: decoding is faster without intra-op threads
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two tiny chat models (different seeds) sharing the world tokenizer, saved to disk."""
    from starpo import world
    from starpo.model import loading
    d = tmp_path_factory.mktemp("eval-models")
    tok = loading.train_tokenizer(world.World(0).corpus(500), 400)
    paths = {}
    for name, seed in (("sft", 0), ("dpo", 1)):
        model = loading.build_tiny_model(TINY, tok, seed=seed)
        loading.save_pretrained(model, tok, d / name / "model")
        paths[name] = str(d / name / "model")
    return {"dir": d, "tok": tok, **paths}


@pytest.fixture(scope="module")
def prompts():
    from starpo import world
    return world.rows("eval", 6, 0)


@pytest.fixture(scope="module")
def evaluated(ckpts, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    res = E.evaluate_models({"sft": ckpts["sft"], "dpo": ckpts["dpo"],
                             "sft_copy": ckpts["sft"]}, prompts, GoldJudge(), SPEC,
                            sft="sft", seed=3, bootstrap=200, out_dir=out, progress=False,
                            log=lambda m: None)
    return res, out


# =========================================================================== pure maths


def test_win_rate_counts_ties_as_half():
    a = [1.0, 0.0, 0.5, 2.0, -1.0]
    b = [0.0, 0.0, 1.0, 2.0, -3.0]
    assert ST.win_outcomes(a, b).tolist() == [1.0, 0.5, 0.0, 0.5, 1.0]
    win, tie = ST.win_rate(a, b)
    assert win == pytest.approx((1 + 0.5 + 0 + 0.5 + 1) / 5)
    assert tie == pytest.approx(2 / 5)
    # the same response text is a tie whatever round-off did to its two scores
    w = ST.win_outcomes([0.30000001, 0.2], [0.3, 0.1], same=[True, False])
    assert w.tolist() == [0.5, 1.0]
    assert ST.win_outcomes([0.31], [0.3], tol=0.05).tolist() == [0.5]
    # a against itself: exactly one half
    x = np.random.default_rng(0).normal(size=50)
    assert ST.win_rate(x, x) == (0.5, 1.0)


def test_kl_terms_and_per_token():
    kl = ST.kl_terms([-10.0, -4.0, -6.0], [-12.0, -4.0, -5.0])
    assert kl.tolist() == [2.0, 0.0, -1.0]
    m = MR.summarize_model([0.0, 0.0, 0.0], lengths=[3, 1, 0], n_tokens=[4, 2, 1], kl=kl,
                          n_boot=0)
    assert m["kl_vs_sft"] == pytest.approx(1.0 / 3)
    assert m["kl_vs_sft_per_token"] == pytest.approx((2 / 4 + 0 / 2 - 1 / 1) / 3)
    assert m["mean_length"] == pytest.approx(4 / 3)
    assert m["kl_vs_sft_ci"] is None  # no bootstrap asked


def test_bootstrap_ci_by_hand():
    v = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    idx = ST.bootstrap_indices(len(v), 500, seed=7)
    lo, hi = ST.bootstrap_ci(v, indices=idx)
    means = np.sort([v[row].mean() for row in idx])
    # numpy's default (linear) percentile of the resampled means
    assert lo == pytest.approx(np.quantile(means, 0.025))
    assert hi == pytest.approx(np.quantile(means, 0.975))
    assert lo <= v.mean() <= hi
    # seeded: same seed, same interval; constant values: a zero-width interval
    assert ST.bootstrap_ci(v, n_boot=500, seed=7) == (lo, hi)
    assert ST.bootstrap_ci([0.25] * 10, n_boot=100, seed=0) == (0.25, 0.25)
    assert ST.bootstrap_ci([], n_boot=100) is None
    assert ST.bootstrap_ci(v, n_boot=0) is None
    # more data, narrower interval (same spread)
    wide = ST.bootstrap_ci(np.tile([0.0, 1.0], 10), n_boot=400, seed=1)
    narrow = ST.bootstrap_ci(np.tile([0.0, 1.0], 1000), n_boot=400, seed=1)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 4


def test_gap_pairs_follow_the_stage_order_and_the_reference():
    assert ST.gap_pairs(["sft", "dpo", "online"]) == [
        ("dpo", "sft"), ("online", "dpo"), ("online", "sft")]
    assert ST.gap_pairs(["sft", "dpo"]) == [("dpo", "sft")]
    assert ST.gap_pairs(["a", "sft", "b"], "sft") == [("sft", "a"), ("b", "sft"), ("a", "sft")]
    assert ST.gap_pairs(["sft"]) == []


def test_score_gaps_by_hand():
    scores = {"sft": [0.0, 1.0, -1.0, 0.5], "dpo": [0.5, 1.0, -0.5, 0.5]}
    (g,) = ST.score_gaps(scores, [("dpo", "sft")], n_boot=2000, seed=3)
    assert g["model"] == "dpo" and g["baseline"] == "sft" and g["n"] == 4
    assert g["gap"] == pytest.approx(0.25)
    # the interval is the bootstrap of the per-prompt differences [0.5, 0, 0.5, 0]
    ci = ST.bootstrap_ci([0.5, 0.0, 0.5, 0.0], indices=ST.bootstrap_indices(4, 2000, 3))
    assert g["gap_ci"] == pytest.approx(list(ci))
    assert 0.0 <= g["gap_ci"][0] <= 0.25 <= g["gap_ci"][1] <= 0.5
    # pairing is what narrows it: a constant shift has a zero-width interval although
    # the scores themselves spread over [-1, 1]
    (h,) = ST.score_gaps({"a": [-1.0, 1.0, 0.0], "b": [-0.9, 1.1, 0.1]}, [("b", "a")],
                         n_boot=500)
    assert h["gap"] == pytest.approx(0.1) and h["gap_ci"] == pytest.approx([0.1, 0.1])
    assert ST.score_gaps(scores, [("dpo", "sft")], n_boot=0)[0]["gap_ci"] is None
    with pytest.raises(ValueError, match="score_gaps"):
        ST.score_gaps({"a": [1.0], "b": [1.0, 2.0]}, [("a", "b")])


def test_summarize_model_by_hand():
    scores = [1.0, 0.2, -0.6, 1.0]
    chosen = [0.2, None, -0.6, 1.0]      # prompt 1 has no reference response
    sft = [1.0, 1.0, -1.0, 0.2]
    m = MR.summarize_model(scores, lengths=[5, 7, 9, 3], n_tokens=[6, 8, 10, 4],
                          finished=[True, True, True, False], chosen_scores=chosen,
                          same_as_chosen=[False, False, False, True], sft_scores=sft,
                          same_as_sft=[True, False, False, False], n_boot=300, seed=0)
    assert m["n"] == 4 and m["n_chosen"] == 3
    assert m["mean_score"] == pytest.approx(0.4)
    # vs chosen: 1>0.2 win; -0.6=-0.6 tie; same text tie  -> (1 + .5 + .5) / 3
    assert m["win_vs_chosen"] == pytest.approx(2 / 3)
    assert m["tie_vs_chosen"] == pytest.approx(2 / 3)
    # vs sft: same text tie; 0.2<1 loss; -0.6>-1 win; 1>0.2 win -> (.5 + 0 + 1 + 1) / 4
    assert m["win_vs_sft"] == pytest.approx(0.625)
    assert m["tie_vs_sft"] == pytest.approx(0.25)
    assert m["mean_length"] == pytest.approx(6.0)
    assert m["finished_rate"] == pytest.approx(0.75)
    assert m["kl_vs_sft"] is None and m["kl_vs_sft_per_token"] is None
    assert m["length_quantiles"]["min"] == 3 and m["length_quantiles"]["max"] == 9
    assert m["length_quantiles"]["median"] == pytest.approx(6.0)
    for k in ("mean_score", "win_vs_chosen", "win_vs_sft", "mean_length"):
        lo, hi = m[f"{k}_ci"]
        assert lo <= m[k] <= hi


def test_lengths_exclude_the_end_of_turn_token():
    ms = SM.ModelSamples(name="m", source="x", responses=["a", "b", ""],
                        tokens=[[5, 6, 2], [5, 6, 7], [2]], prompt_ids=[[1]] * 3,
                        finished=[True, False, True])
    assert ms.lengths == [2, 3, 0]
    assert ms.n_tokens == [3, 3, 1]


# =========================================================================== log-probs


def _plain_logprob(model, prompt_ids, response_ids) -> float:
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = F.log_softmax(logits, -1)
    P = len(prompt_ids)
    return float(sum(lp[P + t - 1, tok] for t, tok in enumerate(response_ids)))


def test_response_logprobs_equal_plain_forward(ckpts):
    from starpo.model import loading
    model = loading.load_model(ckpts["dpo"], for_training=False)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7)]
    responses = [torch.randint(0, V, (n,), generator=g).tolist() for n in (4, 1, 11, 6, 2)]
    got = SM.response_logprobs(model, prompts, responses, pad_id=0, batch_size=3)
    want = [_plain_logprob(model, p, r) for p, r in zip(prompts, responses)]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    # an empty response has log-prob 0 (nothing was sampled)
    assert SM.response_logprobs(model, [[1, 2]], [[]], pad_id=0).tolist() == [0.0]


def test_kl_logprobs_equal_a_direct_forward_on_the_sampled_tokens(evaluated, ckpts, prompts):
    """logp_policy / logp_sft in the records are the log-probs of render_prompt(tok, prompt)
    + the sampled token ids under each model, as a plain forward computes them."""
    from starpo.model import loading
    from starpo.generate.sampling import render_prompt
    res, _ = evaluated
    tok = loading.load_tokenizer(ckpts["dpo"])
    policy = loading.load_model(ckpts["dpo"], for_training=False)
    sft = loading.load_model(ckpts["sft"], for_training=False)
    samples = res.samples["dpo"]
    for i, rec in enumerate(res.records["dpo"]):
        p_ids = render_prompt(tok, rec["prompt"])
        assert p_ids == samples.prompt_ids[i]
        assert rec["tokens"] == samples.tokens[i] and len(rec["tokens"]) == rec["n_tokens"]
        lp = _plain_logprob(policy, p_ids, rec["tokens"])
        ls = _plain_logprob(sft, p_ids, rec["tokens"])
        assert rec["logp_policy"] == pytest.approx(lp, abs=1e-4)
        assert rec["logp_sft"] == pytest.approx(ls, abs=1e-4)
        assert rec["kl"] == pytest.approx(lp - ls, abs=2e-4)
    kl = [r["kl"] for r in res.records["dpo"]]
    assert res.summary["dpo"]["kl_vs_sft"] == pytest.approx(float(np.mean(kl)))
    per_tok = [r["kl"] / r["n_tokens"] for r in res.records["dpo"]]
    assert res.summary["dpo"]["kl_vs_sft_per_token"] == pytest.approx(float(np.mean(per_tok)))


# =========================================================================== evaluate_models


def test_sft_against_itself_kl_zero_and_win_half(evaluated):
    res, _ = evaluated
    s = res.summary["sft"]
    assert s["kl_vs_sft"] == 0.0 and s["kl_vs_sft_per_token"] == 0.0
    assert s["win_vs_sft"] == 0.5 and s["tie_vs_sft"] == 1.0
    assert s["kl_vs_sft_ci"] == [0.0, 0.0] and s["win_vs_sft_ci"] == [0.5, 0.5]
    assert all(r["kl"] == 0.0 for r in res.records["sft"])
    # the same checkpoint loaded again, same seed: the same samples, so a tie everywhere,
    # and a KL that is zero up to the float round-off of a separate forward
    c = res.summary["sft_copy"]
    assert res.samples["sft_copy"].tokens == res.samples["sft"].tokens
    assert c["win_vs_sft"] == 0.5 and c["mean_score"] == s["mean_score"]
    assert abs(c["kl_vs_sft"]) < 1e-4
    # a different model does sample differently
    assert res.samples["dpo"].tokens != res.samples["sft"].tokens


def test_gold_scores_and_outputs(evaluated, prompts):
    from starpo import world
    from starpo.canonical import response_text
    res, out = evaluated
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["sft", "dpo", "sft_copy"]
    gaps = json.loads((out / "gaps.json").read_text())
    assert [(g["model"], g["baseline"]) for g in gaps] == [
        ("dpo", "sft"), ("sft_copy", "dpo"), ("sft_copy", "sft")]
    assert gaps == res.gaps
    for g in gaps:
        assert g["gap"] == pytest.approx(summary[g["model"]]["mean_score"]
                                         - summary[g["baseline"]]["mean_score"])
        assert g["gap_ci"][0] <= g["gap"] <= g["gap_ci"][1]
    assert gaps[2]["gap"] == 0.0   # the same samples as the SFT model's
    for name, m in summary.items():
        for k in MR.sweep_names():
            assert k in m and f"{k}_ci" in m
        assert m["n"] == len(prompts)
        recs = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(recs) == len(prompts)
        for row, r in zip(prompts, recs):
            assert r["id"] == row["id"] and r["prompt"] == row["prompt"]
            text = row["prompt"][-1]["content"]
            assert r["score"] == world.gold_reward(text, r["response"])
            ch = response_text(row["chosen"])
            assert r["chosen"] == ch and r["chosen_score"] == world.gold_reward(text, ch)
            assert r["win_vs_chosen"] == ST.win_outcomes([r["score"]], [r["chosen_score"]],
                                                        same=[r["response"] == ch])[0]
            for key in ("length", "n_tokens", "logp_policy", "logp_sft", "kl", "sft_score",
                        "win_vs_sft", "finished"):
                assert key in r
        assert m["mean_score"] == pytest.approx(np.mean([r["score"] for r in recs]))
        assert m["mean_length"] == pytest.approx(np.mean([r["length"] for r in recs]))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["reference"] == "sft" and meta["prompts"] == len(prompts)
    assert meta["generation"]["temperature"] == 0.7 and meta["files"]["dpo"] == "dpo.jsonl"


def test_reward_model_judge_from_a_checkpoint(ckpts, prompts, tmp_path):
    """A reward-model judge loaded from a (hub-format) checkpoint directory scores here."""
    from starpo.model import loading
    causal = loading.load_model(ckpts["sft"], for_training=False)
    rm = loading.reward_model_from_causal(causal, seed=0)
    loading.save_pretrained(rm, ckpts["tok"], tmp_path / "rm")
    judge = make_judge(JudgeSpec(type="reward_model", path=str(tmp_path / "rm"), batch_size=4))
    res = E.evaluate_models({"dpo": ckpts["dpo"]}, prompts[:4], judge, SPEC, sft=None, seed=0,
                            bootstrap=50, out_dir=tmp_path / "eval", progress=False,
                            log=lambda m: None)
    recs = res.records["dpo"]
    direct = judge.score([r["prompt"] for r in recs], [r["response"] for r in recs])
    assert [r["score"] for r in recs] == pytest.approx(direct, abs=1e-5)
    chosen = judge.score([r["prompt"] for r in recs], [r["chosen"] for r in recs])
    assert [r["chosen_score"] for r in recs] == pytest.approx(chosen, abs=1e-5)
    assert len(set(round(s, 6) for s in direct)) > 1  # a real, varying score
    m = res.summary["dpo"]
    assert m["win_vs_sft"] is None and m["kl_vs_sft"] is None and m["win_vs_chosen"] is not None
    assert (tmp_path / "eval" / "summary.json").is_file()


def test_pairwise_judge_and_bad_reference_are_refused(ckpts, prompts):
    with pytest.raises(StarpoError, match="pairwise"):
        E.evaluate_models({"a": ckpts["sft"]}, prompts, PairwiseJudge(lambda p, a, b: 0.5),
                          SPEC, progress=False)
    with pytest.raises(StarpoError, match="reference"):
        E.evaluate_models({"a": ckpts["sft"]}, prompts, GoldJudge(), SPEC, sft="sft",
                          progress=False)


# =========================================================================== runs


def _write_run(ckpts, run_dir, *, eval_stage: bool):
    import shutil
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("sft", "dpo"):
        shutil.copytree(ckpts[name], run_dir / name / "model")
    stages = [
        {"type": "sft", "data": {"sources": [{"path": "world:sft", "n": 10}]}},
        {"type": "dpo", "data": {"sources": [{"path": "world:preference", "n": 10}]}},
        {"type": "reward", "name": "rm", "data": {"sources": [{"path": "world:preference"}]}},
        {"type": "dpo", "name": "dpo2", "data": {"sources": [{"path": "world:preference"}]}},
    ]
    if eval_stage:
        stages.append({"type": "eval", "data": {"sources": [{"path": "world:eval", "n": 5}],
                                                "shuffle": False},
                       "generation": {"max_new_tokens": 10, "temperature": 0.7,
                                      "top_p": 0.9, "batch_size": 8},
                       "bootstrap": 100})
    import yaml
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(
        {"name": "t", "seed": 0, "model": {"name_or_path": "tiny"}, "stages": stages}))
    return run_dir


def test_eval_stage_in_the_pipeline(ckpts, tmp_path):
    """The registered eval stage evaluates every trained policy stage (neither the reward
    stage nor a policy stage not trained yet), writes eval/summary.json, marks itself
    complete, and the pipeline writes the report."""
    from starpo.run import pipeline
    from starpo.recipe import load_recipe
    run = _write_run(ckpts, tmp_path / "run", eval_stage=True)
    recipe = load_recipe(run / "recipe.yaml")
    logs: list[str] = []
    pipeline.run(recipe, run, only=["eval"], progress=False, log=logs.append)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert list(summary) == ["sft", "dpo"]
    assert summary["sft"]["kl_vs_sft"] == 0.0 and summary["sft"]["win_vs_sft"] == 0.5
    assert summary["dpo"]["n"] == 5
    stage = json.loads((run / "eval" / "stage.json").read_text())
    assert stage["models"] == ["sft", "dpo"] and stage["reference"] == "sft"
    assert set(stage["metrics"]["dpo"]) == set(MR.sweep_names())
    (gap,) = stage["gaps"]
    assert (gap["model"], gap["baseline"]) == ("dpo", "sft")
    assert any(line.strip().startswith("gap dpo − sft ") and "(5 prompts, paired)" in line
               for line in logs)
    assert (run / "report.html").is_file()
    assert any("dpo2: no trained model" in line for line in logs)
    assert not any("rm:" in line for line in logs)


def test_evaluate_run_models_and_n(ckpts, tmp_path):
    """``starpo eval RUN --models dpo --n 3`` on a run without an eval stage: default
    world prompts and gold judge; the SFT reference is sampled too."""
    run = _write_run(ckpts, tmp_path / "run", eval_stage=False)
    res = pipeline.evaluate_run(run, models=["dpo"], n=3, progress=False, log=lambda m: None,
                         report=False)
    assert list(res.summary) == ["sft", "dpo"] and res.reference == "sft"
    assert res.summary["dpo"]["n"] == 3
    assert (run / "eval" / "dpo.jsonl").read_text().count("\n") == 3
    # a checkpoint path is named after its stage directory
    res2 = pipeline.evaluate_run(run, models=[str(run / "dpo" / "model")], n=2, progress=False,
                          log=lambda m: None, report=True)
    assert "dpo" in res2.summary and (run / "report.html").is_file()
    with pytest.raises(StarpoError, match="recipe.yaml"):
        pipeline.evaluate_run(tmp_path / "nowhere", progress=False)


def test_brief_and_safe_name():
    s = {"a": {"mean_score": 0.123456, "win_vs_sft": None}}
    b = E.brief(s)
    assert b["a"]["mean_score"] == 0.1235 and b["a"]["win_vs_sft"] is None
    assert fileio.safe_name("dpo/round 1") == "dpo_round_1" and fileio.safe_name("..") == "model"
    assert not math.isnan(ST.win_rate([1], [0])[0])


# =========================================================================== sample cache


def test_sample_cache_reuses_samples_and_keys_on_what_they_depend_on(ckpts, prompts, evaluated,
                                                                     tmp_path, monkeypatch):
    """Samples of a checkpoint are cached by content: a second evaluation reads them (no
    model is loaded for sampling) and gets the same metrics; another seed, another
    sampling spec or other weights miss; in-memory models are never cached."""
    res0, _ = evaluated
    logs: list[str] = []
    kw = dict(sft="sft", seed=3, bootstrap=200, progress=False, log=logs.append,
              sample_cache=tmp_path / "cache")
    models = {"sft": ckpts["sft"], "dpo": ckpts["dpo"], "sft_copy": ckpts["sft"]}
    first = E.evaluate_models(models, prompts, GoldJudge(), SPEC, **kw)
    assert not any("cache hit" in m for m in logs[:2])      # sft, dpo: sampled
    assert sum("cache hit" in m for m in logs) == 1         # sft_copy: same checkpoint
    assert len(list((tmp_path / "cache").glob("samples-*.json"))) == 2
    for name in models:                                     # the cache changes no number
        assert first.summary[name]["mean_score"] == res0.summary[name]["mean_score"]
        assert first.summary[name]["kl_vs_sft"] == pytest.approx(res0.summary[name]["kl_vs_sft"])

    logs.clear()
    calls = []
    real = SM.load_for_sampling

    def counted(ref, *a, **k):
        calls.append(ref)
        return real(ref, *a, **k)
    monkeypatch.setattr(SM, "load_for_sampling", counted)   # sampling
    monkeypatch.setattr(E, "load_for_sampling", counted)    # the SFT model for KL
    again = E.evaluate_models(models, prompts, GoldJudge(), SPEC, **kw)
    assert sum("cache hit" in m for m in logs) == 3
    assert calls == [ckpts["sft"]]          # loaded once, only to score dpo's samples (KL)
    for name in models:
        assert again.records[name] == first.records[name]

    k = lambda **o: SM.sample_cache_key(ckpts["sft"], E._prompt_messages(prompts),
                                       o.get("spec", SPEC), seed=o.get("seed", 3))
    assert k() == k()
    assert k(seed=4) != k()
    assert k(spec=SPEC.model_copy(update={"temperature": 1.0})) != k()
    assert SM.sample_cache_key(ckpts["dpo"], E._prompt_messages(prompts), SPEC, seed=3) != k()
    assert SM.sample_cache_key(("model", "tok"), [], SPEC, seed=3) is None
    assert SM.sample_cache_key("org/hub-model", [], SPEC, seed=3) is None


def test_by_category_by_hand():
    recs = [{"category": "a", "score": 1.0, "win_vs_sft": 1.0, "win_vs_chosen": None,
             "kl": 0.5, "length": 4, "finished": True},
            {"category": "a", "score": 3.0, "win_vs_sft": 0.5, "win_vs_chosen": None,
             "kl": 1.5, "length": 6, "finished": False},
            {"category": "b", "score": -2.0, "win_vs_sft": 0.0, "win_vs_chosen": 1.0,
             "kl": None, "length": 10, "finished": True},
            {"score": 100.0}]                      # no category: left out
    got = MR.by_category(recs, n_boot=200, seed=0)
    assert list(got) == ["a", "b"]
    a, b = got["a"], got["b"]
    assert a["n"] == 2 and a["mean_score"] == 2.0 and a["win_vs_sft"] == 0.75
    assert a["kl_vs_sft"] == 1.0 and a["mean_length"] == 5.0 and a["finished_rate"] == 0.5
    assert a["win_vs_chosen"] is None and a["win_vs_chosen_ci"] is None
    assert 1.0 <= a["mean_score_ci"][0] <= a["mean_score_ci"][1] <= 3.0
    assert b["n"] == 1 and b["mean_score"] == -2.0 and b["kl_vs_sft"] is None
    assert b["win_vs_chosen"] == 1.0
    assert MR.by_category([{"score": 1.0}]) == {}


def test_prompts_with_categories_get_a_per_category_table(ckpts, prompts, tmp_path):
    """Rows with a category (MT-Bench): each record keeps it, and categories.json holds the
    per-category means of the records' own values."""
    rows = [{**r, "category": "ab"[i % 2]} for i, r in enumerate(prompts)]
    said = []
    res = E.evaluate_models({"sft": ckpts["sft"], "dpo": ckpts["dpo"]}, rows, GoldJudge(),
                            SPEC, sft="sft", seed=1, bootstrap=50, out_dir=tmp_path,
                            progress=False, log=said.append)
    cats = json.loads((tmp_path / "categories.json").read_text())
    assert set(cats) == {"sft", "dpo"} and set(cats["dpo"]) == {"a", "b"}
    recs = res.records["dpo"]
    assert [r["category"] for r in recs] == ["a", "b"] * (len(rows) // 2)
    for c in "ab":
        mine = [r for r in recs if r["category"] == c]
        assert cats["dpo"][c]["mean_score"] == pytest.approx(np.mean([r["score"] for r in mine]))
        assert cats["dpo"][c]["kl_vs_sft"] == pytest.approx(np.mean([r["kl"] for r in mine]))
        assert cats["sft"][c]["win_vs_sft"] == 0.5
    assert res.categories == cats
    assert any("mean score by category" in m for m in said)
    from starpo.report.run_page import _categories_table
    html = _categories_table(cats)
    assert "Mean score by category" in html and html.count("<tr>") == 3   # head + a, b
    assert f"{cats['dpo']['b']['mean_score']:.3f}" in html
    # prompts without categories: no file
    E.evaluate_models({"sft": ckpts["sft"]}, prompts, GoldJudge(), SPEC, sft="sft", seed=1,
                      bootstrap=0, out_dir=tmp_path / "plain", progress=False,
                      log=lambda m: None)
    assert not (tmp_path / "plain" / "categories.json").exists()
