"""Hub schemas → canonical rows: one converter (a *format*) per schema, the registry
:data:`FORMATS`, and the detection of a table's format from its columns. The decisions
each format makes are listed in :mod:`starpo.data.sources`' docstring."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from starpo.canonical import check_messages, msg, preference_row, prompt_row, sft_row
from starpo.errors import DataError

KINDS = ("sft", "preference", "prompt")


# --------------------------------------------------------------------------- row helpers

@dataclass
class Where:
    """Where the row being converted lives, plus the source options converters need."""

    source: str
    row: int
    safety_filter: bool = True
    chosen_only: bool = False   # ``use: chosen``: the rejected side is not read

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, source=self.source, row=self.row, field=field)


def _get(r: dict, name: str, types: type | tuple, w: Where, *, optional: bool = False):
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


def _messages(value: Any, w: Where, name: str) -> list[dict]:
    return check_messages(value, source=w.source, row=w.row, field=name)


def _response_from_string(text: str) -> list[dict]:
    return [msg("assistant", text.lstrip())]


def _nonempty(messages: list[dict]) -> bool:
    return any(m["content"].strip() for m in messages if m["role"] == "assistant")


def _sft(messages: list[dict], w: Where, untrained: list[int] | None = None) -> dict:
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
          w: Where) -> dict:
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


def _split_conversations(chosen: Any, rejected: Any, w: Where) -> tuple[list, list, list]:
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


def _prompt_messages(value: Any, w: Where, name: str = "prompt") -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise w.error("empty prompt", name)
        return [msg("user", value)]
    if isinstance(value, list):
        return _messages(value, w, name)
    if value is None:
        raise w.error("is null", name)
    raise w.error(f"is {type(value).__name__}, expected a string or a list of messages", name)


def _response(value: Any, w: Where, name: str) -> list[dict]:
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


def _conv_sharegpt(r: dict, w: Where) -> dict:
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


def _conv_messages(r: dict, w: Where) -> dict:
    return _sft(_messages(_get(r, "messages", list, w), w, "messages"), w)


def _conv_metamathqa(r: dict, w: Where) -> dict:
    q = _get(r, "query", str, w)
    a = _get(r, "response", str, w)
    if not a.strip():
        raise w.error("empty response", "response")
    return _sft([msg("user", q), msg("assistant", a)], w)


def _conv_prompt_completion(r: dict, w: Where) -> dict:
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


def _conv_text(r: dict, w: Where) -> dict:
    text = _get(r, "text", str, w)
    if not text.strip():
        raise w.error("empty text", "text")
    return _sft([msg("assistant", text)], w)


# --------------------------------------------------------------------------- preference

_HH_MARK = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str, w: Where, name: str) -> list[dict]:
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


def _hh_split(text: str, w: Where, name: str) -> tuple[list[dict], list[dict]]:
    ms = parse_hh_transcript(text, w, name)
    if ms[-1]["role"] != "assistant":
        raise w.error("transcript does not end with an '\\n\\nAssistant:' turn", name)
    return ms[:-1], ms[-1:]


def _conv_hh(r: dict, w: Where) -> dict:
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


def _conv_ultrafeedback(r: dict, w: Where) -> dict:
    chosen = _get(r, "chosen", list, w)
    rejected = _get(r, "rejected", list, w, optional=w.chosen_only)
    prompt, c, rj = _split_conversations(chosen, rejected, w)
    return _pref(prompt, c, rj, w)


def _conv_trl_preference(r: dict, w: Where) -> dict:
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


def _conv_tldr(r: dict, w: Where) -> dict:
    prompt = _get(r, "prompt", str, w)
    chosen = _get(r, "chosen", str, w)
    rejected = _get(r, "rejected", str, w, optional=w.chosen_only)
    return _pref(_prompt_messages(prompt, w), _response_from_string(chosen),
                 None if rejected is None else _response_from_string(rejected), w)


def _string_prompt_split(c: str, r: str, w: Where) -> tuple[str, str, str]:
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


def _conv_implicit(r: dict, w: Where) -> dict:
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


def _conv_pku(r: dict, w: Where) -> dict | None:
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


def _split_at_last_user(messages: list[dict], w: Where, name: str):
    k = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if k < 0:
        raise w.error("no user message to use as a prompt", name)
    tail = messages[k + 1:]
    chosen = tail if tail and all(m["role"] == "assistant" for m in tail) \
        and _nonempty(tail) else None
    return messages[:k + 1], chosen


def _conv_prompt(r: dict, w: Where) -> dict:
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


def _conv_mt_bench(r: dict, w: Where) -> dict:
    """FastChat's MT-Bench ``question.jsonl``: the first turn is the prompt (a single-turn
    evaluation: the second turn needs the model's own first answer), ``category`` is kept
    for per-category metrics; ``question_id`` is the id; ``reference`` answers (math,
    reasoning, coding) are short solutions, not chat answers, so they are not used."""
    turns = _get(r, "turns", list, w)
    if not turns:
        raise w.error("no turns", "turns")
    first = turns[0]
    if not isinstance(first, str):
        raise w.error(f"is {type(first).__name__}, expected a string", "turns[0]")
    if not first.strip():
        raise w.error("empty first turn", "turns[0]")
    category = _get(r, "category", str, w)
    qid = _get(r, "question_id", (int, str), w)
    return prompt_row([msg("user", first)], id=str(qid), source=w.source, row=w.row,
                      category=category)


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Format:
    """A schema converter: ``convert(row, where)`` -> canonical row of ``kind`` or None
    (the row is filtered out by design, e.g. PKU's safety filter)."""

    name: str
    kind: str                      # the canonical kind it produces
    columns: tuple[str, ...]       # columns it needs
    convert: Callable[[dict, Where], dict | None]
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
    Format("mt_bench", "prompt", ("question_id", "category", "turns"), _conv_mt_bench,
           "FastChat MT-Bench question.jsonl `question_id`/`category`/`turns`: the first "
           "turn is the prompt, the category is kept for per-category metrics"),
    Format("prompt", "prompt", (), _conv_prompt,
           "prompt sets: `prompt` string or messages (optional `chosen`/`completion` "
           "reference), or `messages` cut at the last user turn"),
]}


