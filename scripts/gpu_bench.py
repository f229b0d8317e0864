"""starpo vs TRL on one GPU: SFT and DPO side by side, a larger-work SFT for MFU, and the
HF backend's sampling throughput (online rounds, evaluation).

    python scripts/gpu_bench.py all --model DIR [--large DIR] --out DIR [--configs A,B] [--budget S]
    python scripts/gpu_bench.py one NAME --model DIR --out FILE.json
    python scripts/gpu_bench.py list                # the configurations, in the order they run

Every configuration runs in its own process with its own time limit, so a crash or a hang
leaves the others' figures and each peak GPU memory is its own. They run in the order of
:data:`CONFIGS` (most needed first); ``--budget`` caps the whole run, and a configuration
that no longer fits is reported as skipped, not run half. Both frameworks get the same
weights, tokenizer and rows (``benchmarks.assets``: pseudo-word conversations with
log-uniform lengths), the same batch size and maximum length, sdpa (flash-attention 2
where the package is installed) and bf16 autocast over fp32 master weights (starpo: dtype
"auto" + the loop's mixed precision; TRL: ``bf16=True``), SFT packing (starpo: best-fit
rows, one flat row per micro-batch; TRL: ``packing_strategy="bfd"``), DPO with a
precomputed reference (starpo: its reference cache with prefix sharing; TRL:
``precompute_ref_log_probs=True``), AdamW with torch's fused kernel on the GPU (starpo's
choice for CUDA parameters, TRL's default; the foreach kernel on a CPU).

The configurations:

    sft-/dpo-starpo-KERNEL  starpo with ``model.packed_attention: KERNEL`` (varlen, flex;
                            segments, the per-document loop, only when asked for). On a
                            GPU where the kernel is not offered (starpo would run another)
                            the configuration is skipped and says which would run.
    sft-/dpo-trl[-gc]       TRL with gradient checkpointing off, and on (``-gc``, TRL 1.x's
                            default); speed ratios compare with TRL's fastest, memory
                            ratios with its leanest, and with the same setting
    sft-/dpo-starpo-varlen-gc  starpo with ``train.gradient_checkpointing: true``: its
                            memory against TRL's at the same (TRL's default) setting
    sft-large-starpo-varlen the larger-work configuration: the ``--large`` model (~1.4B,
                            Qwen2-1.5B's widths) and 32 rows of 1024 tokens per optimizer
                            step (16 per micro-batch, 2 accumulated), where MFU means
                            something: 8k tokens per step do not fill an H200
    *-compiled              the same with ``train.compile: true`` (SFT, base and larger
                            work): regional compilation of the decoder blocks
    generation              HF-backend sampling: the online stage's (the training policy,
                            fp32 weights, 4 samples per prompt, temperature 0.8) and the
                            evaluation's (the model loaded for inference, 121 prompts,
                            temperature 0.7, top-p 0.9), 128 new tokens each

Measured (the first ``warm_steps`` optimizer steps are excluded: one-time costs, and flex
attention's compilations for the first shapes; ≥ 30 steps are timed on a GPU):

    tokens/s     non-pad tokens of the timed steps / their wall time (the end of each
                 step is taken after a CUDA synchronisation, in both frameworks)
    pairs/s      1 / (steady_s / timed pairs + reference_s / all pairs)   (DPO)
    peak GiB     torch.cuda.max_memory_allocated() over training (and the reference pass),
                 after the model is loaded (its weights count, nothing before)
    MFU          model FLOPs / time, against the H200's dense bf16 datasheet peak (989
                 TFLOP/s) and against the 790 TFLOP/s an 8192³ bf16 matmul reaches on it;
                 model FLOPs = 6·N_body·tokens + 6·H·V·targets (+ 2·N_body·ref tokens +
                 2·H·V·ref targets for the reference pass): the 6·N·D rule on the
                 non-embedding parameters, the LM head on the positions that are scored;
                 attention scores (∝ L²) and recomputation under checkpointing are not
                 counted (benchmarks.worker.flops)
    gen tok/s    generated tokens (stop tokens included) / decoding time, after a warm-up
                 call of 4 new tokens

Writes ``OUT/bench.json`` and ``OUT/bench.md`` (the table, ratios last), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

DATASHEET_BF16_FLOPS = 989e12    # H200 SXM, dense bf16 (NVIDIA's datasheet)
MEASURED_BF16_FLOPS = 790e12     # an 8192³ bf16 matmul through PyTorch on the lent H200
# HF-backend eval sampling on the first GPU run (2026-12-04, BENCHMARKS.md): the baseline
# of the "≥ 5× today's sampling" target
FIRST_RUN_SAMPLING_TOKENS_PER_S = 940.0
# Targets of the GPU-speed work (BENCHMARKS.md, "GPU check"), shown beside the ratios
TARGETS = {"sft_speed": 2.0, "dpo_speed": 4.0, "mfu_large": 0.35, "sampling": 5.0}

# The base sizes: 8 rows of 1024 tokens per SFT step, 16 pairs per DPO step, 32 steps of
# which the first 2 are not timed. Rows are generated with headroom; max_steps stops both
# frameworks at ``steps``.
SIZES = {"sft_convs": 1100, "sft_batch": 8, "sft_len": 1024, "grad_accum": 1,
         "dpo_pairs": 544, "dpo_batch": 16, "dpo_len": 1024, "lo": 8, "hi": 120,
         "steps": 32, "warm_steps": 2,
         "online_prompts": 32, "online_n": 4, "eval_prompts": 121, "new_tokens": 128}
# the larger-work configuration: 32 rows of 1024 tokens per optimizer step
LARGE_SIZES = {"sft_convs": 4400, "sft_batch": 16, "grad_accum": 2}


@dataclass(frozen=True)
class Config:
    name: str
    kind: str                   # "sft" | "dpo" | "gen"
    framework: str              # "starpo" | "trl"
    kernel: str | None = None   # starpo: the model.packed_attention it asks for
    gc: bool = False            # gradient checkpointing
    compiled: bool = False      # starpo: train.compile (regional torch.compile of the blocks)
    large: bool = False         # the --large model and LARGE_SIZES
    limit_s: int = 60           # seconds for its whole process on one H200
    default: bool = True        # run by ``all`` without --configs

    @property
    def setting(self) -> str:
        if self.kind == "gen":
            return "HF backend"
        what = f"packed_attention={self.kernel}" if self.framework == "starpo" else \
            "packing bfd" if self.kind == "sft" else "precomputed reference"
        return (f"{what}, gradient checkpointing {'on' if self.gc else 'off'}"
                + (", blocks compiled" if self.compiled else ""))


# In the order they run: what the targets need first (the fastest kernel, TRL's fastest
# setting, the larger work, sampling), then TRL's default setting (and starpo at it),
# then the other kernels.
# Limits: process start, imports, model load, data, warm-up and 32 steps on one H200.
CONFIGS = [
    Config("sft-starpo-varlen", "sft", "starpo", kernel="varlen", limit_s=40),
    Config("sft-trl", "sft", "trl", limit_s=50),
    Config("dpo-starpo-varlen", "dpo", "starpo", kernel="varlen", limit_s=45),
    Config("dpo-trl", "dpo", "trl", limit_s=60),
    Config("sft-large-starpo-varlen", "sft", "starpo", kernel="varlen", large=True,
           limit_s=90),
    Config("generation", "gen", "starpo", limit_s=60),
    Config("sft-trl-gc", "sft", "trl", gc=True, limit_s=50),
    Config("dpo-trl-gc", "dpo", "trl", gc=True, limit_s=60),
    # the memory target at TRL's default setting: both with checkpointing on
    Config("sft-starpo-varlen-gc", "sft", "starpo", kernel="varlen", gc=True, limit_s=45),
    Config("dpo-starpo-varlen-gc", "dpo", "starpo", kernel="varlen", gc=True, limit_s=50),
    Config("sft-starpo-flex", "sft", "starpo", kernel="flex", limit_s=70),
    Config("dpo-starpo-flex", "dpo", "starpo", kernel="flex", limit_s=70),
    # train.compile on top of the varlen kernel (the attention stays eager between the
    # compiled halves of each block): whether fusing the blocks' elementwise work moves
    # the MFU; the compilation falls into the two untimed warm-up steps
    Config("sft-starpo-varlen-compiled", "sft", "starpo", kernel="varlen", compiled=True,
           limit_s=90),
    Config("sft-large-starpo-varlen-compiled", "sft", "starpo", kernel="varlen",
           compiled=True, large=True, limit_s=120),
    # the per-document loop: the old GPU default (3k tokens/s on the first run), a reference
    Config("sft-starpo-segments", "sft", "starpo", kernel="segments", limit_s=120,
           default=False),
    Config("dpo-starpo-segments", "dpo", "starpo", kernel="segments", limit_s=120,
           default=False),
    Config("sft-large-trl", "sft", "trl", large=True, limit_s=120, default=False),
]
BY_NAME = {c.name: c for c in CONFIGS}
MIN_LIMIT_S = 10     # a configuration with less time left is skipped, not started


def sizes_for(cfg: Config, sizes: dict, large_sizes: dict | None = None) -> dict:
    """The sizes ``cfg`` runs with: ``sizes``, with ``large_sizes`` over them for the
    larger-work configurations."""
    return {**sizes, **(large_sizes if large_sizes is not None else LARGE_SIZES)} \
        if cfg.large else dict(sizes)


def _cuda():
    import torch
    return torch.cuda.is_available()


def _sync():
    import torch
    if _cuda():
        torch.cuda.synchronize()


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
    _sync()
    return time.perf_counter() - t


def _starpo_model(model_dir: str, kernel: str | None = None, *, for_training: bool = True):
    from starpo.model import loading
    from starpo.recipe import ModelSpec
    spec = ModelSpec(name_or_path=model_dir, dtype="auto", attn_implementation=_attn(),
                     packed_attention=kernel or "auto")
    tok = loading.load_tokenizer(model_dir, spec)
    model = loading.load_model(model_dir, spec, for_training=for_training, tokenizer=tok,
                               device="cuda" if _cuda() else "cpu")
    return tok, model


def _kernel(model, cfg: Config, *, prefix_shared: bool) -> str | None:
    """The kernel starpo runs ``cfg``'s packed rows with on this model and device."""
    from starpo.model.attention import local_attention, prefix_attention
    return (prefix_attention if prefix_shared else local_attention)(model)


