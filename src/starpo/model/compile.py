"""Regional compilation (``train.compile: true``): each repeated transformer block is
compiled with ``torch.compile``, the rest of the model stays eager.

Why regional. Compiling the whole model makes one big graph per distinct input shape and
layout; compiling the decoder block instead makes one small graph that every layer of the
model reuses (the layers share a class and parameter shapes, so dynamo's guards match all
of them), which keeps the compile cost to that of one layer. The block is where the
elementwise work that compilation fuses lives (RMSNorm, rotary embeddings, the SiLU gate,
residual adds); the embedding, the final norm and the chunked LM head
(:mod:`starpo.model.logprobs`, a custom autograd function that recomputes its logits in
backward) stay eager.

Shapes. Packed rows vary in length from step to step, so blocks are compiled with
``dynamic=True``: one graph with a symbolic sequence length instead of a recompilation per
length. A few variants still compile once each — training (with autograd) and the
reference pass (no grad), a micro-batch of one row and one of several rows (size 1 is
specialised), segment attention and whole-row attention (different code paths).

Segment and varlen attention (:mod:`starpo.model.attention`) read each row's documents
from its ``position_ids`` in Python (``tolist``, a loop over segments): traced, they would
recompile for every new set of document lengths. Their attention functions are therefore registered
wrapped in ``torch.compiler.disable``: inside a compiled block the graph stops before the
attention kernel and resumes after it (two graphs per block, the attention eager between
them). Everything else it needs (``config._attn_implementation`` switched per forward) is a
guard dynamo checks on every call.

Scope. Blocks are compiled when the training loop (or the reference pass) starts and
returned to eager when it ends — generation, evaluation and saving always see the plain
module — and dynamo's in-memory caches are reset then, so the stages of one run do not
pile up entries against its per-function recompile limit (inductor's on-disk cache keeps
the compiled kernels, so a later stage with the same block shapes compiles faster).
``nn.Module.compile`` compiles the module in place, so parameter names and state dict keys
do not change (no ``_orig_mod.`` prefix): checkpoints and ``save_pretrained`` are the same
as without compile.

Where it does not apply, the model runs eager with one logged line saying why: no
repeated blocks found, FSDP/DeepSpeed-sharded models (not tested with them). Where it
cannot run at all (no C++ compiler for inductor's CPU code, no Triton on a GPU), one error
says so and how to go on.

Equality with eager: ``tests/model/test_compile.py`` (losses and gradients of an SFT packed
batch and a DPO prefix-shared batch, float32, within 1e-5 relative). Whether it pays off:
``docs/performance.md`` (measured compile time and step time).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Callable

import torch
from torch import nn

from starpo.errors import TrainingError
from starpo.model import attention
from starpo.model.logprobs import unwrap_model

# dynamo's counts (:func:`counters`) of the last ``compiled_blocks`` block, taken before
# its caches were reset; for benchmarks and tests
LAST: dict[str, int] = {}


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model`` (wrappers looked through): the modules whose class
    is named in the model's ``_no_split_modules`` (transformers' decoder-layer classes, e.g.
    ``LlamaDecoderLayer``), else the children of its longest ``nn.ModuleList`` whose
    children all have one class. ``[]`` if neither exists."""
    core = unwrap_model(model)
    names = set(getattr(core, "_no_split_modules", None) or [])
    found = [m for m in core.modules() if type(m).__name__ in names] if names else []
    if found:
        return found
    lists = [m for m in core.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(c) for c in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def _cxx() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def check_available(device: torch.device | str) -> None:
    """Raise :class:`~starpo.errors.TrainingError` (one line: what is missing, how to go
    on) when ``torch.compile`` cannot compile for ``device``."""
    kind = torch.device(device).type
    hint = "or set train.compile: false"
    if not hasattr(torch, "compile"):
        raise TrainingError(f"train.compile: this torch ({torch.__version__}) has no "
                            f"torch.compile; install torch >= 2.2 {hint}")
    if kind == "cpu" and _cxx() is None:
        raise TrainingError("train.compile: torch.compile on CPU (inductor) needs a C++ "
                            "compiler and none was found (g++, c++, clang++ or $CXX); "
                            f"install one (e.g. apt-get install g++) {hint}")
    if kind == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            raise TrainingError("train.compile: torch.compile on a GPU needs Triton, which "
                                f"is not installed (pip install triton) {hint}")


def keep_segment_attention_eager() -> Callable[[], None]:
    """Register the attention functions that read the row layout in Python (segment and
    varlen attention) wrapped in ``torch.compiler.disable`` (see the module docstring): a
    compiled block runs them eagerly between two graphs. Returns the function that
    registers the plain ones again (called when the compiled region ends, so that sampling
    and evaluation afterwards do not go through dynamo's wrapper)."""
    from transformers import AttentionInterface
    attention.register()
    plain = {}
    for name in (attention.NAME, attention.VARLEN_NAME):
        fn = AttentionInterface._global_mapping[name]
        if getattr(fn, "_starpo_eager", False):      # nested: the outer region restores
            continue
        eager = torch.compiler.disable(fn, reason="starpo attention reads the row layout "
                                       "from position_ids in Python")
        eager._starpo_eager = True
        AttentionInterface.register(name, eager)
        plain[name] = fn

    def restore() -> None:
        for name, fn in plain.items():
            AttentionInterface.register(name, fn)
    return restore


def counters() -> dict[str, int]:
    """Dynamo's counts since the last reset: ``graphs`` compiled, ``frames`` converted,
    ``graph_breaks`` (distinct break sites counted once per compilation)."""
    from torch._dynamo.utils import counters as c
    return {"graphs": int(c["stats"]["unique_graphs"]), "frames": int(c["frames"]["ok"]),
            "graph_breaks": int(sum(c["graph_break"].values()))}


@contextlib.contextmanager
def compiled_blocks(model: nn.Module, enabled: bool, *, device=None, log=print,
                    what: str = "train", sharded: bool = False):
    """Inside the block, ``model``'s repeated blocks run compiled (``enabled``); on exit
    they are eager again. Yields the list of compiled blocks (``[]`` when off)."""
    if not enabled:
        yield []
        return
    if sharded:
        log(f"  {what}: train.compile is not applied under FSDP/DeepSpeed (not tested "
            "there); running eager")
        yield []
        return
    found = blocks(model)
    if not found:
        log(f"  {what}: train.compile found no repeated blocks in "
            f"{type(unwrap_model(model)).__name__}; running eager")
        yield []
        return
    if device is None:
        device = next(model.parameters()).device
    check_available(device)
    restore_attention = keep_segment_attention_eager()
    base = counters()
    for b in found:
        b.compile(dynamic=True)
    try:
        yield found
    finally:
        for b in found:
            b._compiled_call_impl = None       # nn.Module.compile's slot: back to eager
        restore_attention()
        LAST.clear()
        LAST.update({k: v - base[k] for k, v in counters().items()}, blocks=len(found))
        torch._dynamo.reset()
