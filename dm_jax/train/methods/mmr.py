"""Maximum margin regularisation, ``mmr`` (Croce et al. 2019, maximisation of the linear
regions)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from dm_jax.core.input_sets import dual_norm
from dm_jax.bounds.interval import interval_bounds
from dm_jax.train.methods.attacks import flat_norm
from dm_jax.train.methods.base import LossFn, MethodSpec, Options, accuracy, cross_entropy, register


def relu_preactivations(apply_fn: Callable, params: Any, x: jax.Array) -> jax.Array:
  """Every ReLU input at x, flattened and concatenated: (B, U).

  Interval bounds with eps = 0 carry the exact values (lower == upper == value).
  """
  _, relus = interval_bounds(apply_fn, params, x, 0.0, "linf", return_relu_inputs=True)
  if not relus:
    return jnp.zeros((x.shape[0], 0), x.dtype)
  return jnp.concatenate([b.lower.reshape((x.shape[0], -1)) for b in relus], axis=-1)


def _mmr(options: Options) -> LossFn:
  norm = options["norm"]
  units, k_b, k_d = options["mmr_units"], options["mmr_k_b"], options["mmr_k_d"]
  gamma_factor, lam_d = options["mmr_gamma_factor"], options["mmr_lam_d"]
  q = dual_norm(norm) if norm in ("linf", "l2", "l1") else None

  def mmr_loss(params, apply_fn, x, y, hyper, key):
    """CE + lam_B mean_kB hinge(d_B) + lam_D mean_kD hinge(d_D) (see get_method docs)."""
    if q is None:
      raise ValueError("mmr supports norms linf, l2, l1.")
    logits = apply_fn(params, x)
    ce = cross_entropy(logits, y)
    bsz, num_classes = logits.shape
    gamma = gamma_factor * hyper.eps
    on = gamma > 0
    gamma_safe = jnp.where(on, gamma, 1.0)

    def hinge(d):  # max(0, 1 - d / gamma); 0 while gamma = 0 (warm-up)
      return jnp.where(on, jax.nn.relu(1.0 - d / gamma_safe), 0.0)

    # Region boundaries: |z_i(x)| / ||grad_x z_i(x)||_q for sampled ReLU units.
    pre, vjp_pre = jax.vjp(lambda xx: relu_preactivations(apply_fn, params, xx), x)
    n_all = pre.shape[1]
    if n_all > 0:
      n_s = min(units, n_all)
      # n_s distinct units per example, uniformly without replacement.
      idx = lax.top_k(jax.random.uniform(key, (bsz, n_all)), n_s)[1].T  # (S, B)
      cots = jax.nn.one_hot(idx, n_all, dtype=pre.dtype)        # (S, B, U)
      grads = jax.vmap(lambda c: vjp_pre(c)[0])(cots)           # (S, B, ...)
      gnorm = jax.vmap(lambda g: flat_norm(g, q))(grads)        # (S, B)
      vals = jnp.take_along_axis(pre, idx.T, axis=1).T          # (S, B)
      d_b = jnp.abs(vals) / jnp.maximum(gnorm, 1e-12)
      # dead units (zero gradient) are no boundary in the region: infinite distance
      d_b = jnp.where(gnorm > 1e-12, d_b, jnp.inf).T            # (B, S)
      kb = min(k_b, n_s)
      smallest_b = -lax.top_k(-d_b, kb)[0]
      reg_b = jnp.mean(jnp.where(jnp.isfinite(smallest_b), hinge(
          jnp.where(jnp.isfinite(smallest_b), smallest_b, 0.0)), 0.0))
    else:
      reg_b = jnp.zeros(())
      d_b = jnp.full((bsz, 1), jnp.inf)

    # Decision boundaries: (f_y - f_j)(x) / ||grad_x (f_y - f_j)||_q, j != y (signed,
    # so misclassified points are penalised more).
    _, vjp_f = jax.vjp(lambda xx: apply_fn(params, xx), x)
    onehot_y = jax.nn.one_hot(y, num_classes, dtype=logits.dtype)
    cots = onehot_y[None] - jnp.eye(num_classes, dtype=logits.dtype)[:, None, :]  # (K,B,K)
    grads = jax.vmap(lambda c: vjp_f(c)[0])(cots)
    gnorm = jax.vmap(lambda g: flat_norm(g, q))(grads).T        # (B, K)
    diff = jnp.take_along_axis(logits, y[:, None], axis=-1) - logits
    d_d = diff / jnp.maximum(gnorm, 1e-12)
    # j = y, or a margin constant in the region (zero gradient): no boundary to reach.
    d_d = jnp.where((onehot_y > 0) | (gnorm <= 1e-12), jnp.inf, d_d)
    kd = num_classes - 1 if k_d is None else min(k_d, num_classes - 1)
    smallest_d = -lax.top_k(-d_d, kd)[0]
    reg_d = jnp.mean(hinge(smallest_d))

    reg = reg_b + lam_d * reg_d
    metrics = dict(ce_clean=ce, robust_loss=reg, acc=accuracy(logits, y), mmr_b=reg_b,
                   mmr_d=reg_d, min_dist_boundary=jnp.mean(jnp.min(d_b, axis=-1)),
                   min_dist_decision=jnp.mean(jnp.min(d_d, axis=-1)))
    return ce + hyper.lam * reg, metrics

  return mmr_loss


register(MethodSpec(
    "mmr", build=_mmr,
    options=("mmr_units", "mmr_k_b", "mmr_k_d", "mmr_gamma_factor", "mmr_lam_d"),
    describe=lambda o: ("MMR (Croce et al. 2019, maximization of linear regions): CE + lam "
                        "[mean_{k_B smallest} max(0, 1 - d_B/gamma) + lam_D/lam_B mean_{k_D "
                        "smallest} max(0, 1 - d_D/gamma)], d_B = |z_i|/||grad z_i||_q over "
                        f"{o['mmr_units']} sampled ReLU units, d_D = (f_y - f_j)/||grad(f_y "
                        f"- f_j)||_q, gamma = {o['mmr_gamma_factor']:g} eps.")))
