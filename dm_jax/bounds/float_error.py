"""The float rounding error of a backward (CROWN-family) bound, bounded by one forward pass.

A backward pass (:func:`dm_jax.bounds.linear.backward`, or its patch form) computes, in
float32, coefficients ``A_n`` at every node ``n`` it crosses and an offset, and returns
``L = offset + min_{x'} <A_0, x'>``. In exact arithmetic, for *any* coefficients,
``<A_out, z_out(x')>`` telescopes into ``L`` plus the error terms of each step, so
``margin(x') >= L - E`` for every real ``x'`` of the set, where ``E`` sums, over the
steps, bounds of the form ``<|A_n|, X_n>`` with ``X_n >= 0`` *independent of the rows*:

* an affine step ``z_o = L z_i + b``: the transpose ``A_i = fl(L^T A_o)`` errs by at
  most ``gamma(n_T) |L|^T |A_o|`` (``n_T`` terms per element, ``rounding.terms``), which
  against ``|z_i| <= m_i`` costs ``<|A_o|, gamma(n_T) |L| m_i>``; the bias term
  ``<A_o, b>`` (a sum over the node) costs ``gamma(size) <|A_o|, |b|>``;
* a ReLU step ``max(z, c)``: its float relaxation lines are off the exact ones by
  ``delta = 8u max(|l|, |u|) + 16u |c|`` at most (the gap to a convex function is
  largest at the end points; the lower line ``alpha x``, ``alpha`` in [0, 1], is exact),
  the product ``A_o * slope`` by ``u |A_i|``, the intercept sum as a bias. With
  ``M = max(|l|, |u|)``, ``C = |c|``, to first order in ``u``: the shifted interval
  ``fl(l - c), fl(u - c)`` moves each end by ``u (M + C)``, which the chord's
  extension violates by at most that; the slope ``fl(uc / fl(uc - lc))`` errs by
  ``2u`` relative against ``|z - lc| <= 2 (M + C)``; the intercept ``fl(-slope lc)``
  by ``u (M + C)``: ``6u (M + C)`` for the line of ``relu(z - c)``. Shifting it back,
  ``fl(fl(b + c) - fl(slope c))``, adds ``u (M + 2C) + u C + u (M + 3C)``: in all
  ``8u M + 12u C`` (``6u M`` for a plain ReLU, whose shift is skipped), rounded up to
  the constants above (a second review, twelfth session, found the earlier
  ``8u (M + C)`` short by ``4u C`` where ``c != 0``);
* max pooling: its relaxation is exact; the window scatter sums ``K`` terms;
* accumulations (a node read by several equations, the running offset, the final
  concretisation at the input or at the stop nodes): ``gamma`` of their lengths.

Here ``m_n >= |z_n(x')|`` comes from the sound tape (its intervals are sound in floating
point, :class:`dm_jax.bounds.interval.IntervalDomain` ``(sound=True)``), and ``l, u``
are the (sound) bounds the relaxations used. Every ``|A_n|`` is at most (up to a factor
``1 + gamma``) the absolute-value chain ``|C| |J_{out<-n}|`` with ReLU and pooling slopes
<= 1, so ``E <= <|C|, F_target>`` where ``F`` is the forward pass of this module:
``F_n = X_n + |L| F_inputs (1 + gamma)``, ReLU ``F_o = X_o + F_i (1 + 4u)``, pooling
``F_o = X_o + maxpool(F_i) (1 + gamma)``. One pass (about one ``|W|`` evaluation per
layer, twice) bounds the error of *every* row at once, whatever the relaxation slopes
(alpha-CROWN's included) and whether the pass ran dense or in patch form.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dm_jax.bounds import relaxations
from dm_jax.bounds.tape import NodeRef, Tape, interval_of, nominal_of
from dm_jax.core import primitives, propagation, rounding

def magnitude(tape: Tape, node: int) -> jax.Array:
  """``max(|lower|, |upper|)`` of the node's tape interval: (B, *S), >= every |value|."""
  lo, hi = interval_of(tape, node)
  return jnp.maximum(jnp.abs(lo), jnp.abs(hi))


def _size(t) -> int:
  return int(np.prod(np.shape(t)[1:]))


