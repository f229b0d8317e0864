"""The HF backend's static-cache decoders: a KV cache allocated once, sampling on the
device, and on CUDA the one-token decode step replayed as a CUDA graph.

Why. transformers' ``generate`` grows its KV cache by concatenation, runs its logits
processors, stopping criteria and our per-row hashing in Python, and copies and
synchronises with the device at every token. The eval of the GPU check (0.4B Llama shape,
bf16, 121 prompts × 128 new tokens, ``batch_size`` 32) sampled ~940 tokens/s on an H200:
~34 ms per decode step of 32 rows, whose arithmetic is well under a millisecond there. It
was not profiled; hundreds of kernel launches per step plus that host work are the likely
cost. On a CPU the model's own kernels dominate, and ``generate`` stays the default there
(its results are the reference).

What :class:`StaticDecoder` does instead, for one batch of ``rows`` left-padded prompts:

* transformers' ``StaticCache`` of ``cache_len`` columns (the longest prompt of the whole
  ``generate`` call plus ``max_new_tokens``, rounded up to 16), allocated at the first
  batch and reused
  (``reset``) by every later batch of the same size;
* the uniform numbers of every (row, step) come from :func:`~starpo.generate.draws.row_uniforms`
  up front, one ``[rows, max_new_tokens]`` float64 table copied to the device once;
* a decode step reads and writes only fixed device buffers — the token each row feeds,
  its position, the padding mask over cache columns, the step counter, the ``finished``
  flags and the output ``[rows, max_new_tokens]`` — so it has no host work left: on CUDA
  it is captured once as a CUDA graph (``torch.cuda.CUDAGraph``) and each token is one
  graph launch; elsewhere, or when capture is not possible, the same step runs eagerly;
* the host asks whether every row has ended only every ``check_every`` steps (every step
  off the GPU); steps run after that produce padding that is cut off.

Semantics: those of :class:`~starpo.generate.sampling.HFBackend` with ``generate``. The
prompt is prefilled in one forward (left padding, position ids ``cumsum(mask) - 1``, the
logits of the last column only), which gives token 0; token ``s`` of a row is
``sample_tokens(float32 logits, row_uniform(key, s))``; a row that has produced a stop id
feeds padding from then on. So the tokens equal ``generate``'s up to float round-off of
the logits — the static cache attends over ``cache_len`` columns with the unused ones
masked, where ``generate`` attends over the grown width — and, as there, do not depend on
the batch size or on which rows share a batch.

What the tests prove. ``tests/generate/test_static.py`` (CPU) runs this module's code with
the step eager: the tokens equal ``generate``'s for greedy and seeded sampling, with top-p,
stop tokens, padding, n samples per prompt, batch sizes that leave a tail batch, float32
and float64 models. Two traces stand in for the capture: the decode step recorded once
into a fixed sequence of ops (``make_fx``, every tensor held by reference and every host
value baked in, as stream capture does) and replayed for every token gives the eager
step's tokens, so the step keeps no per-token state on the host; and a trace over fake
tensors, which fails on any host read of a device value (what makes a capture fail), goes
through our step and transformers' forward and mask code. They cannot prove that capture
succeeds on a given GPU stack (driver, torch, transformers versions), nor that the replay
equals the eager step there: the ``gpu``-marked tests in the same file check that (graph
vs eager static on CUDA in bf16, and under bf16 autocast over fp32 weights: the same
tokens; static vs ``generate``: agreement, printed with the throughput of each). When
capture fails the decoder logs one line and runs the step eagerly.

Which decoder runs (``generation.decoder``, :func:`choose_decoder`): ``auto`` is ``graph``
on CUDA and ``generate`` elsewhere. A model whose class does not declare static-cache
support (``_can_compile_fullgraph``), or whose parameters are sharded (FSDP, ZeRO-3: their
hooks sit on the wrapper this loop bypasses), gets ``generate`` under ``auto`` and one
clear error under an explicit ``static``/``graph``. Graph capture needs CUDA, sdpa or eager attention
(flash-attention unpads with data-dependent shapes) and no sliding-window layers (their
cache keeps a host-side counter); otherwise the static loop runs eagerly.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from starpo.errors import StarpoError
from starpo.generate.draws import row_uniforms, sample_tokens
from starpo.model.logprobs import unwrap_model

logger = logging.getLogger(__name__)

# most rows "auto" puts in one batch: past this a step is still cheap, but rows that ended
# early wait for the slowest one of a bigger batch
MAX_AUTO_ROWS = 256
# how often a GPU decoder asks whether every row has ended (each ask is a synchronisation)
GPU_CHECK_EVERY = 4
_GRAPH_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class DecoderChoice:
    kind: str        # "generate", "static" or "graph"
    why: str         # for the log: why this one


def _text_config(model):
    cfg = unwrap_model(model).config
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if callable(get) else cfg


def static_unsupported(model) -> str | None:
    """Why ``model`` cannot decode with a static KV cache, or None when it can."""
    core = unwrap_model(model)
    name = type(core).__name__
    if getattr(core.config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model"
    if not (getattr(core, "_can_compile_fullgraph", False)
            or getattr(core, "_supports_static_cache", False)):
        return f"{name} does not declare static KV cache support"
    # sampling loads a plain model; a sharded one gathers its weights in hooks around the
    # wrapper's forward, which this loop (calling the inner model) would bypass
    if any(hasattr(p, "ds_id") or type(p).__name__ in ("DTensor", "FlatParameter")
           for p in model.parameters()):
        return "its parameters are sharded (FSDP / DeepSpeed ZeRO-3)"
    return None


def graph_unsupported(model, device: torch.device) -> str | None:
    """Why the decode step of ``model`` cannot be captured as a CUDA graph, or None."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    impl = str(getattr(_text_config(model), "_attn_implementation", None)
               or getattr(unwrap_model(model).config, "_attn_implementation", ""))
    if impl not in _GRAPH_ATTENTION:
        return f"the model uses {impl} attention (a graph is captured for sdpa or eager only)"
    from transformers import StaticCache
    probe = StaticCache(config=unwrap_model(model).config, max_cache_len=8)  # allocates nothing
    if any(getattr(probe, "is_sliding", [])):
        return "the model has sliding-window layers"
    return None


