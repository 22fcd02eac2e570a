"""Perturbation sets (threat models) and their validation.

An input set is the ball ``{x : ||x - x_nom||_p <= eps}`` for p in {inf, 2, 1}, or the
l0 set "at most ``k`` coordinates changed, each to any value in [0, 1]". Optionally the
set is intersected with the data domain box ``domain = (lo, hi)`` (e.g. ``(0, 1)`` for
images).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

NORMS = ("linf", "l2", "l1", "l0")
# sqrt(x + TINY) keeps the gradient of a zero l2 norm finite; it only enlarges bounds.
TINY = 1e-30
_ALIASES = {
    "linf": "linf", "inf": "linf", "l_inf": "linf", "infinity": "linf",
    "l2": "l2", "2": "l2", "l1": "l1", "1": "l1", "l0": "l0", "0": "l0",
}


def canonical_norm(norm: Any) -> str:
  """Maps ``'linf' | 'inf' | np.inf | 'l2' | 2 | 'l1' | 1 | 'l0' | 0`` to a norm name."""
  if isinstance(norm, (int, float, np.integer, np.floating)) and not isinstance(norm, bool):
    key = "inf" if np.isinf(norm) else str(int(norm)) if float(norm).is_integer() else None
  elif isinstance(norm, str):
    key = norm.strip().lower()
  else:
    key = None
  if key not in _ALIASES:
    raise ValueError(f"Unknown norm {norm!r}: expected one of {', '.join(NORMS)} "
                     "(or inf, 2, 1, 0).")
  return _ALIASES[key]


def dual_norm(norm: str) -> str:
  """The dual of an lp norm: linf <-> l1, l2 <-> l2."""
  return {"linf": "l1", "l1": "linf", "l2": "l2"}[norm]


@dataclasses.dataclass(frozen=True)
class InputSet:
  """A validated perturbation set around a batch ``x`` of shape (B, ...).

  A pytree (leaves ``x`` and ``eps``; ``norm``, ``k`` and ``domain`` static), so a set
  built and validated once can be passed into a compiled function and split into
  blocks along the batch.

  Attributes:
    x: (B, ...) nominal inputs.
    eps: radius broadcast to x's shape (B, ...); unused for l0.
    norm: one of ``NORMS``.
    k: number of changeable coordinates for l0 (None otherwise).
    domain: optional (lo, hi) data box that the set is intersected with.
  """
  x: jax.Array
  eps: jax.Array
  norm: str
  k: Optional[int] = None
  domain: Optional[Tuple[float, float]] = None

  def take(self, fn: Callable[[jax.Array], jax.Array]) -> "InputSet":
    """The set with ``fn`` applied to its batch-leading arrays (``x`` and ``eps``), e.g.
    a slice of the batch."""
    return dataclasses.replace(self, x=fn(self.x), eps=fn(self.eps))

  def box(self, outward: bool = False) -> Tuple[jax.Array, jax.Array]:
    """Element-wise (lower, upper) bounds of the set (the smallest enclosing box).
    ``outward``: ``x -/+ eps`` rounded outward (:func:`dm_jax.core.rounding.round_down`),
    so that the float box holds the real one (the sound mode)."""
    if self.norm == "l0":
      lo, hi = (0.0, 1.0) if self.domain is None else self.domain
      lower, upper = jnp.full_like(self.x, lo), jnp.full_like(self.x, hi)
      # A coordinate that is not changed stays at x; the box must contain it too.
      return jnp.minimum(lower, self.x), jnp.maximum(upper, self.x)
    lower, upper = self.x - self.eps, self.x + self.eps
    if outward:
      from dm_jax.core import rounding  # pylint: disable=import-outside-toplevel
      lower, upper = rounding.round_down(lower), rounding.round_up(upper)
    if self.domain is not None:
      lower = jnp.clip(lower, self.domain[0], self.domain[1])
      upper = jnp.clip(upper, self.domain[0], self.domain[1])
      # Keep the nominal point inside even if it lies outside the domain.
      lower, upper = jnp.minimum(lower, self.x), jnp.maximum(upper, self.x)
    return lower, upper


jax.tree_util.register_dataclass(InputSet, data_fields=["x", "eps"],
                                meta_fields=["norm", "k", "domain"])


def topk_sum(t: jax.Array, k: int) -> jax.Array:
  """Sum of the k largest entries along the last axis (all of them if fewer)."""
  k = min(k, t.shape[-1])
  return jnp.sum(jax.lax.top_k(t, k)[0], axis=-1)


def l0_moves(iset: "InputSet", coef: jax.Array, x: jax.Array) -> jax.Array:
  """Per-coordinate (increase, decrease) of ``<coef, x'>`` when coordinate i alone moves
  from ``x_i`` anywhere in the domain (default [0, 1]); both >= 0, shape of coef."""
  lo, hi = iset.domain if iset.domain is not None else (0.0, 1.0)
  to_hi, to_lo = coef * (hi - x), coef * (lo - x)
  return (jnp.maximum(jnp.maximum(to_hi, to_lo), 0.0),
          jnp.maximum(-jnp.minimum(to_hi, to_lo), 0.0))


def max_decrease(iset: "InputSet", coef: jax.Array, x: jax.Array,
                 eps: jax.Array) -> jax.Array:
  """``max over the set of -<coef, x' - x>`` for l2, l1 and l0 sets.

  Args:
    iset: the set (its norm, k and domain are used).
    coef: (..., n) coefficient rows; coordinates outside the input must be zero.
    x: nominal coordinates aligned with ``coef`` (broadcastable to it; l0 only).
    eps: per-row radius broadcastable to ``coef.shape[:-1]`` (l2, l1).

  Returns:
    (...,) the largest decrease: ``eps ||coef||_2``, ``eps ||coef||_inf``, or for l0 the
    sum of the k largest per-coordinate decreases with coordinates moving in the domain.
  """
  if iset.norm == "l2":
    return eps * jnp.sqrt(jnp.sum(coef * coef, axis=-1) + TINY)
  if iset.norm == "l1":
    return eps * jnp.max(jnp.abs(coef), axis=-1)
  if iset.norm == "l0":
    return topk_sum(l0_moves(iset, coef, x)[1], iset.k)
  raise ValueError(f"max_decrease is for l2, l1 and l0 sets; got {iset.norm}.")


def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def make_input_set(x: jax.Array, eps: Any, norm: Any = "linf", k: Optional[int] = None,
                   domain: Optional[Tuple[float, float]] = None) -> InputSet:
  """Validates arguments and builds an :class:`InputSet`.

  Args:
    x: (B, ...) floating inputs, batch axis first.
    eps: scalar, (B,) per example, or (for linf) x's shape per element. Must be >= 0.
    norm: linf, l2, l1 or l0 (aliases accepted, see :func:`canonical_norm`).
    k: for l0, a positive integer number of coordinates that may change.
    domain: None or (lo, hi) with lo < hi.

  Raises:
    ValueError: naming the offending argument.
  """
  norm = canonical_norm(norm)
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"x must have a leading batch axis; got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a floating-point array; got dtype {x.dtype}.")
  if norm == "l0":
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
      raise ValueError(f"norm='l0' needs k, a positive integer number of changed "
                       f"coordinates; got k={k!r}.")
    k = int(k)
    eps_b = jnp.zeros_like(x)
  else:
    if k is not None:
      raise ValueError(f"k is only used with norm='l0'; got k={k!r} with norm={norm!r}.")
    if eps is None:
      raise ValueError("eps is required.")
    eps = jnp.asarray(eps, dtype=x.dtype)
    if _is_concrete(eps) and bool(np.any(np.asarray(eps) < 0)):
      raise ValueError(f"eps must be >= 0; got {np.asarray(eps).min()}.")
    if _is_concrete(eps) and not bool(np.all(np.isfinite(np.asarray(eps)))):
      raise ValueError("eps must be finite.")
    if not _is_concrete(eps):
      # A traced eps cannot be checked here; a negative or non-finite one turns the
      # bounds into NaN, which never certifies anything, instead of wrong numbers.
      eps = jnp.where((eps >= 0) & jnp.isfinite(eps), eps, jnp.nan)
    if eps.ndim == 0:
      eps_b = jnp.broadcast_to(eps, x.shape)
    elif eps.shape == (x.shape[0],):
      eps_b = jnp.broadcast_to(eps.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
    elif eps.shape == x.shape and norm == "linf":
      eps_b = eps
    else:
      raise ValueError(f"eps must be a scalar or have shape (B,)={x.shape[:1]}"
                       f"{' or x.shape' if norm == 'linf' else ''}; got {eps.shape} "
                       f"for x of shape {x.shape}.")
  if domain is not None:
    try:
      lo, hi = (float(domain[0]), float(domain[1]))
    except (TypeError, IndexError, ValueError):
      raise ValueError(f"domain must be None or a pair (lo, hi); got {domain!r}.") from None
    if not lo < hi:
      raise ValueError(f"domain must satisfy lo < hi; got {domain!r}.")
    domain = (lo, hi)
  return InputSet(x=x, eps=eps_b, norm=norm, k=k, domain=domain)


# ------------------------------------------------- membership (host-side checks)

def _domain_ok(iset: InputSet, p: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Per element: inside the data box (l0: default [0, 1]), or unchanged."""
  box = iset.domain if iset.domain is not None else ((0.0, 1.0) if iset.norm == "l0"
                                                      else None)
  if box is None:
    return np.ones(p.shape, bool)
  return ((p >= box[0]) & (p <= box[1])) | (p == x)


