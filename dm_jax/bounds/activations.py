"""Linear relaxations of element-wise nonlinearities and of products, for the linear
(CROWN-family) methods.

For an element-wise ``y = g(x)`` with pre-activation bounds ``l <= x <= u`` (each of
shape (B, *S)), :func:`lines` returns per-neuron lines

    lo_s * x + lo_b  <=  g(x)  <=  up_s * x + up_b     for every x in [l, u],

chosen as CROWN does for general activations (Zhang et al. 2018, "Efficient neural
network robustness certification with general activation functions") from the
function's *curvature* on [l, u] (the table's ``curvature``,
:mod:`dm_jax.core.primitives`):

* convex on [l, u] (exp, softplus, x**2, |x|; an S-shaped g with u <= 0): the secant
  above, the tangent at the midpoint below (the tangent point with the least area
  between the line and g);
* concave (log1p; an S-shaped g with l >= 0): the mirror image;
* S-shaped (convex below 0, concave above: tanh, logistic, erf) with l < 0 < u: above,
  the secant where it is above g (``g'(u) >= k``, k the secant's slope), otherwise the
  tangent at the point d in [0, u] whose tangent passes through ``(l, g(l))``; below,
  the mirror image (the secant, or the tangent at d in [l, 0] through ``(u, g(u))``).
  d is found by :data:`BISECTION_STEPS` steps of bisection (a fixed count: jit-friendly);
* REVERSE_S (concave below 0, convex above: x**3, erfc): the lines of -g, negated.

Soundness does not rest on the choice of slope: every intercept is recomputed from the
slope ``a`` as the extreme of ``g(x) - a x`` over [l, u], at the points where it can be
(the ends, and the tangent point where it is an interior extreme: for convex g and a
tangent at m, ``min g(x) - a x`` is at m; for S-shaped g and a tangent at d in the
concave part, ``max g(x) - a x`` is at l, d or u). So an unconverged bisection costs
tightness only, and a secant slope spoiled by cancellation on a tiny interval still
gives a sound line (``g(x) - a x`` is convex for convex g, whatever a is). Intervals
narrower than eps ** (1/3) (relative; 5e-3 in float32) take the midpoint's tangent slope
in place of the secant's, whose gradient is rounding noise there; degenerate intervals
(l == u) get the tangent slope and the exact value.

Where a bound or a line is not finite (exp overflowing, an infinite intermediate bound),
the neuron falls back to constant lines at its output's interval (the tape's, sound
over the whole input set): ``fallback_lo <= g(x) <= fallback_hi``.

For ``z = x * y`` of two input-dependent values with ``x in [lx, ux]``, ``y in [ly,
uy]``, :func:`product_planes` returns McCormick's planes (CROWN's choice of one lower and
one upper plane):

    ly x + lx y - lx ly  <=  x y  <=  uy x + lx y - lx uy,

exact identities ``x y - lower = (x - lx)(y - ly) >= 0`` and ``upper - x y = (x - lx)
(uy - y) >= 0``.

Bounds are computed in the model's dtype. The intercepts are pushed outwards by a few
ulps of the terms they are computed from (:data:`INTERCEPT_ULPS`): a secant of x**3 or
exp has terms far larger than the values it bounds, and its rounded intercept alone
would cut g by more than float32's relative precision of g. The backward pass itself is
not outward-rounded, as for ReLU.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from dm_jax.bounds.tape import Entry, Tape, interval_of
from dm_jax.core import primitives

# Bisection steps for the tangent points of S-shaped functions: the search interval
# shrinks 2^30-fold (to 1e-8 of the pre-activation width on [-1, 1]; a looser but still
# sound line where it has not converged).
BISECTION_STEPS = 30

Fn = Callable[[jax.Array], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Lines:
  """``lo_s x + lo_b <= g(x) <= up_s x + up_b`` element-wise (each (B, *S)); the
  intercepts may be infinite (fallback lines), the slopes are finite."""
  lo_s: jax.Array
  lo_b: jax.Array
  up_s: jax.Array
  up_b: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Planes:
  """``ax_l x + ay_l y + c_l <= x y <= ax_u x + ay_u y + c_u`` element-wise."""
  ax_l: jax.Array
  ay_l: jax.Array
  c_l: jax.Array
  ax_u: jax.Array
  ay_u: jax.Array
  c_u: jax.Array


def derivative(g: Fn) -> Fn:
  """The element-wise derivative of element-wise ``g`` (a forward-mode product)."""
  return lambda t: jax.jvp(g, (t,), (jnp.ones_like(t),))[1]


def _mid(l, u):
  return l / 2 + u / 2  # no overflow for huge ends


def _secant_slope(g, dg, l, u):
  """The secant's slope on [l, u]; on intervals narrower than :func:`_min_secant_width`
  the tangent's at the midpoint instead (any slope is sound, the intercepts being
  recomputed; the secant's gradient, ``(g'(u) - k) / (u - l)``, computed as a difference
  of two terms of order ``1 / (u - l)^2``, is rounding noise there, and NaN on a
  zero-width interval)."""
  width = u - l
  m = _mid(l, u)
  wide = width > _min_secant_width(l.dtype) * (1 + jnp.abs(m))
  return jnp.where(wide, (g(u) - g(l)) / jnp.where(wide, width, 1), dg(m))


def _min_secant_width(dtype):
  """The relative width below which a secant's slope is taken as the tangent's at the
  midpoint: eps ** (1/3) of the dtype (5e-3 in float32), where the secant's gradient
  has a rounding error of about eps / width^2 = eps ** (1/3)."""
  return float(jnp.finfo(dtype).eps) ** (1 / 3)


# Intercepts are pushed out by this many ulps of the terms they are computed from (the
# values g(p) and products a p), which covers their rounding: a secant of x**3 on
# [-7, 163] has terms of 1e5 and its float32 intercept is off by 1e-2.
INTERCEPT_ULPS = 8


def _intercept(g, a, points, pick):
  vals = [g(p) for p in points]
  terms = [a * p for p in points]
  best = pick(jnp.stack([v - t for v, t in zip(vals, terms)]), axis=0)
  scale = jnp.max(jnp.abs(jnp.stack(vals + terms)), axis=0)  # (not a sum: no overflow)
  return best, INTERCEPT_ULPS * jnp.finfo(best.dtype).eps * scale


def _upper_intercept(g, a, *points):
  """``max g(p) - a p`` over the candidate points, plus the rounding slack: the least
  intercept of slope ``a`` above g at those points."""
  best, slack = _intercept(g, a, points, jnp.max)
  return best + slack


def _lower_intercept(g, a, *points):
  best, slack = _intercept(g, a, points, jnp.min)
  return best - slack


def _convex(g, dg, l, u):
  """Lines of a g convex on [l, u]: tangent at the midpoint below, secant above."""
  k = _secant_slope(g, dg, l, u)
  m = _mid(l, u)
  a = dg(m)
  return (a, _lower_intercept(g, a, m, l, u), k, _upper_intercept(g, k, l, u))


def _bisect(valid, lo, hi):
  """The ``hi`` end after :data:`BISECTION_STEPS` halvings that keep ``valid(hi)``
  (``hi`` is returned unchanged where no midpoint is valid).

  A ``lax.fori_loop`` when traced (one loop in the program, whatever the count); a
  Python loop on concrete arrays, where a ``fori_loop`` would be compiled anew for every
  call (its body closes over this call's function), which made eager bounds 0.3 s per
  activation layer slower.
  """
  def body(_, c):
    lo, hi = c
    mid = _mid(lo, hi)
    ok = valid(mid)
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)
  if isinstance(lo, jax.core.Tracer) or isinstance(hi, jax.core.Tracer):
    return lax.fori_loop(0, BISECTION_STEPS, body, (lo, hi))[1]
  carry = (lo, hi)
  for i in range(BISECTION_STEPS):
    carry = body(i, carry)
  return carry[1]


def _s_upper(g, dg, l, u):
  """(slope, intercept) of an upper line of an S-shaped g (convex below 0, concave
  above) on [l, u] with l < 0 < u: the secant if it is above g, else the tangent at
  d in [0, u] through (l, g(l))."""
  gl, gu = g(l), g(u)
  k = _secant_slope(g, dg, l, u)
  # Tangents at d >= 0 pass above (l, g(l)) exactly from the tangent point d* on (the
  # tangent at d lies above g on [0, u], g being concave there, and on [l, 0] iff it is
  # above g(l)); bisection from [0, u] keeps a valid end.
  valid = lambda d: g(d) + dg(d) * (l - d) >= gl
  d = lax.stop_gradient(_bisect(valid, jnp.zeros_like(u), u))
  a = jnp.where(dg(u) >= k, k, dg(d))
  return a, _upper_intercept(g, a, l, d, u)


def _negated(fn):
  """The lines of g from the lines of -g (the lower and upper lines swap)."""
  def lines_of(g, dg, l, u):
    lo_s, lo_b, up_s, up_b = fn(lambda t: -g(t), lambda t: -dg(t), l, u)
    return -up_s, -up_b, -lo_s, -lo_b
  return lines_of


def _s_shaped(g, dg, l, u):
  """Lines of an S-shaped g (convex on x <= 0, concave on x >= 0) on [l, u]."""
  zero = jnp.zeros_like(l)
  # The three cases, each on an interval where it applies (the others clipped to it):
  # convex (u <= 0), concave (l >= 0), straddling 0.
  cv = _convex(g, dg, jnp.minimum(l, zero), jnp.minimum(u, zero))
  cc = _negated(_convex)(g, dg, jnp.maximum(l, zero), jnp.maximum(u, zero))
  neg = lambda t: -g(-t)  # S-shaped too: its upper line is g's lower line, reflected
  convex, concave = u <= 0, l >= 0
  # Straddling neurons' ends, and a placeholder [-1, 1] for the others (whose lines are
  # not taken from here; a degenerate placeholder would give NaN gradients).
  straddles = ~(convex | concave)
  ls, ss = jnp.where(straddles, l, -1), jnp.where(straddles, u, 1)
  up_s, up_b = _s_upper(g, dg, ls, ss)
  # The lower line is the upper line of -g(-t) (also S-shaped) on [-u, -l].
  lo_s, lo_b = _s_upper(neg, derivative(neg), -ss, -ls)
  st = (lo_s, -lo_b, up_s, up_b)
  return tuple(jnp.where(convex, a, jnp.where(concave, b, c)) for a, b, c in zip(cv, cc, st))


_BY_CURVATURE = {
    primitives.CONVEX: _convex,
    primitives.CONCAVE: _negated(_convex),
    primitives.S_SHAPED: _s_shaped,
    primitives.REVERSE_S: _negated(_s_shaped),
}


def _fallback(fallback, like):
  """The fallback range broadcast to ``like``, NaN read as unbounded (-inf, inf): the
  interval domain's centre and radius turn infinite ends into NaN after an affine map."""
  lo, hi = (jnp.broadcast_to(jnp.asarray(f, like.dtype), like.shape) for f in fallback)
  return jnp.where(jnp.isnan(lo), -jnp.inf, lo), jnp.where(jnp.isnan(hi), jnp.inf, hi)


def lines(g: Fn, curvature: str, l: jax.Array, u: jax.Array,
          fallback: Tuple[jax.Array, jax.Array]) -> Lines:
  """Per-neuron linear lower and upper bounds of element-wise ``g`` over ``[l, u]``.

  Args:
    g: the element-wise function (e.g. ``jnp.tanh``); its derivative is taken by jvp.
    curvature: ``primitives.CONVEX``, ``CONCAVE``, ``S_SHAPED`` or ``REVERSE_S`` (g's
      shape on the whole real line; see the module docstring).
    l, u: (B, *S) pre-activation bounds (ordered element-wise; ``l > u``, from rounding
      of an intersection, is read as ``[u, l]``).
    fallback: (lo, hi), each (B, *S): a sound range of ``g(x)`` (the output node's
      interval; NaN read as unbounded), taken as constant lines where the lines are not
      finite.

  Returns:
    :class:`Lines` of shape (B, *S).
  """
  if curvature not in _BY_CURVATURE:
    raise ValueError(f"Unknown curvature {curvature!r}.")
  l, u = jnp.minimum(l, u), jnp.maximum(l, u)
  finite = jnp.isfinite(l) & jnp.isfinite(u)
  # Placeholders where an end is not finite, so that nothing below overflows; those
  # neurons take the fallback.
  l0, u0 = jnp.where(finite, l, 0), jnp.where(finite, u, 0)
  lo_s, lo_b, up_s, up_b = _BY_CURVATURE[curvature](g, derivative(g), l0, u0)
  lo_ok = finite & jnp.isfinite(lo_s) & jnp.isfinite(lo_b)
  up_ok = finite & jnp.isfinite(up_s) & jnp.isfinite(up_b)
  f_lo, f_hi = _fallback(fallback, l)
  zero = jnp.zeros_like(l)
  return Lines(jnp.where(lo_ok, lo_s, zero), jnp.where(lo_ok, lo_b, f_lo),
               jnp.where(up_ok, up_s, zero), jnp.where(up_ok, up_b, f_hi))


def product_planes(x_bounds: Tuple[jax.Array, jax.Array],
                   y_bounds: Tuple[jax.Array, jax.Array],
                   fallback: Tuple[jax.Array, jax.Array]) -> Planes:
  """McCormick's planes of ``x * y`` over ``[lx, ux] x [ly, uy]`` (each (B, *S)); where a
  bound or a plane is not finite, constant planes at ``fallback`` (the product's
  interval)."""
  (lx, ux), (ly, uy) = x_bounds, y_bounds
  lx, ux = jnp.minimum(lx, ux), jnp.maximum(lx, ux)
  ly, uy = jnp.minimum(ly, uy), jnp.maximum(ly, uy)
  planes = (ly, lx, -lx * ly, uy, lx, -lx * uy)
  ok = jnp.all(jnp.stack([jnp.isfinite(t) for t in (lx, ux, ly, uy) + planes]), axis=0)
  zero = jnp.zeros_like(lx)
  f_lo, f_hi = _fallback(fallback, lx)
  ax_l, ay_l, c_l, ax_u, ay_u, c_u = planes
  pick = lambda t, f: jnp.where(ok, t, f)
  return Planes(pick(ax_l, zero), pick(ay_l, zero), pick(c_l, f_lo),
                pick(ax_u, zero), pick(ay_u, zero), pick(c_u, f_hi))


def entry_lines(tape: Tape, entry: Entry, bounds: Dict[int, Tuple]) -> Lines:
  """The lines of a TAPE_ACTIVATION entry over its input's bounds ``bounds[node]``
  (B, *S), falling back to its output's interval in the tape where they are not finite
  (the dense and the windowed passes both call this)."""
  l, u = bounds[entry.node]
  return lines(entry.function(), entry.curvature, l, u, interval_of(tape, entry.out))


def entry_planes(tape: Tape, entry: Entry, bounds: Dict[int, Tuple]) -> Planes:
  """McCormick's planes of a TAPE_PRODUCT entry over its operands' bounds."""
  (_, x_node), (_, y_node) = entry.nodes()
  return product_planes(bounds[x_node], bounds[y_node], interval_of(tape, entry.out))
