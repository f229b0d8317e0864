"""Graceful preemption: a cluster's "stop soon" signal ends the run at a safe point, with
what it has done saved, and an exit status that asks to be run again.

SLURM, Kubernetes and spot instances stop a job with SIGTERM (or the signal a job asked
for, e.g. ``sbatch --signal=B:USR1@120``), then kill it after a grace period. While
:func:`handling` is active (the ``starpo`` command turns it on), the signals of
``STARPO_PREEMPT_SIGNALS`` (default ``TERM,USR1``; ``none`` leaves every signal's default
behaviour) are caught:

* inside a deferred :func:`section` (a training stage) the signal only sets a flag; the
  code checks it at its safe points with :func:`check`: the training loop after an
  optimizer step (it first writes a checkpoint), the reference log-prob pass after a
  batch (it first saves the pairs done), online sampling after a chunk of prompts, and
  between stages and rounds;
* anywhere else (evaluation, loading) :class:`Preempted` is raised at once: every file is
  written to a temporary name and renamed, so stopping there loses only the unit in
  progress (one model's evaluation samples, say), never finished work.

:class:`Preempted` derives from ``BaseException`` like ``KeyboardInterrupt``: the
``except Exception`` of a sweep that records a failed trial lets it through, so a
preempted trial is not recorded as failed. The command exits with :data:`EXIT_STATUS`
(75, ``EX_TEMPFAIL``: try again); rerunning the same command resumes.

Child processes started through :func:`child` (sweep trials under ``--jobs``, an
``accelerate launch`` of a trial) get the same signal, so they stop at their own safe
points.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

EXIT_STATUS = 75          # sysexits EX_TEMPFAIL: a temporary failure, run it again
ENV = "STARPO_PREEMPT_SIGNALS"
DEFAULT_SIGNALS = "TERM,USR1"

_state: dict = {"signal": None, "deferred": 0, "children": set(), "where": None}


class Preempted(BaseException):
    """The run stopped on a preemption signal at a safe point; its message is one line
    saying where and that rerunning the same command resumes."""


def signals_from_env() -> list[signal.Signals]:
    """The signals named by ``STARPO_PREEMPT_SIGNALS`` (``TERM,USR1``; ``SIGINT`` and
    numbers are accepted too; ``none`` or empty: no handler)."""
    given = os.environ.get(ENV)
    text = (DEFAULT_SIGNALS if given is None else given).strip()
    if text.lower() in ("", "none", "off"):
        return []
    out = []
    for part in text.replace(" ", ",").split(","):
        part = part.strip().upper()
        if not part:
            continue
        try:
            out.append(signal.Signals(int(part)) if part.isdigit() else
                       signal.Signals[part if part.startswith("SIG") else f"SIG{part}"])
        except (KeyError, ValueError):
            if given is None:
                continue      # a default this platform lacks (SIGUSR1 on Windows)
            from starpo.errors import StarpoError
            raise StarpoError(f"{ENV}={text!r}: {part!r} is not a signal name (e.g. "
                              f"TERM,USR1; none to turn preemption handling off)") from None
    return out


def requested() -> str | None:
    """The name of the preemption signal received, or ``None``."""
    sig = _state["signal"]
    return None if sig is None else signal.Signals(sig).name


def reset() -> None:
    """Forget a received signal (tests run several preemptions in one process)."""
    _state["signal"] = None


def check(where: str, *, when: str = "during") -> None:
    """Raise :class:`Preempted` if a preemption signal arrived: the message says when
    (``"during"`` / ``"after"``) ``where`` (``"online round 2 sampling"``) it stopped, and
    that finished work is kept."""
    name = requested()
    if name is not None:
        raise Preempted(f"preempted ({name}) {when} {where}; finished work is saved; "
                        f"rerun the same command to resume")


def _handler(signum, frame) -> None:
    if _state["signal"] is not None:
        return             # already stopping; the grace period's kill ends anything slow
    _state["signal"] = signum
    for proc in list(_state["children"]):
        try:
            proc.send_signal(signum)
        except (OSError, ValueError):
            pass
    if _state["deferred"] == 0:
        check(_state["where"] or "start-up")


@contextmanager
def handling(signals: list[signal.Signals] | None = None) -> Iterator[None]:
    """Catch the preemption signals for the block (default :func:`signals_from_env`);
    the previous handlers come back after it. Only the main thread can install signal
    handlers: elsewhere (a Ray worker thread) this does nothing."""
    sigs = signals_from_env() if signals is None else signals
    if not sigs or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@contextmanager
def section(where: str, *, defer: bool = False) -> Iterator[None]:
    """The block is ``where`` (``"stage sft"``: what a preemption message names). With
    ``defer`` a preemption signal waits for the next :func:`check` (a training stage: its
    state lives in memory until a checkpoint or its model is written)."""
    prev = _state["where"]
    _state["where"] = where
    _state["deferred"] += int(defer)
    try:
        yield
    finally:
        _state["deferred"] -= int(defer)
        _state["where"] = prev


@contextmanager
def child(proc) -> Iterator[None]:
    """Forward a preemption signal to the child process ``proc`` (a ``subprocess.Popen``)
    while the block runs."""
    _state["children"].add(proc)
    try:
        if _state["signal"] is not None:      # arrived before the child was registered
            proc.send_signal(_state["signal"])
        yield
    finally:
        _state["children"].discard(proc)