def _not_offered(cfg: Config, kernel: str | None) -> dict | None:
    """On a GPU, a configuration whose kernel this device does not offer is not run (its
    figures would be another configuration's); on a CPU (the wiring check) it runs with
    what starpo picks there, and the table says which."""
    if kernel != cfg.kernel and _cuda():
        return {"skipped": f"packed_attention={cfg.kernel} is not offered on this GPU "
                           f"(starpo would run {kernel})", "kernel": kernel}
    return None


def _train_spec(sizes: dict, batch_size: int, cfg: Config):
    from starpo.recipe import TrainSpec
    return TrainSpec(lr=1e-5, epochs=1, max_steps=sizes["steps"], batch_size=batch_size,
                     grad_accum=sizes["grad_accum"], scheduler="cosine", warmup_ratio=0.0,
                     log_every=1,                              # on_step: every step
                     mixed_precision="auto", max_grad_norm=1.0, gradient_checkpointing=cfg.gc,
                     compile=cfg.compiled)


def _loop(model, task, spec) -> tuple[list[float], int]:
    """starpo's training loop; the end time of every optimizer step (the loop reads the
    step's loss before ``on_step``, so the GPU has finished it)."""
    from starpo.train.loop import LoopHooks, run_loop
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        res = run_loop(model, task, spec, Path(d), seed=0, progress=False,
                       hooks=LoopHooks(on_step=lambda step, rec: ends.append(time.perf_counter())))
    return ends, res.steps


