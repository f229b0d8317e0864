"""The world's data: prompts sampled from the templates, rows of each kind (``sft``,
``preference``, ``eval``, ``prompt``) for one seed, and the tokenizer corpus.

The rows are built with the constructors of :mod:`starpo.canonical` (``data/sources.py``
reads them as the ``world:<kind>`` source).
"""

from __future__ import annotations

import random
from functools import lru_cache

from starpo.canonical import msg, preference_row, prompt_row, sft_row
from starpo.errors import DataError
from starpo.world.gold import _score
from starpo.world.labeler import label_pair
from starpo.world.responses import MIX, _mix_response, _pick, _variants, best_response
from starpo.world.templates import (BENIGN_PAIRS_HELDOUT, COLORS, COLORS_HELDOUT, CONTAINERS,
                                    CONTAINERS_HELDOUT, FILLERS, HARM_PAIRS_HELDOUT,
                                    HARM_VERBS, ITEMS, ITEMS_HELDOUT, NAMES, NAMES_HELDOUT,
                                    NUMBERS, OBJECTS, OBJECTS_HELDOUT, REFUSALS, TEMPLATES,
                                    VICTIMS, VICTIMS_HELDOUT, Task, _SLOT_KIND, _SLOT_RE,
                                    _task_from_slots)

KINDS = ("sft", "preference", "eval", "prompt")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _templates(family: str, split: str) -> list[str]:
    return [t for f, sp, t in TEMPLATES if f == family and sp == split]


_FAMILY_MIX = [("lookup1", 0.2), ("lookup2", 0.15), ("compare", 0.2), ("harmful", 0.2),
               ("benign", 0.25)]
_HARM_TRAIN = [(v, t) for v in HARM_VERBS for t in VICTIMS if (v, t) not in HARM_PAIRS_HELDOUT]
_HARM_EVAL = sorted(HARM_PAIRS_HELDOUT) + [(v, t) for v in HARM_VERBS for t in VICTIMS_HELDOUT]
_BENIGN_TRAIN = [(v, o) for o, (vs, _) in OBJECTS.items() for v in vs
                 if (v, o) not in BENIGN_PAIRS_HELDOUT]
_BENIGN_EVAL = sorted(BENIGN_PAIRS_HELDOUT) + [(v, o) for o, (vs, _) in OBJECTS_HELDOUT.items()
                                               for v in vs]


def _sample_prompt(rng: random.Random, split: str) -> tuple[str, Task]:
    """A prompt (text, task). ``split="eval"``: a held-out template, and with probability
    one half held-out slot values too."""
    fam = _pick(rng, _FAMILY_MIX)
    held = split == "eval" and rng.random() < 0.5
    colors = COLORS_HELDOUT if held else COLORS
    conts = CONTAINERS_HELDOUT if held else CONTAINERS
    items = ITEMS_HELDOUT if held else ITEMS
    names = NAMES_HELDOUT if held else NAMES
    s: dict[str, str] = {}
    if fam in ("lookup1", "lookup2"):
        s.update(k=rng.choice(conts), items=rng.choice(items))
        if fam == "lookup1":
            s.update(c=rng.choice(colors), n=str(rng.choice(NUMBERS)))
        else:
            c1, c2 = rng.sample(colors, 2)
            n1, n2 = rng.sample(NUMBERS, 2)
            s.update(c1=c1, c2=c2, n1=str(n1), n2=str(n2), cq=rng.choice((c1, c2)))
        family = fam
    elif fam == "compare":
        a, b = rng.sample(names, 2)
        na, nb = rng.sample(NUMBERS, 2)
        s.update(a=a, b=b, na=str(na), nb=str(nb), items=rng.choice(items),
                 dir=rng.choice(("more", "fewer")))
        family = fam
    else:
        if fam == "harmful":
            verb, tgt = rng.choice(_HARM_EVAL if held else _HARM_TRAIN)
        else:
            verb, tgt = rng.choice(_BENIGN_EVAL if held else _BENIGN_TRAIN)
        s.update(verb=verb, target=tgt)
        family = "request"
    text = rng.choice(_templates(family, split)).format(**s)
    text = text[:1].upper() + text[1:]
    task = _task_from_slots(family, s)
    assert task is not None
    return text, task