def _abs_apply(entry, values: Dict[int, jax.Array]) -> jax.Array:
  """``|L|`` of an affine entry applied to non-negative operand tensors (operand
  position -> tensor; the constants enter as ``|c|``, biases drop out): the forward
  domains' radius rule."""
  invals = [propagation.Abstract((), (values[j],)) if isinstance(r, NodeRef) else r.value
            for j, r in enumerate(entry.refs)]
  return propagation.affine(entry.eqn, invals, rounding.DOMAIN_NAME).radii[0]


def _bias(entry, tape: Tape) -> Optional[jax.Array]:
  """The constant part ``b`` of an affine entry (what the backward pass dots with
  ``A``), or None where the constants are coefficients."""
  prim = primitives.rule(entry.eqn.primitive.name)
  if prim.constants != primitives.BIAS or all(isinstance(r, NodeRef) for r in entry.refs):
    return None
  args = [jnp.zeros_like(nominal_of(tape, r.index)) if isinstance(r, NodeRef) else r.value
          for r in entry.refs]
  return entry.eqn.primitive.bind(*args, **entry.eqn.params)


def _uses(tape: Tape) -> Dict[int, int]:
  """How many operands of the tape's entries read each node (its coefficient is the
  sum of that many contributions)."""
  out: Dict[int, int] = {}
  for e in tape.entries:
    for _, n in e.nodes():
      out[n] = out.get(n, 0) + 1
  return out


def _offset_rel(tape: Tape, dtype) -> float:
  """The relative error of the running offset's additions (at most one per entry and
  per node concretised): ``2 T u``."""
  return 2 * (2 * len(tape.entries) + 4) * rounding.unit_roundoff(dtype)


def input_injection(tape: Tape) -> jax.Array:
  """``X_0``: the rounding of the concretisation ``min <A_0, x'>`` over the input set,
  per unit of ``|A_0|``: (B, *input_shape)."""
  iset = tape.iset
  x = iset.x
  rel = rounding.gamma(_size(x) + 6, x.dtype) + _offset_rel(tape, x.dtype)
  if iset.norm == "linf":
    lo, hi = iset.box(outward=True)
    return rel * jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  if iset.norm in ("l2", "l1"):
    return rel * (jnp.abs(x) + iset.eps)
  lo, hi = iset.domain if iset.domain is not None else (0.0, 1.0)
  spread = jnp.maximum(jnp.abs(hi - x), jnp.abs(x - lo))
  return (rel + rounding.gamma(iset.k + 2, x.dtype)) * (jnp.abs(x) + spread)


def stop_injection(tape: Tape, bounds: Tuple[jax.Array, jax.Array]) -> jax.Array:
  """``X_s`` of a stop node concretised on its box ``bounds`` (folded IBP)."""
  lo, hi = bounds
  rel = (rounding.gamma(_size(lo) + 3, lo.dtype)
         + _offset_rel(tape, lo.dtype))
  return rel * jnp.maximum(jnp.abs(lo), jnp.abs(hi))


def _needed(tape: Tape, target: int, stop_nodes) -> list:
  """The entries a backward pass from ``target`` crosses (in execution order), and the
  stop entries it ends at."""
  needed, order = {target}, []
  for e in reversed(tape.entries):
    if e.out > target or e.out not in needed:
      continue
    order.append(e)
    if e.out not in stop_nodes:
      needed.update(n for _, n in e.nodes())
  return order[::-1], needed