def _enough(n_micro: int, sizes: dict, what: str) -> None:
    need = sizes["steps"] * sizes["grad_accum"]
    if n_micro < need:
        raise SystemExit(f"{what}: {n_micro} micro-batches, {need} needed for "
                         f"{sizes['steps']} steps (raise the row count in the sizes)")
    if sizes["steps"] <= sizes["warm_steps"]:
        raise SystemExit(f"steps ({sizes['steps']}) must exceed warm_steps "
                         f"({sizes['warm_steps']}): nothing would be timed")


def _window(ends: list[float], sizes: dict) -> tuple[float, int]:
    """``(seconds, timed steps)``: from the end of the last untimed step to the end of the
    last step."""
    w = sizes["warm_steps"]
    if len(ends) <= max(w, 1):
        raise SystemExit(f"only {len(ends)} optimizer step(s): timing needs more than "
                         f"{max(w, 1)}")
    return ends[-1] - ends[w - 1] if w else ends[-1] - ends[0], len(ends) - max(w, 1)


def sft_starpo(cfg: Config, model_dir: str, sizes: dict) -> dict:
    from benchmarks.worker import flops, param_counts
    from starpo.data.packing import layout_sft
    from starpo.model.layout import row_cap
    from starpo.stages.sft import SFTTask, tokenize_sft_rows
    tok, model = _starpo_model(model_dir, cfg.kernel)
    kernel = _kernel(model, cfg, prefix_shared=False)
    if (skip := _not_offered(cfg, kernel)) is not None:
        return skip
    pc = param_counts(model)
    warm = _warm(model)
    docs = tokenize_sft_rows(tok, _rows("sft", sizes), progress=False, log=lambda *a: None)
    layout = layout_sft(docs, mode="pack", loss_masking=True, max_length=sizes["sft_len"], seed=0)
    flat = row_cap(model, sizes["sft_len"], prefix_shared=False) is None   # as the stage does
    task = SFTTask(layout, batch_size=sizes["sft_batch"], pad_id=tok.pad_token_id, seed=0,
                   flat=flat)
    mbs = task.microbatches(0)
    _enough(len(mbs), sizes, "SFT")
    _peak_reset()
    ends, steps = _loop(model, task, _train_spec(sizes, sizes["sft_batch"], cfg))
    steady, timed_steps = _window(ends, sizes)
    ga = sizes["grad_accum"]
    timed = mbs[max(sizes["warm_steps"], 1) * ga: steps * ga]
    real = sum(b.num_tokens - b.num_pad for b in timed)
    tgt = sum(b.num_targets for b in timed)
    return {"steps": steps, "timed_steps": timed_steps, "steady_s": steady, "warmup_s": warm,
            "tokens_per_step": real / timed_steps, "tokens_per_s": real / steady,
            "trainable_tokens_per_s": tgt / steady, "peak_gib": _peak_gib(),
            "flops_per_s": flops(pc, train_tokens=real, train_targets=tgt) / steady,
            "truncated": layout.truncated, "kernel": kernel, **pc}


