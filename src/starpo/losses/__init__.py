"""Preference losses: pure functions (:mod:`starpo.losses.preference`) and the one registry
that stages, recipes and sweeps read.

A loss is called on per-pair tensors ``[P]``::

    fn(pc, pr, [rc, rr,] [nc, nr,] *, beta, [gamma,] [label_smoothing])
        -> (losses, chosen_rewards, rejected_rewards)

``rc, rr`` (reference log-probs) are passed when the loss declares ``needs_reference``,
``nc, nr`` (response token counts) when it declares ``needs_counts``; ``gamma`` and
``label_smoothing`` only when the function has a parameter of that name. A recipe names a
built-in loss (``dpo``, ``ln_dpo``, ``simpo``, ``ipo``, ``ipo_per_token``) or an importable
``module:function`` decorated with :func:`declare`::

    from starpo.losses import declare

    @declare(needs_reference=True)
    def my_loss(pc, pr, rc, rr, *, beta):
        h = beta * ((pc - rc) - (pr - rr))
        return -torch.nn.functional.logsigmoid(h), beta * (pc - rc), beta * (pr - rr)

This module imports no torch: the recipe validates loss names through it.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

from starpo import extensions
from starpo.errors import RecipeError, did_you_mean


@dataclass(frozen=True)
class LossDef:
    """A preference loss and what it reads."""

    name: str
    fn: Callable
    needs_reference: bool
    needs_counts: bool

    @cached_property
    def params(self) -> frozenset[str]:
        # read once: __call__ asks on every micro-batch
        return frozenset(inspect.signature(self.fn).parameters)

    @property
    def takes_gamma(self) -> bool:
        return "gamma" in self.params

    @property
    def takes_label_smoothing(self) -> bool:
        return "label_smoothing" in self.params

    def __call__(self, pc, pr, rc=None, rr=None, nc=None, nr=None, *, beta: float,
                 gamma: float = 0.0, label_smoothing: float = 0.0):
        """Call the loss with what it declared; anything else given is ignored, so a
        stage can always pass everything it has."""
        args = [pc, pr]
        if self.needs_reference:
            if rc is None or rr is None:
                raise ValueError(f"loss {self.name!r} needs reference log-probs (rc, rr)")
            args += [rc, rr]
        if self.needs_counts:
            if nc is None or nr is None:
                raise ValueError(f"loss {self.name!r} needs response token counts (nc, nr)")
            args += [nc, nr]
        kw: dict = {"beta": beta}
        if self.takes_gamma:
            kw["gamma"] = gamma
        if self.takes_label_smoothing:
            kw["label_smoothing"] = label_smoothing
        elif label_smoothing:
            raise ValueError(f"loss {self.name!r} does not support label_smoothing "
                             f"(got {label_smoothing}); set it to 0")
        return self.fn(*args, **kw)


def declare(*, needs_reference: bool, needs_counts: bool = False) -> Callable:
    """Decorator for a user loss named in a recipe as ``module:function``."""
    def mark(fn: Callable) -> Callable:
        fn.needs_reference = needs_reference
        fn.needs_counts = needs_counts
        return fn
    return mark


def _builtin(name: str, attr: str, *, needs_reference: bool, needs_counts: bool) -> LossDef:
    preference = importlib.import_module("starpo.losses.preference")
    return LossDef(name, getattr(preference, attr), needs_reference, needs_counts)


# name -> (function in starpo.losses.preference, needs_reference, needs_counts). ``ipo`` is
# the paper's summed form; ``ipo_per_token`` TRL's per-token-averaged one.
BUILTIN = {
    "dpo": ("dpo", True, False),
    "ln_dpo": ("ln_dpo", True, True),
    "simpo": ("simpo", False, True),
    "ipo": ("ipo", True, False),
    "ipo_per_token": ("ipo", True, True),
}
LOSSES = tuple(BUILTIN)


def check_name(name: str) -> str:
    """Recipe-time check: a built-in name, or an import path that resolves (imports it)."""
    if name in BUILTIN:
        return name
    if extensions.is_import_path(name):
        get(name)
        return name
    raise RecipeError(f"unknown preference loss {name!r}; expected one of "
                      f"{', '.join(LOSSES)} or an importable module:function"
                      f"{did_you_mean(name, LOSSES)}")


def get(name: str) -> LossDef:
    """The :class:`LossDef` for a built-in name or a ``module:function`` path."""
    if name in BUILTIN:
        attr, ref, counts = BUILTIN[name]
        return _builtin(name, attr, needs_reference=ref, needs_counts=counts)
    if not extensions.is_import_path(name):
        raise ValueError(f"unknown preference loss {name!r}; expected one of "
                         f"{', '.join(LOSSES)} or module:function")
    fn = extensions.load(name, "loss")
    if isinstance(fn, LossDef):
        return fn
    if not callable(fn) or not hasattr(fn, "needs_reference"):
        raise RecipeError(f"loss {name!r}: decorate it with @starpo.losses.declare("
                          f"needs_reference=..., needs_counts=...) so starpo knows what it "
                          f"reads")
    return LossDef(name, fn, bool(fn.needs_reference), bool(getattr(fn, "needs_counts", False)))


def needs_reference(name: str) -> bool:
    """Whether a preference loss reads reference log-probs (SimPO does not)."""
    return get(name).needs_reference


def preference_loss(name: str, pc, pr, rc=None, rr=None, nc=None, nr=None, *, beta: float,
                    gamma: float = 0.0, label_smoothing: float = 0.0):
    """The one dispatcher: production (``starpo.train.preference``) and the TRL-parity tests
    both call it. Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``[P]``."""
    return get(name)(pc, pr, rc, rr, nc, nr, beta=beta, gamma=gamma,
                     label_smoothing=label_smoothing)


def __getattr__(attr: str):
    # ``starpo.losses.dpo`` etc.: the pure functions, imported (with torch) on first use
    if attr in ("dpo", "ln_dpo", "simpo", "ipo"):
        return getattr(importlib.import_module("starpo.losses.preference"), attr)
    raise AttributeError(f"module 'starpo.losses' has no attribute {attr!r}")
