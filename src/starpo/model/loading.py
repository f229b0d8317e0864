"""Models and tokenizers: the tiny default, hub/local checkpoints, reward models, LoRA.

Everything here returns plain Hugging Face objects (``PreTrainedTokenizerFast``,
``LlamaForCausalLM``, ``AutoModelFor*``), so a checkpoint starpo writes is one that
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` read back.

The tiny default
    A byte-level BPE trained on the embedded world's text (so it encodes *any* string
    without unknown tokens, and gives character offsets for label masking) plus a small
    Llama built from a config. Its chat template is ChatML and its end-of-sequence token
    is ``<|im_end|>``: the end of an assistant turn is what stops generation.

Loaded models
    ``load_tokenizer`` installs ChatML (or ``model.chat_template``) when the tokenizer has
    no template, adds ``<|im_start|>``/``<|im_end|>`` as special tokens when the installed
    template uses them and they are missing, and sets a pad token. ``load_model`` then
    aligns the model with that tokenizer: **it resizes the input/output embeddings when the
    tokenizer grew** (new rows are initialised at the mean of the old ones, as transformers
    does) and writes pad/eos ids into ``config`` and ``generation_config``.

GGUF checkpoints
    ``model.name_or_path`` may be a ``.gguf`` file, or a directory plus ``model.gguf_file``
    (the name of the ``.gguf`` file in it). Tokenizer and model load through transformers'
    GGUF reader (the ``gguf`` extra), dequantised to plain float tensors; the quantizer
    marks transformers leaves on the model are cleared (:func:`dequantized`), so any stage
    saves an ordinary checkpoint that ``AutoModelForCausalLM.from_pretrained`` reads
    unchanged. Reading a GGUF file dequantises every tensor (about 30 s for a 135M model on
    one CPU thread): convert once and name the checkpoint instead (``starpo fetch`` does).

Saving
    ``save_pretrained`` writes into a sibling temporary directory and renames it into
    place, so a crash never leaves a half-written model directory behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from starpo.errors import StarpoError
from starpo import fileio
from starpo.model.chat import end_of_turn_token, stop_token_ids, template_text
from starpo.recipe import ModelSpec
from starpo.runtime import Runtime

__all__ = [
    "CHATML_TEMPLATE", "CHATML_SPECIAL_TOKENS", "EOS_TOKEN", "PAD_TOKEN",
    "train_tokenizer", "build_tiny_model", "build_or_load",
    "load_tokenizer", "load_model", "load_reward_model", "reward_model_from_causal",
    "save_pretrained", "align_model_to_tokenizer", "apply_lora",
    "gguf_location", "dequantized",
]

IM_START, IM_END, PAD_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
EOS_TOKEN = IM_END
CHATML_SPECIAL_TOKENS = (IM_START, IM_END)

# ChatML. The ``{% generation %}`` markers around assistant content (through the
# end-of-turn token, which is trained) let transformers' ``return_assistant_tokens_mask``
# work; they render nothing. The newline after ``<|im_end|>`` is outside the markers: the
# model never has to predict it (generation stops at ``<|im_end|>``).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_TINY_FORMAT = 1  # bump when the tiny tokenizer/model construction changes (cache key)


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: Iterable[str], vocab_size: int, seed: int = 0, *,
                    model_max_length: int = 1024):
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    * byte-level: every string (any unicode, control characters, garbage) encodes without
      unknown tokens and decodes back exactly (no normaliser, no prefix space, no
      clean-up of spaces on decode);
    * special tokens ``<|endoftext|>`` (pad, id 0), ``<|im_start|>`` (1), ``<|im_end|>``
      (2, eos); they are never split and never produced by merges;
    * no BOS: nothing is added around the encoded text, the chat template writes all
      structure itself, so a BOS can never be doubled;
    * character offsets are untrimmed (a token's span includes its leading space), so
      ``text[a:b]`` is exactly what the token decodes to (for tokens that are whole
      characters; the bytes of one multi-byte character all map to that character).

    ``vocab_size`` counts the 256 byte symbols and the 3 special tokens; a corpus too small
    to yield that many merges gives a smaller vocabulary (use ``len(tokenizer)``).
    BPE training has no randomness (ties are broken by pair order), so the same corpus
    always gives the same vocabulary; ``seed`` is accepted for a uniform API only.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    del seed  # deterministic by construction (checked in the tests)
    specials = [PAD_TOKEN, IM_START, IM_END]
    if vocab_size < 256 + len(specials):
        raise StarpoError(f"model.tiny.vocab_size: {vocab_size} is smaller than the 256 byte "
                          f"symbols plus {len(specials)} special tokens")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((t for t in texts if t), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=IM_END, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
        padding_side="right")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def load_tokenizer(name_or_path: str, spec=None, *, chat: bool = True,
                   what: str = "model.name_or_path", cache_dir: str | None = None):
    """Load a tokenizer through ``AutoTokenizer`` and make it ready for chat training.

    With ``chat=True`` (the default):

    * ``spec.chat_template``, when set, replaces the tokenizer's template; otherwise a
      tokenizer without a template gets ChatML;
    * ``<|im_start|>``/``<|im_end|>`` are added as special tokens when the installed
      template uses them and the vocabulary lacks them (the model's embeddings must then
      grow: ``load_model`` does it, or call ``align_model_to_tokenizer``);
    * when a template is installed on a tokenizer that had none (a base model), the
      template's end-of-turn token (``<|im_end|>`` for ChatML) becomes the eos token: it
      ends a turn, so it must stop generation; the previous eos becomes the pad token if
      there was none. A tokenizer that already had a template keeps its eos (use
      ``stop_token_ids`` for generation: end of turn and eos).

    Always: a missing pad token is set (previous eos, else unk, else eos).
    ``chat=False`` leaves the template and special tokens alone (judges with their own
    input format).
    """
    from transformers import AutoTokenizer

    spec = _spec(spec)
    gguf = gguf_location(name_or_path, spec, what)
    if gguf is not None:
        _require_gguf(what)
        try:
            tok = AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1],
                                                trust_remote_code=spec.trust_remote_code)
        except (OSError, ValueError, KeyError, NotImplementedError) as err:
            raise _gguf_error(gguf, what, err) from err
    else:
        where = _resolve(name_or_path, what)
        try:
            tok = AutoTokenizer.from_pretrained(where,
                                                trust_remote_code=spec.trust_remote_code,
                                                cache_dir=cache_dir)
        except (OSError, ValueError) as err:
            raise _load_error(name_or_path, what, err, "tokenizer") from err
    old_eos = tok.eos_token
    if chat:
        had_template = template_text(tok) is not None
        installed = spec.chat_template if spec.chat_template is not None else (
            None if had_template else CHATML_TEMPLATE)
        if installed is not None:
            tok.chat_template = installed
            vocab = tok.get_vocab()
            missing = [t for t in CHATML_SPECIAL_TOKENS if t in installed and t not in vocab]
            if missing:
                tok.add_special_tokens({"additional_special_tokens": missing},
                                       replace_extra_special_tokens=False)
            eot = end_of_turn_token(tok)
            if not had_template and eot is not None and eot != tok.eos_token:
                tok.eos_token = eot
    if tok.pad_token is None:
        if old_eos is not None and old_eos != tok.eos_token:
            tok.pad_token = old_eos
        elif tok.unk_token is not None and tok.unk_token != tok.eos_token:
            tok.pad_token = tok.unk_token
        else:
            tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- tiny model

def build_tiny_model(spec, tokenizer, seed: int = 0, *, attn_implementation: str = "sdpa"):
    """A small ``LlamaForCausalLM`` (about a million parameters by default) for ``tokenizer``.

    ``spec`` is a :class:`starpo.recipe.TinyModelSpec`. The vocabulary is
    ``len(tokenizer)``; eos is ``<|im_end|>``, pad and bos ``<|endoftext|>`` (as Qwen does;
    the tokenizer itself never adds a BOS). Initialisation draws from a private RNG seeded
    with ``seed``: the same seed gives identical weights, and the global RNG is untouched.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    eos = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.pad_token_id
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
        attn_implementation=attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=eos,
                                               pad_token_id=pad)
    return model.float()