def contains(iset: InputSet, points: Any) -> np.ndarray:
  """Whether ``points[b]`` lies in the set around ``x[b]``: (B,) bool.

  Checked on the host in float64, without tolerance: ``|p - x| <= eps`` element-wise
  (l-inf), ``||p - x||_2 <= eps`` or ``||p - x||_1 <= eps`` (l2, l1), at most ``k``
  changed coordinates (l0); with a data box every changed coordinate in it (for l0 the
  default box is [0, 1]). For float32 data the differences are exact in float64, so a
  point passes only if it is in the set in exact arithmetic (a counterexample is then a
  true one). Not jit-able (concrete arrays).
  """
  x = np.asarray(iset.x, np.float64)
  p = np.asarray(points, np.float64)
  if p.shape != x.shape:
    raise ValueError(f"points must have the shape of the set's x {x.shape}; got {p.shape}.")
  batch = x.shape[0]
  flat = lambda t: t.reshape(batch, -1)
  d = flat(p - x)
  ok = np.all(np.isfinite(flat(p)), axis=1) & np.all(flat(_domain_ok(iset, p, x)), axis=1)
  eps = flat(np.asarray(iset.eps, np.float64))
  if iset.norm == "linf":
    return ok & np.all(np.abs(d) <= eps, axis=1)
  if iset.norm == "l0":
    return ok & (np.sum(d != 0, axis=1) <= iset.k)
  size = np.sqrt(np.sum(d * d, axis=1)) if iset.norm == "l2" else np.sum(np.abs(d), axis=1)
  return ok & (size <= eps[:, 0])


