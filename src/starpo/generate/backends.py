"""The sampling backend that a :class:`~starpo.recipe.GenerationSpec` names."""

from __future__ import annotations

from starpo.errors import StarpoError
from starpo.generate.sampling import Backend, HFBackend
from starpo.generate.vllm import VLLMBackend


def make_backend(spec, *, model=None, tokenizer=None, path=None, runtime=None) -> Backend:
    """``hf`` samples ``model`` (in memory); ``vllm`` loads the checkpoint directory
    ``path`` into vLLM (see :mod:`starpo.generate.vllm`)."""
    if spec.backend == "vllm":
        if path is None:
            raise StarpoError("generation.backend vllm samples a saved checkpoint, and this "
                              "model has none; use generation.backend: hf")
        return VLLMBackend(str(path), tokenizer, runtime=runtime)
    if model is None or tokenizer is None:
        raise StarpoError("generation.backend hf needs the model and its tokenizer")
    return HFBackend(model, tokenizer)
