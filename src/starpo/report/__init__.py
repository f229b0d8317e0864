"""Self-contained HTML reports (no network, no JavaScript): a run's page
(:mod:`.run_page`) or a sweep's (:mod:`.sweep_page`), with charts from :mod:`.charts`."""

from __future__ import annotations

from pathlib import Path

from starpo.errors import StarpoError
from starpo.report.run_page import write_run_report
from starpo.report.sweep_page import is_sweep_dir, write_sweep_report


def write_report(run_dir: str | Path) -> Path:
    """``DIR/report.html`` for a run directory, or the sweep page for a sweep directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StarpoError(f"{run_dir}: no such run directory")
    if is_sweep_dir(run_dir):
        return write_sweep_report(run_dir)
    return write_run_report(run_dir)
