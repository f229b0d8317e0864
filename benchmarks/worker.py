"""One benchmark configuration, run in its own process: ``python -m benchmarks.worker CFG OUT``.

``CFG`` is a JSON file (written by ``benchmarks.run``), ``OUT`` the JSON result. One
process per configuration makes peak RSS (``ru_maxrss`` at exit) belong to that
configuration alone.

Timing (both frameworks alike):

* ``steady_s`` — wall time from the end of the first optimizer step to the end of the
  last (the first step carries one-time costs: allocator warm-up, lazy imports). Batch
  collation is inside it for TRL (its dataloader collates per step); starpo collates all
  micro-batches of the epoch before its loop, so that time is measured and added,
  pro-rated to the timed steps.
* ``ref_s`` — the reference pass over all pairs (DPO with a cached/precomputed reference).
* ``prep_s`` — tokenization and packing (reported, not in the throughput).
* ``e2e_s`` — everything from the trainer's construction to the end of training.

Throughput: SFT trainable (assistant) tokens of the timed steps / ``steady_s``; DPO
pairs/s = 1 / (steady_s / timed_pairs + ref_s / all_pairs), i.e. the reference pass is
amortised over the one epoch trained (with E epochs its share would be divided by E).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DATASETS_VERBOSITY", "error")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mib() -> float:
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load(cfg):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    if cfg.get("chat_template") == "chatml":
        # a real model's own template has no {% generation %} markers, which TRL's
        # assistant_only_loss needs: both frameworks get starpo's ChatML (which has them)
        from starpo.model.loading import CHATML_TEMPLATE
        tok.chat_template = CHATML_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    # starpo's segment-local attention (starpo.model.attention); off for the ablation
    model.starpo_segment_attention = cfg.get("segments", True)
    return tok, model


def warm_up(model) -> None:
    """One small forward + backward before anything is timed, in every configuration
    (starpo and TRL alike): the first pass pays one-time costs (allocator growth, thread
    pool start, kernel selection) that would otherwise land on whichever part runs first —
    the reference pass, which is timed, rather than the first training step, which is not."""
    import torch
    ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    was = model.training
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was)


def load_measured(cfg):
    """What every training runner starts from, starpo and TRL alike: ``(tokenizer, model,
    param_counts, RSS after loading (before the warm-up), the data rows)``."""
    tok, model = load(cfg)
    pc = param_counts(model)
    rss_loaded = current_rss_mib()
    warm_up(model)
    rows = json.loads(Path(cfg["data"]).read_text())
    return tok, model, pc, rss_loaded, rows


def param_counts(model) -> dict:
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    body = total - emb.numel() - (0 if head is emb else head.numel())
    return {"params_total": total, "params_body": body, "vocab": int(head.shape[0]),
            "hidden": int(head.shape[1])}


def flops(pc: dict, *, train_tokens: int, train_targets: int, ref_tokens: int = 0,
          ref_targets: int = 0) -> float:
    """Model FLOPs (the 6·N·D rule): forward 2, backward 4 per parameter and token.

    Body: every computed (non-pad) token. LM head (H·V): only the target positions, as
    starpo computes it (TRL computes the same useful work). The reference pass is forward
    only (2·N·D). Attention-score FLOPs (∝ L²) are not counted.
    """
    hv = pc["hidden"] * pc["vocab"]
    return (6 * pc["params_body"] * train_tokens + 6 * hv * train_targets
            + 2 * pc["params_body"] * ref_tokens + 2 * hv * ref_targets)


# ----------------------------------------------------------------------------- matmul peak

def run_matmul(cfg, rep: int) -> dict:
    """fp32 ``torch.matmul`` of two n×n matrices (2·n³ FLOPs), best and median of 10."""
    import torch
    torch.set_num_threads(cfg["threads"])
    n = cfg.get("n", 2048)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = []
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        best.append(time.perf_counter() - t)
    best.sort()
    return {"gflops_best": 2 * n**3 / best[0] / 1e9,
            "gflops_median": 2 * n**3 / best[len(best) // 2] / 1e9, "n": n,
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- starpo

def _train_spec(cfg, **kw):
    from starpo.recipe import TrainSpec
    return TrainSpec(lr=cfg.get("lr", 1e-5), epochs=1, batch_size=cfg["batch_size"],
                     grad_accum=1, scheduler="cosine", warmup_ratio=0.0, log_every=1,
                     mixed_precision="no", max_grad_norm=1.0,
                     compile=cfg.get("compile", False), **kw)


def _run_starpo_loop(model, task, spec, n_steps: int) -> dict:
    """The library loop; ``first_step_s`` (loop start to the end of the first step) holds
    the compilation when ``train.compile`` is on, ``compile_stats`` what dynamo did."""
    from starpo.model import compile as C
    from starpo.train.loop import LoopHooks, run_loop
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = run_loop(model, task, spec, Path(d), seed=0, progress=False,
                       hooks=LoopHooks(on_step=lambda step, rec: ends.append(time.perf_counter())))
        t1 = time.perf_counter()
    assert res.steps == n_steps == len(ends), (res.steps, n_steps, len(ends))
    gaps = sorted(b - a for a, b in zip(ends, ends[1:]))
    return {"loop_s": t1 - t0, "step_ends": ends, "loop_t0": t0, "first_step_s": ends[0] - t0,
            "step_median_s": gaps[len(gaps) // 2] if gaps else None,
            "compile_stats": dict(C.LAST) if spec.compile else None}


def _loop_fields(loop: dict, cfg) -> dict:
    out = {"first_step_s": loop["first_step_s"], "step_median_s": loop["step_median_s"],
           "compile": bool(cfg.get("compile", False))}
    if loop["compile_stats"]:
        out["compile_stats"] = loop["compile_stats"]
    return out


def run_sft_starpo(cfg, rep: int) -> dict:
    from starpo.model.attention import one_row_batches
    from starpo.data.packing import layout_sft, padding_fraction
    from starpo.stages.sft import SFTTask, tokenize_sft_rows
    from benchmarks import variants as V

    tok, model, pc, rss_loaded, rows = load_measured(cfg)
    t0 = time.perf_counter()
    docs = tokenize_sft_rows(tok, rows, progress=False)
    layout = layout_sft(docs, mode=cfg.get("mode", "pack"), loss_masking=True,
                        max_length=cfg["max_length"], seed=0)
    prep_s = time.perf_counter() - t0
    # what the SFT stage does: one row per micro-batch when attention is per document
    flat = layout.mode != "pad" and one_row_batches(model, prefix_shared=False)
    if cfg.get("logprobs", "chunked") == "chunked":
        task = SFTTask(layout, batch_size=cfg["batch_size"], pad_id=tok.pad_token_id, seed=0,
                       flat=flat)
    else:
        task = V.BenchSFTTask(layout, batch_size=cfg["batch_size"], pad_id=tok.pad_token_id,
                              seed=0, logprobs=cfg["logprobs"], flat=flat)
    t = time.perf_counter()
    mbs = task.microbatches(0)
    collate_s = time.perf_counter() - t
    spec = _train_spec(cfg, logprob_chunk_size=cfg.get("chunk", 1024))
    loop = _run_starpo_loop(model, task, spec, len(mbs))
    steps = len(mbs)
    timed = mbs[1:]
    steady = loop["step_ends"][-1] - loop["step_ends"][0] + collate_s * (steps - 1) / steps
    tgt = sum(b.num_targets for b in timed)
    real = sum(b.num_tokens - b.num_pad for b in timed)
    return {
        "framework": "starpo", "steps": steps, "prep_s": prep_s, "collate_s": collate_s,
        "steady_s": steady, "e2e_s": loop["loop_s"] + collate_s,
        "trainable_tokens": sum(b.num_targets for b in mbs),
        "tokens_real": sum(b.num_tokens - b.num_pad for b in mbs),
        "tokens_computed": sum(b.num_tokens for b in mbs),
        "padding_fraction": padding_fraction(mbs),
        "trainable_tokens_per_s": tgt / steady, "tokens_per_s": real / steady,
        "flops": flops(pc, train_tokens=real, train_targets=tgt) / steady,
        "rss_after_load_mib": rss_loaded, **pc,
        "rows_shape_max": max(list(b.input_ids.shape) for b in mbs), **_loop_fields(loop, cfg),
    }


def _tokenize_pairs(tok, rows, cfg):
    from starpo.recipe import PreferenceSpec
    from starpo.stages.preference import tokenize_pairs
    spec = PreferenceSpec(loss="dpo", beta=0.1, max_length=cfg["max_length"],
                          max_prompt_length=cfg["max_length"] // 2,
                          padding_free=cfg.get("layout", "prefix") != "padded",
                          prefix_sharing=cfg.get("layout", "prefix") == "prefix")
    pairs, stats = tokenize_pairs(tok, rows, spec, on_bad_rows="error", progress=False,
                                  log=lambda *a: None)
    assert stats.truncated == 0 and len(pairs) == len(rows), stats
    return pairs, spec


def run_dpo_starpo(cfg, rep: int) -> dict:
    import copy
    from starpo.runtime import Runtime
    from starpo.train.refcache import compute_reference
    from starpo.train.preference import PreferenceTask
    from benchmarks import variants as V

    tok, model, pc, rss_loaded, rows = load_measured(cfg)
    t0 = time.perf_counter()
    pairs, spec = _tokenize_pairs(tok, rows, cfg)
    prep_s = time.perf_counter() - t0
    bs = cfg["batch_size"]
    layout, cap, lpk = cfg.get("layout", "prefix"), cfg.get("row_cap"), cfg.get("logprobs", "chunked")
    ref_mode = cfg.get("ref", "cache")                # cache | inline
    library_path = cfg.get("library", False)          # starpo's own code, unmodified
    ref_s, ref_c, ref_r, ref_model = 0.0, None, None, None
    t0 = time.perf_counter()
    if ref_mode == "cache":
        if library_path:
            ref_c, ref_r = compute_reference(model, pairs, Runtime.cpu(), batch_size=bs,
                                             prefix_sharing=layout == "prefix", progress=False,
                                             compile=cfg.get("compile", False))
        else:
            ref_c, ref_r = V.reference_pass(model, pairs, batch_size=bs, logprobs=lpk,
                                            collate=V.collate_fn(layout, cap, tok.pad_token_id))
        ref_s = time.perf_counter() - t0
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    rss_after_ref = current_rss_mib()
    if library_path:
        from starpo.train.preference import one_row
        task = PreferenceTask(pairs, spec, batch_size=bs, pad_id=tok.pad_token_id, seed=0,
                              ref_chosen=ref_c, ref_rejected=ref_r,
                              one_row=one_row(model, spec))   # what the DPO stage does
    else:
        task = V.BenchPreferenceTask(pairs, spec, batch_size=bs, pad_id=tok.pad_token_id,
                                     seed=0, collate=V.collate_fn(layout, cap, tok.pad_token_id),
                                     logprobs=lpk, ref_model=ref_model, ref_chosen=ref_c,
                                     ref_rejected=ref_r)
    t = time.perf_counter()
    mbs = task.microbatches(0)
    collate_s = time.perf_counter() - t
    loop = _run_starpo_loop(model, task, _train_spec(cfg), len(mbs))
    steps = len(mbs)
    timed = mbs[1:]
    steady = loop["step_ends"][-1] - loop["step_ends"][0] + collate_s * (steps - 1) / steps
    timed_pairs = sum(b.num_seqs // 2 for b in timed)
    s_per_pair = steady / timed_pairs + ref_s / len(pairs)
    tokens_real = sum(b.num_tokens - b.num_pad for b in timed)
    targets = sum(b.num_targets for b in timed)
    # reference pass work pro-rated to the timed pairs; with inline reference it is a
    # forward inside the step over the same tokens
    frac = timed_pairs / len(pairs)
    all_real = sum(b.num_tokens - b.num_pad for b in mbs)
    all_tgt = sum(b.num_targets for b in mbs)
    f = flops(pc, train_tokens=tokens_real, train_targets=targets,
              ref_tokens=tokens_real if ref_mode == "inline" else all_real * frac,
              ref_targets=targets if ref_mode == "inline" else all_tgt * frac)
    return {
        "framework": "starpo", "steps": steps, "pairs": len(pairs), "prep_s": prep_s,
        "ref_s": ref_s, "collate_s": collate_s, "steady_s": steady,
        "e2e_s": ref_s + loop["loop_s"] + collate_s,
        "pairs_per_s": 1.0 / s_per_pair,
        "train_pairs_per_s": timed_pairs / steady,
        "padding_fraction": sum(b.num_pad for b in mbs) / sum(b.num_tokens for b in mbs),
        "tokens_computed": sum(b.num_tokens for b in mbs), "tokens_real": all_real,
        "rows_per_batch_mean": sum(b.input_ids.shape[0] for b in mbs) / steps,
        "row_len_max": max(b.input_ids.shape[1] for b in mbs),
        "flops": f / (steady + ref_s * frac),
        "rss_after_load_mib": rss_loaded, "rss_after_ref_mib": rss_after_ref, **pc,
        **_loop_fields(loop, cfg),
    }


# ----------------------------------------------------------------------------- TRL

class _StepTimes:
    def __init__(self):
        self.ends: list[float] = []
        self.units: list[float] = []      # per micro-batch (compute_loss call)
        self.targets: list[int] = []
        self.tokens: list[int] = []
        self.pad: list[int] = []


def _trl_callback(times: _StepTimes):
    import torch
    from transformers import TrainerCallback

    class CB(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            # on a GPU the step's kernels may still be queued: its end is when they finish
            # (starpo's loop reads the loss before its step ends, which waits the same way)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            times.ends.append(time.perf_counter())

    return CB()


def _clear_datasets_tmp() -> None:
    """Forget the datasets cache files of earlier repetitions in this process, so every
    repetition tokenizes and computes TRL's reference log-probs afresh (the in-memory
    dataset's fingerprint is deterministic, so a later repetition would hit the cache)."""
    import shutil
    from datasets.fingerprint import get_temporary_cache_files_directory
    d = Path(get_temporary_cache_files_directory())
    for p in d.iterdir():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _trl_common(cfg, out_dir: str) -> dict:
    return dict(output_dir=out_dir, per_device_train_batch_size=cfg["batch_size"],
                gradient_accumulation_steps=1, num_train_epochs=1,
                learning_rate=cfg.get("lr", 1e-5), lr_scheduler_type="cosine",
                warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False,
                use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**6,
                disable_tqdm=True, dataloader_num_workers=0, seed=0,
                optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95,
                # TRL 1.x's SFTConfig/DPOConfig default to True; the benchmark runs both
                gradient_checkpointing=cfg.get("gradient_checkpointing", False))


