"""Judges: score responses to prompts (higher is better).

One interface, :class:`Judge`, with two methods:

* ``score(prompts, responses) -> list[float]`` scores each (prompt, response) pair;
* ``rank(prompt, candidates) -> list[float]`` scores the candidates of one prompt against
  each other (higher is better; online DPO takes the best and the worst).

A prompt is a string (one user turn) or a list of chat messages ``{role, content}``.

Implementations

* :class:`GoldJudge`: the embedded world's known gold reward (``starpo.world``), for the
  CPU quickstart and for measuring how well the other judges do.
* :class:`RewardModelJudge`: any ``AutoModelForSequenceClassification`` checkpoint, score =
  ``logits[:, 0]``. Inputs are rendered either with the tokenizer's chat template or in
  the OpenAssistant format ``<|prompter|>{q}<|endoftext|><|assistant|>{a}<|endoftext|>``.
  OpenAssistant's ``gpt_neox_reward_model`` checkpoints (the *PO guide's gold model
  ``OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5``) load without remote code through
  :func:`register_openassistant`.
* :class:`PairwiseJudge`: judges that compare two responses; it controls position bias
  by judging both orders and averaging, and ranks candidates by round robin.
  :class:`PairRMJudge` adapts llm-blender's PairRM (an optional package).

:func:`make_judge` builds one from a recipe's :class:`~starpo.config.JudgeSpec`, and
:func:`rank_groups` ranks many prompts' candidates in as few model calls as the judge
allows.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from typing import Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import nn
from transformers import GPTNeoXConfig
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXModel, GPTNeoXPreTrainedModel

from starpo.recipe.schema import JudgeSpec
from starpo.errors import StarpoError

logger = logging.getLogger(__name__)

Prompt = Union[str, list]


# --------------------------------------------------------------------------- prompts

def as_messages(prompt: Prompt) -> list[dict]:
    """A prompt as chat messages (a bare string is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def last_user_text(prompt: Prompt) -> str:
    """The text of the last user message (the prompt itself if it is a string)."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(list(prompt)):
        if message.get("role") == "user":
            return message["content"]
    raise StarpoError("a judge prompt has no user message")


OA_ROLES = {"user": "<|prompter|>", "assistant": "<|assistant|>", "system": "<|system|>"}
OA_END = "<|endoftext|>"


def openassistant_format(prompt: Prompt, response: str) -> str:
    """OpenAssistant reward-model input.

    ``<|prompter|>{q}<|endoftext|><|assistant|>{a}<|endoftext|>``; a multi-turn prompt
    alternates ``<|prompter|>``/``<|assistant|>`` turns in order, and a system message is
    written as ``<|system|>{text}<|endoftext|>`` (OpenAssistant's own system-prefix token).
    """
    parts = []
    for m in as_messages(prompt):
        role = m.get("role")
        if role not in OA_ROLES:
            raise StarpoError(f"OpenAssistant format: unknown message role {role!r}")
        parts.append(f"{OA_ROLES[role]}{m['content']}{OA_END}")
    parts.append(f"{OA_ROLES['assistant']}{response}{OA_END}")
    return "".join(parts)


# --------------------------------------------------------------------------- interface

@runtime_checkable
class Judge(Protocol):
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response) pair; higher is better."""
        ...

    def rank(self, prompt: Prompt, candidates: Sequence[str]) -> list[float]:
        """One score per candidate of the same prompt; higher is better."""
        ...


class PointwiseJudge:
    """Base of judges that score each response on its own; ranking is scoring."""

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def rank(self, prompt: Prompt, candidates: Sequence[str]) -> list[float]:
        return self.score([prompt] * len(candidates), list(candidates))

    def rank_many(self, prompts: Sequence[Prompt],
                  groups: Sequence[Sequence[str]]) -> list[list[float]]:
        """``rank`` for many prompts at once: one flattened ``score`` call."""
        flat_p = [p for p, g in zip(prompts, groups) for _ in g]
        flat_r = [r for g in groups for r in g]
        flat = self.score(flat_p, flat_r)
        out, k = [], 0
        for g in groups:
            out.append(flat[k: k + len(g)])
            k += len(g)
        return out


def rank_groups(judge: Judge, prompts: Sequence[Prompt],
                groups: Sequence[Sequence[str]]) -> list[list[float]]:
    """Scores of each prompt's candidates (higher is better), batched when possible."""
    if len(prompts) != len(groups):
        raise ValueError("rank_groups: one candidate group per prompt")
    many = getattr(judge, "rank_many", None)
    if many is not None:
        return many(prompts, groups)
    return [judge.rank(p, list(g)) for p, g in zip(prompts, groups)]


def _check_lengths(prompts, responses) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"judge: {len(prompts)} prompts but {len(responses)} responses")


# --------------------------------------------------------------------------- gold

class GoldJudge(PointwiseJudge):
    """The embedded world's gold reward, on the last user message and the response."""

    name = "gold"

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        _check_lengths(prompts, responses)
        world = importlib.import_module("starpo.world")  # imported lazily: optional here
        texts = [last_user_text(p) for p in prompts]
        if hasattr(world, "gold_rewards"):
            values = world.gold_rewards(texts, list(responses))
        else:
            values = [world.gold_reward(p, r) for p, r in zip(texts, responses)]
        return [float(v) for v in values]


# --------------------------------------------------------------------------- OpenAssistant

class GPTNeoXRewardConfig(GPTNeoXConfig):
    """Config of OpenAssistant's GPT-NeoX reward models (``model_type`` gpt_neox_reward_model).

    ``pooling`` is ``"last"`` (OpenAssistant's default and what their released reward
    models use) or ``"mean"``.
    """

    model_type = "gpt_neox_reward_model"
    pooling: str = "last"


class GPTNeoXRewardModel(GPTNeoXPreTrainedModel):
    """A GPT-NeoX body (``gpt_neox.*``) and a linear head ``out_proj`` to one score.

    The parameter names match OpenAssistant's checkpoints. Pooling follows their model
    code: ``"last"`` takes the hidden state of the last position whose attention mask is
    1 (the last non-pad token; the last position when no mask is given), ``"mean"``
    averages over the unmasked positions. Unlike their code, positions are counted from
    the attention mask, so left-padded inputs score like right-padded ones.
    """

    config_class = GPTNeoXRewardConfig
    config: GPTNeoXRewardConfig
    # old checkpoints also store these buffers; they are recomputed, not loaded
    _keys_to_ignore_on_load_unexpected = [r"attention\.bias", r"attention\.masked_bias",
                                          r"rotary_emb\.inv_freq"]

    def __init__(self, config: GPTNeoXRewardConfig):
        super().__init__(config)
        self.gpt_neox = GPTNeoXModel(config)
        self.out_proj = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def get_input_embeddings(self):
        return self.gpt_neox.embed_in

    def set_input_embeddings(self, value):
        self.gpt_neox.embed_in = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None,
                **kwargs) -> SequenceClassifierOutputWithPast:
        kwargs.pop("labels", None)
        kwargs.pop("use_cache", None)
        kwargs.pop("return_dict", None)
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.gpt_neox(input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, inputs_embeds=inputs_embeds,
                               use_cache=False, **kwargs).last_hidden_state
        pooling = getattr(self.config, "pooling", "last") or "last"
        if pooling == "last":
            if attention_mask is None:
                pooled = hidden[:, -1]
            else:
                pos = torch.arange(hidden.shape[1], device=hidden.device)
                last = (pos * (attention_mask != 0).to(pos.dtype)).argmax(-1)
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        elif pooling == "mean":
            if attention_mask is None:
                pooled = hidden.mean(1)
            else:
                m = attention_mask.to(hidden.dtype).unsqueeze(-1)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            raise StarpoError(f"gpt_neox_reward_model: unknown pooling {pooling!r}")
        return SequenceClassifierOutputWithPast(logits=self.out_proj(pooled))


