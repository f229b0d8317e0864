"""User-facing errors.

Every problem caused by the user's input (a recipe key, a data row, a checkpoint path)
raises a subclass of :class:`StarpoError`. The CLI prints its message as one line and
exits non-zero without a traceback (unless ``--debug``), so the message must say on its
own *where* the problem is: the file, the row and the field.
"""

from __future__ import annotations


class StarpoError(Exception):
    """An error the user can fix; its message is shown as-is by the CLI."""


class RecipeError(StarpoError):
    """A recipe key is unknown, has the wrong type, or a value is out of range."""


class DataError(StarpoError):
    """A data row is malformed. Built with the location so the message names it."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None):
        self.source, self.row, self.field = source, row, field
        where = []
        if source is not None:
            where.append(str(source))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class TrainingError(StarpoError):
    """Training cannot go on (NaN/inf loss, …); the last good checkpoint is kept."""


class BadRows:
    """``on_bad_rows`` policy for a loop over data rows: ``"error"`` re-raises the first
    :class:`DataError`; ``"skip"`` counts them and logs the first few (so a skipped row is
    never silent) and a total at the end (:meth:`report`)."""

    SHOWN = 5

    def __init__(self, policy: str, log, what: str = "rows"):
        self.policy, self.log, self.what, self.count = policy, log, what, 0

    def handle(self, err: DataError) -> None:
        if self.policy == "error":
            raise err
        self.count += 1
        if self.count <= self.SHOWN:
            self.log(f"  skipped: {err}")

    def report(self) -> None:
        if self.count:
            self.log(f"  skipped {self.count} {self.what}")

