"""GGUF checkpoints as a model source: where they are recognised, the one-line errors
(missing file, missing extra, an architecture transformers cannot read), and the quantizer
marks cleared so a loaded model saves as a plain checkpoint. Reading the real SmolLM2 GGUF
end to end is in tests/real and tests/run/test_fetch.py."""

from __future__ import annotations

import sys

import pytest
import torch

from starpo.errors import StarpoError
from starpo.model import loading
from starpo.recipe import ModelSpec


def _write_gguf(path, arch="foo"):
    gguf = pytest.importorskip("gguf")
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_where_a_gguf_checkpoint_is_recognised(tmp_path):
    f = tmp_path / "m.Q4.gguf"
    f.write_bytes(b"")
    assert loading.gguf_location(str(f)) == (str(tmp_path.resolve()), "m.Q4.gguf")
    spec = ModelSpec(name_or_path=str(tmp_path), gguf_file="m.Q4.gguf")
    assert loading.gguf_location(str(tmp_path), spec) == (str(tmp_path.resolve()), "m.Q4.gguf")
    # a saved checkpoint beside it is never read as GGUF; nor a directory without gguf_file
    (tmp_path / "config.json").write_text("{}")
    assert loading.gguf_location(str(tmp_path), spec) is None
    assert loading.gguf_location(str(tmp_path / "elsewhere")) is None
    assert loading.gguf_location("HuggingFaceTB/SmolLM2-135M-Instruct") is None


def test_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(StarpoError, match=r"GGUF file .*nope\.gguf' not found"):
        loading.load_tokenizer(str(tmp_path / "nope.gguf"))
    spec = ModelSpec(name_or_path=str(tmp_path), gguf_file="x.gguf")
    with pytest.raises(StarpoError, match=r"has no file 'x.gguf' \(model.gguf_file\)"):
        loading.load_model(str(tmp_path), spec, tokenizer=object())


def test_without_the_gguf_package_the_error_names_the_extra(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "gguf", None)       # import gguf -> ImportError
    with pytest.raises(StarpoError) as e:
        loading.load_tokenizer(str(f))
    assert "pip install 'starpo[gguf]'" in str(e.value) and "\n" not in str(e.value)


def test_an_architecture_transformers_cannot_read_is_named(tmp_path):
    f = _write_gguf(tmp_path / "foo.gguf", arch="foo")
    for load in (lambda: loading.load_tokenizer(str(f)),
                 lambda: loading.load_model(str(f), tokenizer=object())):
        with pytest.raises(StarpoError) as e:
            load()
        msg = str(e.value)
        assert "architecture foo" in msg and "llama" in msg and "\n" not in msg
        assert "general," not in msg and "tokenizer," not in msg


def test_dequantized_clears_the_marks_so_save_pretrained_works(tmp_path):
    """What transformers leaves on a model read from GGUF (a quantizer object and a
    quantization_config), put on a tiny model by hand: save refuses it, then saves."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    from conftest import tiny_llama
    m = tiny_llama(32)
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    q = GgufHfQuantizer.__new__(GgufHfQuantizer)
    q.quantization_config = GgufConfig(gguf_file="m.gguf")
    m.hf_quantizer = q
    m.config.quantization_config = q.quantization_config
    with pytest.raises(ValueError, match="quantized with gguf"):
        m.save_pretrained(str(tmp_path / "refused"))
    loading.dequantized(m)
    loading.save_pretrained(m, None, tmp_path / "ok")
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ok"))
    assert getattr(again.config, "quantization_config", None) is None
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(again(x).logits, m(x).logits)
