"""The SFT stage: canonical conversations → tokens with assistant labels → packed rows →
the shared loop with the token-level cross-entropy."""

from __future__ import annotations

from tqdm.auto import tqdm

from starpo.data.batch import TokenBatch
from starpo.losses.sft import nll_sum
from starpo.model.layout import attention_note, row_cap
from starpo.recipe import SFTStage
from starpo.data.packing import SFTLayout, layout_sft, padding_fraction, sft_microbatches
from starpo.data.tokenize import TokenizedSFT, tokenize_conversation
from starpo.errors import BadRows, DataError
from starpo.data.prepare import fingerprint, prepared
from starpo.data.sources import load_mixture
from starpo.model import loading
from starpo.train.loop import run_loop
from starpo.train.task import metric_sum
from starpo.train.refcache import tokenizer_fingerprint


class SFTTask:
    """Cross-entropy summed over assistant tokens; the loop divides by the step's count."""

    def __init__(self, layout: SFTLayout, *, batch_size: int, pad_id: int, seed: int,
                 flat: bool = False):
        self.layout, self.batch_size, self.pad_id, self.seed = layout, batch_size, pad_id, seed
        self.flat = flat

    def microbatches(self, epoch: int) -> list[TokenBatch]:
        return sft_microbatches(self.layout, batch_size=self.batch_size, pad_id=self.pad_id,
                                seed=self.seed, epoch=epoch, flat=self.flat)

    def units(self, batch: TokenBatch) -> float:
        return float(batch.num_targets)

    def loss(self, module, batch: TokenBatch):
        _, _, tok_lp = module(batch)
        loss_sum = nll_sum(tok_lp)
        n = batch.num_targets
        return loss_sum, {"loss": (metric_sum(loss_sum), n),
                          "trained_tokens": (float(n), 1.0)}


def tokenize_sft_rows(tokenizer, rows: list[dict], *, on_bad_rows: str = "error",
                      progress: bool = True, log=print):
    docs, bad = [], BadRows(on_bad_rows, log, "conversations with no trainable token")
    for r in tqdm(rows, desc="tokenizing", disable=not progress, leave=False):
        try:
            docs.append(tokenize_conversation(tokenizer, r["messages"],
                                              source=r.get("source", "?"), row=r.get("row", -1),
                                              untrained=r.get("untrained", ())))
        except DataError as err:
            bad.handle(err)
    bad.report()
    return docs


def run_sft(ctx, stage: SFTStage) -> dict:

    seed = ctx.seed_for(stage)
    start = ctx.resolve_model(stage.model, before=stage.name)
    tok = loading.load_tokenizer(start, ctx.recipe.model)
    model = ctx.runtime.model(loading.load_model(start, ctx.recipe.model))

    def build():
        rows = load_mixture(stage.data, "sft", world_seed=ctx.recipe.world.seed, seed=seed,
                            log=ctx.log)
        docs = tokenize_sft_rows(tok, rows, on_bad_rows=stage.data.on_bad_rows,
                                 progress=ctx.progress, log=ctx.log)
        return [[d.input_ids, d.labels, d.source, d.row] for d in docs]

    key = fingerprint(stage.data.model_dump(mode="json"), tokenizer_fingerprint(tok), seed,
                      ctx.recipe.world.seed)
    docs = [TokenizedSFT(*d) for d in prepared(ctx.stage_dir(stage.name) / "data", "sft",
                                                key, build, log=ctx.log,
                                                runtime=ctx.runtime)]
    if not docs:
        raise DataError("no usable conversation in the stage's data", source=stage.name)
    p = stage.packing
    layout = layout_sft(docs, mode=p.mode, loss_masking=p.loss_masking, max_length=p.max_length,
                        drop_masked_ratio=p.drop_masked_ratio, seed=seed)
    # one row per micro-batch (no padding) when attention stays inside documents at
    # Σ document² cost whatever the row length
    flat = p.mode != "pad" and row_cap(model, p.max_length, prefix_shared=False) is None
    first = sft_microbatches(layout, batch_size=stage.train.batch_size, pad_id=tok.pad_token_id,
                             seed=seed, epoch=0, flat=flat)
    pad = padding_fraction(first)
    ntok = sum(b.num_targets for b in first)
    ctx.log(f"  {len(docs)} conversations → {len(layout.rows)} rows ({p.mode}, "
            f"{'assistant-only' if p.loss_masking else 'all-token'} loss), "
            f"{ntok} trainable tokens/epoch, padding {pad:.1%}, truncated {layout.truncated}"
            + (f", dropped rows {layout.dropped_rows}" if layout.dropped_rows else ""))
    if p.mode != "pad":
        ctx.log(f"  {attention_note(model, prefix_shared=False)}")
    task = SFTTask(layout, batch_size=stage.train.batch_size, pad_id=tok.pad_token_id, seed=seed,
                   flat=flat)
    res = run_loop(model, task, stage.train, ctx.stage_dir(stage.name), seed=seed,
                   runtime=ctx.runtime, resume=not ctx.restart, desc=stage.name,
                   progress=ctx.progress, log=ctx.log)
    if ctx.runtime.is_main:
        # res.state_dict: the whole weights gathered under FSDP/DeepSpeed (else None)
        loading.save_pretrained(model, tok, ctx.model_dir(stage.name),
                                state_dict=res.state_dict)
    ctx.runtime.wait()
    return {"steps": res.steps, "final": res.last_metrics, "conversations": len(docs),
            "rows": len(layout.rows), "padding_fraction": pad, "truncated": layout.truncated,
            "trainable_tokens_per_epoch": ntok}
