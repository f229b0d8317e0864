"""Online (iterative) DPO: the parts of a round that do not need a run directory.

One round, as in the LIONs recipe::

    prompts of the round ──sample n responses per prompt from the policy──▶ samples
      ──judge scores every sample──▶ scores
      ──the recipe's pair rule (best vs worst, …; starpo.pair_rules)──▶ pairs
      ──canonical preference rows──▶ the offline preference trainer (starpo.stages.dpo)

The stage (:mod:`starpo.stages.online`) strings rounds together, writes what each round
saw and chose, and trains; everything here is a plain function of its arguments.

Pair selection (:func:`select_pair`)
    Candidates are the *distinct* response texts of a prompt (a text sampled twice is one
    candidate, scored as first sampled), with a finite score. A prompt is dropped when
    fewer than two distinct texts remain (``"identical"``: the LIONs paper drops prompts
    whose samples are all identical) or when the rule picks no pair whose scores differ by
    more than ``tie_tolerance`` (``"tie"``: the judge expresses no preference). The rule
    (``pair_selection``: ``best_worst``, ``best_random``, ``mean_minus_2sd``, ``random`` or
    your own) is one of :mod:`starpo.pair_rules`; score ties are broken by sample order,
    so selection is deterministic given the round's seed.

Prompts of a round (:func:`round_prompt_indices`)
    With ``prompts_per_round = m`` over ``N`` prompts, the prompts are shuffled by a seeded
    permutation and consecutive rounds take consecutive blocks of ``m``: rounds see
    different prompts until the set is used up (``N // m`` rounds), then a new permutation
    starts. ``m = None`` uses every prompt every round.

Seeds
    The prompt permutation is seeded by the stage seed (so rounds take disjoint blocks of
    one permutation). :func:`round_seed` derives one integer per (stage seed, round); it
    seeds the sampling streams (:mod:`starpo.generate.sampling` is deterministic given the seed
    and the prompt order), ``best_random`` and the round's training shuffle.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

from starpo import pair_rules, world
from starpo.canonical import last_user_text, msg, preference_row
from starpo.generate.sampling import generate
from starpo.judges.base import rank_groups
from starpo.train import preempt

DROP_IDENTICAL = "identical"   # fewer than two distinct responses
DROP_TIE = "tie"               # best and worst (or every worse) score within the tolerance
DROP_TOKENIZE = "tokenize"     # the pair did not survive tokenization / truncation
# judge scores within this are no preference: a pair made of them would train on noise
# (reward models in bf16 round scores of near-identical samples to a few ulps)
TIE_TOLERANCE = 1e-6


# --------------------------------------------------------------------------- seeds, prompts

def round_seed(seed: int, round_index: int) -> int:
    """A 31-bit seed for round ``round_index`` (1-based) of a stage seeded with ``seed``."""
    digest = hashlib.sha256(f"starpo-online|{int(seed)}|{int(round_index)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def round_prompt_indices(num_prompts: int, per_round: int | None, round_index: int,
                         seed: int) -> list[int]:
    """Indices of the prompts of round ``round_index`` (1-based); see the module docstring."""
    if round_index < 1:
        raise ValueError(f"round_index is 1-based, got {round_index}")
    if num_prompts <= 0:
        return []
    if per_round is None or per_round >= num_prompts:
        return list(range(num_prompts))
    rounds_per_pass = num_prompts // per_round
    pass_index, slot = divmod(round_index - 1, rounds_per_pass)
    order = list(range(num_prompts))
    random.Random(f"starpo-online-prompts|{int(seed)}|{pass_index}").shuffle(order)
    return order[slot * per_round:(slot + 1) * per_round]


# --------------------------------------------------------------------------- pair selection

@dataclass(frozen=True)
class PairChoice:
    """A pair picked for one prompt: indices into its samples, their scores, and the rule
    (:mod:`starpo.pair_rules`) that picked it."""

    chosen: int
    rejected: int
    chosen_score: float
    rejected_score: float
    rule: str = "best_worst"

    @property
    def margin(self) -> float:
        return self.chosen_score - self.rejected_score


def select_pair(texts: Sequence[str], scores: Sequence[float], *, mode: str = "best_worst",
                rng: random.Random | None = None,
                tie_tolerance: float = TIE_TOLERANCE) -> list[PairChoice] | str:
    """The (chosen, rejected) pairs that rule ``mode`` picks from one prompt's samples, or
    the reason it has none (:data:`DROP_IDENTICAL` or :data:`DROP_TIE`)."""
    if len(texts) != len(scores):
        raise ValueError(f"select_pair: {len(texts)} texts but {len(scores)} scores")
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)
    if len(first) < 2:
        return DROP_IDENTICAL
    cands = [i for i in first.values() if math.isfinite(float(scores[i]))]
    if len(cands) < 2:
        return DROP_TIE  # no two scored candidates to compare: the judge said nothing usable
    s = [float(scores[i]) for i in cands]
    picked = pair_rules.pairs_of(mode, s, rng=rng or random.Random(0),
                                 tie_tolerance=tie_tolerance)
    if not picked:
        return DROP_TIE
    return [PairChoice(cands[c], cands[r], s[c], s[r], mode) for c, r in picked]


def select_pairs(groups: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], *,
                 mode: str = "best_worst", seed: int = 0,
                 tie_tolerance: float = TIE_TOLERANCE) -> list[list[PairChoice] | str]:
    """:func:`select_pair` for every prompt, each with a random stream of its own (seeded by
    ``seed`` and the prompt's position), so one prompt's draw never depends on another's."""
    if len(groups) != len(scores):
        raise ValueError("select_pairs: one score list per sample group")
    return [select_pair(g, s, mode=mode, tie_tolerance=tie_tolerance,
                        rng=random.Random(f"starpo-online-pair|{int(seed)}|{i}"))
            for i, (g, s) in enumerate(zip(groups, scores))]


# --------------------------------------------------------------------------- sampling, judging

def sample_responses(model, tokenizer, prompts: Sequence[list[dict]], spec, *, n: int,
                     seed: int, progress: bool = True, desc: str = "sampling",
                     backend=None, runtime=None, indices: Sequence[int] | None = None):
    """``n`` samples per prompt (a :class:`starpo.generate.sampling.Generations`); deterministic
    given ``seed`` and the prompt order (with a ``runtime`` of several processes, sharded
    across them and gathered). ``indices``: the prompts' random streams when they are a
    chunk of a longer list (their positions in it)."""
    kw = {"indices": list(indices)} if indices is not None else {}
    return generate(model, tokenizer, list(prompts), spec, n=n, seed=seed,
                    progress=progress, desc=desc, backend=backend, runtime=runtime, **kw)


def judge_groups(judge, prompts: Sequence[list[dict]], groups: Sequence[Sequence[str]], *,
                 progress: bool = True, chunk_prompts: int = 64,
                 desc: str = "judging") -> list[list[float]]:
    """Scores of every prompt's responses, ``chunk_prompts`` prompts per judge call (so the
    progress bar moves and a reward model sees batches of a bounded size)."""
    from tqdm.auto import tqdm

    out: list[list[float]] = []
    total = sum(len(g) for g in groups)
    bar = tqdm(total=total, desc=desc, unit="resp", disable=not progress, leave=False)
    try:
        for s in range(0, len(prompts), chunk_prompts):
            if s:   # nothing of the judging is kept: it is redone from the saved samples
                preempt.check(desc)
            ps = list(prompts[s:s + chunk_prompts])
            gs = [list(g) for g in groups[s:s + chunk_prompts]]
            for g, sc in zip(gs, rank_groups(judge, ps, gs)):
                if len(sc) != len(g):
                    raise ValueError(f"judge returned {len(sc)} scores for {len(g)} responses")
                out.append([float(x) for x in sc])
            bar.update(sum(len(g) for g in gs))
    finally:
        bar.close()
    return out


# --------------------------------------------------------------------------- records

def sample_records(round_index: int, rows: Sequence[dict], generations,
                   scores: Sequence[Sequence[float]],
                   choices: Sequence[list[PairChoice] | str]) -> list[dict]:
    """One JSON-ready record per prompt: the prompt, every sample with its score, and what
    selection did with it (``pairs`` = [[chosen, rejected], ...] sample indices, ``pair``
    the first of them, ``rule`` the rule that picked them; or ``dropped``)."""
    out = []
    for i, (row, samples, sc, ch) in enumerate(zip(rows, generations, scores, choices)):
        rec = {"round": round_index, "index": i, "id": row.get("id"),
               "prompt": row["prompt"],
               "samples": [{"text": smp.text, "score": float(v), "num_tokens": smp.num_tokens,
                            "finished": smp.finished} for smp, v in zip(samples, sc)]}
        if isinstance(ch, str):
            rec["pair"], rec["pairs"], rec["rule"], rec["dropped"] = None, [], None, ch
        else:
            rec["pairs"] = [[p.chosen, p.rejected] for p in ch]
            rec["pair"], rec["rule"], rec["dropped"] = rec["pairs"][0], ch[0].rule, None
        out.append(rec)
    return out


def pair_records(samples: Sequence[dict]) -> list[dict]:
    """One record per selected pair (chosen/rejected text, scores, margin) from
    :func:`sample_records`' output."""
    out = []
    for rec in samples:
        # records written before several pairs per prompt have only "pair"
        pairs = rec.get("pairs", [rec["pair"]] if rec["pair"] is not None else [])
        for c, r in pairs:
            sc, sr = rec["samples"][c], rec["samples"][r]
            out.append({"round": rec["round"], "index": rec["index"], "id": rec["id"],
                        "prompt": rec["prompt"], "chosen": sc["text"], "rejected": sr["text"],
                        "chosen_score": sc["score"], "rejected_score": sr["score"],
                        "margin": sc["score"] - sr["score"], "chosen_sample": c,
                        "rejected_sample": r, "rule": rec.get("rule")})
    return out


def preference_rows(pairs: Sequence[dict], *, source: str) -> list[dict]:
    """Canonical preference rows (:mod:`starpo.canonical`) of :func:`pair_records`;
    ``row`` is the prompt's index in the round, so tokenization problems name it."""
    return [preference_row(p["prompt"], [msg("assistant", p["chosen"])],
                           [msg("assistant", p["rejected"])], source=source, row=p["index"])
            for p in pairs]


def _mean(xs: Sequence[float]) -> float | None:
    xs = [float(x) for x in xs if math.isfinite(float(x))]
    return sum(xs) / len(xs) if xs else None


def gold_signal(samples: Sequence[dict], pairs: Sequence[dict]) -> dict:
    """The embedded world's gold reward of the same samples, when the prompts are the
    world's (``None`` values otherwise): what the judge's scores are worth. ``mean_gold``
    rising with ``mean_score`` is real progress; the judge's mean rising while the gold
    falls is over-optimisation of the judge. ``pair_gold_agreement`` is the share of
    selected pairs whose chosen response also has the higher gold reward (ties ½)."""
    texts = [last_user_text(r["prompt"]) for r in samples]
    if not texts or any(world.parse_prompt(t) is None for t in texts):
        return {"mean_gold": None, "mean_chosen_gold": None, "pair_gold_agreement": None}
    flat_p = [t for t, r in zip(texts, samples) for _ in r["samples"]]
    flat_r = [s["text"] for r in samples for s in r["samples"]]
    pair_texts = [last_user_text(p["prompt"]) for p in pairs]
    gold_c = world.gold_rewards(pair_texts, [p["chosen"] for p in pairs])
    gold_r = world.gold_rewards(pair_texts, [p["rejected"] for p in pairs])
    agree = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(gold_c, gold_r)]
    return {"mean_gold": _mean(world.gold_rewards(flat_p, flat_r)),
            "mean_chosen_gold": _mean(gold_c), "pair_gold_agreement": _mean(agree)}