def _corpus_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def build_or_load(spec, corpus_fn: Callable[[], list[str]], seed: int = 0,
                  cache_dir: str | os.PathLike | None = None, *, for_training: bool = True,
                  device=None):
    """The starting model and tokenizer of a run: ``(model, tokenizer)``.

    ``spec.name_or_path == "tiny"``: train the tokenizer on ``corpus_fn()`` and build the
    tiny Llama (under a second or two). With ``cache_dir`` the result is also saved to
    ``cache_dir/tiny-<key>`` (key: tiny spec, seed, corpus) and read from there next time.
    Otherwise: ``load_tokenizer`` + ``load_model``, with ``cache_dir`` as the hub download
    cache. ``spec.lora`` is applied when training.
    """
    spec = _spec(spec)
    if spec.name_or_path != "tiny":
        cache = str(cache_dir) if cache_dir is not None else None
        tok = load_tokenizer(spec.name_or_path, spec, cache_dir=cache)
        model = load_model(spec.name_or_path, spec, for_training=for_training, device=device,
                           tokenizer=tok, cache_dir=cache)
        return model, tok

    texts = list(corpus_fn())
    if not texts:
        raise StarpoError("model.name_or_path: 'tiny' needs a non-empty corpus to train its "
                          "tokenizer on")
    target = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps({
            "format": _TINY_FORMAT, "tiny": spec.tiny.model_dump(mode="json"), "seed": seed,
            "attn": spec.attn_implementation, "corpus": _corpus_digest(texts)},
            sort_keys=True).encode()).hexdigest()[:16]
        target = Path(cache_dir) / f"tiny-{key}"
    if target is not None and (target / "config.json").is_file():
        tok = load_tokenizer(str(target), spec)
        model = load_model(str(target), spec, for_training=for_training, device=device,
                           tokenizer=tok, lora=False)
    else:
        tok = train_tokenizer(texts, spec.tiny.vocab_size, seed,
                              model_max_length=spec.tiny.max_position_embeddings)
        model = build_tiny_model(spec.tiny, tok, seed,
                                 attn_implementation=spec.attn_implementation)
        if target is not None:
            save_pretrained(model, tok, target)
        model = model.to(Runtime.local(device).dtype(spec.dtype))
        if device is not None:
            model = model.to(device)
        _set_mode(model, for_training)
        model.starpo_segment_attention = spec.segment_attention
        model.starpo_packed_attention = spec.packed_attention
    if for_training and spec.lora:
        model = apply_lora(model, spec.lora)
    return model, tok