# the TRL arguments printed with the results (what decides its speed and memory)
TRL_SETTINGS = ("gradient_checkpointing", "gradient_checkpointing_kwargs", "packing",
                "packing_strategy", "padding_free", "assistant_only_loss", "max_length",
                "precompute_ref_log_probs", "precompute_ref_batch_size", "loss_type",
                "per_device_train_batch_size", "bf16", "fp16", "use_cpu", "torch_compile",
                "optim", "use_liger_kernel")


def trl_settings(args) -> dict:
    out = {}
    for k in TRL_SETTINGS:
        if hasattr(args, k):
            v = getattr(args, k)
            out[k] = v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
    return out


def run_sft_trl(cfg, rep: int) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok, model, pc, rss_loaded, rows = load_measured(cfg)
    times = _StepTimes()

    class Timed(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            lab = inputs["labels"]
            times.targets.append(int((lab[..., 1:] != -100).sum()))
            n = inputs["input_ids"].numel()
            times.tokens.append(n)
            am = inputs.get("attention_mask")
            times.pad.append(int(n - am.sum()) if am is not None else 0)
            return super().compute_loss(model, inputs, *a, **kw)

    _clear_datasets_tmp()
    with tempfile.TemporaryDirectory() as d:
        args = SFTConfig(**_trl_common(cfg, d), max_length=cfg["max_length"], packing=True,
                         packing_strategy=cfg.get("packing_strategy", "bfd"),
                         assistant_only_loss=True)
        t0 = time.perf_counter()
        trainer = Timed(model=model, args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tok, callbacks=[_trl_callback(times)])
        prep_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        trainer.train()
        t2 = time.perf_counter()
    steps = len(times.ends)
    steady = times.ends[-1] - times.ends[0]
    tgt, real = sum(times.targets[1:]), sum(times.tokens[1:]) - sum(times.pad[1:])
    return {
        "framework": "trl", "steps": steps, "prep_s": prep_s, "steady_s": steady,
        "e2e_s": t2 - t1, "trainable_tokens": sum(times.targets),
        "tokens_real": sum(times.tokens) - sum(times.pad), "tokens_computed": sum(times.tokens),
        "padding_fraction": sum(times.pad) / max(1, sum(times.tokens)),
        "trainable_tokens_per_s": tgt / steady, "tokens_per_s": real / steady,
        "flops": flops(pc, train_tokens=real, train_targets=tgt) / steady,
        "rss_after_load_mib": rss_loaded, **pc,
        "packing_strategy": cfg.get("packing_strategy", "bfd"),
        "torch_threads": torch.get_num_threads(), "trl_settings": trl_settings(args),
    }


def timed_dpo_trainer(base, times: "_StepTimes", ref: dict):
    """``base`` (TRL's ``DPOTrainer``) recording, per training micro-batch, pairs, target
    and computed tokens and padding into ``times``, and the reference pass's seconds
    (``ref["s"]``) and the RSS after it (``ref["rss"]``) — the same measurement for the CPU
    benchmark and the GPU check (scripts/gpu_bench.py)."""

    class Timed(base):
        def _precompute_ref_logps(self, *a, **kw):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **kw)
            ref["s"] += time.perf_counter() - t
            ref["rss"] = current_rss_mib()
            return out

        def compute_loss(self, model, inputs, *a, **kw):
            cm = inputs["completion_mask"]
            times.units.append(cm.shape[0] // 2)
            times.targets.append(int(cm[..., 1:].sum()))
            n = inputs["input_ids"].numel()
            am = inputs.get("attention_mask")      # absent in TRL's padding-free batches
            times.tokens.append(n)
            times.pad.append(int(n - am.sum()) if am is not None else 0)
            return super().compute_loss(model, inputs, *a, **kw)

    return Timed


def run_dpo_trl(cfg, rep: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok, model, pc, rss_loaded, rows = load_measured(cfg)
    times = _StepTimes()
    ref = {"s": 0.0, "rss": 0.0}
    Timed = timed_dpo_trainer(DPOTrainer, times, ref)

    _clear_datasets_tmp()   # TRL caches reference log-probs by data+weights fingerprint
    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(**_trl_common(cfg, d), max_length=cfg["max_length"],
                         precompute_ref_log_probs=True,
                         precompute_ref_batch_size=cfg.get("ref_batch_size", cfg["batch_size"]),
                         beta=0.1, loss_type=["sigmoid"])
        t0 = time.perf_counter()
        trainer = Timed(model=model, args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tok, callbacks=[_trl_callback(times)])
        init_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        trainer.train()
        t2 = time.perf_counter()
    n_pairs = len(rows)
    steps = len(times.ends)
    steady = times.ends[-1] - times.ends[0]
    timed_pairs = sum(times.units[1:])
    s_per_pair = steady / timed_pairs + ref["s"] / n_pairs
    real = sum(times.tokens[1:]) - sum(times.pad[1:])
    tgt = sum(times.targets[1:])
    frac = timed_pairs / n_pairs
    f = flops(pc, train_tokens=real, train_targets=tgt, ref_tokens=real, ref_targets=tgt)
    return {
        "framework": "trl", "steps": steps, "pairs": n_pairs, "prep_s": init_s - ref["s"],
        "ref_s": ref["s"], "steady_s": steady, "e2e_s": init_s + (t2 - t1),
        "pairs_per_s": 1.0 / s_per_pair, "train_pairs_per_s": timed_pairs / steady,
        "padding_fraction": sum(times.pad) / sum(times.tokens),
        "tokens_computed": sum(times.tokens),
        "tokens_real": sum(times.tokens) - sum(times.pad),
        "flops": f / (steady + ref["s"] * frac),
        "rss_after_load_mib": rss_loaded, "rss_after_ref_mib": ref["rss"], **pc,
        "trl_settings": trl_settings(args),
    }


# ----------------------------------------------------------------------------- profile

def _category(name: str) -> str:
    n = name.lower()
    if "scaled_dot_product" in n or "attention" in n:
        return "attention (sdpa fwd+bwd)"
    if n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"):
        return "matmul (linear layers + LM head)"
    if "cpp_fused" in n or "triton_" in n:      # inductor kernels: graph_<id>_cpp_fused_…
        return "fused kernels (inductor)"
    if n.startswith("aten::_foreach") or "optimizer" in n:
        return "optimizer (AdamW, clipping)"
    if n in ("aten::where", "aten::logical_and", "aten::logical_or", "aten::eq", "aten::ge",
             "aten::le", "aten::lt", "aten::gt", "aten::index", "aten::arange"):
        return "masks / indexing"
    if n.startswith("aten::") or n.startswith("autograd") or "backward" in n:
        return "elementwise + other aten"
    return "python / framework"


def run_profile(cfg, rep: int) -> dict:
    """torch.profiler over starpo's training steps (forward, backward, gradient clipping,
    AdamW) on the first micro-batches, eager or with ``train.compile`` (``cfg["compile"]``).

    Self CPU time is grouped by operator family; ``top_ops`` keeps the biggest operators.
    The same steps are also timed without the profiler (``steps_s``) and their model FLOPs
    (:func:`flops`) counted, so the report can put the step's share of the matmul peak
    beside the profile. ``mm_flops``/``mm_s``: the FLOPs the profiler attributes to the
    matmul operators and their self time, i.e. how fast the matmuls themselves run at
    this model's shapes. With compile, inductor's fused C++ kernels are recorded as
    profiler events of their own (``cpp.enable_kernel_profile``).
    """
    import contextlib
    import torch
    from torch.profiler import ProfilerActivity, profile
    from benchmarks import variants as V
    from starpo.model import compile as C

    tok, model = load(cfg)
    pc = param_counts(model)
    model.train()
    rows = json.loads(Path(cfg["data"]).read_text())
    fn = V.logprob_fn(cfg.get("logprobs", "chunked"))
    n_batches = cfg.get("profile_batches", 3)
    if cfg["what"] == "dpo":
        pairs, _ = _tokenize_pairs(tok, rows, cfg)
        collate = V.collate_fn(cfg.get("layout", "prefix"), cfg.get("row_cap"), tok.pad_token_id)
        bs = cfg["batch_size"]
        batches = [collate([p.as_dict() for p in pairs[k:k + bs]])
                   for k in range(0, min(len(pairs), n_batches * bs), bs)]
    else:
        from starpo.data.packing import layout_sft, sft_microbatches
        from starpo.stages.sft import tokenize_sft_rows
        docs = tokenize_sft_rows(tok, rows, progress=False)
        layout = layout_sft(docs, mode="pack", loss_masking=True, max_length=cfg["max_length"])
        from starpo.model.attention import one_row_batches
        batches = sft_microbatches(layout, batch_size=cfg["batch_size"], pad_id=tok.pad_token_id,
                                   seed=0, epoch=0,
                                   flat=one_row_batches(model, prefix_shared=False))[:n_batches]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95))

    def step(b):
        lp = fn(model, b)[0]
        lp.sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    compiled = bool(cfg.get("compile", False))
    if compiled:
        import torch._inductor.config as ic
        ic.cpp.enable_kernel_profile = True
    with C.compiled_blocks(model, compiled) if compiled else contextlib.nullcontext():
        t = time.perf_counter()
        step(batches[0])                       # warm-up (and compilation)
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        for b in batches[1:]:
            step(b)
        steps_s = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            t = time.perf_counter()
            for b in batches[1:]:
                step(b)
            wall = time.perf_counter() - t
    cats: dict[str, float] = {}
    ops = []
    mm_flops = mm_us = 0.0
    for e in prof.key_averages():
        cat = _category(e.key)
        cats[cat] = cats.get(cat, 0.0) + e.self_cpu_time_total
        ops.append((e.self_cpu_time_total, e.key, e.count))
        if cat.startswith("matmul"):
            mm_flops += float(getattr(e, "flops", 0) or 0)
            mm_us += e.self_cpu_time_total
    total = sum(cats.values())
    ops.sort(reverse=True)
    real = sum(b.num_tokens - b.num_pad for b in batches[1:])
    tgt = sum(b.num_targets for b in batches[1:])
    return {"what": cfg["what"], "logprobs": cfg.get("logprobs", "chunked"),
            "segments": cfg.get("segments", True), "compile": compiled,
            "profiled_s": wall, "steps_s": steps_s, "first_step_s": first_s,
            "batches": len(batches) - 1,
            "shapes": [list(b.input_ids.shape) for b in batches[1:]],
            "flops": flops(pc, train_tokens=real, train_targets=tgt) / steps_s,
            "mm_flops": mm_flops, "mm_s": mm_us / 1e6,
            "categories": {k: v / total for k, v in sorted(cats.items(), key=lambda x: -x[1])},
            "top_ops": [{"op": k, "share": v / total, "calls": c} for v, k, c in ops[:12]],
            **({"compile_stats": dict(C.LAST)} if compiled else {})}


