"""dtype "auto": a model that trains keeps fp32 master weights (the loop's bf16 autocast
does the compute on a GPU); a model that only infers loads in the compute dtype."""

from __future__ import annotations

import torch

from starpo.model import loading
from starpo.runtime import Runtime


def test_auto_dtype_keeps_fp32_master_weights_for_training(base, monkeypatch):
    # stand in for a bf16-capable GPU: what "auto" resolves to for inference there
    monkeypatch.setattr(Runtime, "dtype", lambda self, name: torch.bfloat16)
    trained = loading.load_model(base["path"], for_training=True)
    inferred = loading.load_model(base["path"], for_training=False)
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    assert {p.dtype for p in inferred.parameters()} == {torch.bfloat16}