# --------------------------------------------------------------------------- loading

def _spec(spec):
    if spec is None:
        return ModelSpec()
    return spec


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def _not_found(name: str, what: str, reason: str = "") -> StarpoError:
    msg = f"{what}: {name!r} is neither a local checkpoint directory nor reachable on the hub"
    if reason:
        msg += f" ({reason})"
    return StarpoError(msg)


def _resolve(name_or_path: str, what: str) -> str:
    """A local checkpoint directory (absolute path) or a plausible hub id; else an error.

    Nothing here touches the network: a string that can only be a path (it starts with
    ``/``, ``.`` or ``~``, or has more than one ``/``) and does not exist fails at once.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise StarpoError(f"{what}: expected a hub id or a checkpoint directory, got "
                          f"{name_or_path!r}")
    name = str(name_or_path)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file() and not (p / "tokenizer_config.json").is_file():
            raise StarpoError(f"{what}: {name!r} is a directory but not a Hugging Face "
                              "checkpoint (no config.json or tokenizer_config.json in it)")
        return str(p.resolve())
    if p.exists():
        raise StarpoError(f"{what}: {name!r} is a file; expected a checkpoint directory or a "
                          "hub id")
    looks_local = (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name)
    if not looks_local:
        try:
            from huggingface_hub.utils import validate_repo_id
            validate_repo_id(name)
        except Exception:
            looks_local = True
    if looks_local:
        raise _not_found(name, what, "no such directory")
    return name


# --------------------------------------------------------------------------- GGUF

GGUF_EXTRA_HINT = "pip install 'starpo[gguf]'"


def gguf_location(name_or_path, spec=None, what: str = "model.name_or_path"
                  ) -> tuple[str, str] | None:
    """``(directory, file name)`` when ``name_or_path`` names a GGUF checkpoint, else None.

    A GGUF checkpoint is a ``.gguf`` file, or a directory that holds ``spec.gguf_file`` and
    no ``config.json`` (a saved stage checkpoint beside it is never read as GGUF). Nothing
    is loaded here; a missing file is an error naming it.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        return None
    p = Path(str(name_or_path)).expanduser()
    gguf_file = getattr(spec, "gguf_file", None)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise StarpoError(f"{what}: GGUF file {str(name_or_path)!r} not found")
        return str(p.resolve().parent), p.name
    if gguf_file and p.is_dir() and not (p / "config.json").is_file():
        if not (p / gguf_file).is_file():
            raise StarpoError(f"{what}: {str(name_or_path)!r} has no file {gguf_file!r} "
                              "(model.gguf_file)")
        return str(p.resolve()), gguf_file
    return None


