"""Forward propagation of abstract values through a traced model.

Every forward domain in dm_jax (interval, Double Margin and its variants) represents an
input-dependent tensor as an :class:`Abstract`: a few *centre-like* tensors that go
through affine maps exactly (bias included) and a few non-negative *radius-like* tensors
that go through the absolute value of the linear part (``|W| r``). The domains differ only
in how they start and how they cross a monotone nonlinearity (ReLU, max pooling), so the
affine rules below are written once for all of them.

For l2, l1 and l0 input sets the input is first carried symbolically
(:class:`InputAffine`) through element-wise affine pre-processing (reshape, scaling,
normalisation) up to the first ``dot_general``/``conv``, whose output range over the set
is computed exactly (``eps ||row||_q``, or the top-k sums for l0), as SPEC.md asks.

A domain with ``sound = True`` (the interval domain's sound mode) gets every affine
output through its ``round_affine`` (the rounding error of the step), and the symbolic
input carries bounds on its own rounding (:class:`InputAffine` ``error``, ``scale_rel``)
into the exact first layer (:mod:`dm_jax.core.rounding`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Tuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dm_jax.core import conv, fast_paths, interpreter, primitives, rounding
from dm_jax.core.errors import UnsupportedPrimitiveError
from dm_jax.core.input_sets import TINY, InputSet, l0_moves, topk_sum



@dataclasses.dataclass(frozen=True)
class Abstract:
  """An input-dependent tensor in a forward domain.

  Attributes:
    centres: tensors that follow affine maps exactly, e.g. (c,) for intervals or (z,)
      for Double Margin.
    radii: non-negative tensors that follow ``|W|``, e.g. (r,) or (s, v).
  """
  centres: Tuple[jax.Array, ...]
  radii: Tuple[jax.Array, ...]

  @property
  def shape(self) -> Tuple[int, ...]:
    return self.centres[0].shape


@dataclasses.dataclass(frozen=True)
class InputAffine:
  """``value = a * x_raw + b`` element-wise, before the first linear layer.

  Attributes:
    value: nominal value (same shape as the others).
    scale: the coefficient ``a`` times eps (l2, l1) or ``a`` (l0); signed.
    raw: the nominal raw input coordinate each element comes from.
    error: sound mode only: a bound on ``|value - exact value|`` (value's shape; None:
      exact), the rounding of the element-wise steps so far.
    scale_rel: sound mode only: a bound on the relative error of ``scale``.
  """
  value: jax.Array
  scale: jax.Array
  raw: jax.Array
  error: Optional[jax.Array] = None
  scale_rel: float = 0.0


class ForwardDomain:
  """Base of forward domains. Subclasses define the start and the nonlinear rule."""

  name = "abstract"
  # Sound in floating point (the interval domain's sound mode): affine outputs go
  # through round_affine and the symbolic input tracks its rounding.
  sound = False

  def round_affine(self, eqn: interpreter.Equation, invals: List[Any],
                   out: "Abstract") -> "Abstract":
    """The affine output ``out`` widened for the step's float rounding (sound
    domains); ``out`` itself by default."""
    del eqn, invals
    return out

  def from_range(self, nominal: jax.Array, down: jax.Array, up: jax.Array) -> Abstract:
    """The value set ``[nominal - down, nominal + up]`` (element-wise), nominal exact."""
    raise NotImplementedError

  def monotone(self, g: Callable[[jax.Array], jax.Array], a: Abstract) -> Abstract:
    """Image of ``a`` under a non-decreasing ``g`` (ReLU, max pooling, ...)."""
    raise NotImplementedError

  def valley(self, g: Callable[[jax.Array], jax.Array], a: Abstract) -> Optional[Abstract]:
    """Image of ``a`` under an element-wise ``g`` that is non-increasing below 0 and
    non-decreasing above (``x**2``, ``|x|``); None where the domain has no such rule
    (the default: Double Margin's rules are for monotone maps)."""
    del g, a
    return None

  def product(self, a: Abstract, b: Abstract) -> Optional[Abstract]:
    """The element-wise product of two abstract values of the same shape; None where
    the domain has no such rule (the default)."""
    del a, b
    return None

  def value_range(self, a: Abstract) -> Tuple[jax.Array, jax.Array]:
    """The element-wise range ``(lower, upper)`` the domain assigns ``a`` (sound for the
    interval domain; Double Margin's is its training signal, not a bound)."""
    raise NotImplementedError


# ----------------------------------------------------------------------------- affine

# The forward domains' affine primitives (dm_jax.core.primitives: kind affine, with a
# forward rule).
AFFINE_PRIMITIVES = primitives.names(kind=primitives.AFFINE) - primitives.names(forward=None)


def _bind(eqn, *args):
  return eqn.primitive.bind(*args, **eqn.params)


def _fast_conv(eqn):
  """For a strided NHWC convolution of an abstract lhs: ``(lhs, rhs) -> conv`` with the
  faster input gradient of :func:`dm_jax.core.conv.conv2d` where the fast paths are on
  (:mod:`dm_jax.core.fast_paths`); else None."""
  p = eqn.params
  if (not fast_paths.enabled() or eqn.primitive.name != "conv_general_dilated"
      or not conv.is_nhwc_conv(eqn)
      or all(st == 1 for st in p["window_strides"])
      or p.get("preferred_element_type") is not None):
    return None
  return lambda lhs, rhs: conv.conv2d(lhs, rhs, tuple(p["window_strides"]),
                                      tuple(tuple(pd) for pd in p["padding"]))


def _out_shape(eqn):
  return tuple(eqn.outvars[0].aval.shape)


def affine(eqn: interpreter.Equation, invals: List[Any], domain_name: str) -> Abstract:
  """Applies an affine primitive to abstract operands (constants elsewhere)."""
  name = eqn.primitive.name
  idx = [i for i, v in enumerate(invals) if isinstance(v, Abstract)]
  first = invals[idx[0]]
  n_c, n_r = len(first.centres), len(first.radii)
  shape = _out_shape(eqn)

  def centres_at(j):
    return [v.centres[j] if isinstance(v, Abstract) else v for v in invals]

  def fail(detail):
    raise UnsupportedPrimitiveError(name, domain_name, detail)

  prim = primitives.rule(name)
  if not primitives.operands_allowed(prim, idx):
    fail(primitives.OPERAND_ERRORS[prim.operands])
  fast_conv = _fast_conv(eqn) if idx == [0] else None
  if fast_conv is not None:  # training differentiates through these convolutions
    centres = tuple(fast_conv(*centres_at(j)) for j in range(n_c))
  else:
    centres = tuple(_bind(eqn, *centres_at(j)) for j in range(n_c))
  if prim.forward == primitives.MAP:
    radii = tuple(_bind(eqn, r, *invals[1:]) for r in first.radii)
  elif prim.forward == primitives.NEG:
    radii = first.radii
  elif prim.forward == primitives.SUM:
    radii = tuple(
        jnp.broadcast_to(sum(invals[i].radii[j] for i in idx), shape) for j in range(n_r))
  elif prim.forward == primitives.ABS:
    i = idx[0]
    absconst = jnp.abs(invals[1 - i])

    def with_radius(r):
      if fast_conv is not None:
        return fast_conv(r, absconst)
      return _bind(eqn, *((r, absconst) if i == 0 else (absconst, r)))

    radii = tuple(with_radius(r) for r in first.radii)
  elif prim.forward == primitives.DIV:
    radii = tuple(jnp.broadcast_to(r / jnp.abs(invals[1]), shape) for r in first.radii)
  elif prim.forward == primitives.CONCAT:
    radii = tuple(
        _bind(eqn, *[v.radii[j] if isinstance(v, Abstract) else jnp.zeros_like(v)
                     for v in invals]) for j in range(n_r))
  elif prim.forward == primitives.PAD:
    if idx != [0]:
      fail("the padding value depends on the input")
    radii = tuple(_bind(eqn, r, jnp.zeros_like(invals[1])) for r in first.radii)
  elif prim.forward == primitives.SELECT:
    radii = tuple(
        _bind(eqn, invals[0], *[v.radii[j] if isinstance(v, Abstract)
                                else jnp.zeros_like(v) for v in invals[1:]])
        for j in range(n_r))
  else:  # pragma: no cover - guarded by AFFINE_PRIMITIVES
    fail("not affine")
  return Abstract(centres, radii)


# -------------------------------------------------------------------------- monotone

@jax.custom_jvp
def _relu(t):
  """``max(t, 0)`` with the derivative ``1[t > 0]``.

  ``lax.max``'s own derivative splits ties (0.5 at ``t == 0``) with extra compares and
  selects; on the CPU that made the backward pass of the Double Margin ReLU rule (five
  ReLUs per layer) cost more than all its convolutions. ``jax.nn.relu`` makes the same
  choice at 0, so training through a bound gets the gradient plain training gets.
  """
  return jnp.maximum(t, 0)


@_relu.defjvp
def _relu_jvp(primals, tangents):
  (t,), (dt,) = primals, tangents
  return _relu(t), jnp.where(t > 0, dt, jnp.zeros_like(dt))


def elementwise_fn(eqn: interpreter.Equation, invals: List[Any],
                   i: int) -> Callable[[jax.Array], jax.Array]:
  """``t -> eqn(..., t, ...)``: the equation as a function of its operand ``i``, the
  other operands fixed at their (constant) values."""
  return lambda t: _bind(eqn, *invals[:i], t, *invals[i + 1:])


def monotone_function(eqn: interpreter.Equation,
                      invals: List[Any]) -> Optional[Tuple[Callable, int, bool]]:
  """If ``eqn`` is non-decreasing in its one abstract operand, returns (g, index, is_relu).

  ``is_relu`` marks ``max(x, 0)`` (what ``jax.nn.relu`` lowers to), whose inputs the
  domains report as ReLU pre-activations.
  """
  name = eqn.primitive.name
  prim = primitives.rule(name)
  idx = [i for i, v in enumerate(invals) if isinstance(v, Abstract)]
  if prim is None or len(idx) != 1 or not primitives.operands_allowed(prim, idx):
    return None
  i = idx[0]
  if primitives.forward_of(prim, eqn.params) == primitives.UNARY:
    return elementwise_fn(eqn, invals, i), i, False
  if prim.forward == primitives.EXTREMUM:
    other = invals[1 - i]
    is_relu = False
    if name == "max" and not isinstance(other, jax.core.Tracer):
      other_np = np.asarray(other)
      is_relu = other_np.size > 0 and bool(np.all(other_np == 0))
    if is_relu:
      out_shape = eqn.outvars[0].aval.shape
      return (lambda t: jnp.broadcast_to(_relu(t), out_shape)), i, True
    return (lambda t: _bind(eqn, *((t, other) if i == 0 else (other, t)))), i, is_relu
  if prim.forward == primitives.CLAMPED:  # clamp(lo, x, hi) with constant lo, hi
    return (lambda t: _bind(eqn, invals[0], t, invals[2])), 1, False
  return None


def negate(a: Abstract) -> Abstract:
  """``-a`` in every domain (the centres negated, the radii unchanged: ``neg``'s rule)."""
  return Abstract(tuple(-c for c in a.centres), a.radii)


def nonlinear(eqn: interpreter.Equation, invals: List[Any],
              domain: ForwardDomain) -> Optional[Abstract]:
  """The element-wise nonlinearities that are not non-decreasing, and products: the
  image of the abstract operand(s) in ``domain``, or None where ``eqn`` is none of them.

  * forward DECREASING (``erfc``): ``g(x) = h(-x)`` with ``h(t) = g(-t)`` non-decreasing,
    so the domain's monotone rule applies to ``-x``;
  * VALLEY (``x**2``, ``|x|``, even ``integer_pow``): ``domain.valley``;
  * ``mul`` of two abstract operands: ``domain.product``, or, the same operand twice,
    its square (``domain.valley``).

  Raises:
    UnsupportedPrimitiveError: the domain has no rule for it (Double Margin: VALLEY and
      products), naming the domains that do.
  """
  name = eqn.primitive.name
  prim = primitives.rule(name)
  if prim is None:
    return None
  idx = [i for i, v in enumerate(invals) if isinstance(v, Abstract)]
  forward = primitives.forward_of(prim, eqn.params)
  is_product = prim.product and len(idx) == 2
  if domain.sound and (is_product or forward in (primitives.DECREASING,
                                                  primitives.VALLEY)):
    # Products, squares and erfc round: the sound mode takes exact maps only.
    raise UnsupportedPrimitiveError(name, rounding.DOMAIN_NAME,
                                    "its rounding is not analysed")
  if is_product:
    a, b = invals
    if a is b:  # x * x: its square
      out = domain.valley(lambda t: _bind(eqn, t, t), a)
    elif a.shape != b.shape:
      raise UnsupportedPrimitiveError(name, domain.name, "a product of operands of "
                                      f"different shapes {a.shape} and {b.shape}")
    else:
      out = domain.product(a, b)
    if out is None:
      raise UnsupportedPrimitiveError(name, domain.name, "a product of two "
                                      "input-dependent operands")
    return out
  if forward not in (primitives.DECREASING, primitives.VALLEY):
    return None
  if len(idx) != 1 or not primitives.operands_allowed(prim, idx):
    raise UnsupportedPrimitiveError(name, domain.name,
                                    primitives.OPERAND_ERRORS.get(prim.operands, ""))
  i = idx[0]
  g = elementwise_fn(eqn, invals, i)
  if forward == primitives.DECREASING:
    return domain.monotone(lambda t: g(-t), negate(invals[i]))
  out = domain.valley(g, invals[i])
  if out is None:
    raise UnsupportedPrimitiveError(
        name, domain.name, "it is not monotone (its image needs an interval rule)")
  return out


# ---------------------------------------------------------- exact first linear layer

_SYMBOLIC_STRUCTURAL = primitives.names(symbolic=True)


def _dot_general_expand(eqn, lhs, rhs):
  """Like dot_general but keeps the contraction: returns (*out_shape, K) products."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
  rf = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
  nb = int(np.prod([lhs.shape[d] for d in lb])) if lb else 1
  nk = int(np.prod([lhs.shape[d] for d in lc])) if lc else 1
  lt = jnp.transpose(lhs, list(lb) + lf + list(lc)).reshape(nb, -1, nk)
  rt = jnp.transpose(rhs, list(rb) + rf + list(rc)).reshape(nb, -1, nk)
  prod = lt[:, :, None, :] * rt[:, None, :, :]
  return prod.reshape(_out_shape(eqn) + (nk,))


def _conv_expand(eqn, lhs, rhs):
  """Like conv_general_dilated but keeps the contraction: (*out_shape, P) products."""
  p = eqn.params
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    return None
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  n_sp = len(lhs_spec) - 2
  filt = tuple(rhs.shape[d] for d in rhs_spec[2:])
  canonical = tuple(range(n_sp + 2))
  patches = lax.conv_general_dilated_patches(
      lhs, filt, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
      dimension_numbers=lax.ConvDimensionNumbers(lhs_spec, rhs_spec, canonical),
      precision=lax.Precision.HIGHEST)
  # Kernel as (C * prod(filter), O), C-major like the patches' feature axis.
  kmat = jnp.transpose(rhs, (rhs_spec[1],) + tuple(rhs_spec[2:]) + (rhs_spec[0],))
  kmat = kmat.reshape(-1, rhs.shape[rhs_spec[0]])
  spatial = (None,) * n_sp
  # (N, O, P, *sp): product of every output with every input of its receptive field.
  prod = patches[:, None] * kmat.T[(None, slice(None), slice(None)) + spatial]
  prod = jnp.moveaxis(prod, 2, -1)  # (N, O, *sp, P) in canonical order
  perm = list(np.argsort(out_spec)) + [n_sp + 2]
  return jnp.transpose(prod, perm)


def exact_first_linear(eqn: interpreter.Equation, invals: List[Any], iset: InputSet,
                       domain: ForwardDomain) -> Optional[Abstract]:
  """Output range of a dot_general/conv on the symbolic input, exact over the set."""
  i = 0 if isinstance(invals[0], InputAffine) else 1
  sym, const = invals[i], invals[1 - i]
  if isinstance(const, (InputAffine, Abstract)):
    return None

  def call(a, c):
    return _bind(eqn, *((a, c) if i == 0 else (c, a)))

  nominal = call(sym.value, const)
  if domain.sound:
    # The nominal's rounding (a sum of n terms) and the value's own error; each range
    # below is widened by its relative error (rel) on top of the scale's.
    n = rounding.terms(eqn, i)
    nom_err = (rounding.gamma(n, nominal.dtype) * call(jnp.abs(sym.value), jnp.abs(const))
               + (n + 2) * rounding.FLOOR)
    if sym.error is not None:
      nom_err = nom_err + call(sym.error, jnp.abs(const)) * (1 + rounding.gamma(n, nominal.dtype))
    widen = lambda h, rel: h * (1 + 2 * (sym.scale_rel + rel)) + nom_err
  else:
    n, widen = 0, lambda h, rel: h
  if iset.norm == "linf":
    h = widen(call(jnp.abs(sym.scale), jnp.abs(const)), rounding.gamma(n, nominal.dtype))
    return domain.from_range(nominal, h, h)
  if iset.norm == "l2":
    h = jnp.sqrt(call(jnp.square(sym.scale), jnp.square(const)) + TINY)
    h = widen(h, rounding.gamma(n + 4, nominal.dtype))
    return domain.from_range(nominal, h, h)
  if eqn.primitive.name == "dot_general":
    expand = lambda a, c: _dot_general_expand(eqn, *((a, c) if i == 0 else (c, a)))
  elif i == 0:
    expand = lambda a, c: _conv_expand(eqn, a, c)
  else:
    return None
  coef = expand(sym.scale, const)
  if coef is None:
    return None
  if iset.norm == "l1":
    h = widen(jnp.max(jnp.abs(coef), axis=-1), rounding.gamma(1, nominal.dtype))
    return domain.from_range(nominal, h, h)
  # l0: each of k coordinates may move anywhere in [lo, hi].
  up, down = l0_moves(iset, coef, expand(sym.raw, jnp.ones_like(const)))
  rel = rounding.gamma(iset.k + 4, nominal.dtype) if domain.sound else 0.0
  return domain.from_range(nominal, widen(topk_sum(down, iset.k), rel),
                           widen(topk_sum(up, iset.k), rel))


def symbolic_rule(eqn: interpreter.Equation, invals: List[Any], iset: InputSet,
                  domain: ForwardDomain) -> Optional[Union[InputAffine, Abstract]]:
  """Propagates an :class:`InputAffine` operand, or returns None to fall back to a box."""
  name = eqn.primitive.name
  idx = [j for j, v in enumerate(invals) if isinstance(v, InputAffine)]
  if len(idx) != 1 or any(isinstance(v, Abstract) for v in invals):
    return None
  i = idx[0]
  sym = invals[i]
  same_shape = _out_shape(eqn) == tuple(sym.value.shape)
  sound = domain.sound
  if sound:
    rounding.terms(eqn, i)  # raises for a step the rounding analysis does not cover
  moved = lambda f: None if sym.error is None else f(sym.error)  # exact steps move it
  if name in _SYMBOLIC_STRUCTURAL and len(invals) == 1:
    return InputAffine(_bind(eqn, sym.value), _bind(eqn, sym.scale), _bind(eqn, sym.raw),
                       moved(lambda e: _bind(eqn, e)), sym.scale_rel)
  if name == "neg":
    return InputAffine(-sym.value, -sym.scale, sym.raw, sym.error, sym.scale_rel)
  if name == "pad" and i == 0 and not isinstance(invals[1], (InputAffine, Abstract)):
    # Padded positions are constants: scale 0, so they never count in a row norm.
    zero = jnp.zeros((), sym.scale.dtype)
    return InputAffine(_bind(eqn, sym.value, invals[1]), _bind(eqn, sym.scale, zero),
                       _bind(eqn, sym.raw, zero), moved(lambda e: _bind(eqn, e, zero)),
                       sym.scale_rel)
  if name in ("dot_general", "conv_general_dilated"):
    return exact_first_linear(eqn, invals, iset, domain)
  if not same_shape:
    return None
  other = invals[1 - i] if len(invals) == 2 else None

  def rounded(value, factor=1.0, scale_steps=0):
    """The error after one rounded element-wise step (value's error scaled by
    ``|factor|``, plus the step's rounding); None outside the sound mode."""
    if not sound:
      return None, 0.0
    err = rounding.slack(value)
    if sym.error is not None:
      err = err + sym.error * jnp.abs(factor) * (1 + rounding.gamma(1, value.dtype))
    return err, sym.scale_rel + scale_steps * 4 * rounding.unit_roundoff(value.dtype)

  if getattr(primitives.rule(name), "forward", None) == primitives.SUM and other is not None:
    sign = primitives.operand_sign(name, i)
    value = _bind(eqn, *invals[:i], sym.value, *invals[i + 1:])
    return InputAffine(value, sign * sym.scale, sym.raw, *rounded(value))
  if name == "mul" and other is not None:
    value = sym.value * other
    return InputAffine(value, sym.scale * other, sym.raw, *rounded(value, other, 1))
  if name == "div" and i == 0:
    value = sym.value / other
    return InputAffine(value, sym.scale / other, sym.raw, *rounded(value, 1 / other, 1))
  return None


def box_of_symbolic(sym: InputAffine, iset: InputSet, domain: ForwardDomain) -> Abstract:
  """Element-wise box of a symbolic input (used when no exact rule applies)."""
  if iset.norm == "l0":
    up, down = l0_moves(iset, sym.scale, sym.raw)
  else:
    up = down = jnp.abs(sym.scale)  # |delta_i| <= eps for every lp ball
  if domain.sound:  # the scale's relative error (and the moves' 3 roundings), value's
    rel = 2 * (sym.scale_rel + rounding.gamma(3, sym.value.dtype))
    err = 0.0 if sym.error is None else sym.error
    up, down = up * (1 + rel) + err, down * (1 + rel) + err
  return domain.from_range(sym.value, down, up)


# ------------------------------------------------------------------------ the driver

def input_value(iset: InputSet, domain: ForwardDomain) -> Union[Abstract, InputAffine]:
  """The abstract value of the input set in ``domain``."""
  if iset.norm == "linf":
    lower, upper = iset.box(outward=domain.sound)
    down, up = iset.x - lower, upper - iset.x
    if domain.sound:  # each difference is one rounding
      down, up = rounding.round_up(down), rounding.round_up(up)
    return domain.from_range(iset.x, down, up)
  scale = jnp.ones_like(iset.x) if iset.norm == "l0" else iset.eps
  return InputAffine(iset.x, scale, iset.x)


def propagate(apply_fn: Callable[..., jax.Array], params: chex.ArrayTree, iset: InputSet,
              domain: ForwardDomain,
              recorder: Optional[Callable] = None) -> Tuple[Abstract, List[Abstract]]:
  """Runs ``apply_fn(params, x)`` in ``domain`` over the input set.

  Args:
    recorder: optional ``recorder(eqn, invals, outval)`` called for every equation
      that depends on the input, with the abstract values as the domain saw them (the
      linear domain uses it to build its tape).

  Returns:
    (output, relu_inputs): the output :class:`Abstract` and a list with the abstract
    value of every ReLU input, in execution order.
  """
  closed, leaves = interpreter.trace(apply_fn, params, iset.x)
  relu_inputs: List[Abstract] = []

  def rule(eqn, invals):
    outvals = _rule(eqn, invals)
    if recorder is not None:
      recorder(eqn, invals, outvals[0])
    return outvals

  def _rule(eqn, invals):
    if any(isinstance(v, InputAffine) for v in invals):
      out = symbolic_rule(eqn, invals, iset, domain)
      if out is not None:
        return [out]
      boxed = {}  # one box per symbolic value (x * x stays a square)
      invals = [boxed.setdefault(id(v), box_of_symbolic(v, iset, domain))
                if isinstance(v, InputAffine) else v for v in invals]
    name = eqn.primitive.name
    out = nonlinear(eqn, invals, domain)
    if out is not None:
      return [out]
    if name in AFFINE_PRIMITIVES:
      return [domain.round_affine(eqn, invals, affine(eqn, invals, domain.name))]
    mono = monotone_function(eqn, invals)
    if mono is not None and domain.sound:
      rounding.terms(eqn, mono[1])  # an inexact map (tanh, logistic) raises
    if mono is not None:
      g, i, is_relu = mono
      if is_relu:
        relu_inputs.append(invals[i])
      return [domain.monotone(g, invals[i])]
    raise UnsupportedPrimitiveError(name, domain.name)

  is_abstract = lambda v: isinstance(v, (Abstract, InputAffine))
  start = input_value(iset, domain)
  if recorder is not None:
    recorder(None, [], start)
  (out,) = interpreter.interpret(closed, list(leaves) + [start], is_abstract, rule)
  if isinstance(out, InputAffine):
    out = box_of_symbolic(out, iset, domain)
  elif not isinstance(out, Abstract):  # the output does not depend on the input
    zero = jnp.zeros_like(out)
    out = domain.from_range(out, zero, zero)
  return out, relu_inputs
