"""The tape: one forward pass over the traced model in a forward domain, recording every
input-dependent equation (its primitive, operands and output node) and every node's
value. The backward passes of :mod:`dm_jax.bounds.linear` and
:mod:`dm_jax.bounds.patches` run over it.

Operands are typed references: :class:`NodeRef` (an input-dependent value, by node
index) or :class:`ConstRef` (a constant, with its value); entry kinds are the table's
``primitives.TAPE_AFFINE``, ``TAPE_RELU`` and ``TAPE_MAXPOOL``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple, Union

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
  kind: str  # primitives.TAPE_AFFINE, TAPE_RELU or TAPE_MAXPOOL
  relu_const: Any = None  # the constant c of max(x, c)

  def nodes(self) -> List[Tuple[int, int]]:
    """(operand position, node index) of every input-dependent operand."""
    return [(j, r.index) for j, r in enumerate(self.refs) if isinstance(r, NodeRef)]

  @property
  def node(self) -> int:
    """The node of the one input-dependent operand (ReLU, max pooling)."""
    return next(r.index for r in self.refs if isinstance(r, NodeRef))


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


def _classify(eqn, invals) -> Tuple[str, Any]:
  name = eqn.primitive.name
  tape = getattr(primitives.rule(name), "tape", None)
  if tape == primitives.TAPE_AFFINE:
    return tape, None
  if tape == primitives.TAPE_RELU and len(invals) == 2:
    is_abs = [isinstance(v, (Abstract, InputAffine)) for v in invals]
    if sum(is_abs) == 1:
      return tape, invals[1 - is_abs.index(True)]
  if tape == primitives.TAPE_MAXPOOL:
    return tape, None
  raise UnsupportedPrimitiveError(name, "linear (CROWN-family)")


def record_tape(apply_fn, params, iset: InputSet,
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
    kind, const = _classify(eqn, invals)
    refs = [NodeRef(index[id(v)]) if isinstance(v, (Abstract, InputAffine))
            else ConstRef(v) for v in invals]
    entries.append(Entry(eqn, refs, index[id(outval)], kind, const))

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
  value = tape.values[node]
  return value.value if isinstance(value, InputAffine) else value.centres[0]


def node_shape(tape: Tape, node: int) -> Tuple[int, ...]:
  return tuple(np.shape(nominal_of(tape, node)))
