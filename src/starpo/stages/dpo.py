"""Offline preference optimisation: DPO, LN-DPO, SimPO, IPO on one shared loop.

Pairs are tokenized once (:func:`starpo.data.tokenize.tokenize_pair`), reference
log-probs come from the on-disk cache (:mod:`starpo.refcache`), and every micro-batch is
either padding-free (chosen and rejected packed as separate documents) or prefix-shared
(prompt computed once, both responses attend to it) — see :mod:`starpo.prefbatch`.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from starpo import losses as L
from starpo.data.batch import TokenBatch
from starpo.recipe.schema import PreferenceSpec
from starpo.data.tokenize import PairStats, TokenizedPair, tokenize_pair
from starpo.errors import BadRows, DataError


def row_tokens(spec: PreferenceSpec) -> int:
    """Row cap for packed preference batches. Truncation keeps prompt + either response
    within max_length, so a prefix-shared segment (prompt, chosen, rejected) fits in twice
    that. Without a cap a micro-batch becomes one long row, and sdpa on CPU pays attention
    over the whole row (measured: one 5265-token row 5.7 s, the same in 256-token rows 0.4 s)."""
    return 2 * spec.max_length


def collate_pairs(pairs: list[TokenizedPair], spec: PreferenceSpec, pad_id: int, *,
                  one_row: bool = False) -> TokenBatch:
    """A micro-batch of pairs in the spec's layout. ``one_row``
    (:func:`starpo.attention.one_row_batches`): no row cap, so no padding, and for prefix
    sharing no dense mask."""
    from starpo.data import prefbatch as PB
    dicts = [p.as_dict() for p in pairs]
    cap = None if one_row else row_tokens(spec)
    if spec.prefix_sharing:
        return PB.collate_prefix_shared(dicts, cap, dense_mask=not one_row)
    if spec.padding_free:
        return PB.collate_padding_free(dicts, cap)
    return PB.collate_padded(dicts, pad_id)


def one_row(model, stage) -> bool:
    """Micro-batches of ``stage`` as single rows for ``model`` (see ``collate_pairs``)."""
    from starpo.model.attention import one_row_batches
    from starpo.model.logprobs import unwrap_model
    if not (stage.prefix_sharing or stage.padding_free):
        return False
    train = getattr(stage, "train", None)
    return one_row_batches(unwrap_model(model), prefix_shared=stage.prefix_sharing,
                           checkpointing=bool(train and train.gradient_checkpointing))


def preference_losses(spec: PreferenceSpec, pc, pr, nc, nr, rc=None, rr=None):
    """Dispatch to the pure loss functions of :mod:`starpo.losses`."""
    if spec.loss == "dpo":
        return L.dpo(pc, pr, rc, rr, beta=spec.beta, label_smoothing=spec.label_smoothing)
    if spec.loss == "ln_dpo":
        return L.ln_dpo(pc, pr, rc, rr, nc, nr, beta=spec.beta,
                        label_smoothing=spec.label_smoothing)
    if spec.loss == "simpo":
        return L.simpo(pc, pr, nc, nr, beta=spec.beta, gamma=spec.gamma,
                       label_smoothing=spec.label_smoothing)
    if spec.loss == "ipo":
        return L.ipo(pc, pr, rc, rr, beta=spec.beta)
    raise ValueError(spec.loss)


TIE = 1e-4


def needs_reference(spec: PreferenceSpec) -> bool:
    return spec.loss != "simpo"


def _per_seq_mean_prob(tok_lp: torch.Tensor, batch: TokenBatch, counts: torch.Tensor):
    probs = torch.zeros(batch.num_seqs, dtype=tok_lp.dtype, device=tok_lp.device)
    probs.index_add_(0, batch.tgt_seq, tok_lp.detach().exp())
    return probs / counts.clamp(min=1)


def pair_metrics(spec, pc, pr, nc, nr, rc, rr, losses, cr, rjr, mean_p) -> dict:
    """Sums (with counts) of the logged metrics for a micro-batch of pairs."""
    n = float(pc.numel())
    s = lambda t: float(t.detach().float().sum())  # noqa: E731
    return {
        "loss": (s(losses), n),
        "reward_chosen": (s(cr), n),
        "reward_rejected": (s(rjr), n),
        "reward_margin": (s(cr - rjr), n),
        # a margin within float noise is a tie and counts one half: at step 0 the policy
        # equals the reference and every margin is ~1e-7, not a coin flip of signs
        "reward_accuracy": (s((cr - rjr > TIE).float() + 0.5 * ((cr - rjr).abs() <= TIE).float()),
                            n),
        "logp_chosen": (s(pc), n),
        "logp_rejected": (s(pr), n),
        "token_prob_margin": (s(mean_p[0::2] - mean_p[1::2]), n),
        "len_chosen": (s(nc), n),
        "len_rejected": (s(nr), n),
    }


class PreferenceTask:
    """Pairs → micro-batches; loss = Σ over pairs (the loop divides by the step's pairs)."""

    def __init__(self, pairs: list[TokenizedPair], spec: PreferenceSpec, *, batch_size: int,
                 pad_id: int, seed: int, ref_chosen=None, ref_rejected=None,
                 one_row: bool = False):
        self.pairs, self.spec, self.batch_size = pairs, spec, batch_size
        self.pad_id, self.seed, self.one_row = pad_id, seed, one_row
        self.ref_c, self.ref_r = ref_chosen, ref_rejected

    def batch_for(self, idx: list[int]) -> TokenBatch:
        b = collate_pairs([self.pairs[i] for i in idx], self.spec, self.pad_id,
                          one_row=self.one_row)
        b.meta["pairs"] = torch.tensor(idx, dtype=torch.long)
        if self.ref_c is not None:
            b.meta["ref_chosen"] = self.ref_c[idx]
            b.meta["ref_rejected"] = self.ref_r[idx]
        return b

    def microbatches(self, epoch: int) -> list[TokenBatch]:
        order = list(range(len(self.pairs)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return [self.batch_for(order[k:k + self.batch_size])
                for k in range(0, len(order), self.batch_size)]

    def units(self, batch: TokenBatch) -> float:
        return float(batch.num_seqs // 2)

    def forward(self, module, batch: TokenBatch):
        lp, counts, tok_lp = module(batch)
        pc, pr = lp[0::2], lp[1::2]
        nc, nr = counts[0::2].to(lp.dtype), counts[1::2].to(lp.dtype)
        rc = rr = None
        if needs_reference(self.spec):
            rc = batch.meta["ref_chosen"].to(lp.device, lp.dtype)
            rr = batch.meta["ref_rejected"].to(lp.device, lp.dtype)
        losses, cr, rjr = preference_losses(self.spec, pc, pr, nc, nr, rc, rr)
        mean_p = _per_seq_mean_prob(tok_lp, batch, counts)
        return losses, pair_metrics(self.spec, pc, pr, nc, nr, rc, rr, losses, cr, rjr, mean_p)

    def loss(self, module, batch: TokenBatch):
        losses, metrics = self.forward(module, batch)
        return losses.sum(), metrics


@torch.no_grad()
def evaluate_pairs(model, task: PreferenceTask, *, chunk_size: int = 1024, device=None) -> dict:
    """Mean metrics of ``task``'s pairs under ``model`` (held-out reward accuracy etc.)."""
    from starpo.train.loop import TargetLogprobs
    module = TargetLogprobs(model, chunk_size)
    was = model.training
    model.eval()
    tot: dict[str, list[float]] = {}
    for b in task.microbatches(0):
        if device is not None:
            b = b.to(device)
        _, m = task.forward(module, b)
        for k, (s, c) in m.items():
            t = tot.setdefault(k, [0.0, 0.0])
            t[0] += s
            t[1] += c
    model.train(was)
    return {k: s / c for k, (s, c) in tot.items() if c}


def tokenize_pairs(tokenizer, rows: list[dict], spec: PreferenceSpec, *, on_bad_rows: str,
                   progress: bool, log) -> tuple[list[TokenizedPair], PairStats]:
    stats, out, bad = PairStats(), [], BadRows(on_bad_rows, log, "bad pairs")
    for r in tqdm(rows, desc="tokenizing pairs", disable=not progress, leave=False):
        try:
            p = tokenize_pair(tokenizer, r, max_length=spec.max_length,
                              max_prompt_length=spec.max_prompt_length, stats=stats)
        except DataError as err:
            bad.handle(err)
            continue
        if p is not None:
            out.append(p)
    bad.report()
    if stats.dropped_empty or stats.dropped_identical or stats.truncated:
        log(f"  truncation: {stats.truncated} pairs truncated, dropped {stats.dropped_empty} "
            f"empty and {stats.dropped_identical} identical after truncation")
    return out, stats


def prepare_reference(ctx, stage, tok, pairs, ref_path: str, *, batch_size: int):
    """Reference log-probs for ``pairs`` from the cache (computed on a miss)."""
    from starpo.model import loading
    from starpo.train.refcache import reference_logps
    if not needs_reference(stage):
        return None, None, None
    if not stage.reference_cache:
        log_msg = "reference_cache: false — computing reference log-probs in memory"
        ctx.log(f"  {log_msg}")
    cache_dir = ctx.refcache if stage.reference_cache else Path(ctx.out) / stage.name / \
        "refcache-tmp"
    ref = reference_logps(ref_path, tok, pairs, cache_dir=cache_dir,
                          load_model=lambda: loading.load_model(ref_path, ctx.recipe.model,
                                                                 for_training=False),
                          batch_size=batch_size, chunk_size=stage.train.logprob_chunk_size,
                          prefix_sharing=stage.prefix_sharing, progress=ctx.progress,
                          max_tokens_per_row=row_tokens(stage),
                          log=ctx.log)
    return ref.chosen, ref.rejected, ref


def train_preference(ctx, stage, tok, model, train_pairs, eval_pairs, ref_path: str,
                     out_dir: Path, *, seed: int, desc: str) -> dict:
    """Shared by the offline stage and each online round."""
    from starpo.train.loop import run_loop
    all_pairs = train_pairs + eval_pairs
    rc, rr, ref = prepare_reference(ctx, stage, tok, all_pairs, ref_path,
                                    batch_size=max(stage.train.batch_size, 8))
    n = len(train_pairs)
    rows1 = one_row(model, stage)
    mk = lambda ps, a, b, bs: PreferenceTask(  # noqa: E731
        ps, stage, batch_size=bs, pad_id=tok.pad_token_id, seed=seed,
        ref_chosen=a, ref_rejected=b, one_row=rows1)
    task = mk(train_pairs, rc[:n] if rc is not None else None,
              rr[:n] if rr is not None else None, stage.train.batch_size)
    held = mk(eval_pairs, rc[n:] if rc is not None else None,
              rr[n:] if rr is not None else None, 32) if eval_pairs else None
    from starpo.data import prefbatch as PB
    saved = PB.tokens_saved([p.as_dict() for p in train_pairs]) if stage.prefix_sharing else {}
    summary: dict = {"pairs": n, "eval_pairs": len(eval_pairs),
                     "reference_cache_hit": bool(ref and ref.hit), "prefix_sharing": saved}
    if held is not None:
        summary["eval_before"] = evaluate_pairs(model, held,
                                                chunk_size=stage.train.logprob_chunk_size)
    res = run_loop(model, task, stage.train, out_dir, seed=seed, resume=not ctx.restart,
                   desc=desc, progress=ctx.progress)
    summary.update(steps=res.steps, final=res.last_metrics)
    if held is not None:
        summary["eval_after"] = evaluate_pairs(model, held,
                                               chunk_size=stage.train.logprob_chunk_size)
        ctx.log(f"  held-out reward accuracy {summary['eval_before']['reward_accuracy']:.3f} → "
                f"{summary['eval_after']['reward_accuracy']:.3f} ({len(eval_pairs)} pairs)")
    return summary


def _pair_json(p: TokenizedPair) -> dict:
    return {**p.as_dict(), "source": p.source, "row": p.row}


def prepare_pairs(ctx, stage, tok, seed: int) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """The stage's preference data, loaded, split and tokenized once per key (main process
    first; reused on resume): ``(train_pairs, eval_pairs)``. Shared by the dpo and reward
    stages (``stage`` has ``data``, ``max_length`` and ``max_prompt_length``)."""
    from starpo.data.prepare import fingerprint, prepared
    from starpo.data.sources import load_mixture, split_eval
    from starpo.train.refcache import tokenizer_fingerprint

    def build():
        rows = load_mixture(stage.data, "preference", world_seed=ctx.recipe.world.seed,
                            seed=seed, log=ctx.log)
        train_rows, eval_rows = split_eval(rows, stage.data.eval_fraction, seed)
        kw = dict(on_bad_rows=stage.data.on_bad_rows, progress=ctx.progress, log=ctx.log)
        return {part: [_pair_json(p) for p in tokenize_pairs(tok, part_rows, stage, **kw)[0]]
                for part, part_rows in (("train", train_rows), ("eval", eval_rows))}

    key = fingerprint(stage.data.model_dump(mode="json"), tokenizer_fingerprint(tok), seed,
                      ctx.recipe.world.seed, stage.max_length, stage.max_prompt_length)
    data = prepared(ctx.stage_dir(stage.name) / "data", "pairs", key, build, log=ctx.log)
    train_pairs = [TokenizedPair(**d) for d in data["train"]]
    eval_pairs = [TokenizedPair(**d) for d in data["eval"]]
    if not train_pairs:
        raise DataError("no usable preference pair in the stage's data", source=stage.name)
    return train_pairs, eval_pairs


def run_dpo(ctx, stage) -> dict:
    from starpo.model import loading

    seed = ctx.seed_for(stage)
    start = ctx.resolve_model(stage.model, before=stage.name)
    ref_path = ctx.resolve_model(stage.reference, before=stage.name) if stage.reference \
        else start
    tok = loading.load_tokenizer(start, ctx.recipe.model)
    train_pairs, eval_pairs = prepare_pairs(ctx, stage, tok, seed)
    ctx.log(f"  {len(train_pairs)} training pairs, {len(eval_pairs)} held out; loss "
            f"{stage.loss} β={stage.beta}" + (f" γ={stage.gamma}" if stage.loss == "simpo"
                                              else ""))
    model = loading.load_model(start, ctx.recipe.model)
    summary = train_preference(ctx, stage, tok, model, train_pairs, eval_pairs, ref_path,
                               ctx.stage_dir(stage.name), seed=seed, desc=stage.name)
    loading.save_pretrained(model, tok, ctx.stage_dir(stage.name) / "model")
    summary["reference"] = ref_path
    return summary
