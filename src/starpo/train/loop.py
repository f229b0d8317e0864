"""The one training loop, shared by SFT, offline *PO, reward-model and online stages.

A stage supplies a :class:`Task`: its micro-batches for an epoch, how many normalisation
units each holds (trainable tokens for SFT, pairs for DPO) and a loss that returns the
*sum* over those units. The loop divides by the units of the whole optimizer step,
counted across gradient-accumulation micro-batches and all-reduced across processes, so
neither accumulation nor the number of processes changes the loss scale.

Resuming: a checkpoint holds the weights, optimizer, scheduler, RNG states and the step.
Micro-batches are a pure function of (seed, epoch), so a resumed run replays exactly the
steps an uninterrupted run would have taken and ends at the same weights. A damaged
latest checkpoint is skipped for the one before it (:func:`starpo.train.checkpoint.resume_from`).

Preemption (:mod:`starpo.train.preempt`): a SIGTERM/SIGUSR1 during the loop lets the
current optimizer step finish; the loop then writes a checkpoint (with the metrics of the
unlogged steps, so the resumed log is the uninterrupted one) and raises ``Preempted``.
All processes stop at the same step. A signal during the last step lets the stage save
its model first.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from starpo.data.batch import TokenBatch
from starpo.errors import TrainingError
from starpo.model.compile import compiled_blocks
from starpo.recipe import TrainSpec
from starpo.runtime import Runtime
from starpo.train import preempt
from starpo.train.checkpoint import (load_checkpoint, load_sharded_checkpoint, resume_from,
                                     save_checkpoint, save_sharded_checkpoint)
from starpo.train.metrics_log import MetricsLog
from starpo.model.logprobs import TargetLogprobs
from starpo.train.task import Task


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def fused_adamw(params: Sequence[torch.Tensor]) -> bool:
    """Whether AdamW runs torch's fused kernel: every trainable parameter a plain floating
    CUDA tensor (not a sharded DTensor, nothing still on the CPU or the meta device), in a
    run that accelerate does not shard (FSDP and DeepSpeed re-home the parameters after
    the optimizer is built; they keep the multi-tensor kernel, the one tested with them).

    Why: the fused kernel updates all parameters in one pass over (param, grad, exp_avg,
    exp_avg_sq) where the multi-tensor ("foreach") one makes about ten passes, and it is
    what transformers' Trainer, hence TRL, uses by default on torch >= 2.8. On the CPU the
    foreach implementation stays: the quickstart's expected figures were measured with it
    (the two differ in the last bits). The update is the same AdamW (tests/train/test_loop.py
    holds the fused kernel to the plain one)."""
    params = list(params)
    return bool(params) and not sharded_launch() and all(
        type(p) in (torch.Tensor, nn.Parameter) and p.is_cuda and p.is_floating_point()
        for p in params)


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on norms and biases
    groups = [{"params": decay, "weight_decay": spec.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if fused_adamw(decay + no_decay) else {}
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.adam_betas, **fused)


# ----------------------------------------------------------------------------- the loop

@dataclass
class LoopResult:
    steps: int
    last_metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    # under FSDP/DeepSpeed: the full (unsharded) weights of the trained model, keys as in
    # model.state_dict(), on the main process (what save_pretrained(state_dict=...) wants);
    # None otherwise (the model itself holds them)
    state_dict: dict | None = None


def sharded(acc) -> bool:
    """Whether ``acc`` shards parameters across processes (FSDP, DeepSpeed): then only
    collective calls see whole weights, optimizer states and checkpoints."""
    from accelerate.utils import DistributedType
    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def sharded_launch() -> bool:
    """:func:`sharded` before the loop's ``Accelerator`` exists: what ``accelerate launch``
    was told (the environment it sets for FSDP and DeepSpeed configs)."""
    import os
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes")
               for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def _configure_deepspeed(acc, spec: TrainSpec, desc: str) -> None:
    """DeepSpeed wants its batch and clipping in its own config, and steps its engine at
    every backward unless told about accumulation; the loop accumulates and normalises
    itself, so only one micro-batch per step is supported there."""
    from accelerate.utils import DistributedType
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return
    if spec.grad_accum != 1:
        raise TrainingError(f"{desc}: DeepSpeed runs with train.grad_accum 1 (the engine "
                            f"steps at every backward); got {spec.grad_accum}. Raise "
                            "train.batch_size instead, or use configs/accelerate/fsdp.yaml")
    cfg = acc.state.deepspeed_plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = spec.batch_size
    cfg["gradient_accumulation_steps"] = 1
    if spec.max_grad_norm:
        cfg["gradient_clipping"] = spec.max_grad_norm


@dataclass
class LoopHooks:
    """For tests and benchmarks: ``stop_after`` ends after that many steps as if killed
    (leaving only what was checkpointed); ``on_step(step, record)`` sees every logged
    record; ``make_optimizer`` replaces AdamW."""

    stop_after: int | None = None
    on_step: Callable[[int, dict], None] | None = None
    make_optimizer: Callable[[nn.Module, TrainSpec], torch.optim.Optimizer] = make_optimizer


@dataclass
class _Schedule:
    steps_per_epoch: int
    per_proc: int
    total: int


def _schedule(first: Sequence, spec: TrainSpec, world: int, desc: str) -> _Schedule:
    per_proc = len(first) // world
    if per_proc == 0:
        raise TrainingError(f"{desc}: not enough data for one micro-batch per process "
                            f"({len(first)} micro-batches, {world} processes)")
    steps_per_epoch = math.ceil(per_proc / spec.grad_accum)
    total = spec.max_steps or max(1, math.ceil(spec.epochs * steps_per_epoch))
    return _Schedule(steps_per_epoch, per_proc, total)


def trained_microbatches(n_microbatches: int, spec: TrainSpec, world: int = 1
                         ) -> dict[int, list[int]]:
    """Which micro-batches the loop trains on: ``{epoch: sorted indices into that epoch's
    list of micro-batches (task.microbatches(epoch))}``, over all ``world`` processes.

    The same arithmetic as :func:`_run_loop` (process ``rank`` takes the epoch's list
    ``[rank::world][:per_proc]``, step ``j`` of an epoch its ``grad_accum`` micro-batches
    ``j·ga … (j+1)·ga``), so a stage can prepare only what ``max_steps`` will reach
    (the reference log-probs of the pairs it trains on); tested against the loop itself.
    An epoch the run goes through whole lists every micro-batch the loop uses."""
    if n_microbatches // world == 0:
        return {}              # the loop itself says: not enough data for one micro-batch
    sched = _schedule(range(n_microbatches), spec, world, "trained_microbatches")
    out: dict[int, set[int]] = {}
    for step in range(sched.total):
        epoch, j = divmod(step, sched.steps_per_epoch)
        lo, hi = j * spec.grad_accum, min((j + 1) * spec.grad_accum, sched.per_proc)
        got = out.setdefault(epoch, set())
        for p in range(lo, hi):
            got.update(rank + p * world for rank in range(world))
    return {e: sorted(v) for e, v in out.items()}


def _enable_checkpointing(model: nn.Module) -> None:
    # non-reentrant, with the context that keeps starpo's segment kernels on in recomputation
    from starpo.model.attention import checkpoint_kwargs
    if hasattr(model, "activation_checkpointing_enable"):     # transformers ≥ 5.x name
        model.activation_checkpointing_enable(checkpoint_kwargs())
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs())


class _Window:
    """Metric sums between two logged steps, reduced across processes when logged.

    Sums stay where the task computed them (device tensors, float64) and are read back
    once per logged step, not once per micro-batch: on a GPU every read makes the host wait
    for the device, which then idles while the host queues the next kernels."""

    def __init__(self):
        self.sums: dict[str, list] = {}
        self.tokens = 0
        self.t0 = time.time()

    def state(self) -> dict:
        """What a checkpoint keeps of the unlogged steps (the time is not kept); the sums
        read back from the device (a checkpoint is a sync point anyway)."""
        return {"sums": {k: [float(s), float(c)] for k, (s, c) in self.sums.items()},
                "tokens": self.tokens}

    def restore(self, state: dict) -> None:
        self.sums = {k: [float(s), float(c)] for k, (s, c) in state["sums"].items()}
        self.tokens = int(state["tokens"])

    def add(self, metrics: dict[str, list]) -> None:
        for name, (s, c) in metrics.items():
            w = self.sums.setdefault(name, [0.0, 0.0])
            w[0] += s
            w[1] += c

    def record(self, acc, done: int, sched: _Schedule, lr: float, t_start: float,
               world: int) -> dict:
        names = list(self.sums)
        red = {}
        if names:
            as64 = lambda v: torch.as_tensor(v, dtype=torch.float64, device=acc.device)
            sc = torch.stack([torch.stack([as64(s), as64(c)]) for s, c in
                              self.sums.values()]).float()
            t = acc.reduce(sc, reduction="sum")
            for name, ratio, c in zip(names, (t[:, 0] / t[:, 1]).tolist(), t[:, 1].tolist()):
                red[name] = ratio if c > 0 else float("nan")
        dt = max(time.time() - self.t0, 1e-9)
        return {"step": done, "epoch": round(done / sched.steps_per_epoch, 4), "lr": lr, **red,
                "tokens_per_s": self.tokens * world / dt,
                "elapsed_s": round(time.time() - t_start, 2)}


def _accumulate(acc, runtime: Runtime, module, task: Task, mbs: list[TokenBatch],
                units: float, world: int, window: _Window) -> tuple[dict[str, list], torch.Tensor]:
    """Forward and backward over one step's micro-batches. Returns the step's metric sums
    and whether every loss was finite, both still on the device (read once per step by the
    loop: a non-finite loss stops the run before the optimizer step)."""
    step_metrics: dict[str, list] = {}
    finite = torch.ones((), dtype=torch.bool, device=acc.device)
    for k, mb in enumerate(mbs):
        mb = runtime.batch(mb)
        sync = k == len(mbs) - 1
        ctx = acc.no_sync(module) if not sync and world > 1 else contextlib.nullcontext()
        with ctx:
            with acc.autocast():
                loss_sum, metrics = task.loss(module, mb)
            finite &= torch.isfinite(loss_sum.detach())
            # DDP averages gradients over processes; multiply back so the result is the
            # sum over every unit of the step divided by the global unit count
            acc.backward(loss_sum * world / units)
        window.tokens += mb.num_tokens
        for name, (s, c) in metrics.items():
            acc_s = step_metrics.setdefault(name, [0.0, 0.0])
            acc_s[0] += s
            acc_s[1] += c
    return step_metrics, finite


def run_loop(model: nn.Module, task: Task, spec: TrainSpec, out_dir: Path, *, seed: int,
             runtime: Runtime | None = None, resume: bool = False, desc: str = "train",
             progress: bool = True, hooks: LoopHooks | None = None,
             log: Callable[[str], None] = print) -> LoopResult:
    """Train ``model`` in place on ``task`` on the runtime's device (its processes). With
    ``train.compile`` its repeated blocks run compiled for the loop's duration
    (:mod:`starpo.model.compile`). ``log`` takes its messages (main process only)."""
    runtime = runtime or Runtime.create()
    log = log if runtime.is_main else (lambda msg: None)
    with compiled_blocks(model, spec.compile, device=runtime.device, what=desc,
                         sharded=sharded_launch(), log=log), \
            preempt.section(desc, defer=True):
        return _run_loop(model, task, spec, out_dir, seed=seed, runtime=runtime,
                         resume=resume, desc=desc, progress=progress, hooks=hooks, say=log)


def _resume(acc, runtime: Runtime, ckpt_dir: Path, raw, optimizer, scheduler,
            say: Callable[[str], None]) -> dict | None:
    """The state of the newest intact checkpoint, loaded into the model, optimizer,
    scheduler and RNGs (``None``: none). With several processes the main one picks it
    (verifying it once) and every process loads that one."""
    def load(p: Path) -> dict:
        if sharded(acc):
            return load_sharded_checkpoint(acc, p, scheduler)
        return load_checkpoint(p, raw, optimizer, scheduler)
    if not runtime.distributed:
        return resume_from(ckpt_dir, load, log=say)
    picked = resume_from(ckpt_dir, lambda p: {"path": str(p)}, log=say) \
        if runtime.is_main else None
    picked = runtime.broadcast(picked)
    return load(Path(picked["path"])) if picked is not None else None


def _run_loop(model: nn.Module, task: Task, spec: TrainSpec, out_dir: Path, *, seed: int,
              runtime: Runtime, resume: bool, desc: str, progress: bool,
              hooks: LoopHooks | None, say: Callable[[str], None]) -> LoopResult:
    hooks = hooks or LoopHooks()
    acc = runtime.accelerator(spec.mixed_precision)
    world, rank = acc.num_processes, acc.process_index
    seed_everything(seed)
    if spec.gradient_checkpointing:
        _enable_checkpointing(model)
    model.train()
    module = task.module(model, spec) if hasattr(task, "module") else \
        TargetLogprobs(model, spec.logprob_chunk_size)

    first = task.microbatches(0)
    sched = _schedule(first, spec, world, desc)
    total = sched.total
    warmup = int(spec.warmup_ratio * total)
    _configure_deepspeed(acc, spec, desc)
    optimizer = hooks.make_optimizer(model, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec.scheduler, warmup,
                                                                       total))
    # the scheduler is not prepared: accelerate's wrapper steps it once per process per
    # optimizer step (it assumes a schedule counted in per-process batches), and ours is
    # counted in optimizer steps of the global batch
    module, optimizer = acc.prepare(module, optimizer)
    raw = acc.unwrap_model(module).model

    ckpt_dir = out_dir / "checkpoints"
    start = 0
    window = _Window()
    if resume:
        state = _resume(acc, runtime, ckpt_dir, raw, optimizer, scheduler, say)
        if state is not None:
            start = int(state["step"])
            if world == 1 and state.get("window"):   # the unlogged steps before it
                window.restore(state["window"])
    log = MetricsLog(out_dir, resume_step=start) if acc.is_main_process else None

    cache: dict[int, list[TokenBatch]] = {0: first}

    def epoch_batches(e: int) -> list[TokenBatch]:
        if e not in cache:
            cache.clear()
            cache[e] = task.microbatches(e)
        return cache[e][rank::world][:sched.per_proc]

    bar = tqdm(total=total, initial=start, desc=desc,
               disable=not (progress and acc.is_main_process), dynamic_ncols=True)
    t0 = time.time()
    last: dict = {}
    step = start

    def checkpoint(done: int) -> Path:
        acc.wait_for_everyone()
        if sharded(acc):       # every process writes its shards
            return save_sharded_checkpoint(acc, ckpt_dir, done, scheduler,
                                           spec.keep_checkpoints)
        path = ckpt_dir / f"step_{done:07d}"
        if acc.is_main_process:
            extra = {"window": window.state()} if world == 1 else {}
            save_checkpoint(ckpt_dir, done, raw, optimizer, scheduler, extra,
                            spec.keep_checkpoints)
        return path

    for step in range(start, total):
        if hooks.stop_after is not None and step - start >= hooks.stop_after:
            break
        epoch, j = divmod(step, sched.steps_per_epoch)
        mbs = epoch_batches(epoch)[j * spec.grad_accum:(j + 1) * spec.grad_accum]
        units = float(sum(task.units(b) for b in mbs))
        if world > 1:
            units = acc.reduce(torch.tensor(units, device=acc.device), reduction="sum").item()
        if units <= 0:
            raise TrainingError(f"{desc}: step {step + 1} has no trainable units")
        step_metrics, finite = _accumulate(acc, runtime, module, task, mbs, units,
                                             world, window)
        # the step's one read from the device: the losses must be finite before the update,
        # and with several processes whether any of them was asked to stop
        flags = torch.stack([(~finite).float(), torch.tensor(
            float(preempt.requested() is not None), device=acc.device)])
        nonfinite, stop_any = acc.reduce(flags, reduction="sum").tolist()
        if nonfinite > 0:
            _stop_non_finite(acc, optimizer, scheduler, raw, ckpt_dir, step, spec, desc, bar, log)
        grad_norm = None
        if spec.max_grad_norm:
            gn = acc.clip_grad_norm_(module.parameters(), spec.max_grad_norm)
            grad_norm = gn.detach().double() if gn is not None else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.add(step_metrics)
        if grad_norm is not None:
            window.add({"grad_norm": [grad_norm, 1]})
        done = step + 1
        if done % spec.log_every == 0 or done == total:
            rec = window.record(acc, done, sched, scheduler.get_last_lr()[0], t0, world)
            if log:
                log.write(rec)
            last = rec
            if hooks.on_step:
                hooks.on_step(done, rec)
            bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items()
                             if k in ("loss", "reward_accuracy", "grad_norm")})
            window = _Window()
        bar.update(1)
        saved = None
        if spec.save_every and done % spec.save_every == 0 and done < total:
            saved = checkpoint(done)
        # one process: the signal as of now; several: as of the step's read, so that all
        # of them stop after the same step
        stop = preempt.requested() is not None if world == 1 else stop_any > 0
        if done < total and stop:
            path = saved or checkpoint(done)
            bar.close()
            if log:
                log.close()
            raise preempt.Preempted(
                f"{desc}: preempted ({preempt.requested() or 'signal'}) at step {done} of "
                f"{total}; checkpoint saved ({path}); rerun the same command to resume")
    bar.close()
    if log:
        log.close()
    acc.wait_for_everyone()
    full = None
    if sharded(acc):
        # collective: every process takes part, the main one receives the whole weights
        # (FSDP: full state dict; ZeRO-3: the 16-bit consolidated one the config asks for)
        sd = acc.get_state_dict(module)
        full = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")} \
            if sd is not None and acc.is_main_process else None
    ran = (step + 1) if hooks.stop_after is None else min(total, start + hooks.stop_after)
    return LoopResult(steps=ran, last_metrics=last, seconds=time.time() - t0, state_dict=full)


def _stop_non_finite(acc, optimizer, scheduler, raw, ckpt_dir, step, spec, desc, bar, log):
    """A NaN/inf loss on any process: keep the weights of the last good step, save them,
    and stop with one line that says where they are."""
    optimizer.zero_grad(set_to_none=True)
    path = None
    if acc.is_main_process:
        path = save_checkpoint(ckpt_dir, step, raw, optimizer, scheduler,
                               {"reason": "non-finite loss"}, spec.keep_checkpoints)
    bar.close()
    if log:
        log.close()
    raise TrainingError(
        f"{desc}: loss became NaN/inf at step {step + 1}; stopped before updating "
        f"the weights. The last good state (after step {step}) is saved at {path}. "
        f"Lower train.lr or check the data.")
