"""Data preparation done once: the main process builds, the others wait and read.

Loading sources and tokenizing is deterministic for (data spec, tokenizer, lengths, seed),
so its result is stored under the stage directory keyed by a hash of those. With several
processes (accelerate launch) the main process prepares first while the others wait at
``main_process_first``, then they all read the same file; a resumed run reads it too.
Stored as JSON (token id lists): safe to load, never unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from starpo import fileio
from pathlib import Path
from typing import Any, Callable


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def prepared(cache_dir: Path, name: str, key: str, build: Callable[[], Any],
             log: Callable[[str], None] = print, runtime=None) -> Any:
    """Return ``build()``'s JSON-able result, computed once per key: with several processes
    (``runtime``, a :class:`starpo.runtime.Runtime`) the main process builds and writes it
    while the others wait, then they read the file."""
    path = Path(cache_dir) / f"{name}-{key}.json"
    main = runtime is None or runtime.is_main
    with (runtime.main_first() if runtime is not None else contextlib.nullcontext()):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                log(f"  prepared data: reusing {path.name}")
                return data
            except ValueError:
                pass  # a file cut by a crash: rebuild it
        data = build()
        if main:
            fileio.write_json(path, data, indent=None)
        return data