def choose_decoder(requested: str, model, device: torch.device) -> DecoderChoice:
    """The decoder that ``generation.decoder: requested`` runs for ``model`` on ``device``."""
    if requested == "generate" or (requested == "auto" and device.type != "cuda"):
        return DecoderChoice("generate", "transformers generate" if requested == "generate"
                             else "transformers generate (the default off CUDA)")
    why = static_unsupported(model)
    if why is not None:
        if requested == "auto":
            return DecoderChoice("generate", f"transformers generate ({why})")
        raise StarpoError(f"generation.decoder {requested}: {why}; "
                          "use generation.decoder: generate")
    if requested == "static":
        return DecoderChoice("static", "static KV cache, eager decode step")
    why = graph_unsupported(model, device)
    if why is not None:
        return DecoderChoice("static", f"static KV cache, eager decode step ({why})")
    return DecoderChoice("graph", "static KV cache, decode step as a CUDA graph")


def auto_rows(model, *, rows: int, prompt_len: int, cache_len: int,
              device: torch.device, fallback: int) -> int:
    """Rows per static batch for ``decode_batch_size: auto``.

    Off CUDA: ``fallback`` (the spec's ``batch_size``). On CUDA: half of the free memory
    (free on the device plus what torch holds unused) over an estimate of one row's
    share — its KV cache (``2 · layers · kv heads · head dim · cache_len`` elements), its
    prefill activations and its sampling temporaries (a dozen vocabulary-sized float64
    rows) — at most :data:`MAX_AUTO_ROWS` and never more than there are rows. An
    estimate, not a measurement: if a batch still runs out of memory the backend halves
    the rows and retries. The CUDA branch runs only on a GPU (the ``gpu`` tests check it
    fits all rows of a small model); the CPU tests cover the retry with a simulated error.
    """
    if device.type != "cuda":
        return max(1, min(fallback, rows))
    cfg = _text_config(model)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    head_dim = int(getattr(cfg, "head_dim", None) or (hidden // heads))
    layers = int(getattr(cfg, "num_hidden_layers", 1) or 1)
    inter = int(getattr(cfg, "intermediate_size", None) or 4 * hidden)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    if torch.is_autocast_enabled(device.type):
        elem = torch.finfo(torch.get_autocast_dtype(device.type)).bits // 8
    else:
        elem = next(unwrap_model(model).parameters()).element_size()
    kv = 2 * layers * kv_heads * head_dim * cache_len * elem
    prefill = prompt_len * (6 * hidden + 3 * inter) * 4 + heads * prompt_len * cache_len * 4
    per_row = kv + prefill + 96 * vocab
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, min(MAX_AUTO_ROWS, rows, int(0.5 * free // max(per_row, 1))))


def _forward_parameters(core) -> set[str]:
    """The named parameters of the model's forward: of the nearest class in its MRO that
    names its cache argument (a subclass may override ``forward(self, input_ids, **kw)``)."""
    for cls in type(core).__mro__:
        fn = cls.__dict__.get("forward")
        if fn is None:
            continue
        names = set(inspect.signature(fn).parameters)
        if names & {"cache", "past_key_values"}:
            return names
    return set(inspect.signature(core.forward).parameters)


@contextlib.contextmanager
def _uncached_autocast(device_type: str):
    """Autocast as the caller has it, without its weight-cast cache: a CUDA graph must not
    read cast weights that the cache frees when the caller's autocast block ends."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                            cache_enabled=False):
            yield
    else:
        yield


class StaticDecoder:
    """Decodes batches of exactly ``rows`` prompts of at most ``cache_len - max_new_tokens``
    tokens each; see the module docstring.

    All per-step state lives in fixed device tensors (the attributes below), which is what
    lets :meth:`_decode_step` be captured once and replayed:

    ``tokens`` [rows, 1] the token each row feeds next · ``positions`` [rows, 1] its
    position id · ``mask`` [rows, cache_len] 1 where a cache column holds a real token (or
    will hold a generated one) · ``uniforms`` [rows, T] float64 · ``step`` [1] the index of
    the token being drawn · ``finished`` [rows] bool · ``out`` [rows, T] the drawn tokens,
    ``pad`` once a row has ended · ``cache_position`` [1] the cache column being written
    (only for transformers versions whose forward takes ``cache_position``).
    """

    def __init__(self, model, *, rows: int, cache_len: int, max_new_tokens: int,
                 stops: Sequence[int], pad: int, temperature: float, top_p: float,
                 graph: bool, check_every: int = 1):
        from transformers import StaticCache

        self.core = unwrap_model(model)
        self.device = next(self.core.parameters()).device
        self.rows, self.cache_len, self.max_new_tokens = rows, cache_len, max_new_tokens
        self.temperature, self.top_p, self.pad = temperature, top_p, pad
        self.check_every = max(1, check_every)
        self.graph_wanted = graph
        self.graph_failed: str | None = None
        self._graph = None
        self.cache = StaticCache(config=self.core.config, max_cache_len=cache_len)
        params = _forward_parameters(self.core)
        # transformers 5.2x names the cache argument `cache` (past_key_values before) and
        # tracks cache columns itself; earlier versions take cache_position
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self._cache_position = "cache_position" in params

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        T = max_new_tokens
        self.tokens, self.positions = zeros(rows, 1), zeros(rows, 1)
        self.mask, self.cache_position = zeros(rows, cache_len), zeros(1)
        self.uniforms, self.step = zeros(rows, T, dtype=torch.float64), zeros(1)
        self.finished, self.out = zeros(rows, dtype=torch.bool), zeros(rows, T)
        self.stop_ids = torch.tensor(sorted(set(stops)), dtype=torch.long, device=self.device)
        self.pad_id = torch.tensor(pad, dtype=torch.long, device=self.device)

    @property
    def uses_graph(self) -> bool:
        return self._graph is not None

    # ------------------------------------------------------------------ the step
    def _forward(self, input_ids, position_ids, cache_position) -> torch.Tensor:
        """[rows, V] float32 logits of each row's last column (as generate takes them)."""
        kw = {self._cache_arg: self.cache, "attention_mask": self.mask,
              "position_ids": position_ids, "use_cache": True}
        if self._logits_to_keep:
            kw["logits_to_keep"] = 1
        if self._cache_position:
            kw["cache_position"] = cache_position
        return self.core(input_ids=input_ids, **kw).logits[:, -1].float()

    def _choose(self, logits: torch.Tensor) -> None:
        """Draw token ``step`` of every row from ``logits`` [rows, V] and advance."""
        u = self.uniforms.index_select(1, self.step).squeeze(1)
        nxt = sample_tokens(logits, u, temperature=self.temperature, top_p=self.top_p)
        nxt = torch.where(self.finished, self.pad_id, nxt)
        self.out.scatter_(1, self.step.expand(self.rows).unsqueeze(1), nxt.unsqueeze(1))
        self.finished |= torch.isin(nxt, self.stop_ids)
        self.tokens.copy_(nxt.unsqueeze(1))
        self.step += 1

    def _decode_step(self) -> None:
        """Feed every row's last token and draw the next one: fixed buffers in and out."""
        logits = self._forward(self.tokens, self.positions, self.cache_position)
        self.positions += 1
        self.cache_position += 1
        self._choose(logits)

    # ------------------------------------------------------------------ a batch
    def _prefill(self, prompts: Sequence[Sequence[int]], uniforms: torch.Tensor | None):
        """Reset the state, run the prompts through the model, draw token 0."""
        width = max(len(p) for p in prompts)
        ids = torch.full((self.rows, width), self.pad, dtype=torch.long)
        att = torch.zeros((self.rows, width), dtype=torch.long)
        for r, p in enumerate(prompts):          # left padding, as generate's rows
            ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            att[r, width - len(p):] = 1
        # generate's position ids: the count of real tokens before each one
        pos = (att.cumsum(-1) - 1).masked_fill(att == 0, 0)
        self.cache.reset()
        self.mask.zero_()
        self.mask[:, :width] = att.to(self.device)
        self.mask[:, width:width + self.max_new_tokens] = 1
        if uniforms is None:
            self.uniforms.zero_()
        else:
            self.uniforms.copy_(uniforms)
        self.step.zero_()
        self.finished.zero_()
        self.out.fill_(self.pad)
        self.cache_position.fill_(width)
        pos = pos.to(self.device)
        logits = self._forward(ids.to(self.device), pos,
                               torch.arange(width, device=self.device))
        self.positions.copy_(pos[:, -1:] + 1)
        self._choose(logits)

    def _capture(self, prompts, uniforms) -> None:
        """Capture :meth:`_decode_step` as a CUDA graph (after a prefill that initialises
        the cache and two eager warm-up steps on a side stream); on failure, log why and
        leave the decoder eager. The state it leaves is overwritten by the next prefill.

        CUDA only: the CPU tests reach it only through the two traces of the module
        docstring (what a capture freezes, what makes one fail); that it captures and
        replays to the eager tokens is checked by the ``gpu`` tests."""
        try:
            with torch.cuda.device(self.device), _uncached_autocast("cuda"):
                self._prefill(prompts, uniforms)
                side = torch.cuda.Stream(device=self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    # never past the last token: step T would index out of the buffers
                    # (a device-side assert, fatal to the process)
                    for _ in range(min(2, self.max_new_tokens - 1)):
                        self._decode_step()
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._decode_step()
            torch.cuda.synchronize(self.device)
            self._graph = graph
        except torch.cuda.OutOfMemoryError:
            raise           # not the graph's fault: the caller retries with fewer rows
        except Exception as err:  # any capture failure: run eagerly instead
            self.graph_failed = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            logger.warning("decoding: the CUDA graph capture failed (%s); the decode step "
                           "runs eagerly (set generation.decoder: static to skip the "
                           "attempt)", self.graph_failed)
            self._graph = None
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def run(self, prompts: Sequence[Sequence[int]],
            uniforms: torch.Tensor | None) -> list[list[int]]:
        """The new tokens of each prompt: ``max_new_tokens`` of them, or fewer when every
        row ended sooner (stop ids included, ``pad`` after a row's stop).

        prompts: ``rows`` token id lists; uniforms: [rows, max_new_tokens] float64 from
        :func:`~starpo.generate.draws.row_uniforms` (None for greedy decoding).
        """
        if len(prompts) != self.rows:
            raise ValueError(f"StaticDecoder of {self.rows} rows given {len(prompts)} prompts")
        if max(len(p) for p in prompts) + self.max_new_tokens > self.cache_len:
            raise ValueError("a prompt is longer than the cache was sized for")
        if self.graph_wanted and self._graph is None and self.graph_failed is None \
                and self.max_new_tokens > 1:
            self._capture(prompts, uniforms)
        ctx = contextlib.ExitStack()
        if self._graph is not None:
            ctx.enter_context(torch.cuda.device(self.device))
            ctx.enter_context(_uncached_autocast("cuda"))
        with ctx:
            self._prefill(prompts, uniforms)
            s = 1
            while s < self.max_new_tokens:
                if s % self.check_every == 0 and bool(self.finished.all()):
                    break
                if self._graph is not None:
                    self._graph.replay()
                else:
                    self._decode_step()
                s += 1
        return self.out[:, :s].tolist()


def cache_length(prompt_lengths: Sequence[int], max_new_tokens: int) -> int:
    """Columns of the static cache for a ``generate`` call: its longest prompt plus the new
    tokens, rounded up to a multiple of 16 (sdpa's memory-efficient kernel pads a mask whose
    last dimension is not, at every call)."""
    need = max(prompt_lengths) + max_new_tokens
    return -(-need // 16) * 16


class BatchDecoders:
    """``run(ids, keys)`` for the batches of one ``generate`` call, whatever their size: one
    :class:`StaticDecoder` per batch size in turn (a call has at most two, its full batches
    and the tail), each batch's uniform numbers taken from its rows' stream keys.

    ids: the rows' prompt token ids; keys: their :func:`~starpo.generate.draws.row_key`
    (None for greedy decoding). Returns the new tokens of each row.
    """

    def __init__(self, model, *, cache_len: int, spec, stops: Sequence[int], pad: int,
                 graph: bool, check_every: int):
        self.model, self.cache_len, self.spec = model, cache_len, spec
        self.stops, self.pad, self.check_every = list(stops), pad, check_every
        self.graph = graph
        self.graph_failed: str | None = None
        self.replayed = False
        self._dec: StaticDecoder | None = None

    def __call__(self, ids: Sequence[Sequence[int]], keys: Sequence[int] | None):
        if self._dec is None or self._dec.rows != len(ids):
            self.release()
            self._dec = StaticDecoder(
                self.model, rows=len(ids), cache_len=self.cache_len,
                max_new_tokens=self.spec.max_new_tokens, stops=self.stops, pad=self.pad,
                temperature=self.spec.temperature, top_p=self.spec.top_p,
                # one failed capture is enough to know: later sizes go eager at once
                graph=self.graph and self.graph_failed is None,
                check_every=self.check_every)
        uniforms = None if keys is None else row_uniforms(keys, self.spec.max_new_tokens)
        out = self._dec.run(ids, uniforms)
        self.graph_failed = self.graph_failed or self._dec.graph_failed
        self.replayed = self.replayed or self._dec.uses_graph
        return out

    def graph_status(self) -> str:
        if not self.graph:
            return "not used"
        if self.graph_failed:
            return f"capture failed ({self.graph_failed})"
        return "replayed" if self.replayed else "not reached"

    def release(self) -> None:
        """Drop the current decoder (its cache, buffers and graph) and give the memory back."""
        if self._dec is not None:
            on_gpu = self._dec.device.type == "cuda"
            self._dec = None
            if on_gpu:
                from starpo.runtime import release_memory
                release_memory()
