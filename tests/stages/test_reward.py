"""Reward stage: padding-free scoring equals the plain forward, the Bradley–Terry loss and
its metrics, gradients through the loop's module, and an end-to-end stage run whose saved
checkpoint RewardModelJudge loads and scores identically."""

from __future__ import annotations

import json
import math

import pytest
import torch

from starpo.model import loading
from starpo.losses.reward import bradley_terry
from starpo.runtime import Runtime
from starpo.recipe import RewardStage, recipe_from_dict
from starpo.stages.reward import (
    RewardTask, SequenceScores, collate_reward_pairs, evaluate_reward,
    reward_metrics, sequence_scores,
)



pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def pairs(base):
    from starpo import world
    from starpo.stages.preference import tokenize_pairs
    spec = RewardStage(type="reward", data={"sources": [{"path": "world:preference"}]},
                       max_length=256, max_prompt_length=128)
    rows = world.rows("preference", 12, seed=0)
    out, _ = tokenize_pairs(base["tok"], rows, spec, on_bad_rows="error", progress=False,
                            log=print)
    return out


@pytest.fixture(scope="module")
def rm(base):
    model = loading.reward_model_from_causal(base["model"], seed=3)
    with torch.no_grad():   # a head far from zero, so a wrong position cannot pass
        model.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    return model.eval()


def _plain_scores(model, pairs):
    out = []
    with torch.no_grad():
        for p in pairs:
            for side in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([p.prompt_ids + getattr(p, side)])
                out.append(float(model(input_ids=ids).logits[0, 0]))
    return torch.tensor(out)


@pytest.mark.parametrize("row_tokens", [None, 200])
def test_padding_free_scores_equal_plain_forward(rm, pairs, row_tokens):
    batch = collate_reward_pairs(pairs[:6], row_tokens)
    assert batch.attention_mask is None and batch.num_seqs == 12
    if row_tokens:
        assert batch.input_ids.shape[0] > 1   # several packed rows
    with torch.no_grad():
        got = sequence_scores(rm, batch)
    want = _plain_scores(rm, pairs[:6])
    assert got.shape == (12,)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert want.std() > 1e-3  # the documents really score differently


def test_bradley_terry_loss_and_metrics_by_hand():
    c = torch.tensor([2.0, 0.0, 1.0, -30.0])
    r = torch.tensor([1.0, 0.0, 3.0, 30.0])
    losses = bradley_terry(c, r)
    want = [-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(c.tolist()[:3],
                                                                    r.tolist()[:3])]
    assert losses[:3].tolist() == pytest.approx(want, rel=1e-6)
    assert losses[3].item() == pytest.approx(60.0, rel=1e-6)   # stable far in the tail
    m = reward_metrics(c, r, losses)
    assert m["reward_accuracy"] == (1.5, 4.0)          # a win, a tie (½), two losses
    assert m["reward_margin"][0] == pytest.approx(1.0 + 0.0 - 2.0 - 60.0)
    assert m["loss"][1] == 4.0


def test_task_loss_has_gradients_through_the_module(base, pairs):
    model = loading.reward_model_from_causal(base["model"], seed=0).train()
    task = RewardTask(pairs, batch_size=4, seed=0)
    mbs = task.microbatches(0)
    assert [task.units(b) for b in mbs] == [4.0, 4.0, 4.0]
    loss, metrics = task.loss(SequenceScores(model), mbs[0])
    loss.backward()
    body = model.model.layers[0].self_attn.q_proj.weight.grad
    assert body is not None and body.abs().sum() > 0
    assert model.score.weight.grad.abs().sum() > 0
    assert metrics["loss"][0] == pytest.approx(loss.item(), rel=1e-6)


