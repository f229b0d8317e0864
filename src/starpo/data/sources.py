"""Data sources: hub schemas, local files and the embedded world, turned into canonical rows.

Everything downstream sees only the shapes of :mod:`starpo.canonical`; this package
is the one place that knows how public datasets spell things. A source is read
(:mod:`starpo.data.readers`), every row is converted by a *format* (a named converter,
:data:`starpo.data.formats.FORMATS`), rows the safety filter rejects are set aside, and a seeded subset is taken (``fraction``, then ``n``).
:func:`load_mixture` then joins the sources, drops duplicates and shuffles.

Where a source lives (``SourceSpec.path``):

* ``world:<kind>`` -- the embedded synthetic world (``world:sft``, ``world:preference``,
  ``world:eval``, ``world:prompt``), ``n`` rows (default 2000) from ``recipe.world.seed``;
* an existing local ``.jsonl``/``.json``/``.parquet`` file (``.gz`` accepted for the JSON
  ones), or a directory of them (files whose name or parent folder starts with the split
  name -- ``train.jsonl``, ``train-00000.parquet``, ``train/part.jsonl`` -- when there are
  any, else every file);
* anything else is a hub dataset: ``datasets.load_dataset(path, name=config_name,
  data_dir=data_dir, split=split)``.

Rows are numbered from 0 within their file (JSON lines: row N is the N-th record, blank
lines not counted), so an error reads ``data/train.jsonl, row 17, field 'chosen': ...``.

Decisions worth knowing (also in the format docs below):

* ``text`` rows become a single assistant message with no user turn: the whole text is
  trained, the way plain-text SFT trains on every token.
* ShareGPT ``weight``: a turn whose weight is 0 is kept in the conversation as context; the
  canonical row lists such assistant turns in the optional key ``"untrained"`` (message
  indices) so the tokenizer can mask them. Trailing weight-0 turns are dropped (they would
  be context for nothing) and a conversation with no weighted assistant turn is a bad row.
  ``weight`` missing or null means trained.
* SFT conversations lose trailing user/system turns (nothing after them is trained).
* Response strings from text-continuation formats (HH-RLHF, TL;DR, TRL standard
  ``completion``/``chosen``/``rejected`` strings) lose their leading whitespace: it separated
  the response from the prompt text and means nothing once both are chat turns. HH-RLHF
  turns are stripped on both sides.
* Preference pairs given as two full conversations (UltraFeedback, implicit prompt): the
  prompt is their longest common prefix of messages, moved back to end on a non-assistant
  message, and each response is what follows (assistant messages only).
* SFT on preference data (``use: chosen`` on a source of an SFT stage, never implied):
  any preference format is read and each pair becomes the conversation prompt + chosen;
  only the chosen response is trained (assistant turns inside the prompt are context,
  listed in ``"untrained"``). The rejected side is not used, so its problems (empty,
  identical to chosen, an HH-RLHF transcript whose history differs) do not make a bad row.
* Bad rows (missing field, wrong type, identical chosen and rejected, empty response) raise
  :class:`~starpo.errors.DataError` naming file, row and field, and saying how to go on; with
  ``on_bad_rows="skip"`` they are dropped, counted in the log and written with their reasons
  to the stage's ``bad_rows.jsonl`` (:func:`starpo.errors.bad_rows_to`).

Counts are reported through ``log`` (a callable taking one line of text) and, when a
:class:`SourceStats` / :class:`MixtureStats` object is passed as ``stats=``, filled in there.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from starpo import world
from starpo.data.formats import (FORMATS, KINDS, USE_CHOSEN_HINT, Where, detect_format,
                                 detect_preference, detect_sft, to_kind, usable)
from starpo.data.readers import hub_source_name, is_local_like, read_hub, read_local
from starpo.errors import DataError, current_bad_rows, record_bad_row, skip_hint

WORLD_DEFAULT_N = 2000


# --------------------------------------------------------------------------- loading

@dataclass
class SourceStats:
    """What happened to one source's rows. ``read`` = raw rows; ``bad`` = malformed rows
    skipped; ``filtered`` = rows the safety filter set aside; ``kept`` = rows returned after
    ``fraction``/``n``; ``first_error`` = the message of the first skipped row."""

    source: str = ""
    format: str = ""
    read: int = 0
    bad: int = 0
    filtered: int = 0
    kept: int = 0
    first_error: str | None = None


@dataclass
class MixtureStats:
    sources: list[SourceStats] = field(default_factory=list)
    duplicates: int = 0
    rows: int = 0


def _select(rows: list[dict], fraction: float, n: int | None, rng: random.Random) -> list[dict]:
    """Seeded subset: ``fraction`` of the rows, then at most ``n``; source order is kept.

    One permutation serves both cuts, so the ``n`` rows are a subset of the fraction's.
    """
    total = len(rows)
    k = total if fraction >= 1.0 else max(1, round(total * fraction)) if total else 0
    if n is not None:
        k = min(k, n)
    if k >= total:
        return rows
    order = list(range(total))
    rng.shuffle(order)
    return [rows[i] for i in sorted(order[:k])]


def _selection_rng(spec, seed: int) -> random.Random:
    return random.Random(f"starpo-sources|{seed}|{spec.path}|{spec.config_name}|"
                         f"{spec.data_dir}|{spec.split}")


def load_source(spec, kind: str, *, world_seed: int = 0, seed: int = 0,
                on_bad_rows: str = "error", log: Callable[[str], None] | None = None,
                stats: SourceStats | None = None) -> list[dict]:
    """Canonical ``kind`` rows (``sft``, ``preference`` or ``prompt``) of one SourceSpec.

    Every row is converted (a bad one raises DataError naming file, row and field, or is
    counted and dropped with ``on_bad_rows="skip"``), the PKU safety filter applies when
    ``spec.safety_filter``, then a ``seed``-ed ``spec.fraction`` and ``spec.n`` are taken.
    Prompt stages accept preference and SFT sources too (the prompt is everything through
    the last user turn, the reference ``chosen`` the response when there is one).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    st = stats if stats is not None else SourceStats()
    st.source = spec.path
    rng = _selection_rng(spec, seed)

    if spec.path.startswith("world:"):
        rows = _load_world(spec, kind, world_seed, st)
    else:
        rows = _load_table(spec, kind, on_bad_rows, st)
    out = _select(rows, spec.fraction, spec.n, rng)
    st.kept = len(out)
    if log is not None:
        parts = [f"{st.kept} of {st.read} rows kept", f"format {st.format}"]
        if st.filtered:
            parts.append(f"{st.filtered} removed by the safety filter")
        if st.bad:
            sink = current_bad_rows()
            parts.append(f"{st.bad} bad rows skipped (first: {st.first_error})"
                         + (f", all written to {sink.path}" if sink is not None else ""))
        log(f"  data {st.source}: " + "; ".join(parts))
    return out


