"""Online DPO: pair selection (best/worst, ties, identical samples, best_random), prompts
per round, sampling determinism through the round code, and end-to-end stage runs judged
by a learned reward model and by an OpenAssistant-format checkpoint, with resume."""

from __future__ import annotations

import json
import random

import pytest
import torch

from starpo import fileio
from starpo.stages import online_rounds as O
from starpo.recipe import GenerationSpec, recipe_from_dict



pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- pair selection

def one(*a, **k) -> O.PairChoice:
    """The single pair a one-pair rule picks (select_pair returns a list)."""
    got = O.select_pair(*a, **k)
    assert isinstance(got, list) and len(got) == 1, got
    return got[0]


def test_best_vs_worst():
    ch = one(["a", "b", "c", "d"], [0.1, 0.9, -0.5, 0.3])
    assert ch == O.PairChoice(chosen=1, rejected=2, chosen_score=0.9, rejected_score=-0.5,
                              rule="best_worst")
    assert ch.margin == pytest.approx(1.4)


def test_score_ties_break_by_sample_order():
    # two best and two worst: the earliest sample takes each slot
    ch = one(["a", "b", "c", "d"], [1.0, 0.0, 1.0, 0.0])
    assert (ch.chosen, ch.rejected) == (0, 1)


def test_ties_are_dropped():
    assert O.select_pair(["a", "b", "c"], [0.5, 0.5, 0.5]) == O.DROP_TIE
    assert O.select_pair(["a", "b"], [0.5, 0.5 + 1e-9]) == O.DROP_TIE
    assert O.select_pair(["a", "b"], [0.5, 0.6], tie_tolerance=0.2) == O.DROP_TIE
    assert isinstance(one(["a", "b"], [0.5, 0.6]), O.PairChoice)


def test_identical_samples_are_dropped():
    assert O.select_pair(["same", "same", "same"], [0.1, 0.9, 0.3]) == O.DROP_IDENTICAL
    assert O.select_pair(["", ""], [0.0, 1.0]) == O.DROP_IDENTICAL


def test_a_repeated_text_is_one_candidate():
    # a judge may score one text slightly differently in two batches: it must never end
    # up as both chosen and rejected; the first sample of a text speaks for it
    ch = one(["x", "y", "x"], [0.7, 0.5, 0.2])
    assert (ch.chosen, ch.rejected) == (0, 1)
    assert O.select_pair(["x", "x", "y"], [0.7, 0.9, 0.7]) == O.DROP_TIE


def test_non_finite_scores_are_not_candidates():
    nan = float("nan")
    ch = one(["a", "b", "c"], [nan, 0.2, 0.8])
    assert (ch.chosen, ch.rejected) == (2, 1)
    assert O.select_pair(["a", "b"], [nan, 0.2]) == O.DROP_TIE


def test_best_random_rejects_a_strictly_worse_sample_deterministically():
    texts, scores = ["a", "b", "c", "d", "e"], [0.0, 2.0, 1.0, 2.0, -1.0]
    seen = set()
    for s in range(40):
        ch = one(texts, scores, mode="best_random", rng=random.Random(s))
        assert ch.chosen == 1 and ch.rejected in (0, 2, 4)   # never the tied sample 3
        seen.add(ch.rejected)
    assert seen == {0, 2, 4}
    groups, sc = [texts] * 6, [scores] * 6
    a = O.select_pairs(groups, sc, mode="best_random", seed=3)
    assert a == O.select_pairs(groups, sc, mode="best_random", seed=3)
    assert O.select_pair(["a", "b"], [1.0, 1.0], mode="best_random") == O.DROP_TIE


def test_select_pairs_and_records():
    class S:  # a generation.Sample stand-in
        def __init__(self, text, n=3, finished=True):
            self.text, self.num_tokens, self.finished = text, n, finished
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "id": f"p{i}"} for i in range(3)]
    gens = [[S("a"), S("b")], [S("c"), S("c")], [S("d"), S("e", 5, False)]]
    scores = [[0.2, 0.8], [0.1, 0.5], [0.3, 0.3]]
    choices = O.select_pairs([[s.text for s in g] for g in gens], scores)
    assert choices[1:] == [O.DROP_IDENTICAL, O.DROP_TIE]
    samples = O.sample_records(2, rows, gens, scores, choices)
    assert [r["dropped"] for r in samples] == [None, "identical", "tie"]
    assert samples[0]["pair"] == [1, 0] and samples[0]["pairs"] == [[1, 0]]
    assert samples[0]["rule"] == "best_worst" and samples[1]["rule"] is None
    assert samples[2]["samples"][1] == {
        "text": "e", "score": 0.3, "num_tokens": 5, "finished": False}
    pairs = O.pair_records(samples)
    assert pairs == [{"round": 2, "index": 0, "id": "p0", "prompt": rows[0]["prompt"],
                      "chosen": "b", "rejected": "a", "chosen_score": 0.8,
                      "rejected_score": 0.2, "margin": pytest.approx(0.6),
                      "chosen_sample": 1, "rejected_sample": 0, "rule": "best_worst"}]
    pref = O.preference_rows(pairs, source="online/round_2")
    assert pref[0]["chosen"] == [{"role": "assistant", "content": "b"}]
    assert pref[0]["source"] == "online/round_2" and pref[0]["row"] == 0
    st = O.round_statistics(samples, pairs)
    assert st["prompts"] == 3 and st["samples"] == 6 and st["pairs_selected"] == 1
    assert st["dropped_identical"] == 1 and st["dropped_ties"] == 1
    assert st["mean_score"] == pytest.approx(sum(sum(s) for s in scores) / 6)
    assert st["finished_fraction"] == pytest.approx(5 / 6)