def dpo_starpo(cfg: Config, model_dir: str, sizes: dict) -> dict:
    import torch
    from benchmarks.worker import flops, param_counts
    from starpo.data.prefbatch import collate_prefix_shared
    from starpo.model.logprobs import sequence_logprobs
    from starpo.recipe import PreferenceSpec
    from starpo.runtime import Runtime
    from starpo.stages.preference import tokenize_pairs
    from starpo.train.preference import PreferenceTask, one_row
    from starpo.train.refcache import compute_reference
    tok, model = _starpo_model(model_dir, cfg.kernel)
    kernel = _kernel(model, cfg, prefix_shared=True)
    if (skip := _not_offered(cfg, kernel)) is not None:
        return skip
    pc = param_counts(model)
    spec = PreferenceSpec(loss="dpo", beta=0.1, max_length=sizes["dpo_len"],
                          max_prompt_length=sizes["dpo_len"] // 2)
    pairs, _ = tokenize_pairs(tok, _rows("dpo", sizes), spec, on_bad_rows="skip",
                              progress=False, log=lambda *a: None)
    warm = _warm(model)
    t = time.perf_counter()
    dev = next(model.parameters()).device
    for n in (2, 5):   # two shapes, with and without gradients: flex attention's compilations
        b = collate_prefix_shared([p.as_dict() for p in pairs[:n]], dense_mask=False).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=_cuda()):
            with torch.no_grad():
                sequence_logprobs(model, b)
            sums = sequence_logprobs(model, b)[0]
        sums.sum().backward()
        model.zero_grad(set_to_none=True)
    _sync()
    warm += time.perf_counter() - t
    runtime = Runtime.create()
    _peak_reset()
    t = time.perf_counter()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=_cuda()):
        ref_c, ref_r = compute_reference(model, pairs, runtime, batch_size=sizes["dpo_batch"],
                                         progress=False)
    _sync()
    ref_s = time.perf_counter() - t
    task = PreferenceTask(pairs, spec, batch_size=sizes["dpo_batch"], pad_id=tok.pad_token_id,
                          seed=0, ref_chosen=ref_c, ref_rejected=ref_r,
                          one_row=one_row(model, spec))
    mbs = task.microbatches(0)
    _enough(len(mbs), sizes, "DPO")
    ends, steps = _loop(model, task, _train_spec(sizes, sizes["dpo_batch"], cfg))
    steady, timed_steps = _window(ends, sizes)
    ga = sizes["grad_accum"]
    timed = mbs[max(sizes["warm_steps"], 1) * ga: steps * ga]
    timed_pairs = sum(b.num_seqs // 2 for b in timed)
    real = sum(b.num_tokens - b.num_pad for b in timed)
    tgt = sum(b.num_targets for b in timed)
    frac = timed_pairs / len(pairs)
    all_real = sum(b.num_tokens - b.num_pad for b in mbs)
    all_tgt = sum(b.num_targets for b in mbs)
    f = flops(pc, train_tokens=real, train_targets=tgt, ref_tokens=all_real * frac,
              ref_targets=all_tgt * frac)
    return {"steps": steps, "timed_steps": timed_steps, "pairs": len(pairs),
            "steady_s": steady, "ref_s": ref_s, "warmup_s": warm,
            "tokens_per_step": real / timed_steps, "tokens_per_s": real / steady,
            "pairs_per_s": 1.0 / (steady / timed_pairs + ref_s / len(pairs)),
            "train_pairs_per_s": timed_pairs / steady,
            "peak_gib": _peak_gib(), "flops_per_s": f / (steady + ref_s * frac),
            "one_row": task.one_row, "kernel": kernel, **pc}


def _trl_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=_attn())
    model.config.use_cache = False
    return tok, model.to("cuda" if _cuda() else "cpu")


