"""With the reference cache, no reference model stays resident: the model that
``reference_logps`` loads on a miss is gone once it returns (nothing keeps a reference),
and on a hit it is never loaded — so the policy trains with no second model in memory."""

from __future__ import annotations

import gc
import weakref

import torch

from conftest import tiny_llama
from starpo.runtime import Runtime
from starpo.train.refcache import reference_logps


class _Tok:
    """Just what the cache key reads from a tokenizer."""
    chat_template = "t"

    def get_vocab(self):
        return {"a": 0}


def _pairs():
    return [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "chosen_labels": [4, 5],
             "rejected_ids": [6], "rejected_labels": [6]} for _ in range(3)]


def test_reference_model_is_released_after_the_pass_and_never_loaded_on_a_hit(tmp_path):
    refs, loads = [], []

    def load():
        m = tiny_llama(32)
        refs.append(weakref.ref(m))
        loads.append(1)
        return m

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    (ref_dir / "config.json").write_text("{}")
    kw = dict(cache_dir=tmp_path / "cache", load_model=load, runtime=Runtime.cpu(),
              progress=False, log=lambda m: None)
    first = reference_logps(str(ref_dir), _Tok(), _pairs(), **kw)
    gc.collect()
    assert not first.hit and len(loads) == 1
    assert refs[0]() is None                      # not resident any more
    again = reference_logps(str(ref_dir), _Tok(), _pairs(), **kw)
    assert again.hit and len(loads) == 1          # a hit loads no model at all
    torch.testing.assert_close(again.chosen, first.chosen)
