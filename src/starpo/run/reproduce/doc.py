"""Writing docs/reproduction.md: Markdown tables, SVG figures as files next to it (GitHub
shows ``![…](reproduction/x.svg)`` images, not ``<svg>`` inline in Markdown), the
claim-by-claim comparison with the papers, and the header saying how it was made."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from starpo import fileio
from starpo.report.charts import CSS
from starpo.run.reproduce.estimate import (INCONCLUSIVE, OPPOSITE, REPRODUCES, Estimate,
                                           fmt, verdict)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (``|`` in cells escaped)."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# the report's chart style, for SVG files shown on their own (the charts use classes)
_SVG_STYLE = "".join(line[len("svg "):] + "\n" for line in CSS.splitlines()
                     if line.startswith("svg ") and not line.startswith("svg.chart"))
_FONT = ('svg { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, '
         'sans-serif; }\n')


def standalone_svg(svg: str) -> str:
    """A chart of :mod:`starpo.report.charts` as an SVG file: its style and a white
    background inside it."""
    head_end = svg.index(">") + 1
    return (svg[:head_end] + f"<style>{_FONT}{_SVG_STYLE}</style>"
            '<rect width="100%" height="100%" fill="#ffffff"/>' + svg[head_end:])


@dataclass
class Figures:
    """Writes figures into ``directory`` and returns their Markdown image lines, with
    paths relative to the document."""

    directory: Path
    doc_dir: Path
    written: list[Path] = field(default_factory=list)

    def add(self, name: str, svg: str, alt: str) -> str:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
        path = self.directory / f"{name}.svg"
        fileio.write_text(path, standalone_svg(svg))
        self.written.append(path)
        rel = path.relative_to(self.doc_dir).as_posix() if path.is_relative_to(self.doc_dir) \
            else path.as_posix()
        return f"![{alt}]({rel})"


@dataclass
class Claim:
    """One finding of a paper, checked on a difference of ours (see :mod:`.estimate`).

    ``direction`` +1: the paper's finding is that the difference is positive, −1 negative.
    ``no_worse``: the finding is "equal or better" (it fails only when the interval is
    entirely on the wrong side). ``why_not`` is said when it does not reproduce or stays
    inconclusive: what we think is the reason at this scale."""

    paper: str
    measure: str
    diff: Estimate
    direction: int = 1
    no_worse: bool = False
    why_not: str = ""
    # said instead of why_not when the result is inconclusive but the mean difference has
    # the paper's sign (a direction too small for the seeds to settle)
    why_weak: str = ""

    @property
    def leans_the_papers_way(self) -> bool:
        return (self.verdict == INCONCLUSIVE and self.diff.known and self.diff.has_interval
                and self.diff.mean * self.direction > 0)

    @property
    def verdict(self) -> str:
        v = verdict(self.diff, self.direction)
        if self.no_worse and v == INCONCLUSIVE and self.diff.has_interval:
            return REPRODUCES
        return v

    @property
    def verdict_text(self) -> str:
        v = self.verdict
        if v == REPRODUCES:
            if self.no_worse and verdict(self.diff, self.direction) == INCONCLUSIVE:
                return "reproduces as equal (the interval includes 0)"
            return "reproduces"
        if v == OPPOSITE:
            return "does not reproduce (the opposite direction)"
        if not self.diff.known:
            return "not measured"
        if not self.diff.has_interval:
            return "inconclusive (no interval)"
        return "inconclusive at this scale (the interval includes 0)"


def claims_table(claims: Sequence[Claim]) -> str:
    rows = [(c.paper, c.measure, fmt(c.diff), f"**{c.verdict_text}**") for c in claims]
    return table(("the paper", "ours: the difference it implies (95% interval)",
                  "measured", "verdict"), rows)


def claims_notes(claims: Sequence[Claim]) -> str:
    """The reasons we give where a finding does not reproduce (one paragraph each,
    said once per distinct reason)."""
    seen, out = set(), []
    for c in claims:
        if c.verdict == REPRODUCES or not c.diff.known:
            continue
        if c.leans_the_papers_way and c.why_weak:
            if c.why_weak not in seen:
                seen.add(c.why_weak)
                out.append(f"*Where this stays inconclusive ({c.measure}):* the difference "
                           f"has the paper's sign ({c.diff.mean:+.3f}) but its interval "
                           f"includes 0. {c.why_weak}")
        elif c.why_not and c.why_not not in seen:
            seen.add(c.why_not)
            out.append(f"*Where this does not reproduce ({c.measure}):* {c.why_not}")
    return "\n\n".join(out)


def overall(claims: Sequence[Claim]) -> str:
    """One word for a section: every claim reproduces, some do, or none does."""
    vs = [c.verdict for c in claims if c.diff.known]
    if not vs:
        return "not measured"
    if all(v == REPRODUCES for v in vs):
        return REPRODUCES
    if all(v == OPPOSITE for v in vs):
        return OPPOSITE
    if any(v == REPRODUCES for v in vs):
        return "partly reproduces"
    return "does not reproduce" if any(v == OPPOSITE for v in vs) else INCONCLUSIVE


def seeds_text(seeds: Sequence[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))
