"""Responses of known quality: the imperfect mix the data is drawn from (correct, wrong,
vague, hedged, refusing, complying, padded with fillers) and the best response."""

from __future__ import annotations

import random
from typing import Any

from starpo.world.templates import (ALL_OBJECTS, EVIL_TIPS, FILLERS, NUMBERS, REFUSALS, Task,
                                    parse_prompt)

def _you(phrase: str) -> str:
    return "your " + phrase[3:] if phrase.startswith("my ") else phrase


def _variants(task: Task, kind: str, wrong: str = "") -> list[tuple[str, float]]:
    """The response sentences of content ``kind`` for ``task``, with sampling weights
    (``wrong``: the wrong number a ``wrong``/``hedge`` lookup answer uses)."""
    s = task.slots
    if kind == "refuse":
        return [(r, 1.0) for r in REFUSALS]
    if task.family == "lookup":
        c = s.get("cq") or s["c"]
        k, items, n = s["k"], s["items"], task.answer
        if kind == "correct":
            # mostly the form that names colour and container before the number: the
            # easiest for a tiny model to copy from the prompt
            return [(f"The {c} {k} holds {n} {items}.", 0.7),
                    (f"There are {n} {items} in the {c} {k}.", 0.15),
                    (f"It holds {n} {items}.", 0.15)]
        if kind == "hedge":
            return [(f"It holds {n} or {wrong} {items}.", 1.0),
                    (f"It holds {wrong} or {n} {items}.", 1.0)]
        if kind == "wrong":
            return [(f"The {c} {k} holds {wrong} {items}.", 1.0),
                    (f"It holds {wrong} {items}.", 1.0)]
        return [(f"The {c} {k} holds some {items}.", 1.0),
                (f"There are a few {items} in it.", 1.0)]
    if task.family == "compare":
        items, d = s["items"], s["dir"].lower()
        x, y = task.answer, task.others[0]
        if kind == "wrong":
            x, y = y, x
        if kind in ("correct", "wrong"):
            return [(f"{x} has {d} {items}.", 1.0), (f"{x} has {d} {items} than {y}.", 1.0),
                    (f"It is {x}.", 1.0)]
        return [(f"They both have some {items}.", 1.0), ("They have about the same.", 1.0)]
    verb, tgt = s["verb"].lower(), _you(s["target"].lower())
    if task.family == "harmful":
        if kind == "comply":
            return [(f"{start}{tip}.", 1.0) for tip in EVIL_TIPS
                    for start in (f"Sure. To {verb} {tgt}, ", f"Here is how to {verb} {tgt}: ")]
        return [("You should think hard about this first.", 1.0), ("That is up to you.", 1.0)]
    if kind == "correct":
        tip = ALL_OBJECTS[s["target"].lower()][1]
        return [(f"To {verb} {tgt}, {tip}.", 1.0), (f"Sure. To {verb} {tgt}, {tip}.", 1.0),
                (f"Here is how to {verb} {tgt}: {tip}.", 1.0)]
    return [("You should be careful and take your time.", 1.0), ("Just do your best.", 1.0)]


def _core(task: Task, kind: str, rng: random.Random) -> str:
    """One response sentence of content ``kind`` (no fillers)."""
    wrong = ""
    if task.family == "lookup" and kind in ("wrong", "hedge"):
        # the typical mistake is the other stated number; else any number
        other = [x for x in (task.slots.get("n1"), task.slots.get("n2"))
                 if x and x != task.answer]
        wrong = other[0] if other and rng.random() < 0.85 else \
            str(rng.choice([x for x in NUMBERS if str(x) != task.answer]))
    return _pick(rng, _variants(task, kind, wrong))


# content kinds of the imperfect response mix, per family: (kind, weight)
MIX = {
    "lookup": [("correct", 0.55), ("wrong", 0.2), ("vague", 0.07), ("hedge", 0.06),
               ("refuse", 0.12)],
    "compare": [("correct", 0.55), ("wrong", 0.25), ("vague", 0.08), ("refuse", 0.12)],
    "harmful": [("refuse", 0.55), ("comply", 0.37), ("vague", 0.08)],
    "benign": [("correct", 0.58), ("refuse", 0.3), ("vague", 0.12)],
}
FILLER_COUNTS = [(0, 0.5), (1, 0.2), (2, 0.17), (3, 0.13)]
MAX_MIX_WORDS = 26  # fillers are dropped beyond this, keeping mix responses ~5-25 words


def _pick(rng: random.Random, table: list[tuple[Any, float]]) -> Any:
    x, acc = rng.random() * sum(w for _, w in table), 0.0
    for v, w in table:
        acc += w
        if x < acc:
            return v
    return table[-1][0]


def _mix_response(task: Task, rng: random.Random) -> str:
    core = _core(task, _pick(rng, MIX[task.family]), rng)
    fill = rng.sample(FILLERS, _pick(rng, FILLER_COUNTS))
    while fill and len(core.split()) + sum(len(f.split()) for f in fill) > MAX_MIX_WORDS:
        fill.pop()
    front = [f for f in fill if rng.random() < 0.3]
    back = [f for f in fill if f not in front]
    return " ".join(front + [core] + back)


def best_response(prompt: str | Task) -> str:
    """A response with the best achievable gold score (1.0) for a world prompt."""
    task = prompt if isinstance(prompt, Task) else parse_prompt(prompt)
    if task is None:
        raise ValueError(f"not a prompt of the world: {str(prompt)[:80]!r}")
    s = task.slots
    if task.family == "lookup":
        return f"The {s.get('cq') or s['c']} {s['k']} holds {task.answer} {s['items']}."
    if task.family == "compare":
        return f"{task.answer} has {s['dir'].lower()} {s['items']}."
    if task.family == "harmful":
        return REFUSALS[0]
    tip = ALL_OBJECTS[s["target"].lower()][1]
    return f"To {s['verb'].lower()} {_you(s['target'].lower())}, {tip}."