class World:
    """The synthetic world for one seed. See the module docstring for what it contains."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def _rng(self, kind: str, seed: int | None) -> random.Random:
        return random.Random(f"starpo-world|{self.seed}|{kind}|{0 if seed is None else int(seed)}")

    def _id(self, kind: str, seed: int | None, i: int) -> str:
        """The id of row ``i`` of a prompt-row kind (``eval``, ``prompt``) for ``seed``."""
        return f"world-{kind}-{self.seed}-{0 if seed is None else seed}-{i}"

    def sft_rows(self, n: int, seed: int | None = None) -> list[dict]:
        rng, src = self._rng("sft", seed), "world:sft"
        out = []
        for i in range(n):
            p, task = _sample_prompt(rng, "train")
            out.append(sft_row([msg("user", p), msg("assistant", _mix_response(task, rng))],
                               source=src, row=i))
        return out

    def _pair(self, p: str, task: Task, rng: random.Random) -> tuple[str, str]:
        """Two different responses from the mix, ordered (chosen, rejected) by the labeler."""
        a = _mix_response(task, rng)
        b = _mix_response(task, rng)
        for _ in range(20):
            if b != a:
                break
            b = _mix_response(task, rng)
        if b == a:  # astronomically unlikely; keep the pair well-formed anyway
            b = best_response(task) if a != best_response(task) else REFUSALS[1]
        if label_pair(p, a, b, rng, gold_a=_score(task, a), gold_b=_score(task, b)):
            return a, b
        return b, a

    def preference_rows(self, n: int, seed: int | None = None) -> list[dict]:
        rng, src = self._rng("preference", seed), "world:preference"
        out = []
        for i in range(n):
            p, task = _sample_prompt(rng, "train")
            ch, rj = self._pair(p, task, rng)
            out.append(preference_row([msg("user", p)], [msg("assistant", ch)],
                                      [msg("assistant", rj)], source=src, row=i))
        return out

    def eval_rows(self, n: int, seed: int | None = None) -> list[dict]:
        rng, src = self._rng("eval", seed), "world:eval"
        out = []
        for i in range(n):
            p, task = _sample_prompt(rng, "eval")
            ch, _ = self._pair(p, task, rng)
            out.append(prompt_row([msg("user", p)], chosen=[msg("assistant", ch)],
                                  id=self._id("eval", seed, i), source=src, row=i))
        return out

    def prompt_rows(self, n: int, seed: int | None = None) -> list[dict]:
        rng, src = self._rng("prompt", seed), "world:prompt"
        out = []
        for i in range(n):
            p, _ = _sample_prompt(rng, "train")
            out.append(prompt_row([msg("user", p)], id=self._id("prompt", seed, i),
                                  source=src, row=i))
        return out

    def best_response(self, prompt: str) -> str:
        return best_response(prompt)

    def corpus(self, n: int = 5000) -> list[str]:
        """Texts for training the tokenizer: coverage texts naming every word the world can
        emit (eval vocabulary included), then sampled prompt/response texts, ``max(n,
        coverage)`` in all."""
        texts = _coverage_texts()
        rng = self._rng("corpus", 0)
        while len(texts) < n:
            p, task = _sample_prompt(rng, "eval" if rng.random() < 0.2 else "train")
            texts.append(p + "\n" + _mix_response(task, rng))
        return texts


@lru_cache(maxsize=1)
def _coverage_texts_cached() -> tuple[str, ...]:
    out: list[str] = []
    tasks: list[Task] = []
    # every template, rendered so that every value of each of its slots occurs (slots of
    # one kind, such as the two colours of a two-fact prompt, take different values)
    pools = {"color": COLORS + COLORS_HELDOUT, "k": CONTAINERS + CONTAINERS_HELDOUT,
             "items": ITEMS + ITEMS_HELDOUT, "name": NAMES + NAMES_HELDOUT,
             "num": [str(x) for x in NUMBERS], "dir": ["more", "fewer"]}
    for fam, _split, text in TEMPLATES:
        if fam == "request":
            combos = [dict(verb=v, target=t) for v, t in
                      _HARM_TRAIN + _HARM_EVAL + _BENIGN_TRAIN + _BENIGN_EVAL]
        else:
            slots = [x for x in dict.fromkeys(_SLOT_RE.findall(text)) if x != "cq"]
            width = max(len(pools[_SLOT_KIND[x]]) for x in slots)
            combos = []
            for j in range(width):
                vals, used = {}, {}
                for x in slots:
                    kind = _SLOT_KIND[x]
                    pool = pools[kind]
                    vals[x] = pool[(j + used.get(kind, 0)) % len(pool)]
                    used[kind] = used.get(kind, 0) + 1
                if "c1" in vals:
                    vals["cq"] = vals["c1"] if j % 2 else vals["c2"]
                combos.append(vals)
        for vals in combos:
            out.append(_cap(text.format(**vals)))
            task = _task_from_slots(fam, vals)
            assert task is not None, (text, vals)
            tasks.append(task)
    # every response sentence of every content kind, for those tasks
    for t in tasks:
        for kind, _w in MIX[t.family]:
            out += [v for v, _ in _variants(t, kind, wrong="2")]
    out += list(FILLERS) + [" ".join(str(i) for i in range(0, 100))]
    # packed 16 lines to a text: the tokenizer sees the same words, the corpus stays short
    return tuple("\n".join(out[i:i + 16]) for i in range(0, len(out), 16))


def _coverage_texts() -> list[str]:
    return list(_coverage_texts_cached())


def rows(kind: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` rows of ``kind`` (``sft``, ``preference``, ``eval``, ``prompt``) from the world
    of ``seed`` (the data source ``world:<kind>``)."""
    w = World(seed)
    makers = {"sft": w.sft_rows, "preference": w.preference_rows, "eval": w.eval_rows,
              "prompt": w.prompt_rows}
    if kind not in makers:
        raise DataError(f"unknown world data kind {kind!r}; expected one of "
                        f"{', '.join('world:' + k for k in KINDS)}", source=f"world:{kind}")
    return makers[kind](n)
