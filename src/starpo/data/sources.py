"""Data sources: hub schemas, local files and the embedded world, turned into canonical rows.

Everything downstream sees only the shapes of :mod:`starpo.data.canonical`; this module is
the one place that knows how public datasets spell things. A source is read, every row is
converted by a *format* (a named converter, see :data:`FORMATS`), rows the safety filter
rejects are set aside, and a seeded subset is taken (``fraction``, then ``n``).
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

import gzip
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from starpo.data.canonical import check_messages, msg, preference_row, prompt_row, sft_row
from starpo.errors import DataError, current_bad_rows, record_bad_row, skip_hint
from starpo import world

KINDS = ("sft", "preference", "prompt")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
WORLD_DEFAULT_N = 2000


# --------------------------------------------------------------------------- row helpers

@dataclass
class _Where:
    """Where the row being converted lives, plus the source options converters need."""

    source: str
    row: int
    safety_filter: bool = True
    chosen_only: bool = False   # ``use: chosen``: the rejected side is not read

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, source=self.source, row=self.row, field=field)


def _get(r: dict, name: str, types: type | tuple, w: _Where, *, optional: bool = False):
    """``r[name]``, checked to be of ``types``; a missing/null/mistyped value is a bad row."""
    if name not in r:
        if optional:
            return None
        raise w.error("missing field", name)
    value = r[name]
    if value is None:
        if optional:
            return None
        raise w.error("is null", name)
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise w.error(f"is bool, expected {_type_names(types)}", name)
    if not isinstance(value, types):
        raise w.error(f"is {type(value).__name__}, expected {_type_names(types)}", name)
    return value


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {str: "a string", list: "a list", bool: "a boolean", int: "an integer",
             dict: "an object"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _messages(value: Any, w: _Where, name: str) -> list[dict]:
    return check_messages(value, source=w.source, row=w.row, field=name)


def _response_from_string(text: str) -> list[dict]:
    return [msg("assistant", text.lstrip())]


def _nonempty(messages: list[dict]) -> bool:
    return any(m["content"].strip() for m in messages if m["role"] == "assistant")


def _sft(messages: list[dict], w: _Where, untrained: list[int] | None = None) -> dict:
    """A validated SFT row; trailing non-assistant turns are dropped (nothing to train)."""
    messages = list(messages)
    while messages and messages[-1].get("role") != "assistant":
        messages.pop()
    if not messages:
        raise w.error("conversation has no assistant message to train on", "messages")
    out = sft_row(messages, source=w.source, row=w.row)
    skip = set(untrained or ())
    trained = [m for i, m in enumerate(out["messages"])
               if m["role"] == "assistant" and i not in skip]
    if not any(m["content"].strip() for m in trained):
        raise w.error("empty response: every trained assistant message is empty", "messages")
    if untrained:
        out["untrained"] = sorted(untrained)
    return out


def _pref(prompt: list[dict], chosen: list[dict], rejected: list[dict] | None,
          w: _Where) -> dict:
    """A validated preference row: non-empty, different responses.

    With ``w.chosen_only`` only prompt and chosen are checked and kept (``rejected`` None).
    """
    if w.chosen_only:
        out = {"prompt": check_messages(prompt, source=w.source, row=w.row, field="prompt"),
               "chosen": check_messages(chosen, source=w.source, row=w.row, field="chosen",
                                        only_assistant=True),
               "rejected": None, "source": w.source, "row": w.row}
        if not _nonempty(out["chosen"]):
            raise w.error("empty response", "chosen")
        return out
    out = preference_row(prompt, chosen, rejected, source=w.source, row=w.row)
    for name in ("chosen", "rejected"):
        if not _nonempty(out[name]):
            raise w.error("empty response", name)
    if [m["content"] for m in out["chosen"]] == [m["content"] for m in out["rejected"]]:
        raise w.error("chosen and rejected are identical", "rejected")
    return out


def _split_conversations(chosen: Any, rejected: Any, w: _Where) -> tuple[list, list, list]:
    """Two full conversations -> (shared prompt, chosen tail, rejected tail).

    The prompt is the longest common prefix of messages, moved back so that it ends on a
    user/system message (the responses start with the first differing assistant turn).
    """
    c = _messages(chosen, w, "chosen")
    if w.chosen_only:
        # the chosen conversation alone: its trailing assistant messages are the response
        k = len(c)
        while k > 0 and c[k - 1]["role"] == "assistant":
            k -= 1
        if k == len(c):
            raise w.error("conversation ends with a non-assistant message; no response",
                          "chosen")
        if k == 0:
            raise w.error("no prompt: the conversation holds only assistant messages", "chosen")
        return c[:k], c[k:], None
    r = _messages(rejected, w, "rejected")
    if c == r:
        raise w.error("chosen and rejected are identical", "rejected")
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    while k > 0 and c[k - 1]["role"] == "assistant":
        k -= 1
    if k == 0:
        raise w.error("chosen and rejected share no prompt (they differ from their first "
                      "user message on)", "chosen")
    for name, tail in (("chosen", c[k:]), ("rejected", r[k:])):
        if not tail:
            raise w.error("empty response (the conversation ends with the shared prompt)", name)
        for i, m in enumerate(tail):
            if m["role"] != "assistant":
                raise w.error(f"after the shared prompt the conversation continues with a "
                              f"{m['role']} message (message {k + i}); a response holds only "
                              "assistant messages", name)
    return c[:k], c[k:], r[k:]


def _prompt_messages(value: Any, w: _Where, name: str = "prompt") -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise w.error("empty prompt", name)
        return [msg("user", value)]
    if isinstance(value, list):
        return _messages(value, w, name)
    if value is None:
        raise w.error("is null", name)
    raise w.error(f"is {type(value).__name__}, expected a string or a list of messages", name)


def _response(value: Any, w: _Where, name: str) -> list[dict]:
    """A response given as a string, a list of assistant messages, or a full conversation
    (then its trailing assistant messages)."""
    if isinstance(value, str):
        return _response_from_string(value)
    if isinstance(value, list):
        ms = _messages(value, w, name)
        k = len(ms)
        while k > 0 and ms[k - 1]["role"] == "assistant":
            k -= 1
        if k == len(ms):
            raise w.error("conversation ends with a non-assistant message; no response", name)
        return ms[k:]
    if value is None:
        raise w.error("is null", name)
    raise w.error(f"is {type(value).__name__}, expected a string or a list of messages", name)


# --------------------------------------------------------------------------- SFT formats

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
                   "bing": "assistant", "model": "assistant"}


def _conv_sharegpt(r: dict, w: _Where) -> dict:
    turns = _get(r, "conversations", list, w)
    if not turns:
        raise w.error("empty conversation", "conversations")
    messages, weights = [], []
    for i, t in enumerate(turns):
        f = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise w.error(f"is {type(t).__name__}, expected an object with 'from' and 'value'", f)
        speaker = t.get("from", t.get("role"))
        text = t.get("value", t.get("content"))
        role = _SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise w.error(f"unknown speaker {speaker!r}; expected one of "
                          "system, human, gpt", f + ".from")
        if not isinstance(text, str):
            raise w.error(f"is {type(text).__name__}, expected a string", f + ".value")
        weight = t.get("weight")
        if weight is not None and (isinstance(weight, bool) or
                                   not isinstance(weight, (int, float))):
            raise w.error(f"is {type(weight).__name__}, expected a number", f + ".weight")
        messages.append(msg(role, text))
        weights.append(1.0 if weight is None else float(weight))
    # trailing turns that are not trained are context for nothing: drop them
    k = len(messages)
    while k > 0 and (messages[k - 1]["role"] != "assistant" or weights[k - 1] == 0):
        k -= 1
    if k == 0:
        raise w.error("no assistant ('gpt') turn with a non-zero weight to train on",
                      "conversations")
    untrained = [i for i in range(k) if messages[i]["role"] == "assistant" and weights[i] == 0]
    return _sft(messages[:k], w, untrained)


def _conv_messages(r: dict, w: _Where) -> dict:
    return _sft(_messages(_get(r, "messages", list, w), w, "messages"), w)


def _conv_metamathqa(r: dict, w: _Where) -> dict:
    q = _get(r, "query", str, w)
    a = _get(r, "response", str, w)
    if not a.strip():
        raise w.error("empty response", "response")
    return _sft([msg("user", q), msg("assistant", a)], w)


def _conv_prompt_completion(r: dict, w: _Where) -> dict:
    prompt = _prompt_messages(_get(r, "prompt", (str, list), w), w)
    comp = _get(r, "completion", (str, list), w)
    if isinstance(comp, str):
        completion = _response_from_string(comp)
    else:
        completion = check_messages(comp, source=w.source, row=w.row, field="completion",
                                    only_assistant=True)
    if not _nonempty(completion):
        raise w.error("empty response", "completion")
    return _sft(prompt + completion, w)


def _conv_text(r: dict, w: _Where) -> dict:
    text = _get(r, "text", str, w)
    if not text.strip():
        raise w.error("empty text", "text")
    return _sft([msg("assistant", text)], w)


# --------------------------------------------------------------------------- preference

_HH_MARK = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str, w: _Where, name: str) -> list[dict]:
    """``"\\n\\nHuman: …\\n\\nAssistant: …"`` -> messages (contents stripped)."""
    if text.startswith("Human:"):   # some copies drop the leading blank line
        text = "\n\n" + text
    parts = _HH_MARK.split(text)
    if parts[0].strip():
        raise w.error("text before the first '\\n\\nHuman:' turn; expected an HH-RLHF "
                      "transcript", name)
    out = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        out.append(msg("user" if speaker == "Human" else "assistant", content.strip()))
    if not out:
        raise w.error("no '\\n\\nHuman:'/'\\n\\nAssistant:' turns; expected an HH-RLHF "
                      "transcript", name)
    return out


def _hh_split(text: str, w: _Where, name: str) -> tuple[list[dict], list[dict]]:
    ms = parse_hh_transcript(text, w, name)
    if ms[-1]["role"] != "assistant":
        raise w.error("transcript does not end with an '\\n\\nAssistant:' turn", name)
    return ms[:-1], ms[-1:]


def _conv_hh(r: dict, w: _Where) -> dict:
    pc, chosen = _hh_split(_get(r, "chosen", str, w), w, "chosen")
    if w.chosen_only:
        if not pc:
            raise w.error("no Human turn before the last Assistant turn", "chosen")
        return _pref(pc, chosen, None, w)
    pr, rejected = _hh_split(_get(r, "rejected", str, w), w, "rejected")
    if not pc:
        raise w.error("no Human turn before the last Assistant turn", "chosen")
    if pc != pr:
        raise w.error("chosen and rejected transcripts differ before their last "
                      "'\\n\\nAssistant:' (no shared prompt)", "rejected")
    return _pref(pc, chosen, rejected, w)


def _conv_ultrafeedback(r: dict, w: _Where) -> dict:
    chosen = _get(r, "chosen", list, w)
    rejected = _get(r, "rejected", list, w, optional=w.chosen_only)
    prompt, c, rj = _split_conversations(chosen, rejected, w)
    return _pref(prompt, c, rj, w)


def _conv_trl_preference(r: dict, w: _Where) -> dict:
    chosen = _get(r, "chosen", (str, list), w)
    rejected = _get(r, "rejected", (str, list), w, optional=w.chosen_only)
    full = (isinstance(chosen, list) and chosen
            and (w.chosen_only or (isinstance(rejected, list) and rejected))
            and all(isinstance(m, dict) for m in chosen)
            and any(m.get("role") != "assistant" for m in chosen))
    if full:   # chosen/rejected repeat the prompt (UltraFeedback style): split them
        prompt, c, rj = _split_conversations(chosen, rejected, w)
        return _pref(prompt, c, rj, w)
    prompt = _prompt_messages(_get(r, "prompt", (str, list), w), w)
    c = _response(chosen, w, "chosen")
    rj = None if w.chosen_only else _response(rejected, w, "rejected")
    return _pref(prompt, c, rj, w)


def _conv_tldr(r: dict, w: _Where) -> dict:
    prompt = _get(r, "prompt", str, w)
    chosen = _get(r, "chosen", str, w)
    rejected = _get(r, "rejected", str, w, optional=w.chosen_only)
    return _pref(_prompt_messages(prompt, w), _response_from_string(chosen),
                 None if rejected is None else _response_from_string(rejected), w)


def _string_prompt_split(c: str, r: str, w: _Where) -> tuple[str, str, str]:
    """Implicit prompt of two plain strings: their common prefix, cut back to whitespace."""
    if c == r:
        raise w.error("chosen and rejected are identical", "rejected")
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    while k > 0 and not c[k - 1].isspace():
        k -= 1
    prompt = c[:k].rstrip()
    if not prompt:
        raise w.error("chosen and rejected share no prompt text", "chosen")
    return prompt, c[k:], r[k:]


def _conv_implicit(r: dict, w: _Where) -> dict:
    chosen = _get(r, "chosen", (str, list), w)
    rejected = _get(r, "rejected", (str, list), w)
    if isinstance(chosen, str) and isinstance(rejected, str):
        if _HH_MARK.search(chosen) or chosen.startswith("Human:"):
            return _conv_hh(r, w)
        prompt, c, rj = _string_prompt_split(chosen, rejected, w)
        return _pref([msg("user", prompt)], _response_from_string(c),
                     _response_from_string(rj), w)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise w.error("chosen and rejected must both be strings or both message lists",
                      "rejected")
    prompt, c, rj = _split_conversations(chosen, rejected, w)
    return _pref(prompt, c, rj, w)


def _conv_pku(r: dict, w: _Where) -> dict | None:
    prompt = _get(r, "prompt", str, w)
    responses = [_get(r, "response_0", str, w), _get(r, "response_1", str, w)]
    if w.safety_filter:
        safe = [_get(r, "is_response_0_safe", bool, w), _get(r, "is_response_1_safe", bool, w)]
        if safe[0] == safe[1]:
            return None          # double safe / double unsafe: filtered out
        best = 0 if safe[0] else 1
    else:
        best = _get(r, "better_response_id", int, w)
        if best not in (0, 1):
            raise w.error(f"is {best}, expected 0 or 1", "better_response_id")
    return _pref([msg("user", prompt)], _response_from_string(responses[best]),
                 _response_from_string(responses[1 - best]), w)


# --------------------------------------------------------------------------- prompt sets

def _row_id(r: dict) -> str | None:
    for key in ("prompt_id", "id"):
        v = r.get(key)
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            return str(v)
    return None


def _split_at_last_user(messages: list[dict], w: _Where, name: str):
    k = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if k < 0:
        raise w.error("no user message to use as a prompt", name)
    tail = messages[k + 1:]
    chosen = tail if tail and all(m["role"] == "assistant" for m in tail) \
        and _nonempty(tail) else None
    return messages[:k + 1], chosen


def _conv_prompt(r: dict, w: _Where) -> dict:
    if r.get("prompt") is not None or "messages" not in r:
        prompt = _prompt_messages(_get(r, "prompt", (str, list), w), w)
        chosen = None
        for name in ("chosen", "completion"):
            if r.get(name) is not None:
                chosen = _response(r[name], w, name)
                break
        if chosen is not None and not _nonempty(chosen):
            chosen = None
    else:
        ms = _messages(_get(r, "messages", list, w), w, "messages")
        prompt, chosen = _split_at_last_user(ms, w, "messages")
    return prompt_row(prompt, chosen=chosen, id=_row_id(r), source=w.source, row=w.row)


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Format:
    """A schema converter: ``convert(row, where)`` -> canonical row of ``kind`` or None
    (the row is filtered out by design, e.g. PKU's safety filter)."""

    name: str
    kind: str                      # the canonical kind it produces
    columns: tuple[str, ...]       # columns it needs
    convert: Callable[[dict, _Where], dict | None]
    doc: str


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("sharegpt", "sft", ("conversations",), _conv_sharegpt,
           "ShareGPT `conversations` [{from: system|human|gpt, value, weight?}] "
           "(OpenHermes-2.5, SlimOrca); weight-0 turns kept as untrained context"),
    Format("messages", "sft", ("messages",), _conv_messages,
           "`messages` [{role, content}] (ultrachat_200k, UltraFeedback train_sft)"),
    Format("metamathqa", "sft", ("query", "response"), _conv_metamathqa,
           "MetaMathQA `query` (user) / `response` (assistant)"),
    Format("prompt_completion", "sft", ("prompt", "completion"), _conv_prompt_completion,
           "TRL `prompt`/`completion`, strings or message lists"),
    Format("text", "sft", ("text",), _conv_text,
           "TRL `text`: one assistant message with no user turn (every token trained)"),
    Format("ultrafeedback", "preference", ("chosen", "rejected"), _conv_ultrafeedback,
           "UltraFeedback binarized: `chosen`/`rejected` full conversations; prompt = shared "
           "prefix"),
    Format("hh_rlhf", "preference", ("chosen", "rejected"), _conv_hh,
           "Anthropic HH-RLHF transcripts '\\n\\nHuman: …\\n\\nAssistant: …'; prompt = all "
           "through the last Assistant:"),
    Format("pku_saferlhf", "preference", ("prompt", "response_0", "response_1"), _conv_pku,
           "PKU-SafeRLHF; with safety_filter, pairs with exactly one safe response (chosen = "
           "the safe one), else chosen = better_response_id"),
    Format("tldr", "preference", ("prompt", "chosen", "rejected"), _conv_tldr,
           "TL;DR preference: `prompt`/`chosen`/`rejected` strings"),
    Format("trl_preference", "preference", ("chosen", "rejected"), _conv_trl_preference,
           "TRL `prompt`/`chosen`/`rejected`, strings or message lists (responses may also "
           "be full conversations repeating the prompt)"),
    Format("implicit_preference", "preference", ("chosen", "rejected"), _conv_implicit,
           "TRL implicit prompt `{chosen, rejected}`: prompt = longest common prefix"),
    Format("prompt", "prompt", (), _conv_prompt,
           "prompt sets: `prompt` string or messages (optional `chosen`/`completion` "
           "reference), or `messages` cut at the last user turn"),
]}


