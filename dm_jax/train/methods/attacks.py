"""Attacks of the training methods: PGD (Madry et al. 2018) and TRADES' KL attack."""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from dm_jax.core import fast_paths
from dm_jax.core.input_sets import TINY as _TINY  # sqrt(x + _TINY): finite grads at 0
from dm_jax.core.input_sets import canonical_norm


def _per_example(eps, x):
  """Broadcasts a scalar or (B,) radius to (B, 1, ..., 1)."""
  eps = jnp.asarray(eps, dtype=x.dtype)
  if eps.ndim == 0:
    return jnp.broadcast_to(eps, (x.shape[0],) + (1,) * (x.ndim - 1))
  return eps.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def flat_norm(t: jax.Array, norm: str) -> jax.Array:
  """Row-wise ``norm`` ("linf", "l1", else l2) of a (B, ...) tensor: (B,)."""
  t = t.reshape((t.shape[0], -1))
  if norm == "linf":
    return jnp.max(jnp.abs(t), axis=-1)
  if norm == "l1":
    return jnp.sum(jnp.abs(t), axis=-1)
  return jnp.sqrt(jnp.sum(jnp.square(t), axis=-1) + _TINY)


def _project(x_adv, x, eps, norm, domain):
  """Projects onto the ball ``||x_adv - x||_norm <= eps`` and into ``domain``."""
  e = _per_example(eps, x)
  d = x_adv - x
  if norm == "linf":
    d = jnp.clip(d, -e, e)
  else:  # l2
    n = flat_norm(d, "l2").reshape(e.shape)
    d = d * jnp.minimum(1.0, e / jnp.maximum(n, 1e-12))
  x_adv = x + d
  if domain is not None:
    x_adv = jnp.clip(x_adv, domain[0], domain[1])
  return x_adv


def _random_start(key, x, eps, norm):
  e = _per_example(eps, x)
  if norm == "linf":
    return x + jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * e
  k1, k2 = jax.random.split(key)
  g = jax.random.normal(k1, x.shape, x.dtype)
  g = g / jnp.maximum(flat_norm(g, "l2"), 1e-12).reshape(e.shape)
  r = jax.random.uniform(k2, e.shape, x.dtype) ** (1.0 / x[0].size)
  return x + g * r * e


def _attack_objective(logits, labels, loss):
  """Per-example objective to maximise: CE, or the margin max_{j!=y} f_j - f_y."""
  if loss == "ce":
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if loss == "margin":
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    true = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return other - true
  raise ValueError(f"Unknown attack loss {loss!r}; expected 'ce' or 'margin'.")


def _pgd_steps(objective, x, x0, eps, steps, step_size, norm, domain, unroll=None):
  """``steps`` of projected (sign / normalised) gradient ascent of sum(objective);
  ``unroll=None``: unrolled where the CPU-tuned paths are on (:mod:`dm_jax.core.fast_paths`)."""
  grad_fn = jax.grad(lambda xa: jnp.sum(objective(xa)))

  def body(_, xa):
    g = grad_fn(xa)
    if norm == "linf":
      xa = xa + step_size * jnp.sign(g)
    else:
      n = jnp.maximum(flat_norm(g, "l2"), 1e-12).reshape((-1,) + (1,) * (x.ndim - 1))
      xa = xa + step_size * g / n
    return _project(xa, x, eps, norm, domain)

  if unroll is None:
    unroll = fast_paths.enabled()
  if unroll:
    # XLA:CPU runs convolution gradients inside a while loop ~10x slower than in
    # straight-line code (small CNN, batch 200: 520 vs 45 ms per step); unrolled, the
    # compile time grows with ``steps`` (~0.3 s per step there): seconds once per
    # training run, against a step several times faster for the whole run.
    xa = x0
    for i in range(steps):
      xa = body(i, xa)
    return xa
  return lax.fori_loop(0, steps, body, x0)


def check_attack_norm(norm: str) -> str:
  """The canonical name of ``norm`` if PGD supports it (l-inf, l2); else ValueError."""
  norm = canonical_norm(norm)
  if norm not in ("linf", "l2"):
    raise ValueError(f"PGD supports norm 'linf' or 'l2'; got {norm!r}.")
  return norm


