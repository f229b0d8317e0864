"""Regional compilation (starpo.model.compile, ``train.compile``): compiled blocks give the
eager losses and gradients (SFT packed rows and DPO prefix-shared rows, both through
segment attention), the loop and the reference pass use it, checkpoints keep plain keys,
and where it cannot run it says so.

Inductor compiles C++ for the CPU here; the GPU path (Triton) is not exercised by these
tests. Compilation makes this module slower than most (~20-40 s cold, its kernels are
cached on disk by inductor for later runs).
"""

from __future__ import annotations

import json

import pytest
import torch

import attention_cases
from attention_cases import VOCAB, docs

from starpo.data.packing import layout_sft
from starpo.data.tokenize import TokenizedPair
from starpo.errors import TrainingError
from starpo.model import attention as A
from starpo.model import compile as C
from starpo.recipe import PreferenceSpec, TrainSpec
from starpo.runtime import Runtime
from starpo.stages.sft import SFTTask
from starpo.train.loop import run_loop
from starpo.train.preference import PreferenceTask
from starpo.train.refcache import compute_reference
from starpo.model.logprobs import TargetLogprobs

# float32, different kernels (fused C++ vs aten): sums of log-probs and gradients agree
# to these (measured: 4e-8 relative on losses, 6e-7 on gradients)
RTOL, ATOL = 1e-5, 1e-5


def llama(seed: int = 0):
    import transformers as T
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                        max_position_embeddings=512, tie_word_embeddings=True)
    return T.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").float()


def pairs(n: int = 6, seed: int = 1) -> list[TokenizedPair]:
    return [TokenizedPair(d["prompt_ids"], d["chosen_ids"], d["chosen_labels"],
                          d["rejected_ids"], d["rejected_labels"])
            for d in attention_cases.pairs(n, seed)]


def sft_task():
    lay = layout_sft(docs(30), mode="pack", loss_masking=True, max_length=40)
    return SFTTask(lay, batch_size=3, pad_id=0, seed=0, flat=True)   # one row per batch


def dpo_task():
    spec = PreferenceSpec(loss="dpo", beta=0.1)
    ps = pairs()
    g = torch.Generator().manual_seed(0)
    return PreferenceTask(ps, spec, batch_size=3, pad_id=0, seed=0, one_row=True,
                          ref_chosen=-20 * torch.rand(len(ps), generator=g),
                          ref_rejected=-20 * torch.rand(len(ps), generator=g))


def loss_and_grads(model, task, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = task.loss(TargetLogprobs(model), batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=RTOL, atol=ATOL)
    assert a[1].keys() == b[1].keys() and a[1]
    for k in a[1]:
        scale = float(a[1][k].abs().max())
        torch.testing.assert_close(a[1][k], b[1][k], rtol=RTOL, atol=ATOL * max(scale, 1e-3),
                                   msg=k)


@pytest.fixture(scope="module")
def compared(one_thread, tmp_path_factory):
    """Eager and compiled losses/gradients of three SFT rows of different lengths and two
    DPO prefix-shared rows, compiled in one block; a checkpoint saved inside it."""
    model = llama().train()
    sft, dpo = sft_task(), dpo_task()
    sft_b, dpo_b = sft.microbatches(0)[:3], dpo.microbatches(0)[:2]
    assert all(b.input_ids.shape[0] == 1 for b in sft_b + dpo_b)
    assert len({b.input_ids.shape[1] for b in sft_b}) > 1           # lengths vary
    assert all(b.meta.get("implicit_prefix") for b in dpo_b)         # no dense mask
    eager = [loss_and_grads(model, sft, b) for b in sft_b] + \
        [loss_and_grads(model, dpo, b) for b in dpo_b]
    calls = {"n": 0}
    real = A.segment_sdpa

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)
    A.segment_sdpa = counted
    save = tmp_path_factory.mktemp("compiled") / "model"
    try:
        with C.compiled_blocks(model, True) as found:
            compiled = [loss_and_grads(model, sft, b) for b in sft_b] + \
                [loss_and_grads(model, dpo, b) for b in dpo_b]
            during = type(model.model.layers[0]._compiled_call_impl).__name__
            kernel_during = _kernel()
            model.save_pretrained(save)
    finally:
        A.segment_sdpa = real
    return dict(model=model, eager=eager, compiled=compiled, found=found, calls=calls,
                during=during, stats=dict(C.LAST), save=save, kernel_during=kernel_during,
                kernel_after=_kernel())