def _use_chosen(spec, kind: str, produced: str | None, where: str) -> bool:
    """Whether ``spec`` asks for prompt + chosen (``use: chosen``), checked to make sense:
    only an SFT stage takes it, and only from preference data (``produced``, when known)."""
    use = getattr(spec, "use", None)
    if use is None:
        return False
    if use != "chosen":
        raise DataError(f"use: {use!r} is not known; the one value is 'chosen'", source=where,
                        field="use")
    if kind != "sft":
        raise DataError(f"use: chosen makes SFT conversations from preference pairs; a {kind} "
                        "stage reads its data as it is: remove `use` from this source",
                        source=where, field="use")
    if produced is not None and produced != "preference":
        raise DataError(f"use: chosen takes preference data, but this source gives {produced} "
                        "rows: remove `use` from this source", source=where, field="use")
    return True


def _load_world(spec, kind: str, world_seed: int, st: SourceStats) -> list[dict]:

    wkind = spec.path.split(":", 1)[1]
    produced = {"sft": "sft", "preference": "preference", "eval": "prompt",
                "prompt": "prompt"}.get(wkind)
    st.format = "world"
    if produced is None:
        raise DataError(f"unknown world data {spec.path!r}; expected world:sft, "
                        "world:preference, world:eval or world:prompt", source=spec.path)
    chosen = _use_chosen(spec, kind, produced, spec.path)
    if not usable(produced, kind, chosen):
        hint = f", or {USE_CHOSEN_HINT}" if produced == "preference" and kind == "sft" else ""
        raise DataError(f"gives {produced} rows, but a {kind} stage needs {kind} data "
                        f"(use world:{kind}{hint})", source=spec.path)
    rows = world.rows(wkind, n=spec.n or WORLD_DEFAULT_N, seed=world_seed)
    st.read = len(rows)
    out = []
    for r in rows:
        w = Where(r.get("source", spec.path), r.get("row", len(out)), chosen_only=chosen)
        out.append(to_kind(r, produced, kind, r, w))
    return out


