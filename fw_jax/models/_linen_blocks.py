"""A linen model and its parameters seen as a Flax NNX model, for ``fw_jax.prune``.

    shadow = LinenBlocks(module, params, batches[0], forward)  # an nnx.Module; shadow.copies[b]: block b
    fw_jax.prune(shadow, batches, blocks=shadow.blocks_path)
    new_params = shadow.new_params()

**Blocks.** A linen model's blocks are the submodules of one type called one after another
whose names are a prefix and an index (``layers_0``, ``layers_1``, ...: what a list assigned in
``setup``, modules named ``f"layers_{i}"`` or unnamed compact ones ``Block_0``, ``Block_1`` are
called), found by running the model once under :func:`flax.linen.intercept_methods`: the longest
run of two or more that is not inside a member of another (a block's own ``Dense_0``,
``Dense_1``), or the one whose prefix is ``blocks=`` (``"layers"``, ``"decoder/layers"`` below a
submodule). Each becomes a
:class:`LinenBlock`, an NNX module holding a copy of the block's ``params`` as ``nnx.Param``
leaves and calling the linen block on them; the copies sit at the blocks' own path in the NNX
model (``layers``, ``decoder.layers``), so ``fw_jax.prune``'s tracer names a weight
``layers.3.Dense_0.kernel``. Only the ``params`` collection is pruned; a block that reads another
collection (batch statistics, a cache) is not supported.

**Running.** :meth:`LinenBlocks.__call__` runs ``forward(module, variables, batch)`` (default
``module.apply(variables, batch)``) with each block's call rerouted to its :class:`LinenBlock`,
so pruned weights are what the next block sees. :meth:`LinenBlocks.new_params` is the whole
parameter tree with every block's subtree replaced by its (pruned) copy; nothing else changes.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

from flax import linen as nn
from flax import nnx

__all__ = ["LinenBlock", "LinenBlocks", "is_linen_pair"]

_INDEXED = re.compile(r"(.+)_(\d+)$")


def is_linen_pair(model) -> bool:
    """Whether ``model`` is a linen ``(module, params)`` pair."""
    return isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module)


class _Tree(nnx.Module):
    """A nested ``{name: array}`` dict as attributes: sub-dicts are ``_Tree``s, arrays ``nnx.Param``s."""

    def __init__(self, tree: dict):
        for name, value in tree.items():
            setattr(self, name, _Tree(value) if isinstance(value, dict) else nnx.Param(value))


class _Given:
    """The parameters as given, kept out of the NNX module's state (they are not pruned)."""

    __slots__ = ("params",)

    def __init__(self, params: dict):
        self.params = params


def _as_dict(tree) -> dict:
    return {k: _as_dict(v) if hasattr(v, "items") else v for k, v in tree.items()}