def _trl_args(out_dir: str, sizes: dict, batch_size: int, gc: bool) -> dict:
    # gradient_checkpointing always set: TRL 1.x's SFTConfig/DPOConfig default it to True
    return dict(output_dir=out_dir, per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=sizes["grad_accum"], max_steps=sizes["steps"],
                learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, bf16=_cuda(), use_cpu=not _cuda(),
                report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                dataloader_num_workers=0, seed=0,
                # transformers' default on torch >= 2.8, as starpo's on CUDA parameters
                optim="adamw_torch_fused" if _cuda() else "adamw_torch",
                adam_beta1=0.9, adam_beta2=0.95, gradient_checkpointing=gc)


def _trl_timed(times, sizes: dict) -> tuple[float, int, int, int]:
    """``(seconds, timed steps, real tokens, targets)`` of TRL's timed steps."""
    steady, timed_steps = _window(times.ends, sizes)
    skip = max(sizes["warm_steps"], 1) * sizes["grad_accum"]
    real = sum(times.tokens[skip:]) - sum(times.pad[skip:])
    return steady, timed_steps, real, sum(times.targets[skip:])


def sft_trl(cfg: Config, model_dir: str, sizes: dict) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from benchmarks.worker import _StepTimes, _trl_callback, flops, param_counts, trl_settings
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
        args = SFTConfig(**_trl_args(d, sizes, sizes["sft_batch"], cfg.gc),
                         max_length=sizes["sft_len"], packing=True, packing_strategy="bfd",
                         assistant_only_loss=True)
        trainer = Timed(model=model, args=args, train_dataset=Dataset.from_list(_rows("sft", sizes)),
                        processing_class=tok, callbacks=[_trl_callback(times)])
        _peak_reset()
        trainer.train()
    steady, timed_steps, real, tgt = _trl_timed(times, sizes)
    return {"steps": len(times.ends), "timed_steps": timed_steps, "steady_s": steady,
            "warmup_s": warm, "tokens_per_step": real / timed_steps,
            "tokens_per_s": real / steady, "trainable_tokens_per_s": tgt / steady,
            "peak_gib": _peak_gib(),
            "flops_per_s": flops(pc, train_tokens=real, train_targets=tgt) / steady,
            "trl_settings": trl_settings(args), **pc}


def dpo_trl(cfg: Config, model_dir: str, sizes: dict) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from benchmarks.worker import (_StepTimes, _trl_callback, flops, param_counts,
                                   timed_dpo_trainer, trl_settings)
    tok, model = _trl_model(model_dir)
    pc = param_counts(model)
    warm = _warm(model)
    times = _StepTimes()
    ref = {"s": 0.0, "rss": 0.0}
    Timed = timed_dpo_trainer(DPOTrainer, times, ref)

    rows = _rows("dpo", sizes)
    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(**_trl_args(d, sizes, sizes["dpo_batch"], cfg.gc),
                         max_length=sizes["dpo_len"], precompute_ref_log_probs=True,
                         precompute_ref_batch_size=sizes["dpo_batch"], beta=0.1,
                         loss_type=["sigmoid"], padding_free=_attn() != "sdpa")
        _peak_reset()
        trainer = Timed(model=model, args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tok, callbacks=[_trl_callback(times)])
        trainer.train()
    steady, timed_steps, real, tgt = _trl_timed(times, sizes)
    skip = max(sizes["warm_steps"], 1) * sizes["grad_accum"]
    timed_pairs = sum(times.units[skip:])
    frac = timed_pairs / len(rows)
    f = flops(pc, train_tokens=real, train_targets=tgt, ref_tokens=real, ref_targets=tgt)
    return {"steps": len(times.ends), "timed_steps": timed_steps, "pairs": len(rows),
            "steady_s": steady, "ref_s": ref["s"], "warmup_s": warm,
            "tokens_per_step": real / timed_steps, "tokens_per_s": real / steady,
            "pairs_per_s": 1.0 / (steady / timed_pairs + ref["s"] / len(rows)),
            "train_pairs_per_s": timed_pairs / steady,
            "peak_gib": _peak_gib(), "flops_per_s": f / (steady + ref["s"] * frac),
            "trl_settings": trl_settings(args), **pc}


# --------------------------------------------------------------------------- generation