def round_statistics(samples: Sequence[dict], pairs: Sequence[dict]) -> dict:
    """What a round's sampling and selection looked like (for ``rounds.jsonl``): the judge's
    scores, lengths and end-of-turn rate, and the gold signal (:func:`gold_signal`)."""
    all_scores = [s["score"] for r in samples for s in r["samples"]]
    tokens = [s["num_tokens"] for r in samples for s in r["samples"]]
    finished = [s["finished"] for r in samples for s in r["samples"]]
    distinct = [len({s["text"] for s in r["samples"]}) for r in samples]
    best = [max(s["score"] for s in r["samples"]) for r in samples if r["samples"]]
    dropped: dict[str, int] = {}
    for r in samples:
        if r["dropped"]:
            dropped[r["dropped"]] = dropped.get(r["dropped"], 0) + 1
    return {
        "prompts": len(samples),
        "samples": len(all_scores),
        "mean_score": _mean(all_scores),
        "mean_best_score": _mean(best),
        "mean_chosen_score": _mean([p["chosen_score"] for p in pairs]),
        "mean_rejected_score": _mean([p["rejected_score"] for p in pairs]),
        "mean_margin": _mean([p["margin"] for p in pairs]),
        "mean_tokens": _mean(tokens),
        "finished_fraction": (sum(finished) / len(finished)) if finished else None,
        "mean_distinct_samples": _mean(distinct),
        "pairs_selected": len(pairs),
        "dropped_identical": dropped.get(DROP_IDENTICAL, 0),
        "dropped_ties": dropped.get(DROP_TIE, 0),
        **gold_signal(samples, pairs),
    }


# --------------------------------------------------------------------------- files

@dataclass
class Timer:
    """Seconds spent per phase of a round."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, t0: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - t0, 2)