def _require_gguf(what: str) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise StarpoError(f"{what}: reading a GGUF checkpoint needs the gguf package: "
                          f"{GGUF_EXTRA_HINT}") from None


def _gguf_error(where: tuple[str, str], what: str, err: Exception) -> StarpoError:
    """One line for a GGUF file transformers cannot read (an architecture it has no
    mapping for, a quantisation type it cannot dequantise, a damaged file)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    path = str(Path(where[0]) / where[1])
    if "architecture" in first and "not supported" in first:
        try:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
            # the mapping also holds the non-architecture sections "general", "tokenizer"
            known = ", ".join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES)
                                     - {"general", "tokenizer"}))
        except ImportError:
            known = "see transformers' GGUF documentation"
        return StarpoError(f"{what}: {path}: transformers cannot read this architecture from "
                           f"GGUF ({first}); it reads: {known}. Convert the model to a "
                           "Hugging Face checkpoint another way and name that directory")
    return StarpoError(f"{what}: cannot read GGUF checkpoint {path}: {first}")


def dequantized(model):
    """Clear the marks transformers leaves on a model read from GGUF.

    Its tensors are already plain (dequantised on load), but ``hf_quantizer`` and
    ``config.quantization_config`` remain: ``save_pretrained`` then refuses ("quantized
    with gguf … not serializable") and a saved config would send the next
    ``from_pretrained`` to look for the GGUF file again. Returns ``model``."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for cfg in {id(c): c for c in (model.config, getattr(model.config, "get_text_config",
                                                          lambda: model.config)())}.values():
        if getattr(cfg, "quantization_config", None) is not None:
            try:
                delattr(cfg, "quantization_config")
            except AttributeError:
                cfg.quantization_config = None
    return model


def _load_error(name: str, what: str, err: Exception, part: str) -> StarpoError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(name).expanduser().is_dir():
        return StarpoError(f"{what}: cannot load the {part} from checkpoint {name!r}: {first}")
    if not isinstance(err, OSError):  # found, but not loadable (unknown architecture, ...)
        return StarpoError(f"{what}: cannot load the {part} {name!r}: {first}")
    reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if _offline() else first
    return _not_found(name, what, reason)


def _set_mode(model, for_training: bool) -> None:
    if for_training:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)


