"""An upper bound of the worst-case cross-entropy by one backward row (loss fusion).

CROWN-IBP trains on ``CE(-lb, y)``, ``lb`` the K - 1 margin lower bounds: K - 1 rows go
through the backward pass. *Loss fusion* (Xu et al. 2020, "Automatic perturbation
analysis for scalable certified robustness and beyond", auto_LiRPA) bounds the loss
itself. With ``t_j = f_j - f_y`` (``t_y = 0``),

    max_{x' in S} CE(f(x'), y) = max_{x'} log sum_j exp(t_j(x')).

Each ``exp(t_j)`` lies below its secant over an interval ``[l_j, u_j]`` holding
``t_j(x')`` for every ``x'`` in the set, ``exp(t) <= a_j t + c_j`` (exp is convex);
``log`` is increasing; so

    max CE <= log(1 + sum_{j != y} c_j + max_{x'} sum_{j != y} a_j t_j(x')),

and the last maximum is *one* row ``r = sum_j a_j (e_j - e_y)`` through CROWN's backward
pass over IBP's intermediate bounds (CROWN-IBP's relaxation). The intervals
``[l_j, u_j]`` are IBP's with the specification folded into the last affine layer (one
pass through that layer over the same tape, as auto_LiRPA takes the exp input's bounds
from IBP in CROWN-IBP mode). Zhang et al.'s ``beta`` mixes the two upper bounds of the
sum, CROWN-IBP's and IBP's ``1 + sum_j exp(u_j)``, before the log (a convex combination
of upper bounds is one), as auto_LiRPA's training code mixes its fused bounds.

The bound is sound for every ``[l_j, u_j]`` that holds ``t_j``; it is not the same number
as ``CE(-lb_crown_ibp, y)``: tighter where the maximum of the sum is below the sum of the
maxima, looser where the secants over IBP's (wider) intervals are far above ``exp``.
Everything is computed after a shift ``M >= max_j u_j`` (``exp(t) = e^M exp(t - M)``),
so no ``exp`` overflows however wide the intervals; the result does not depend on ``M``.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp

from dm_jax.bounds import linear
from dm_jax.core.input_sets import InputSet


def exp_secant(l: jax.Array, u: jax.Array, shift: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Slope and intercept of the secant of ``exp(t - shift)`` over ``[l, u]``.

  The line ``a t + c`` lies on or above ``exp(t - shift)`` for every ``t`` in ``[l, u]``
  (exp is convex); for ``l == u`` it is the tangent there (the interval is one point).
  Up to the float's smallest normal number, that is: XLA on CPU flushes subnormal
  results to zero, so where ``exp(t - shift)`` is below ``finfo.tiny`` the line may
  be that far below it (:func:`cross_entropy_upper_bound` adds the slack back).

  Args:
    l, u: (...) interval ends, ``l <= u``.
    shift: broadcastable to ``l``: subtracted from ``t`` before ``exp``; with
      ``shift >= u`` (as :func:`cross_entropy_upper_bound` takes it) no ``exp``
      overflows.

  Returns:
    (a, c), each shaped like ``l``.
  """
  width = u - l
  e_l, e_u = jnp.exp(l - shift), jnp.exp(u - shift)
  # The slope (e_u - e_l) / w in three forms, each where it is accurate and finite:
  # exp(l) (1 + w/2 + w^2/6) below 1e-4 (the series' error, w^3/24, is below float
  # rounding there), exp(l) expm1(w) / w up to 20 (no cancellation), and the plain
  # difference above (exp(l) / exp(u) < e^-20: no cancellation; expm1 would overflow).
  # Each branch gets a width clipped to its range, so no branch makes inf or NaN.
  w_mid = jnp.clip(width, 1e-4, 20.0)
  w_big = jnp.maximum(width, 20.0)
  a = jnp.where(width < 1e-4, e_l * (1.0 + width / 2 + width * width / 6),
                jnp.where(width <= 20.0, e_l * (jnp.expm1(w_mid) / w_mid),
                          (e_u - e_l) / w_big))
  return a, e_l - a * l


