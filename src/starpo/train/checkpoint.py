"""Resumable training state: weights, optimizer, scheduler, RNG states and the step, one
directory per checkpoint, each written atomically (a kill never leaves a half checkpoint
that a resume would read).

Checkpoints verify themselves: ``manifest.json``, written last, records every file's size
and sha256. A resume (:func:`resume_from`) takes the newest checkpoint that matches its
manifest; a damaged one (cut short by a node dying mid-copy, a quota hit outside starpo)
is named in one line and the one before it is used, so at least two are kept. A stage's
final model is checked with :func:`verify_model_dir` before the stage is marked complete.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from starpo.fileio import atomic_dir

MANIFEST = "manifest.json"
# checkpoints kept at least, whatever train.keep_checkpoints says: the newest may turn out
# damaged, and the one before it is the fallback
MIN_KEEP = 2


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(d: Path) -> None:
    """``d/manifest.json``: size and sha256 of every other file under ``d``; written last,
    it marks the checkpoint complete."""
    files = {f.relative_to(d).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(d.rglob("*")) if f.is_file() and f.name != MANIFEST}
    (d / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(d: Path, *, hashes: bool = True) -> str | None:
    """``None`` when checkpoint ``d`` matches its manifest, else what is wrong (a phrase).
    ``hashes=False`` checks presence and sizes only. A checkpoint of a starpo version
    without manifests is taken as it is (its loading tells)."""
    m = d / MANIFEST
    if not m.is_file():
        if (d / "state.json").is_file():
            return None
        return f"no {MANIFEST} (it was not completely written)"
    try:
        files = json.loads(m.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, info in files.items():
        f = d / name
        try:
            size = f.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != info["size"]:
            return f"{name} has {size} bytes, {info['size']} expected"
    if hashes:
        for name, info in files.items():
            if _sha256(d / name) != info["sha256"]:
                return f"{name} does not match its recorded sha256"
    return None


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    """``step_*`` checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())


def _prune(ckpt_dir: Path, keep: int) -> None:
    for p in _step_dirs(ckpt_dir)[:-max(keep, MIN_KEEP)]:
        shutil.rmtree(p, ignore_errors=True)


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: what saving it needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _torch_save(obj, path: Path) -> None:
    # through a Python file object: a full disk is then an OSError with its errno (torch's
    # own writer reports only "unexpected pos")
    with path.open("wb") as f:
        torch.save(obj, f)


def _resume_hint(ckpt_dir: Path) -> str:
    prev = latest_checkpoint(ckpt_dir)
    where = prev.name if prev is not None else "the start of the stage"
    return f"rerun the same command: it resumes from {where}"


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

    opt_state = optimizer.state_dict()

    def write(d: Path) -> None:
        save_file(sd, str(d / "model.safetensors"))
        _torch_save(opt_state, d / "optimizer.pt")
        _torch_save(scheduler.state_dict(), d / "scheduler.pt")
        _torch_save(_rng_state(), d / "rng.pt")
        (d / "state.json").write_text(json.dumps({"step": step, **extra}))
        write_manifest(d)

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    atomic_dir(final, write, what=f"checkpoint {final.name}",
               needed=_tensor_bytes(sd) + _tensor_bytes(opt_state),
               then=_resume_hint(ckpt_dir))
    _prune(ckpt_dir, keep)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (not verified: :func:`resume_from` does that)."""
    done = [p for p in _step_dirs(ckpt_dir)
            if (p / MANIFEST).is_file() or (p / "state.json").is_file()]
    return done[-1] if done else None


def resume_from(ckpt_dir: Path, load: Callable[[Path], dict], *,
                log: Callable[[str], None] = print) -> dict | None:
    """Load the newest intact checkpoint of ``ckpt_dir`` with ``load(path) -> state`` and
    return its state (``None``: there is none, start from scratch).

    A checkpoint that fails :func:`verify_checkpoint` or whose ``load`` raises is skipped
    with one line naming it and the one before it is tried. When a ``load`` failed part
    way (it may have changed the model) and no older checkpoint loads, a
    :class:`~starpo.errors.TrainingError` says so instead of training on from a mixture."""
    from starpo.errors import TrainingError
    cands = [p for p in reversed(_step_dirs(ckpt_dir))
             if (p / MANIFEST).is_file() or (p / "state.json").is_file()]
    touched = None
    for k, p in enumerate(cands):
        why = verify_checkpoint(p)
        if why is None:
            try:
                return load(p)
            except Exception as err:  # any damage: fall back
                lines = str(err).strip().splitlines()
                why = f"loading failed: {type(err).__name__}" + (f": {lines[0]}" if lines else "")
                touched = p
        nxt = cands[k + 1].name if k + 1 < len(cands) else None
        log(f"  checkpoint {p} is damaged ({why}); "
            + (f"resuming from {nxt} instead" if nxt else
               "no earlier checkpoint: the stage starts from its beginning"))
    if touched is not None:
        raise TrainingError(f"{ckpt_dir}: no intact checkpoint, and loading {touched.name} "
                            f"failed part way; rerun with --restart to train the stage "
                            f"from its beginning")
    return None


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
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        _torch_save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "sharded": True}))
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        _prune(ckpt_dir, keep)
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


# ----------------------------------------------------------------- a saved model

def _safetensors_problem(f: Path) -> str | None:
    """What is wrong with a ``.safetensors`` file's framing (its header must parse and the
    file must be as long as the header's last tensor says), without reading the tensors."""
    try:
        size = f.stat().st_size
        with f.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{f.name} has {size} bytes, too short for a header"
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                return f"{f.name} has {size} bytes, shorter than its header ({n} bytes)"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as err:
        return f"{f.name}: unreadable header ({type(err).__name__})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{f.name} has {size} bytes, {8 + n + end} expected from its header"
    return None


def verify_model_dir(path: Path) -> str | None:
    """``None`` when ``path`` looks like a complete saved model (``config.json`` parses,
    every weight file is whole, a sharded index's files are all there), else what is
    wrong. Cheap: reads headers, not weights."""
    path = Path(path)
    try:
        json.loads((path / "config.json").read_text())
    except OSError:
        return "config.json is missing"
    except ValueError:
        return "config.json is unreadable"
    weights = sorted(path.glob("*.safetensors"))
    for idx in path.glob("*.safetensors.index.json"):
        try:
            names = set(json.loads(idx.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return f"{idx.name} is unreadable"
        missing = sorted(n for n in names if not (path / n).is_file())
        if missing:
            return f"{missing[0]} (listed in {idx.name}) is missing"
    if not weights and not any(path.glob("*.bin")):
        return "no weight file"
    for f in weights:
        why = _safetensors_problem(f)
        if why is not None:
            return why
    return None
