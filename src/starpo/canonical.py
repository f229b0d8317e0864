"""The one canonical data shape. Every source is converted to it before anything else.

Messages are OpenAI/HF-style dicts ``{"role": "system"|"user"|"assistant", "content": str}``.

SFT row::

    {"messages": [msg, ...],            # at least one assistant message
     "source": "path/or/hub-id",        # where it came from (for error messages)
     "row": 17}                         # index in that source

Preference row::

    {"prompt":   [msg, ...],            # the shared context, ends with a user message
     "chosen":   [assistant msg, ...],  # the preferred continuation (usually one message)
     "rejected": [assistant msg, ...],
     "source": ..., "row": ...}

Prompt row (evaluation / online sampling)::

    {"prompt": [msg, ...], "chosen": [assistant msg] or None, "id": str, "source": ..., "row": ...}
    (+ "category": str when the prompt set has categories, e.g. MT-Bench: the evaluation
    then reports every metric per category as well)

``source`` and ``row`` travel with the example through tokenization so that a problem found
late (e.g. zero trainable tokens) still names the file and row.
"""

from __future__ import annotations

from typing import Any

from starpo.errors import DataError

ROLES = ("system", "user", "assistant")


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def check_messages(messages: Any, *, source: str, row: int, field: str,
                   need_assistant: bool = False, only_assistant: bool = False) -> list[dict]:
    """Validate a message list and return it normalised (plain dicts, str content)."""
    if not isinstance(messages, list) or not messages:
        raise DataError("expected a non-empty list of messages", source=source, row=row,
                        field=field)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"message {i} is {type(m).__name__}, expected an object with "
                            "'role' and 'content'", source=source, row=row, field=field)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"message {i} has role {role!r}; expected one of {ROLES}",
                            source=source, row=row, field=f"{field}[{i}].role")
        if not isinstance(content, str):
            raise DataError(f"message {i} content is {type(content).__name__}, expected str",
                            source=source, row=row, field=f"{field}[{i}].content")
        if only_assistant and role != "assistant":
            raise DataError(f"message {i} has role {role!r}; a response holds only "
                            "assistant messages", source=source, row=row, field=field)
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError("conversation has no assistant message to train on",
                        source=source, row=row, field=field)
    return out


def sft_row(messages: list[dict], *, source: str, row: int) -> dict:
    return {"messages": check_messages(messages, source=source, row=row, field="messages",
                                       need_assistant=True),
            "source": source, "row": row}


def preference_row(prompt: list[dict], chosen: list[dict], rejected: list[dict], *,
                   source: str, row: int) -> dict:
    return {"prompt": check_messages(prompt, source=source, row=row, field="prompt"),
            "chosen": check_messages(chosen, source=source, row=row, field="chosen",
                                     only_assistant=True),
            "rejected": check_messages(rejected, source=source, row=row, field="rejected",
                                       only_assistant=True),
            "source": source, "row": row}


def prompt_row(prompt: list[dict], *, chosen: list[dict] | None = None, id: str | None = None,
               source: str, row: int, category: str | None = None) -> dict:
    out = {"prompt": check_messages(prompt, source=source, row=row, field="prompt"),
           "chosen": (check_messages(chosen, source=source, row=row, field="chosen",
                                     only_assistant=True) if chosen else None),
           "id": id if id is not None else f"{source}:{row}",
           "source": source, "row": row}
    if category is not None:
        out["category"] = category
    return out


def response_text(messages: list[dict]) -> str:
    """The text of a response given as assistant messages (joined if several)."""
    return "\n".join(m["content"] for m in messages)


def as_messages(prompt: Any) -> list[dict]:
    """A prompt as chat messages: a bare string is one user turn (the one conversion every
    sampler, judge and evaluation uses)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def last_user_text(prompt: Any) -> str:
    """The text of the last user message (the prompt itself if it is a string)."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(list(prompt)):
        if message.get("role") == "user":
            return message["content"]
    raise DataError("a prompt has no user message", field="prompt")