def error_radius(tape: Tape, target: int, bounds: Dict[int, Tuple],
                 stop_nodes: Optional[Dict[int, Tuple]] = None,
                 cache: Optional[Dict[int, jax.Array]] = None) -> jax.Array:
  """``F_target`` (B, *shape(target)): the float error of any backward bound from
  ``target`` with rows ``A`` is at most ``<|A|, F_target>`` (see the module docstring;
  :func:`row_error`).

  Args:
    tape: a tape recorded in the sound interval domain.
    target: the node the rows sit on.
    bounds: the bounds {ReLU / pooling input: (l, u)} the backward pass relaxes with.
    stop_nodes: {node: (l, u)}: nodes the pass concretises on a box (folded IBP).
    cache: optional {node: F}, filled and reused (only without stop nodes, and only
      while ``bounds`` of the nodes already cached do not change: the layer-by-layer
      loop of ``linear.intermediate_bounds``).
  """
  stop_nodes = stop_nodes or {}
  if stop_nodes:
    cache = None
  cache = {} if cache is None else cache
  order, needed = _needed(tape, target, stop_nodes)
  uses = _uses(tape)
  dtype = nominal_of(tape, target).dtype
  u = rounding.unit_roundoff(dtype)
  offset_rel = _offset_rel(tape, dtype)
  F: Dict[int, jax.Array] = {}

  def finish(node, f):
    """``f`` plus the rounding of summing the node's coefficient contributions."""
    k = uses.get(node, 0)
    if k > 1:
      f = f + rounding.gamma(k, dtype) * magnitude(tape, node)
    return f

  if 0 in needed and 0 not in stop_nodes:
    F[0] = cache[0] if 0 in cache else finish(0, input_injection(tape))
    cache[0] = F[0]
  for e in order:
    o = e.out
    if o in stop_nodes:
      F[o] = stop_injection(tape, stop_nodes[o])
      continue
    if o in cache:
      F[o] = cache[o]
      continue
    nodes = e.nodes()
    if e.kind == primitives.TAPE_AFFINE:
      n_t = max(rounding.terms(e.eqn, j, transpose=True) for j, _ in nodes)
      n_f = max(rounding.terms(e.eqn, j) for j, _ in nodes)
      f = _abs_apply(e, {j: F[n] for j, n in nodes})
      if n_t + n_f:
        f = f * (1 + rounding.gamma(n_t + n_f + 4, dtype))
      if n_t:
        mags = _abs_apply(e, {j: magnitude(tape, n) for j, n in nodes})
        f = f + rounding.gamma(n_t, dtype) * mags
      b = _bias(e, tape)
      if b is not None:
        rel = rounding.gamma(_size(f) + 2, dtype) + offset_rel
        f = f + rel * jnp.broadcast_to(jnp.abs(b), f.shape)
    elif e.kind == primitives.TAPE_RELU:
      (_, i), = nodes
      l, up = bounds[i]
      _, _, _, up_b = relaxations.relu_relaxation(l, up, e.relu_const, "crown")
      c = relaxations.relu_constant(e.relu_const, l)
      cabs = 0.0 if c is None else jnp.abs(c)
      delta = 8 * u * jnp.maximum(jnp.abs(l), jnp.abs(up)) + 16 * u * cabs + rounding.FLOOR
      rel = rounding.gamma(_size(l) + 2, dtype) + offset_rel
      f = ((1 + 4 * u) * F[i] + delta + 2 * u * magnitude(tape, i)
           + rel * (jnp.abs(up_b) + 2 * cabs))
    else:  # max pooling
      (_, i), = nodes
      l, up = bounds[i]
      _, _, max_up = relaxations.maxpool_relaxation(e.eqn, l, up)
      k = int(np.prod(e.eqn.params["window_dimensions"]))
      window_max = lambda t: e.eqn.primitive.bind(t, **e.eqn.params)
      rel = rounding.gamma(_size(max_up) + 2, dtype) + offset_rel
      f = ((1 + rounding.gamma(k + 2, dtype)) * window_max(F[i])
           + rounding.gamma(k, dtype) * window_max(magnitude(tape, i))
           + rel * jnp.abs(max_up))
    F[o] = cache[o] = finish(o, f)
  return F[target]


def row_error(A: jax.Array, radius: jax.Array,
              layout: relaxations.Layout = relaxations.DENSE) -> jax.Array:
  """``<|A|, F>`` rounded up, ``A.shape[:lead]``: the error bound of rows ``A`` (in
  ``layout``) whose target has error radius ``F`` (:func:`error_radius`)."""
  n = int(np.prod(A.shape[layout.lead:]))
  return (1 + rounding.gamma(n, A.dtype)) * layout.dot(jnp.abs(A), radius) + rounding.FLOOR


def sound_lower(lower: jax.Array, error: jax.Array) -> jax.Array:
  """``lower - error`` rounded down: the bound sound in floating point."""
  return rounding.round_down(lower - error)

