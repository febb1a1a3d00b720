"""Generic calibration for any Flax linen model: Dense kernels by parameter path.

A user's own linen model (or a transformers 4.x Flax model's module and params) can be pruned
without porting it. Linear layers are found by parameter path: every 2-D ``kernel`` leaf is a
linear layer named by its module path (``"Block_0/Dense_1"``). Their inputs are captured with
``flax.linen.intercept_methods`` inside one jitted function, and accumulated into Gram matrices
``G = Σ x xᵀ`` batch by batch::

    layers = linen_linears(params)                      # [LinenLinear(name, (d_out, d_in))]
    grams = linen_grams(module, params, batches)        # {name: (d_in, d_in)}
    params = set_linen_linears(params, {name: pruned})  # a new params tree

Kernels are taken to be ``nn.Dense`` style, ``(d_in, d_out)``. Layers that store
``(d_out, d_in)`` (transformers' ``FlaxConv1D`` in GPT-2) are named by ``kernel_is_out_in``.
Kernels of other ranks (``DenseGeneral`` with several axes, ``nn.scan``-stacked layers) are
skipped. A module called several times (weight sharing) gets the sum over its calls.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze


class LinenLinear(NamedTuple):
    """A linear layer found in a linen params tree: module path and ``(d_out, d_in)`` weight."""

    name: str
    weight: jax.Array


def _params_root(params):
    params = unfreeze(params) if not isinstance(params, dict) else params
    return params["params"] if set(params) == {"params"} else params


def _kernels(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _kernels(value, prefix + (key,))
        elif key == "kernel" and getattr(value, "ndim", 0) == 2:
            yield "/".join(prefix), value


def linen_linears(
    params, *, kernel_is_out_in: Callable[[str], bool] | None = None
) -> list[LinenLinear]:
    """Every 2-D ``kernel`` of ``params`` as a (d_out, d_in) weight, named by module path.

    ``params`` may include the ``"params"`` level or not.
    """
    out_in = kernel_is_out_in or (lambda name: False)
    return [
        LinenLinear(name, kernel if out_in(name) else kernel.T)
        for name, kernel in _kernels(_params_root(params))
    ]


def set_linen_linears(
    params, weights: dict, *, kernel_is_out_in: Callable[[str], bool] | None = None
):
    """A copy of ``params`` with ``{name: (d_out, d_in) weight}`` written into the kernels."""
    out_in = kernel_is_out_in or (lambda name: False)
    wrapped = not isinstance(params, dict) or set(params) == {"params"}
    root = jax.tree_util.tree_map(lambda x: x, _params_root(params))  # new containers
    for name, weight in weights.items():
        node = root
        for key in name.split("/"):
            if not isinstance(node, dict) or key not in node:
                raise KeyError(f"no linear layer {name!r} in params")
            node = node[key]
        kernel = node.get("kernel")
        weight = jnp.asarray(weight) if out_in(name) else jnp.asarray(weight).T
        if kernel is None or kernel.shape != weight.shape:
            raise ValueError(
                f"{name}: weight does not fit kernel of shape {getattr(kernel, 'shape', None)}"
            )
        node["kernel"] = weight.astype(kernel.dtype)
    return {"params": root} if wrapped else root


def _capturing_apply(module: nn.Module, method, dtype, out_in, apply_kwargs):
    def run(variables, grams, args):
        grams = dict(grams)

        def interceptor(next_fun, call_args, call_kwargs, context):
            if context.method_name == "__call__" and call_args:
                own = context.module.variables.get("params", {})
                kernel = own.get("kernel") if hasattr(own, "get") else None
                if getattr(kernel, "ndim", 0) == 2:
                    name = "/".join(context.module.path)
                    d_in = kernel.shape[1] if out_in(name) else kernel.shape[0]
                    x = call_args[0]
                    if x.shape[-1] == d_in:
                        x = x.reshape(-1, d_in).astype(dtype)
                        g = jnp.einsum("ni,nj->ij", x, x, precision=jax.lax.Precision.HIGHEST)
                        grams[name] = grams[name] + g if name in grams else g
            return next_fun(*call_args, **call_kwargs)

        with nn.intercept_methods(interceptor):
            module.apply(variables, *args, method=method, **apply_kwargs)
        return grams

    return run


def linen_grams(
    module: nn.Module,
    params,
    batches: Iterable[Any],
    *,
    method: str | Callable | None = None,
    dtype=jnp.float32,
    kernel_is_out_in: Callable[[str], bool] | None = None,
    **apply_kwargs,
) -> dict[str, jax.Array]:
    """Gram matrix of the input of every linear layer of a linen model, over all batches.

    Args:
      module: the linen module.
      params: its parameters (with or without the ``"params"`` level).
      batches: an iterable of inputs; each is one positional argument of ``module.apply`` or a
        tuple of them. All batches should share shapes (one compilation).
      method: the method to apply (default ``__call__``).
      dtype: accumulation dtype, ``jnp.float32`` or ``jnp.float64``.
      kernel_is_out_in: names of layers whose kernel is ``(d_out, d_in)``.
      apply_kwargs: passed to ``module.apply`` (e.g. ``deterministic=True``).

    Returns:
      ``{name: (d_in, d_in)}`` for every layer whose ``__call__`` ran, names as in
      :func:`linen_linears`.
    """
    out_in = kernel_is_out_in or (lambda name: False)
    variables = {"params": _params_root(params)}
    run = jax.jit(_capturing_apply(module, method, jnp.dtype(dtype), out_in, apply_kwargs))
    grams = None
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        if grams is None:
            shapes = jax.eval_shape(run, variables, {}, args)
            grams = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
        grams = run(variables, grams, args)
    if grams is None:
        raise ValueError("linen_grams needs at least one batch")
    return grams