def test_round_prompts_differ_between_rounds():
    n, m = 10, 3
    r = [O.round_prompt_indices(n, m, k, seed=7) for k in (1, 2, 3, 4)]
    assert all(len(x) == m and len(set(x)) == m for x in r)
    assert len(set(r[0]) | set(r[1]) | set(r[2])) == 9          # one pass: disjoint
    assert r[3] != r[0]                                         # next pass: reshuffled
    assert r[0] == O.round_prompt_indices(n, m, 1, seed=7)
    assert r[0] != O.round_prompt_indices(n, m, 1, seed=8)
    assert O.round_prompt_indices(n, None, 2, seed=0) == list(range(n))
    assert O.round_prompt_indices(n, 50, 2, seed=0) == list(range(n))
    assert O.round_seed(0, 1) != O.round_seed(0, 2) and O.round_seed(0, 1) == O.round_seed(0, 1)


# --------------------------------------------------------------------------- models



def test_sampling_is_deterministic_through_the_round_code(base):
    from starpo import world
    prompts = [r["prompt"] for r in world.rows("prompt", 3, seed=0)]
    spec = GenerationSpec(temperature=1.0, top_p=0.95, max_new_tokens=12, batch_size=4)
    run = lambda seed, bs=4: O.sample_responses(
        base["model"], base["tok"], prompts, spec.model_copy(update={"batch_size": bs}),
        n=3, seed=seed, progress=False)
    texts = lambda g: [[s.text for s in grp] for grp in g]
    a, b, c = run(11), run(11, bs=5), run(12)
    assert texts(a) == texts(b)
    assert [[s.token_ids for s in g] for g in a] == [[s.token_ids for s in g] for g in b]
    assert texts(a) != texts(c)
    assert len(a) == 3 and all(len(g) == 3 for g in a)
    # and selection on them is a function of the samples and scores only
    scores = [[float(len(s.text)) for s in g] for g in a]
    assert O.select_pairs(texts(a), scores) == O.select_pairs(texts(b), scores)


def _recipe(base_path: str, online: dict, with_reward: bool = True) -> dict:
    stages = []
    if with_reward:
        stages.append({"type": "reward", "model": "base",
                       "data": {"sources": [{"path": "world:preference", "n": 32}]},
                       "train": {"lr": 3e-3, "max_steps": 2, "batch_size": 8, "log_every": 1}})
    stages.append({"type": "online", "data": {"sources": [{"path": "world:prompt", "n": 12}]},
                   "n_samples": 3, "generation": {"max_new_tokens": 16, "temperature": 1.0},
                   "train": {"lr": 1e-3, "max_steps": 2, "batch_size": 2, "log_every": 1},
                   **online})
    return {"model": {"name_or_path": base_path}, "stages": stages}


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def test_online_stage_end_to_end_with_learned_judge_and_resume(base, tmp_path, monkeypatch):
    from starpo.run.pipeline import run
    recipe = recipe_from_dict(_recipe(base["path"], {
        "rounds": 2, "prompts_per_round": 4,
        "judge": {"type": "reward_model", "path": "reward", "batch_size": 8}}))
    logs: list[str] = []
    run(recipe, tmp_path, progress=False, log=logs.append, report=False)
    d = tmp_path / "online"
    rounds = fileio.read_jsonl(d / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["policy"] == base["path"] == rounds[0]["reference"]
    assert rounds[1]["policy"] == str(d / "round_1" / "model") == rounds[1]["reference"]
    assert rounds[0]["judge"] == str(tmp_path / "reward" / "model")
    for k, r in enumerate(rounds, 1):
        rd = d / f"round_{k}"
        samples, pairs = fileio.read_jsonl(rd / "samples.jsonl"), fileio.read_jsonl(rd / "pairs.jsonl")
        assert len(samples) == 4 and all(len(s["samples"]) == 3 for s in samples)
        assert r["pairs_selected"] == len(pairs) == sum(s["pair"] is not None for s in samples)
        assert r["pairs_selected"] + r["dropped_ties"] + r["dropped_identical"] == 4
        for p in pairs:
            assert p["chosen"] != p["rejected"] and p["margin"] > 0
            assert p["margin"] == pytest.approx(p["chosen_score"] - p["rejected_score"])
        assert r["steps"] == 2 and (rd / "model" / "config.json").is_file()
        assert not (rd / "checkpoints").exists()
    ids1 = {s["id"] for s in fileio.read_jsonl(d / "round_1" / "samples.jsonl")}
    ids2 = {s["id"] for s in fileio.read_jsonl(d / "round_2" / "samples.jsonl")}
    assert not ids1 & ids2                               # different prompts each round
    metrics = fileio.read_jsonl(d / "metrics.jsonl")
    assert [(m["round"], m["step"]) for m in metrics] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    final = _weights(d / "model")
    assert all(torch.equal(v, _weights(d / "round_2" / "model")[k]) for k, v in final.items())
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(d / "model"))
    stage = json.loads((d / "stage.json").read_text())
    assert [r["round"] for r in stage["rounds"]] == [1, 2]

    # judge scores in samples.jsonl are the learned reward model's
    from starpo.judges.reward_model import RewardModelJudge
    s0 = fileio.read_jsonl(d / "round_1" / "samples.jsonl")[0]
    judge = RewardModelJudge(str(tmp_path / "reward" / "model"))
    assert judge.score([s0["prompt"]] * 3, [x["text"] for x in s0["samples"]]) == \
        pytest.approx([x["score"] for x in s0["samples"]], abs=1e-5)

    # resume: round 2 killed during training → round 1 skipped, round 2 reuses its judged
    # samples (nothing is sampled) and retrains to the same weights
    calls = []
    real = O.sample_responses
    monkeypatch.setattr(O, "sample_responses", lambda *a, **k: calls.append(1) or real(*a, **k))
    r2 = d / "round_2"
    before = _weights(r2 / "model")
    round1_mtime = (d / "round_1" / "model" / "model.safetensors").stat().st_mtime_ns
    for p in (d / "stage.json", r2 / "round.json"):
        p.unlink()
    import shutil
    shutil.rmtree(r2 / "model")
    logs.clear()
    run(recipe, tmp_path, progress=False, log=logs.append, report=False)
    assert calls == [] and any("round 1: complete, skipped" in x for x in logs)
    assert any("reusing judged samples" in x for x in logs)
    assert (d / "round_1" / "model" / "model.safetensors").stat().st_mtime_ns == round1_mtime
    after = _weights(r2 / "model")
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)

    # a round redone from scratch samples exactly the same responses (same policy, seed)
    old = (r2 / "samples.jsonl").read_text()
    (d / "stage.json").unlink()
    shutil.rmtree(r2)
    run(recipe, tmp_path, progress=False, log=logs.append, report=False)
    assert calls == [1]
    new_samples = fileio.read_jsonl(r2 / "samples.jsonl")
    assert [[x["text"] for x in s["samples"]] for s in new_samples] == \
        [[x["text"] for x in s["samples"]] for s in (json.loads(l) for l in old.splitlines())]