def gen_starpo(cfg: Config, model_dir: str, sizes: dict) -> dict:
    """Sampling as the online stage does it (its policy: the model loaded for training,
    fp32 master weights, several samples per prompt) and as evaluation does it (the model
    loaded for inference, one sample per prompt), through
    :func:`benchmarks.generation.time_generation`: the default decoder (on CUDA the
    static-cache one with a CUDA-graph decode step), and for evaluation also transformers'
    ``generate`` (what the first GPU run measured at ~940 tokens/s), so the table has the
    speed-up on the same machine."""
    import torch
    from benchmarks.generation import time_generation, world_prompts
    prompts = world_prompts(max(sizes["online_prompts"], sizes["eval_prompts"]))
    out = {"timer": "benchmarks.generation.time_generation"}
    tok, policy = _starpo_model(model_dir)
    _peak_reset()
    out["online"] = time_generation(policy, tok, prompts=prompts[:sizes["online_prompts"]],
                                    new_tokens=sizes["new_tokens"], n=sizes["online_n"],
                                    batch_size=32, temperature=0.8, top_p=1.0)
    out["online"]["peak_gib"] = _peak_gib()
    del policy
    if _cuda():
        torch.cuda.empty_cache()
    tok, model = _starpo_model(model_dir, for_training=False)
    for key, decoder in (("eval", "auto"), ("eval_generate", "generate")):
        _peak_reset()
        out[key] = time_generation(model, tok, prompts=prompts[:sizes["eval_prompts"]],
                                   new_tokens=sizes["new_tokens"], n=1, batch_size=64,
                                   temperature=0.7, top_p=0.9, decoder=decoder)
        out[key]["peak_gib"] = _peak_gib()
        out[key]["dtype"] = str(next(model.parameters()).dtype)
    return out


RUNNERS = {("sft", "starpo"): sft_starpo, ("sft", "trl"): sft_trl,
           ("dpo", "starpo"): dpo_starpo, ("dpo", "trl"): dpo_trl,
           ("gen", "starpo"): gen_starpo}


# --------------------------------------------------------------------------- the table

