"""Is the Gram matrix positive semidefinite? A cheap check before a bound is claimed.

Every lower bound fw_jax reports (Frank-Wolfe's ``L(P) − gap(P)``) holds only because the layer
error ``(w⊙(1−m))ᵀ G (w⊙(1−m))`` is convex in the relaxed mask, that is, because ``G ⪰ 0``. A
calibration Gram matrix ``X Xᵀ`` is PSD up to rounding; a matrix that is not (``−G``, a random
symmetric matrix, a Gram matrix with a large negative shift) makes the "bound" meaningless, and
the solver would report it as proved. :func:`negative_curvature` looks for a direction of
negative curvature:

* the diagonal: ``G_ii = e_iᵀ G e_i`` (free);
* a Lanczos run of ``steps`` matrix-vector products from a fixed start vector, with full
  reorthogonalisation; the Ritz vector of the smallest Ritz value is then evaluated exactly,
  ``yᵀ G y / yᵀ y``, so whatever it returns is a true Rayleigh quotient of ``G``, never an
  artefact of the tridiagonal matrix.

Both give an *upper* bound on ``λ_min(G)``: a value below ``−tol · λ_max`` proves ``G``
indefinite (the extreme eigenvalues are the ones Lanczos finds first, so a clearly indefinite
matrix is found in a few dozen products). A value within the tolerance is not proof that ``G`` is
PSD; it says the smallest eigenvalue is rounding-sized as far as ``steps`` products can see.

Cost at ``d_in = 11008`` (LLaMA-7B's ``down_proj``): 32 products of the ``(d, d)`` matrix with a
vector, against one ``(d_out, d) × (d, d)`` product per Frank-Wolfe iteration; measured against a
Cholesky factorisation and a 256-row product in ``benchmarks/bench_psd_check.py``
(``results/psd_check.md``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

__all__ = ["PSD_TOLERANCE", "negative_curvature", "check_gram_psd"]

PSD_TOLERANCE = 1e-4  #: relative to ``λ_max``: curvature below ``−tol · λ_max`` is "clearly indefinite"
LANCZOS_STEPS = 32


@functools.partial(jax.jit, static_argnames=("steps",))
def negative_curvature(gram: Array, steps: int = LANCZOS_STEPS) -> tuple[Array, Array]:
    """``(smallest, largest)``: the least Rayleigh quotient of ``gram`` found (an upper bound on
    its smallest eigenvalue, exact for the direction found) and the largest (a lower bound on
    ``λ_max``), from the diagonal and ``steps`` Lanczos steps. Deterministic."""
    gram = (gram + gram.T) / 2
    d = gram.shape[0]
    steps = max(1, min(int(steps), d))
    dtype = gram.dtype
    diagonal = jnp.diag(gram)
    # A fixed start, made at trace time as a literal (a jax.random draw here would be a constant
    # that XLA folds at compile time, measured at 8 s for d = 11008).
    start = np.random.default_rng(0).standard_normal(d)
    start = jnp.asarray(start / np.linalg.norm(start), dtype)
    basis = jnp.zeros((steps, d), dtype).at[0].set(start)
    products = jnp.zeros((steps, d), dtype)  # G q_i, kept so the projection is exact
    tiny = jnp.finfo(dtype).tiny

    def step(i, carry):
        basis, products = carry
        q = basis[i]
        z = gram @ q
        products = products.at[i].set(z)
        z = z - basis.T @ (basis @ z)  # full reorthogonalisation (rows not yet filled are zero)
        z = z - basis.T @ (basis @ z)  # twice is enough
        norm = jnp.linalg.norm(z)
        ok = norm > 1e3 * tiny
        nxt = jnp.where(ok, z / jnp.where(ok, norm, 1), 0)  # an exhausted Krylov space adds nothing
        basis = jax.lax.cond(i + 1 < steps, lambda b: b.at[i + 1].set(nxt), lambda b: b, basis)
        return basis, products

    basis, products = jax.lax.fori_loop(0, steps, step, (basis, products))
    # Rayleigh-Ritz on the whole projection Q G Qᵀ (not the Lanczos tridiagonal, which loses
    # exactness once the Krylov space is exhausted): its extreme Ritz vectors y = Qᵀs give true
    # Rayleigh quotients sᵀ(QGQᵀ)s / ‖Qᵀs‖², ignoring directions left empty.
    projected = basis @ products.T
    projected = (projected + projected.T) / 2
    _, vectors = jnp.linalg.eigh(projected)
    quotients = []
    for s in (vectors[:, 0], vectors[:, -1]):
        y = basis.T @ s
        norm2 = y @ y
        quotients.append(jnp.where(norm2 > 0.5, (s @ projected @ s) / jnp.where(norm2 > 0, norm2, 1), jnp.nan))
    smallest = jnp.fmin(jnp.min(diagonal), quotients[0])
    largest = jnp.fmax(jnp.max(diagonal), quotients[1])
    return smallest, largest


def check_gram_psd(gram, *, tol: float = PSD_TOLERANCE, name: str = "gram") -> None:
    """Raise ``ValueError`` if ``gram`` (concrete) is clearly not positive semidefinite: a
    direction with curvature below ``−tol · λ_max`` exists. A matrix PSD up to rounding passes."""
    smallest, largest = (float(x) for x in negative_curvature(jnp.asarray(gram)))
    scale = max(largest, 0.0)
    if smallest < -tol * scale or (scale == 0.0 and smallest < 0.0):
        raise ValueError(
            f"{name} is not positive semidefinite: its smallest eigenvalue is at most {smallest:.9g} "
            f"(largest about {largest:.6g}). The layer error is convex, and its lower bound valid, "
            "only for a PSD Gram matrix G = X Xᵀ of calibration inputs; build G from activations."
        )
