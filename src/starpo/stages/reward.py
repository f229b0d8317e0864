"""Reward-model training (Bradley–Terry) on preference pairs, on the shared loop.

The starting point is a causal LM (by default the SFT stage's model): its body is copied
into ``AutoModelForSequenceClassification`` with a fresh scalar head
(:func:`starpo.model.loading.reward_model_from_causal`). The trained model is saved to
``DIR/<stage>/model/`` as a sequence-classification checkpoint that
:class:`starpo.judges.reward_model.RewardModelJudge` loads, so an online stage can be judged by a
*learned* reward model while evaluation keeps the gold reward (as in the papers, the
training judge is never the evaluation judge).

Scoring, padding-free
    Pairs are tokenized exactly as for DPO (:func:`starpo.stages.preference.tokenize_pairs`:
    chat template rendered once, then tokenized once). ``prompt + chosen`` and
    ``prompt + rejected`` are packed as separate documents with restarting
    ``position_ids`` (:func:`starpo.data.prefbatch.collate_padding_free`): one row per
    micro-batch when the attention is per document (:func:`starpo.model.attention.one_row_batches`),
    else rows of at most ``max_length`` tokens (every document fits: tokenization truncates
    to it; whole-row attention makes long rows expensive — on this CPU one 5265-token row
    took 5.7 s forward+backward with whole-row sdpa, the same documents in 256-token rows
    0.4 s). The body runs once with ``use_cache=False`` and
    attention per document (:func:`starpo.model.logprobs.body_hidden_states`), and the head
    reads the hidden state of each document's *last* token. That is the token
    ``RewardModelJudge`` scores at inference (the last non-pad token of the same rendered
    text, e.g. the newline after ``<|im_end|>`` for ChatML), so training and judging score
    identical inputs; ``tests/test_reward.py`` checks the two agree to float tolerance.

Loss
    ``−log σ(r_c − r_r)`` per pair, summed over the micro-batch's pairs (the loop divides
    by the step's pairs). Logged: ``loss``, ``reward_accuracy`` (r_c > r_r, an exact tie
    counts one half), ``reward_margin``, ``reward_chosen``, ``reward_rejected``; held-out
    pairs (``data.eval_fraction``) and a fixed sample of training pairs are scored before
    and after training.

Shared with the pairwise_rm stage
    Everything above except the loss is the machinery of any stage that trains a scalar
    sequence scorer on pairs: :func:`train_pair_scorer` takes a :class:`PairObjective`
    (loss, metrics, an optional rewrite of the rows, config written to the checkpoint);
    the reward stage is it with :data:`BRADLEY_TERRY`, :mod:`starpo.stages.pairwise_rm`
    with the pairwise model's objective.

The loop's module
    ``run_loop`` prepares (DDP/FSDP-wraps) the module whose forward feeds the loss;
    :class:`SequenceScores` is that module for a reward model, passed as
    ``run_loop(module_factory=...)``, so gradient sync and parameter gathering happen on
    its forward like on the log-prob module of the other stages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from starpo.data.batch import TokenBatch
from starpo.losses.reward import bradley_terry
from starpo.model.layout import row_cap
from starpo.runtime import Runtime
from starpo.errors import StarpoError
from starpo.data.prefbatch import collate_padding_free, split_pairs
from starpo.model import loading
from starpo.model.logprobs import body_hidden_states, unwrap_model
from starpo.stages.preference import prepare_pairs
from starpo.train.loop import run_loop
from starpo.train.task import metric_sum

TRAIN_PROBE = 256   # training pairs scored before/after (accuracy on what it fits)


# --------------------------------------------------------------------------- batches

def collate_reward_pairs(pairs, max_tokens_per_row: int | None = None) -> TokenBatch:
    """Padding-free batch of pairs (sequence 2i = chosen, 2i+1 = rejected) with the
    location of every document's last token in ``meta["last_row"]``/``meta["last_pos"]``."""

    dicts = [p.as_dict() if hasattr(p, "as_dict") else p for p in pairs]
    b = collate_padding_free(dicts, max_tokens_per_row)
    docs = []
    for d in dicts:
        docs.append(list(d["prompt_ids"]) + list(d["chosen_ids"]))
        docs.append(list(d["prompt_ids"]) + list(d["rejected_ids"]))
    last_row = torch.zeros(len(docs), dtype=torch.long)
    last_pos = torch.zeros(len(docs), dtype=torch.long)
    for r, row in enumerate(b.meta["rows"]):   # documents sit in each row in list order
        off = 0
        for s in row:
            off += len(docs[s])
            last_row[s], last_pos[s] = r, off - 1
    want = torch.tensor([d[-1] for d in docs], dtype=torch.long)
    if not torch.equal(b.input_ids[last_row, last_pos], want):
        raise AssertionError("collate_reward_pairs: packed layout differs from the expected "
                             "document order")
    b.meta["last_row"], b.meta["last_pos"] = last_row, last_pos
    return b


# --------------------------------------------------------------------------- scoring

