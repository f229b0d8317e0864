"""``train.compile`` against eager in ONE process, steps interleaved: ``python -m
benchmarks.compile_ab sft|dpo [--threads N] [--work DIR] [--reps R]``.

The compile suite of ``benchmarks.run`` times compiled and eager training in separate
processes, one round each, which a busy machine turns into noise. Here the same batches of
the benchmark model (``benchmarks.assets``, built by ``benchmarks.run`` into ``--work``)
run forward + backward with the blocks compiled once (``starpo.model.compile``) and then
alternately eager and compiled — the compiled function is detached and re-attached per
block, nothing recompiles — so a slow spell hits both alike. Prints the compile time (first
compiled step) and the median step times; measures steps, not the optimizer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compile_ab")
    ap.add_argument("what", choices=["sft", "dpo"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--work", default="/tmp/starpo-bench")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import run, variants as V, worker as W
    from starpo.model import compile as C

    work = Path(a.work)
    sz = run.QUICK
    data = run.data_maker(work)
    from benchmarks import assets
    model_dir = assets.build_assets(work)
    if a.what == "sft":
        cfg = {"max_length": sz.sft_len, "batch_size": sz.sft_batch,
               "data": data("sft", sz.sft_convs, sz.lo, sz.hi)}
    else:
        cfg = {"max_length": sz.dpo_len, "batch_size": sz.dpo_batch,
               "data": data("pref", sz.dpo_pairs, sz.lo, sz.hi)}
    cfg.update(threads=a.threads, model=str(model_dir))
    tok, model = W.load(cfg)
    model.train()
    rows = json.loads(Path(cfg["data"]).read_text())
    if a.what == "dpo":
        pairs, _ = W._tokenize_pairs(tok, rows, cfg)
        collate = V.collate_fn("prefix", None, tok.pad_token_id)
        bs = cfg["batch_size"]
        batches = [collate([p.as_dict() for p in pairs[k:k + bs]])
                   for k in range(0, len(pairs) - bs + 1, bs)][:3]
    else:
        from starpo.data.packing import layout_sft, sft_microbatches
        from starpo.stages.sft import tokenize_sft_rows
        lay = layout_sft(tokenize_sft_rows(tok, rows, progress=False), mode="pack",
                         loss_masking=True, max_length=cfg["max_length"])
        batches = sft_microbatches(lay, batch_size=cfg["batch_size"], pad_id=tok.pad_token_id,
                                   seed=0, epoch=0, flat=True)[:3]
    fn = V.logprob_fn("chunked")

    def step(b):
        fn(model, b)[0].sum().backward()
        model.zero_grad(set_to_none=True)

    step(batches[0])                                  # eager warm-up
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    with C.compiled_blocks(model, True) as blocks:
        t = time.perf_counter()
        step(batches[0])
        compile_s = time.perf_counter() - t
        fns = [b._compiled_call_impl for b in blocks]
        for _ in range(a.reps):
            for mode in times:
                for b, f in zip(blocks, fns):
                    b._compiled_call_impl = f if mode == "compiled" else None
                for b in batches[1:]:
                    t = time.perf_counter()
                    step(b)
                    times[mode].append(time.perf_counter() - t)
        for b, f in zip(blocks, fns):
            b._compiled_call_impl = f                 # the context detaches them itself
    e, c = (statistics.median(times[k]) for k in ("eager", "compiled"))
    print(json.dumps({"what": a.what, "threads": a.threads,
                      "shapes": [list(b.input_ids.shape) for b in batches[1:]],
                      "compile_s": round(compile_s, 1), "eager_step_s": round(e, 3),
                      "compiled_step_s": round(c, 3), "speedup": round(e / c, 3),
                      "steps_each": len(times["eager"]), "compile_stats": C.LAST}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
