"""Read-only interpretation of a traced model, one primitive at a time.

The model ``apply_fn(params, x)`` is traced to a jaxpr once (at trace time, so it costs
nothing per step under ``jax.jit``) and walked equation by equation. Values that do not
depend on the perturbed input (weights, constants, anything computed only from them) are
evaluated with the primitive itself; values that do are *abstract* and handed to a
domain's rule. Calls (``jit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``,
``remat``) are interpreted recursively, so ``jax.nn.relu`` arrives as ``max(x, 0)``;
except the *composites* of :data:`dm_jax.core.primitives.COMPOSITES` (``jnp.logaddexp``,
inside ``jax.nn.softplus``), recognised by their body and handed to the rule as one
equation (:class:`CompositeEqn`) where they depend on the input.

This module is the only place that touches JAX's jaxpr types (through ``jax.extend``);
it never rewrites a jaxpr.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import jax
from jax.extend import core as jex_core
from jax.typing import ArrayLike

from dm_jax.core import primitives

# Call-like primitives whose body is interpreted recursively, and the parameter names
# under which they keep it. (Loops and conditionals such as scan/cond also carry jaxprs
# but are not calls; they are bound directly when constant and unsupported otherwise.)
CALL_PRIMITIVES = frozenset({
    "jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint", "named_call"})
_CALL_BODY_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def trace(apply_fn: Callable, params: Any, x: jax.Array) -> Tuple[Any, List[Any]]:
  """Traces ``apply_fn(params, x)``.

  Returns:
    (closed_jaxpr, param_leaves): the jaxpr takes ``*param_leaves, x`` and returns the
    flat outputs.

  Raises:
    ValueError: if tracing fails (typically an input of the wrong shape) or the model
      does not return exactly one array.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)

  def flat_fn(*args):
    return apply_fn(jax.tree_util.tree_unflatten(treedef, args[:-1]), args[-1])

  try:
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves, x)
  except Exception as err:  # pylint: disable=broad-except
    # Any failure while tracing (jax shape errors, Flax's ScopeParamShapeError, ...) means
    # the model cannot run on this input; report it as a ValueError naming the shape.
    raise ValueError(
        f"apply_fn(params, x) failed for x of shape {tuple(x.shape)} and dtype {x.dtype}; "
        f"is the input shape the one the model was built for? ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''})") from err
  if not isinstance(out_shape, jax.ShapeDtypeStruct):
    raise ValueError("apply_fn(params, x) must return a single array of logits; got "
                     f"{jax.tree_util.tree_structure(out_shape)}.")
  return closed, leaves


def body_of(eqn: Any) -> Any:
  """The (Closed)Jaxpr body of a call-like equation, or None."""
  if eqn.primitive.name not in CALL_PRIMITIVES:
    return None
  for name in _CALL_BODY_PARAMS:
    body = eqn.params.get(name)
    if isinstance(body, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
      return body
  return None


@functools.lru_cache(maxsize=256)
def _reference_body(name: str, avals: Tuple[Tuple[Tuple[int, ...], str, bool], ...]) -> str:
  """The printed body of composite ``name``'s reference traced on ``avals``, or ''."""
  specs = [jax.ShapeDtypeStruct(shape, dtype, weak_type=weak) for shape, dtype, weak in avals]
  try:
    eqns = jax.make_jaxpr(primitives.COMPOSITES[name])(*specs).jaxpr.eqns
  except Exception:  # pylint: disable=broad-except
    return ""
  if len(eqns) != 1 or eqns[0].primitive.name not in CALL_PRIMITIVES:
    return ""
  body = body_of(eqns[0])
  return "" if body is None else str(body)


def composite_of(eqn: jex_core.JaxprEqn) -> Optional[str]:
  """The name of the composite (:data:`primitives.COMPOSITES`) that a call equation is:
  its body, printed, is the reference function's traced on the same operand types.
  None for any other equation."""
  body = body_of(eqn)
  if body is None or len(eqn.outvars) != 1:
    return None
  avals = tuple((tuple(v.aval.shape), str(v.aval.dtype), bool(v.aval.weak_type))
                for v in eqn.invars)
  text = None
  for name in primitives.COMPOSITES:
    ref = _reference_body(name, avals)
    if ref:
      text = str(body) if text is None else text
      if text == ref:
        return name
  return None


@dataclasses.dataclass(frozen=True)
class CompositePrimitive:
  """Stands for a composite's call: its name, and ``bind`` evaluates the reference."""
  name: str
  multiple_results = False

  def bind(self, *args: ArrayLike, **params: Any) -> jax.Array:
    del params
    return primitives.COMPOSITES[self.name](*args)


@dataclasses.dataclass(frozen=True)
class CompositeEqn:
  """A recognised composite call as one equation (``primitive.name`` is the composite's,
  no params), with the call's operand and output variables."""
  primitive: CompositePrimitive
  invars: List[Any]
  outvars: List[Any]
  params: Any = dataclasses.field(default_factory=dict)
  effects: Any = frozenset()


# An equation as a domain's rule receives it: a jaxpr equation, or a recognised composite.
Equation = Union[jex_core.JaxprEqn, CompositeEqn]


def _split(body):
  if isinstance(body, jex_core.ClosedJaxpr):
    return body.jaxpr, list(body.consts)
  return body, []


def live_equations(jaxpr: Any) -> List[Any]:
  """The equations that contribute to the outputs (dead code removed), in order."""
  needed = {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}
  keep = []
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars) or eqn.effects:
      keep.append(eqn)
      needed.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
  return keep[::-1]


def interpret(body: Any, args: Sequence[Any], is_abstract: Callable[[Any], bool],
              rule: Callable[[Any, List[Any]], List[Any]]) -> List[Any]:
  """Evaluates a (Closed)Jaxpr on a mix of concrete and abstract values.

  Args:
    body: the jaxpr.
    args: one value per input variable: an array (or tracer) or an abstract value.
    is_abstract: tells abstract values apart from arrays.
    rule: ``rule(eqn, invals) -> outvals`` for a non-call equation with at least one
      abstract input.

  Returns:
    One value per output variable.
  """
  jaxpr, consts = _split(body)
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in live_equations(jaxpr):
    invals = [read(v) for v in eqn.invars]
    sub = body_of(eqn)
    composite = (composite_of(eqn) if sub is not None and any(map(is_abstract, invals))
                 else None)
    if composite is not None:
      outvals = rule(CompositeEqn(CompositePrimitive(composite), list(eqn.invars),
                                  list(eqn.outvars)), invals)
    elif sub is not None:
      outvals = interpret(sub, invals, is_abstract, rule)
    elif any(is_abstract(v) for v in invals):
      outvals = rule(eqn, invals)
    else:
      # Compile-time evaluation keeps input-independent constants built from literals
      # (e.g. zeros_like) concrete under an outer jit, so ReLU patterns stay recognisable.
      with jax.ensure_compile_time_eval():
        out = eqn.primitive.bind(*invals, **eqn.params)
      outvals = list(out) if eqn.primitive.multiple_results else [out]
    for var, val in zip(eqn.outvars, outvals):
      if not isinstance(var, jex_core.DropVar):
        env[var] = val
  return [read(v) for v in jaxpr.outvars]
