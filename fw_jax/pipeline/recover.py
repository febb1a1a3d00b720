"""Block-wise recovery: after a block's masks are chosen, tune its kept weights (all its linear
layers together) so that the pruned block reproduces the *dense* block's output.

Layer-wise methods fit each layer to its own inputs, so errors add up block after block. Recovery
minimises, over the kept weights ``Ŵ`` of block ``b``,

    ‖ dense_block_b(x_dense) − pruned_block_b(x_pruned; Ŵ) ‖² / ‖ dense_block_b(x_dense) ‖²

on the calibration windows (or, with ``loss="token"``, the mean over positions of each position's
relative error; with ``proximal=λ > 0``, plus ``λ ‖Ŵ − W₀‖² / ‖W₀‖²``, a pull toward the
block's pre-recovery weights ``W₀``; with ``dense_pull=μ > 0``, plus a pull toward the *dense*
weights weighted by each input channel's calibration energy, see :class:`RecoverSettings`),
where ``x_dense`` are the dense model's inputs to the block and ``x_pruned`` the pruned model's
(so a block learns to undo the errors of the blocks before it). It runs optax's AdamW with a cosine schedule on mini-batches of windows, with the gradients and
updates masked (pruned entries stay exactly 0), and stops early when the loss on held-out windows
has not improved for ``patience`` evaluations, keeping the best weights seen on them. It never
makes the block worse: if the loss on all calibration windows is not lower after than before,
or a loss is not finite, the block keeps its pre-recovery weights and the record says why.
Deterministic from ``RecoverSettings.seed`` (and the block index).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ._training import check_fields, linear_weights_filter, masked_update, nonzero_masks, train_masked


__all__ = ["LOSSES", "RecoverSettings", "RecoveryWarning", "recover_block"]

LOSSES = ("block", "token")


class RecoveryWarning(UserWarning):
    """Recovery was asked for on a model family it is known to harm (``Family.recover_warning``)."""


@dataclasses.dataclass(frozen=True)
class RecoverSettings:
    """How ``--recover`` tunes each block.

    Attributes:
      steps: optimizer steps per block (at most; early stopping may end sooner).
      learning_rate: AdamW's peak learning rate (cosine-decayed to 0 over ``steps``). The
        defaults were chosen on the first blocks of SmolLM2-135M pruned by Wanda to 50%
        (``benchmarks/recover_tuning.py``): of 3e-5 … 3e-2, 3e-3 lowered the held-out loss most.
      weight_decay: AdamW's decoupled weight decay on the kept weights.
      batch_size: calibration windows per step.
      holdout: fraction of the calibration windows held out for early stopping (at least one).
      eval_every: steps between held-out evaluations.
      patience: evaluations without improvement before stopping.
      seed: of the mini-batch order.
      loss: ``"block"``, the squared error over all windows and positions relative to the dense
        output's energy; or ``"token"``, each position's squared error relative to its own energy,
        averaged over positions, so that every position weighs alike. In SmolLM2's middle blocks
        the first position of a window (the attention sink) holds 70–98% of the output's energy
        (``results/block_error_profile.md``), so ``"block"`` reads small there while the other
        positions' errors are a larger share of theirs. Measured at 50% on SmolLM2, ``"token"``
        gave the same perplexity (``results/quality.md``). Early stopping and the never-worse check use the same loss.
      proximal: ``λ ≥ 0``, the weight of a trust region in the training loss: ``λ ‖Ŵ − W₀‖² / ‖W₀‖²`` over
        the block's linear weights, ``W₀`` those before recovery, so that the kept weights stay near
        what the layer-wise solve chose (the calibration text is one domain; the model is used on
        others). 0 (the default) trains on the block loss alone. Early stopping and the never-worse
        check measure the block loss without it.
      dense_pull: ``μ ≥ 0``, the weight of a pull toward the block's *dense* weights ``W`` in the
        training loss, each input channel ``j`` weighted by its calibration energy
        ``e_j = diag(G)_j = Σ_tokens x_j²`` (``G`` the layer's Gram matrix): the mean over the
        block's linear layers of ``Σ_ij e_j (Ŵ_ij − W_ij)² / Σ_ij e_j W_ij²``. That is each layer's
        output error if its input channels were uncorrelated; it is the recovery analog of the
        Gram shrinkage ``ρ`` (``PruneSettings.shrinkage``), which fits ``(1 − ρ) G + ρ diag(G)`` and
        so trades the calibration text's correlations for the same pull. Needs the dense weights
        and energies (``recover_block``'s ``dense``; the pipeline passes them). 0 (the default):
        off. Early stopping and the never-worse check measure the block loss without it.
    """

    steps: int = 50  # chosen on SmolLM2's first blocks (results/recover_tuning.md): 100 steps reduce
    learning_rate: float = 3e-3  # the block loss further, but gave the same perplexity at 50% (results/quality.md)
    weight_decay: float = 0.0
    batch_size: int = 4
    holdout: float = 0.125
    eval_every: int = 10
    patience: int = 3
    seed: int = 0
    loss: str = "block"
    proximal: float = 0.0
    dense_pull: float = 0.0

    def __post_init__(self):
        check_fields("recover", self, {"steps": 0, "batch_size": 1, "eval_every": 1, "patience": 1, "seed": 0},
                     ("learning_rate", "weight_decay", "proximal", "dense_pull"))
        if not 0 < self.holdout < 1:
            raise ValueError(f"recover holdout must be a fraction in (0, 1), got {self.holdout!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"recover loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    def describe(self) -> str:
        """What differs from the defaults, for a run's one-line description: ``""`` or e.g.
        ``" (100 steps, token loss)"``.

        Example:
          >>> RecoverSettings(steps=100, proximal=1.0).describe()
          ' (100 steps, proximal 1)'
        """
        default = RecoverSettings()
        parts = [f"{self.steps} steps" if self.steps != default.steps else "",
                 f"lr {self.learning_rate:g}" if self.learning_rate != default.learning_rate else "",
                 f"{self.loss} loss" if self.loss != default.loss else "",
                 f"proximal {self.proximal:g}" if self.proximal != default.proximal else "",
                 f"dense pull {self.dense_pull:g}" if self.dense_pull != default.dense_pull else ""]
        parts = [p for p in parts if p]
        return f" ({', '.join(parts)})" if parts else ""

    def record(self) -> dict:
        """Every field as a JSON-ready value (reports, the run's identity: ``identity.py``)."""
        return dataclasses.asdict(self)


def _dense_trees(like, prefix: str, dense: Optional[dict]):
    """``dense`` (``{layer name: (weight, energy)}``) as two trees shaped like ``like`` (the block's
    linear weights): the dense weights, and each layer's energies as a ``(1, d_in)`` row."""
    def name(path):  # the layer's name: the state's keys, less the last ("weight")
        keys = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
        return ".".join([prefix, *keys[:-1]])

    missing = sorted({name(path) for path, _ in jax.tree_util.tree_flatten_with_path(like)[0]} - set(dense or ()))
    if missing:
        raise ValueError(f"recover dense_pull needs the dense weight and input energy of every linear layer; "
                         f"missing: {', '.join(missing)}")
    weights = jax.tree_util.tree_map_with_path(lambda p, w: jnp.asarray(dense[name(p)][0], jnp.float32), like)
    energies = jax.tree_util.tree_map_with_path(
        lambda p, w: jnp.asarray(dense[name(p)][1], jnp.float32).reshape(1, -1), like)
    return weights, energies


def distance_to_dense(weights, dense) -> jax.Array:
    """The dense pull's penalty: the mean over layers of ``Σ_ij e_j (Ŵ_ij − W_ij)² / Σ_ij e_j W_ij²``,
    ``weights`` the block's linear weights ``Ŵ`` and ``dense`` the ``(W, e)`` trees of :func:`_dense_trees`."""
    dense_weights, energies = dense
    tiny = jnp.finfo(jnp.float32).tiny
    parts = [jnp.sum(e * (w - wd) ** 2) / jnp.maximum(jnp.sum(e * wd**2), tiny) for w, wd, e in
             zip(jax.tree.leaves(weights), jax.tree.leaves(dense_weights), jax.tree.leaves(energies))]
    return sum(parts) / len(parts)


def _forward(graphdef, weights, rest, h, context):
    return nnx.merge(graphdef, weights, rest).forward(h, context)[0]


@functools.lru_cache(maxsize=8)
def _compiled(graphdef, settings: RecoverSettings):
    """The jitted step and loss of one block structure (blocks of a model share them)."""
    optimizer = optax.adamw(optax.cosine_decay_schedule(settings.learning_rate, max(settings.steps, 1)),
                            weight_decay=settings.weight_decay)

    tiny = jnp.finfo(jnp.float32).tiny

    def parts(out, target):  # per window: the loss's numerator and denominator
        err, energy = jnp.sum((out - target) ** 2, axis=-1), jnp.sum(target**2, axis=-1)  # (windows, positions)
        if settings.loss == "block":
            return err.sum(1), energy.sum(1)
        return (err / jnp.maximum(energy, tiny)).sum(1), jnp.full(err.shape[:1], err.shape[1], err.dtype)

    def relative_loss(weights, rest, h, target, context):
        num, den = parts(_forward(graphdef, weights, rest, h, context), target)
        return jnp.sum(num) / jnp.maximum(jnp.sum(den), tiny)

    def training_loss(weights, anchor, dense, rest, h, target, context):
        loss = relative_loss(weights, rest, h, target, context)
        total = loss
        if settings.proximal:  # resolved at trace time: off costs nothing
            moved = sum(jnp.sum((w - w0) ** 2) for w, w0 in zip(jax.tree.leaves(weights), jax.tree.leaves(anchor)))
            size = sum(jnp.sum(w0**2) for w0 in jax.tree.leaves(anchor))
            total = total + settings.proximal * moved / jnp.maximum(size, tiny)
        if settings.dense_pull:
            total = total + settings.dense_pull * distance_to_dense(weights, dense)
        return total, loss

    @jax.jit
    def step(weights, opt_state, masks, anchor, dense, rest, h, target, context):
        (_, loss), grads = jax.value_and_grad(training_loss, has_aux=True)(weights, anchor, dense, rest, h, target,
                                                                           context)
        weights, opt_state = masked_update(optimizer, weights, opt_state, grads, masks)
        return weights, opt_state, loss

    @jax.jit
    def sums(weights, rest, h, target, context):
        return parts(_forward(graphdef, weights, rest, h, context), target)

    return optimizer, step, sums


def recover_block(model, b: int, inputs: jax.Array, targets: jax.Array, settings: RecoverSettings,
                  dense: Optional[dict] = None) -> dict:
    """Tune the kept weights of block ``b`` (in place) so that it maps ``inputs`` (the pruned
    model's, ``(N, T, d)``) to ``targets`` (the dense block's outputs on the dense inputs).

    ``dense`` (needed when ``settings.dense_pull > 0``): ``{name: (dense weight (d_out, d_in),
    input energy (d_in,))}`` for every linear layer of the block, named as
    :func:`fw_jax.models.block_linears` names them.

    Returns a record: ``loss_before``, ``loss_after`` (``settings.loss`` on all calibration
    windows), ``heldout_before``/``heldout_after``, ``steps`` taken, ``stopped``
    (``"steps"``, ``"early"``, ``"worse"`` or ``"nonfinite"``; with the last two the block keeps
    its weights) and ``seconds``.
    """
    start = time.perf_counter()
    block = model.blocks[b]
    members = tuple(m for _, group in block.LINEAR_GROUPS for m in group)
    graphdef, before, rest = nnx.split(block, linear_weights_filter(f"{m}.weight" for m in members), ...)
    optimizer, step_fn, sums = _compiled(graphdef, settings)
    masks = nonzero_masks(before)
    pull = _dense_trees(before, f"{model.block_path}.{b}", dense) if settings.dense_pull else None
    inputs, targets = jnp.asarray(inputs, jnp.float32), jnp.asarray(targets, jnp.float32)
    n = inputs.shape[0]
    held = max(1, int(round(settings.holdout * n))) if n > 1 else 0
    train = np.arange(n - held) if n - held > 0 else np.arange(n)
    heldout = np.arange(n - held, n) if held else train
    context = model.block_context(inputs.shape[1])

    def window_sums(weights, rows):
        parts = [sums(weights, rest, inputs[rows[i:i + settings.batch_size]], targets[rows[i:i + settings.batch_size]],
                      context) for i in range(0, len(rows), settings.batch_size)]
        return np.concatenate([np.asarray(e) for e, _ in parts]), np.concatenate([np.asarray(t) for _, t in parts])

    def relative(err, total, rows=slice(None)):
        return float(err[rows].sum()) / max(float(total[rows].sum()), np.finfo(np.float32).tiny)

    def loss_on(weights, rows):
        return relative(*window_sums(weights, rows))

    everything = np.arange(n)
    sums_before = window_sums(before, everything)  # once: the held-out loss is a part of it
    loss_before, held_before = relative(*sums_before), relative(*sums_before, heldout)
    batches = _batches(train, settings.batch_size, settings.steps, settings.seed, b)
    trained = train_masked(
        lambda w, s, rows: step_fn(w, s, masks, before, pull, rest, inputs[rows], targets[rows], context),
        before, optimizer.init(before), lambda t: (batches[t],), steps=settings.steps,
        eval_every=settings.eval_every, held_loss=lambda w: loss_on(w, heldout), best=before, best_loss=held_before,
        patience=settings.patience)
    stopped = trained.stopped
    chosen = trained.best if stopped != "nonfinite" else before
    loss_after = loss_on(chosen, everything) if chosen is not before else loss_before
    if stopped != "nonfinite" and not loss_after < loss_before:
        chosen, loss_after, stopped = before, loss_before, "worse"
    nnx.update(block, chosen)
    return {"loss_before": loss_before, "loss_after": loss_after, "heldout_before": held_before,
            "heldout_after": trained.best_loss if chosen is not before else held_before, "steps": trained.steps,
            "stopped": stopped, "seconds": time.perf_counter() - start}


def _batches(train: np.ndarray, batch_size: int, steps: int, seed: int, b: int) -> list[np.ndarray]:
    """The training windows of each of block ``b``'s ``steps``: ``batch_size`` at a time from
    random permutations of ``train`` (drawn from ``seed`` and ``b``), a new permutation appended
    whenever fewer than ``batch_size`` are left (so a batch is smaller only when ``train`` is)."""
    rng = np.random.default_rng([seed, b])
    order, batches = np.array([], int), []
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(train)])
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


def _recovery_line(b: int, r: dict) -> str:
    why = {"steps": "", "early": ", stopped early (held-out loss)",
           "worse": ": no better, the block keeps its pruned weights",
           "nonfinite": ": a loss was not finite, the block keeps its pruned weights"}[r["stopped"]]
    return (f"block {b} recovery: loss vs dense {r['loss_before']:.4g} -> {r['loss_after']:.4g} "
            f"in {r['steps']} steps, {r['seconds']:.1f}s{why}")


class Recovery:
    """Recovery inside the pruning engine: the dense model's hidden states, carried beside the
    pruned model's, and :func:`recover_block` of each block against them.

    Per block, inside ``blocks.resident(b)``: :meth:`before` (the dense block's outputs, and its
    dense weights for ``dense_pull``) while the block is still dense, then :meth:`after` once it
    is pruned. A resumed run calls :meth:`replay` with each saved block still dense.
    """

    def __init__(self, blocks, settings: RecoverSettings):
        from . import distributed

        if distributed.process_count() > 1:
            raise ValueError("recover runs in one process (its gradients are not shared across processes yet)")
        if not hasattr(blocks, "loaded"):
            raise ValueError("recover trains a block of a model fw_jax loaded (fw_jax.models.load_model); "
                             f"{blocks.source} is not one")
        self.blocks, self.settings, self.dense = blocks, settings, None
        from fw_jax.models import FAMILIES

        family = FAMILIES.get(blocks.loaded.family)
        if family is not None and family.recover_warning:
            warnings.warn(f"--recover on {blocks.source}: {family.recover_warning}", RecoveryWarning, stacklevel=2)

    def start(self, hidden) -> None:
        """The dense model's block-0 inputs: the pruned model's, before anything is pruned."""
        self.dense = hidden

    def replay(self, b: int) -> None:
        """Move the dense stream past block ``b`` (resident, with its dense weights)."""
        self.dense = self.blocks.run(b, self.dense)

    def before(self, b: int):
        """``(target, dense weights or None)`` of block ``b`` while it is dense."""
        target = self.blocks.run(b, self.dense)
        pulled = ({layer.name: layer.weight for layer in self.blocks.linears(b)}
                  if self.settings.dense_pull else None)
        return target, pulled

    def after(self, b: int, hidden, before, energies: dict, records: list[dict], progress) -> None:
        """Recover pruned block ``b`` from its inputs ``hidden`` toward ``before``'s target; the
        weights are rounded to the dtype they are written in, as pruned ones are, unless the
        block kept its pruned weights. The record goes into every layer record of the block."""
        target, pulled = before
        dense = None if pulled is None else {name: (w, energies[name]) for name, w in pulled.items()}
        record = recover_block(self.blocks.model, b, hidden, target, self.settings, dense)
        if record["stopped"] not in ("worse", "nonfinite"):
            self.blocks.set_weights(b, {layer.name: layer.weight for layer in self.blocks.linears(b)})
        for r in records:
            r["block_recovery"] = record
        progress.say(_recovery_line(b, record))
        self.dense = target
