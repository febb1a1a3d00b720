"""Which parameters of a traced function are linear layers, and what their inputs are.

A block of any Flax model is traced to a jaxpr with its parameters as inputs
(:func:`find_contractions`). Every ``dot_general`` (``x @ W``, ``jnp.einsum``, ``nnx.Linear``,
inside ``jit``, ``remat`` or ``custom_jvp`` calls too) whose one operand is a parameter seen
only through layout operations (reshape, transpose, dtype casts, squeeze, expand_dims, slicing,
``dynamic_slice`` or ``gather`` at constant indices, e.g. one expert ``w[e]`` of a stacked
``(E, D, F)`` array) and whose other operand depends on the block's inputs is a linear layer:
a :class:`Contraction`. Its weight is the parameter viewed as ``(d_out, d_in)`` by that very
contraction: the contracted dimensions, in the order they pair with the activation's, are
``d_in``; the others ``d_out``; the contraction's batch dimensions on the weight (a batched
einsum over experts, ``"ecd,edf->ecf"``) make one layer per batch index.

The activation operand of each contraction is captured by evaluating the same jaxpr again,
equation by equation (:func:`evaluate`), inside ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

__all__ = ["Contraction", "Traced", "evaluate", "find_contractions", "operand_to_view", "view_to_operand"]

# Calls whose body is inlined: a weight keeps its identity through them (jnp.einsum is a jit).
_CALLS = {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
# Operations that only move or cast elements; the operands after the first must be constants.
_LAYOUT = {"reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim", "slice", "dynamic_slice",
           "gather", "rev", "convert_element_type", "copy", "copy_p", "reduce_precision"}
_CASTS = {"convert_element_type", "copy", "copy_p", "reduce_precision"}  # the same elements: not replayed
_SIZE_PRESERVING = {"reshape", "transpose", "squeeze", "expand_dims", "rev"}  # bijections
# Operations that choose among their input's entries: a contraction feeding one (through no other
# contraction) computes routing scores, and its weight is a router.
_ROUTING = {"top_k", "approx_top_k", "argmax", "argmin", "sort"}


class _Op(NamedTuple):
    """One layout operation applied to a weight: replayed on the parameter to get its view."""

    primitive: Any
    params: dict
    others: tuple  # the constant operands after the first (slice starts, gather indices)


class _Act(NamedTuple):
    """An activation-dependent value: the value it is a layout view of, and those operations."""

    source: int
    ops: tuple


class _Weight(NamedTuple):
    """A parameter leaf seen only through layout operations."""

    leaf: int
    ops: tuple  # of _Op, casts left out


class _Derived(NamedTuple):
    """A value computed from parameters (and constants) other than by layout operations."""

    leaves: frozenset


class _Value(NamedTuple):
    value: Any
    tag: Any  # None (a constant, or state that is neither a parameter nor an input), _Act, _Weight, _Derived
    recent: frozenset  # the contractions this value comes from through no other contraction


@dataclasses.dataclass(frozen=True, eq=False)
class Contraction:
    """A parameter used as the weight of one ``dot_general`` with an activation.

    Attributes:
      index: the ``dot_general``'s position among all of them in evaluation order.
      leaf: the parameter's index in the flat parameter list.
      ops: the layout operations from the parameter to the weight operand (casts left out).
      operand_shape: the weight operand's shape.
      weight_side: 0 if the weight is the ``dot_general``'s left operand, 1 if the right.
      w_batch, w_contract: the weight operand's batch and contracted dimensions; the others are
        its output dimensions.
      a_batch, a_contract: the activation operand's, paired with the weight's in order.
      act: what the activation operand is (equal for two contractions that read the same value
        the same way).
      out_shape, out_dtype: the ``dot_general``'s output.
    """

    index: int
    leaf: int
    ops: tuple
    operand_shape: tuple
    weight_side: int
    w_batch: tuple
    w_contract: tuple
    a_batch: tuple
    a_contract: tuple
    act: Any
    out_shape: tuple
    out_dtype: Any

    @property
    def w_free(self) -> tuple:
        return tuple(d for d in range(len(self.operand_shape)) if d not in self.w_batch + self.w_contract)

    @property
    def batch(self) -> int:
        return int(np.prod([self.operand_shape[d] for d in self.w_batch], dtype=int))

    @property
    def d_out(self) -> int:
        return int(np.prod([self.operand_shape[d] for d in self.w_free], dtype=int))

    @property
    def d_in(self) -> int:
        return int(np.prod([self.operand_shape[d] for d in self.w_contract], dtype=int))

    @property
    def selects(self) -> bool:
        """Whether the weight may be part of its parameter or repeat entries (not a bijection)."""
        return any(op.primitive.name not in _SIZE_PRESERVING for op in self.ops)

    def replay(self, param):
        """The weight operand from the parameter (in the parameter's dtype)."""
        for op in self.ops:
            param = op.primitive.bind(param, *op.others, **op.params)
        return param

    def activation_rows(self, act):
        """The activation operand as ``(batch, tokens, d_in)`` float32 rows, ``d_in`` in the
        weight's order."""
        free = tuple(d for d in range(act.ndim) if d not in self.a_batch + self.a_contract)
        x = jnp.transpose(act, self.a_batch + free + self.a_contract)
        return x.reshape(self.batch, -1, self.d_in).astype(jnp.float32)

    def output_token_axes(self, out_ndim: int) -> tuple:
        """The weight's output dimensions in the ``dot_general``'s output (batch first, then the
        left operand's free dimensions, then the right's)."""
        n_batch, n_w_free = len(self.w_batch), len(self.w_free)
        n_a_free = out_ndim - n_batch - n_w_free
        start = n_batch if self.weight_side == 0 else n_batch + n_a_free
        return tuple(range(start, start + n_w_free))


def operand_to_view(c: Contraction, operand):
    """``(batch, d_out, d_in)`` from the weight operand."""
    return jnp.transpose(operand, c.w_batch + c.w_free + c.w_contract).reshape(c.batch, c.d_out, c.d_in)


def view_to_operand(c: Contraction, view):
    """The inverse of :func:`operand_to_view`."""
    order = c.w_batch + c.w_free + c.w_contract
    operand = view.reshape([c.operand_shape[d] for d in order])
    return jnp.transpose(operand, np.argsort(order))


def _inner(eqn) -> Optional[tuple]:
    """The body of a call to inline, as ``(jaxpr, consts)``, or ``None``."""
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        body = eqn.params.get(key)
        if isinstance(body, jex.core.ClosedJaxpr):
            body, consts = body.jaxpr, body.consts
        elif isinstance(body, jex.core.Jaxpr):
            consts = ()
        else:
            continue
        if len(body.invars) == len(eqn.invars) and len(body.outvars) == len(eqn.outvars):
            return body, consts
    return None


def _has_body(eqn) -> bool:
    def body(p):
        return isinstance(p, (jex.core.ClosedJaxpr, jex.core.Jaxpr)) or (
            isinstance(p, (tuple, list)) and any(body(q) for q in p))

    return any(body(p) for p in eqn.params.values())


def _bind(eqn, values):
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = params if isinstance(params, tuple) else ((), params)  # older JAX: (subfuns, params)
    out = eqn.primitive.bind(*subfuns, *values, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def evaluate(jaxpr, consts, args, step: Callable, const: Callable = lambda x: x):
    """Evaluate ``jaxpr`` on ``args``, calls inlined, every other equation through
    ``step(eqn, invals) -> outvals``; constants and literals are wrapped by ``const``."""
    env = {}

    def read(v):
        return const(v.val) if isinstance(v, jex.core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = const(x)
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        inner = _inner(eqn)
        outs = evaluate(*inner, invals, step, const) if inner is not None else step(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jex.core.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _is_constant(v: _Value) -> bool:
    return v.tag is None and not isinstance(v.value, jax.core.Tracer)


def _signature(eqn, others) -> tuple:
    return (eqn.primitive.name, repr(sorted(eqn.params.items(), key=lambda kv: kv[0])),
            tuple(np.asarray(o).tobytes() + str(np.asarray(o).shape).encode() for o in others))


class _Analysis:
    """The ``step`` of :func:`evaluate` that tags every value with where it comes from."""

    def __init__(self):
        self.contractions: list[Contraction] = []
        self.dots = 0
        self.sources = 0
        self.routers: set[int] = set()  # dot indices whose output feeds a routing choice
        self.unrecognised: set[int] = set()  # parameter leaves contracted with activations otherwise
        self.hidden_in_bodies: set[int] = set()  # parameter leaves used with activations in loops/conds

    def const(self, x) -> _Value:
        return _Value(x, None, frozenset())

    def source(self) -> _Act:
        self.sources += 1
        return _Act(self.sources, ())

    def _combine(self, tags) -> Any:
        if any(isinstance(t, _Act) for t in tags):
            return self.source()
        leaves = frozenset().union(*(t.leaves if isinstance(t, _Derived) else {t.leaf} for t in tags
                                     if isinstance(t, (_Weight, _Derived))))
        return _Derived(leaves) if leaves else None

    def __call__(self, eqn, invals: list[_Value]) -> list[_Value]:
        values = [v.value for v in invals]
        if any(isinstance(v, jax.core.Tracer) for v in values):
            outs = _bind(eqn, values)
        else:  # constants stay concrete (slice starts, gather indices computed from literals)
            with jax.ensure_compile_time_eval():
                outs = _bind(eqn, values)
        name = eqn.primitive.name
        tags = [v.tag for v in invals]
        recent = frozenset().union(*(v.recent for v in invals))
        if name in _ROUTING and invals:
            self.routers |= invals[0].recent
        if name == "dot_general":
            return [self._dot(eqn, invals, outs[0])]
        first = tags[0] if tags else None
        if (name in _LAYOUT and isinstance(first, (_Act, _Weight)) and len(outs) == 1
                and all(_is_constant(v) for v in invals[1:])):
            if isinstance(first, _Act):
                tag = _Act(first.source, first.ops + (_signature(eqn, values[1:]),))
            elif name in _CASTS:
                tag = first
            elif name == "broadcast_in_dim" and np.prod(outs[0].shape) != np.prod(values[0].shape):
                tag = _Derived(frozenset({first.leaf}))  # the weight repeated: not a layer
            else:
                tag = _Weight(first.leaf, first.ops + (_Op(eqn.primitive, dict(eqn.params),
                                                            tuple(np.asarray(v) for v in values[1:])),))
        else:
            tag = self._combine(tags)
            if _has_body(eqn) and isinstance(tag, _Act):  # a loop or conditional: not looked into
                params = self._combine([t for t in tags if not isinstance(t, _Act)])
                if isinstance(params, _Derived):
                    self.hidden_in_bodies |= params.leaves
        return [_Value(out, tag, recent) for out in outs]

    def _dot(self, eqn, invals: list[_Value], out) -> _Value:
        index = self.dots
        self.dots += 1
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = invals
        for side, (w, a) in enumerate(((lhs, rhs), (rhs, lhs))):
            if isinstance(w.tag, _Weight) and isinstance(a.tag, _Act):
                w_dims, a_dims = ((lc, lb), (rc, rb)) if side == 0 else ((rc, rb), (lc, lb))
                # d_in in the weight's own order (an n:m group is consecutive there), the activation's paired
                pairs = sorted(zip(w_dims[0], a_dims[0]))
                w_dims, a_dims = ((tuple(p[0] for p in pairs), w_dims[1]), (tuple(p[1] for p in pairs), a_dims[1]))
                self.contractions.append(Contraction(
                    index=index, leaf=w.tag.leaf, ops=w.tag.ops, operand_shape=tuple(w.value.shape),
                    weight_side=side, w_batch=tuple(w_dims[1]), w_contract=tuple(w_dims[0]),
                    a_batch=tuple(a_dims[1]), a_contract=tuple(a_dims[0]), act=a.tag,
                    out_shape=tuple(out.shape), out_dtype=out.dtype))
                break
            if isinstance(a.tag, _Act) and isinstance(w.tag, (_Weight, _Derived)):
                self.unrecognised |= {w.tag.leaf} if isinstance(w.tag, _Weight) else set(w.tag.leaves)
        return _Value(out, self._combine([lhs.tag, rhs.tag]), frozenset({index}))


@dataclasses.dataclass
class Traced:
    """What :func:`find_contractions` found in a traced function.

    Attributes:
      jaxpr: the closed jaxpr, inputs ``(*params, *others, *activations)``.
      contractions: every weight use, in evaluation order.
      routers: indices of the contractions whose output chooses among entries (top-k, argmax).
      unrecognised: parameter leaves contracted with activations after computations other than
        layout changes (a merged LoRA, a scaled weight): not linear layers here.
      in_bodies: parameter leaves used together with activations inside loops or conditionals
        (``scan``, ``while``, ``cond``), which are not looked into.
      out_shapes: the shapes of the function's flat outputs.
    """

    jaxpr: Any
    contractions: list
    routers: set
    unrecognised: set
    in_bodies: set
    out_shapes: list


def find_contractions(fn: Callable, n_params: int, n_others: int, args: Sequence) -> Traced:
    """Trace ``fn(*args)`` (``args``: flat arrays or ``ShapeDtypeStruct``; the first ``n_params``
    are parameters, the next ``n_others`` other state, the rest the activations) and find its
    weight contractions."""
    closed = jax.make_jaxpr(fn)(*args)
    analysis = _Analysis()

    def tagged(*flat):
        tags = ([_Weight(i, ()) for i in range(n_params)] + [None] * n_others
                + [analysis.source() for _ in range(len(flat) - n_params - n_others)])
        values = [_Value(x, t, frozenset()) for x, t in zip(flat, tags)]
        return [v.value for v in evaluate(closed.jaxpr, closed.consts, values, analysis, analysis.const)]

    jax.make_jaxpr(tagged)(*args)  # under a trace: values derived from constants stay concrete
    return Traced(closed, analysis.contractions, analysis.routers, analysis.unrecognised,
                  analysis.hidden_in_bodies, [tuple(v.aval.shape) for v in closed.jaxpr.outvars])