# ----------------------------------------------------------------------------- pipeline

def _timed(module, name: str, sink: dict, count=None):
    """Wrap ``module.name`` so that its calls add their wall time (and ``count(result)``
    items) to ``sink``; the function itself is unchanged (a benchmark-side timer)."""
    real = getattr(module, name)

    def wrapped(*a, **k):
        t = time.perf_counter()
        out = real(*a, **k)
        sink["s"] = sink.get("s", 0.0) + time.perf_counter() - t
        if count is not None:
            sink["n"] = sink.get("n", 0) + count(out)
        return out
    setattr(module, name, wrapped)


def _median_of(path: Path, key: str):
    if not path.is_file():
        return None
    vals = [json.loads(line).get(key) for line in path.open() if line.strip()]
    vals = sorted(v for v in vals if isinstance(v, (int, float)))
    return vals[len(vals) // 2] if vals else None


def run_pipeline(cfg, rep: int) -> dict:
    """One quickstart-shaped run (``cfg["recipe"]`` with ``cfg["overrides"]``) through
    ``starpo.run.pipeline``, and a row per stage: seconds, optimizer steps, training
    tokens/s (median of the loop's logged windows), and for the online and eval stages the
    time and throughput of sampling (generated tokens/s) and judging (responses/s).

    The online stage's phases come from its ``round_<k>/round.json``; the eval stage has
    no phase timer of its own, so its sampling, judging and log-prob calls are timed by
    wrapping them here (``_timed``; what they compute is unchanged)."""
    import torch
    from starpo.metrics import evaluation as E
    from starpo.recipe import load_recipe
    from starpo.run import pipeline
    torch.set_num_threads(cfg["threads"])
    ev = {"sampling": {}, "judging": {}, "logprobs": {}}
    _timed(E, "sample_model", ev["sampling"], lambda ms: sum(ms.n_tokens))
    _timed(E, "score_in_chunks", ev["judging"], len)
    _timed(E, "_logprobs_under_sft", ev["logprobs"])
    rec = load_recipe(cfg["recipe"], cfg.get("overrides") or [])
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        t0 = time.perf_counter()
        pipeline.run(rec, out, log=lambda m: None, progress=False, report=False)
        total = time.perf_counter() - t0
        stages = []
        for st in rec.stages:
            info = json.loads((out / st.name / "stage.json").read_text())
            row = {"stage": st.name, "type": st.type, "seconds": info.get("seconds"),
                   "steps": info.get("steps")}
            tps = _median_of(out / st.name / "metrics.jsonl", "tokens_per_s")
            if tps is not None and st.type != "online":
                row["train_tokens_per_s"] = tps
            if st.type == "online":
                ph = {"sampling": 0.0, "judging": 0.0, "training": 0.0}
                gen_tok = gen_s = judged = steps = 0
                for rj in sorted(out.joinpath(st.name).glob("round_*/round.json")):
                    r = json.loads(rj.read_text())
                    for k in ph:
                        ph[k] += r.get("seconds", {}).get(k, 0.0)
                    gen_tok += r["sampling"]["tokens"]
                    gen_s += r["sampling"]["seconds"]
                    judged += r["sampling"]["sequences"]
                    steps += r.get("steps") or 0
                row.update(steps=steps, sampling_s=ph["sampling"], judging_s=ph["judging"],
                           training_s=ph["training"], generated_tokens=gen_tok,
                           sampling_tokens_per_s=gen_tok / gen_s if gen_s else None,
                           judged=judged,
                           judging_per_s=judged / ph["judging"] if ph["judging"] else None)
            if st.type == "eval":
                smp, jud = ev["sampling"], ev["judging"]
                row.update(sampling_s=smp.get("s"), generated_tokens=smp.get("n"),
                           sampling_tokens_per_s=smp["n"] / smp["s"] if smp.get("s") else None,
                           judging_s=jud.get("s"), judged=jud.get("n"),
                           judging_per_s=jud["n"] / jud["s"] if jud.get("s") else None,
                           logprobs_s=ev["logprobs"].get("s"))
            stages.append(row)
    return {"total_s": total, "stages": stages, "recipe": str(cfg["recipe"]),
            "overrides": cfg.get("overrides") or []}


KINDS = {"matmul": run_matmul, "sft_starpo": run_sft_starpo, "sft_trl": run_sft_trl,
         "dpo_starpo": run_dpo_starpo, "dpo_trl": run_dpo_trl, "profile": run_profile,
         "pipeline": run_pipeline}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def main(argv: list[str]) -> int:
    """Run ``cfg["reps"]`` repetitions (fresh weights from disk each time) and write the
    median of every numeric field, the per-repetition values of the headline fields, and
    the peak RSS after the first repetition (one run's peak) and after all of them."""
    import gc
    cfg = json.loads(Path(argv[0]).read_text())
    if cfg.get("compile"):
        # a cold inductor cache: the compile time a first run pays
        import shutil
        cache = tempfile.mkdtemp(prefix="starpo-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        import atexit
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    t = time.perf_counter()
    reps, peak_first = [], None
    for rep in range(cfg.get("reps", 1)):
        reps.append(KINDS[cfg["kind"]](cfg, rep))
        gc.collect()
        if peak_first is None:
            peak_first = rss_mib()
    out = {}
    for k, v in reps[0].items():
        if k.startswith("rss_"):
            out[k] = v                  # memory checkpoints: the first (fresh) repetition
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = _median([r[k] for r in reps])
        else:
            out[k] = v
    for k in ("pairs_per_s", "trainable_tokens_per_s", "train_pairs_per_s", "steady_s",
              "ref_s", "gflops_best"):
        if k in reps[0]:
            out[f"{k}_reps"] = [r[k] for r in reps]
    import torch
    out.update(peak_rss_mib=peak_first, peak_rss_all_reps_mib=rss_mib(),
               wall_s=time.perf_counter() - t, reps=len(reps),
               torch_threads=torch.get_num_threads(), name=cfg["name"], kind=cfg["kind"])
    Path(argv[1]).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
