"""pairwise_rm stage: the joint layout of both orders, the task's loss equal to the plain
BCE on plain forwards, the metrics by hand, recipe validation of a judge's path, and a
tiny sft → pairwise_rm → online pipeline whose judge scores exactly what the stage trained
on and is order-symmetric after both-orders averaging."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from starpo import fileio, world
from starpo.errors import RecipeError, StarpoError
from starpo.judges.pairwise_rm import LAYOUT, LAYOUT_KEY, pair_response
from starpo.model import loading
from starpo.recipe import recipe_from_dict
from starpo.recipe.schema import PairwiseRMStage
from starpo.stages.pairwise_rm import PAIRWISE, pairwise_metrics, pairwise_rows
from starpo.stages.preference import tokenize_pairs
from starpo.stages.reward import (RewardTask, SequenceScores, collate_reward_pairs,
                                  sequence_scores)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenized(tok, rows):
    spec = PairwiseRMStage(type="pairwise_rm", data={"sources": [{"path": "x"}]},
                           max_length=384, max_prompt_length=128)
    out, _ = tokenize_pairs(tok, pairwise_rows(rows), spec, on_bad_rows="error",
                            progress=False, log=print)
    return out


@pytest.fixture(scope="module")
def pairs(base):
    return _tokenized(base["tok"], world.rows("preference", 8, seed=0))


def test_rows_hold_both_orders_in_one_assistant_turn():
    row = world.rows("preference", 1, seed=0)[0]
    c, r = row["chosen"][0]["content"], row["rejected"][0]["content"]
    out = pairwise_rows([row])[0]
    assert out["prompt"] == row["prompt"]
    assert out["chosen"] == [{"role": "assistant", "content": f"A: {c}\nB: {r}"}]
    assert out["rejected"] == [{"role": "assistant", "content": f"A: {r}\nB: {c}"}]
    assert row["chosen"][0]["content"] == c            # the input rows are left as they were


def test_task_loss_is_the_bce_of_plain_forwards(base, pairs):
    model = loading.reward_model_from_causal(base["model"], seed=3).train()
    with torch.no_grad():   # a head far from zero, so a wrong position cannot pass
        model.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    task = RewardTask(pairs, batch_size=4, seed=0, objective=PAIRWISE)
    batch = collate_reward_pairs(pairs[:4])
    loss, metrics = task.loss(SequenceScores(model), batch)
    plain = lambda ids: model(input_ids=torch.tensor([ids])).logits[0, 0]
    with torch.no_grad():
        zc = torch.stack([plain(p.prompt_ids + p.chosen_ids) for p in pairs[:4]])
        zr = torch.stack([plain(p.prompt_ids + p.rejected_ids) for p in pairs[:4]])
    want = 0.5 * (F.binary_cross_entropy_with_logits(zc, torch.ones(4), reduction="sum")
                  + F.binary_cross_entropy_with_logits(zr, torch.zeros(4), reduction="sum"))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert metrics["loss"] == (pytest.approx(want.item(), rel=1e-5), 4.0)
    assert zc.std() > 1e-3
    loss.backward()
    assert model.score.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_pairwise_metrics_by_hand():
    zc = torch.tensor([2.0, 0.5, -1.0, 1.0])
    zr = torch.tensor([-1.0, 0.5, 1.0, 3.0])
    m = pairwise_metrics(zc, zr, torch.zeros(4))
    assert m["reward_accuracy"] == (1.5, 4.0)                 # right, tie, wrong, wrong
    assert m["reward_margin"] == (pytest.approx(0.5 * (3.0 + 0.0 - 2.0 - 2.0)), 4.0)
    assert m["order_agreement"] == (2.0, 4.0)   # pairs 0 and 2 name one winner in both orders
    assert m["prefers_first"] == (6.0, 8.0)     # A won 6 of 8 presentations


# --------------------------------------------------------------------------- recipes

def _stages(base_path, *, judge_path="pw", order=("pw", "online"), extra=None):
    pw = {"type": "pairwise_rm", "name": "pw", "model": "base",
          "data": {"sources": [{"path": "world:preference", "n": 32}]}}
    online = {"type": "online", "data": {"sources": [{"path": "world:prompt", "n": 8}]},
              "judge": {"type": "pairwise_rm", **({"path": judge_path} if judge_path else {})}}
    by = {"pw": pw, "online": online, **(extra or {})}
    return {"model": {"name_or_path": base_path}, "stages": [by[n] for n in order]}


def test_recipe_checks_the_judge_path_of_a_pairwise_rm_judge():
    assert recipe_from_dict(_stages("tiny")).stage("online").judge.path == "pw"
    with pytest.raises(RecipeError, match=r"stages\.online\.judge\.path: a pairwise_rm judge "
                                          r"needs path"):
        recipe_from_dict(_stages("tiny", judge_path=None))
    rw = {"rw": {"type": "reward", "name": "rw",
                 "data": {"sources": [{"path": "world:preference"}]}}}
    with pytest.raises(RecipeError, match="'rw' is a reward stage; a pairwise_rm judge needs "
                                          "a pairwise_rm stage"):
        recipe_from_dict(_stages("tiny", judge_path="rw", order=("rw", "online"), extra=rw))
    with pytest.raises(RecipeError, match="comes after"):
        recipe_from_dict(_stages("tiny", order=("online", "pw")))
    # a directory is checked when the judge loads it
    assert recipe_from_dict(_stages("tiny", judge_path="/some/dir")).stage("online")
    # the eval stage needs a judge with an absolute score
    with pytest.raises(RecipeError, match="pointwise"):
        recipe_from_dict({"stages": [{"type": "eval",
                                      "judge": {"type": "pairwise_rm", "path": "/x"}}]})


def test_judge_refuses_a_checkpoint_that_is_not_a_pairwise_model(base, tmp_path):
    from starpo.judges.pairwise_rm import PairwiseRMJudge
    rm = loading.reward_model_from_causal(base["model"], seed=0)
    loading.save_pretrained(rm, base["tok"], tmp_path / "rm")
    with pytest.raises(StarpoError, match="not a pairwise model"):
        PairwiseRMJudge(str(tmp_path / "rm"))


# --------------------------------------------------------------------------- pipeline

def test_sft_pairwise_rm_online_pipeline(base, tmp_path):
    from starpo.judges import make_judge
    from starpo.judges.pairwise_rm import PairwiseRMJudge
    from starpo.recipe import JudgeSpec
    from starpo.run.pipeline import run

    fast = {"lr": 3e-3, "max_steps": 3, "batch_size": 4, "log_every": 1}
    recipe = recipe_from_dict({"model": {"name_or_path": base["path"]}, "stages": [
        {"type": "sft", "data": {"sources": [{"path": "world:sft", "n": 32}]},
         "packing": {"max_length": 128}, "train": fast},
        {"type": "pairwise_rm", "name": "pw", "model": "sft",
         "data": {"sources": [{"path": "world:preference", "n": 40}], "eval_fraction": 0.25},
         "train": fast},
        {"type": "online", "model": "sft", "data": {"sources": [{"path": "world:prompt",
                                                                 "n": 6}]},
         "n_samples": 3, "generation": {"max_new_tokens": 12, "temperature": 1.0},
         "judge": {"type": "pairwise_rm", "path": "pw", "batch_size": 8},
         "train": {"lr": 1e-3, "max_steps": 1, "batch_size": 2, "log_every": 1}}]})
    logs: list[str] = []
    run(recipe, tmp_path, progress=False, log=logs.append, report=False)

    d = tmp_path / "pw"
    summary = json.loads((d / "stage.json").read_text())
    assert summary["pairs"] == 30 and summary["eval_pairs"] == 10 and summary["steps"] == 3
    for key in ("train_before", "train_after", "eval_before", "eval_after"):
        m = summary[key]
        assert 0.0 <= m["reward_accuracy"] <= 1.0 and 0.0 <= m["order_agreement"] <= 1.0
        assert 0.0 <= m["prefers_first"] <= 1.0 and m["loss"] > 0
    assert summary["train_after"] != summary["train_before"]    # it trained
    recs = fileio.read_jsonl(d / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3] and all("reward_accuracy" in r for r in recs)
    assert any("pairwise accuracy" in line and "held out" in line for line in logs)
    cfg = json.loads((d / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert cfg[LAYOUT_KEY] == LAYOUT

    # the judge (through the stage name) scores exactly what the stage trained on
    judge = make_judge(JudgeSpec(type="pairwise_rm", path="pw", batch_size=3),
                       resolve_path=lambda s: str(d / "model") if s == "pw" else None)
    assert isinstance(judge, PairwiseRMJudge) and judge.source == str(d / "model")
    rows = world.rows("preference", 5, seed=7)
    prompts = [r["prompt"] for r in rows]
    a = [r["chosen"][0]["content"] for r in rows]
    b = [r["rejected"][0]["content"] for r in rows]
    saved = loading.load_reward_model(str(d / "model"))
    with torch.no_grad():
        want = sequence_scores(saved, collate_reward_pairs(
            _tokenized(loading.load_tokenizer(str(d / "model")), rows)))
    assert judge.logits(prompts, a, b) == pytest.approx(want[0::2].tolist(), abs=1e-5)
    assert judge.logits(prompts, b, a) == pytest.approx(want[1::2].tolist(), abs=1e-5)
    # one order alone is biased; the both-orders verdict is symmetric
    raw_ab, raw_ba = judge.prefer(prompts, a, b), judge.prefer(prompts, b, a)
    assert max(abs(x + y - 1.0) for x, y in zip(raw_ab, raw_ba)) > 1e-4
    ab, ba = judge.compare_batch(prompts, a, b), judge.compare_batch(prompts, b, a)
    assert [x + y for x, y in zip(ab, ba)] == pytest.approx([1.0] * 5, abs=1e-6)
    assert ab == pytest.approx([(x + 1 - y) / 2 for x, y in zip(raw_ab, raw_ba)], abs=1e-9)

    # the online stage ranked its samples with it: round robin, k/2 points per prompt
    s0 = fileio.read_jsonl(tmp_path / "online" / "round_1" / "samples.jsonl")
    assert json.loads((tmp_path / "online" / "round_1" / "round.json").read_text())[
        "judge"] == str(d / "model")
    for rec in s0:
        scores = [x["score"] for x in rec["samples"]]
        assert sum(scores) == pytest.approx(1.5, abs=1e-6)
        assert judge.rank(rec["prompt"], [x["text"] for x in rec["samples"]]) == \
            pytest.approx(scores, abs=1e-5)
    assert (tmp_path / "online" / "model" / "config.json").is_file()
    # pair_response is the layout the judge was built on
    assert pair_response("x", "y") == "A: x\nB: y"