def _kernel():
    from transformers import AttentionInterface
    return AttentionInterface._global_mapping[A.NAME]


def test_compiled_sft_packed_rows_equal_eager(compared):
    for a, b in zip(compared["eager"][:3], compared["compiled"][:3]):
        assert_same(a, b)


def test_compiled_dpo_prefix_shared_rows_equal_eager(compared):
    for a, b in zip(compared["eager"][3:], compared["compiled"][3:]):
        assert_same(a, b)


def test_segment_attention_stays_eager_and_lengths_do_not_recompile(compared):
    # 2 layers x 5 compiled forwards: segment attention ran (eagerly) in every one
    assert compared["calls"]["n"] == 2 * 5
    assert [type(b).__name__ for b in compared["found"]] == ["LlamaDecoderLayer"] * 2
    st = compared["stats"]
    assert st["graph_breaks"] > 0          # the graph stops at the attention function
    # one set of graphs for the block, shared by both layers and by every row length
    # (dynamic shapes): 3 SFT lengths and 2 DPO rows compiled once, not once per row
    assert 0 < st["graphs"] <= 6, st


def test_blocks_are_eager_again_after_the_block(compared):
    assert compared["during"] != "NoneType"
    assert all(b._compiled_call_impl is None for b in compared["found"])
    # and segment attention is the plain function again: sampling and evaluation after a
    # compiled stage do not pass through dynamo's disable wrapper
    assert getattr(compared["kernel_during"], "_starpo_eager", False)
    assert compared["kernel_after"] is A._dispatch


def test_a_checkpoint_saved_while_compiled_loads_with_from_pretrained(compared):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    keys = set(load_file(str(compared["save"] / "model.safetensors")))
    assert keys and not any("_orig_mod" in k for k in keys)
    loaded = AutoModelForCausalLM.from_pretrained(compared["save"])
    for k, v in compared["model"].state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_loop_and_reference_pass_with_compile_match_eager(one_thread, tmp_path):
    """The loop's hook (``train.compile``) and the reference pass's: same losses, weights
    and reference log-probs as eager; the loop's checkpoints keep plain keys."""
    from safetensors.torch import load_file
    spec = dict(lr=1e-3, max_steps=3, warmup_ratio=0, log_every=1, save_every=2)
    out = {}
    for comp in (False, True):
        model = llama()
        run_loop(model, sft_task(), TrainSpec(batch_size=3, compile=comp, **spec),
                 tmp_path / str(comp), seed=0, progress=False)
        losses = [json.loads(line)["loss"]
                  for line in (tmp_path / str(comp) / "metrics.jsonl").open()]
        ref = compute_reference(model, pairs(), Runtime.cpu(), batch_size=3, progress=False,
                                compile=comp)
        out[comp] = (losses, model.state_dict(), ref)
        assert all(b._compiled_call_impl is None for b in C.blocks(model))
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)
    for k, v in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], v, rtol=1e-4, atol=1e-6, msg=k)
    for a, b in zip(out[False][2], out[True][2]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    keys = load_file(str(tmp_path / "True" / "checkpoints" / "step_0000002" /
                         "model.safetensors"))
    assert not any("_orig_mod" in k for k in keys)


def test_no_cpp_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    with pytest.raises(TrainingError, match="C\\+\\+ compiler.*train.compile: false"):
        with C.compiled_blocks(llama(), True):
            pass


def test_steps_aside_with_a_reason_where_it_does_not_apply():
    said = []
    with C.compiled_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), True,
                           log=said.append) as found:
        assert found == []
    with C.compiled_blocks(llama(), True, log=said.append, sharded=True) as found:
        assert found == []
    assert len(said) == 2 and "no repeated blocks" in said[0] and "FSDP" in said[1]
    with C.compiled_blocks(llama(), False, log=said.append) as found:
        assert found == [] and len(said) == 2
    assert TrainSpec().compile is False
