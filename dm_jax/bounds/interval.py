"""Interval bound propagation (IBP, Gowal et al. 2018) over any traced model.

Values are kept in centre-radius form: an affine map costs two calls (``W c + b`` and
``|W| r``) instead of the four of the ``W+``/``W-`` form. Through a non-decreasing ``g``
the interval ``[c - r, c + r]`` maps to ``[g(c - r), g(c + r)]``; through a "valley"
(non-increasing below 0, non-decreasing above: ``x**2``, ``|x|``) ``[l, u]`` maps to
``[g(clip(0, l, u)), max(g(l), g(u))]``; a product of two intervals is the range of the
four corner products.

``sound=True`` (:class:`IntervalDomain` ``(sound=True)``) makes the intervals sound in
floating point (:mod:`dm_jax.core.rounding`; :func:`interval_bounds` runs it in float64):
every affine step widens the radius by a bound on the rounding error of the computed
centre and radius (``4u(|c| + r)`` for an element-wise step, ``gamma(n) |W| (|c| + r)``
for a sum of ``n`` terms, one more pass with ``|W|``), the end points are rounded
outward, and only exact monotone maps (max, min, clamp, max pooling) are allowed
(products, valleys and smooth activations raise).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from dm_jax.core import interpreter, propagation, rounding
from dm_jax.core.input_sets import make_input_set


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bounds:
  """Element-wise bounds ``lower <= value <= upper`` (same shapes)."""
  lower: jax.Array
  upper: jax.Array

  @property
  def centre(self) -> jax.Array:
    return (self.upper + self.lower) / 2

  @property
  def radius(self) -> jax.Array:
    return (self.upper - self.lower) / 2


class IntervalDomain(propagation.ForwardDomain):
  """Centre ``c`` and radius ``r``: the box ``[c - r, c + r]``.

  Args:
    sound: widen every radius by a bound on its float rounding error and round the end
      points outward (see the module docstring), so that the box holds every value of
      the real-valued network over the real input set.
  """

  name = "interval"

  def __init__(self, sound: bool = False):
    self.sound = bool(sound)

  def _box(self, lo: jax.Array, hi: jax.Array) -> propagation.Abstract:
    """The box ``[lo, hi]`` (sound mode: held in exact arithmetic)."""
    c, r = rounding.centre_radius(lo, hi)
    return propagation.Abstract((c,), (r,))

  def from_range(self, nominal: jax.Array, down: jax.Array,
                 up: jax.Array) -> propagation.Abstract:
    if self.sound:
      return self._box(rounding.add_down(nominal, -down), rounding.add_up(nominal, up))
    return propagation.Abstract((nominal + (up - down) / 2,), ((up + down) / 2,))

  def monotone(self, g: Callable[[jax.Array], jax.Array],
               a: propagation.Abstract) -> propagation.Abstract:
    lo, hi = (g(t) for t in self.value_range(a))  # g is exact in sound mode
    if self.sound:
      return self._box(lo, hi)
    return propagation.Abstract(((hi + lo) / 2,), ((hi - lo) / 2,))

  def value_range(self, a: propagation.Abstract) -> Tuple[jax.Array, jax.Array]:
    (c,), (r,) = a.centres, a.radii
    if self.sound:  # directed rounding: exact where c -/+ r is
      return rounding.add_down(c, -r), rounding.add_up(c, r)
    return c - r, c + r

  def valley(self, g: Callable[[jax.Array], jax.Array],
             a: propagation.Abstract) -> propagation.Abstract:
    lo, hi = self.value_range(a)
    top = jnp.maximum(g(lo), g(hi))
    bottom = g(jnp.clip(jnp.zeros_like(lo), lo, hi))
    return _from_ends(bottom, top)

  def product(self, a: propagation.Abstract,
              b: propagation.Abstract) -> propagation.Abstract:
    (la, ua), (lb, ub) = self.value_range(a), self.value_range(b)
    corners = jnp.stack([la * lb, la * ub, ua * lb, ua * ub])
    return _from_ends(jnp.min(corners, axis=0), jnp.max(corners, axis=0))

  def round_affine(self, eqn: interpreter.Equation, invals: List[Any],
                   out: propagation.Abstract) -> propagation.Abstract:
    """``out`` with its radius widened by the rounding error of the affine step: the
    centre's ``W c + b`` and the radius' ``|W| r``, each summing ``n`` terms
    (``rounding.terms``), err by at most ``gamma(n) |W| (|c| + r)`` together (one
    rounding: ``4u (|c'| + r')``)."""
    if not self.sound:
      return out
    idx = [i for i, v in enumerate(invals) if isinstance(v, propagation.Abstract)]
    n = max(rounding.terms(eqn, i) for i in idx)
    (c,), (r,) = out.centres, out.radii
    if n == 0:
      return out
    if n <= 2:
      err = n * (rounding.slack(c) + rounding.slack(r))
    else:
      mags = [propagation.Abstract((), (jnp.abs(v.centres[0]) + v.radii[0],))
              if isinstance(v, propagation.Abstract) else v for v in invals]
      size = propagation.affine(eqn, mags, self.name).radii[0]
      err = rounding.gamma(n, c.dtype) * size + rounding.slack(r) + (n + 2) * rounding.FLOOR
    return propagation.Abstract((c,), (r + err,))


def _from_ends(lo, hi) -> propagation.Abstract:
  return propagation.Abstract(((hi + lo) / 2,), ((hi - lo) / 2,))


def to_bounds(a: propagation.Abstract, sound: bool = False) -> Bounds:
  return Bounds(*IntervalDomain(sound).value_range(a))


def interval_bounds(apply_fn: Callable, params: Any, x: jax.Array, eps: Any,
                    norm: Any = "linf", *, k: Optional[int] = None,
                    domain: Optional[Tuple[float, float]] = None,
                    return_relu_inputs: bool = False, sound: bool = False
                    ) -> Union[Bounds, Tuple[Bounds, Tuple[Bounds, ...]]]:
  """Sound element-wise bounds of ``apply_fn(params, x')`` over the input set.

  Args:
    apply_fn: pure function ``(params, x) -> logits`` (e.g. a Flax ``model.apply``).
    params: its parameters (any pytree).
    x: (B, ...) nominal inputs.
    eps: radius: scalar, (B,), or x.shape (linf only). Ignored for l0.
    norm: "linf", "l2", "l1" or "l0".
    k: number of changed coordinates for l0.
    domain: optional (lo, hi) data box intersected with the set (e.g. (0, 1)).
    return_relu_inputs: also return the bounds of every ReLU input.
    sound: bounds sound in floating point, for the real-valued network over the real
      set (see the module docstring): computed in float64 with the rounding widening,
      rounded outward to the input's dtype, and never tighter than the plain bounds
      (:func:`no_tighter`; the plain pass runs too). Under ``jax.jit``, trace and call
      inside ``jax.enable_x64(True)``.

  Returns:
    ``Bounds`` of the (B, K) output; with ``return_relu_inputs``, a pair
    ``(output_bounds, tuple_of_relu_input_bounds)``.
  """
  iset = make_input_set(x, eps, norm, k, domain)
  out, relus = propagation.propagate(apply_fn, params, iset, IntervalDomain())
  plain = to_bounds(out), tuple(to_bounds(a) for a in relus)
  if sound:
    rounding.check_no_subnormals(params, iset.x, iset.eps)
    rounding.check_x64_trace(iset.x)
    dtype = iset.x.dtype
    with jax.enable_x64(True):  # float64, rounded outward back to the input's dtype
      out, relus = propagation.propagate(apply_fn, rounding.float64(params),
                                         iset.take(rounding.float64), IntervalDomain(True))
      back = lambda a: Bounds(*(f(t, dtype) for f, t in zip(
          (rounding.down_to, rounding.up_to), IntervalDomain(True).value_range(a))))
      plain = (no_tighter(back(out), plain[0]),
               tuple(no_tighter(back(a), b) for a, b in zip(relus, plain[1])))
  return plain if return_relu_inputs else plain[0]


def no_tighter(sound: Bounds, plain: Bounds) -> Bounds:
  """The sound bounds widened to hold the plain ones too (the sound mode's results are
  never tighter than the plain float bounds: a certificate with ``sound=True`` is one
  without, and a sound lower bound is <= the plain one)."""
  return Bounds(jnp.minimum(sound.lower, plain.lower), jnp.maximum(sound.upper, plain.upper))
