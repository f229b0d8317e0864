"""Reference log-probs computed once, stored on disk, reused.

DPO-style losses need log π_ref(y|x) for every chosen and rejected response. They do not
change during training, so we compute them once with the reference model before training,
free that model, and train with no reference copy in memory. The file is keyed by a hash
of everything that determines the numbers — the reference weights, the tokenizer, the
tokenized pairs (which already reflect max lengths and truncation) — so a rerun, a resumed
run or another sweep trial on the same data reuses it, and any change misses it.

A long pass keeps its progress: every ``PARTIAL_EVERY`` seconds, and before a preemption
signal (:mod:`starpo.train.preempt`) stops it, the pairs done so far go to
``.ref-<key>.partial.safetensors`` beside the entry; the next run continues from the pair
after them, in the same batches, so the result is the uninterrupted pass's.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from starpo import fileio
from starpo.data.prefbatch import collate_pairs, split_pairs
from starpo.model.compile import compiled_blocks
from starpo.model.layout import row_cap
from starpo.model.logprobs import sequence_logprobs
from starpo.runtime import Runtime, release_memory
from starpo.train import preempt


@dataclass
class RefLogps:
    chosen: torch.Tensor      # [P] summed log-probs of each pair's chosen response
    rejected: torch.Tensor    # [P]
    key: str
    hit: bool


def _file_sha(path: Path) -> str:
    """sha256 of a file, remembered in a sidecar keyed by size and mtime (big weights)."""
    st = path.stat()
    side = path.with_name(f".{path.name}.sha256")
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    if side.is_file():
        try:
            rec = json.loads(side.read_text())
            if rec.get("stamp") == stamp:
                return rec["sha256"]
        except (OSError, ValueError):
            pass
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        side.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:
        pass  # read-only checkpoint directories are fine, we just rehash next time
    return digest


def model_fingerprint(path_or_id: str) -> str:
    """Content hash of a checkpoint's weights and config (a hub id hashes its name+revision)."""
    p = Path(path_or_id)
    h = hashlib.sha256()
    if p.is_dir():
        files = sorted(list(p.glob("*.safetensors")) + list(p.glob("*.bin")) +
                       [p / "config.json"])
        for f in files:
            if f.is_file():
                h.update(f.name.encode())
                h.update(_file_sha(f).encode())
    else:
        h.update(f"hub:{path_or_id}".encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer")
             else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update((tokenizer.chat_template or "").encode() if isinstance(tokenizer.chat_template, str)
             else json.dumps(tokenizer.chat_template).encode())
    return h.hexdigest()


def pairs_fingerprint(pairs: list) -> str:
    h = hashlib.sha256()
    for p in pairs:
        d = p.as_dict() if hasattr(p, "as_dict") else p
        for k in ("prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"):
            h.update(k.encode())
            h.update(json.dumps(d[k]).encode())
    return h.hexdigest()


def cache_key(ref_path: str, tokenizer, pairs: list, extra: dict | None = None) -> str:
    h = hashlib.sha256()
    h.update(model_fingerprint(ref_path).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(pairs_fingerprint(pairs).encode())
    h.update(json.dumps(extra or {}, sort_keys=True).encode())
    return h.hexdigest()[:32]


# an unfinished reference pass saves its progress this often (seconds)
PARTIAL_EVERY = 60.0


@torch.no_grad()
def compute_reference(model, pairs: list, runtime: Runtime, *, batch_size: int = 16,
                      chunk_size: int = 1024, prefix_sharing: bool = True,
                      progress: bool = True, max_tokens_per_row: int | None = None,
                      compile: bool = False, start: int = 0,
                      done: tuple[torch.Tensor, torch.Tensor] | None = None,
                      save_progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of chosen and rejected responses under ``model`` (no grad), on the
    runtime's device; ``compile``: its repeated blocks run compiled for the pass
    (:mod:`starpo.model.compile`, ``train.compile``). Both ``[P]``.

    Micro-batches are single rows (no cap, no dense mask) when the model's attention allows
    it (:func:`starpo.model.layout.row_cap`), else rows of ``max_tokens_per_row``.

    Continuing a pass: ``done`` holds the ``[start]`` values of the first ``start`` pairs
    (``start`` a multiple of ``batch_size``, so the batches are the uninterrupted pass's).
    ``save_progress(chosen, rejected, n)`` is called with the first ``n`` pairs done every
    ``PARTIAL_EVERY`` seconds and before a preemption signal stops the pass with
    :class:`~starpo.train.preempt.Preempted`."""
    model.eval()
    cap = row_cap(model, max_tokens_per_row, prefix_shared=prefix_sharing)
    ch, rj = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    if done is not None:
        ch[:start], rj[:start] = done[0][:start], done[1][:start]
    last_save = time.monotonic()
    with compiled_blocks(model, compile, device=runtime.device, what="reference log-probs",
                         log=print if runtime.is_main else (lambda msg: None)):
        for s in tqdm(range(start, len(pairs), batch_size), desc="reference log-probs",
                      disable=not progress, leave=False):
            chunk = [p.as_dict() if hasattr(p, "as_dict") else p
                     for p in pairs[s:s + batch_size]]
            b = runtime.batch(collate_pairs(chunk, prefix_sharing=prefix_sharing,
                                            padding_free=True, cap=cap))
            lp, _, _ = sequence_logprobs(model, b, chunk_size=chunk_size)
            lp = lp.float().cpu()
            ch[s:s + len(chunk)], rj[s:s + len(chunk)] = split_pairs(lp)
            end = s + len(chunk)
            if save_progress is None or end >= len(pairs):
                continue
            if preempt.requested() is not None:
                save_progress(ch, rj, end)
                raise preempt.Preempted(
                    f"reference log-probs: preempted ({preempt.requested()}) after {end} of "
                    f"{len(pairs)} pairs; progress saved; rerun the same command to resume")
            if time.monotonic() - last_save >= PARTIAL_EVERY:
                save_progress(ch, rj, end)
                last_save = time.monotonic()
    return ch, rj


def reference_logps(ref_path: str, tokenizer, pairs: list, *, cache_dir: Path, load_model,
                    runtime: Runtime, batch_size: int = 16, chunk_size: int = 1024,
                    prefix_sharing: bool = True, progress: bool = True, log=print,
                    max_tokens_per_row: int | None = None, compile: bool = False) -> RefLogps:
    """Cached reference log-probs; ``load_model()`` is called only on a cache miss, and the
    model runs on the runtime's device (where the policy trains). Within a multi-process
    run the main process computes and the others read its file; across runs sharing
    ``cache_dir`` (sweep trials) a miss is computed under a lock file beside the entry, so
    each entry is paid for once."""

    key = cache_key(ref_path, tokenizer, pairs)
    path = Path(cache_dir) / f"ref-{key}.safetensors"
    # one reference pass per run: the main process computes and writes the file while the
    # other processes of the run wait, then read it (a hit for them)
    with runtime.main_first():
        hit = _read_cached(path, len(pairs), log)
        if hit is not None:
            return hit
        if not runtime.is_main:
            raise RuntimeError(f"{path}: the main process did not write the reference "
                               "log-probs")
        # several sweep trials (processes, machines sharing the cache directory) that need
        # the same reference pass: the first computes it, the others wait for its file
        lock = path.with_name(f".{path.name}.lock")
        with fileio.exclusive(lock, heartbeat=REF_LOCK_HEARTBEAT, stale_after=REF_LOCK_STALE,
                              on_wait=lambda who: log(f"  reference log-probs: waiting for "
                                                      f"{who}, which is computing them")):
            hit = _read_cached(path, len(pairs), log)
            if hit is not None:
                return hit
            return _compute_and_store(path, key, ref_path, pairs, load_model, runtime, log,
                                      batch_size=batch_size, chunk_size=chunk_size,
                                      prefix_sharing=prefix_sharing, progress=progress,
                                      max_tokens_per_row=max_tokens_per_row,
                                      compile=compile)


# the lock of a reference pass is touched this often by its holder, and broken when it has
# not been touched for this long (its holder died); the margin also covers an NFS client
# that caches the lock's attributes (mtime) for up to a minute (acregmax)
REF_LOCK_HEARTBEAT = 10.0
REF_LOCK_STALE = 120.0


def _read_cached(path: Path, n_pairs: int, log) -> RefLogps | None:
    """The cached entry, or ``None`` when there is none or it cannot be read (entries are
    renamed into place complete, so an unreadable one was damaged outside starpo: it is
    computed again and replaced)."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
        ch, rj = t["chosen"], t["rejected"]
    except Exception as err:  # any damage means: compute again
        log(f"  reference log-probs: {path.name} is unreadable ({type(err).__name__}); "
            f"computing them again")
        return None
    if len(ch) != n_pairs or len(rj) != n_pairs:
        log(f"  reference log-probs: {path.name} has {len(ch)} pairs, not {n_pairs}; "
            f"computing them again")
        return None
    log(f"  reference log-probs: cache hit ({path.name}, {n_pairs} pairs)")
    return RefLogps(ch, rj, path.stem[len("ref-"):], True)


def _read_partial(partial: Path, setup: dict[str, str], log
                  ) -> tuple[int, tuple[torch.Tensor, torch.Tensor]] | None:
    """``(pairs done, (chosen, rejected))`` of an unfinished pass made with the same
    ``setup`` (pairs, batching), else ``None``."""
    from safetensors import safe_open

    if not partial.is_file():
        return None
    try:
        with safe_open(str(partial), framework="pt") as f:
            meta = f.metadata() or {}
            ch, rj = f.get_tensor("chosen"), f.get_tensor("rejected")
        n = int(meta["done"])
    except Exception:  # damaged: start the pass over
        log(f"  reference log-probs: {partial.name} is unreadable; starting the pass over")
        return None
    if any(meta.get(k) != v for k, v in setup.items()) or len(ch) < n or len(rj) < n:
        log(f"  reference log-probs: {partial.name} was made with other settings; "
            f"starting the pass over")
        return None
    return n, (ch, rj)


def _compute_and_store(path: Path, key: str, ref_path: str, pairs: list, load_model,
                       runtime: Runtime, log, **kw) -> RefLogps:
    from safetensors.torch import save_file

    partial = path.with_name(f".{path.stem}.partial.safetensors")
    # what must not change for the saved pairs to be the ones this pass would compute
    setup = {"pairs": str(len(pairs)), **{k: str(kw.get(k)) for k in (
        "batch_size", "chunk_size", "prefix_sharing", "max_tokens_per_row", "compile")}}
    resumed = _read_partial(partial, setup, log)
    start, done = resumed if resumed is not None else (0, None)
    if start:
        log(f"  reference log-probs: continuing from pair {start} of {len(pairs)} "
            f"({partial.name})")
    else:
        log(f"  reference log-probs: computing for {len(pairs)} pairs with {ref_path}")

    def save_progress(ch: torch.Tensor, rj: torch.Tensor, n: int) -> None:
        fileio.write_with(partial, lambda tmp: save_file(
            {"chosen": ch[:n].contiguous(), "rejected": rj[:n].contiguous()}, str(tmp),
            metadata={**setup, "done": str(n)}))

    model = runtime.model(load_model())
    ch, rj = compute_reference(model, pairs, runtime, start=start, done=done,
                               save_progress=save_progress, **kw)
    del model
    release_memory()   # no reference model stays resident while the policy trains
    fileio.write_with(path, lambda tmp: save_file(
        {"chosen": ch.contiguous(), "rejected": rj.contiguous()}, str(tmp),
        metadata={"ref": str(ref_path), "pairs": str(len(pairs))}))
    partial.unlink(missing_ok=True)
    return RefLogps(ch, rj, key, False)


# --------------------------------------------------------------------------- a run's share
#
# A stage with max_steps may train on a few of its pairs: it asks for those (and its
# held-out pairs) only. Each entry computed this way gets a sidecar listing the content
# hash of each of its pairs, under a namespace of (reference weights, tokenizer); a later
# run with the same reference finds every pair it needs in any entry of that namespace
# and computes only the rest, as one new entry. The entries themselves are the ones
# ``reference_logps`` writes (same key, same format), so nothing about them changes.

def pair_key(pair) -> str:
    """Content hash of one tokenized pair (what its reference log-probs depend on besides
    the reference and the tokenizer)."""
    return pairs_fingerprint([pair])[:32]


def _namespace(ref_path: str, tokenizer) -> str:
    h = hashlib.sha256()
    h.update(model_fingerprint(ref_path).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:32]


def _sidecar(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"ref-{key}.pairs.json"


def _known_pairs(cache_dir: Path, namespace: str) -> dict[str, tuple[str, int]]:
    """pair hash → (entry key, position) over the readable sidecars of ``namespace``."""
    found: dict[str, tuple[str, int]] = {}
    for side in sorted(Path(cache_dir).glob("ref-*.pairs.json")):
        rec = fileio.read_json(side)
        if not isinstance(rec, dict) or rec.get("namespace") != namespace:
            continue
        key = side.name[len("ref-"):-len(".pairs.json")]
        hashes = rec.get("pairs") or []
        if _entry_size(Path(cache_dir) / f"ref-{key}.safetensors") != len(hashes):
            continue                  # gone or damaged: its pairs count as not computed
        for i, h in enumerate(hashes):
            found.setdefault(h, (key, i))
    return found


def _entry_size(path: Path) -> int | None:
    """Pairs in a cache entry, or None when it is missing or unreadable."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            n = f.get_slice("chosen").get_shape()[0]
            return n if f.get_slice("rejected").get_shape()[0] == n else None
    except Exception:  # any damage means: not usable
        return None


def reference_logps_for(ref_path: str, tokenizer, pairs: list, needed: list[int] | None, *,
                        cache_dir: Path, runtime: Runtime, log=print, **kw) -> RefLogps:
    """Reference log-probs of ``pairs[i]`` for ``i`` in ``needed`` (all when ``None``);
    the others are NaN (a loss that reads one is non-finite and stops the run, never a
    silent wrong value). ``kw`` are :func:`reference_logps`' arguments.

    All pairs needed: exactly :func:`reference_logps` (same entry, same numbers). A
    subset: pairs already computed by an earlier run with the same reference and
    tokenizer are read from its entries; the rest are computed as one new entry. Every
    entry written here gets a sidecar of its pairs' content hashes, so a longer rerun adds
    only what it lacks. ``hit`` is true when nothing had to be computed."""
    cache_dir = Path(cache_dir)
    n = len(pairs)
    want = list(range(n)) if needed is None else sorted(set(needed))
    ns = _namespace(ref_path, tokenizer)
    hashes = [pair_key(pairs[i]) for i in want]
    known = _known_pairs(cache_dir, ns) if cache_dir.is_dir() else {}
    runtime.wait()        # every process has read the index before any writes to it
    missing = [i for i, h in zip(want, hashes) if h not in known]
    ch = torch.full((n,), float("nan"))
    rj = torch.full((n,), float("nan"))
    key, computed = "", False
    if missing:
        if len(missing) < n:
            log(f"  reference log-probs: {len(missing)} of {n} pairs needed "
                f"({len(want) - len(missing)} more found in the cache); the rest are not "
                "trained on")
        sub = [pairs[i] for i in missing]
        ref = reference_logps(ref_path, tokenizer, sub, cache_dir=cache_dir, runtime=runtime,
                              log=log, **kw)
        ch[missing], rj[missing] = ref.chosen, ref.rejected
        key, computed = ref.key, not ref.hit
        if runtime.is_main and not _sidecar(cache_dir, ref.key).is_file():
            fileio.write_json(_sidecar(cache_dir, ref.key),
                              {"namespace": ns, "pairs": [pair_key(p) for p in sub]},
                              indent=None)
    found = [(i, known[h]) for i, h in zip(want, hashes) if h in known]
    if found:
        from safetensors.torch import load_file
        entries: dict[str, dict] = {}
        for i, (k, pos) in found:
            if k not in entries:
                entries[k] = load_file(str(cache_dir / f"ref-{k}.safetensors"))
            ch[i] = entries[k]["chosen"][pos]
            rj[i] = entries[k]["rejected"][pos]
        if not missing:
            log(f"  reference log-probs: cache hit (all {len(want)} pairs needed, found by "
                f"content in {len(entries)} entr{'y' if len(entries) == 1 else 'ies'})")
        key = key or sorted(entries)[0]
    return RefLogps(ch, rj, key, not computed)
