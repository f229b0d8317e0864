"""Chat tokenizer, tiny models and prompts shared by the sampling tests
(tests/generate/test_sampling.py, tests/generate/test_static.py)."""

from __future__ import annotations

import torch

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the cat sat on the mat and looked at the dog",
    "a quick brown fox jumps over the lazy dog",
    "tell me a story about a small robot who learns to paint",
    "what is the capital of france? paris is the capital",
    "numbers like 1 2 3 and words like apple banana cherry",
] * 4


def make_tokenizer(bos: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS + ([bos] if bos else [])
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    if bos:  # a tokenizer that adds BOS by itself: render_prompt must not add a second
        tk.post_processor = TemplateProcessing(single=f"{bos} $A",
                                               special_tokens=[(bos, tk.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", bos_token=bos,
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ((bos or "") + CHATML) if bos else CHATML
    return tok


def tiny_model(vocab: int, seed: int = 0, cls=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=256, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = (cls or LlamaForCausalLM)(cfg).float()
    # sharpen the output layer so greedy decoding has no near-ties
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


PROMPTS = [
    [{"role": "user", "content": "tell me a story"}],
    [{"role": "system", "content": "be brief"},
     {"role": "user", "content": "what is the capital of france? answer with one word"}],
    [{"role": "user", "content": "cat"}],
    [{"role": "user", "content": "the quick brown fox jumps over the lazy dog and the cat"}],
]


def ids_of(gens):
    return [[s.token_ids for s in per_prompt] for per_prompt in gens]


class Triggered:
    """Mixin: after ``trigger`` the model emits ``target`` (scripted end of turn)."""

    trigger: int = -1
    target: int = -1

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        hit = input_ids[:, -1] == self.trigger
        if hit.any():
            out.logits[hit, -1, :] = -1e4
            out.logits[hit, -1, self.target] = 1e4
        return out
