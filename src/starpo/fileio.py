"""Every file starpo writes goes through here: written beside its final name and renamed
into place in one step, so a kill never leaves a half file where a later run (or a
concurrent sweep trial on shared storage) would read it, and two writers of the same entry
never see each other's partial output.

Temporary names are ``.<name>.tmp-<pid>-<random>``: unique per writer even on several
machines sharing one directory. :func:`exclusive` is a lock file for work that should be
done once by whichever process gets there first (a reference pass several sweep trials
need, an append to a log that several machines share); :func:`dir_lock` keeps a run or
sweep directory to one writing command at a time.

A full disk (or quota) while writing is one :class:`~starpo.errors.DiskError` naming the
file, the space it needed and what to do (:func:`disk_error`); the temporary file is
removed, so nothing half-written is left under the final name.
"""

from __future__ import annotations

import errno
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


# ---------------------------------------------------------------- disk full

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# how libraries that wrap the OS error say it (safetensors: "I/O error: No space left on
# device (os error 28)")
_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded",
              "os error 122")


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a full disk or quota."""
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def tree_size(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a directory (0 when missing)."""
    p = Path(path)
    try:
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        return 0


def free_space(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem of ``path`` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_error(path: str | os.PathLike, what: str, *, needed: int | None = None,
               written: int | None = None, then: str | None = None):
    """The one-line :class:`~starpo.errors.DiskError` for a write of ``what`` to ``path``
    that ran out of space: how much it needed (``needed``, or more than the ``written``
    bytes that fitted), how much is free, and what to do (``then``: how the run goes on)."""
    from starpo.errors import DiskError
    if needed:
        need = f"it needs about {_mb(needed)}"
    elif written:
        need = f"it needs more than the {_mb(written)} written before the disk filled"
    else:
        need = "it needs more space"
    free = free_space(path)
    have = f", {_mb(free)} free there" if free is not None else ""
    return DiskError(f"{path}: no space left on device (or quota exceeded) while writing "
                     f"{what} ({need}{have}); nothing half-written was kept. Free space or "
                     f"move the directory to a bigger disk, then "
                     f"{then or 'rerun the same command'}")


def _reraise_full(err: BaseException, path: Path, what: str, **kw) -> None:
    """Raise ``err`` as a :class:`~starpo.errors.DiskError` when it is a full disk."""
    from starpo.errors import DiskError
    if not isinstance(err, DiskError) and disk_full(err):
        raise disk_error(path, what, **kw) from err


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
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        _reraise_full(err, path, "a file", needed=len(text.encode("utf-8")))
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
    line = json.dumps(record, ensure_ascii=False, default=_json_default) + "\n"
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(line)
    except OSError as err:
        _reraise_full(err, path, "a log line", needed=len(line))
        raise


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
               fsync: bool = False, what: str = "a directory", needed: int | None = None,
               then: str | None = None) -> Path:
    """Build a directory with ``write(tmp_dir)`` and rename it to ``final`` in one step
    (an existing ``final`` is replaced; a failed ``write`` leaves ``final`` untouched).
    A full disk is a :class:`~starpo.errors.DiskError` (:func:`disk_error` with ``what``,
    ``needed`` bytes when known and ``then``)."""
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
    except BaseException as err:
        written = tree_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        _reraise_full(err, final, what, needed=needed, written=written, then=then)
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
    except BaseException as err:
        written = tree_size(tmp)
        tmp.unlink(missing_ok=True)
        _reraise_full(err, path, "a file", written=written)
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
    with _holding(lock, token, heartbeat):
        yield


@contextmanager
def _holding(lock: Path, token: str, heartbeat: float | None) -> Iterator[None]:
    """The block during which this process holds ``lock`` (a file it created holding
    ``token``): a thread touches the file every ``heartbeat`` seconds so that waiters
    never take a long holder for a dead one; on exit the file is removed unless another
    process broke the lock meanwhile (then it is theirs)."""
    stop = threading.Event()
    beat = None
    if heartbeat:
        def touch() -> None:
            while not stop.wait(heartbeat):
                try:
                    os.utime(lock)
                except OSError:
                    return
        beat = threading.Thread(target=touch, name=f"lock {lock}", daemon=True)
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