def load_model(name_or_path: str, spec=None, *, for_training: bool = True, device=None,
               kind: str = "causal_lm", tokenizer=None, what: str = "model.name_or_path",
               cache_dir: str | None = None, chat: bool = True, lora: bool = True):
    """Load a hub id or local checkpoint with ``AutoModelForCausalLM`` (``kind="reward"``:
    ``AutoModelForSequenceClassification`` with one label).

    * ``attn_implementation`` and dtype from ``spec`` (``"auto"``: fp32 master weights for
      a model that trains, else ``Runtime.dtype`` on ``device``, the default one when none
      is given);
      ``trust_remote_code`` only when ``spec.trust_remote_code`` is true;
    * the model is aligned with ``tokenizer`` (loaded with ``load_tokenizer(..., chat=chat)``
      from the same place when not given): embeddings resized if the tokenizer grew,
      pad/eos ids set in ``config`` and ``generation_config`` (the reward model needs pad
      to find the last real token);
    * ``for_training=False`` puts the model in eval mode with gradients off (references,
      judges); ``for_training=True`` applies ``spec.lora`` when set (and ``lora`` is true);
    * moved to ``device`` when given (otherwise it stays where transformers put it: CPU).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind not in ("causal_lm", "reward"):
        raise ValueError(f"kind must be 'causal_lm' or 'reward', not {kind!r}")
    spec = _spec(spec)
    gguf = gguf_location(name_or_path, spec, what)
    where = gguf[0] if gguf is not None else _resolve(name_or_path, what)
    if tokenizer is None:
        tokenizer = load_tokenizer(name_or_path, spec, what=what, cache_dir=cache_dir,
                                   chat=chat)
    # a model that trains keeps fp32 master weights under "auto": the loop's mixed precision
    # (bf16 autocast where the GPU supports it) does the compute; models that only infer
    # (references, judges, evaluation) load in the compute dtype itself
    dtype = torch.float32 if for_training and spec.dtype == "auto" else \
        Runtime.local(device).dtype(spec.dtype)
    kwargs: dict[str, Any] = dict(dtype=dtype,
                                  attn_implementation=spec.attn_implementation,
                                  trust_remote_code=spec.trust_remote_code,
                                  cache_dir=cache_dir)
    if gguf is not None:
        _require_gguf(what)
        kwargs["gguf_file"] = gguf[1]
    try:
        if kind == "reward":
            model = AutoModelForSequenceClassification.from_pretrained(
                where, num_labels=1, pad_token_id=tokenizer.pad_token_id, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError) as err:
        if gguf is not None:
            raise _gguf_error(gguf, what, err) from err
        if isinstance(err, (KeyError, NotImplementedError)):
            raise
        raise _load_error(str(name_or_path), what, err, "model") from err
    except RuntimeError as err:
        # a classifier whose head has several labels (transformers refuses the 1-label head)
        if kind == "reward" and "mismatch" in str(err):
            raise StarpoError(f"{what}: {str(name_or_path)!r} is a classifier with more than "
                              "one label; a reward model gives one score (num_labels 1): "
                              "name a reward model or a causal LM to start one from") from err
        raise
    if gguf is not None:
        dequantized(model)
    align_model_to_tokenizer(model, tokenizer)
    if device is not None:
        model = model.to(device)
    _set_mode(model, for_training)
    model.starpo_segment_attention = spec.segment_attention   # read by starpo.model.attention
    model.starpo_packed_attention = spec.packed_attention
    if for_training and spec.lora and lora:
        model = apply_lora(model, spec.lora, task_type="SEQ_CLS" if kind == "reward"
                           else "CAUSAL_LM")
    return model


def align_model_to_tokenizer(model, tokenizer, seed: int = 0) -> None:
    """Grow the embeddings to ``len(tokenizer)`` if needed; copy pad/eos ids into configs.

    ``generation_config.eos_token_id`` becomes ``stop_token_ids(tokenizer)`` followed by
    the checkpoint's own stop ids (an int when there is one, else a list).

    New embedding rows are drawn around the mean of the existing ones (transformers'
    ``mean_resizing``) from an RNG seeded with ``seed``, so loading is reproducible.
    Embeddings are never shrunk (many checkpoints pad their vocabulary on purpose).
    """
    n = len(tokenizer)
    emb = model.get_input_embeddings()
    if emb is not None and n > emb.num_embeddings:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.resize_token_embeddings(n)
    pad = tokenizer.pad_token_id
    model.config.pad_token_id = pad
    if tokenizer.eos_token_id is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
    # a base config built for another vocabulary (Llama's bos 1, Gemma's 2) must not name a
    # different token than the tokenizer's bos
    bos = tokenizer.bos_token_id
    if bos is not None:
        model.config.bos_token_id = bos
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = pad
        if bos is not None:
            gen.bos_token_id = bos
        # stop at the template's end of turn and eos, keeping the checkpoint's own stops
        old = gen.eos_token_id
        old = [] if old is None else ([old] if isinstance(old, int) else list(old))
        stops = list(dict.fromkeys(stop_token_ids(tokenizer) + old))
        if stops:
            gen.eos_token_id = stops[0] if len(stops) == 1 else stops


# --------------------------------------------------------------------------- reward models

def load_reward_model(path: str, spec=None, *, for_training: bool = False, device=None,
                      tokenizer=None, chat: bool = True, what: str = "judge.path"):
    """A scalar reward model: ``AutoModelForSequenceClassification`` with ``num_labels=1``
    and ``config.pad_token_id`` set, so the score is read at the last non-pad token.

    A causal-LM checkpoint loads too: its backbone is reused and the score head is new
    (initialised from a fixed seed); see also ``reward_model_from_causal``. Judges with
    their own input format (OpenAssistant) pass ``chat=False`` so the tokenizer is left as
    it is (no template, special tokens or eos change).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_model(path, spec, for_training=for_training, device=device,
                          kind="reward", tokenizer=tokenizer, chat=chat, what=what)


