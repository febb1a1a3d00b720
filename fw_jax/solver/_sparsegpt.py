"""SparseGPT (Frantar & Alistarh, 2023): mask selection with Optimal-Brain-Surgeon weight updates.

The layer problem is ``min ‖WX − ŴX‖²_F = tr((W − Ŵ) G (W − Ŵ)ᵀ)`` over sparse ``Ŵ``. SparseGPT
walks the input columns left to right. With ``U`` the upper Cholesky factor of the damped
inverse Hessian, ``H⁻¹ = Uᵀ U``, pruning column ``j`` of every row and letting the not yet
processed columns ``j' > j`` absorb the error is the OBS update

    e = (w_j − q_j) / U_jj,        w_{j'} ← w_{j'} − e · U_{j j'}    (j' > j)

where ``q_j`` is ``w_j`` if kept and 0 if pruned. Columns are processed in blocks of
``block_size``: inside a block the update is applied column by column, and the columns to the
right of the block receive all of the block's updates at once (one GEMM, the "lazy batch"
update). The mask is chosen by the OBS saliency ``w_j² / U_jj²``:

* per row / whole-layer budget: once per block, over all rows of the block together, the
  lowest-saliency entries are pruned (so rows do not keep exactly the same count);
* ``NM(n, m)``: when the sweep reaches a group of ``m`` columns, the ``m − n`` lowest-saliency
  entries of each row in that group are pruned (using the weights as updated so far).
"""

from __future__ import annotations

import functools
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.scipy.linalg import cho_solve

from fw_jax._checks import check_int

from ._budgets import Budget, as_budget
from ._reconstruct import check_inputs
from ._select import group_ranks, lexicographic_better, smallest_mask_bisect

__all__ = ["sparsegpt", "damped_hessian"]


def damped_hessian(gram: Array, damp: Union[float, Array]) -> tuple[Array, Array]:
    """SparseGPT's damped Hessian ``H = G' + damp · mean(diag G') · I`` and its dead inputs.

    ``G'`` is ``G`` with ``G'_jj = 1`` wherever ``G_jj = 0`` (an input that is always zero in
    the calibration data; its row and column of a PSD Gram are zero too). As in SparseGPT, the
    mean is taken after that substitution.

    Args:
      gram: ``(d_in, d_in)`` Gram matrix ``X Xᵀ``.
      damp: relative damping ``λ ≥ 0``.

    Returns:
      ``(hessian, dead)``: the ``(d_in, d_in)`` damped Hessian and the ``(d_in,)`` boolean mask
      of dead inputs.
    """
    diag = jnp.diagonal(gram)
    dead = diag == 0
    diag = jnp.where(dead, jnp.ones_like(diag), diag)
    diag = diag + damp * jnp.mean(diag)
    index = jnp.arange(gram.shape[0])
    return gram.at[index, index].set(diag), dead


def _inverse_upper_cholesky(hessian: Array) -> Array:
    # U with H⁻¹ = Uᵀ U: the rows of U are the OBS updates in column order.
    eye = jnp.eye(hessian.shape[0], dtype=hessian.dtype)
    hessian_inv = cho_solve((jnp.linalg.cholesky(hessian), True), eye)
    hessian_inv = (hessian_inv + hessian_inv.T) / 2
    return jnp.triu(jnp.linalg.cholesky(hessian_inv, upper=True))


