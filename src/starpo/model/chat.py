"""What a chat template implies for generation: the token that ends an assistant turn, and
every token id that stops sampling. One implementation for the tokenizer setup (which
writes them into ``generation_config``) and the samplers."""

from __future__ import annotations


def template_text(tok) -> str | None:
    tpl = getattr(tok, "chat_template", None)
    if isinstance(tpl, dict):  # several named templates: the default one matters here
        tpl = tpl.get("default") or next(iter(tpl.values()), None)
    return tpl or None


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant's content.

    ChatML → ``<|im_end|>``, Gemma → ``<end_of_turn>``, Llama-3 → ``<|eot_id|>``. Found by
    rendering a probe conversation and encoding what follows the probe answer; None when
    the template writes no special token there.
    """
    if template_text(tokenizer) is None:
        return None
    answer = "starpoprobeanswer"
    msgs = [{"role": "user", "content": "starpoprobequestion"},
            {"role": "assistant", "content": answer}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:
        return None
    at = text.rfind(answer)
    if at < 0:
        return None
    rest = text[at + len(answer):].lstrip()
    if not rest:
        return None
    ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return tokenizer.convert_ids_to_tokens(ids[0]) if ids[0] in special else None




# tokens that end a turn in common templates, for tokenizers whose template cannot be probed
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def end_of_turn_token_id(tokenizer) -> int | None:
    """The id of :func:`end_of_turn_token`, else of a known end-of-turn token in the vocabulary
    (ChatML, Llama-3, Gemma), else ``None``."""
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        return int(tokenizer.convert_tokens_to_ids(eot))
    vocab = tokenizer.get_vocab()
    for tok in _KNOWN_END_OF_TURN:
        if tok in vocab:
            return int(vocab[tok])
    return None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end a generated answer, in order and without repeats: the template's
    end of turn, ``tokenizer.eos_token_id``, then the model's
    ``generation_config.eos_token_id`` (when a model is given). May be empty."""
    ids: list[int] = []
    eot = end_of_turn_token_id(tokenizer)
    if eot is not None:
        ids.append(eot)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if extra is not None:
        ids.extend(int(i) for i in (extra if isinstance(extra, (list, tuple)) else [extra]))
    return list(dict.fromkeys(ids))
