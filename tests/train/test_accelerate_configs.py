"""The shipped accelerate configs load as accelerate reads them and say what the README
promises: DDP; FSDP2 full shard with the model's decoder layer as the wrap unit;
ZeRO-3 with a 16-bit consolidated save. (accelerate runs FSDP and DeepSpeed on GPUs only,
so their training path is exercised by scripts/gpu_check.sh, not here; the DDP config
runs two CPU processes in tests/run/test_multiprocess.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero3"])
def test_config_loads_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file
    cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert cfg.num_machines == 1 and cfg.mixed_precision == "bf16"
    if name == "fsdp":
        f = cfg.fsdp_config
        assert str(cfg.distributed_type).endswith("FSDP")
        assert f["fsdp_version"] == 2 and f["fsdp_reshard_after_forward"] is True
        assert f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "fsdp_transformer_layer_cls_to_wrap" not in f   # the model's own classes
    if name == "deepspeed_zero3":
        d = cfg.deepspeed_config
        assert d["zero_stage"] == 3 and d["zero3_save_16bit_model"] is True


def test_wrappers_expose_the_decoder_layer_classes():
    """FSDP's transformer auto wrap reads ``_no_split_modules`` from the module the loop
    prepares (our wrapper), so the wrapper must pass the model's own through."""
    import transformers as T
    from starpo.stages.reward import SequenceScores
    from starpo.model.logprobs import TargetLogprobs
    cfg = T.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, intermediate_size=32)
    lm = T.LlamaForCausalLM(cfg)
    assert set(TargetLogprobs(lm)._no_split_modules) == {"LlamaDecoderLayer"}
    rm = T.LlamaForSequenceClassification(cfg)
    assert set(SequenceScores(rm)._no_split_modules) == {"LlamaDecoderLayer"}
