"""The one training loop, shared by SFT, offline *PO, reward-model and online stages.

A stage supplies a :class:`Task`: its micro-batches for an epoch, how many normalisation
units each holds (trainable tokens for SFT, pairs for DPO) and a loss that returns the
*sum* over those units. The loop divides by the units of the whole optimizer step,
counted across gradient-accumulation micro-batches and all-reduced across processes, so
neither accumulation nor the number of processes changes the loss scale.

Resuming: a checkpoint holds the weights, optimizer, scheduler, RNG states and the step.
Micro-batches are a pure function of (seed, epoch), so a resumed run replays exactly the
steps an uninterrupted run would have taken and ends at the same weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from starpo.batch import TokenBatch
from starpo.config import TrainSpec
from starpo.errors import TrainingError

Metrics = dict[str, tuple[float, float]]  # name -> (sum, count); averaged as sum/count


class Task(Protocol):
    def microbatches(self, epoch: int) -> list[TokenBatch]: ...
    def units(self, batch: TokenBatch) -> float: ...
    def loss(self, module: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, Metrics]: ...


class TargetLogprobs(nn.Module):
    """Wraps a causal LM so that ``forward`` returns per-sequence log-probs of the targets.

    The wrapper is what accelerate prepares (DDP/FSDP hooks fire on its forward), and its
    forward never materialises full-vocabulary logits (see :mod:`starpo.logprobs`).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: TokenBatch):
        from starpo.logprobs import sequence_logprobs
        return sequence_logprobs(self.model, batch, chunk_size=self.chunk_size)


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


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on norms and biases
    groups = [{"params": decay, "weight_decay": spec.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.adam_betas)


# ----------------------------------------------------------------------------- checkpoints

def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a directory next to ``final`` and rename it into place in one step."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    # plain tensors and strings only, so the file loads with torch.load(weights_only=True)
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "python": json.dumps(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32),
                         int(state["numpy_pos"]), 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, optimizer, scheduler,
                    extra: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    final = ckpt_dir / f"step_{step:07d}"
    # contiguous clones: safetensors refuses tied (shared) tensors
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}

    def write(d: Path) -> None:
        save_file(sd, str(d / "model.safetensors"))
        torch.save(optimizer.state_dict(), d / "optimizer.pt")
        torch.save(scheduler.state_dict(), d / "scheduler.pt")
        torch.save(_rng_state(), d / "rng.pt")
        (d / "state.json").write_text(json.dumps({"step": step, **extra}))

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _atomic_dir(final, write)
    old = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    done = sorted(p for p in ckpt_dir.glob("step_*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    sd = load_file(str(path / "model.safetensors"))
    model.load_state_dict(sd, strict=True)
    # weights_only: checkpoints are never unpickled as arbitrary objects
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


# ----------------------------------------------------------------------------- logging

class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) plus TensorBoard scalars."""

    def __init__(self, out_dir: Path, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = out_dir / "metrics.jsonl"
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # a resumed run rewrites the steps after its checkpoint: drop them first
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if resume_step and rec.get("step", 0) <= resume_step:
                    keep.append(line)
            self.path.write_text("".join(l + "\n" for l in keep))
        self.tb = None
        # inside a pipeline its trackers (starpo.trackers) take the metrics, TensorBoard too
        from starpo.trackers import current
        self.trackers = current()
        if tensorboard and self.trackers is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # tensorboard missing: jsonl is the contract, TB a convenience
                self.tb = None

    def write(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, rec["step"])
        if self.trackers is not None:
            self.trackers.log(rec, self.path.parent)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


# ----------------------------------------------------------------------------- the loop

@dataclass
class LoopResult:
    steps: int
    last_metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def _accelerator(spec: TrainSpec):
    from accelerate import Accelerator
    mp = spec.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=mp)


def run_loop(model: nn.Module, task: Task, spec: TrainSpec, out_dir: Path, *, seed: int,
             resume: bool = False, desc: str = "train", accelerator=None,
             stop_after: int | None = None, progress: bool = True,
             on_step: Callable[[int, dict], None] | None = None,
             make_opt: Callable[[nn.Module, TrainSpec], torch.optim.Optimizer] = make_optimizer,
             module_factory: Callable[[nn.Module, TrainSpec], nn.Module] | None = None
             ) -> LoopResult:
    """Train ``model`` in place on ``task``. ``stop_after`` (tests) ends after that many
    steps as if killed, leaving only what was checkpointed."""
    from tqdm.auto import tqdm

    acc = accelerator or _accelerator(spec)
    world, rank = acc.num_processes, acc.process_index
    seed_everything(seed)
    if spec.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):     # transformers ≥ 5.x name
            model.activation_checkpointing_enable({"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    module = module_factory(model, spec) if module_factory is not None else \
        TargetLogprobs(model, spec.logprob_chunk_size)

    first = task.microbatches(0)
    per_proc = len(first) // world
    if per_proc == 0:
        raise TrainingError(f"{desc}: not enough data for one micro-batch per process "
                            f"({len(first)} micro-batches, {world} processes)")
    steps_per_epoch = math.ceil(per_proc / spec.grad_accum)
    total = spec.max_steps or max(1, math.ceil(spec.epochs * steps_per_epoch))
    warmup = int(spec.warmup_ratio * total)

    optimizer = make_opt(model, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec.scheduler, warmup,
                                                                       total))
    module, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)
    raw = acc.unwrap_model(module).model

    ckpt_dir = out_dir / "checkpoints"
    start = 0
    if resume:
        ck = latest_checkpoint(ckpt_dir)
        if ck is not None:
            state = load_checkpoint(ck, raw, optimizer, scheduler)
            start = int(state["step"])
    log = MetricsLog(out_dir, resume_step=start) if acc.is_main_process else None

    cache: dict[int, list[TokenBatch]] = {0: first}

    def epoch_batches(e: int) -> list[TokenBatch]:
        if e not in cache:
            cache.clear()
            cache[e] = task.microbatches(e)
        mbs = cache[e]
        return mbs[rank::world][:per_proc]

    bar = tqdm(total=total, initial=start, desc=desc, disable=not (progress and
                                                                  acc.is_main_process),
               dynamic_ncols=True)
    t0, window_t = time.time(), time.time()
    window: dict[str, list[float]] = {}
    window_tokens = 0
    last: dict = {}
    step = start
    for step in range(start, total):
        if stop_after is not None and step - start >= stop_after:
            break
        epoch, j = divmod(step, steps_per_epoch)
        mbs = epoch_batches(epoch)[j * spec.grad_accum:(j + 1) * spec.grad_accum]
        units = torch.tensor(float(sum(task.units(b) for b in mbs)), device=acc.device)
        units = acc.reduce(units, reduction="sum")
        if units.item() <= 0:
            raise TrainingError(f"{desc}: step {step + 1} has no trainable units")
        step_metrics: dict[str, list[float]] = {}
        finite = True
        for k, mb in enumerate(mbs):
            mb = mb.to(acc.device)
            sync = k == len(mbs) - 1
            ctx = acc.no_sync(module) if not sync and world > 1 else _nullctx()
            with ctx:
                with acc.autocast():
                    loss_sum, metrics = task.loss(module, mb)
                if not torch.isfinite(loss_sum.detach()):
                    finite = False
                    break
                # DDP averages gradients over processes; multiply back so the result is
                # the sum over every unit of the step divided by the global unit count
                acc.backward(loss_sum * world / units)
            window_tokens += mb.num_tokens
            for name, (s, c) in metrics.items():
                acc_s = step_metrics.setdefault(name, [0.0, 0.0])
                acc_s[0] += float(s)
                acc_s[1] += float(c)
        flag = torch.tensor(0.0 if finite else 1.0, device=acc.device)
        if acc.reduce(flag, reduction="sum").item() > 0:
            optimizer.zero_grad(set_to_none=True)
            # the weights are still those after the last good step: keep them
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
        grad_norm = None
        if spec.max_grad_norm:
            gn = acc.clip_grad_norm_(module.parameters(), spec.max_grad_norm)
            grad_norm = float(gn) if gn is not None else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for name, (s, c) in step_metrics.items():
            w = window.setdefault(name, [0.0, 0.0])
            w[0] += s
            w[1] += c
        if grad_norm is not None:
            w = window.setdefault("grad_norm", [0.0, 0.0])
            w[0] += grad_norm
            w[1] += 1
        done = step + 1
        if done % spec.log_every == 0 or done == total:
            red = {}
            for name, (s, c) in window.items():
                t = acc.reduce(torch.tensor([s, c], device=acc.device), reduction="sum")
                red[name] = float(t[0] / t[1]) if t[1] > 0 else float("nan")
            dt = max(time.time() - window_t, 1e-9)
            rec = {"step": done, "epoch": round(done / steps_per_epoch, 4),
                   "lr": scheduler.get_last_lr()[0], **red,
                   "tokens_per_s": window_tokens * world / dt,
                   "elapsed_s": round(time.time() - t0, 2)}
            if log:
                log.write(rec)
            last = rec
            if on_step:
                on_step(done, rec)
            bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items()
                             if k in ("loss", "reward_accuracy", "grad_norm")})
            window, window_tokens, window_t = {}, 0, time.time()
        bar.update(1)
        if spec.save_every and done % spec.save_every == 0 and done < total:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_checkpoint(ckpt_dir, done, raw, optimizer, scheduler, {},
                                spec.keep_checkpoints)
    bar.close()
    if log:
        log.close()
    acc.wait_for_everyone()
    ran = (step + 1) if stop_after is None else min(total, start + stop_after)
    return LoopResult(steps=ran, last_metrics=last, seconds=time.time() - t0)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
