"""Judges: OpenAssistant reward model loading and scoring, chat-template reward models,
pairwise position-bias control, the gold judge, and the recipe factory."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from starpo.recipe import JudgeSpec, ModelSpec
from starpo.errors import StarpoError
from starpo.judges.gold import GoldJudge
from starpo.judges.reward_model import GPTNeoXRewardModel, RewardModelJudge, openassistant_format, register_openassistant
from starpo.judges.base import Judge, PairwiseJudge, PointwiseJudge, rank_groups
from starpo.judges import BUILDERS, make_judge
from starpo.judge_kinds import BUILTIN, is_pointwise
from starpo.runtime import Runtime

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "how do i bake bread? mix flour water salt and yeast then bake it",
    "what is two plus two? it is four",
    "write a haiku about the sea and the wind",
    "the reward model reads the prompt and the answer",
] * 4
NEOX = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=128, rotary_pct=0.25, rotary_emb_base=10000,
            use_parallel_residual=True, layer_norm_eps=1e-5, hidden_act="gelu",
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
PROMPTS = [
    "how do i bake bread?",
    [{"role": "user", "content": "what is two plus two?"}],
    [{"role": "system", "content": "answer in verse"},
     {"role": "user", "content": "write a haiku"},
     {"role": "assistant", "content": "the sea"},
     {"role": "user", "content": "and the wind?"}],
    "the prompt",
    "x",
]
RESPONSES = ["mix flour water salt and yeast then bake it", "four", "the wind and the sea",
             "the answer the reward model reads", ""]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tokenizer(specials, eos, pad, chat_template=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    extra = [s for s in specials if s not in (eos, pad)]
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=pad,
                                  additional_special_tokens=extra)
    if chat_template:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def oa_checkpoint(tmp_path_factory):
    """A randomly initialised OpenAssistant-architecture reward model written from scratch:
    config.json as OpenAssistant ships it, safetensors with gpt_neox.* and out_proj.*
    (plus the legacy attention buffers old checkpoints carry)."""
    from safetensors.torch import save_file
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXModel

    d = tmp_path_factory.mktemp("oasst-rm")
    tok = make_tokenizer(["<|endoftext|>", "<|padding|>", "<|prompter|>", "<|assistant|>",
                          "<|system|>"], eos="<|endoftext|>", pad="<|padding|>")
    tok.save_pretrained(d)
    torch.manual_seed(0)
    body = GPTNeoXModel(GPTNeoXConfig(vocab_size=len(tok), **NEOX)).eval()
    with torch.no_grad():  # non-trivial norms, so a wrong load cannot pass by accident
        for name, p in body.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    tensors = {f"gpt_neox.{k}": v.contiguous() for k, v in body.state_dict().items()}
    head_w, head_b = torch.randn(1, NEOX["hidden_size"]), torch.randn(1)
    tensors["out_proj.weight"], tensors["out_proj.bias"] = head_w, head_b
    L = NEOX["max_position_embeddings"]
    tensors["gpt_neox.layers.0.attention.bias"] = torch.tril(torch.ones(L, L, dtype=torch.bool))
    tensors["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.rand(2)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["GPTNeoXRewardModel"], "model_type": "gpt_neox_reward_model",
           "pooling": "last", "vocab_size": len(tok), "torch_dtype": "float32", **NEOX}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"path": d, "body": body, "w": head_w, "b": head_b, "tok": tok,
            "tensors": tensors}


def manual_oa_score(ckpt, prompt, response) -> float:
    text = openassistant_format(prompt, response)
    ids = ckpt["tok"](text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        h = ckpt["body"](torch.tensor([ids])).last_hidden_state[0, -1]
    return float(h @ ckpt["w"][0] + ckpt["b"][0])


# --------------------------------------------------------------------------- OA format

def test_openassistant_format_is_exact():
    assert openassistant_format("What is 2+2?", "4") == \
        "<|prompter|>What is 2+2?<|endoftext|><|assistant|>4<|endoftext|>"
    multi = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "q2"}]
    assert openassistant_format(multi, "a2") == (
        "<|prompter|>q1<|endoftext|><|assistant|>a1<|endoftext|>"
        "<|prompter|>q2<|endoftext|><|assistant|>a2<|endoftext|>")
    assert openassistant_format([{"role": "system", "content": "s"},
                                 {"role": "user", "content": "q"}], "a") == \
        "<|system|>s<|endoftext|><|prompter|>q<|endoftext|><|assistant|>a<|endoftext|>"
    with pytest.raises(StarpoError, match="role"):
        openassistant_format([{"role": "tool", "content": "x"}], "a")


# --------------------------------------------------------------------------- OA model

def test_openassistant_checkpoint_loads_through_auto_class(oa_checkpoint):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    register_openassistant()
    register_openassistant()  # idempotent
    cfg = AutoConfig.from_pretrained(oa_checkpoint["path"])
    assert cfg.model_type == "gpt_neox_reward_model" and cfg.pooling == "last"
    model = AutoModelForSequenceClassification.from_pretrained(oa_checkpoint["path"])
    assert isinstance(model, GPTNeoXRewardModel)
    state = model.state_dict()
    saved = {k: v for k, v in oa_checkpoint["tensors"].items()
             if not k.startswith("gpt_neox.layers.0.attention.") or k in state}
    for k, v in saved.items():  # every weight came from the file, none re-initialised
        assert torch.equal(state[k], v), k
    assert set(model.state_dict()) <= set(oa_checkpoint["tensors"])


def test_openassistant_judge_equals_manual_computation(oa_checkpoint):
    judge = RewardModelJudge(str(oa_checkpoint["path"]), input_format="openassistant",
                             batch_size=4, device="cpu")
    got = judge.score(PROMPTS, RESPONSES)
    want = [manual_oa_score(oa_checkpoint, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(x, 4) for x in got)) == len(got)  # not a constant head


def test_openassistant_scores_do_not_depend_on_padding(oa_checkpoint):
    one = RewardModelJudge(str(oa_checkpoint["path"]), input_format="openassistant",
                           batch_size=1).score(PROMPTS, RESPONSES)
    many = RewardModelJudge(str(oa_checkpoint["path"]), input_format="openassistant",
                            batch_size=5).score(PROMPTS, RESPONSES)
    assert many == pytest.approx(one, abs=1e-5)


def test_reward_model_pooling_left_padding_and_mean(oa_checkpoint):
    from transformers import AutoModelForSequenceClassification

    register_openassistant()
    model = AutoModelForSequenceClassification.from_pretrained(oa_checkpoint["path"]).eval()
    ids = oa_checkpoint["tok"](openassistant_format("q", "an answer"),
                               add_special_tokens=False)["input_ids"]
    n = len(ids)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([ids])).logits[0, 0]
        left = model(input_ids=torch.tensor([[1, 1, 1] + ids]),
                     attention_mask=torch.tensor([[0, 0, 0] + [1] * n])).logits[0, 0]
        assert float(left) == pytest.approx(float(alone), abs=1e-5)
        model.config.pooling = "mean"
        mean = model(input_ids=torch.tensor([ids + [1, 1]]),
                     attention_mask=torch.tensor([[1] * n + [0, 0]])).logits[0, 0]
        h = oa_checkpoint["body"](torch.tensor([ids])).last_hidden_state[0].mean(0)
        assert float(mean) == pytest.approx(float(h @ oa_checkpoint["w"][0] +
                                                  oa_checkpoint["b"][0]), abs=1e-5)


# --------------------------------------------------------------------------- chat template RM

@pytest.fixture(scope="module")
def llama_rm(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    d = tmp_path_factory.mktemp("llama-rm")
    tok = make_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>",
                         pad="<|endoftext|>", chat_template=CHATML)
    tok.save_pretrained(d)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, num_labels=1, pad_token_id=tok.pad_token_id)
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(d)
    return {"path": d, "model": model, "tok": tok}


def test_chat_template_reward_model(llama_rm):
    judge = RewardModelJudge(str(llama_rm["path"]), input_format="chat_template", batch_size=2)
    got = judge.score(PROMPTS, RESPONSES)
    tok, model = llama_rm["tok"], llama_rm["model"]
    want = []
    for p, r in zip(PROMPTS, RESPONSES):
        msgs = ([{"role": "user", "content": p}] if isinstance(p, str) else p) + \
            [{"role": "assistant", "content": r}]
        text = tok.apply_chat_template(msgs, tokenize=False)
        assert judge.format(p, r) == text and text.endswith(f"{r}<|im_end|>\n")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    assert got == pytest.approx(want, abs=1e-5)
    assert judge.rank(PROMPTS[0], RESPONSES) == pytest.approx(
        judge.score([PROMPTS[0]] * len(RESPONSES), RESPONSES), abs=1e-6)


def test_in_memory_model_without_pad_id_scores_batches(llama_rm):
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification(llama_rm["model"].config).eval()
    model.load_state_dict(llama_rm["model"].state_dict())
    model.config.pad_token_id = None
    one = RewardModelJudge(model, llama_rm["tok"], batch_size=1).score(PROMPTS, RESPONSES)
    many = RewardModelJudge(model, llama_rm["tok"], batch_size=8).score(PROMPTS, RESPONSES)
    assert many == pytest.approx(one, abs=1e-5)


def test_reward_model_truncates_from_the_left(llama_rm):
    judge = RewardModelJudge(str(llama_rm["path"]), max_length=6)
    ids = judge.encode("a long prompt about bread and the sea", "four")
    full = llama_rm["tok"](judge.format("a long prompt about bread and the sea", "four"),
                           add_special_tokens=False)["input_ids"]
    assert ids == full[-6:]


def test_reward_model_errors(tmp_path, llama_rm):
    with pytest.raises(StarpoError, match="judge.path: .*missing.* is neither a local"):
        RewardModelJudge(str(tmp_path / "missing"))
    with pytest.raises(StarpoError, match="input_format"):
        RewardModelJudge(str(llama_rm["path"]), input_format="alpaca")
    with pytest.raises(StarpoError, match="tokenizer"):
        RewardModelJudge(llama_rm["model"])


# --------------------------------------------------------------------------- pairwise

QUALITY = {"bad": -1.0, "ok": 0.0, "good": 1.0, "great": 2.0}


def biased(prompt, first, second):
    """P(first better), inflated toward whichever response is shown first."""
    s = 1.0 / (1.0 + math.exp(-(QUALITY[first] - QUALITY[second])))
    return 0.6 * s + 0.4


def test_pairwise_position_bias_is_averaged_out():
    calls = []

    def counted(p, a, b):
        calls.append((a, b))
        return biased(p, a, b)

    judge = PairwiseJudge(counted)
    assert biased("q", "ok", "ok") == pytest.approx(0.7)      # the raw judge is biased
    assert judge.compare("q", "ok", "ok") == pytest.approx(0.5)
    assert sorted(calls) == [("ok", "ok"), ("ok", "ok")]        # both orders were asked
    for a, b in [("good", "bad"), ("ok", "great"), ("bad", "great")]:
        pab, pba = judge.compare("q", a, b), judge.compare("q", b, a)
        assert pab + pba == pytest.approx(1.0)
        s = 1.0 / (1.0 + math.exp(-(QUALITY[a] - QUALITY[b])))
        assert pab == pytest.approx(0.6 * s + 0.2)              # bias term cancelled
    raw = PairwiseJudge(biased, both_orders=False)
    assert raw.compare("q", "ok", "ok") == pytest.approx(0.7)


def test_pairwise_rank_round_robin_orders_by_quality():
    judge = PairwiseJudge(biased)
    cands = ["ok", "great", "bad", "good"]
    scores = judge.rank("q", cands)
    assert sorted(cands, key=lambda c: -scores[cands.index(c)]) == ["great", "good", "ok", "bad"]
    assert sum(scores) == pytest.approx(len(cands) / 2)  # each game hands out one point
    assert judge.rank("q", ["ok"]) == [0.5]
    raw_scores = PairwiseJudge(biased, both_orders=False).rank("q", cands)
    assert max(range(4), key=lambda i: raw_scores[i]) == 1
    with pytest.raises(StarpoError, match="no absolute score"):
        judge.score(["q"], ["ok"])


def test_pairrm_adapter_explains_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_blender", None)  # make the import fail
    with pytest.raises(StarpoError, match="llm-blender"):
        make_judge(JudgeSpec(type="pairwise"))


def test_pairrm_adapter_with_a_fake_blender(monkeypatch):
    class FakeBlender:
        def loadranker(self, name, device=None):
            self.name, self.device = name, device

        def rank(self, inputs, candidates, return_scores=False, batch_size=8):
            scores = [[QUALITY[c] for c in cs] for cs in candidates]
            if return_scores:
                return scores
            return [[sorted(s, reverse=True).index(x) + 1 for x in s] for s in scores]

    monkeypatch.setitem(sys.modules, "llm_blender",
                        types.SimpleNamespace(Blender=FakeBlender))
    judge = make_judge(JudgeSpec(type="pairwise", path="pairrm"))
    assert judge.blender.name == "llm-blender/PairRM"
    assert judge.blender.device == str(Runtime.local().device)      # no device given
    assert make_judge(JudgeSpec(type="pairwise"), device="cpu").blender.device == "cpu"
    assert judge.rank("q", ["ok", "great", "bad"]) == [0.0, 2.0, -1.0]   # higher is better
    assert judge.compare("q", "good", "bad") == pytest.approx(1 / (1 + math.exp(-2)))


# --------------------------------------------------------------------------- gold / factory

def test_gold_judge_uses_world_on_last_user_message(monkeypatch):
    import starpo.judges.gold

    seen = {}

    def gold_rewards(prompts, responses):
        seen["args"] = (list(prompts), list(responses))
        return [float(len(r)) for r in responses]

    fake = types.ModuleType("starpo.world")
    fake.gold_rewards = gold_rewards
    monkeypatch.setattr(starpo.judges.gold, "world", fake)
    judge = make_judge(JudgeSpec(type="gold"))
    assert isinstance(judge, GoldJudge) and isinstance(judge, Judge)
    assert judge.score(PROMPTS[:3], ["a", "bb", "ccc"]) == [1.0, 2.0, 3.0]
    assert seen["args"][0] == ["how do i bake bread?", "what is two plus two?", "and the wind?"]
    assert judge.rank("q", ["xx", "x"]) == [2.0, 1.0]


def test_rank_groups_flattens_pointwise_judges():
    class Lengths(PointwiseJudge):
        calls = 0

        def score(self, prompts, responses):
            Lengths.calls += 1
            return [float(len(r)) for r in responses]

    out = rank_groups(Lengths(), ["p", "q"], [["a", "bbb"], ["cc", "d", ""]])
    assert out == [[1.0, 3.0], [2.0, 1.0, 0.0]] and Lengths.calls == 1
    assert rank_groups(PairwiseJudge(biased), ["q"], [["bad", "good"]])[0][1] > 0.5


def test_make_judge_reward_model_resolves_stage_names(llama_rm, oa_checkpoint):
    stages = {"rm": str(llama_rm["path"]), "oa": str(oa_checkpoint["path"])}
    judge = make_judge(JudgeSpec(type="reward_model", path="rm", batch_size=3),
                       resolve_path=stages.get, model_spec=ModelSpec(), device="cpu")
    assert isinstance(judge, RewardModelJudge) and isinstance(judge, Judge)
    assert judge.source == stages["rm"] and judge.batch_size == 3
    oa = make_judge(JudgeSpec(type="reward_model", path=stages["oa"],
                              input_format="openassistant"), resolve_path=lambda s: None)
    assert isinstance(oa.model, GPTNeoXRewardModel)
    with pytest.raises(StarpoError, match="judge.path"):
        make_judge(JudgeSpec(type="reward_model"))


def test_every_builtin_judge_kind_has_a_builder():
    assert set(BUILDERS) == set(BUILTIN)


def test_is_pointwise_reads_the_class(monkeypatch):
    class Scores:                       # duck-typed: a score method makes it pointwise
        def score(self, prompts, responses):
            return [0.0] * len(responses)

        def rank(self, prompt, candidates):
            return [0.0] * len(candidates)

    class Compares(PairwiseJudge):      # inherits score (an error) and pointwise = False
        pass

    class Points(PointwiseJudge):
        pass

    mod = types.ModuleType("judges_for_kinds")
    mod.Scores, mod.Compares, mod.Points = Scores, Compares, Points
    monkeypatch.setitem(sys.modules, "judges_for_kinds", mod)
    assert is_pointwise("judges_for_kinds:Scores")
    assert not is_pointwise("judges_for_kinds:Compares")
    assert is_pointwise("judges_for_kinds:Points")
    assert is_pointwise("gold") and not is_pointwise("world_labeler")


def test_reward_model_judge_loads_through_the_one_loader(llama_rm, monkeypatch):
    import starpo.judges.reward_model as rm_module
    from starpo.model import loading

    calls = []

    def spy(path, spec=None, **kwargs):
        calls.append((path, spec, kwargs))
        return loading.load_reward_model(path, spec, **kwargs)

    monkeypatch.setattr(rm_module, "load_reward_model", spy)
    spec = ModelSpec(attn_implementation="eager")
    judge = make_judge(JudgeSpec(type="reward_model", path=str(llama_rm["path"])),
                       model_spec=spec, device="cpu")
    [(path, got_spec, kwargs)] = calls
    assert path == str(llama_rm["path"]) and got_spec is spec
    assert kwargs["device"] == torch.device("cpu") and kwargs["chat"] is False
    assert judge.model.config._attn_implementation == "eager"
    assert not judge.model.training
    assert judge.tokenizer.chat_template == llama_rm["tok"].chat_template   # as saved