def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence-classification model (``score``; ``out_proj`` for
    OpenAssistant's GPT-NeoX reward models)."""
    for name in ("score", "out_proj", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise StarpoError(f"{type(model).__name__}: no scalar head found (expected an attribute "
                      "'score', 'out_proj' or 'classifier')")


def sequence_scores(model: nn.Module, batch: TokenBatch) -> Tensor:
    """Reward of every sequence of a :func:`collate_reward_pairs` batch: ``[S]`` float32.

    The body runs once over the packed rows (``use_cache=False``: documents isolated by
    their ``position_ids``), the head sees only the last token of each document.
    Differentiable; ``batch`` must be on the model's device.
    """
    core = unwrap_model(model)
    hidden = body_hidden_states(core, getattr(core, core.base_model_prefix), batch)
    dev = hidden.device
    h = hidden[batch.meta["last_row"].to(dev), batch.meta["last_pos"].to(dev)]
    head = score_head(core)
    w = next(head.parameters())
    return head(h.to(w.device, w.dtype))[:, 0].float()


class SequenceScores(nn.Module):
    """``forward(batch) = sequence_scores(model, batch)`` as the module the loop prepares
    (DDP/FSDP hooks fire on its forward); ``self.model`` is the reward model to save."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self):
        # FSDP's transformer-based auto wrap reads this from the module it prepares (this
        # wrapper): the wrapped model's decoder layer classes become the wrap units
        from starpo.model.logprobs import unwrap_model
        return getattr(unwrap_model(self.model), "_no_split_modules", None)

    def forward(self, batch: TokenBatch) -> Tensor:
        return sequence_scores(self.model, batch)


# --------------------------------------------------------------------------- loss, task

# A reward model's two scores tie only when equal: unlike the implicit DPO reward (zero
# margin at step 0, see starpo.train.preference.TIE) a fresh scalar head already tells
# chosen from rejected, so equality is the only "no preference".
REWARD_TIE = 0.0


def reward_metrics(chosen: Tensor, rejected: Tensor, losses: Tensor) -> dict:
    """Sums (with counts) of the logged metrics for a micro-batch of pairs."""
    n = float(chosen.numel())
    s = metric_sum
    d = (chosen - rejected).detach()
    return {"loss": (s(losses), n),
            "reward_accuracy": (s((d > REWARD_TIE).float() + 0.5 * (d.abs() <= REWARD_TIE).float()),
                                n),
            "reward_margin": (s(d), n),
            "reward_chosen": (s(chosen), n),
            "reward_rejected": (s(rejected), n)}


@dataclass(frozen=True)
class PairObjective:
    """What a stage that trains a scalar sequence scorer on preference pairs is made of,
    besides the shared machinery here (batches, loop, held-out accuracy, checkpoint).

    Every pair is two scored documents (sequence 2i and 2i+1 of a batch); ``loss`` maps
    their scores ``(even [P], odd [P])`` to per-pair losses, ``metrics`` to the logged
    sums. ``transform`` rewrites the canonical preference rows before tokenization (its
    name ``transform_key`` goes into the prepared-data key); ``config`` is written into
    the saved checkpoint's ``config.json`` so the judge that loads it can tell what it is.
    """

    name: str                                   # the loss, as the stage's log names it
    accuracy: str                               # "reward accuracy", "pairwise accuracy"
    loss: Callable[[Tensor, Tensor], Tensor]
    metrics: Callable[[Tensor, Tensor, Tensor], dict]
    transform: Callable[[list[dict]], list[dict]] | None = None
    transform_key: str | None = None
    config: dict = field(default_factory=dict)


# the reward stage: document 2i = prompt + chosen, 2i+1 = prompt + rejected
BRADLEY_TERRY = PairObjective("Bradley–Terry loss", "reward accuracy", bradley_terry,
                              reward_metrics)


class RewardTask:
    """Pairs → padding-free micro-batches; loss = Σ over pairs of the objective's loss
    (Bradley–Terry by default). The loop's module is a :class:`SequenceScores`
    (``module(batch)`` → scores ``[S]``)."""

    def __init__(self, pairs, *, batch_size: int, seed: int,
                 max_tokens_per_row: int | None = None,
                 objective: PairObjective = BRADLEY_TERRY):
        self.pairs, self.batch_size, self.seed = list(pairs), batch_size, seed
        self.max_tokens_per_row = max_tokens_per_row
        self.objective = objective

    def microbatches(self, epoch: int) -> list[TokenBatch]:
        order = list(range(len(self.pairs)))
        random.Random(f"starpo-reward|{self.seed}:{epoch}").shuffle(order)
        return [collate_reward_pairs([self.pairs[i] for i in order[k:k + self.batch_size]],
                                     self.max_tokens_per_row)
                for k in range(0, len(order), self.batch_size)]

    def units(self, batch: TokenBatch) -> float:
        return float(batch.num_seqs // 2)

    def module(self, model: nn.Module, spec) -> nn.Module:
        return SequenceScores(model)

    def loss(self, module: nn.Module, batch: TokenBatch):
        r = module(batch)
        even, odd = split_pairs(r)
        losses = self.objective.loss(even, odd)
        return losses.sum(), self.objective.metrics(even, odd, losses)


@torch.no_grad()
def evaluate_reward(model: nn.Module, pairs, runtime: Runtime, *, batch_size: int = 32,
                    max_tokens_per_row: int | None = None,
                    objective: PairObjective = BRADLEY_TERRY) -> dict:
    """Mean ``loss``, ``reward_accuracy``, ``reward_margin``, … (the objective's metrics)
    of ``model`` on ``pairs``, on the runtime's device (where the model is)."""
    if not pairs:
        return {}
    was = model.training
    model.eval()
    tot: dict[str, list[float]] = {}
    try:
        for k in range(0, len(pairs), batch_size):
            b = runtime.batch(collate_reward_pairs(pairs[k:k + batch_size], max_tokens_per_row))
            r = sequence_scores(model, b)
            even, odd = split_pairs(r)
            for name, (s, c) in objective.metrics(even, odd,
                                                  objective.loss(even, odd)).items():
                t = tot.setdefault(name, [0.0, 0.0])
                t[0] += s
                t[1] += c
    finally:
        model.train(was)
    return {k: float(s / c) for k, (s, c) in tot.items() if c}


# --------------------------------------------------------------------------- stage

def build_reward_model(start: str, tok, model_spec, *, seed: int, device=None):
    """A reward model from the causal-LM checkpoint ``start``: same body, fresh head
    (seeded), LoRA applied when the recipe asks for it."""
    causal = loading.load_model(start, model_spec, for_training=False, tokenizer=tok,
                                 lora=False, device=device)
    rm = loading.reward_model_from_causal(causal, pad_token_id=tok.pad_token_id, seed=seed)
    del causal
    rm.requires_grad_(True)
    rm.train()
    if model_spec.lora:
        rm = loading.apply_lora(rm, model_spec.lora, task_type="SEQ_CLS")
    return rm


def run_reward(ctx, stage) -> dict:
    return train_pair_scorer(ctx, stage, BRADLEY_TERRY, what="reward model")


def train_pair_scorer(ctx, stage, objective: PairObjective, *, what: str) -> dict:
    """A scalar scorer on the starting model's body, trained on the stage's preference
    pairs with ``objective``; accuracy on a probe of training pairs and on the held-out
    pairs before and after; saved to ``DIR/<stage>/model/``. The reward and pairwise_rm
    stages are this with their objective."""
    seed = ctx.seed_for(stage)
    start = ctx.resolve_model(stage.model, before=stage.name)
    tok = loading.load_tokenizer(start, ctx.recipe.model)
    train_pairs, eval_pairs = prepare_pairs(ctx, stage, tok, seed,
                                            transform=objective.transform,
                                            transform_key=objective.transform_key)
    ctx.log(f"  {what} from {start}: {len(train_pairs)} training pairs, "
            f"{len(eval_pairs)} held out; {objective.name}")

    rt = ctx.runtime
    rm = rt.model(build_reward_model(start, tok, ctx.recipe.model, seed=seed))
    for key, value in objective.config.items():     # travels in the checkpoint's config.json
        setattr(unwrap_model(rm).config, key, value)
    cap = row_cap(rm, stage.max_length, prefix_shared=False)
    evaluate = lambda ps: evaluate_reward(rm, ps, rt, max_tokens_per_row=cap,
                                          objective=objective)
    probe = random.Random(f"starpo-reward-probe|{seed}").sample(
        train_pairs, min(TRAIN_PROBE, len(train_pairs)))
    summary: dict = {"start": start, "pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
                     "train_before": evaluate(probe)}
    if eval_pairs:
        summary["eval_before"] = evaluate(eval_pairs)

    task = RewardTask(train_pairs, batch_size=stage.train.batch_size, seed=seed,
                      max_tokens_per_row=cap, objective=objective)
    res = run_loop(rm, task, stage.train, ctx.stage_dir(stage.name), seed=seed, runtime=rt,
                   resume=not ctx.restart, desc=stage.name, progress=ctx.progress,
                   log=ctx.log)
    summary.update(steps=res.steps, final=res.last_metrics,
                   train_after=evaluate(probe))
    line = (f"  {objective.accuracy} on {len(probe)} training pairs "
            f"{summary['train_before']['reward_accuracy']:.3f} → "
            f"{summary['train_after']['reward_accuracy']:.3f}")
    if eval_pairs:
        summary["eval_after"] = evaluate(eval_pairs)
        line += (f"; held out {summary['eval_before']['reward_accuracy']:.3f} → "
                 f"{summary['eval_after']['reward_accuracy']:.3f} ({len(eval_pairs)} pairs)")
    ctx.log(line)
    if rt.is_main:
        loading.save_pretrained(rm, tok, ctx.model_dir(stage.name),
                                state_dict=res.state_dict)
    rt.wait()
    return summary