def pgd_attack(apply_fn: Callable, params: Any, x: jax.Array, y: jax.Array, eps: Any,
               key: jax.Array,
               steps: int = 40, step_size: float = 0.01, norm: str = "linf",
               domain: Optional[Tuple[float, float]] = (0.0, 1.0), restarts: int = 1,
               loss: str = "ce", random_start: bool = True,
               x_init: Optional[jax.Array] = None,
               unroll: Optional[bool] = None) -> jax.Array:
  """Projected gradient descent (Madry et al. 2018) on the l-inf or l2 ball.

  Each restart starts from a uniform random point of the ball (``random_start``; else
  from ``x``), takes ``steps`` steps ``x += step_size * sign(grad)`` (l-inf) or
  ``x += step_size * grad / ||grad||_2`` (l2), each followed by projection onto the
  ball and clipping to ``domain``. Of all restarts, the point with the largest
  objective is kept per example. Pure and jit-able (``steps``, ``restarts``, ``norm``,
  ``loss``, ``domain`` static). The result carries no gradient (stop_gradient).

  Args:
    apply_fn: ``(params, x) -> logits``.
    x: (B, ...) inputs; y: (B,) labels; eps: scalar or (B,) radius.
    key: PRNG key for the random starts.
    loss: "ce" (cross-entropy) or "margin" (max_{j != y} f_j - f_y; > 0 means a
      successful attack).
    x_init: optional (B, ...) start point (projected onto the ball and the domain),
      replacing the random start: continues an attack in chunks of ``steps``.
    unroll: run the steps as straight-line code instead of a ``fori_loop`` (10x faster
      for conv nets on CPU; compile time grows with ``steps``); None: where the
      CPU-tuned paths are on (:func:`dm_jax.core.fast_paths.enabled`).

  Returns:
    (B, ...) adversarial inputs inside the ball and the domain.
  """
  norm = check_attack_norm(norm)
  _attack_objective(jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), loss)  # validates
  x = lax.stop_gradient(x)
  params = lax.stop_gradient(params)
  objective = lambda xa: _attack_objective(apply_fn(params, xa), y, loss)

  def one(k):
    if x_init is not None:
      x0 = lax.stop_gradient(x_init)
    else:
      x0 = _random_start(k, x, eps, norm) if random_start else x
    x0 = _project(x0, x, eps, norm, domain)
    xa = _pgd_steps(objective, x, x0, eps, steps, step_size, norm, domain, unroll)
    return xa, objective(xa)

  keys = jax.random.split(key, max(restarts, 1))
  best, best_val = one(keys[0])
  for i in range(1, restarts):
    xa, val = one(keys[i])
    better = (val > best_val).reshape((-1,) + (1,) * (x.ndim - 1))
    best = jnp.where(better, xa, best)
    best_val = jnp.maximum(val, best_val)
  return lax.stop_gradient(best)


def softmax_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
  """Per-example KL(softmax p || softmax q) of (B, K) logits: (B,)."""
  lp = jax.nn.log_softmax(logits_p, axis=-1)
  lq = jax.nn.log_softmax(logits_q, axis=-1)
  return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def trades_attack(apply_fn: Callable, params: Any, x: jax.Array, eps: Any, key: jax.Array,
                  steps: int,
                  step_size: float, norm: str = "linf",
                  domain: Optional[Tuple[float, float]] = (0.0, 1.0)) -> jax.Array:
  """TRADES' inner maximisation: PGD on KL(p(x) || p(x')) from x + 0.001 N(0, 1).

  Args:
    apply_fn: ``(params, x) -> logits``.
    x: (B, ...) inputs; eps: scalar or (B,) radius; key: PRNG key of the start.
    steps, step_size, norm ("linf" or "l2"), domain: as :func:`pgd_attack`.

  Returns:
    (B, ...) inputs inside the ball and the domain (no gradient).
  """
  norm = check_attack_norm(norm)
  x = lax.stop_gradient(x)
  params = lax.stop_gradient(params)
  clean = apply_fn(params, x)
  objective = lambda xa: softmax_kl(clean, apply_fn(params, xa))
  x0 = _project(x + 0.001 * jax.random.normal(key, x.shape, x.dtype), x, eps, norm, domain)
  return lax.stop_gradient(_pgd_steps(objective, x, x0, eps, steps, step_size, norm, domain))

