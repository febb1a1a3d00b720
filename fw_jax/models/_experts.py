"""The experts of a mixture-of-experts layer at calibration: which fall back, and on what.

One rule for every front-end: the mixture-of-experts families read from folders (``_moe.py``,
whose text gives the measurement behind it) and any Flax model traced by ``fw_jax.prune``
(``_traced.py``). Each describes a layer's experts as an :class:`ExpertLayer` of input keys;
:func:`fallback` does the rest.

Each expert is pruned on the Gram matrices of the tokens routed to it. An expert that fewer
tokens reached than the layer's hidden size ``d`` (``min_tokens``) has a singular input Gram
matrix that says little about it (nothing with zero tokens: every mask is then as good as any
other). Its matrices are replaced, per stage of the expert:

- a stage that reads the tokens entering the layer (gate and up projections: ``shared``): the
  mean of that stage's matrices over the layer's experts. With top-``k`` routing every token goes
  to ``k`` distinct experts, so this is the Gram matrix of *every* token entering the layer,
  scaled by ``k/E``;
- a stage that reads the expert's own activations (down projection): ``c·I``, ``c`` the mean
  diagonal entry of that stage's matrices over the experts. Its inputs on the tokens it was not
  given are unknown without running it on them, so every input counts the same and each method
  keeps a row's largest weights (the magnitude mask, for Wanda and Frank-Wolfe).

A stage whose matrices are all zero (no expert received a token) falls back to the identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

#: What a layer record's ``fallback`` field says, by stage kind.
SHARED_FALLBACK = "Gram matrix of every token entering the layer"
OWN_FALLBACK = "identity Gram matrix (each row keeps its largest weights)"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One input of a layer's experts: ``keys[e]`` is expert ``e``'s input key for it; ``shared``
    when every expert reads the tokens entering the layer there (its gate and up projections),
    not its own activations (its down projection)."""

    keys: tuple[str, ...]
    shared: bool

    @property
    def note(self) -> str:
        return SHARED_FALLBACK if self.shared else OWN_FALLBACK


@dataclasses.dataclass(frozen=True)
class ExpertLayer:
    """The experts of one mixture-of-experts layer, as their input keys.

    ``experts[e]`` names expert ``e`` (for reports); ``stages`` are its inputs, the first one
    counting the tokens routed to each expert; ``min_tokens`` is the threshold of the fallback
    (the layer's hidden size)."""

    experts: tuple[str, ...]
    stages: tuple[Stage, ...]
    min_tokens: int

    def __post_init__(self):
        for stage in self.stages:
            if len(stage.keys) != len(self.experts):
                raise ValueError(f"a stage has {len(stage.keys)} keys for {len(self.experts)} experts")

    def tokens(self, counts: Mapping[str, int]) -> dict[str, int]:
        """``{expert: calibration tokens routed to it}``, from ``{input key: tokens}``."""
        first = self.stages[0].keys
        missing = [key for key in first if key not in counts]
        if missing:
            raise KeyError(f"no token count for {missing[0]!r}: pass the counts of the Gram matrices' tokens")
        return {name: int(counts[key]) for name, key in zip(self.experts, first)}

    def falling_back(self, counts: Mapping[str, int], min_tokens: int | None = None) -> dict[str, int]:
        """``{expert: tokens}`` for the experts that fewer than ``min_tokens`` tokens reached
        (``None``: :attr:`min_tokens`)."""
        least = self.min_tokens if min_tokens is None else min_tokens
        return {name: n for name, n in self.tokens(counts).items() if n < least}


def fallback(layer: ExpertLayer, grams: Mapping[str, jax.Array], counts: Mapping[str, int], *,
             min_tokens: int | None = None) -> tuple[dict[str, jax.Array], dict[str, str]]:
    """``(grams, notes)``: the Gram matrices with the fallback of every expert of ``layer`` that
    too few tokens reached (the module's text), and ``{input key: note}`` for the keys replaced.

    Apply it to the Gram matrices of the whole calibration set (added over chunks and processes),
    never to a part: the counts decide, and they are counts over all tokens. Every key not
    replaced is returned as the same object."""
    grams = dict(grams)
    short = layer.falling_back(counts, min_tokens)
    if not short:
        return grams, {}
    notes = {}
    for stage in layer.stages:
        replacement = _stage_fallback(stage, [grams[key] for key in stage.keys])
        for name, key in zip(layer.experts, stage.keys):
            if name in short:
                grams[key] = replacement.astype(grams[key].dtype)
                notes[key] = stage.note
    return grams, notes


def _stage_fallback(stage: Stage, matrices: list) -> jax.Array:
    level = sum(jnp.mean(jnp.diagonal(m)) for m in matrices) / len(matrices)
    eye = jnp.eye(matrices[0].shape[0], dtype=matrices[0].dtype)
    if not stage.shared:
        return eye * jnp.where(level > 0, level, 1).astype(eye.dtype)
    mean = sum(matrices) / len(matrices)
    return jnp.where(level > 0, mean, eye)
