"""The report's summary in words: what the paired score gaps say, and which model to pick.

Pure functions of an evaluation's ``summary.json`` and ``gaps.json`` (no HTML), so the
rule is testable on its own:

* a paired gap is *higher* / *lower* when its 95% interval lies above / below 0, else the
  two models are *not distinguishable* on these prompts;
* the pick is the model with the highest mean score, unless a paired gap shows it is not
  distinguishable from another model: then, of those, the one closest to the SFT model
  (lowest KL to it; the less a model has drifted, the less it risks off the prompts
  measured), since the score does not separate them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starpo.report.charts import finite, fmt, signed

HIGHER, LOWER, TIED = "higher", "lower", "not distinguishable"


def gap_word(ci: Any) -> str | None:
    """``higher`` / ``lower`` / ``not distinguishable`` from a 95% interval, None without one."""
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(finite(v) for v in ci)):
        return None
    return HIGHER if ci[0] > 0 else LOWER if ci[1] < 0 else TIED


def _valid_gaps(gaps: Any) -> list[dict]:
    return [g for g in (gaps if isinstance(gaps, list) else [])
            if isinstance(g, dict) and finite(g.get("gap")) and gap_word(g.get("gap_ci"))]


def gap_text(g: dict) -> str:
    """``+0.111 [+0.062, +0.161]``."""
    ci = g["gap_ci"]
    return f"{signed(g['gap'])} [{signed(ci[0])}, {signed(ci[1])}]"


def gap_sentence(g: dict) -> str:
    """``dpo is higher than sft: +0.111 [+0.062, +0.161]`` in the words of :func:`gap_word`."""
    word = gap_word(g["gap_ci"])
    rel = {HIGHER: "scores higher than", LOWER: "scores lower than",
           TIED: "is not distinguishable from"}[word]
    return f"{g['model']} {rel} {g['baseline']}: {g['model']} − {g['baseline']} {gap_text(g)}"


@dataclass
class Pick:
    model: str
    why: str


def pick_model(summary: dict[str, dict], gaps: Any, reference: str | None = None
               ) -> Pick | None:
    """The model to pick and why (the module's rule), or None without mean scores."""
    scores = {n: float(m["mean_score"]) for n, m in summary.items()
              if isinstance(m, dict) and finite(m.get("mean_score"))}
    if not scores:
        return None
    best = max(scores, key=lambda n: (scores[n], n == reference))
    valid = _valid_gaps(gaps)

    def between(a: str, b: str) -> dict | None:
        return next((g for g in valid if {g["model"], g["baseline"]} == {a, b}), None)

    tied = {n: g for n in scores if n != best and (g := between(best, n)) is not None
            and gap_word(g["gap_ci"]) == TIED}
    score_txt = f"mean score {fmt(scores[best])}"
    if not tied:
        if len(scores) == 1:
            return Pick(best, f"it is the only model evaluated ({score_txt})")
        runner = max((n for n in scores if n != best), key=lambda n: scores[n])
        g = between(best, runner)
        if g is None:
            return Pick(best, f"it has the highest {score_txt}; no paired gap to {runner} "
                              f"(the next best, {fmt(scores[runner])}) was computed, so the "
                              f"margin is not tested")
        return Pick(best, f"it has the highest {score_txt}, and on the same prompts it is "
                          f"clear of {runner}, the next best ({g['model']} − "
                          f"{g['baseline']} {gap_text(g)})")
    group = [best, *tied]
    kl = {n: summary[n].get("kl_vs_sft") for n in group}
    if not all(finite(v) for v in kl.values()):
        names = ", ".join(tied)
        return Pick(best, f"it has the highest {score_txt}, though the paired gaps do not "
                          f"separate it from {names}; without KL to the SFT model there is "
                          f"nothing else to choose by")
    chosen = min(group, key=lambda n: (kl[n], -scores[n]))
    others = [n for n in group if n != chosen]
    gap_bits = "; ".join(f"{g['model']} − {g['baseline']} {gap_text(g)}"
                         for g in (between(best, n) for n in tied))
    closer = ", ".join(f"{n} {fmt(kl[n])}" for n in others)
    lead = (f"it has the highest {score_txt}" if chosen == best else
            f"{best} scores highest ({fmt(scores[best])}) but the paired gaps do not "
            f"separate it from {chosen} ({fmt(scores[chosen])})")
    if chosen == best:
        lead += f", and the paired gaps do not separate it from {', '.join(others)}"
    return Pick(chosen, f"{lead} ({gap_bits}); of those, {chosen} stays closest to the SFT "
                        f"model (KL {fmt(kl[chosen])} nats against {closer})")


def verdict_lines(gaps: Any) -> list[str]:
    """One sentence per paired gap (:func:`gap_sentence`), in ``gaps.json``'s order."""
    return [gap_sentence(g) for g in _valid_gaps(gaps)]