def _block_prune_counts(total_pruned: int, d_in: int, block_size: int) -> np.ndarray:
    # Entries pruned in each block: differences of floor(total_pruned · columns_done / d_in), so
    # every block prunes its share of the columns (up to rounding) and the layer total is exact.
    bounds = np.minimum(np.arange(0, d_in + block_size, block_size), d_in)
    done = (total_pruned * bounds) // d_in
    return np.diff(done)[: -(-d_in // block_size)]


@functools.partial(jax.jit, static_argnames=("block_size", "n", "m"))
def _sparsegpt_jit(weight, gram, damp, prune_counts, *, block_size, n, m):
    """``prune_counts``: entries pruned per block (unstructured; traced), ignored for n:m."""
    d_out, d_in = weight.shape
    dtype = weight.dtype
    hessian, dead = damped_hessian(gram, damp.astype(dtype))
    weight = jnp.where(dead[None, :], jnp.zeros_like(weight), weight)
    upper = _inverse_upper_cholesky(hessian)

    # Pad to whole blocks: zero weights and an identity Hessian block do not interact with the
    # real columns (H⁻¹ and its Cholesky factor stay block diagonal).
    n_blocks = -(-d_in // block_size)
    d_pad = n_blocks * block_size
    pad = d_pad - d_in
    weight = jnp.pad(weight, ((0, 0), (0, pad)))
    upper = jnp.pad(upper, ((0, pad), (0, pad)))
    upper = upper.at[jnp.arange(d_in, d_pad), jnp.arange(d_in, d_pad)].set(1)
    structured = m > 0

    def block(weight, block_index):
        start = block_index * block_size
        w_block = lax.dynamic_slice(weight, (0, start), (d_out, block_size))
        u_rows = lax.dynamic_slice(upper, (start, 0), (block_size, d_pad))
        u_block = lax.dynamic_slice(u_rows, (0, start), (block_size, block_size))
        scale = jnp.diagonal(u_block)
        zeros = jnp.zeros_like(w_block)

        def column(i, carry):
            w_block, q_block, err_block, pruned = carry
            w = w_block[:, i]
            q = jnp.where(pruned[:, i], jnp.zeros_like(w), w)
            err = (w - q) / u_block[i, i]
            # Row i of U is zero left of the diagonal, so finished columns stay untouched.
            w_block = w_block - err[:, None] * u_block[i][None, :]
            return w_block, q_block.at[:, i].set(q), err_block.at[:, i].set(err), pruned

        if not structured:
            saliency = (w_block / scale[None, :]) ** 2
            real = (start + jnp.arange(block_size)) < d_in
            eligible = jnp.broadcast_to(real[None, :], saliency.shape)
            pruned = smallest_mask_bisect(saliency, prune_counts[block_index], eligible)
            _, q_block, err_block, _ = lax.fori_loop(
                0, block_size, column, (w_block, zeros, zeros, pruned)
            )
        else:

            def group(g, carry):
                w_block, q_block, err_block, pruned = carry
                first = g * m
                w_group = lax.dynamic_slice(w_block, (0, first), (d_out, m))
                s_group = lax.dynamic_slice(scale, (first,), (m,))
                saliency = (w_group / s_group[None, :]) ** 2
                # Rank 0 = lowest saliency; ties go to the lower column (pruned first).
                rank = group_ranks(lexicographic_better((-saliency,)))
                pruned = lax.dynamic_update_slice(pruned, rank < m - n, (0, first))
                return lax.fori_loop(first, first + m, column, (w_block, q_block, err_block, pruned))

            pruned = jnp.zeros(w_block.shape, bool)
            _, q_block, err_block, pruned = lax.fori_loop(
                0, block_size // m, group, (w_block, zeros, zeros, pruned)
            )

        # Lazy batch update: everything right of the block absorbs the block's errors at once
        # (U is zero below the diagonal, so columns left of the block are unchanged).
        weight = weight - err_block @ u_rows
        weight = lax.dynamic_update_slice(weight, q_block, (0, start))
        return weight, pruned

    weight, pruned = lax.scan(block, weight, jnp.arange(n_blocks))
    mask = ~jnp.transpose(pruned, (1, 0, 2)).reshape(d_out, d_pad)[:, :d_in]
    return mask, weight[:, :d_in]


def sparsegpt(
    weight: Array,
    gram: Array,
    budget: Union[int, tuple[int, int], str, Budget],
    *,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[Array, Array]:
    """Prune one linear layer with SparseGPT: choose the mask and update the kept weights.

    Solves ``min tr((W − Ŵ) H (W − Ŵ)ᵀ)`` approximately, column by column, with the damped
    Hessian ``H = G + λ · mean(diag G) · I`` (inputs with ``G_jj = 0`` get ``H_jj = 1`` and their
    weights are zeroed, as in SparseGPT). With ``H⁻¹ = Uᵀ U`` (``U`` upper triangular), each
    column ``j`` is pruned or kept and the error ``(w_j − q_j) / U_jj`` is propagated to the
    columns on its right along row ``j`` of ``U``; columns are processed in blocks of
    ``block_size`` with lazy batch updates of the remaining columns. The mask is chosen by the
    saliency ``w_j² / U_jj²`` of the current (already updated) weights.

    Budgets:

    * ``k`` (int) or ``PerRow(k)``: sparsity ``1 − k/d_in``. As in SparseGPT the mask is chosen
      per block over all rows together, so rows do **not** each keep exactly ``k``; the layer
      keeps exactly ``d_out · k`` weights in total, each block pruning its share
      ``⌊P·c₂/d_in⌋ − ⌊P·c₁/d_in⌋`` of the ``P = d_out·(d_in − k)`` pruned entries (block
      columns ``c₁..c₂``).
    * ``LayerBudget(K)``: the same with ``P = d_out·d_in − K``.
    * ``(n, m)`` or ``NM(n, m)``: ``n`` **kept** out of every ``m`` consecutive inputs of a row
      (2:4 keeps 2; SparseGPT's own command line counts the pruned ones). Exact per group.
      ``m`` must divide ``d_in`` and ``block_size``.

    Ties in saliency are broken deterministically: the lower index (row-major within the block,
    or lower column within an n:m group) is pruned first.

    Args:
      weight: ``(d_out, d_in)`` weights.
      gram: ``(d_in, d_in)`` Gram matrix ``X Xᵀ`` of the layer inputs (symmetric PSD).
      budget: see above.
      block_size: columns per lazy-update block (static; 128 in the paper).
      damp: relative damping ``λ ≥ 0`` (traced: changing it does not recompile). With
        ``damp = 0`` a singular Gram gives non-finite results.

    Returns:
      ``(mask, new_weight)``: boolean ``(d_out, d_in)`` mask (True = kept) and the updated
      weights in ``weight``'s dtype, exactly zero where the mask is False. Computation runs in
      the promoted dtype of ``weight``, ``gram`` and float32.

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (64, 256))
      >>> w = jax.random.normal(jax.random.key(1), (32, 64))
      >>> mask, w_hat = sparsegpt(w, x @ x.T, (2, 4), block_size=32)
      >>> int(mask.sum())
      1024
    """
    out_dtype = jax.dtypes.canonicalize_dtype(getattr(weight, "dtype", jnp.float32))
    weight, gram, damp = check_inputs(weight, gram, damp)
    d_out, d_in = weight.shape
    block_size = check_int("block_size", block_size, least=1)
    layer_budget = as_budget(budget)
    layer_budget.check(d_out, d_in)
    n = m = 0
    n_blocks = -(-d_in // block_size)
    prune_counts = np.zeros(n_blocks, np.int32)
    if layer_budget.pattern is not None:
        n, m = layer_budget.pattern
        if block_size % m:
            raise ValueError(
                f"NM({n}, {m}): m = {m} must divide block_size = {block_size} so that no group of "
                "m inputs straddles two blocks."
            )
    else:
        total_pruned = d_out * d_in - layer_budget.total_kept(d_out, d_in)
        prune_counts = _block_prune_counts(total_pruned, d_in, block_size).astype(np.int32)
    dtype = jnp.result_type(weight.dtype, gram.dtype, jnp.float32)
    mask, new_weight = _sparsegpt_jit(
        weight.astype(dtype),
        gram.astype(dtype),
        jnp.asarray(damp, dtype),
        jnp.asarray(prune_counts),
        block_size=block_size,
        n=n,
        m=m,
    )
    return mask, new_weight.astype(out_dtype)