# --------------------------------------------------------------------------- OpenAssistant

@pytest.fixture(scope="module")
def oa_reward_model(tmp_path_factory):
    """An OpenAssistant-architecture reward model (``gpt_neox_reward_model``: GPT-NeoX body,
    ``out_proj`` head) with its own BPE and OA special tokens, saved as a checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from starpo import world
    from starpo.judges.reward_model import GPTNeoXRewardConfig, GPTNeoXRewardModel

    d = tmp_path_factory.mktemp("oa-rm")
    specials = ["<|endoftext|>", "<|padding|>", "<|prompter|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(world.World(0).corpus(200)[:200], trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  pad_token="<|padding|>",
                                  additional_special_tokens=specials[2:])
    cfg = GPTNeoXRewardConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                              num_attention_heads=4, num_hidden_layers=2,
                              max_position_embeddings=256, rotary_pct=0.25,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(5)
    model = GPTNeoXRewardModel(cfg).eval()
    with torch.no_grad():
        model.out_proj.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    assert json.loads((d / "config.json").read_text())["model_type"] == "gpt_neox_reward_model"
    return d


def test_online_stage_with_an_openassistant_judge_and_fixed_reference(base, tmp_path,
                                                                     oa_reward_model):
    from starpo.judges.reward_model import RewardModelJudge, openassistant_format
    from starpo.run.pipeline import run
    recipe = recipe_from_dict(_recipe(base["path"], {
        "rounds": 2, "prompts_per_round": 3, "reference_mode": "fixed",
        "pair_selection": "best_random",
        "judge": {"type": "reward_model", "path": str(oa_reward_model),
                  "input_format": "openassistant", "batch_size": 4}}, with_reward=False))
    run(recipe, tmp_path, progress=False, log=lambda m: None, report=False)
    d = tmp_path / "online"
    rounds = fileio.read_jsonl(d / "rounds.jsonl")
    assert [r["reference"] for r in rounds] == [base["path"], base["path"]]   # fixed
    assert rounds[1]["policy"] == str(d / "round_1" / "model")
    assert rounds[0]["judge"] == str(oa_reward_model)
    judge = RewardModelJudge(str(oa_reward_model), input_format="openassistant")
    assert judge.format("q", "a") == openassistant_format("q", "a")
    for s in fileio.read_jsonl(d / "round_1" / "samples.jsonl"):
        got = [x["score"] for x in s["samples"]]
        assert judge.score([s["prompt"]] * len(got), [x["text"] for x in s["samples"]]) == \
            pytest.approx(got, abs=1e-5)
    assert (d / "model" / "config.json").is_file()