_REGISTERED = False


def register_openassistant() -> None:
    """Teach ``AutoConfig``/``AutoModelForSequenceClassification`` the OpenAssistant RM type.

    After this, ``AutoModelForSequenceClassification.from_pretrained(path)`` loads a
    checkpoint whose config says ``"model_type": "gpt_neox_reward_model"`` into
    :class:`GPTNeoXRewardModel`, without ``trust_remote_code``. Safe to call repeatedly.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForSequenceClassification
    AutoConfig.register(GPTNeoXRewardConfig.model_type, GPTNeoXRewardConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(GPTNeoXRewardConfig, GPTNeoXRewardModel,
                                                exist_ok=True)
    _REGISTERED = True


# --------------------------------------------------------------------------- reward model

class RewardModelJudge(PointwiseJudge):
    """Score = ``logits[:, 0]`` of a sequence-classification model on (prompt, response).

    ``input_format``:

    * ``"chat_template"``: prompt messages plus ``{"role": "assistant", "content":
      response}`` rendered with the tokenizer's chat template;
    * ``"openassistant"``: :func:`openassistant_format`.

    The text is tokenized with ``add_special_tokens=False`` (a template writes its own
    BOS). Sequences longer than ``max_length`` (default: the model's
    ``max_position_embeddings``) keep their *last* tokens, where the response is. Inputs
    are sorted by length, right padded into batches of ``batch_size``, and scores returned
    in input order. Models that locate the last token by ``config.pad_token_id`` (the
    transformers ``*ForSequenceClassification`` classes) get the tokenizer's pad id (or
    its eos id) there if they have none, so batches larger than one work.
    """

    name = "reward_model"

    def __init__(self, path_or_model, tokenizer=None, input_format: str = "chat_template",
                 batch_size: int = 16, device=None, *, max_length: int | None = None,
                 dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
                 attn_implementation: str | None = None):
        if input_format not in ("chat_template", "openassistant"):
            raise StarpoError(f"judge.input_format must be 'chat_template' or 'openassistant', "
                              f"got {input_format!r}")
        self.input_format, self.batch_size = input_format, int(batch_size)
        if isinstance(path_or_model, (str, os.PathLike)):
            path = str(path_or_model)
            model, tokenizer = _load_reward_model(path, tokenizer, device, dtype,
                                                  trust_remote_code, attn_implementation)
            self.source = path
        else:
            model = path_or_model
            if tokenizer is None:
                raise StarpoError("RewardModelJudge: pass the tokenizer with an in-memory model")
            if device is not None:
                model = model.to(device)
            self.source = getattr(getattr(model, "config", None), "_name_or_path", "model")
        self.model, self.tokenizer = model.eval(), tokenizer
        if input_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise StarpoError(f"reward model {self.source}: its tokenizer has no chat template; "
                              "use judge.input_format: openassistant or a tokenizer with one")
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        cfg = model.config
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = self.pad_id
        self.max_length = max_length or getattr(cfg, "max_position_embeddings", None)
        self._warned_truncation = False

    def format(self, prompt: Prompt, response: str) -> str:
        """The exact text the model scores for (prompt, response)."""
        if self.input_format == "openassistant":
            return openassistant_format(prompt, response)
        messages = as_messages(prompt) + [{"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        ids = list(self.tokenizer(self.format(prompt, response),
                                  add_special_tokens=False)["input_ids"])
        if self.max_length and len(ids) > self.max_length:
            if not self._warned_truncation:
                logger.warning("reward model %s: inputs longer than %d tokens keep their last "
                               "%d tokens", self.source, self.max_length, self.max_length)
                self._warned_truncation = True
            ids = ids[-self.max_length:]
        return ids

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        _check_lengths(prompts, responses)
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        device = _device_of(self.model)
        scores = [0.0] * len(encoded)
        for b in range(0, len(order), self.batch_size):
            idx = order[b: b + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # right padding
                input_ids[r, : len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                attention[r, : len(encoded[i])] = 1
            out = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device))
            values = out.logits[:, 0].float().cpu().tolist()
            for i, v in zip(idx, values):
                scores[i] = float(v)
        return scores


def _device_of(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


def _load_reward_model(path, tokenizer, device, dtype, trust_remote_code, attn_implementation):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    register_openassistant()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StarpoError(f"judge: cannot load reward model {path!r}: {first}") from None
    if not isinstance(model, GPTNeoXRewardModel) and getattr(model.config, "num_labels", 1) != 1:
        logger.warning("reward model %s has %d labels; scoring with logit 0", path,
                       model.config.num_labels)
    return model.to(device), tokenizer


# --------------------------------------------------------------------------- pairwise

Comparator = Callable[[Prompt, str, str], float]


class PairwiseJudge:
    """A judge that compares two responses: ``compare(prompt, a, b)`` = P(a is better).

    Judges that compare are often biased toward one position. With ``both_orders`` (the
    default) every comparison is made as (a, b) and as (b, a) and the two are averaged:
    ``(p(a, b) + 1 - p(b, a)) / 2``, so ``compare(p, a, b) + compare(p, b, a) == 1``.

    ``rank`` plays a round robin: a candidate's score is its mean probability of beating
    each other candidate (in [0, 1], higher is better).

    Give a ``comparator(prompt, first, second) -> probability first is better``, or
    subclass and override :meth:`prefer` (batched, as presented, no order control).
    A pairwise judge has no absolute scale, so :meth:`score` is an error.
    """

    name = "pairwise"

    def __init__(self, comparator: Comparator | None = None, *, both_orders: bool = True):
        self.comparator, self.both_orders = comparator, both_orders

    def prefer(self, prompts: Sequence[Prompt], first: Sequence[str],
               second: Sequence[str]) -> list[float]:
        """Raw P(first is better) for each triple, in the order presented."""
        if self.comparator is None:
            raise NotImplementedError("PairwiseJudge needs a comparator or a prefer() override")
        return [float(self.comparator(p, a, b)) for p, a, b in zip(prompts, first, second)]

    def compare_batch(self, prompts: Sequence[Prompt], a: Sequence[str],
                      b: Sequence[str]) -> list[float]:
        if not (len(prompts) == len(a) == len(b)):
            raise ValueError("compare_batch: prompts, a and b must have the same length")
        if not self.both_orders:
            return self.prefer(prompts, a, b)
        # one call over both orders, so a batched judge runs them together
        raw = self.prefer(list(prompts) * 2, list(a) + list(b), list(b) + list(a))
        n = len(prompts)
        return [(raw[i] + 1.0 - raw[n + i]) / 2.0 for i in range(n)]

    def compare(self, prompt: Prompt, a: str, b: str) -> float:
        return self.compare_batch([prompt], [a], [b])[0]

    def rank(self, prompt: Prompt, candidates: Sequence[str]) -> list[float]:
        k = len(candidates)
        if k < 2:
            return [0.5] * k
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        probs = self.compare_batch([prompt] * len(pairs), [candidates[i] for i, _ in pairs],
                                   [candidates[j] for _, j in pairs])
        wins = [0.0] * k
        for (i, j), p in zip(pairs, probs):
            if self.both_orders:
                wins[i] += p
                wins[j] += 1.0 - p
            else:  # without order control, j's chance is what the judge says as first
                wins[i] += p
        if not self.both_orders:
            back = self.compare_batch([prompt] * len(pairs), [candidates[j] for _, j in pairs],
                                      [candidates[i] for i, _ in pairs])
            for (i, j), p in zip(pairs, back):
                wins[j] += p
        return [w / (k - 1) for w in wins]

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        raise StarpoError("a pairwise judge compares responses and has no absolute score; "
                          "use a reward_model or gold judge where scores are needed")


class PairRMJudge(PairwiseJudge):
    """llm-blender's PairRM (``llm-blender/PairRM``) behind the pairwise interface.

    PairRM ranks the k candidates of a prompt; its ranks are lower-is-better (1 = best)
    and its scores higher-is-better. ``rank`` returns PairRM's scores (higher is better);
    :meth:`pairrm_ranks` returns its raw ranks. ``prefer`` = ``sigmoid(score_a - score_b)``
    from ranking the two candidates. The prompt given to PairRM is the last user message.

    llm-blender pins ``transformers<5`` and is not a starpo dependency: install it in a
    separate environment (``pip install git+https://github.com/yuchenlin/LLM-Blender.git``)
    to use this judge.
    """

    name = "pairrm"

    def __init__(self, model: str = "llm-blender/PairRM", *, device=None, batch_size: int = 8,
                 both_orders: bool = True):
        super().__init__(both_orders=both_orders)
        try:
            import llm_blender  # type: ignore[import-not-found]
        except ImportError:
            raise StarpoError(
                "the PairRM judge needs the llm-blender package, which is not installed (it "
                "pins transformers<5, so starpo does not depend on it); install it with `pip "
                "install git+https://github.com/yuchenlin/LLM-Blender.git` in an environment "
                "where transformers<5 is acceptable, or use judge.type reward_model / gold"
            ) from None
        self.batch_size = batch_size
        self.blender = llm_blender.Blender()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.blender.loadranker(model, device=str(device))

    def _scores(self, prompts: Sequence[Prompt], groups: Sequence[Sequence[str]]):
        return self.blender.rank([last_user_text(p) for p in prompts],
                                 [list(g) for g in groups], return_scores=True,
                                 batch_size=self.batch_size)

    def prefer(self, prompts, first, second) -> list[float]:
        scores = self._scores(prompts, [[a, b] for a, b in zip(first, second)])
        return [1.0 / (1.0 + math.exp(-(float(s[0]) - float(s[1])))) for s in scores]

    def rank(self, prompt: Prompt, candidates: Sequence[str]) -> list[float]:
        return self.rank_many([prompt], [candidates])[0]

    def rank_many(self, prompts, groups) -> list[list[float]]:
        return [[float(x) for x in s] for s in self._scores(prompts, groups)]

    def pairrm_ranks(self, prompt: Prompt, candidates: Sequence[str]) -> list[int]:
        ranks = self.blender.rank([last_user_text(prompt)], [list(candidates)],
                                  return_scores=False, batch_size=self.batch_size)
        return [int(r) for r in ranks[0]]


# --------------------------------------------------------------------------- factory

PAIRRM_NAMES = {"pairrm", "PairRM", "llm-blender/PairRM"}


def make_judge(spec: JudgeSpec, *, resolve_path: Callable[[str], str] | None = None,
               model_spec=None, device=None) -> Judge:
    """The judge a recipe asks for.

    ``resolve_path`` maps ``spec.path`` (a stage name of the run, or a path / hub id) to a
    checkpoint location; it may return ``None`` to mean "not a stage, use as is".
    ``model_spec`` (:class:`~starpo.config.ModelSpec`) supplies dtype, attention
    implementation and ``trust_remote_code`` for a reward model.
    """
    if spec.type == "gold":
        return GoldJudge()
    if spec.type == "pairwise":
        target = spec.path or "llm-blender/PairRM"
        if target in PAIRRM_NAMES:
            target = "llm-blender/PairRM"
        elif resolve_path is not None:
            target = resolve_path(target) or target
        return PairRMJudge(str(target), device=device, batch_size=spec.batch_size)
    if spec.type == "reward_model":
        if not spec.path:
            raise StarpoError("judge.path: a reward_model judge needs the path (or stage name) "
                              "of a sequence-classification checkpoint")
        target = spec.path
        if resolve_path is not None:
            target = resolve_path(target) or target
        kwargs = {}
        if model_spec is not None:
            kwargs["trust_remote_code"] = bool(getattr(model_spec, "trust_remote_code", False))
            dtype = getattr(model_spec, "dtype", None)
            if dtype and dtype != "auto":
                kwargs["dtype"] = dtype
            attn = getattr(model_spec, "attn_implementation", None)
            if attn:
                kwargs["attn_implementation"] = attn
        return RewardModelJudge(str(target), input_format=spec.input_format,
                                batch_size=spec.batch_size, device=device, **kwargs)
    raise StarpoError(f"judge.type: unknown judge type {spec.type!r}")
