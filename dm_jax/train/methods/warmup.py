"""Shi et al. (2021)'s warm-up regularisers, added to any training method during the
eps ramp ("Fast certified robust training with short warmup", NeurIPS 2021, Sec. 4).

Both read the interval (IBP) bounds ``[l, u]`` of every ReLU input over the input set:

* **bound tightness**: per ReLU layer, ``ReLU(tol - t_0 / t) / tol`` with ``t`` the mean
  radius ``(u - l) / 2`` of the layer and ``t_0`` the mean radius of the input box. It is
  zero while a layer's intervals are at most ``1 / tol`` times as wide as the input's
  and pushes back on the growth that makes IBP training unstable early on.
* **ReLU balance**: per ReLU layer, with the centres ``c = (u + l) / 2`` and their mean
  ``m`` over the batch and the layer, the ratio of the summed centres of the active
  (``l > 0``) and the inactive (``u < 0``) neurons, and the same ratio of their summed
  squared deviations ``(c - m)^2``; each ratio ``r`` is taken as ``min(r, 1 / r)`` and
  penalised by ``ReLU(tol - r) / tol``. IBP training otherwise drifts towards dead
  neurons (the paper's observation); a layer without active or without inactive
  neurons contributes 0 (the ratio is undefined there).

Each is averaged over the ReLU layers; their sum is weighted by
``weight * (1 - eps_t / eps_final)`` (Shi et al.'s decay), so it fades out as eps reaches
its final value. The trainer (:func:`dm_jax.train.training_loss`) uses the regularised
loss only before the ramp's end and a plain step after it, rather than one step with
the bound pass behind a ``lax.cond``: XLA on CPU ran that branch about 20x slower than
the same pass outside a conditional (small CNN, batch 100: 989 against 50 ms).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from dm_jax.bounds.interval import Bounds, interval_bounds
from dm_jax.core.input_sets import make_input_set

# Below this share of eps_final (the warm-up's eps = 0 included) the regulariser's bounds
# use it instead of eps: both terms are scale-free for small eps, and a radius near 0
# would leave the interval widths to float32 cancellation (choice).
MIN_EPS_SHARE = 0.01

_TINY = 1e-12


def _ratio_term(num: jax.Array, den: jax.Array, valid: jax.Array, tol: float) -> jax.Array:
  """``ReLU(tol - min(r, 1 / r)) / tol`` with ``r = num / den`` (num, den >= 0), or 0
  where not ``valid``."""
  r = jnp.maximum(num, _TINY) / jnp.maximum(den, _TINY)
  r = jnp.minimum(r, 1.0 / r)
  return jnp.where(valid, jax.nn.relu(tol - r) / tol, 0.0)


def _mean_over_layers(relu_bounds: Sequence[Bounds],
                      per_layer: Callable[[Bounds], jax.Array]) -> jax.Array:
  """The mean of ``per_layer`` over the ReLU layers (0 for a network without ReLUs)."""
  if not relu_bounds:
    return jnp.zeros(())
  return jnp.mean(jnp.stack([per_layer(b) for b in relu_bounds]))


def tightness_loss(input_radius: jax.Array, relu_bounds: Sequence[Bounds],
                   tol: float = 0.5) -> jax.Array:
  """Mean over the ReLU layers of ``ReLU(tol - t_0 / t) / tol`` (a scalar).

  Args:
    input_radius: (B, ...) radius of the input box (half its width per coordinate).
    relu_bounds: the interval bounds of every ReLU input, each (B, ...).
    tol: the tolerance tau (Shi et al.: 0.5).
  """
  t0 = jnp.mean(input_radius)

  def layer(b: Bounds) -> jax.Array:
    t = jnp.maximum(jnp.mean((b.upper - b.lower) / 2), _TINY)
    return jax.nn.relu(tol - t0 / t) / tol

  return _mean_over_layers(relu_bounds, layer)


def relu_balance_loss(relu_bounds: Sequence[Bounds], tol: float = 0.5) -> jax.Array:
  """Mean over the ReLU layers of the active/inactive balance penalty (module
  docstring; a scalar). ``relu_bounds`` and ``tol`` as :func:`tightness_loss`'s."""

  def layer(b: Bounds) -> jax.Array:
    c = b.centre
    active, inactive = b.lower > 0, b.upper < 0
    both = jnp.any(active) & jnp.any(inactive)
    dev = jnp.square(c - jnp.mean(c))
    mean_term = _ratio_term(jnp.sum(jnp.where(active, c, 0.0)),
                            -jnp.sum(jnp.where(inactive, c, 0.0)), both, tol)
    var_term = _ratio_term(jnp.sum(jnp.where(active, dev, 0.0)),
                           jnp.sum(jnp.where(inactive, dev, 0.0)), both, tol)
    return mean_term + var_term

  return _mean_over_layers(relu_bounds, layer)