def cross_entropy_upper_bound(apply_fn: Callable, params: Any, iset: InputSet,
                              y: jax.Array, *, beta: Any = 1.0,
                              use_patches: bool = True) -> Tuple[jax.Array, jax.Array]:
  """Upper bound of ``max_{x' in S} CE(f(x'), y)`` per example, by loss fusion.

  Args:
    apply_fn, params: the model ``(params, x) -> (B, K) logits``.
    iset: the input set (:func:`dm_jax.core.input_sets.make_input_set`), B examples.
    y: (B,) labels.
    beta: Zhang et al.'s mix (scalar, may be traced): ``beta`` times the CROWN-IBP bound
      of ``sum_j exp(t_j)`` plus ``1 - beta`` times IBP's, before the log.
    use_patches: see :func:`dm_jax.bounds.linear.linear_bounds`.

  Returns:
    ((B,) upper bounds of the worst-case cross-entropy, (B, K) IBP margin lower bounds
    ``f_y - f_j`` with the last layer folded, 0 at ``j == y``; for metrics).
  """
  y = jnp.asarray(y)
  x = iset.x
  if y.shape != x.shape[:1]:
    raise ValueError(f"y must have shape (B,) = {x.shape[:1]}; got {y.shape}.")
  tape = linear.record_tape(apply_fn, params, iset)
  out_lo, _ = linear.interval_of(tape, tape.output)
  if out_lo.ndim != 2:
    raise ValueError(f"loss fusion needs (B, K) logits; the model gives {out_lo.shape}.")
  batch, num_classes = out_lo.shape
  others = linear._other_classes(y, num_classes)  # pylint: disable=protected-access
  eye = jnp.eye(num_classes, dtype=out_lo.dtype)
  t_rows = eye[others] - eye[y][:, None, :]              # (B, K-1, K): t_j = f_j - f_y
  # IBP's folded bounds of t_j, both ends, over the same tape.
  low = linear.folded_lower_bounds(tape, jnp.concatenate([t_rows, -t_rows], axis=1))
  l, u = low[:, :num_classes - 1], -low[:, num_classes - 1:]
  u = jnp.maximum(u, l)  # the same number up to rounding; the secant needs l <= u
  # Any shift gives the same bound; M >= every u keeps every exp below 1.
  shift = jax.lax.stop_gradient(jnp.maximum(jnp.max(u, axis=1, keepdims=True), 0.0))
  a, c = exp_secant(l, u, shift)                        # (B, K-1)
  row = jnp.einsum("bj,bjk->bk", a, t_rows)[:, None, :]  # (B, 1, K)
  bounds = linear.intermediate_bounds(tape, "crown", "ibp", use_patches=use_patches)
  # max <row, f> = -min <-row, f>
  row_max = -linear.backward(tape, tape.output, -row, bounds, "crown")[:, 0]
  own = jnp.exp(-shift[:, 0])                           # the j == y term, exp(0 - M)
  crown_sum = own + jnp.sum(c, axis=1) + row_max
  ibp_sum = own + jnp.sum(jnp.exp(u - shift), axis=1)
  # Each term's line may have lost up to ``tiny`` in c and in a t to subnormal flushing
  # (see exp_secant); adding it back keeps the sum an upper bound, and above 0 where
  # every term (own included) underflowed, so the log is finite.
  flushed = 2 * num_classes * jnp.finfo(out_lo.dtype).tiny
  total = beta * crown_sum + (1 - beta) * ibp_sum + flushed
  # The true sum is >= exp(-M) (its j == y term), so clipping there stays sound.
  upper = shift[:, 0] + jnp.log(jnp.maximum(total, own))
  rows = jnp.arange(batch)[:, None]
  margins = jnp.zeros((batch, num_classes), low.dtype).at[rows, others].set(
      low[:, num_classes - 1:])  # min (f_y - f_j) = -max t_j
  return upper, margins