# --------------------------------------------------------------------------- detection

def _detect_sft(cols: set[str]) -> list[str]:
    found = []
    if "conversations" in cols:
        found.append("sharegpt")
    if "messages" in cols:
        found.append("messages")
    if {"query", "response"} <= cols:
        found.append("metamathqa")
    if {"prompt", "completion"} <= cols:
        found.append("prompt_completion")
    if "text" in cols and not found:
        found.append("text")   # a `text` column next to a richer schema is metadata
    return found


def _detect_preference(cols: set[str], sample: dict | None) -> list[str]:
    if {"prompt", "response_0", "response_1"} <= cols:
        return ["pku_saferlhf"]
    if not {"chosen", "rejected"} <= cols:
        return []
    if "prompt" in cols:
        if cols & {"prompt_id", "score_chosen", "score_rejected"}:
            return ["ultrafeedback"]
        return ["trl_preference"]
    chosen = (sample or {}).get("chosen")
    if isinstance(chosen, str) and (_HH_MARK.search(chosen) or chosen.startswith("Human:")):
        return ["hh_rlhf"]
    return ["implicit_preference"]


def detect_format(columns: Iterable[str], kind: str, *, sample: dict | None = None,
                  source: str | None = None) -> str:
    """The format name for a source with these columns, read for a ``kind`` stage.

    ``sample`` (one raw row) separates HH-RLHF transcripts from other implicit-prompt pairs,
    which have the same columns. Unknown or ambiguous columns raise DataError listing them.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cols = set(columns)
    if kind == "sft":
        found = _detect_sft(cols)
    elif kind == "preference":
        found = _detect_preference(cols, sample)
    else:
        if "prompt" in cols or "messages" in cols:
            found = ["prompt"]
        else:
            found = _detect_preference(cols, sample) or \
                [f for f in _detect_sft(cols) if f != "text"]
    shown = ", ".join(sorted(cols)) or "(none)"
    if len(found) > 1:
        raise DataError(f"columns [{shown}] match several {kind} formats ({', '.join(found)}); "
                        "set the source's `format:` to one of them", source=source)
    if not found:
        other = [k for k, found_other in (("sft", _detect_sft(cols)),
                                          ("preference", _detect_preference(cols, sample)))
                 if k != kind and found_other]
        hint = f" (they look like {other[0]} data)" if other and kind != "prompt" else ""
        if other == ["preference"] and kind == "sft":
            hint = f" (they look like preference data: {_USE_CHOSEN_HINT})"
        names = ", ".join(n for n, f in FORMATS.items() if _usable(f.kind, kind))
        raise DataError(f"cannot tell the format of columns [{shown}] for {kind} data"
                        f"{hint}; set the source's `format:` to one of: {names}",
                        source=source)
    return found[0]


def _usable(produced: str, wanted: str, chosen: bool = False) -> bool:
    """Rows of kind ``produced`` can feed a ``wanted`` stage (prompts derive from both;
    preference rows feed an SFT stage through ``use: chosen``, ``chosen``)."""
    return produced == wanted or wanted == "prompt" or (
        chosen and produced == "preference" and wanted == "sft")


_USE_CHOSEN_HINT = "set the source's `use: chosen` to train on prompt + chosen"


# --------------------------------------------------------------------------- kind changes

def _to_kind(row: dict, produced: str, wanted: str, raw: dict | None, w: _Where) -> dict:
    if produced == wanted:
        return row
    if wanted == "sft" and produced == "preference" and w.chosen_only:
        # prompt + chosen; assistant turns of the prompt are context (nobody judged them)
        prompt = row["prompt"]
        return _sft(prompt + row["chosen"], w,
                    [i for i, m in enumerate(prompt) if m["role"] == "assistant"])
    if wanted == "prompt" and produced == "preference":
        return prompt_row(row["prompt"], chosen=row["chosen"], id=_row_id(raw or {}),
                          source=w.source, row=w.row)
    if wanted == "prompt" and produced == "sft":
        prompt, chosen = _split_at_last_user(row["messages"], w, "messages")
        return prompt_row(prompt, chosen=chosen, id=_row_id(raw or {}), source=w.source,
                          row=w.row)
    raise DataError(f"gives {produced} rows, but a {wanted} stage needs {wanted} data",
                    source=w.source)


# --------------------------------------------------------------------------- reading

@dataclass
class _Table:
    """Raw rows of a source: (file or hub name, row index, row dict) plus the column set."""

    rows: list[tuple[str, int, Any]]
    columns: set[str]


def _is_local_like(path: str) -> bool:
    return (path.startswith(("/", "./", "../", "~")) or path.endswith(LOCAL_SUFFIXES))


def _open_text(p: Path):
    if p.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8")
    return open(p, encoding="utf-8")


def _read_jsonl(p: Path) -> list[Any]:
    out = []
    with _open_text(p) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"line {lineno} is not valid JSON ({err.msg})",
                                source=str(p), row=len(out)) from None
    return out


def _read_json(p: Path, split: str) -> list[Any]:
    with _open_text(p) as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":      # JSON lines saved as .json (datasets' to_json)
            return _read_jsonl(p)
        raise DataError(f"not valid JSON ({err.msg}, line {err.lineno})",
                        source=str(p)) from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in (split, "data", "rows"):
            if isinstance(data.get(key), list):
                return data[key]
        if data and all(isinstance(v, list) for v in data.values()) and \
                len({len(v) for v in data.values()}) == 1:   # columnar {"col": [...]}
            keys = list(data)
            return [dict(zip(keys, vals)) for vals in zip(*(data[k] for k in keys))]
        return [data]
    raise DataError(f"top-level JSON is {type(data).__name__}; expected a list of rows",
                    source=str(p))


def _read_parquet(p: Path) -> list[Any]:
    import pyarrow.parquet as pq
    return pq.read_table(p).to_pylist()


def _read_file(p: Path, split: str) -> list[Any]:
    name = p.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(p)
    if name.endswith((".json", ".json.gz")):
        return _read_json(p, split)
    if name.endswith(".parquet"):
        return _read_parquet(p)
    raise DataError(f"unsupported file type; expected one of {', '.join(LOCAL_SUFFIXES)}",
                    source=str(p))


def _local_files(d: Path, split: str) -> list[Path]:
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))
    if not files:
        raise DataError(f"directory holds no {', '.join(LOCAL_SUFFIXES)} file", source=str(d))
    chosen = [p for p in files
              if p.name.startswith(split) or any(part.startswith(split)
                                                 for part in p.relative_to(d).parts[:-1])]
    return chosen or files


def _table_from(rows_by_file: list[tuple[str, list[Any]]]) -> _Table:
    rows, cols = [], set()
    for src, rs in rows_by_file:
        for i, r in enumerate(rs):
            rows.append((src, i, r))
            if isinstance(r, dict):
                cols.update(r)
    return _Table(rows, cols)


def _read_local(path: Path, split: str) -> _Table:
    files = _local_files(path, split) if path.is_dir() else [path]
    return _table_from([(str(f), _read_file(f, split)) for f in files])


def hub_source_name(spec) -> str:
    extra = [f"{k}={v}" for k, v in (("name", spec.config_name), ("data_dir", spec.data_dir))
             if v]
    return f"{spec.path} ({', '.join(extra + [f'split={spec.split}'])})"


def _read_hub(spec) -> _Table:
    import datasets
    name = hub_source_name(spec)
    try:
        ds = datasets.load_dataset(spec.path, name=spec.config_name, data_dir=spec.data_dir,
                                   split=spec.split)
    except Exception as err:  # noqa: BLE001 - any loader failure is the user's source
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not load the hub dataset ({type(err).__name__}: {first}); "
                        "check the path, config_name, data_dir and split, or use a local "
                        "file", source=name) from None
    table = _table_from([(name, ds.to_list() if hasattr(ds, "to_list") else list(ds))])
    table.columns |= set(getattr(ds, "column_names", None) or ())
    return table


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
    if not _usable(produced, kind, chosen):
        hint = f", or {_USE_CHOSEN_HINT}" if produced == "preference" and kind == "sft" else ""
        raise DataError(f"gives {produced} rows, but a {kind} stage needs {kind} data "
                        f"(use world:{kind}{hint})", source=spec.path)
    rows = world.rows(wkind, n=spec.n or WORLD_DEFAULT_N, seed=world_seed)
    st.read = len(rows)
    out = []
    for r in rows:
        w = _Where(r.get("source", spec.path), r.get("row", len(out)), chosen_only=chosen)
        out.append(_to_kind(r, produced, kind, r, w))
    return out


def _load_table(spec, kind: str, on_bad_rows: str, st: SourceStats) -> list[dict]:
    local = Path(spec.path).expanduser()
    if local.exists():
        table = _read_local(local, spec.split)
        where = str(local)
    elif _is_local_like(spec.path):
        raise DataError("file or directory not found", source=spec.path)
    else:
        table = _read_hub(spec)
        where = hub_source_name(spec)
    st.source = where
    st.read = len(table.rows)
    if not table.rows:
        raise DataError("no rows", source=where)

    chosen = _use_chosen(spec, kind, None, where)
    if spec.format == "auto":
        sample = next((r for _, _, r in table.rows if isinstance(r, dict)), None)
        if chosen and not _detect_preference(table.columns, sample) and \
                _detect_sft(table.columns):
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
    if not _usable(fmt.kind, kind, chosen):
        hint = f"; {_USE_CHOSEN_HINT}" if fmt.kind == "preference" and kind == "sft" else ""
        raise DataError(f"format {fmt_name!r} gives {fmt.kind} rows, but a {kind} stage "
                        f"needs {kind} data{hint}", source=where)
    missing = [c for c in fmt.columns if c not in table.columns]
    if missing:
        raise DataError(f"format {fmt_name!r} needs column(s) {', '.join(missing)}; the "
                        f"source has [{', '.join(sorted(table.columns))}]", source=where,
                        field=missing[0])

    out = []
    for src, i, raw in table.rows:
        w = _Where(src, i, safety_filter=spec.safety_filter, chosen_only=chosen)
        try:
            if not isinstance(raw, dict):
                raise w.error(f"row is {type(raw).__name__}, expected an object")
            row = fmt.convert(raw, w)
            if row is None:
                st.filtered += 1
                continue
            out.append(_to_kind(row, fmt.kind, kind, raw, w))
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