class LinenBlock(_Tree):
    """One linen block and a copy of its parameters, called as an NNX module."""

    def __init__(self, module: nn.Module, params: dict):
        super().__init__(params)
        self._linen = module  # unbound, without a parent

    def pure(self) -> dict:
        """The block's parameters, a plain nested dict (pruned ones once pruned)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, *args, **kwargs):
        return self._linen.apply({"params": self.pure()}, *args, **kwargs)


class LinenBlocks(nnx.Module):
    """A linen ``module`` and its ``params`` (a ``{"params": ...}`` variables dict or the params
    tree itself) as an NNX model whose blocks are :class:`LinenBlock` copies (:attr:`copies`) (module text).

    Args:
      module: the linen model.
      params: its parameters.
      batch: one calibration batch, to find the blocks by running the model once.
      forward: ``forward(module, variables, batch)`` runs the model (default
        ``module.apply(variables, batch)``), eagerly.
      blocks: the blocks' name prefix (``"layers"``; ``"decoder/layers"`` for those of a
        submodule), when they are not the longest run of indexed submodules of one type.
    """

    def __init__(self, module: nn.Module, params, batch, forward: Optional[Callable] = None,
                 blocks: Optional[str] = None):
        tree = _as_dict(params)
        self._wrapped = "params" in tree and len(tree) == 1 and isinstance(tree["params"], dict)
        self._given = _Given(tree["params"] if self._wrapped else tree)
        self._module = module
        self._forward = forward if forward is not None else (lambda m, variables, x: m.apply(variables, x))
        paths, modules = self._find(batch, blocks)
        self._paths = paths
        where = (*paths[0][:-1], _INDEXED.match(paths[0][-1]).group(1))
        #: the dotted path of the blocks in this model (``"layers"``, ``"decoder.layers"``)
        self.blocks_path = ".".join(where)
        holder = self
        for part in where[:-1]:
            setattr(holder, part, _Tree({}))
            holder = getattr(holder, part)
        setattr(holder, where[-1], nnx.List([LinenBlock(m, _subtree(self._given.params, p)) for p, m in zip(paths, modules)]))

    @property
    def copies(self) -> nnx.List:
        """The :class:`LinenBlock` copies, in order."""
        holder = self
        for part in self.blocks_path.split("."):
            holder = getattr(holder, part)
        return holder

    def _find(self, batch, prefix: Optional[str]):
        seen: dict = {}

        def record(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__" and module.scope is not None:
                seen.setdefault(tuple(module.scope.path), module.clone(parent=None, _deep_clone=True))
            return next_fun(*args, **kwargs)

        try:
            with nn.intercept_methods(record):
                self._forward(self._module, self._variables(self._given.params), batch)
        except Exception as e:
            raise RuntimeError(f"forward(module, variables, batch) raised {type(e).__name__} on the first "
                               f"calibration batch: {e}") from e
        runs: dict = {}
        for key, index, path, module in _indexed(seen):
            runs.setdefault(key, []).append((index, path, module))
        runs_all = set(runs)
        if prefix is not None:
            wanted = tuple(prefix.split("/"))
            runs = {k: v for k, v in runs.items() if k[:-1] == wanted}
            if not runs:
                names = sorted({"/".join(k[:-1]) for k in runs_all})
                raise ValueError(f"blocks={prefix!r}: {type(self._module).__name__} called no submodules named "
                                 f"{prefix}_0, {prefix}_1, ... (indexed submodules it called: "
                                 f"{', '.join(names) or 'none'})")
        else:  # runs of two or more, not inside a member of another run (a block's own Dense_0, Dense_1)
            members = {path for run in runs.values() if len(run) > 1 for _, path, _ in run}
            runs = {k: v for k, v in runs.items() if len(v) > 1
                    and not any(path[:n] in members for _, path, _ in v for n in range(1, len(path)))}
        if not runs:
            raise ValueError(f"{type(self._module).__name__} called no run of submodules named with an index (such "
                             "as layers_0, layers_1, ...: a list of blocks assigned in setup): pass blocks='prefix' "
                             "naming them, or an NNX model")
        key = max(runs, key=lambda k: len(runs[k]))
        found = sorted(runs[key], key=lambda item: item[0])
        if [i for i, _, _ in found] != list(range(len(found))):
            raise ValueError(f"the blocks {'/'.join(key[:-1])}_i are not numbered 0, 1, ..., "
                             f"{len(found) - 1}: found {[i for i, _, _ in found]}")
        return [path for _, path, _ in found], [module for _, _, module in found]

    def _variables(self, params: dict) -> dict:
        return {"params": params}

    def __call__(self, batch):
        by_path = {path: block for path, block in zip(self._paths, self.copies)}

        def reroute(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__" and module.scope is not None:
                block = by_path.get(tuple(module.scope.path))
                if block is not None:
                    return block(*args, **kwargs)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(reroute):
            return self._forward(self._module, self._variables(self.new_params(unwrapped=True)), batch)

    def new_params(self, unwrapped: bool = False) -> Any:
        """The model's parameters with every block's subtree replaced by its copy's, in the form
        they were given (wrapped in ``{"params": ...}`` or not)."""
        tree = self._given.params
        for path, block in zip(self._paths, self.copies):
            tree = _replaced(tree, path, block.pure())
        return {"params": tree} if self._wrapped and not unwrapped else tree


def _indexed(seen: dict):
    """``(run key, index, path, module)`` for every called submodule named ``<prefix>_<index>``;
    the run key is the parent path, the prefix and the module's type."""
    for path, module in seen.items():
        match = _INDEXED.match(path[-1]) if path else None
        if match:
            yield (*path[:-1], match.group(1), type(module)), int(match.group(2)), path, module


def _subtree(tree: dict, path: tuple) -> dict:
    for name in path:
        if name not in tree:
            raise ValueError(f"the parameters have no entry {'/'.join(path)} for the block of that name: pass "
                             "the params the module was initialized with")
        tree = tree[name]
    return tree


def _replaced(tree: dict, path: tuple, value: dict) -> dict:
    if not path:
        return value
    return {**tree, path[0]: _replaced(tree[path[0]], path[1:], value)}