# ---------------------------------------------------------------- one writer per directory

LOCK_NAME = ".starpo.lock"
# the holder touches its lock this often; a lock of another machine not touched for
# LOCK_STALE seconds is taken for one left by a dead holder (same machine: the pid says)
LOCK_HEARTBEAT = 30.0
LOCK_STALE = 300.0


def _slurm_job() -> str | None:
    """This SLURM job (array task) id; a requeued job keeps it."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def _proc_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot; Linux), to tell a reused pid
    from the holder itself; ``None`` where /proc has no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_stale(rec: dict, age: float) -> str | None:
    """Why the lock ``rec`` (not refreshed for ``age`` seconds) is left by a dead holder,
    or ``None`` when its holder may be alive."""
    if rec.get("host") == socket.gethostname():
        pid = int(rec.get("pid", -1))
        if not _alive(pid):
            return f"its process {pid} has ended"
        start = _proc_start(pid)
        if start is not None and rec.get("proc_start") not in (None, start):
            return f"its process {pid} has ended (the pid was reused)"
        return None
    job = _slurm_job()
    if job is not None and rec.get("slurm_job") == job:
        return f"it was taken by an earlier run of this SLURM job {job} (requeued)"
    if age > LOCK_STALE:
        return f"its holder has not refreshed it for {age:.0f} s"
    return None


def _read_lock(lock: Path) -> tuple[str, dict | None, float] | None:
    """(text, record, seconds since last refreshed) of a lock file, ``None`` if absent."""
    try:
        text = lock.read_text()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        rec = json.loads(text)
    except ValueError:
        rec = None
    return text, rec if isinstance(rec, dict) else None, age


@contextmanager
def dir_lock(directory: str | os.PathLike, *, command: str, force: bool = False,
             log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``DIR/.starpo.lock`` for the block: one writing command (``starpo run``,
    ``sweep``, ``eval``) per run or sweep directory.

    The lock is created with ``O_EXCL`` and records the holder's host, pid, start time,
    command and SLURM job; a heartbeat thread touches it every ``LOCK_HEARTBEAT`` seconds.
    A lock whose holder is gone is taken over with one line saying why: on the same
    machine when its pid is dead (or reused), on another machine when it has not been
    touched for ``LOCK_STALE`` seconds, and in a requeued SLURM job when it was the same
    job's. Otherwise :class:`~starpo.errors.RunDirBusy` is raised with one line naming
    the holder. ``force`` takes the lock whatever holds it (for a holder on a machine that
    died, before the stale time). Within one process the lock is re-entrant."""
    from starpo.errors import RunDirBusy
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "proc_start": _proc_start(os.getpid()), "command": command,
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "slurm_job": _slurm_job(),
          "token": uuid.uuid4().hex}
    token_text = json.dumps(me)
    unreadable_since: float | None = None
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_lock(lock)
            if held is None:
                continue                          # released meanwhile
            text, rec, age = held
            if rec is None:
                # created but not yet written by its holder, or cut by a crash then
                unreadable_since = unreadable_since or time.monotonic()
                if time.monotonic() - unreadable_since < 2.0:
                    time.sleep(0.1)
                    continue
                why = "it is unreadable"
            elif rec.get("host") == me["host"] and rec.get("pid") == me["pid"]:
                yield                             # this process holds it already
                return
            else:
                why = _lock_stale(rec, age)
            if why is None and not force:
                raise RunDirBusy(
                    f"{directory} is in use by another starpo command ({rec.get('command')} "
                    f"on {rec.get('host')}, pid {rec.get('pid')}, since {rec.get('started')}"
                    f"); wait for it to finish, or if that process is gone (its machine "
                    f"died) rerun with --force")
            holder = "an unreadable lock" if rec is None else \
                f"the lock of {rec.get('command')} on {rec.get('host')} (pid {rec.get('pid')})"
            log(f"{directory}: taking over {holder}: " +
                (why if why is not None else "--force"))
            _break_stale(lock, text)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(token_text)
        break
    with _holding(lock, token_text, LOCK_HEARTBEAT):
        yield
