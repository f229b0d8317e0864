"""starpo vs TRL, SFT and DPO side by side, on the GPU check's ~0.5B model (few steps).

    python scripts/gpu_bench.py all --model DIR --out DIR      # every configuration
    python scripts/gpu_bench.py one KIND FRAMEWORK --model DIR --out FILE.json

Each configuration (sft/dpo × starpo/trl) runs in its own process with its own time limit,
so a crash or a hang of one leaves the others' figures, and its peak GPU memory is its
own. Both frameworks get the same weights, tokenizer and rows (``benchmarks.assets``:
pseudo-word conversations with log-uniform lengths), the same batch size and maximum
length, flash-attention 2 and bf16 autocast over fp32 master weights (starpo: dtype
"auto" + the loop's mixed precision; TRL: ``bf16=True``), SFT packing (starpo: best-fit
rows, one flat row per micro-batch; TRL: ``packing_strategy="bfd"``, padding-free), DPO
with a precomputed reference (starpo: its reference cache with prefix sharing; TRL:
``precompute_ref_log_probs=True``, ``padding_free=True``).

Measured (the first optimizer step is excluded; it carries one-time costs):

    tokens/s     non-pad tokens of the timed steps / their wall time
    pairs/s      1 / (steady_s / timed pairs + reference_s / all pairs)   (DPO)
    peak GiB     torch.cuda.max_memory_allocated() over training (and the reference pass),
                 after the model is loaded (its weights count, nothing before)
    MFU          model FLOPs / time / 790 TFLOP/s (H200 dense bf16), with model FLOPs
                 = 6·N_body·tokens + 6·H·V·targets  (+ 2·N_body·ref tokens + 2·H·V·ref
                 targets for the reference pass): the 6·N·D rule on the non-embedding
                 parameters, the LM head on the positions that are scored; attention
                 scores (∝ L²) are not counted (benchmarks.worker.flops)
    warmup_s     one forward/backward before timing (kernel selection; starpo's DPO
                 also compiles flex attention for its prefix-shared rows here)

Writes ``OUT/bench.json`` and ``OUT/bench.md`` (the table), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

H200_BF16_FLOPS = 790e12
# few steps by design: ~12 optimizer steps per configuration
SIZES = {"sft_convs": 320, "sft_batch": 8, "sft_len": 1024,
         "dpo_pairs": 192, "dpo_batch": 16, "dpo_len": 1024, "lo": 8, "hi": 120}
CONFIGS = [("sft", "starpo"), ("sft", "trl"), ("dpo", "starpo"), ("dpo", "trl")]
# seconds per configuration (process start, imports, model load, warm-up, ~12 steps); starpo's
# DPO also compiles flex attention for its prefix-shared rows. Together within the 150 s of
# gpu_check's "bench" step.
LIMITS_S = {("sft", "starpo"): 32, ("sft", "trl"): 32, ("dpo", "starpo"): 52, ("dpo", "trl"): 32}


def _cuda():
    import torch
    return torch.cuda.is_available()


def _peak_reset():
    import torch
    if _cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib():
    import torch
    if not _cuda():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _attn() -> str:
    import importlib.util
    return "flash_attention_2" if _cuda() and importlib.util.find_spec("flash_attn") else "sdpa"


def _rows(kind: str, sizes: dict) -> list[dict]:
    from benchmarks import assets
    if kind == "sft":
        return assets.sft_rows(sizes["sft_convs"], lo=sizes["lo"], hi=sizes["hi"])
    return assets.preference_rows(sizes["dpo_pairs"], lo=sizes["lo"], hi=sizes["hi"])


def _warm(model) -> float:
    """One small forward + backward (both frameworks alike) before anything is timed."""
    import torch
    t = time.perf_counter()
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, 256),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    model.train()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=_cuda()):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def _starpo_model(model_dir: str):
    from starpo.model import loading
    from starpo.recipe import ModelSpec
    spec = ModelSpec(name_or_path=model_dir, dtype="auto", attn_implementation=_attn())
    tok = loading.load_tokenizer(model_dir, spec)
    model = loading.load_model(model_dir, spec, for_training=True, tokenizer=tok,
                               device="cuda" if _cuda() else "cpu")
    return tok, model


def _train_spec(batch_size: int):
    from starpo.recipe import TrainSpec
    return TrainSpec(lr=1e-5, epochs=1, batch_size=batch_size, grad_accum=1,
                     scheduler="cosine", warmup_ratio=0.0, log_every=1,   # on_step: every step
                     mixed_precision="auto", max_grad_norm=1.0)


def _loop(model, task, spec) -> tuple[list[float], int]:
    from starpo.train.loop import LoopHooks, run_loop
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        res = run_loop(model, task, spec, Path(d), seed=0, progress=False,
                       hooks=LoopHooks(on_step=lambda step, rec: ends.append(time.perf_counter())))
    _enough(ends)
    return ends, res.steps


def _enough(ends: list[float]) -> None:
    if len(ends) < 2:
        raise SystemExit(f"only {len(ends)} optimizer step(s): timing needs at least 2 "
                         "(more rows or a smaller batch)")


def sft_starpo(model_dir: str, sizes: dict) -> dict:
    from benchmarks.worker import flops, param_counts
    from starpo.data.packing import layout_sft
    from starpo.model.layout import row_cap
    from starpo.stages.sft import SFTTask, tokenize_sft_rows
    tok, model = _starpo_model(model_dir)
    pc = param_counts(model)
    warm = _warm(model)
    docs = tokenize_sft_rows(tok, _rows("sft", sizes), progress=False, log=lambda *a: None)
    layout = layout_sft(docs, mode="pack", loss_masking=True, max_length=sizes["sft_len"], seed=0)
    flat = row_cap(model, sizes["sft_len"], prefix_shared=False) is None   # as the stage does
    task = SFTTask(layout, batch_size=sizes["sft_batch"], pad_id=tok.pad_token_id, seed=0,
                   flat=flat)
    mbs = task.microbatches(0)
    _peak_reset()
    ends, steps = _loop(model, task, _train_spec(sizes["sft_batch"]))
    timed = mbs[1:]
    steady = ends[-1] - ends[0]
    real = sum(b.num_tokens - b.num_pad for b in timed)
    tgt = sum(b.num_targets for b in timed)
    return {"steps": steps, "steady_s": steady, "warmup_s": warm, "tokens_per_s": real / steady,
            "trainable_tokens_per_s": tgt / steady, "peak_gib": _peak_gib(),
            "flops_per_s": flops(pc, train_tokens=real, train_targets=tgt) / steady,
            "truncated": layout.truncated, **pc}


def dpo_starpo(model_dir: str, sizes: dict) -> dict:
    import torch
    from benchmarks.worker import flops, param_counts
    from starpo.data.prefbatch import collate_prefix_shared
    from starpo.model.logprobs import sequence_logprobs
    from starpo.recipe import PreferenceSpec
    from starpo.runtime import Runtime
    from starpo.stages.preference import tokenize_pairs
    from starpo.train.preference import PreferenceTask, one_row
    from starpo.train.refcache import compute_reference
    tok, model = _starpo_model(model_dir)
    pc = param_counts(model)
    spec = PreferenceSpec(loss="dpo", beta=0.1, max_length=sizes["dpo_len"],
                          max_prompt_length=sizes["dpo_len"] // 2)
    pairs, _ = tokenize_pairs(tok, _rows("dpo", sizes), spec, on_bad_rows="skip",
                              progress=False, log=lambda *a: None)
    warm = _warm(model)
    t = time.perf_counter()
    dev = next(model.parameters()).device
    for n in (2, 5):        # two shapes: flex attention's static and dynamic compilations
        b = collate_prefix_shared([p.as_dict() for p in pairs[:n]], dense_mask=False).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=_cuda()):
            with torch.no_grad():
                sequence_logprobs(model, b)
            sums = sequence_logprobs(model, b)[0]
        sums.sum().backward()
        model.zero_grad(set_to_none=True)
    warm += time.perf_counter() - t
    runtime = Runtime.create()
    _peak_reset()
    t = time.perf_counter()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=_cuda()):
        ref_c, ref_r = compute_reference(model, pairs, runtime, batch_size=sizes["dpo_batch"],
                                         progress=False)
    ref_s = time.perf_counter() - t
    task = PreferenceTask(pairs, spec, batch_size=sizes["dpo_batch"], pad_id=tok.pad_token_id,
                          seed=0, ref_chosen=ref_c, ref_rejected=ref_r,
                          one_row=one_row(model, spec))
    mbs = task.microbatches(0)
    ends, steps = _loop(model, task, _train_spec(sizes["dpo_batch"]))
    timed = mbs[1:]
    steady = ends[-1] - ends[0]
    timed_pairs = sum(b.num_seqs // 2 for b in timed)
    real = sum(b.num_tokens - b.num_pad for b in timed)
    tgt = sum(b.num_targets for b in timed)
    frac = timed_pairs / len(pairs)
    all_real = sum(b.num_tokens - b.num_pad for b in mbs)
    all_tgt = sum(b.num_targets for b in mbs)
    f = flops(pc, train_tokens=real, train_targets=tgt, ref_tokens=all_real * frac,
              ref_targets=all_tgt * frac)
    return {"steps": steps, "pairs": len(pairs), "steady_s": steady, "ref_s": ref_s,
            "warmup_s": warm, "tokens_per_s": real / steady,
            "pairs_per_s": 1.0 / (steady / timed_pairs + ref_s / len(pairs)),
            "peak_gib": _peak_gib(), "flops_per_s": f / (steady + ref_s * frac),
            "one_row": task.one_row, **pc}


def _trl_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=_attn())
    model.config.use_cache = False
    return tok, model.to("cuda" if _cuda() else "cpu")


def _trl_args(out_dir: str, batch_size: int) -> dict:
    return dict(output_dir=out_dir, per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=1e-5,
                lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, bf16=_cuda(), use_cpu=not _cuda(), report_to="none",
                save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                dataloader_num_workers=0, seed=0, optim="adamw_torch",
                adam_beta1=0.9, adam_beta2=0.95)


def sft_trl(model_dir: str, sizes: dict) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from benchmarks.worker import _StepTimes, _trl_callback, flops, param_counts
    tok, model = _trl_model(model_dir)
    pc = param_counts(model)
    warm = _warm(model)
    times = _StepTimes()

    class Timed(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            times.targets.append(int((inputs["labels"][..., 1:] != -100).sum()))
            n = inputs["input_ids"].numel()
            am = inputs.get("attention_mask")
            times.tokens.append(n)
            times.pad.append(int(n - am.sum()) if am is not None else 0)
            return super().compute_loss(model, inputs, *a, **kw)

    with tempfile.TemporaryDirectory() as d:
        args = SFTConfig(**_trl_args(d, sizes["sft_batch"]), max_length=sizes["sft_len"],
                         packing=True, packing_strategy="bfd", assistant_only_loss=True)
        trainer = Timed(model=model, args=args, train_dataset=Dataset.from_list(_rows("sft", sizes)),
                        processing_class=tok, callbacks=[_trl_callback(times)])
        _peak_reset()
        trainer.train()
    _enough(times.ends)
    steady = times.ends[-1] - times.ends[0]
    real = sum(times.tokens[1:]) - sum(times.pad[1:])
    tgt = sum(times.targets[1:])
    return {"steps": len(times.ends), "steady_s": steady, "warmup_s": warm,
            "tokens_per_s": real / steady, "trainable_tokens_per_s": tgt / steady,
            "peak_gib": _peak_gib(),
            "flops_per_s": flops(pc, train_tokens=real, train_targets=tgt) / steady, **pc}


def dpo_trl(model_dir: str, sizes: dict) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from benchmarks.worker import (_StepTimes, _trl_callback, flops, param_counts,
                                   timed_dpo_trainer)
    tok, model = _trl_model(model_dir)
    pc = param_counts(model)
    warm = _warm(model)
    times = _StepTimes()
    ref = {"s": 0.0, "rss": 0.0}
    Timed = timed_dpo_trainer(DPOTrainer, times, ref)

    rows = _rows("dpo", sizes)
    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(**_trl_args(d, sizes["dpo_batch"]), max_length=sizes["dpo_len"],
                         precompute_ref_log_probs=True,
                         precompute_ref_batch_size=sizes["dpo_batch"], beta=0.1,
                         loss_type=["sigmoid"], padding_free=_attn() != "sdpa")
        _peak_reset()
        trainer = Timed(model=model, args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tok, callbacks=[_trl_callback(times)])
        trainer.train()
    _enough(times.ends)
    steady = times.ends[-1] - times.ends[0]
    timed_pairs = sum(times.units[1:])
    real = sum(times.tokens[1:]) - sum(times.pad[1:])
    tgt = sum(times.targets[1:])
    frac = timed_pairs / len(rows)
    f = flops(pc, train_tokens=real, train_targets=tgt, ref_tokens=real, ref_targets=tgt)
    return {"steps": len(times.ends), "pairs": len(rows), "steady_s": steady, "ref_s": ref["s"],
            "warmup_s": warm, "tokens_per_s": real / steady,
            "pairs_per_s": 1.0 / (steady / timed_pairs + ref["s"] / len(rows)),
            "peak_gib": _peak_gib(), "flops_per_s": f / (steady + ref["s"] * frac), **pc}


RUNNERS = {("sft", "starpo"): sft_starpo, ("sft", "trl"): sft_trl,
           ("dpo", "starpo"): dpo_starpo, ("dpo", "trl"): dpo_trl}


def table(results: dict) -> str:
    """Markdown table of ``{"sft/starpo": result | {"error": ...}, ...}``."""
    def f(x, fmt):
        return "" if x is None else format(x, fmt)
    rows = ["| stage | framework | tokens/s | pairs/s | peak GPU GiB | MFU (of 790 TFLOP/s) "
            "| steps | warm-up s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, fw in CONFIGS:
        r = results.get(f"{kind}/{fw}") or {"error": "not run"}
        if "error" in r:
            rows.append(f"| {kind} | {fw} | ({r['error'][:60]}) | | | | | |")
            continue
        mfu = r["flops_per_s"] / H200_BF16_FLOPS
        rows.append(f"| {kind} | {fw} | {r['tokens_per_s']:,.0f} | {f(r.get('pairs_per_s'), '.1f')} "
                    f"| {f(r.get('peak_gib'), '.2f')} | {mfu:.1%} | {r['steps']} "
                    f"| {r['warmup_s']:.1f} |")
    for kind in ("sft", "dpo"):
        s, t = results.get(f"{kind}/starpo", {}), results.get(f"{kind}/trl", {})
        if "tokens_per_s" in s and "tokens_per_s" in t:
            key = "pairs_per_s" if kind == "dpo" else "tokens_per_s"
            rows.append(f"\n{kind.upper()}: starpo / TRL = {s[key] / t[key]:.2f}× ({key})")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["all", "one"])
    ap.add_argument("kind", nargs="?", choices=["sft", "dpo"])
    ap.add_argument("framework", nargs="?", choices=["starpo", "trl"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default=None, help="JSON overrides of SIZES (tests)")
    ap.add_argument("--limit", type=float, default=None,
                    help="seconds per configuration (default: LIMITS_S)")
    a = ap.parse_args(argv)
    sizes = {**SIZES, **json.loads(a.sizes or "{}")}
    if a.mode == "one":
        res = RUNNERS[(a.kind, a.framework)](a.model, sizes)
        Path(a.out).write_text(json.dumps(res, indent=2))
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for kind, fw in CONFIGS:
        name, res_file = f"{kind}/{fw}", out / f"bench-{kind}-{fw}.json"
        cmd = [sys.executable, __file__, "one", kind, fw, "--model", a.model,
               "--out", str(res_file)] + (["--sizes", a.sizes] if a.sizes else [])
        t0 = time.time()
        with (out / f"bench-{kind}-{fw}.log").open("w") as log:
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    timeout=a.limit or LIMITS_S[(kind, fw)]).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        results[name] = json.loads(res_file.read_text()) if rc == 0 and res_file.is_file() \
            else {"error": f"rc {rc} (see bench-{kind}-{fw}.log)"}
        results[name]["wall_s"] = round(time.time() - t0, 1)
        print(f"[bench {name}] rc {rc} in {results[name]['wall_s']} s", flush=True)
    (out / "bench.json").write_text(json.dumps({"sizes": sizes, "peak_flops": H200_BF16_FLOPS,
                                                "results": results}, indent=2))
    t = table(results)
    (out / "bench.md").write_text(t)
    print(t)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