def _load_table(spec, kind: str, on_bad_rows: str, st: SourceStats) -> list[dict]:
    local = Path(spec.path).expanduser()
    if local.exists():
        table = read_local(local, spec.split)
        where = str(local)
    elif is_local_like(spec.path):
        raise DataError("file or directory not found", source=spec.path)
    else:
        table = read_hub(spec)
        where = hub_source_name(spec)
    st.source = where
    st.read = len(table.rows)
    if not table.rows:
        raise DataError("no rows", source=where)

    chosen = _use_chosen(spec, kind, None, where)
    if spec.format == "auto":
        sample = next((r for _, _, r in table.rows if isinstance(r, dict)), None)
        if chosen and not detect_preference(table.columns, sample) and \
                detect_sft(table.columns):
            _use_chosen(spec, kind, "sft", where)    # the clearer error: not preference data
        fmt_name = detect_format(table.columns, "preference" if chosen else kind,
                                 sample=sample, source=where)
    elif spec.format in FORMATS:
        fmt_name = spec.format
    else:
        raise DataError(f"unknown format {spec.format!r}; known: auto, "
                        f"{', '.join(FORMATS)}", source=where)
    fmt = FORMATS[fmt_name]
    st.format = fmt_name
    if chosen:
        _use_chosen(spec, kind, fmt.kind, where)
    if not usable(fmt.kind, kind, chosen):
        hint = f"; {USE_CHOSEN_HINT}" if fmt.kind == "preference" and kind == "sft" else ""
        raise DataError(f"format {fmt_name!r} gives {fmt.kind} rows, but a {kind} stage "
                        f"needs {kind} data{hint}", source=where)
    missing = [c for c in fmt.columns if c not in table.columns]
    if missing:
        raise DataError(f"format {fmt_name!r} needs column(s) {', '.join(missing)}; the "
                        f"source has [{', '.join(sorted(table.columns))}]", source=where,
                        field=missing[0])

    out = []
    for src, i, raw in table.rows:
        w = Where(src, i, safety_filter=spec.safety_filter, chosen_only=chosen)
        try:
            if not isinstance(raw, dict):
                raise w.error(f"row is {type(raw).__name__}, expected an object")
            row = fmt.convert(raw, w)
            if row is None:
                st.filtered += 1
                continue
            out.append(to_kind(row, fmt.kind, kind, raw, w))
        except DataError as err:
            if on_bad_rows == "error":
                raise err.with_hint(skip_hint()) from None
            st.bad += 1
            if st.first_error is None:
                st.first_error = str(err)
            record_bad_row(err, phase="read", data=raw)
    return out


# --------------------------------------------------------------------------- mixtures

def content_key(row: dict) -> str:
    """What makes two canonical rows duplicates: their content, not source/row.

    SFT: the messages (and untrained turns); preference: prompt, chosen and rejected;
    prompt rows: the prompt only (one prompt is sampled once, whatever its reference).
    """
    if "messages" in row:
        body: Any = [row["messages"], row.get("untrained")]
    elif "rejected" in row:
        body = [row["prompt"], row["chosen"], row["rejected"]]
    else:
        body = row["prompt"]
    return json.dumps(body, ensure_ascii=False, sort_keys=True)


def load_mixture(data, kind: str, *, world_seed: int = 0, seed: int = 0,
                 log: Callable[[str], None] | None = None,
                 stats: MixtureStats | None = None) -> list[dict]:
    """All sources of a DataSpec as one list of canonical rows.

    Sources are loaded in order (each with its own fraction/n), duplicates by
    :func:`content_key` dropped when ``data.dedup`` (the first occurrence stays), then the
    rows are shuffled with ``seed`` when ``data.shuffle``. Counts go to ``log`` and
    ``stats``.
    """
    ms = stats if stats is not None else MixtureStats()
    if current_bad_rows() is not None:
        current_bad_rows().begin()   # this preparation's skipped rows replace older ones
    rows: list[dict] = []
    for spec in data.sources:
        st = SourceStats()
        rows.extend(load_source(spec, kind, world_seed=world_seed, seed=seed,
                                on_bad_rows=data.on_bad_rows, log=log, stats=st))
        ms.sources.append(st)
    if data.dedup:
        seen: set[str] = set()
        unique = []
        for r in rows:
            key = content_key(r)
            if key in seen:
                continue
            seen.add(key)
            unique.append(r)
        ms.duplicates = len(rows) - len(unique)
        rows = unique
    if data.shuffle:
        random.Random(f"starpo-mixture|{seed}").shuffle(rows)
    ms.rows = len(rows)
    if log is not None:
        bad = sum(s.bad for s in ms.sources)
        filt = sum(s.filtered for s in ms.sources)
        log(f"  data: {len(rows)} {kind} rows from {len(ms.sources)} source(s)"
            f" ({ms.duplicates} duplicates dropped, {bad} bad rows skipped,"
            f" {filt} filtered)")
    return rows


def split_eval(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded held-out split: ``round(len * fraction)`` rows (at least one when fraction > 0
    and there are two rows or more, never all of them) go to eval; order is kept in both."""
    n = len(rows)
    if fraction <= 0 or n < 2:
        return list(rows), []
    k = min(max(1, round(n * fraction)), n - 1)
    order = list(range(n))
    random.Random(f"starpo-split|{seed}").shuffle(order)
    held = set(order[:k])
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])
