"""Layer-pruning methods: each is a frozen dataclass that owns its settings and prunes one layer.

A method sees the :class:`Layer` problem (weights, the calibration Gram matrix ``gram``, the
matrix it should fit, ``fitted``, which is ``gram`` shrunk toward its diagonal when the run asks
for shrinkage, and the budget) and returns a :class:`Pruned`: the mask and, for some methods, new
kept weights. What every method shares (reconstruction, errors against Wanda, timing) is done by
``fw_jax.pipeline.prune.prune_layer`` around it.

Methods are registered by name in :data:`METHODS` (the CLI's ``--method`` choices, in the order
the files below are imported). **To add a method**: one file in this folder with a
:class:`Method` subclass decorated with :func:`register`, its module name in the import line at
the bottom of this file, and its test. Its dataclass fields are its settings: the CLI builds it
with :func:`method_from_options`, so an option it does not take is refused by construction, and
its fields enter the run's identity (``fw_jax.pipeline.identity``) and report as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Mapping, NamedTuple, Optional

import jax

from fw_jax.solver import Budget

__all__ = ["Layer", "Method", "METHODS", "Pruned", "method_from_options", "register",
           "Magnitude", "Wanda", "RIA", "SparseGPT", "SparseFW", "SparseFWPublished"]


class Layer(NamedTuple):
    """One layer's problem, as a method sees it."""

    weight: jax.Array  #: (d_out, d_in) float32.
    gram: jax.Array  #: (d_in, d_in) calibration Gram matrix; errors are reported on it.
    fitted: jax.Array  #: the Gram matrix the method fits (``gram`` shrunk, or ``gram``).
    budget: Budget
    shrinkage: float  #: ρ of ``fitted = (1 − ρ) gram + ρ diag(gram)``.
    history: bool  #: record the solver's per-iteration history (plots).
    mask_error: Callable[[jax.Array], float]  #: ``‖WX − (M⊙W)X‖²`` of a mask, on ``gram``.
    wanda: Callable[[], jax.Array]  #: Wanda's mask on ``gram`` (computed once, shared with the report's comparison).


class Pruned(NamedTuple):
    mask: jax.Array  #: boolean, True = kept.
    weight: Optional[jax.Array] = None  #: new kept weights, if the method updates them.
    record: Optional[dict] = None  #: what the method reports about the layer (bounds, iterations ...).


@dataclasses.dataclass(frozen=True)
class Method:
    """A layer-pruning method; subclasses are frozen dataclasses whose fields are its settings.

    Class attributes (not settings): ``name`` (its ``--method`` name), ``summary`` (one line for
    ``fw-jax prune --help``), ``default_shrinkage`` (ρ when the run does not set one),
    ``records_history`` (it can record a per-iteration history for plots), ``refusal`` (what to
    say when given an option it does not take; by default, which methods take it).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    default_shrinkage: ClassVar[float] = 0.0
    records_history: ClassVar[bool] = False
    refusal: ClassVar[Optional[str]] = None

    def prune(self, layer: Layer) -> Pruned:
        """Choose ``layer``'s mask (and, optionally, new kept weights)."""
        raise NotImplementedError

    def record(self) -> dict:
        """The method and its settings as JSON-ready fields (reports, the run's identity)."""
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            fields[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return {"method": self.name, **fields}

    def note(self, shrinkage: float) -> Optional[str]:
        """A line to say when a run starts with this method, or ``None``."""
        return None


#: Every method by name (the CLI's ``--method`` choices, in this order).
METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a :class:`Method` to :data:`METHODS` under its ``name``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"a method needs a new name, got {cls.name!r}")
    METHODS[cls.name] = cls
    return cls


def method_from_options(name: str, options: Mapping = ()) -> Method:
    """The method ``name`` built from ``options`` (its settings by field name).

    An option the method does not take is refused, naming the methods that do take it, since it
    would otherwise be silently ignored.
    """
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {name!r}")
    cls = METHODS[name]
    options = dict(options)
    taken = {f.name for f in dataclasses.fields(cls)}
    unused = [key for key in options if key not in taken]
    if unused:
        takers = [other for other, c in METHODS.items()
                  if set(unused) <= {f.name for f in dataclasses.fields(c)}]
        why = cls.refusal or (f"those are {' and '.join(takers)}'s" if takers else "no method takes them")
        raise ValueError(f"method {name} does not use {', '.join(unused)} (it would be ignored); {why}")
    return cls(**options)


from . import saliency, sparsegpt, sparsefw, published  # noqa: E402,F401  (registry order)
from .published import SparseFWPublished  # noqa: E402
from .saliency import RIA, Magnitude, Wanda  # noqa: E402
from .sparsefw import SparseFW  # noqa: E402
from .sparsegpt import SparseGPT  # noqa: E402