def test_loop_trains_the_reward_model_through_its_scoring_module(base, pairs, tmp_path):
    """``run_loop(module_factory=SequenceScores)`` trains the reward model: the same
    steps by hand (Adam on the summed Bradley–Terry loss / pairs) reach the same weights."""
    import starpo.train.loop as T
    from starpo.recipe import TrainSpec
    spec = TrainSpec(lr=1e-3, max_steps=3, batch_size=4, log_every=1, scheduler="constant",
                     warmup_ratio=0.0, max_grad_norm=None)
    start = loading.reward_model_from_causal(base["model"], seed=0)
    looped = copy_model(start)
    task = RewardTask(pairs, batch_size=4, seed=0)
    res = T.run_loop(looped, task, spec, tmp_path / "a", seed=0, progress=False)
    assert res.steps == 3 and "reward_accuracy" in res.last_metrics
    by_hand = copy_model(start).train()
    opt = torch.optim.AdamW(by_hand.parameters(), lr=1e-3, betas=spec.adam_betas,
                            weight_decay=0.0)
    for b in task.microbatches(0)[:3]:
        opt.zero_grad()
        loss, _ = task.loss(SequenceScores(by_hand), b)
        (loss / task.units(b)).backward()
        opt.step()
    a, h, s0 = looped.state_dict(), by_hand.state_dict(), start.state_dict()
    assert all(torch.allclose(a[k], h[k], atol=1e-5) for k in a)
    assert not torch.equal(a["score.weight"], s0["score.weight"])   # it did train

def copy_model(model):
    import copy
    return copy.deepcopy(model).train()


def test_microbatches_are_seeded(pairs):
    a = RewardTask(pairs, batch_size=4, seed=1).microbatches(0)
    b = RewardTask(pairs, batch_size=4, seed=1).microbatches(0)
    c = RewardTask(pairs, batch_size=4, seed=1).microbatches(1)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert not all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c))


def test_reward_stage_end_to_end_and_judge_loads_it(base, tmp_path):
    from starpo.recipe import JudgeSpec
    from starpo.judges.reward_model import RewardModelJudge
    from starpo.judges import make_judge
    from starpo.run.pipeline import run
    from starpo.stages.preference import tokenize_pairs
    from starpo import world

    recipe = recipe_from_dict({"model": {"name_or_path": base["path"]}, "stages": [
        {"type": "reward", "model": "base",
         "data": {"sources": [{"path": "world:preference", "n": 48}], "eval_fraction": 0.25},
         "train": {"lr": 3e-3, "max_steps": 4, "batch_size": 8, "log_every": 1}}]})
    logs: list[str] = []
    run(recipe, tmp_path, progress=False, log=logs.append, report=False)
    d = tmp_path / "reward"
    summary = json.loads((d / "stage.json").read_text())
    assert summary["pairs"] == 36 and summary["eval_pairs"] == 12 and summary["steps"] == 4
    for key in ("train_before", "train_after", "eval_before", "eval_after"):
        assert 0.0 <= summary[key]["reward_accuracy"] <= 1.0
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all("reward_accuracy" in r and "loss" in r for r in recs)
    assert any("held out" in line for line in logs)
    cfg = json.loads((d / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert cfg["num_labels"] == 1 if "num_labels" in cfg else len(cfg["id2label"]) == 1

    # the judge loads the checkpoint (through the stage name too) and scores exactly what
    # the stage trained on: the same rendered text, the same last token
    judge = make_judge(JudgeSpec(type="reward_model", path="reward"),
                       resolve_path=lambda s: str(d / "model") if s == "reward" else None)
    assert isinstance(judge, RewardModelJudge)
    rows = world.rows("preference", 6, seed=5)
    prompts = [r["prompt"] for r in rows]
    texts = [r["chosen"][0]["content"] for r in rows]
    got = judge.score(prompts, texts)
    saved = loading.load_reward_model(str(d / "model"))
    tok = loading.load_tokenizer(str(d / "model"))
    spec = RewardStage(type="reward", data={"sources": [{"path": "x"}]})
    tp, _ = tokenize_pairs(tok, rows, spec, on_bad_rows="error", progress=False, log=print)
    with torch.no_grad():
        want = sequence_scores(saved, collate_reward_pairs(tp))[0::2]
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    # and the saved model scores held-out pairs like the summary says
    assert evaluate_reward(saved, tp, Runtime.cpu())["reward_accuracy"] >= 0.0
