"""Any Flax NNX model as the pruning engine's :class:`~fw_jax.models.Blocks`, found by tracing.

    blocks = TracedBlocks(model, lambda m, batch: m(batch["tokens"], batch["positions"]))
    hidden = blocks.first_inputs(batches)      # what block 0 was called with, per batch
    blocks.linears(0)                           # [LinearLayer(name, (d_out, d_in), input_key)]

**Blocks.** The model's blocks are a list of modules run one after another: found
automatically (the longest list or ``nnx.List`` of modules among the model's attributes, not
looking inside the lists) or named (``blocks="decoder.layers"``, a dotted path).
:meth:`TracedBlocks.first_inputs` runs ``forward(model, batch)`` (default ``model(batch)``) for
each batch until block 0 is called, and keeps the positional and keyword arguments it received;
``forward`` must call the model eagerly (not under ``jax.jit``/``nnx.jit``). Each block is then
called on these calls with its first positional argument replaced by the previous block's
output; the other arguments (positions, masks) are block 0's for every block, so a per-block
argument such as a KV cache is not supported (calibrate without one). A block's output is its
return value when that is an array, else the first array in it shaped like its input.

**Weights.** Each block's call is traced with its parameters as inputs
(:mod:`~fw_jax.models._contractions`); every parameter contracted with the activations, viewed
as ``(d_out, d_in)`` by the contraction, is a linear layer named by its parameter path
(``"layers.3.attn.q.kernel"``), with ``[e]`` for one expert of a stacked array or one batch
index of a batched contraction. Embeddings (gathers), norms and anything outside the blocks are
not contractions of a parameter with the activations and are left alone. Routers are left alone
too: a contraction whose output reaches a top-k, argmax or sort through no other contraction,
or whose ``d_out`` equals the number of experts of a stacked expert array of the same block.
``targets=`` (only weights whose name matches, routers included) and ``exclude=`` (regular
expressions searched in the names) override. A parameter contracted with two different inputs is
an error naming it (exclude it to leave it dense); parameters contracted with the activations
after any other computation (a merged LoRA, a scaled weight) or inside loops and conditionals
are left dense, with a warning naming them.

**Experts.** An expert's weight (one slice of a stacked array, or one batch index) counts only
the tokens routed to it: a token counts when the contraction's output for it changes the
block's output, which is found by differentiating a random projection of the block's output
with respect to that output (a token whose routing weight is exactly zero, or whose input was
zeroed before the expert, gets a zero gradient). This is exact for top-k routing computed
densely and masked before or after the expert. It cannot tell a routing weight that is small but
not zero (dense soft routing: every token counts), and it is applied only to weights that are
slices or batch indices of an array: experts kept as separate modules are calibrated on every
token they are applied to. An expert that fewer tokens reached than the block's hidden size is
pruned on fallback Gram matrices, by the rule the mixture-of-experts families read from folders
use (``_experts.py``): the experts of one module (``layers.3.mlp``) with the same index in each of
its stacked parameters form an expert; a parameter reading the block's hidden width gets the mean
of its experts' matrices (every token entering the layer), any other ``c·I`` (a row keeps its
largest weights). :attr:`TracedBlocks.expert_tokens` records each expert weight's tokens and
:attr:`TracedBlocks.fallbacks` the weights that used the fallback, and which.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import functools
import os
import re
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._calibration import LinearLayer
from ._contractions import (
    Contraction,
    Traced,
    _bind,  # one evaluation rule for both passes
    evaluate,
    find_contractions,
    operand_to_view,
    view_to_operand,
)
from ._experts import ExpertLayer, Stage, fallback

__all__ = ["TracedBlocks"]

class _Call(NamedTuple):
    """The arguments one block was called with, for one batch."""

    args: tuple
    kwargs: dict


class _Captured(Exception):
    """Raised by block 0 once its inputs are recorded: stops the rest of the forward."""


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _sequence_of_modules(value) -> bool:
    return (isinstance(value, (list, tuple, nnx.List)) and len(value) > 0
            and all(isinstance(m, nnx.Module) for m in value))


def _block_lists(module, prefix: str = "", seen=None) -> Iterator[tuple[str, Any]]:
    """Every list of modules among ``module``'s attributes, recursively, not inside the lists."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        path = f"{prefix}.{name}" if prefix else name
        if _sequence_of_modules(value):
            yield path, value
        elif isinstance(value, nnx.Module):
            yield from _block_lists(value, path, seen)


