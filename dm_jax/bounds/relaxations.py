"""The linear relaxations of the nonlinearities and the steps of a backward pass written
once for both coefficient layouts (the lines of general activations and products are
built in :mod:`dm_jax.bounds.activations`; their steps are here).

A backward pass carries coefficients ``A`` whose leading axes index the bound rows and
whose trailing axes line up with a node's values. Two layouts exist: *dense*
(``A`` of shape (B, R, *S), :mod:`dm_jax.bounds.linear`) and *windowed* (``A`` of shape
(B, H, W, R, Kh, Kw, C): each output position's coefficients over its receptive-field
window, :mod:`dm_jax.bounds.patches`). A :class:`Layout` says how a per-node tensor
(B, *S) lines up with ``A``; the ReLU, activation and product steps, the max-pooling
weights, the concretisation at the input and the chunked identity-bounds driver below
are written once over it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from dm_jax.bounds import activations
from dm_jax.core import interpreter
from dm_jax.core.errors import UnsupportedPrimitiveError
from dm_jax.core.input_sets import InputSet, max_decrease


def is_zero(c: ArrayLike) -> bool:
  """Whether ``c`` is a known (not traced) all-zero constant."""
  if isinstance(c, jax.core.Tracer):
    return False
  c = np.asarray(c)
  return c.size > 0 and bool(np.all(c == 0))


def relu_constant(const: ArrayLike, like: jax.Array) -> Optional[jax.Array]:
  """The constant c of a ReLU-like ``max(x, c)`` broadcast to ``like``'s shape, or None
  when it is a known zero (plain ReLU: the intercept terms then vanish and are skipped,
  which under grad also saves passes that multiply cotangents by the zero)."""
  if is_zero(const):
    return None
  return jnp.broadcast_to(jnp.asarray(const, like.dtype), like.shape)


def relu_relaxation(l: jax.Array, u: jax.Array, const: ArrayLike, method: str,
                    alpha: Optional[ArrayLike] = None
                    ) -> Tuple[jax.Array, Optional[jax.Array], jax.Array, jax.Array]:
  """Slopes/intercepts of ``y = max(x, c)``: ``lo_s x + lo_b <= y <= up_s x + up_b``.

  ``const`` is the ReLU's c as recorded; for a known zero ``lo_b`` is None (it is 0).
  ``alpha`` (optional, broadcastable to ``l``'s shape (B, *S)): the lower slopes of the
  unstable neurons, clipped to [0, 1] (alpha-CROWN's free parameters); it replaces
  ``method``'s choice there. Every slope in [0, 1] gives a sound lower line
  (``y >= x`` and ``y >= 0`` hold on the whole interval, so does any convex combination),
  hence the bound is sound for every ``alpha``.
  """
  c = relu_constant(const, l)
  if c is None:
    lo_s, up_s, up_b = _relu_relaxation_at_zero(l, u, method, alpha)
    return lo_s, None, up_s, up_b
  lo_s, up_s, up_b = _relu_relaxation_at_zero(l - c, u - c, method, alpha)
  # y - c = relu(x - c): shift back by c.
  return lo_s, c - lo_s * c, up_s, up_b + c - up_s * c


def _relu_relaxation_at_zero(lc, uc, method, alpha=None):
  """``(lo_s, up_s, up_b)`` of ``relu`` on ``[lc, uc]`` (its lower intercept is 0).

  The one rule of the lower slope of every linear method: stable neurons take their
  exact slope (0 or 1); unstable ones ``uc / (uc - lc)`` (fastlin), ``1[uc >= -lc]``
  (crown), 0 (zero), or ``clip(alpha, 0, 1)`` when ``alpha`` is given (alpha-CROWN).
  """
  active, inactive = lc >= 0, uc <= 0
  unstable = ~(active | inactive)
  denom = jnp.where(unstable, uc - lc, 1.0)
  slope = jnp.where(unstable, uc / denom, active.astype(lc.dtype))
  up_b_rel = jnp.where(unstable, -slope * lc, 0.0)
  if alpha is not None:
    lower = jnp.where(unstable, jnp.clip(jnp.asarray(alpha, lc.dtype), 0.0, 1.0), slope)
  elif method == "fastlin":
    lower = slope
  elif method == "crown":
    lower = jnp.where(unstable, (uc >= -lc).astype(lc.dtype), slope)
  else:  # zero
    lower = jnp.where(unstable, 0.0, slope)
  return lower, slope, up_b_rel


def initial_alpha(l: jax.Array, u: jax.Array, const: ArrayLike) -> jax.Array:
  """alpha-CROWN's starting lower slopes (B, *S) of ``max(x, c)`` on ``[l, u]``: CROWN's
  adaptive choice (1 where ``u - c >= c - l``, else 0; the exact slope where stable), so
  that the first iterate is CROWN's bound."""
  return relu_relaxation(l, u, const, "crown")[0]


def window_slices(eqn: interpreter.Equation, t: jax.Array, fill: float) -> List[jax.Array]:
  """The K elements of every pooling window of ``t``: list of arrays of the out shape."""
  p = eqn.params
  if any(d != 1 for d in p["base_dilation"]) or any(d != 1 for d in p["window_dilation"]):
    raise UnsupportedPrimitiveError("reduce_window_max", "linear (CROWN-family)",
                                    "dilated pooling")
  t = lax.pad(t, jnp.asarray(fill, t.dtype), [(lo, hi, 0) for lo, hi in p["padding"]])
  out_shape = tuple(eqn.outvars[0].aval.shape)
  slices = []
  for offset in np.ndindex(*p["window_dimensions"]):
    limit = [o + (n - 1) * s + 1 for o, n, s in zip(offset, out_shape, p["window_strides"])]
    slices.append(lax.slice(t, offset, limit, p["window_strides"]))
  return slices


def maxpool_relaxation(eqn: interpreter.Equation, l: jax.Array,
                       u: jax.Array) -> Tuple[List[jax.Array], jax.Array, jax.Array]:
  """DeepPoly's relaxation of max pooling over bounds (l, u) of its input.

  Returns (onehots, dominated, max_up): per window offset, whether it holds the element
  with the largest lower bound (the lower bound ``y >= x_best``); whether that element
  dominates its window (its lower bound >= every other upper bound, then
  ``y <= x_best``); and the window's largest upper bound (the upper bound otherwise).
  """
  lows = window_slices(eqn, l, -jnp.inf)
  ups = window_slices(eqn, u, -jnp.inf)
  best = jnp.argmax(jnp.stack(lows), axis=0)
  onehots = [(best == j).astype(l.dtype) for j in range(len(lows))]
  best_low = jnp.max(jnp.stack(lows), axis=0)
  others_up = [jnp.where(best == j, -jnp.inf, up) for j, up in enumerate(ups)]
  dominated = (best_low >= jnp.max(jnp.stack(others_up), axis=0)).astype(l.dtype)
  return onehots, dominated, jnp.max(jnp.stack(ups), axis=0)


# ------------------------------------------------------------------------ layouts

@dataclasses.dataclass(frozen=True)
class Layout:
  """How coefficients ``A`` line up with a node's values.

  Attributes:
    lift: maps a (B, *S) node tensor to one that broadcasts against ``A``.
    dot: ``<A, t>`` over the value axes for a (B, *S) node tensor ``t``: the bound's
      shape ``A.shape[:lead]``.
    lead: the number of leading (row) axes of ``A``.
  """
  lift: Callable[[jax.Array], jax.Array]
  dot: Callable[[jax.Array, jax.Array], jax.Array]
  lead: int

  def sum(self, product: jax.Array) -> jax.Array:
    """Sums an ``A``-shaped product over the value axes."""
    return jnp.sum(product, axis=tuple(range(self.lead, product.ndim)))


def _dense_dot(A, t):
  return jnp.sum(A * t[:, None], axis=tuple(range(2, A.ndim)))


DENSE = Layout(lift=lambda t: t[:, None], dot=_dense_dot, lead=2)


def relu_step(A: jax.Array, l: jax.Array, u: jax.Array, const: ArrayLike, method: str,
              layout: Layout, alpha: Optional[ArrayLike] = None) -> Tuple[jax.Array, jax.Array]:
  """Backward step through ``y = max(x, c)`` with pre-activation bounds ``[l, u]``.

  Returns ``(A_x, offset)``: the coefficients of x (``A``'s layout) and the bound's
  constant part (``A.shape[:lead]``), from the lower line where a coefficient is >= 0
  and the upper line where it is < 0 (``method``'s lower slope for unstable neurons, or
  ``alpha``'s (B, *S), see :func:`relu_relaxation`).
  """
  lo_s, lo_b, up_s, up_b = relu_relaxation(l, u, const, method, alpha)
  # = pos * lo_s + neg * up_s (pos/neg the parts of A) with one select instead of two
  # materialised parts: fewer passes over the coefficients, under grad too.
  take_lower = A >= 0
  A_x = A * jnp.where(take_lower, layout.lift(lo_s), layout.lift(up_s))
  if lo_b is None:  # plain ReLU: the lower intercept is 0
    picked_b = jnp.minimum(A, 0) * layout.lift(up_b)
  else:
    picked_b = A * jnp.where(take_lower, layout.lift(lo_b), layout.lift(up_b))
  return A_x, layout.sum(picked_b)


def _times(A, b):
  """``A * b`` with 0 where ``A`` is 0 (an infinite fallback intercept met by a zero
  coefficient contributes nothing, not NaN)."""
  return jnp.where(A == 0, jnp.zeros((), A.dtype), A * b)


def activation_step(A: jax.Array, lines: activations.Lines,
                    layout: Layout) -> Tuple[jax.Array, jax.Array]:
  """Backward step through an element-wise ``y = g(x)`` with per-neuron lines
  ``lines`` (:class:`dm_jax.bounds.activations.Lines`, each (B, *S)).

  Returns ``(A_x, offset)`` as :func:`relu_step`: the lower line where a coefficient is
  >= 0, the upper line where it is < 0.
  """
  take_lower = A >= 0
  A_x = A * jnp.where(take_lower, layout.lift(lines.lo_s), layout.lift(lines.up_s))
  picked_b = _times(A, jnp.where(take_lower, layout.lift(lines.lo_b),
                                 layout.lift(lines.up_b)))
  return A_x, layout.sum(picked_b)


def product_step(A: jax.Array, planes: activations.Planes,
                 layout: Layout) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Backward step through ``z = x * y`` with per-neuron planes
  (:class:`dm_jax.bounds.activations.Planes`, each (B, *S)).

  Returns ``(A_x, A_y, offset)``: the coefficients of x and y (``A``'s layout) and the
  constant part (``A.shape[:lead]``), from the lower plane where a coefficient is >= 0
  and the upper plane where it is < 0.
  """
  take_lower = A >= 0
  pick = lambda lo, up: jnp.where(take_lower, layout.lift(lo), layout.lift(up))
  A_x = A * pick(planes.ax_l, planes.ax_u)
  A_y = A * pick(planes.ay_l, planes.ay_u)
  return A_x, A_y, layout.sum(_times(A, pick(planes.c_l, planes.c_u)))


def maxpool_weights(A: jax.Array, l: jax.Array, u: jax.Array, eqn: interpreter.Equation,
                    layout: Layout) -> Tuple[jax.Array, jax.Array, List[jax.Array]]:
  """The relaxed max pooling applied to ``A`` at the pooling's output.

  Returns ``(weights, offset, onehots)``: ``weights`` (``A``'s layout, at the output) go
  to the window element with the largest lower bound (``onehots`` marks it per window
  offset); negative coefficients only where it dominates its window, else they meet the
  window's largest upper bound, a constant in ``offset``. Moving ``weights`` through the
  windows is the layout's own step.
  """
  onehots, dominated, max_up = maxpool_relaxation(eqn, l, u)
  pos, neg = jnp.maximum(A, 0), jnp.minimum(A, 0)
  weights = pos + neg * layout.lift(dominated)
  return weights, layout.dot(neg, (1 - dominated) * max_up), onehots


def box_minimum(A: jax.Array, lower: jax.Array, upper: jax.Array,
                layout: Layout) -> jax.Array:
  """``min <A, h>`` over the box ``lower <= h <= upper`` (node tensors (B, *S)):
  ``A.shape[:lead]``."""
  return layout.dot(jnp.maximum(A, 0), lower) + layout.dot(jnp.minimum(A, 0), upper)


def concretize_input(A: jax.Array, iset: InputSet, layout: Layout,
                     outward: bool = False) -> jax.Array:
  """``min <A, x'>`` over the input set (``A.shape[:lead]``), in closed form: the box
  for l-inf (with the data box), else ``<A, x> - max_decrease`` (dual norm, top-k).
  ``outward``: the l-inf box rounded outward (:meth:`InputSet.box`; the sound mode)."""
  if iset.norm == "linf":
    return box_minimum(A, *iset.box(outward=outward), layout)
  batch = iset.x.shape[0]
  centre = layout.dot(A, iset.x)
  eps = iset.eps.reshape(batch, -1)[:, 0].reshape((batch,) + (1,) * (layout.lead - 1))
  flat = A.reshape(A.shape[:layout.lead] + (-1,))
  x = layout.lift(iset.x)
  x = x.reshape(x.shape[:layout.lead] + (-1,))
  return centre - max_decrease(iset, flat, x, eps)


def identity_rows_per_chunk(n: int, bytes_per_row: int, chunk_bytes: int) -> int:
  """How many of ``n`` identity rows (each ``bytes_per_row`` of coefficients) fit one
  chunk of the memory budget (at least 1)."""
  return int(max(1, min(n, chunk_bytes // max(1, bytes_per_row))))


def chunked_identity_bounds(one_chunk: Callable[[jax.Array], Tuple[jax.Array, jax.Array]],
                            n: int, chunk: int) -> Tuple[jax.Array, jax.Array]:
  """Bounds of ``n`` identity rows computed ``chunk`` rows at a time.

  Args:
    one_chunk: ``start -> (lower, upper)``, each of shape (*lead, chunk): the bounds of
      rows ``start ... start + chunk - 1`` (rows past ``n`` are padding).
    n: the number of rows; chunk: rows per call.

  Returns:
    (lower, upper) of shape (*lead, n).
  """
  n_chunks = math.ceil(n / chunk)
  if n_chunks == 1:
    lo, up = one_chunk(0)
  else:
    # Rematerialised under grad, so training keeps one chunk of residuals, not all.
    lo, up = lax.map(jax.checkpoint(one_chunk), jnp.arange(n_chunks) * chunk)
    merge = lambda t: jnp.moveaxis(t, 0, -2).reshape(t.shape[1:-1] + (-1,))
    lo, up = merge(lo), merge(up)
  return lo[..., :n], up[..., :n]
