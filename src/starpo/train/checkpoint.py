"""Resumable training state: weights, optimizer, scheduler, RNG states and the step, one
directory per checkpoint, each written atomically (a kill never leaves a half checkpoint
that a resume would read)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from starpo.fileio import atomic_dir


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
    atomic_dir(final, write)
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


# ----------------------------------------------------------------- FSDP / DeepSpeed

def save_sharded_checkpoint(acc, ckpt_dir: Path, step: int, scheduler, keep: int) -> Path:
    """A checkpoint of a sharded run (FSDP, DeepSpeed): called on every process.

    Weights and optimizer go through ``accelerator.save_state`` (each process writes its
    part, in the strategy's own layout), the schedule, RNG and step are ours. It is
    written into a temporary directory that the main process renames once every process
    has finished, so a kill never leaves a checkpoint that a resume would read."""
    final = ckpt_dir / f"step_{step:07d}"
    tmp = ckpt_dir / f".tmp-step_{step:07d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp / "accelerate"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "sharded": True}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        old = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_sharded_checkpoint(acc, path: Path, scheduler) -> dict:
    """Resume a sharded run from :func:`save_sharded_checkpoint`'s directory (every
    process)."""
    state = json.loads((path / "state.json").read_text())
    if not state.get("sharded"):
        raise ValueError(f"{path}: written by a run without FSDP/DeepSpeed; resume it with "
                         "the same accelerate config it was started with")
    acc.load_state(str(path / "accelerate"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state