def _resolve(model, path: str):
    node = model
    for part in path.split("."):
        try:
            node = node[int(part)] if part.lstrip("-").isdigit() else getattr(node, part)
        except (AttributeError, IndexError, KeyError, TypeError) as e:
            raise ValueError(f"blocks={path!r}: {type(model).__name__} has no {part!r} there ({e})") from None
    return node


def _flat_call(call: _Call):
    """``(dynamic arrays, static description, rebuild)`` of a call's arguments."""
    leaves, treedef = jax.tree.flatten((call.args, call.kwargs))
    dynamic = tuple(i for i, x in enumerate(leaves) if _is_array(x))
    static = tuple((i, x) for i, x in enumerate(leaves) if i not in dynamic)

    def rebuild(arrays):
        merged = dict(static) | dict(zip(dynamic, arrays))
        args, kwargs = jax.tree.unflatten(treedef, [merged[i] for i in range(len(leaves))])
        return args, kwargs

    try:
        hash(static)
        static_key = static
    except TypeError:
        static_key = repr(static)
    signature = (treedef, dynamic, static_key,
                 tuple((tuple(leaves[i].shape), str(leaves[i].dtype)) for i in dynamic))
    return [leaves[i] for i in dynamic], signature, rebuild


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a static attribute that cannot be compared: no sharing
        return False


def _path_name(keys) -> str:
    parts = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in keys]
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return ".".join(str(p) for p in parts)


@dataclasses.dataclass(frozen=True, eq=False)
class _Weight:
    """A candidate linear layer of a block: one contraction (and one batch index of it)."""

    suffix: str  # after the parameter's path: "" or "[e]"
    leaf: int
    contraction: Contraction
    batch_index: int
    key: str  # the input key
    routed: bool  # an expert: only the tokens routed to it count
    router: bool


class _Plan:
    """What one traced block call looks like; shared by blocks with the same structure."""

    def __init__(self, traced: Traced, leaf_paths: list[str], leaf_shapes: list[tuple], hidden_out: int):
        self.traced = traced
        self.leaf_paths = leaf_paths
        self.hidden_out = hidden_out
        self.weights = self._weights(traced, leaf_shapes)

    def _weights(self, traced: Traced, leaf_shapes) -> list[_Weight]:
        by_leaf = collections.defaultdict(list)
        for c in traced.contractions:
            by_leaf[c.leaf].append(c)
        keys: dict = {}
        weights = []
        for c in traced.contractions:
            routed = c.selects or c.batch > 1
            uses = by_leaf[c.leaf]
            if not routed:
                base = keys.setdefault((c.act, c.a_batch, c.a_contract), f"input{len(keys)}")
            else:
                base = keys.setdefault(("routed", c.index), f"input{len(keys)}")
            expert = _expert_index(c, leaf_shapes[c.leaf]) if c.selects else None
            for bi in range(c.batch):
                if c.selects:
                    suffix = f"[{expert}]" if expert is not None else f"#{[u is c for u in uses].index(True)}"
                    suffix += f"[{bi}]" if c.batch > 1 else ""
                else:
                    suffix = f"[{bi}]" if c.batch > 1 else ""
                key = f"{base}[{bi}]" if c.batch > 1 else base
                weights.append(_Weight(suffix, c.leaf, c, bi, key, routed, c.index in traced.routers))
        experts = collections.Counter(w.leaf for w in weights if w.routed)
        stacked = {n for n in experts.values() if n > 1}
        return [dataclasses.replace(w, router=w.router or (not w.routed and w.contraction.d_out in stacked))
                for w in weights]

    @functools.lru_cache(maxsize=8)
    def grams_fn(self, indices: tuple, routed: tuple) -> Callable:
        """A jitted ``(params, others, arrays) -> ({index: (batch, tokens, d_in) rows}, {index:
        (batch, tokens) routed-token mask})`` for the contractions ``indices``."""
        traced, hidden_out = self.traced, self.hidden_out
        by_index = {c.index: c for c in traced.contractions}

        def walk(flat, deltas):
            captured, counter = {}, [0]

            def step(eqn, values):
                out = _bind(eqn, values)
                if eqn.primitive.name == "dot_general":
                    i = counter[0]
                    counter[0] += 1
                    if i in indices:
                        captured[i] = values[1 - by_index[i].weight_side]
                    if i in deltas:
                        out = [out[0] + deltas[i]]
                return out

            outs = evaluate(traced.jaxpr.jaxpr, traced.jaxpr.consts, flat, step)
            return outs[hidden_out], captured

        def fn(params, others, arrays):
            flat = [*params, *others, *arrays]
            masks = {}
            if routed:
                zeros = {i: jnp.zeros(by_index[i].out_shape, by_index[i].out_dtype) for i in routed}
                hidden, pullback, captured = jax.vjp(lambda d: walk(flat, d), zeros, has_aux=True)
                projection = jax.random.normal(jax.random.key(0), hidden.shape, jnp.float32).astype(hidden.dtype)
                (grads,) = pullback(projection)
                for i in routed:
                    c = by_index[i]
                    used = jnp.any(grads[i] != 0, axis=c.output_token_axes(grads[i].ndim))
                    masks[i] = used.reshape(c.batch, -1)
            else:
                _, captured = walk(flat, {})
            rows = {i: by_index[i].activation_rows(captured[i]) for i in indices}
            return rows, masks

        return jax.jit(fn)


