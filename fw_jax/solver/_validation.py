"""Input checks done before tracing: each failure is a ``ValueError`` naming what was wrong and
what was expected. Value checks (finiteness, symmetry, budgets of a given mask) run only on
concrete arrays; under an outer ``jit`` the shapes are still checked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from fw_jax.solver._budgets import Budget
from fw_jax.solver._psd import check_gram_psd

__all__ = ["check_layer_inputs", "check_alpha", "check_damp", "check_tol", "check_warm_mask", "compute_dtype",
           "is_concrete"]


def is_concrete(x) -> bool:
    """Whether ``x`` has values (not traced under ``jit``/``vmap``): only then are values checked."""
    return not isinstance(x, jax.core.Tracer)


def compute_dtype(*dtypes) -> jnp.dtype:
    """float64 if any input is float64 (and x64 is on), else float32 (bf16/f16 promote)."""
    if any(jnp.dtype(d) == jnp.float64 for d in dtypes) and jax.config.jax_enable_x64:
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def check_layer_inputs(weight, gram, budget: Budget | None = None, *, psd: bool = True) -> tuple[Array, Array]:
    """Validate ``weight (d_out, d_in)``, ``gram (d_in, d_in)`` and the budget; cast to the
    compute dtype. Returns the cast arrays. A concrete ``gram`` must also be finite and
    symmetric, and with ``psd`` positive semidefinite up to rounding (``_psd.py``: the lower
    bound needs it); without, its diagonal must be non-negative (SparseGPT and reconstruction
    damp the matrix and need no more)."""
    arrays = []
    for name, x in (("weight", weight), ("gram", gram)):
        if getattr(x, "dtype", None) is None:  # lists, tuples, scalars
            try:
                x = np.asarray(x)
            except ValueError as e:
                raise ValueError(f"{name} must be a 2-D array of floats; could not read it as one ({e}).") from e
            if x.dtype == object:
                raise ValueError(f"{name} must be a 2-D array of floats; got ragged or non-numeric values.")
        arrays.append(x)
        dtype = x.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"{name} has dtype {dtype}; a floating dtype (float32, float64, bfloat16, float16) "
                "is expected."
            )
    weight, gram = arrays
    if jnp.ndim(weight) != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {jnp.shape(weight)}.")
    d_out, d_in = jnp.shape(weight)
    if jnp.ndim(gram) != 2 or jnp.shape(gram)[0] != jnp.shape(gram)[1]:
        raise ValueError(f"gram must be square (d_in, d_in), got shape {jnp.shape(gram)}.")
    if jnp.shape(gram)[0] != d_in:
        raise ValueError(
            f"gram is {jnp.shape(gram)} but weight is ({d_out}, {d_in}): gram must be "
            f"({d_in}, {d_in}), the Gram matrix of the layer's {d_in} inputs."
        )
    if d_out == 0 or d_in == 0:
        raise ValueError(f"weight has shape ({d_out}, {d_in}); a layer needs at least one row and one input.")
    if budget is not None:
        budget.check(d_out, d_in)
    dtype = compute_dtype(weight.dtype, gram.dtype)
    weight = jnp.asarray(weight, dtype)
    gram = jnp.asarray(gram, dtype)
    if is_concrete(weight) and not bool(jnp.all(jnp.isfinite(weight))):
        raise ValueError("weight contains non-finite values (NaN or inf); finite weights are expected.")
    if is_concrete(gram):
        if not bool(jnp.all(jnp.isfinite(gram))):
            raise ValueError("gram contains non-finite values (NaN or inf); a finite PSD matrix is expected.")
        asym = float(jnp.max(jnp.abs(gram - gram.T)))
        scale = float(jnp.max(jnp.abs(gram)))
        if asym > 1e-3 * max(scale, 1e-30):
            raise ValueError(
                f"gram is not symmetric (max |G - Gᵀ| = {asym:.3g}, max |G| = {scale:.3g}); "
                "G = X Xᵀ is symmetric positive semidefinite."
            )
        if psd:
            check_gram_psd(gram)
        elif bool(jnp.any(jnp.diagonal(gram) < 0)):
            raise ValueError("gram has negative diagonal entries; expected a PSD Gram matrix X Xᵀ.")
    return weight, gram


def check_damp(damp):
    """``damp`` (relative damping of SparseGPT and reconstruction) must be a finite scalar ≥ 0;
    returned as a float (or as given when traced)."""
    if is_concrete(damp):
        if np.ndim(damp) != 0:
            raise ValueError(f"damp must be a scalar, got shape {np.shape(damp)}.")
        damp = float(damp)
        if not np.isfinite(damp) or damp < 0:
            raise ValueError(f"damp must be a finite number ≥ 0 (relative damping), got {damp}.")
    return damp


def check_alpha(alpha) -> None:
    if is_concrete(alpha):
        value = float(alpha)
        if not 0.0 <= value <= 1.0 or not np.isfinite(value):
            raise ValueError(f"alpha = {alpha!r} is outside [0, 1]: it is the fixed fraction of each budget.")


def check_tol(tol) -> None:
    if is_concrete(tol):
        value = float(tol)
        if not (np.isfinite(value) and value >= 0.0):
            raise ValueError(f"tol = {tol!r} must be a finite number ≥ 0: a unit stops once gap ≤ tol · error.")


def check_warm_mask(mask, shape: tuple[int, int], budget: Budget) -> Array:
    """A given warm mask must have the layer's shape and keep exactly the budget per unit."""
    if jnp.shape(mask) != tuple(shape):
        raise ValueError(f"warm_start mask has shape {jnp.shape(mask)}, expected {tuple(shape)}.")
    dtype = getattr(mask, "dtype", np.asarray(mask).dtype)
    if dtype != jnp.bool_:
        if not is_concrete(mask):
            raise ValueError("warm_start mask must be boolean under jit.")
        values = np.asarray(mask)
        if not np.all((values == 0) | (values == 1)):
            raise ValueError("warm_start mask must be boolean (or 0/1 values).")
    mask = jnp.asarray(mask).astype(bool)
    if not is_concrete(mask):
        return mask
    budget.check_mask(np.asarray(mask), "warm_start mask")
    return mask