def warmup_intensity(eps: jax.Array, eps_final: float, weight: float) -> jax.Array:
  """``weight * (1 - eps / eps_final)``, clipped to ``[0, weight]`` (0 if eps_final is 0)."""
  if eps_final <= 0:
    return jnp.zeros(())
  return weight * jnp.clip(1.0 - jnp.asarray(eps, jnp.float32) / eps_final, 0.0, 1.0)


def with_warmup_regularizer(loss_fn: Callable, *, weight: float, eps_final: float,
                            tol: float = 0.5, norm: str = "linf",
                            domain: Optional[Tuple[float, float]] = (0.0, 1.0),
                            k: Optional[int] = None) -> Callable:
  """``loss_fn`` plus ``warmup_intensity * (tightness_loss + relu_balance_loss)``.

  Args:
    loss_fn: a method's ``loss(params, apply_fn, x, y, hyper, key) -> (loss, metrics)``.
    weight: lambda_0 (Shi et al.: 0.5); 0 returns ``loss_fn`` unchanged.
    eps_final: the run's final training eps (the decay's end).
    tol: the tolerance tau of both terms.
    norm, domain, k: the input set of the bounds (the method's threat model).

  Returns:
    The regularised loss; its metrics gain ``warmup_reg`` (the weighted sum),
    ``reg_tightness`` and ``reg_relu`` (the unweighted terms) and an updated ``loss``.
    The bound pass runs at every eps, so use it only while eps < eps_final (module
    docstring).
  """
  if weight < 0 or tol <= 0:
    raise ValueError(f"warm-up regulariser needs weight >= 0 and tol > 0; got weight="
                     f"{weight!r}, tol={tol!r}.")
  if not weight:
    return loss_fn

  def regularised(params, apply_fn, x, y, hyper, key):
    value, metrics = loss_fn(params, apply_fn, x, y, hyper, key)
    intensity = warmup_intensity(hyper.eps, eps_final, weight)
    eps = jnp.maximum(hyper.eps, MIN_EPS_SHARE * eps_final)

    _, relus = interval_bounds(apply_fn, params, x, eps, norm, k=k, domain=domain,
                               return_relu_inputs=True)
    lower, upper = make_input_set(x, eps, norm, k, domain).box()
    tight = tightness_loss((upper - lower) / 2, relus, tol)
    balance = relu_balance_loss(relus, tol)
    reg = intensity * (tight + balance)
    metrics = dict(metrics, warmup_reg=reg, reg_tightness=tight, reg_relu=balance)
    value = value + reg
    metrics["loss"] = value
    return value, metrics

  return regularised


def with_zero_warmup_metrics(loss_fn: Callable) -> Callable:
  """``loss_fn`` with the metrics of :func:`with_warmup_regularizer` set to 0: the step
  after the ramp keeps the metric names of the steps before it."""

  def plain(params, apply_fn, x, y, hyper, key):
    value, metrics = loss_fn(params, apply_fn, x, y, hyper, key)
    zero = jnp.zeros(())
    return value, dict(metrics, warmup_reg=zero, reg_tightness=zero, reg_relu=zero)

  return plain