def _expert_layers(by_key: dict, width: int) -> list[ExpertLayer]:
    """The routed weights among ``{input key: (weight, names)}`` as expert layers: grouped by the
    module holding the parameter (its path without the last part), each parameter a stage, an
    expert the same index (``[e]``) in every stage; a stage is shared when it reads ``width``
    inputs (the block's hidden size, the tokens entering the layer). A stage whose experts differ
    from its module's others is a layer of its own."""
    modules: dict = collections.defaultdict(lambda: collections.defaultdict(dict))
    for key, (w, names) in by_key.items():
        if w.routed:
            path = names[0][:len(names[0]) - len(w.suffix)]
            modules[path.rpartition(".")[0]][path][w.suffix] = (key, w.contraction.d_in == width)
    layers = []
    for module, stages in modules.items():
        by_experts = collections.defaultdict(list)
        for path, experts in stages.items():
            by_experts[tuple(sorted(experts, key=_natural))].append(experts)
        for suffixes, group in by_experts.items():
            group.sort(key=lambda experts: not next(iter(experts.values()))[1])  # shared stages first
            layers.append(ExpertLayer(tuple(module + s for s in suffixes),
                                      tuple(Stage(tuple(experts[s][0] for s in suffixes), next(iter(experts.values()))[1])
                                            for experts in group), width))
    return layers


