"""The tape: one forward pass over the traced model in a forward domain, recording every
input-dependent equation (its primitive, operands and output node) and every node's
value. The backward passes of :mod:`dm_jax.bounds.linear` and
:mod:`dm_jax.bounds.patches` run over it.

Operands are typed references: :class:`NodeRef` (an input-dependent value, by node
index) or :class:`ConstRef` (a constant, with its value); entry kinds are the table's
``primitives.TAPE_AFFINE``, ``TAPE_RELU``, ``TAPE_MAXPOOL``, ``TAPE_ACTIVATION`` (an
element-wise nonlinearity of one node, with its curvature) and ``TAPE_PRODUCT`` (the
element-wise product of two nodes).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import chex
import jax
import numpy as np

from dm_jax.bounds.interval import IntervalDomain
from dm_jax.core import primitives, propagation
from dm_jax.core.errors import UnsupportedPrimitiveError
from dm_jax.core.input_sets import InputSet
from dm_jax.core.propagation import Abstract, InputAffine


@dataclasses.dataclass(frozen=True)
class NodeRef:
  """An operand that depends on the input: the tape node holding its value."""
  index: int


@dataclasses.dataclass(frozen=True)
class ConstRef:
  """An operand that does not depend on the input, with its value."""
  value: Any


Ref = Union[NodeRef, ConstRef]


@dataclasses.dataclass
class Entry:
  """One input-dependent equation: its primitive, operands and output node."""
  eqn: Any
  refs: List[Ref]
  out: int
  kind: str  # primitives.TAPE_AFFINE, TAPE_RELU, TAPE_MAXPOOL, TAPE_ACTIVATION, ...
  relu_const: Any = None  # the constant c of max(x, c)
  curvature: Optional[str] = None  # TAPE_ACTIVATION: primitives.CONVEX, S_SHAPED, ...

  def nodes(self) -> List[Tuple[int, int]]:
    """(operand position, node index) of every input-dependent operand."""
    return [(j, r.index) for j, r in enumerate(self.refs) if isinstance(r, NodeRef)]

  @property
  def node(self) -> int:
    """The node of the one input-dependent operand (ReLU, max pooling, activations;
    ``x * x`` has it twice)."""
    return next(r.index for r in self.refs if isinstance(r, NodeRef))

  def function(self) -> Callable[[jax.Array], jax.Array]:
    """A TAPE_ACTIVATION entry as an element-wise function of its node's value ``t``
    (the node's operands, all of them, replaced by ``t``; the constants kept)."""
    eqn = self.eqn
    return lambda t: eqn.primitive.bind(
        *[t if isinstance(r, NodeRef) else r.value for r in self.refs], **eqn.params)


@dataclasses.dataclass
class Tape:
  """The recorded model: entries in execution order and every node's value in the
  forward domain that recorded it (interval, unless :func:`record_tape` was given
  another, e.g. Double Margin for its folded margins)."""
  entries: List[Entry]
  values: List[Any]  # per node: Abstract (of ``domain``) or InputAffine
  iset: InputSet
  output: int
  domain: propagation.ForwardDomain = dataclasses.field(default_factory=IntervalDomain)


LINEAR = "linear (CROWN-family)"  # the domain's name in error messages


def _classify(eqn, invals) -> Tuple[str, Any, Optional[str]]:
  """(tape kind, ReLU constant, curvature) of an input-dependent equation."""
  name = eqn.primitive.name
  rule = primitives.rule(name)
  tape = getattr(rule, "tape", None)
  is_abs = [isinstance(v, (Abstract, InputAffine)) for v in invals]
  idx = [i for i, a in enumerate(is_abs) if a]
  out_shape = tuple(eqn.outvars[0].aval.shape)
  elementwise = all(tuple(np.shape(_nominal(invals[i]))) == out_shape for i in idx)
  if rule is not None and rule.product and len(idx) == 2:
    if not elementwise:
      raise UnsupportedPrimitiveError(name, LINEAR, "a product of operands of different "
                                      "shapes")
    if invals[0] is invals[1]:  # x * x: its square
      return primitives.TAPE_ACTIVATION, None, primitives.square_rule().curvature
    return primitives.TAPE_PRODUCT, None, None
  if tape == primitives.TAPE_AFFINE:
    return tape, None, None
  if tape == primitives.TAPE_RELU and len(invals) == 2:
    if sum(is_abs) == 1:
      return tape, invals[1 - is_abs.index(True)], None
  if tape == primitives.TAPE_MAXPOOL:
    return tape, None, None
  if tape == primitives.TAPE_ACTIVATION:
    curvature = primitives.curvature_of(rule, eqn.params)
    if curvature is None:
      raise UnsupportedPrimitiveError(name, LINEAR, f"not with params {dict(eqn.params)}")
    if len(idx) != 1 or not primitives.operands_allowed(rule, idx):
      raise UnsupportedPrimitiveError(name, LINEAR, "more than one operand depends on the "
                                      "input")
    if not elementwise:
      raise UnsupportedPrimitiveError(name, LINEAR, "its output's shape is not its "
                                      "input's (broadcast)")
    return tape, None, curvature
  raise UnsupportedPrimitiveError(name, LINEAR)


def _nominal(value):
  return value.value if isinstance(value, InputAffine) else value.centres[0]


def record_tape(apply_fn: Callable[..., jax.Array], params: chex.ArrayTree, iset: InputSet,
                domain: Optional[propagation.ForwardDomain] = None) -> Tape:
  """Forward pass over the model in ``domain`` (default: intervals, which every sound
  bound here needs) that records every input-dependent equation."""
  domain = IntervalDomain() if domain is None else domain
  values: List[Any] = []
  index: Dict[int, int] = {}
  entries: List[Entry] = []

  def recorder(eqn, invals, outval):
    index[id(outval)] = len(values)
    values.append(outval)
    if eqn is None:  # the input
      return
    kind, const, curvature = _classify(eqn, invals)
    refs = [NodeRef(index[id(v)]) if isinstance(v, (Abstract, InputAffine))
            else ConstRef(v) for v in invals]
    entries.append(Entry(eqn, refs, index[id(outval)], kind, const, curvature))

  out, _ = propagation.propagate(apply_fn, params, iset, domain, recorder)
  if id(out) not in index:  # the output does not depend on the input
    raise ValueError("The model's output does not depend on its input; nothing to bound.")
  return Tape(entries, values, iset, index[id(out)], domain)


def interval_of(tape: Tape, node: int) -> Tuple[jax.Array, jax.Array]:
  """The range of a node's value in the tape's domain (for the interval domain, its
  sound interval)."""
  value = tape.values[node]
  if isinstance(value, InputAffine):
    value = propagation.box_of_symbolic(value, tape.iset, tape.domain)
  return tape.domain.value_range(value)


def nominal_of(tape: Tape, node: int) -> jax.Array:
  """A node's nominal value (its first centre), e.g. for its shape and dtype."""
  return _nominal(tape.values[node])


def node_shape(tape: Tape, node: int) -> Tuple[int, ...]:
  return tuple(np.shape(nominal_of(tape, node)))
