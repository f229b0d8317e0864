"""Every file starpo writes goes through here: written beside its final name and renamed
into place in one step, so a kill never leaves a half file where a later run (or a
concurrent sweep trial on shared storage) would read it, and two writers of the same entry
never see each other's partial output.

Temporary names are ``.<name>.tmp-<pid>-<random>``: unique per writer even on several
machines sharing one directory. :func:`exclusive` is a lock file for work that should be
done once by whichever process gets there first (a reference pass several sweep trials
need, an append to a log that several machines share).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _json_default(x: Any) -> Any:
    """numpy scalars and anything else json does not know: numbers stay numbers."""
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, default=_json_default,
                                       ensure_ascii=False))


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """A whole ``.jsonl`` file, one JSON object per line, atomically."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=_json_default)
                                    + "\n" for r in records))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one line (logs that grow: metrics, trial records). A kill can cut the last
    line short; :func:`read_jsonl` skips such a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")


def read_jsonl(path: str | os.PathLike, *, missing_ok: bool = True) -> list[dict]:
    """The JSON objects of a ``.jsonl`` file. Blank lines, a line cut short by a kill and
    non-object lines are skipped; a missing file is ``[]`` unless ``missing_ok=False``."""
    out = []
    try:
        with Path(path).open(encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return []
    return out


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """A JSON file's content, or ``default`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def fsync_tree(d: Path) -> None:
    """Flush a directory's files to disk before a rename makes them visible."""
    for f in Path(d).rglob("*"):
        if f.is_file():
            try:
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass


def atomic_dir(final: str | os.PathLike, write: Callable[[Path], None], *,
               fsync: bool = False) -> Path:
    """Build a directory with ``write(tmp_dir)`` and rename it to ``final`` in one step
    (an existing ``final`` is replaced; a failed ``write`` leaves ``final`` untouched)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    tmp.mkdir()
    try:
        write(tmp)
        if fsync:
            fsync_tree(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp_path)`` writes a file (safetensors, torch.save …); it is then renamed to
    ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def safe_name(name: str) -> str:
    """A file-name-safe form of a model or stage name (``eval/<name>.jsonl``)."""
    s = re.sub(r"[^\w.\-]+", "_", name).strip("._")
    return s or "model"


def _break_stale(lock: Path, holder: str) -> None:
    """Remove a lock left by a dead holder. It is renamed away first (one rename wins when
    several waiters break it at once); if what was renamed is not the stale holder's lock
    (another waiter broke it and a new holder took it in between), it is put back with
    ``os.link``, which never replaces a lock that exists by then."""
    moved = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(lock, moved)
    except FileNotFoundError:
        return
    try:
        if moved.read_text() != holder:
            try:
                os.link(moved, lock)
            except OSError:
                pass
    except OSError:
        pass
    moved.unlink(missing_ok=True)


@contextmanager
def exclusive(lock: str | os.PathLike, *, stale_after: float = 120.0,
              heartbeat: float | None = None, poll: float = 0.2,
              on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock file ``lock`` for the ``with`` block, across processes and machines
    that share its directory.

    The lock is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFSv3+)
    and holds a unique token naming the holder's host and pid. A waiter polls every
    ``poll`` seconds; a lock that stays unchanged for ``stale_after`` seconds, measured on
    the waiter's own clock (machines sharing storage need not agree on the time), is
    taken for one left by a dead holder and broken. ``heartbeat`` (seconds) makes a thread
    touch the lock while it is held, so a holder doing minutes of work is never taken for
    dead; without it the block must be shorter than ``stale_after``. ``on_wait(holder)``
    is called once when the lock is busy. The lock is removed on exit unless another
    process broke it meanwhile (then the file is theirs).
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    token = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:12]}"
    seen: tuple[Any, float] | None = None      # (what the lock looked like, since when)
    told = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                st = os.stat(lock)
                holder = lock.read_text()
            except FileNotFoundError:
                continue                        # released meanwhile: try again at once
            now = time.monotonic()
            look = (st.st_mtime_ns, st.st_ino, holder)
            if seen is None or seen[0] != look:
                seen = (look, now)
            elif now - seen[1] >= stale_after:
                _break_stale(lock, holder)
                seen = None
                continue
            if on_wait is not None and not told:
                on_wait(holder)
                told = True
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(token)
        break
    stop = threading.Event()
    beat = None
    if heartbeat:
        def touch() -> None:
            while not stop.wait(heartbeat):
                try:
                    os.utime(lock)
                except OSError:
                    return
        beat = threading.Thread(target=touch, name=f"lock {lock.name}", daemon=True)
        beat.start()
    try:
        yield
    finally:
        stop.set()
        if beat is not None:
            beat.join()
        try:
            if lock.read_text() == token:
                lock.unlink()
        except OSError:
            pass
