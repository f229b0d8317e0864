"""User-facing errors.

Every problem caused by the user's input (a recipe key, a data row, a checkpoint path)
raises a subclass of :class:`StarpoError`. The CLI prints its message as one line and
exits non-zero without a traceback (unless ``--debug``), so the message must say on its
own *where* the problem is: the file, the row and the field.
"""

from __future__ import annotations

import difflib
import json
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path


def did_you_mean(word: str, options) -> str:
    """``"; did you mean `beta`?"`` for the option closest to ``word`` (a typo's fix, for
    the end of an error line), or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


class StarpoError(Exception):
    """An error the user can fix; its message is shown as-is by the CLI, which exits with
    ``exit_code``."""

    exit_code = 2


class RecipeError(StarpoError):
    """A recipe key is unknown, has the wrong type, or a value is out of range."""


class DataError(StarpoError):
    """A data row is malformed. Built with the location so the message names it."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None):
        self.source, self.row, self.field = source, row, field
        self.reason = message     # the message without its location
        self.hint: str | None = None
        where = []
        if source is not None:
            where.append(str(source))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)

    def with_hint(self, hint: str) -> "DataError":
        """This error with how to go on appended to its one line (once); returns self."""
        if self.hint is None:
            self.hint = hint
            self.args = (f"{self.args[0]}; {hint}",)
        return self


class DiskError(StarpoError):
    """A write failed for lack of space (or quota) on the disk; nothing half-written was
    left where a resume would read it. Exit status 74 (sysexits ``EX_IOERR``): not bad
    input, and a scheduler should not retry it blindly."""

    exit_code = 74


class RunDirBusy(StarpoError):
    """Another starpo process holds the run (or sweep) directory's lock."""


class TrainingError(StarpoError):
    """Training cannot go on (NaN/inf loss, …); the last good checkpoint is kept."""


class BadRowsFile:
    """Where a stage's skipped rows go: one JSON object per line with ``source``, ``row``,
    ``field``, ``reason``, ``error`` (the full line), ``phase`` (``read``: the row could not be
    converted; ``tokenize``: it left nothing to train) and, when known, ``data`` (the row as
    read). The file is started afresh by the first row or :meth:`begin` of a stage run, so a
    stage whose prepared data is reused keeps the file of the run that prepared it."""

    def __init__(self, path: str | os.PathLike, stage: str | None = None):
        self.path, self.stage = Path(path), stage
        self.count = 0
        self._started = False

    def begin(self) -> None:
        if not self._started:
            self._started = True
            if _main_process():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text("")

    def write(self, err: DataError, *, phase: str, data=None) -> None:
        self.begin()
        self.count += 1
        if not _main_process():   # every process sees the same rows; one file is enough
            return
        rec = {"source": err.source, "row": err.row, "field": err.field, "reason": err.reason,
               "error": str(err), "phase": phase}
        if data is not None:
            rec["data"] = data
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")


_BAD_ROWS: ContextVar[BadRowsFile | None] = ContextVar("starpo_bad_rows", default=None)


def _main_process() -> bool:
    # the Runtime decides which process writes; imported here because it imports torch,
    # which nothing that only validates a recipe should need
    from starpo.runtime import Runtime
    return Runtime.is_main_process()


@contextmanager
def bad_rows_to(path: str | os.PathLike, stage: str | None = None):
    """Within the block, skipped rows are written to ``path`` (the pipeline opens one per
    stage: ``<run>/<stage>/bad_rows.jsonl``) and bad-row errors name the stage's override."""
    token = _BAD_ROWS.set(BadRowsFile(path, stage))
    try:
        yield _BAD_ROWS.get()
    finally:
        _BAD_ROWS.reset(token)


def current_bad_rows() -> BadRowsFile | None:
    return _BAD_ROWS.get()


def skip_hint() -> str:
    """How to go on past a bad row: the line appended to a bad-row error."""
    sink = current_bad_rows()
    if sink is not None and sink.stage:
        return (f"to go on without such rows set data.on_bad_rows: skip in stage "
                f"{sink.stage!r} (on the command line: "
                f"stages.{sink.stage}.data.on_bad_rows=skip); skipped rows are counted in "
                f"the log and written to {sink.path}")
    return ("to go on without such rows set data.on_bad_rows: skip (skipped rows are counted "
            "in the log and written to the stage's bad_rows.jsonl)")


def record_bad_row(err: DataError, *, phase: str, data=None) -> None:
    """Write a skipped row to the current stage's ``bad_rows.jsonl`` (if there is one)."""
    sink = current_bad_rows()
    if sink is not None:
        sink.write(err, phase=phase, data=data)


class BadRows:
    """``on_bad_rows`` policy for a loop over data rows: ``"error"`` raises the first
    :class:`DataError` with how to go on (:func:`skip_hint`); ``"skip"`` counts them, logs
    the first few (so a skipped row is never silent) and a total at the end
    (:meth:`report`), and writes each to the stage's ``bad_rows.jsonl``."""

    SHOWN = 5

    def __init__(self, policy: str, log, what: str = "rows", phase: str = "tokenize"):
        self.policy, self.log, self.what, self.count = policy, log, what, 0
        self.phase = phase

    def handle(self, err: DataError, data=None) -> None:
        if self.policy == "error":
            raise err.with_hint(skip_hint())
        self.count += 1
        if self.count <= self.SHOWN:
            self.log(f"  skipped: {err}")
        record_bad_row(err, phase=self.phase, data=data)

    def report(self) -> None:
        if self.count:
            sink = current_bad_rows()
            where = f" (written to {sink.path})" if sink is not None else ""
            self.log(f"  skipped {self.count} {self.what}{where}")