def _natural(suffix: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", suffix)]


def _expert_index(c: Contraction, shape: tuple) -> Optional[int]:
    """The index along the parameter's first axis that the weight is the whole of, or ``None``."""
    zeros = jnp.zeros(shape, jnp.float32)
    _, pullback = jax.vjp(c.replay, zeros)
    (cover,) = pullback(jnp.ones(c.operand_shape, jnp.float32))
    cover = np.asarray(cover).reshape(shape[0], -1) if len(shape) > 1 else None
    if cover is None:
        return None
    used = np.flatnonzero(cover.any(axis=1))
    return int(used[0]) if len(used) == 1 and np.all(cover[used[0]] == 1) else None


class TracedBlocks:
    """Any Flax NNX model as :class:`~fw_jax.models.Blocks` (see the module's documentation).

    Args:
      model: an ``nnx.Module``; pruned in place.
      forward: ``forward(model, batch)`` runs one calibration batch (default ``model(batch)``),
        eagerly.
      blocks: a dotted path to the list of blocks (``"layers"``, ``"model.decoder.layers"``);
        ``None`` finds the longest list of modules.
      targets: a regular expression searched in the weights' names (parameter paths): only the
        weights it matches are pruned, routers included.
      exclude: a regular expression: the weights whose names it matches are left dense.
      sequential: ``False`` calibrates every block on the dense model's activations (block
        ``b``'s outputs are computed with its weights before pruning).

    Example:
      >>> blocks = TracedBlocks(model, lambda m, batch: m(batch), blocks="layers")
      >>> report = prune_model(blocks, batches, PruneSettings(sparsity=0.5))
    """

    def __init__(self, model, forward: Optional[Callable] = None, *, blocks: Optional[str] = None,
                 targets: Optional[str] = None, exclude: Optional[str] = None, sequential: bool = True):
        if isinstance(model, tuple) and len(model) == 2:
            raise TypeError("TracedBlocks takes a Flax NNX module; for a linen (module, params) pair call "
                            "fw_jax.prune((module, params), batches), which returns the new params")
        if not isinstance(model, nnx.Module):
            raise TypeError(f"expected a Flax NNX module (flax.nnx.Module), got {type(model).__name__}")
        self.model = model
        self.forward = forward if forward is not None else (lambda m, batch: m(batch))
        self.source = type(model).__name__
        self.sequential = sequential
        self.targets = re.compile(targets) if targets is not None else None
        self.exclude = re.compile(exclude) if exclude is not None else None
        self.path, self.blocks = self._find_blocks(blocks)
        self.expert_tokens: dict[str, int] = {}  #: tokens routed to each expert weight, over the calibration
        self.fallbacks: dict[str, str] = {}  #: expert weights pruned without their own Gram matrix, and how
        self.skipped: dict[str, str] = {}  #: parameters used with the activations but not pruned, and why
        self._signatures: list = []  # abstract block-0 calls, one per distinct shape
        self._plans: list = []  # (key, plan): blocks of one structure share a plan (keys may not hash)
        self._dense: dict[int, list] = {}
        self._captured: Optional[tuple] = None  # (batches, their calls) of the last first_inputs

    def _find_blocks(self, path: Optional[str]):
        if path is not None:
            blocks = _resolve(self.model, path)
            if not _sequence_of_modules(blocks):
                raise ValueError(f"blocks={path!r} is a {type(blocks).__name__}, not a list of modules run one "
                                 f"after another (e.g. an nnx.List of decoder layers)")
            return path, blocks
        found = list(_block_lists(self.model))
        if not found:
            raise ValueError(f"{self.source} has no list of modules run one after another (such as model.layers, "
                             "an nnx.List of decoder layers) among its attributes: pass blocks='path.to.layers'")
        return max(found, key=lambda pb: len(pb[1]))  # the first of the longest

    def __len__(self) -> int:
        return len(self.blocks)

    def block_path(self, b: int) -> str:
        return f"{self.path}.{b}"

    # --- block 0's inputs ---------------------------------------------------------------------

    def first_inputs(self, batches) -> list[_Call]:
        """Run ``forward`` on each batch until block 0 is called; its calls, one per batch (the
        same list object again for the same ``batches`` list: the forward is not run twice)."""
        if self._captured is not None and self._captured[0] is batches:
            return self._captured[1]
        calls = [self._capture(batch, i) for i, batch in enumerate(batches)]
        if not calls:
            raise ValueError("no calibration batches: pass at least one batch")
        self._signatures = list({_flat_call(c)[1]: c for c in calls}.values())
        if isinstance(batches, list):
            self._captured = (batches, calls)
        return calls

    def _capture(self, batch, i: int) -> _Call:
        block = self.blocks[0]
        cls = type(block)
        original = cls.__dict__.get("__call__")
        inherited = cls.__call__
        recorded: list[_Call] = []

        def recording(module, *args, **kwargs):
            if module is block:
                recorded.append(_Call(args, dict(kwargs)))
                raise _Captured()
            return inherited(module, *args, **kwargs)

        cls.__call__ = recording
        try:
            self.forward(self.model, batch)
        except _Captured:
            pass
        except Exception as e:
            if not recorded:
                raise RuntimeError(f"forward(model, batch) raised {type(e).__name__} on calibration batch {i}, "
                                   f"before block 0 ({self.block_path(0)}) was called: {e}") from e
        finally:
            if original is not None:
                cls.__call__ = original
            else:
                del cls.__call__
        if not recorded:
            raise ValueError(f"forward(model, batch) ran calibration batch {i} without calling block 0 "
                             f"({self.block_path(0)}, a {cls.__name__}): if forward runs the model under jax.jit "
                             "or nnx.jit, pass it without the jit; if the blocks are not "
                             f"{self.source}.{self.path}, pass blocks='path.to.layers'")
        call = recorded[0]
        if not call.args or not _is_array(call.args[0]):
            raise ValueError(f"block 0 ({self.block_path(0)}) was called without an array as its first positional "
                             "argument: fw_jax passes each block's output on as the next block's first argument")
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(call)):
            raise ValueError("block 0 was called inside a jax transformation (jax.jit, nnx.jit, vmap): pass a "
                             "forward that calls the model eagerly")
        return call

    # --- tracing ------------------------------------------------------------------------------

    def _state(self, b: int):
        block = self.blocks[b]
        graphdef, params, others = nnx.split(block, nnx.Param, ...)
        with_paths, param_def = jax.tree_util.tree_flatten_with_path(params)
        other_leaves, other_def = jax.tree.flatten(others)
        variables = {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(nnx.state(block, nnx.Param))}
        paths = [_path_name(kp) for kp, _ in with_paths]
        return graphdef, param_def, paths, [x for _, x in with_paths], other_def, other_leaves, variables

    def _plan(self, b: int, call: _Call) -> _Plan:
        graphdef, param_def, paths, params, other_def, others, _ = self._state(b)
        arrays, signature, rebuild = _flat_call(call)
        other_arrays = tuple(i for i, x in enumerate(others) if _is_array(x))
        other_static = tuple((i, x) for i, x in enumerate(others) if i not in other_arrays)
        key = (graphdef, signature, repr(other_static))
        for known, plan in self._plans:
            if _same(known, key):
                return plan
        n_params, n_others = len(params), len(other_arrays)

        def block_fn(*flat):
            merged = dict(other_static) | dict(zip(other_arrays, flat[n_params:n_params + n_others]))
            module = nnx.merge(graphdef, jax.tree.unflatten(param_def, flat[:n_params]),
                               jax.tree.unflatten(other_def, [merged[i] for i in range(len(others))]))
            args, kwargs = rebuild(flat[n_params + n_others:])
            return jax.tree.leaves(module(*args, **kwargs))

        shaped = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in
                  [*params, *(others[i] for i in other_arrays), *arrays]]
        try:
            traced = find_contractions(block_fn, n_params, n_others, shaped)
        except Exception as e:
            raise ValueError(f"block {b} ({self.block_path(b)}) cannot be traced with jax.make_jaxpr on the "
                             f"arguments block 0 received: {type(e).__name__}: {e}") from e
        hidden = call.args[0]
        matches = [i for i, shape in enumerate(traced.out_shapes) if shape == tuple(hidden.shape)]
        if not matches:
            raise ValueError(f"block {b} ({self.block_path(b)}) returns no array shaped like its input "
                             f"{tuple(hidden.shape)} (it returns shapes {traced.out_shapes}): fw_jax passes a block's "
                             "output on as the next block's first argument")
        plan = _Plan(traced, paths, [tuple(x.shape) for x in params], matches[0])
        self._plans.append((key, plan))
        return plan

    def _weights(self, b: int) -> tuple[list[tuple[str, _Weight]], dict]:
        """Block ``b``'s selected weights as ``(name, weight)`` and the plan of each signature."""
        if not self._signatures:
            raise ValueError("call first_inputs(batches) first: the blocks are traced on block 0's arguments")
        plans = {sig: self._plan(b, call) for sig, call in ((_flat_call(c)[1], c) for c in self._signatures)}
        prefix = self.block_path(b)
        chosen = None
        for plan in plans.values():
            named = [(f"{prefix}.{plan.leaf_paths[w.leaf]}{w.suffix}", w) for w in plan.weights]
            selected = [(n, w) for n, w in named if self._selected(n, w)]
            self._check(b, plan, selected)
            names = set()  # a weight contracted twice with the same input is one layer
            selected = [(n, w) for n, w in selected if not (n in names or names.add(n))]
            shapes = [(n, w.key, w.contraction.d_out, w.contraction.d_in) for n, w in selected]
            if chosen is None:
                chosen, first_shapes = selected, shapes
            elif shapes != first_shapes:
                raise ValueError(f"block {b} ({prefix}) uses different weights for calibration batches of different "
                                 "shapes: pass batches of one shape")
        return chosen, plans

    def _selected(self, name: str, w: _Weight) -> bool:
        if self.exclude is not None and self.exclude.search(name):
            return False
        if self.targets is not None:
            return bool(self.targets.search(name))
        if w.router:
            self.skipped.setdefault(name, "a router (its output chooses experts)")
        return not w.router

    def _check(self, b: int, plan: _Plan, selected) -> None:
        uses = collections.defaultdict(dict)  # leaf -> {contraction index: weight}
        for name, w in selected:
            uses[w.leaf].setdefault(w.contraction.index, (name, w))
        for leaf, by_index in uses.items():
            ws = list(by_index.values())
            full = [(n, w) for n, w in ws if not w.contraction.selects]
            others = [(n, w) for n, w in ws if (n, w) not in full]
            inputs = {(w.contraction.act, w.contraction.a_batch, w.contraction.a_contract) for _, w in full}
            if len(inputs) > 1 or (full and others) or len({n for n, _ in others}) < len(others):
                path = f"{self.block_path(b)}.{plan.leaf_paths[leaf]}"
                raise ValueError(f"parameter {path} is contracted with {len(ws)} different inputs in block {b}: fw_jax "
                                 f"prunes a weight for the one input it multiplies; leave it dense with "
                                 f"exclude={re.escape(path)!r} (or prune the model's own layers elsewhere)")
        leaves = plan.traced.unrecognised | plan.traced.in_bodies
        new = {f"{self.block_path(b)}.{plan.leaf_paths[i]}" for i in leaves} - set(self.skipped)
        for i in plan.traced.unrecognised:
            self.skipped.setdefault(f"{self.block_path(b)}.{plan.leaf_paths[i]}",
                                    "contracted with the activations after computations other than layout changes")
        for i in plan.traced.in_bodies:
            self.skipped.setdefault(f"{self.block_path(b)}.{plan.leaf_paths[i]}",
                                    "used with the activations inside a loop or conditional (not looked into)")
        if new and b == 0:
            warnings.warn("left dense in every block (not recognised as linear layers): "
                          + "; ".join(f"{n}: {self.skipped[n]}" for n in sorted(new)), stacklevel=3)

    # --- the Blocks protocol ------------------------------------------------------------------

    @contextlib.contextmanager
    def resident(self, b: int, tensors: Optional[dict] = None) -> Iterator[None]:
        """The model is in memory already; with ``tensors`` (``{parameter path: array}``, as
        :meth:`tensors` gives), block ``b``'s parameters are set to them first."""
        if tensors is not None:
            variables = self._variables(b)
            for name, value in tensors.items():
                if name not in variables:
                    raise ValueError(f"no parameter {name} in block {b} ({self.block_path(b)})")
                if tuple(np.shape(value)) != tuple(variables[name].shape):
                    raise ValueError(f"{name}: saved shape {np.shape(value)} is not the parameter's "
                                     f"{variables[name].shape}")
                variables[name].set_value(jnp.asarray(value, variables[name].dtype))
        yield

    def tensors(self, b: int) -> dict:
        """``{parameter path: array}`` of block ``b``'s parameters (what :meth:`resident` takes back)."""
        return {name: v.get_value() for name, v in self._variables(b).items()}

    def write_shard(self, b: int, path) -> None:
        """Block ``b``'s parameters to a safetensors file at ``path``, each in its dtype, atomically."""
        from ._shards import _write_atomic

        items = [(name, tuple(v.shape), np.dtype(v.dtype), lambda v=v: np.asarray(v.get_value()))
                 for name, v in self._variables(b).items()]
        _write_atomic(os.fspath(path), items, {"format": "flax", "model": self.source})

    def read_shard(self, b: int, path) -> dict:
        """The parameters :meth:`write_shard` wrote, checked to be exactly block ``b``'s (names,
        shapes, dtypes) and finite; :class:`~fw_jax.models.CheckpointError` names the file."""
        from ._errors import CheckpointError
        from ._loaded import _count_nonfinite
        from ._safetensors import SafetensorsFile

        file = SafetensorsFile(path)
        expected = {name: (tuple(v.shape), np.dtype(v.dtype)) for name, v in self._variables(b).items()}
        found = {name: (tuple(file.shape(name)), np.dtype(file.dtype(name))) for name in file.keys()}
        for name in sorted(set(expected) | set(found)):
            if found.get(name) != expected.get(name):
                raise CheckpointError(path, f"tensor {name!r} is {found.get(name, 'missing')}, expected "
                                            f"{expected.get(name, 'none (not a parameter of block ' + str(b) + ')')}")
        tensors = {name: file.get(name) for name in found}
        for name, value in tensors.items():
            if _count_nonfinite(value):
                raise CheckpointError(path, f"tensor {name!r} holds non-finite values (NaN or inf)")
        return tensors

    def _variables(self, b: int) -> dict:
        prefix = self.block_path(b)
        return {f"{prefix}.{'.'.join(str(p) for p in path)}": v
                for path, v in nnx.to_flat_state(nnx.state(self.blocks[b], nnx.Param))}

    def _params(self, b: int) -> list:
        return self._state(b)[3]

    def linears(self, b: int) -> list[LinearLayer]:
        """Block ``b``'s linear layers in forward order, as float32 ``(d_out, d_in)`` weights."""
        selected, _ = self._weights(b)
        self._keep_dense(b)
        params = self._params(b)
        views = {}
        layers = []
        for name, w in selected:
            c = w.contraction
            if c.index not in views:
                views[c.index] = operand_to_view(c, c.replay(params[w.leaf]))
            layers.append(LinearLayer(name, views[c.index][w.batch_index].astype(jnp.float32), w.key))
        return layers

    def grams(self, b: int, hidden: list[_Call], *, return_inputs: bool = False):
        """``{input_key: Σ x xᵀ}`` (float32) over the calls ``hidden``, experts' over their routed
        tokens; with ``return_inputs`` also ``{input_key: (n_tokens, d_in)}``."""
        selected, plans = self._weights(b)
        self._keep_dense(b)
        graphdef, _, _, params, _, others, _ = self._state(b)
        other_arrays = [x for x in others if _is_array(x)]
        by_key = {}
        for name, w in selected:
            by_key.setdefault(w.key, (w, []))[1].append(name)
        indices = tuple(sorted({w.contraction.index for w, _ in by_key.values()}))
        routed = tuple(sorted({w.contraction.index for w, _ in by_key.values() if w.routed}))
        grams: dict = {}
        counts: dict = {}
        inputs: dict = collections.defaultdict(list)
        for call in hidden:
            arrays, signature, _ = _flat_call(call)
            plan = plans.get(signature) or self._plan(b, call)
            rows, masks = plan.grams_fn(indices, routed)(params, other_arrays, arrays)
            for key, (w, _) in by_key.items():
                x = rows[w.contraction.index][w.batch_index]
                if w.routed:
                    used = masks[w.contraction.index][w.batch_index]
                    x = x * used[:, None].astype(x.dtype)
                    counts[key] = counts.get(key, 0) + jnp.sum(used, dtype=jnp.int32)  # read once, after the batches
                    if return_inputs:
                        inputs[key].append(np.asarray(x)[np.asarray(used)])
                elif return_inputs:
                    inputs[key].append(np.asarray(x))
                gram = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
                grams[key] = gram if key not in grams else grams[key] + gram
        counts = {key: int(n) for key, n in counts.items()}
        width = hidden[0].args[0].shape[-1]
        for layer in _expert_layers(by_key, width):
            grams, notes = fallback(layer, grams, counts)
            for key, note in notes.items():
                for name in by_key[key][1]:
                    self.fallbacks[name] = note
                if return_inputs and not counts[key]:  # no token: report the weights' own error
                    inputs[key] = [np.eye(grams[key].shape[0], dtype=np.float32)]
        for key, (w, names) in by_key.items():
            if w.routed:
                for name in names:
                    self.expert_tokens[name] = counts[key]
        if return_inputs:
            return grams, {key: jnp.asarray(np.concatenate(parts)) for key, parts in inputs.items()}
        return grams

    def layer_notes(self, b: int) -> dict[str, dict]:
        """``{layer name: fields}`` the engine adds to the layer records of block ``b``: an
        expert's routed ``tokens`` and, if it got none, its ``fallback``."""
        notes: dict[str, dict] = {}
        for name, tokens in self.expert_tokens.items():
            notes.setdefault(name, {})["tokens"] = tokens
        for name, how in self.fallbacks.items():
            notes.setdefault(name, {})["fallback"] = how
        return notes

    def token_count(self, hidden: list[_Call]) -> int:
        """Calibration tokens in ``hidden``: the block input's positions (all but its last axis)."""
        return int(sum(np.prod(call.args[0].shape[:-1]) for call in hidden))

    def run(self, b: int, hidden: list[_Call]) -> list[_Call]:
        """Block ``b``'s outputs as the next block's calls (with its dense weights when not
        sequential)."""
        block = self.blocks[b]
        dense = self._dense.pop(b, None) if not self.sequential else None
        variables = list(self._variables(b).values())
        pruned = [v.get_value() for v in variables]
        if dense is not None:
            for v, value in zip(variables, dense):
                v.set_value(value)
        try:
            outputs = []
            for call in hidden:
                out = block(*call.args, **call.kwargs)
                outputs.append(call._replace(args=(self._hidden_of(b, out, call.args[0]),) + tuple(call.args[1:])))
        finally:
            if dense is not None:
                for v, value in zip(variables, pruned):
                    v.set_value(value)
        self._dense = {}
        return outputs

    def _hidden_of(self, b: int, out, hidden):
        if _is_array(out):
            return out
        for leaf in jax.tree.leaves(out):
            if _is_array(leaf) and leaf.shape == hidden.shape:
                return leaf
        raise ValueError(f"block {b} ({self.block_path(b)}) returned no array shaped like its input "
                         f"{tuple(hidden.shape)}: fw_jax passes a block's output on as the next block's first argument")

    def _keep_dense(self, b: int) -> None:
        if not self.sequential and b not in self._dense:
            self._dense[b] = [v.get_value() for v in self._variables(b).values()]

    def set_weights(self, b: int, weights: dict) -> None:
        """Write ``{name: (d_out, d_in)}`` into block ``b``'s parameters (in their dtype): each
        weight back through its contraction's layout, an expert into its slice."""
        selected, _ = self._weights(b)
        known = dict(selected)
        unknown = sorted(set(weights) - set(known))
        if unknown:
            raise ValueError(f"block {b} has no linear layer {', '.join(unknown)}")
        _, _, paths, params, _, _, variables = self._state(b)
        by_leaf = collections.defaultdict(lambda: collections.defaultdict(dict))
        for name, value in weights.items():
            w = known[name]
            c = w.contraction
            if tuple(np.shape(value)) != (c.d_out, c.d_in):
                raise ValueError(f"{name}: expected a ({c.d_out}, {c.d_in}) weight, got shape {np.shape(value)}")
            by_leaf[w.leaf][c.index][w.batch_index] = (c, value)
        for leaf, by_contraction in by_leaf.items():
            param = params[leaf]
            new, cover = jnp.zeros_like(param), jnp.zeros(param.shape, jnp.float32)
            for index, batch in by_contraction.items():
                c = next(iter(batch.values()))[0]
                view = operand_to_view(c, c.replay(param))
                for bi, (_, value) in batch.items():
                    value, kept = jnp.asarray(value), view[bi]  # a weight kept as it was stays bit for bit
                    view = view.at[bi].set(jnp.where(value == kept.astype(value.dtype), kept, value.astype(param.dtype)))
                _, pullback = jax.vjp(c.replay, param)
                (scattered,) = pullback(view_to_operand(c, view))
                if not c.selects:  # a bijection: the whole parameter
                    new, cover = scattered, None
                    break
                _, cover_back = jax.vjp(c.replay, jnp.zeros(param.shape, jnp.float32))
                cover = cover + cover_back(jnp.ones(c.operand_shape, jnp.float32))[0]
                new = new + scattered
            if cover is not None:
                new = jnp.where(cover > 0, new, param)
            variables[tuple(paths[leaf].split("."))].set_value(new.astype(param.dtype))