# --------------------------------------------------------------------------- detection

def detect_sft(cols: set[str]) -> list[str]:
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


def detect_preference(cols: set[str], sample: dict | None) -> list[str]:
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
        found = detect_sft(cols)
    elif kind == "preference":
        found = detect_preference(cols, sample)
    else:
        if {"question_id", "category", "turns"} <= cols:
            found = ["mt_bench"]
        elif "prompt" in cols or "messages" in cols:
            found = ["prompt"]
        else:
            found = detect_preference(cols, sample) or \
                [f for f in detect_sft(cols) if f != "text"]
    shown = ", ".join(sorted(cols)) or "(none)"
    if len(found) > 1:
        raise DataError(f"columns [{shown}] match several {kind} formats ({', '.join(found)}); "
                        "set the source's `format:` to one of them", source=source)
    if not found:
        other = [k for k, found_other in (("sft", detect_sft(cols)),
                                          ("preference", detect_preference(cols, sample)))
                 if k != kind and found_other]
        hint = f" (they look like {other[0]} data)" if other and kind != "prompt" else ""
        if other == ["preference"] and kind == "sft":
            hint = f" (they look like preference data: {USE_CHOSEN_HINT})"
        names = ", ".join(n for n, f in FORMATS.items() if usable(f.kind, kind))
        raise DataError(f"cannot tell the format of columns [{shown}] for {kind} data"
                        f"{hint}; set the source's `format:` to one of: {names}",
                        source=source)
    return found[0]


def usable(produced: str, wanted: str, chosen: bool = False) -> bool:
    """Rows of kind ``produced`` can feed a ``wanted`` stage (prompts derive from both;
    preference rows feed an SFT stage through ``use: chosen``, ``chosen``)."""
    return produced == wanted or wanted == "prompt" or (
        chosen and produced == "preference" and wanted == "sft")


USE_CHOSEN_HINT = "set the source's `use: chosen` to train on prompt + chosen"


# --------------------------------------------------------------------------- kind changes

def to_kind(row: dict, produced: str, wanted: str, raw: dict | None, w: Where) -> dict:
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