def _f(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _fastest(res: dict, kind: str, key: str, large: bool = False):
    trl = [(n, r) for n, r in res.items() if BY_NAME.get(n) and BY_NAME[n].kind == kind
           and BY_NAME[n].framework == "trl" and BY_NAME[n].large == large and key in r]
    return max(trl, key=lambda x: x[1][key]) if trl else None


def _leanest(res: dict, kind: str, large: bool = False):
    trl = [(n, r) for n, r in res.items() if BY_NAME.get(n) and BY_NAME[n].kind == kind
           and BY_NAME[n].framework == "trl" and BY_NAME[n].large == large
           and r.get("peak_gib") is not None]
    return min(trl, key=lambda x: x[1]["peak_gib"]) if trl else None


def ratios(res: dict) -> list[list[str]]:
    """``[metric, starpo configuration, against, value, target]`` rows: speed against
    TRL's fastest setting, memory against its leanest and against the same checkpointing
    setting, MFU of the larger work, sampling against the first GPU run."""
    rows = []
    for name, r in res.items():
        cfg = BY_NAME.get(name)
        if cfg is None or cfg.framework != "starpo" or "tokens_per_s" not in r:
            continue
        key = "pairs_per_s" if cfg.kind == "dpo" else "tokens_per_s"
        if r.get("kernel") != cfg.kernel:          # a CPU run: say what actually ran
            name = f"{name} (ran {r.get('kernel')})"
        label = "DPO pairs/s (reference pass included)" if cfg.kind == "dpo" else "SFT tokens/s"
        target = TARGETS["dpo_speed" if cfg.kind == "dpo" else "sft_speed"]
        if cfg.large:
            label = "SFT tokens/s, larger work"
        best = _fastest(res, cfg.kind, key, cfg.large)
        if best:
            v = r[key] / best[1][key]
            rows.append([label, name, f"TRL fastest = {best[0]}", f"{v:.2f}×",
                         f"≥ {target:g}×" if not cfg.large else "(info)"])
        lean = _leanest(res, cfg.kind, cfg.large)
        if lean and r.get("peak_gib"):
            rows.append([f"{cfg.kind.upper()} peak GPU memory (< 1 is leaner)", name,
                         f"TRL leanest = {lean[0]}", f"{r['peak_gib'] / lean[1]['peak_gib']:.2f}×",
                         "(info)"])
        same = [(n, x) for n, x in res.items() if BY_NAME.get(n) and BY_NAME[n].kind == cfg.kind
                and BY_NAME[n].framework == "trl" and BY_NAME[n].gc == cfg.gc
                and BY_NAME[n].large == cfg.large and x.get("peak_gib")]
        if same and r.get("peak_gib"):
            n, x = same[0]
            rows.append([f"{cfg.kind.upper()} peak GPU memory, same checkpointing", name,
                         n, f"{r['peak_gib'] / x['peak_gib']:.2f}×", "≤ 1×"])
        if cfg.large:
            rows.append(["MFU, larger work", name, "989 TFLOP/s (datasheet)",
                         f"{r['flops_per_s'] / DATASHEET_BF16_FLOPS:.1%}",
                         f"≥ {TARGETS['mfu_large']:.0%}"])
            rows.append(["MFU, larger work", name, "790 TFLOP/s (measured matmul)",
                         f"{r['flops_per_s'] / MEASURED_BF16_FLOPS:.1%}",
                         f"≥ {TARGETS['mfu_large']:.0%}"])
    gen = res.get("generation", {})
    for part in ("eval", "online"):       # the baseline was measured on eval sampling
        if isinstance(gen.get(part), dict) and gen[part].get("tokens_per_s"):
            v = gen[part]["tokens_per_s"] / FIRST_RUN_SAMPLING_TOKENS_PER_S
            rows.append([f"sampling tokens/s, {part}", "generation",
                         f"the first GPU run's eval sampling, "
                         f"{FIRST_RUN_SAMPLING_TOKENS_PER_S:.0f} tokens/s", f"{v:.2f}×",
                         f"≥ {TARGETS['sampling']:g}×" if part == "eval" else "(info)"])
    if all(isinstance(gen.get(k), dict) and gen[k].get("tokens_per_s")
           for k in ("eval", "eval_generate")):
        rows.append(["sampling tokens/s, eval", "generation",
                     "transformers generate, same run",
                     f"{gen['eval']['tokens_per_s'] / gen['eval_generate']['tokens_per_s']:.2f}×",
                     "(info)"])
    return rows


def table(results: dict, order: list[str] | None = None) -> str:
    """Markdown of ``{name: result | {"error": ...} | {"skipped": ...}}``: one row per
    configuration, the sampling rows, then the ratios (last)."""
    head = ["| configuration | setting | kernel | tokens/s | pairs/s | peak GPU GiB "
            "| MFU of 989 | MFU of 790 | tokens/step | timed steps | warm-up s | wall s |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = list(head)
    names = order or [c.name for c in CONFIGS if c.name in results]
    for name in names:
        r, cfg = results.get(name) or {"error": "not run"}, BY_NAME[name]
        wall = _f(r.get("wall_s"), ".0f")
        if "error" in r or "skipped" in r:
            why = r.get("error") or f"skipped: {r['skipped']}"
            rows.append(f"| {name} | {cfg.setting} | {r.get('kernel') or ''} | ({why[:90]}) "
                        f"| | | | | | | | {wall} |")
            continue
        if cfg.kind == "gen":
            rows.append(f"| {name} | {cfg.setting} | | (below) | | | | | | | | {wall} |")
            continue
        rows.append(f"| {name} | {cfg.setting} | {r.get('kernel') or ''} "
                    f"| {r['tokens_per_s']:,.0f} | {_f(r.get('pairs_per_s'), '.1f')} "
                    f"| {_f(r.get('peak_gib'), '.2f')} "
                    f"| {r['flops_per_s'] / DATASHEET_BF16_FLOPS:.1%} "
                    f"| {r['flops_per_s'] / MEASURED_BF16_FLOPS:.1%} "
                    f"| {r.get('tokens_per_step', 0):,.0f} | {r.get('timed_steps', '')} "
                    f"| {r['warmup_s']:.1f} | {wall} |")
    gen = results.get("generation", {})
    if "online" in gen:
        rows.append(f"\nSampling, HF backend ({gen.get('timer')}):\n")
        rows.append("| what | sequences | generated tokens (of max) | seconds | tokens/s "
                    "| peak GPU GiB |")
        rows.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for part, what in (("online", "online rounds: policy (fp32 weights), 4 samples/prompt"),
                           ("eval", "evaluation: inference model, 1 sample/prompt"),
                           ("eval_generate", "evaluation, transformers generate")):
            g = gen.get(part)
            if not g:
                continue
            what += f" [{g.get('decoder', '?')}]"
            rows.append(f"| {what} | {g['sequences']} | {g['tokens']:,} ({g['max_tokens']:,}) "
                        f"| {g['seconds']:.2f} | {g['tokens_per_s']:,.0f} "
                        f"| {_f(g.get('peak_gib'), '.2f')} |")
    trl = [(n, r["trl_settings"]) for n in names if isinstance(results.get(n), dict)
           and (r := results[n]).get("trl_settings")]
    if trl:
        rows.append("\nTRL settings (from its config objects):\n")
        rows.append("| configuration | settings |")
        rows.append("| --- | --- |")
        rows += [f"| {n} | {', '.join(f'{k}={v}' for k, v in st.items() if v is not None)} |"
                 for n, st in trl]
    rat = ratios(results)
    if rat:
        rows.append("\nRatios (starpo / TRL; speed > 1 is faster, memory < 1 is leaner):\n")
        rows.append("| metric | starpo | against | value | target |")
        rows.append("| --- | --- | --- | ---: | --- |")
        rows += [f"| {' | '.join(r)} |" for r in rat]
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------- main

def select(names: str | None) -> list[Config]:
    """The configurations ``--configs`` names (comma-separated; ``default`` = the default
    set, ``all`` = every one), in the order of :data:`CONFIGS`."""
    if not names:
        return [c for c in CONFIGS if c.default]
    want = set(x.strip() for x in names.split(",") if x.strip())
    unknown = want - set(BY_NAME) - {"default", "all"}
    if unknown:
        raise SystemExit(f"unknown configuration(s): {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(BY_NAME)})")
    return [c for c in CONFIGS if c.name in want or "all" in want
            or ("default" in want and c.default)]


def plan(configs: list[Config], budget: float | None) -> list[dict]:
    """Each configuration's limit and whether it is sure to get it within ``budget`` even
    if every one before it used its whole limit (the dry run's view)."""
    out, used = [], 0.0
    for c in configs:
        out.append({"name": c.name, "limit_s": c.limit_s,
                    "sure": budget is None or used + c.limit_s <= budget})
        used += c.limit_s
    return out


def _child(cfg: Config, args, sizes: dict, res_file: Path, log_file: Path,
           limit: float, env: dict) -> int:
    model = args.large if cfg.large else args.model
    cmd = [sys.executable, __file__, "one", cfg.name, "--model", model, "--out", str(res_file),
           "--sizes", json.dumps(sizes)]
    with log_file.open("w") as log:
        try:
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=limit).returncode
        except subprocess.TimeoutExpired:
            return 124


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["all", "one", "list"])
    ap.add_argument("name", nargs="?", help="one: the configuration")
    ap.add_argument("--model", help="the base model directory (gpu_check's model step)")
    ap.add_argument("--large", help="the larger-work model directory")
    ap.add_argument("--out")
    ap.add_argument("--configs", default=None,
                    help="comma-separated names, 'default' or 'all' (default: the default set)")
    ap.add_argument("--sizes", default=None, help="JSON overrides of SIZES")
    ap.add_argument("--large-sizes", default=None, help="JSON overrides of LARGE_SIZES")
    ap.add_argument("--limit", type=float, default=None,
                    help="seconds per configuration (default: each one's own limit)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run; what no longer fits is skipped")
    a = ap.parse_args(argv)
    if a.mode == "list":
        for c in CONFIGS:
            print(f"{c.name:26s} {c.limit_s:4d} s  {'default' if c.default else 'on request'}"
                  f"  {c.setting}")
        return 0
    if not a.model or not a.out:
        ap.error("--model and --out are needed")
    sizes = {**SIZES, **json.loads(a.sizes or "{}")}
    if a.mode == "one":
        if a.name not in BY_NAME:
            ap.error(f"unknown configuration {a.name!r} (known: {', '.join(BY_NAME)})")
        cfg = BY_NAME[a.name]
        res = RUNNERS[(cfg.kind, cfg.framework)](cfg, a.model, sizes)
        Path(a.out).write_text(json.dumps(res, indent=2))
        return 0
    configs = select(a.configs)
    large = {**LARGE_SIZES, **json.loads(a.large_sizes or "{}")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + (a.budget if a.budget is not None else 1e9)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    results: dict = {}
    for cfg in configs:
        name = cfg.name
        left = deadline - time.time() - 2          # 2 s to write the results
        limit = min(a.limit or cfg.limit_s, left)
        if cfg.large and not a.large:
            results[name] = {"skipped": "no --large model"}
        elif left < MIN_LIMIT_S:
            results[name] = {"skipped": "no time left in the budget"}
        if name in results:
            print(f"[bench {name}] {results[name]['skipped']}", flush=True)
            continue
        res_file, log_file = out / f"bench-{name}.json", out / f"bench-{name}.log"
        res_file.unlink(missing_ok=True)
        t0 = time.time()
        rc = _child(cfg, a, sizes_for(cfg, sizes, large), res_file, log_file, limit, env)
        results[name] = json.loads(res_file.read_text()) if rc == 0 and res_file.is_file() \
            else {"error": f"rc {rc}{' (time limit)' if rc == 124 else ''}, see {log_file.name}"}
        results[name]["wall_s"] = round(time.time() - t0, 1)
        results[name]["limit_s"] = round(limit, 1)
        print(f"[bench {name}] rc {rc} in {results[name]['wall_s']} s (limit {limit:.0f})",
              flush=True)
    (out / "bench.json").write_text(json.dumps(
        {"sizes": sizes, "large_sizes": large, "configs": [asdict(c) for c in configs],
         "peak_flops": {"datasheet": DATASHEET_BF16_FLOPS, "measured": MEASURED_BF16_FLOPS},
         "results": results}, indent=2))
    t = table(results, [c.name for c in configs])
    (out / "bench.md").write_text(t)
    print(t)
    return 0 if all("error" not in r and "skipped" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
