"""Get and set model weights by their Hugging Face names.

Every parameter of our models lives at the attribute path of its Hugging Face name, so
``"model.layers.3.mlp.up_proj.weight"`` is ``model.model.layers[3].mlp.up_proj.weight``. Linear
layers are named without the ``.weight`` suffix (``"model.layers.3.mlp.up_proj"``) and their
weights are always ``(d_out, d_in)`` float32 arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._layers import Linear


def resolve(model: nnx.Module, dotted: str):
    """The submodule or parameter at a dotted path (``"self_attn.q_proj"``; digits index lists)."""
    obj = model
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part, None)
        if obj is None:
            raise KeyError(f"model has no parameter or module named {dotted!r}")
    return obj


def param_names(model: nnx.Module) -> list[str]:
    """Dotted Hugging Face names of all parameters, in model order."""
    return [
        ".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
    ]


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every parameter (works on abstract models too)."""
    return {
        ".".join(str(p) for p in path): tuple(v.get_value().shape)
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def get_param(model: nnx.Module, name: str) -> jax.Array:
    """The parameter called ``name`` (e.g. ``"model.norm.weight"``)."""
    var = resolve(model, name)
    if not isinstance(var, nnx.Param):
        raise KeyError(f"{name!r} is not a parameter")
    return var.get_value()


def set_param(model: nnx.Module, name: str, value) -> None:
    """Replace parameter ``name`` in place; the shape must match, the value becomes float32."""
    var = resolve(model, name)
    if not isinstance(var, nnx.Param):
        raise KeyError(f"{name!r} is not a parameter")
    old = var.get_value()
    if tuple(np.shape(value)) != tuple(old.shape):
        raise ValueError(f"{name}: shape {tuple(np.shape(value))}, expected {tuple(old.shape)}")
    if isinstance(value, jax.Array):
        var.set_value(value.astype(jnp.float32))
    else:
        # device_put moves host arrays with one copy; jnp.asarray made two on CPU.
        var.set_value(jax.device_put(np.asarray(value, dtype=np.float32)))


def linear_names(model: nnx.Module) -> list[str]:
    """Names of the linear layers inside the decoder blocks (what pruning touches)."""
    names = []
    for b, block in enumerate(model.blocks):
        for _, members in block.LINEAR_GROUPS:
            names += [f"{model.block_path}.{b}.{m}" for m in members]
    return names


def get_linear_weight(model: nnx.Module, name: str) -> jax.Array:
    """Weight of linear layer ``name`` as ``(d_out, d_in)``."""
    layer = resolve(model, name)
    if not isinstance(layer, Linear):
        raise KeyError(f"{name!r} is not a linear layer")
    return layer.weight.get_value()


def set_linear_weight(model: nnx.Module, name: str, weight) -> None:
    """Write a ``(d_out, d_in)`` weight into linear layer ``name`` (in place)."""
    layer = resolve(model, name)
    if not isinstance(layer, Linear):
        raise KeyError(f"{name!r} is not a linear layer")
    set_param(model, name + ".weight", weight)


def set_linear_weights(model: nnx.Module, weights: dict) -> None:
    """``set_linear_weight`` for every ``{name: (d_out, d_in) weight}`` of a dict."""
    for name, w in weights.items():
        set_linear_weight(model, name, w)
