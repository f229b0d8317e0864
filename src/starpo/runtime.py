"""The runtime: where this process computes, and which process it is.

Created once per run (:func:`Runtime.create`, from accelerate's process state) and passed
to every stage and component that places tensors, loads models or writes files, so that
the device is decided in exactly one place. Everything that runs a forward puts the model
there with :meth:`Runtime.model` and each batch with :meth:`Runtime.batch`: the reference
pass, held-out evaluation, sampling and judging run where the policy trains.

The decisions a library call makes without a run's Runtime (a judge, an evaluation or a
model loaded from your own code) are here too: :meth:`Runtime.local` (which device),
:meth:`Runtime.dtype` (what ``model.dtype: auto`` means there) and
:meth:`Runtime.is_main_process` (whether this process writes shared files).

This module imports nothing else of starpo (it heads the layer order).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch


@dataclass
class Runtime:
    device: torch.device
    process_index: int = 0
    num_processes: int = 1

    @classmethod
    def create(cls) -> "Runtime":
        """This process's runtime under ``accelerate launch`` (or a plain single process)."""
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
        # several processes and no GPU (`accelerate launch --multi_gpu --num_processes 2` or
        # torchrun on a CPU machine): accelerate treats them as multi-CPU (gloo) only with
        # the flag that `--cpu` sets, and `--cpu` itself starts one process; set the flag,
        # so that the Accelerator of each loop reads the same
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"
        # the flag `accelerate launch --cpu` sets; Accelerator reads it the same way, and the
        # shared state must be initialised as it would be (multi-process CPU included)
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        return cls(torch.device(state.device), state.process_index, state.num_processes)

    @classmethod
    def cpu(cls) -> "Runtime":
        return cls(torch.device("cpu"))

    @classmethod
    def local(cls, device=None) -> "Runtime":
        """One process on ``device``, for a library call made without a run's runtime; no
        device: CUDA when present, else the CPU."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(torch.device(device))

    @staticmethod
    def is_main_process() -> bool:
        """Whether this process writes the files every process would write alike, for code
        handed no runtime (the bad-rows file of :mod:`starpo.errors`): accelerate's process
        state, which :meth:`create` set up; without one, a plain single process (``RANK``)."""
        try:
            from accelerate import PartialState
            return PartialState().is_main_process
        except Exception:  # no accelerate state: a plain single process
            return os.environ.get("RANK", "0") == "0"

    @property
    def is_main(self) -> bool:
        """The process that writes files (run directories, checkpoints, caches)."""
        return self.process_index == 0

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1

    def model(self, model):
        """``model`` on this runtime's device (in place for nn.Modules; returned)."""
        return model.to(self.device)

    def batch(self, batch):
        """A batch (anything with ``.to(device)``) on this runtime's device."""
        return batch.to(self.device)

    @property
    def _bf16(self) -> bool:
        return (self.device.type == "cuda" and torch.cuda.is_available()
                and torch.cuda.is_bf16_supported())

    def mixed_precision(self, requested: str) -> str:
        """``auto`` → bf16 on a GPU that supports it, else no mixed precision."""
        if requested != "auto":
            return requested
        return "bf16" if self._bf16 else "no"

    def dtype(self, name: str) -> torch.dtype:
        """A recipe's ``model.dtype`` here: ``"auto"`` is bfloat16 on a GPU that supports it,
        float32 otherwise (the dtype of a model that only infers; one that trains keeps
        float32 master weights and gets :meth:`mixed_precision`)."""
        if name == "auto":
            return torch.bfloat16 if self._bf16 else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[name]

    def accelerator(self, mixed_precision: str = "auto"):
        """An accelerate ``Accelerator`` for one training loop on this runtime's device."""
        from accelerate import Accelerator
        acc = Accelerator(mixed_precision=self.mixed_precision(mixed_precision))
        if acc.device.type != self.device.type:
            raise RuntimeError(f"accelerate chose {acc.device}, the runtime says {self.device}")
        return acc

    @staticmethod
    def shutdown() -> None:
        """End the process group, if one was started (once, at the end of a process):
        leaving gloo's threads to static destructors at interpreter exit can abort the
        process on a loaded machine."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def wait(self) -> None:
        """Barrier across processes (a no-op in one process)."""
        if self.distributed:
            from accelerate import PartialState
            PartialState().wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (it builds and writes a file: prepared
        data, the reference log-probs, the tiny base model); the others run it after, and
        find that file there. Every process must enter it (it holds two barriers)."""
        if not self.is_main:
            self.wait()
        try:
            yield
        finally:
            if self.is_main:
                self.wait()

    # ----------------------------------------------------------------- sharding
    def shard(self, n: int) -> range:
        """This process's contiguous block of ``range(n)``: blocks in process order cover
        ``range(n)`` exactly once, so :meth:`gather` of per-block results restores the
        original order. One process gets all of it."""
        lo = n * self.process_index // self.num_processes
        hi = n * (self.process_index + 1) // self.num_processes
        return range(lo, hi)

    def gather(self, items: Sequence[Any]) -> list[Any]:
        """Every process's ``items`` (picklable objects), concatenated in process order; the
        result is the same on every process. A copy of ``items`` in one process."""
        if not self.distributed:
            return list(items)
        import torch.distributed as dist
        parts: list[Any] = [None] * self.num_processes
        dist.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process (picklable)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def release_memory() -> None:
    """Give freed model memory back (call after dropping the last reference to a model)."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
