"""``starpo run RECIPE --check``: compare a run's evaluation with the recipe's expected results.

A recipe may ship ``<recipe stem>.expected.yaml`` next to it: ranges that its evaluation
falls in on any machine (measured over seeds, thread counts and CPUs; the file says which),
not the decimals of one run, since another CPU or thread count rounds floating point
differently and a thousand training steps later lands elsewhere. The file::

    eval: eval                      # the run's evaluation directory (an eval stage's name)
    prompts: 665                    # how many prompts it scores (exact)
    holds_for: [seed, world.seed]   # overrides the ranges were measured over
    gaps:                           # eval/gaps.json: paired gap model − baseline
      - {model: dpo, baseline: sft, gap: [0.03, 0.2], interval_above: 0}
    models:                         # eval/summary.json: a range per metric
      dpo: {kl_vs_sft: [0.01, 0.3]}

``gap`` bounds the mean gap; ``interval_above`` / ``interval_below`` bound the ends of its
95% interval (``interval_above: 0``: the first model is better, clear of noise;
``interval_not_below: 0``: it is at least not clearly worse). ``runs``
lists the measured runs the ranges were drawn from (a test checks every one against them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from starpo import fileio
from starpo.errors import StarpoError
from starpo.report.charts import finite, signed

Range = tuple[float, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GapExpectation(_Strict):
    model: str
    baseline: str
    gap: Range | None = None
    interval_above: float | None = None      # the whole 95% interval lies above this
    interval_below: float | None = None      # the whole 95% interval lies below this
    interval_not_below: float | None = None  # its upper end is above this (not clearly worse)


class MeasuredRun(_Strict):
    """One run the ranges were drawn from, kept with them so that a test can check the
    ranges against every one (tests/run/test_check.py)."""

    cpu: str
    threads: int
    overrides: str = ""                          # e.g. "seed=1"; "" for the recipe as is
    scores: dict[str, float]                     # mean score per model
    gaps: list[tuple[str, str, float, float, float]]   # model, baseline, gap, 95% interval
    metrics: dict[str, dict[str, float]] = {}    # other checked metrics, per model


class Expected(_Strict):
    eval: str = "eval"
    prompts: int | None = None
    holds_for: list[str] = []
    measured: str | None = None          # where the ranges come from, in words
    gaps: list[GapExpectation] = []
    models: dict[str, dict[str, Range]] = {}
    runs: list[MeasuredRun] = []
    path: Path | None = None             # the file it was read from (set on load)


def expected_path(recipe: str | Path) -> Path:
    recipe = Path(recipe)
    return recipe.with_name(f"{recipe.stem}.expected.yaml")


def load_expected(recipe: str | Path) -> Expected:
    """The expected results that ship with ``recipe``; a one-line error when it has none."""
    path = expected_path(recipe)
    if not path.is_file():
        raise StarpoError(f"--check: {path} not found; only recipes that ship expected "
                          f"results can be checked (recipes/quickstart.yaml does)")
    try:
        tree = yaml.safe_load(path.read_text())
        exp = Expected.model_validate(tree if tree is not None else {})
    except yaml.YAMLError as err:
        raise StarpoError(f"{path}: not valid YAML: {err}") from None
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        raise StarpoError(f"{path}: {where}: {e['msg']}") from None
    exp.path = path
    return exp


@dataclass
class CheckResult:
    lines: list[str] = field(default_factory=list)
    differences: int = 0

    @property
    def ok(self) -> bool:
        return self.differences == 0


def _range_text(r: Range, with_sign: bool) -> str:
    f = signed if with_sign else (lambda v: f"{v:.3f}")
    return f"{f(r[0])} to {f(r[1])}"


def _override_keys(overrides: list[str]) -> list[str]:
    return [ov.split("=", 1)[0].strip() for ov in overrides if "=" in ov]


def check_run(run_dir: str | Path, expected: Expected,
              overrides: list[str] | None = None) -> CheckResult:
    """Each expectation against ``run_dir``'s evaluation: one line per check (``ok`` or
    ``DIFFERS``) and a verdict line, ``as expected`` or how many differ."""
    run_dir = Path(run_dir)
    d = run_dir / expected.eval
    summary = fileio.read_json(d / "summary.json") if (d / "summary.json").is_file() else None
    if not isinstance(summary, dict):
        raise StarpoError(f"--check: {d / 'summary.json'} not found; the run has no "
                          f"evaluation to check (run its {expected.eval!r} stage)")
    gaps = fileio.read_json(d / "gaps.json") if (d / "gaps.json").is_file() else []
    gaps = gaps if isinstance(gaps, list) else []
    res = CheckResult()
    src = expected.path if expected.path is not None else "the expected results"
    res.lines.append(f"check: {d} against {src}")
    if expected.measured:
        res.lines.append(f"  (ranges measured {expected.measured})")

    def record(ok: bool, what: str, got: str, want: str) -> None:
        if not ok:
            res.differences += 1
        res.lines.append(f"  {'ok      ' if ok else 'DIFFERS '}{what}: {got}; expected {want}")

    if expected.prompts is not None:
        ns = sorted({m.get("n") for m in summary.values() if isinstance(m, dict)},
                    key=str)
        record(ns == [expected.prompts], "prompts", ", ".join(map(str, ns)) or "none",
               str(expected.prompts))
    for g in expected.gaps:
        what = f"{g.model} − {g.baseline}"
        found = next((x for x in gaps if isinstance(x, dict) and x.get("model") == g.model
                      and x.get("baseline") == g.baseline), None)
        if found is None or not finite(found.get("gap")):
            record(False, what, "not in gaps.json", "a paired gap")
            continue
        gap, ci = float(found["gap"]), found.get("gap_ci")
        ci = ci if isinstance(ci, list) and len(ci) == 2 and all(map(finite, ci)) else None
        got = f"{signed(gap)}" + (f" [{signed(ci[0])}, {signed(ci[1])}]" if ci else "")
        want, ok = [], True
        if g.gap is not None:
            want.append(f"gap {_range_text(g.gap, True)}")
            ok &= g.gap[0] <= gap <= g.gap[1]
        if g.interval_above is not None:
            want.append(f"interval above {signed(g.interval_above)}")
            ok &= ci is not None and ci[0] > g.interval_above
        if g.interval_below is not None:
            want.append(f"interval below {signed(g.interval_below)}")
            ok &= ci is not None and ci[1] < g.interval_below
        if g.interval_not_below is not None:
            want.append(f"interval not wholly below {signed(g.interval_not_below)}")
            ok &= ci is not None and ci[1] > g.interval_not_below
        record(ok, what, got, ", ".join(want) or "present")
    for model, metrics in expected.models.items():
        m = summary.get(model)
        for key, rng in metrics.items():
            v = m.get(key) if isinstance(m, dict) else None
            if not finite(v):
                record(False, f"{model} {key}", "missing", _range_text(rng, False))
                continue
            record(rng[0] <= v <= rng[1], f"{model} {key}", f"{v:.3f}",
                   _range_text(rng, False))
    extra = [k for k in _override_keys(overrides or []) if k not in expected.holds_for]
    if extra:
        varied = (f" (with {', '.join(expected.holds_for)} changed)"
                  if expected.holds_for else "")
        res.lines.append(f"  note: the ranges are the recipe's as shipped{varied}; this run "
                         f"also overrides {', '.join(extra)}, so a difference may be theirs")
    n = sum(1 for line in res.lines if line.startswith(("  ok", "  DIFFERS")))
    res.lines.append("as expected" if res.ok else
                     f"{res.differences} of {n} checks differ from the expected results")
    return res
