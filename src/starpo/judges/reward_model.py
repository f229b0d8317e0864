"""A sequence-classification checkpoint as a judge (score = ``logits[:, 0]``), with the
OpenAssistant input format and the OpenAssistant ``gpt_neox_reward_model`` architecture
(the *PO guide's gold model) registered so it loads without remote code."""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import GPTNeoXConfig
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXModel, GPTNeoXPreTrainedModel

from starpo.canonical import as_messages
from starpo.errors import StarpoError
from starpo.judges.base import PointwiseJudge, Prompt, _check_lengths
from starpo.model.loading import load_reward_model, load_tokenizer
from starpo.runtime import Runtime

logger = logging.getLogger(__name__)


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

    A path loads through :func:`starpo.model.loading.load_reward_model` (the tokenizer as
    the checkpoint has it: no template is installed), with ``model_spec``'s dtype,
    attention implementation and ``trust_remote_code`` (a recipe's ``model``; defaults
    when None), on ``device`` (the runtime's; :meth:`Runtime.local` when None).
    """

    name = "reward_model"

    def __init__(self, path_or_model, tokenizer=None, input_format: str = "chat_template",
                 batch_size: int = 16, device=None, *, max_length: int | None = None,
                 model_spec=None):
        if input_format not in ("chat_template", "openassistant"):
            raise StarpoError(f"judge.input_format must be 'chat_template' or 'openassistant', "
                              f"got {input_format!r}")
        self.input_format, self.batch_size = input_format, int(batch_size)
        if isinstance(path_or_model, (str, os.PathLike)):
            path = str(path_or_model)
            register_openassistant()
            if tokenizer is None:
                tokenizer = load_tokenizer(path, model_spec, chat=False, what="judge.path")
            model = load_reward_model(path, model_spec, device=Runtime.local(device).device,
                                      tokenizer=tokenizer, chat=False)
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