def pull_inside(iset: InputSet, points: Any) -> np.ndarray:
  """``points`` moved into the set where float rounding left them just outside, in the
  dtype of ``x``: (B, ...).

  l-inf: clipped to ``[x - eps, x + eps]`` (and the box) in float64, then rounded, and
  a coordinate that rounding pushed outside goes one float step back toward ``x`` (the
  float32 grid holds ``x``, so this lands inside). l2 / l1: the perturbation scaled down
  onto the ball in float64 (times 1 - 1e-6), the coordinates clipped to the box. l0:
  unchanged. Check the result with :func:`contains`: a point far outside is moved, not
  validated.
  """
  x = np.asarray(iset.x, np.float64)
  dtype = np.asarray(iset.x).dtype
  p = np.asarray(points, np.float64)
  if p.shape != x.shape:
    raise ValueError(f"points must have the shape of the set's x {x.shape}; got {p.shape}.")
  if iset.norm == "l0":
    return p.astype(dtype)
  if iset.domain is not None:
    p = np.where(p == x, p, np.clip(p, *iset.domain))
  batch = x.shape[0]
  eps = np.asarray(iset.eps, np.float64)
  if iset.norm == "linf":
    lo, hi = x - eps, x + eps
    if iset.domain is not None:
      lo = np.minimum(np.maximum(lo, iset.domain[0]), x)
      hi = np.maximum(np.minimum(hi, iset.domain[1]), x)
    out = np.clip(p, lo, hi).astype(dtype)
    out = np.where(out > hi, np.nextafter(out, np.asarray(-np.inf, dtype)), out)
    return np.where(out < lo, np.nextafter(out, np.asarray(np.inf, dtype)), out)
  d = (p - x).reshape(batch, -1)
  size = (np.sqrt(np.sum(d * d, axis=1)) if iset.norm == "l2"
          else np.sum(np.abs(d), axis=1))
  radius = eps.reshape(batch, -1)[:, 0] * (1 - 1e-6)
  scale = np.where(size > radius, radius / np.maximum(size, 1e-300), 1.0)
  return (x + (d * scale[:, None]).reshape(x.shape)).astype(dtype)
