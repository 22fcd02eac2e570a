"""Interval bound propagation (IBP, Gowal et al. 2018) over any traced model.

Values are kept in centre-radius form: an affine map costs two calls (``W c + b`` and
``|W| r``) instead of the four of the ``W+``/``W-`` form. Through a non-decreasing ``g``
the interval ``[c - r, c + r]`` maps to ``[g(c - r), g(c + r)]``; through a "valley"
(non-increasing below 0, non-decreasing above: ``x**2``, ``|x|``) ``[l, u]`` maps to
``[g(clip(0, l, u)), max(g(l), g(u))]``; a product of two intervals is the range of the
four corner products.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from dm_jax.core import propagation
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
  """Centre ``c`` and radius ``r``: the box ``[c - r, c + r]``."""

  name = "interval"

  def from_range(self, nominal: jax.Array, down: jax.Array,
                 up: jax.Array) -> propagation.Abstract:
    return propagation.Abstract((nominal + (up - down) / 2,), ((up + down) / 2,))

  def monotone(self, g: Callable[[jax.Array], jax.Array],
               a: propagation.Abstract) -> propagation.Abstract:
    (c,), (r,) = a.centres, a.radii
    lo, hi = g(c - r), g(c + r)
    return propagation.Abstract(((hi + lo) / 2,), ((hi - lo) / 2,))

  def value_range(self, a: propagation.Abstract) -> Tuple[jax.Array, jax.Array]:
    (c,), (r,) = a.centres, a.radii
    return c - r, c + r

  def valley(self, g, a):
    lo, hi = self.value_range(a)
    top = jnp.maximum(g(lo), g(hi))
    bottom = g(jnp.clip(jnp.zeros_like(lo), lo, hi))
    return _from_ends(bottom, top)

  def product(self, a, b):
    (la, ua), (lb, ub) = self.value_range(a), self.value_range(b)
    corners = jnp.stack([la * lb, la * ub, ua * lb, ua * ub])
    return _from_ends(jnp.min(corners, axis=0), jnp.max(corners, axis=0))


def _from_ends(lo, hi) -> propagation.Abstract:
  return propagation.Abstract(((hi + lo) / 2,), ((hi - lo) / 2,))


def to_bounds(a: propagation.Abstract) -> Bounds:
  return Bounds(*IntervalDomain().value_range(a))


def interval_bounds(apply_fn: Callable, params: Any, x: jax.Array, eps: Any,
                    norm: Any = "linf", *, k: Optional[int] = None,
                    domain: Optional[Tuple[float, float]] = None,
                    return_relu_inputs: bool = False
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

  Returns:
    ``Bounds`` of the (B, K) output; with ``return_relu_inputs``, a pair
    ``(output_bounds, tuple_of_relu_input_bounds)``.
  """
  iset = make_input_set(x, eps, norm, k, domain)
  out, relus = propagation.propagate(apply_fn, params, iset, IntervalDomain())
  if return_relu_inputs:
    return to_bounds(out), tuple(to_bounds(a) for a in relus)
  return to_bounds(out)