def reward_model_from_causal(model_or_path, *, pad_token_id: int | None = None,
                             seed: int = 0, spec=None):
    """Turn a causal LM (a model object or a checkpoint path) into a reward model.

    The backbone's weights are copied into ``AutoModelForSequenceClassification`` built
    from the same config with ``num_labels=1``; the scalar head is fresh, drawn from an RNG
    seeded with ``seed``. ``pad_token_id`` defaults to the model's ``config.pad_token_id``
    and must be known (the head reads the last non-pad token).
    """
    from transformers import AutoModelForSequenceClassification

    if isinstance(model_or_path, (str, os.PathLike)):
        spec = _spec(spec)
        tok = load_tokenizer(str(model_or_path), spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return load_model(str(model_or_path), spec, for_training=True, kind="reward",
                              tokenizer=tok, lora=False)
    causal = model_or_path
    if hasattr(causal, "peft_config"):
        raise StarpoError("reward_model_from_causal: merge the LoRA adapter first "
                          "(model.merge_and_unload())")
    cfg = copy.deepcopy(causal.config)
    cfg.num_labels = 1
    cfg.pad_token_id = pad_token_id if pad_token_id is not None else causal.config.pad_token_id
    if cfg.pad_token_id is None:
        raise StarpoError("reward_model_from_causal: the model has no pad_token_id; pass "
                          "pad_token_id= (the tokenizer's pad token id)")
    cfg.architectures = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rm = AutoModelForSequenceClassification.from_config(cfg)
    src = getattr(causal, causal.base_model_prefix)
    dst = getattr(rm, rm.base_model_prefix)
    dst.load_state_dict(src.state_dict())
    param = next(causal.parameters())
    return rm.to(device=param.device, dtype=param.dtype)


# --------------------------------------------------------------------------- LoRA

def apply_lora(model, lora: dict[str, Any], task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with a peft LoRA adapter; ``lora`` holds ``LoraConfig`` kwargs."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise StarpoError("model.lora is set but peft is not installed: "
                          "pip install 'starpo[lora]'") from None
    kwargs = {"task_type": task_type, **lora}
    try:
        return get_peft_model(model, LoraConfig(**kwargs))
    except (TypeError, ValueError) as err:
        raise StarpoError(f"model.lora: {err}") from err


# --------------------------------------------------------------------------- saving

def save_pretrained(model, tokenizer, out_dir: str | os.PathLike, *, merge_lora: bool = True,
                    state_dict: dict | None = None):
    """Write a normal HF checkpoint (safetensors, config, generation_config, tokenizer with
    its chat template) to ``out_dir`` atomically; returns the model that was saved.

    Everything is written to ``<out_dir>.tmp-<random>`` next to it, then renamed into
    place; an existing ``out_dir`` is swapped out and removed only after the new one is
    complete. On any error the temporary directory is removed and ``out_dir`` is untouched.

    A peft model is merged first (``merge_and_unload``, in place: the returned model is
    the plain merged one; keep using that) unless ``merge_lora=False``, which writes the
    adapter alone (for intermediate checkpoints). ``state_dict`` is passed through to
    ``model.save_pretrained`` (FSDP/DeepSpeed: ``accelerator.get_state_dict(model)``);
    call this on the main process only.
    """
    if hasattr(model, "peft_config") and merge_lora:
        model = model.merge_and_unload()

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    fileio.atomic_dir(out_dir, write, fsync=True)
    return model
