"""Training methods (losses and regularizers) of the DoubleMargin paper and its baselines.

Every method is a pure, jit-able loss

    loss(params, apply_fn, x, y, hyper, key) -> (scalar_loss, metrics)

where ``apply_fn(params, x) -> logits`` is the (static) model function, ``x`` a (B, ...)
batch in [0, 1], ``y`` (B,) integer labels, ``hyper`` a :class:`Hyper` of per-step
scalars (training radius ``eps``, regularizer weight ``lam``, clean-loss weight
``kappa``; traced under jit and produced by the schedules of ``dm_jax.train``) and
``key`` a PRNG key (the only source of randomness). ``metrics`` is a dict of scalars with
at least ``ce_clean``, ``robust_loss`` and ``acc``.

Methods (``get_method(name, ...)``, see SPEC.md "Double Margin" and "Baselines"):

=================  =========================================================================
normal             CE(f(x), y)
l1                 CE + l1 * sum_layers ||W||_{op,inf}  (max row l1 norm; default 2e-5)
l2                 CE + l2 * sum_layers ||W||_F^2       (default 1e-4, a choice)
adv                CE(f(x_pgd), y)                       Madry et al. 2018
trades             CE(f(x), y) + beta KL(p(x) || p(x'))  Zhang et al. 2019
ibp                kappa CE(f(x)) + (1 - kappa) CE(z_hat) Gowal et al. 2018
crown_ibp          kappa CE(f(x)) + (1 - kappa) CE(-lb)   Zhang et al. 2020
relu_stability     CE + lam RS (+ l1, + pruning, + PGD)   Xiao et al. 2019
bounded            kappa CE(f(x)) + (1 - kappa) CE(-lb_fastlin)  Wong & Kolter 2018
mmr                CE + lam (hinge on region / decision boundary distances)  Croce et al. 2019
dm, dm_s_only,     (1 - lam) CE(z) + lam CE_split(z + s + v, z - s - v)       DoubleMargin
dm_ibp_v           (Algorithm 1; ``lam_form="kappa"``: kappa CE(z) + (1 - kappa) CE_split)
=================  =========================================================================

The ``l1=`` / ``l2=`` options add the weight penalties to ANY method ("DM + L1",
"L1+RS+Pruning"). Weight matrices are the pytree leaves named ``kernel``.

The linear-bound methods (``crown_ibp``, ``bounded`` and ``ibp`` with ``ibp_margin=True``)
use :func:`dm_jax.linear.margin_lower_bounds`, imported lazily when the loss is traced.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from dm_jax.double_margin import double_margin, split_cross_entropy
from dm_jax.input_sets import canonical_norm, dual_norm
from dm_jax.interval import interval_bounds
from dm_jax.methods.attacks import (check_attack_norm, flat_norm, pgd_attack, softmax_kl,
                                    trades_attack)
from dm_jax.methods.penalties import add_penalties

METHODS = ("normal", "l1", "l2", "adv", "trades", "ibp", "crown_ibp", "relu_stability",
           "bounded", "mmr", "dm", "dm_s_only", "dm_ibp_v")

DEFAULT_L1 = 2e-5   # SPEC.md (SingleProp): 2e-5 * sum_i ||W_i||_{op,inf}
DEFAULT_L2 = 1e-4   # (choice) the paper gives none



# ----------------------------------------------------------------------------- types

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Hyper:
  """Per-step scalars, traced under jit (a pytree of three leaves).

  Attributes:
    eps: current training radius (in the [0, 1] input scale).
    lam: current regularizer weight lambda (DM: final 2 for "Double Margin", 1 for
      "Double Margin *"; RS / MMR: the penalty weight; crown_ibp with
      ``crown_ibp_beta="lam"``: Zhang's beta).
    kappa: current clean-loss weight kappa of the IBP-style mixing
      ``kappa CE(clean) + (1 - kappa) CE(robust)`` (SingleProp: 1 -> 0.5).
  """
  eps: jax.Array
  lam: jax.Array
  kappa: jax.Array

  @classmethod
  def create(cls, eps=0.0, lam=0.0, kappa=1.0) -> "Hyper":
    f = lambda t: jnp.asarray(t, dtype=jnp.float32)
    return cls(eps=f(eps), lam=f(lam), kappa=f(kappa))


class Method(NamedTuple):
  """A training method.

  Attributes:
    name: one of :data:`METHODS`.
    loss: ``loss(params, apply_fn, x, y, hyper, key) -> (scalar, metrics dict)``.
    description: the formula and the paper it comes from.
    needs_ensemble: whether the model must be an ensemble (no method requires one;
      DM works on ensembles as is because their bounds average z, s, v).
    prune: whether the trainer should apply :func:`prune_small_weights` (and then
      :func:`apply_masks` after every update) -- Xiao et al.'s magnitude pruning.
    options: the resolved options (for logging beside results).
  """
  name: str
  loss: Callable
  description: str
  needs_ensemble: bool = False
  prune: bool = False
  options: Optional[Dict[str, Any]] = None


# ----------------------------------------------------------------------------- helpers

def cross_entropy(logits, labels) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits, labels) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def worst_case_logits(lower, upper, labels) -> jax.Array:
  """Gowal et al.'s z_hat: lower bound for the true class, upper bound for the others."""
  onehot = jax.nn.one_hot(labels, lower.shape[-1], dtype=bool)
  return jnp.where(onehot, lower, upper)


def margin_certified(lb, labels) -> jax.Array:
  """Share of examples whose margin lower bounds are > 0 for all j != y."""
  onehot = jax.nn.one_hot(labels, lb.shape[-1], dtype=bool)
  return jnp.mean(jnp.all(jnp.where(onehot, True, lb > 0), axis=-1).astype(jnp.float32))



def _margin_lower_bounds(apply_fn, params, x, y, eps, norm, method, domain, k, **kw):
  from dm_jax import linear  # pylint: disable=import-outside-toplevel
  return linear.margin_lower_bounds(apply_fn, params, x, y, eps, norm, method=method,
                                    domain=domain, k=k, **kw)


def _relu_stability(relu_bounds) -> jax.Array:
  """RS = mean over the batch of -sum_i tanh(1 + u_i * l_i) over every ReLU input."""
  total = 0.0
  for b in relu_bounds:
    t = -jnp.tanh(1.0 + b.upper * b.lower)
    total = total + jnp.sum(t.reshape((t.shape[0], -1)), axis=-1)
  return jnp.mean(total) if relu_bounds else jnp.zeros(())


def _relu_preactivations(apply_fn, params, x):
  """Every ReLU input at x, flattened and concatenated: (B, U).

  Interval bounds with eps = 0 carry the exact values (lower == upper == value).
  """
  _, relus = interval_bounds(apply_fn, params, x, 0.0, "linf", return_relu_inputs=True)
  if not relus:
    return jnp.zeros((x.shape[0], 0), x.dtype)
  return jnp.concatenate([b.lower.reshape((x.shape[0], -1)) for b in relus], axis=-1)


# ----------------------------------------------------------------------------- losses

def get_method(name: str, *, norm="linf", l1: float = 0.0, l2: float = 0.0,
               prune: bool = False, adv: bool = False, pgd_steps: int = 40,
               pgd_step_size: float = 0.01, pgd_random_start: bool = True,
               trades_beta: float = 6.0, lam_form: str = "paper",
               domain: Optional[Tuple[float, float]] = (0.0, 1.0),
               k: Optional[int] = None, ibp_margin: bool = False,
               crown_ibp_beta: Union[float, str] = 1.0, dm_domain: bool = False,
               mmr_units: int = 128, mmr_k_b: int = 64, mmr_k_d: Optional[int] = None,
               mmr_gamma_factor: float = 1.5, mmr_lam_d: float = 1.0,
               bounded_projections: int = 0) -> Method:
  """Builds a training :class:`Method` by name.

  Args:
    name: one of :data:`METHODS`.
    norm: threat model of the bounds and attacks ("linf", "l2", "l1", "l0"; PGD-based
      parts support "linf" and "l2").
    l1: weight of the l1 (max row l1 norm) penalty added to any method. For
      ``name="l1"`` a value of 0 means the default 2e-5.
    l2: weight of the squared-kernel penalty added to any method; for ``name="l2"``, 0
      means the default 1e-4.
    prune: marks the method for magnitude pruning by the trainer (Method.prune); see
      :func:`prune_small_weights` / :func:`apply_masks`.
    adv: relu_stability only: replace the clean CE by the PGD CE ("Adv+RS").
    pgd_steps, pgd_step_size, pgd_random_start: PGD for adv, trades, relu_stability+adv.
    trades_beta: TRADES' beta.
    lam_form: dm only: "paper" ((1 - lam) CE + lam CE_split, Algorithm 1, weight
      ``hyper.lam``) or "kappa" (kappa CE + (1 - kappa) CE_split, SingleProp form,
      weight ``hyper.kappa``).
    domain: the data box (lo, hi) or None. Clips PGD, and intersects the input set of
      the sound bounds (ibp, crown_ibp, bounded, relu_stability) -- tighter and sound
      for images. Double Margin uses the plain ball as in the paper unless
      ``dm_domain=True``.
    k: changed coordinates for norm "l0".
    ibp_margin: ibp only: use the tighter margins with the last layer folded in
      (``margin_lower_bounds(method="ibp")``) instead of Gowal's z_hat.
    crown_ibp_beta: crown_ibp only: Zhang et al.'s mix
      ``lb = beta lb_crown_ibp + (1 - beta) lb_ibp``. A float (1 = pure CROWN-IBP, the
      default) or the string "lam" to use ``hyper.lam`` as beta (so the trainer can
      ramp it from 1 to 0 as Zhang et al. do).
    dm_domain: dm*: intersect the DM start interval with ``domain``.
    mmr_units: mmr: number of distinct ReLU units sampled per example (uniformly
      without replacement, fresh each step) whose region-boundary distance
      |z_i| / ||grad_x z_i||_q is computed; each costs one backward pass (memory about
      B x units x #activations floats), so this bounds memory/time. Croce et al. use
      all units; the k_B smallest are then taken among the sampled ones (choice).
    mmr_k_b: mmr: the k_B smallest boundary distances penalised (min(k_B, units)).
    mmr_k_d: mmr: the k_D smallest decision distances (default K - 1: all).
    mmr_gamma_factor: mmr: gamma_B = gamma_D = factor * hyper.eps (choice).
    mmr_lam_d: mmr: lambda_D / lambda_B (lambda_B = hyper.lam).
    bounded_projections: bounded only: 0 (default) computes the Fast-Lin intermediate
      bounds exactly (one backward pass per neuron); k > 0 estimates them with k random
      Cauchy projections (Wong et al. 2018; the paper's baseline uses 50): k + 1
      forward passes, l-inf and ReLU networks only. The final margin bounds are then
      computed exactly from the estimated intermediate bounds.

  Raises:
    ValueError: unknown name or option.
  """
  if name not in METHODS:
    raise ValueError(f"Unknown method {name!r}; expected one of {', '.join(METHODS)}.")
  norm = canonical_norm(norm)
  if lam_form not in ("paper", "kappa"):
    raise ValueError(f"lam_form must be 'paper' or 'kappa'; got {lam_form!r}.")
  if not (isinstance(crown_ibp_beta, str) and crown_ibp_beta == "lam"
          or isinstance(crown_ibp_beta, (int, float))):
    raise ValueError(f"crown_ibp_beta must be a float or 'lam'; got {crown_ibp_beta!r}.")
  if domain is not None:
    domain = (float(domain[0]), float(domain[1]))
  if isinstance(bounded_projections, bool) or int(bounded_projections) != bounded_projections \
      or bounded_projections < 0:
    raise ValueError(f"bounded_projections must be an integer >= 0; got "
                     f"{bounded_projections!r}.")
  bounded_projections = int(bounded_projections)
  if bounded_projections and norm != "linf":
    raise ValueError("bounded_projections estimates l1 norms (the dual of l-inf): it needs "
                     f"norm='linf', got {norm!r}.")
  if name in ("adv", "trades") or (name == "relu_stability" and adv):
    check_attack_norm(norm)
  if name == "l1" and not l1:
    l1 = DEFAULT_L1
  if name == "l2" and not l2:
    l2 = DEFAULT_L2
  l1, l2 = float(l1), float(l2)
  options = dict(norm=norm, l1=l1, l2=l2, prune=prune, adv=adv, pgd_steps=pgd_steps,
                 pgd_step_size=pgd_step_size, pgd_random_start=pgd_random_start,
                 trades_beta=trades_beta, lam_form=lam_form, domain=domain, k=k,
                 ibp_margin=ibp_margin, crown_ibp_beta=crown_ibp_beta, dm_domain=dm_domain,
                 mmr_units=mmr_units, mmr_k_b=mmr_k_b, mmr_k_d=mmr_k_d,
                 mmr_gamma_factor=mmr_gamma_factor, mmr_lam_d=mmr_lam_d,
                 bounded_projections=bounded_projections)
  pgd = dict(steps=pgd_steps, step_size=pgd_step_size, norm=norm, domain=domain,
             random_start=pgd_random_start)

  # -- plain and weight-penalised training
  def normal_loss(params, apply_fn, x, y, hyper, key):
    """CE(f(x), y) (+ l1 / l2 weight penalties)."""
    del hyper, key
    logits = apply_fn(params, x)
    ce = cross_entropy(logits, y)
    return add_penalties(ce, dict(ce_clean=ce, robust_loss=ce, acc=accuracy(logits, y)),
                   params, l1, l2)

  # -- Madry et al. 2018
  def adv_loss(params, apply_fn, x, y, hyper, key):
    """CE(f(x_adv), y), x_adv = PGD with random start on the eps ball, in the domain."""
    x_adv = pgd_attack(apply_fn, params, x, y, hyper.eps, key, **pgd)
    logits = apply_fn(params, x)
    logits_adv = apply_fn(params, x_adv)
    ce_adv = cross_entropy(logits_adv, y)
    metrics = dict(ce_clean=lax.stop_gradient(cross_entropy(logits, y)), robust_loss=ce_adv,
                   acc=accuracy(logits, y), adv_acc=accuracy(logits_adv, y))
    return add_penalties(ce_adv, metrics, params, l1, l2)

  # -- Zhang et al. 2019
  def trades_loss(params, apply_fn, x, y, hyper, key):
    """CE(f(x), y) + beta mean KL(softmax f(x) || softmax f(x')), x' = PGD on the KL."""
    x_adv = trades_attack(apply_fn, params, x, hyper.eps, key, pgd_steps, pgd_step_size,
                          norm, domain)
    logits = apply_fn(params, x)
    logits_adv = apply_fn(params, x_adv)
    ce = cross_entropy(logits, y)
    kl = jnp.mean(softmax_kl(logits, logits_adv))
    metrics = dict(ce_clean=ce, robust_loss=kl, kl=kl, acc=accuracy(logits, y),
                   adv_acc=accuracy(logits_adv, y))
    return add_penalties(ce + trades_beta * kl, metrics, params, l1, l2)

  # -- Gowal et al. 2018
  def ibp_loss(params, apply_fn, x, y, hyper, key):
    """kappa CE(f(x)) + (1 - kappa) CE(z_hat), z_hat the IBP worst-case logits."""
    del key
    logits = apply_fn(params, x)
    ce = cross_entropy(logits, y)
    if ibp_margin:
      lb = _margin_lower_bounds(apply_fn, params, x, y, hyper.eps, norm, "ibp", domain, k)
      robust = cross_entropy(-lb, y)
      cert = margin_certified(lb, y)
    else:
      b = interval_bounds(apply_fn, params, x, hyper.eps, norm, k=k, domain=domain)
      zhat = worst_case_logits(b.lower, b.upper, y)
      robust = cross_entropy(zhat, y)
      cert = margin_certified(
          jnp.take_along_axis(b.lower, y[:, None], axis=-1) - b.upper, y)
    loss = hyper.kappa * ce + (1 - hyper.kappa) * robust
    metrics = dict(ce_clean=ce, robust_loss=robust, acc=accuracy(logits, y),
                   ibp_cert_acc=cert)
    return add_penalties(loss, metrics, params, l1, l2)

  # -- linear bounds: CROWN-IBP (Zhang et al. 2020) and Fast-Lin / convex outer bound
  def linear_loss(lin_method):
    projected = lin_method == "fastlin" and bounded_projections > 0
    extra = (dict(intermediate="projections", num_projections=bounded_projections)
             if projected else {})

    def loss_fn(params, apply_fn, x, y, hyper, key):
      logits = apply_fn(params, x)
      ce = cross_entropy(logits, y)
      # Under grad, blocking the batch (linear.default_batch_block) made the CROWN-IBP
      # step no faster (measured, docs/benchmarks.md); Fast-Lin's step it makes 2.5x faster.
      block = dict(batch_block=0) if lin_method == "crown_ibp" else {}
      lb = _margin_lower_bounds(apply_fn, params, x, y, hyper.eps, norm, lin_method,
                                domain, k, **(dict(extra, key=key) if projected else {}),
                                **block)
      metrics = {}
      if lin_method == "crown_ibp" and crown_ibp_beta != 1.0:
        beta = hyper.lam if crown_ibp_beta == "lam" else crown_ibp_beta
        lb_ibp = _margin_lower_bounds(apply_fn, params, x, y, hyper.eps, norm, "ibp",
                                      domain, k)
        metrics["ibp_cert_acc"] = margin_certified(lb_ibp, y)
        metrics["crown_ibp_cert_acc"] = margin_certified(lb, y)
        lb = beta * lb + (1 - beta) * lb_ibp
      robust = cross_entropy(-lb, y)
      loss = hyper.kappa * ce + (1 - hyper.kappa) * robust
      metrics.update(ce_clean=ce, robust_loss=robust, acc=accuracy(logits, y))
      # With projections lb is an estimate: not a certificate, so named apart.
      metrics["estimated_cert_acc" if projected else "cert_acc"] = margin_certified(lb, y)
      return add_penalties(loss, metrics, params, l1, l2)
    return loss_fn

  # -- Xiao et al. 2019
  def rs_loss(params, apply_fn, x, y, hyper, key):
    """CE (or PGD CE) + lam RS, RS = mean_batch -sum tanh(1 + u l) over ReLU inputs."""
    logits = apply_fn(params, x)
    ce = cross_entropy(logits, y)
    metrics = dict(ce_clean=ce, acc=accuracy(logits, y))
    if adv:
      x_adv = pgd_attack(apply_fn, params, x, y, hyper.eps, key, **pgd)
      logits_adv = apply_fn(params, x_adv)
      base = cross_entropy(logits_adv, y)
      metrics["adv_acc"] = accuracy(logits_adv, y)
      metrics["ce_clean"] = lax.stop_gradient(ce)
    else:
      base = ce
    out, relus = interval_bounds(apply_fn, params, x, hyper.eps, norm, k=k, domain=domain,
                                 return_relu_inputs=True)
    rs = _relu_stability(relus)
    n_units = sum(b.lower[0].size for b in relus)
    unstable = sum(jnp.sum((b.lower < 0) & (b.upper > 0)) for b in relus) if relus else 0
    metrics.update(robust_loss=base, rs=rs,
                   unstable_share=unstable / max(n_units * x.shape[0], 1),
                   ibp_cert_acc=margin_certified(
                       jnp.take_along_axis(out.lower, y[:, None], axis=-1) - out.upper, y))
    return add_penalties(base + hyper.lam * rs, metrics, params, l1, l2)

  # -- Croce et al. 2019 (MMR)
  q = dual_norm(norm) if norm in ("linf", "l2", "l1") else None

  def mmr_loss(params, apply_fn, x, y, hyper, key):
    """CE + lam_B mean_kB hinge(d_B) + lam_D mean_kD hinge(d_D) (see get_method docs)."""
    if q is None:
      raise ValueError("mmr supports norms linf, l2, l1.")
    logits = apply_fn(params, x)
    ce = cross_entropy(logits, y)
    bsz, num_classes = logits.shape
    gamma = mmr_gamma_factor * hyper.eps
    on = gamma > 0
    gamma_safe = jnp.where(on, gamma, 1.0)

    def hinge(d):  # max(0, 1 - d / gamma); 0 while gamma = 0 (warm-up)
      return jnp.where(on, jax.nn.relu(1.0 - d / gamma_safe), 0.0)

    # Region boundaries: |z_i(x)| / ||grad_x z_i(x)||_q for sampled ReLU units.
    pre, vjp_pre = jax.vjp(lambda xx: _relu_preactivations(apply_fn, params, xx), x)
    n_all = pre.shape[1]
    if n_all > 0:
      n_s = min(mmr_units, n_all)
      # n_s distinct units per example, uniformly without replacement.
      idx = lax.top_k(jax.random.uniform(key, (bsz, n_all)), n_s)[1].T  # (S, B)
      cots = jax.nn.one_hot(idx, n_all, dtype=pre.dtype)        # (S, B, U)
      grads = jax.vmap(lambda c: vjp_pre(c)[0])(cots)           # (S, B, ...)
      gnorm = jax.vmap(lambda g: flat_norm(g, q))(grads)       # (S, B)
      vals = jnp.take_along_axis(pre, idx.T, axis=1).T          # (S, B)
      d_b = jnp.abs(vals) / jnp.maximum(gnorm, 1e-12)
      # dead units (zero gradient) are no boundary in the region: infinite distance
      d_b = jnp.where(gnorm > 1e-12, d_b, jnp.inf).T            # (B, S)
      kb = min(mmr_k_b, n_s)
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
    gnorm = jax.vmap(lambda g: flat_norm(g, q))(grads).T       # (B, K)
    diff = jnp.take_along_axis(logits, y[:, None], axis=-1) - logits
    d_d = diff / jnp.maximum(gnorm, 1e-12)
    # j = y, or a margin constant in the region (zero gradient): no boundary to reach.
    d_d = jnp.where((onehot_y > 0) | (gnorm <= 1e-12), jnp.inf, d_d)
    kd = num_classes - 1 if mmr_k_d is None else min(mmr_k_d, num_classes - 1)
    smallest_d = -lax.top_k(-d_d, kd)[0]
    reg_d = jnp.mean(hinge(smallest_d))

    reg = reg_b + mmr_lam_d * reg_d
    metrics = dict(ce_clean=ce, robust_loss=reg, acc=accuracy(logits, y), mmr_b=reg_b,
                   mmr_d=reg_d, min_dist_boundary=jnp.mean(jnp.min(d_b, axis=-1)),
                   min_dist_decision=jnp.mean(jnp.min(d_d, axis=-1)))
    return add_penalties(ce + hyper.lam * reg, metrics, params, l1, l2)

  # -- Double Margin
  variant = {"dm": "dm", "dm_s_only": "s_only", "dm_ibp_v": "ibp_v"}.get(name)

  def dm_loss(params, apply_fn, x, y, hyper, key):
    """(1 - lam) CE(z) + lam CE_split(z + s + v, z - s - v)  [= CE + lam R, eq. 9]."""
    del key
    m = double_margin(apply_fn, params, x, hyper.eps, norm, variant=variant, k=k,
                      domain=domain if dm_domain else None)
    ce = cross_entropy(m.z, y)
    robust = jnp.mean(split_cross_entropy(m.upper, m.lower, y))
    if lam_form == "paper":
      loss = (1 - hyper.lam) * ce + hyper.lam * robust
    else:
      loss = hyper.kappa * ce + (1 - hyper.kappa) * robust
    metrics = dict(ce_clean=ce, robust_loss=robust, dm_reg=robust - ce,
                   acc=accuracy(m.z, y),
                   dm_cert_acc=margin_certified(
                       jnp.take_along_axis(m.lower, y[:, None], axis=-1) - m.upper, y),
                   mean_s=jnp.mean(m.s), mean_v=jnp.mean(m.v))
    return add_penalties(loss, metrics, params, l1, l2)

  table = {
      "normal": (normal_loss, "Normal training: CE(f(x), y)."),
      "l1": (normal_loss, f"CE + {l1:g} * sum_layers ||W||_(op,inf) (max row l1 norm); "
             "l1 weight regularisation (SingleProp default 2e-5)."),
      "l2": (normal_loss, f"CE + {l2:g} * sum_layers ||W||_F^2; l2 weight regularisation."),
      "adv": (adv_loss, "Adversarial training (Madry et al. 2018): CE(f(x_pgd), y), PGD "
              f"{pgd_steps} steps of {pgd_step_size:g}, random start, on the {norm} ball "
              "and the domain."),
      "trades": (trades_loss, f"TRADES (Zhang et al. 2019): CE(f(x), y) + {trades_beta:g} "
                 "KL(softmax f(x) || softmax f(x')), x' = PGD on the KL from "
                 "x + 0.001 N(0, 1)."),
      "ibp": (ibp_loss, "IBP (Gowal et al. 2018): kappa CE(f(x)) + (1 - kappa) CE(z_hat), "
              "z_hat_y = lower bound, z_hat_j = upper bound (interval bounds on the ball "
              "intersected with the domain)" + (", margins with the last layer folded in"
                                                if ibp_margin else "") + "."),
      "crown_ibp": (linear_loss("crown_ibp"),
                    "CROWN-IBP (Zhang et al. 2020): kappa CE(f(x)) + (1 - kappa) CE(-lb), "
                    "lb the CROWN-IBP margin lower bounds (IBP intermediate bounds, one "
                    "CROWN backward pass); beta-mix with IBP margins: beta="
                    f"{crown_ibp_beta}."),
      "relu_stability": (rs_loss, "ReLU stability (Xiao et al. 2019): "
                         + ("CE(f(x_pgd))" if adv else "CE(f(x))")
                         + " + lam * mean_batch[-sum_i tanh(1 + u_i l_i)], IBP bounds of "
                         "every ReLU input" + (" + l1" if l1 else "")
                         + (" + magnitude pruning" if prune else "") + "."),
      "bounded": (linear_loss("fastlin"),
                  "Convex outer bound training (Wong & Kolter 2018): kappa CE(f(x)) + "
                  "(1 - kappa) CE(-lb), lb the Fast-Lin (dual network) margin lower "
                  "bounds, " + (f"intermediate bounds estimated with {bounded_projections} "
                                "random Cauchy projections (Wong et al. 2018)"
                                if bounded_projections else
                                "exact intermediate bounds (no random projections)")
                  + "."),
      "mmr": (mmr_loss, "MMR (Croce et al. 2019, maximization of linear regions): CE + lam "
              "[mean_{k_B smallest} max(0, 1 - d_B/gamma) + lam_D/lam_B mean_{k_D "
              "smallest} max(0, 1 - d_D/gamma)], d_B = |z_i|/||grad z_i||_q over "
              f"{mmr_units} sampled ReLU units, d_D = (f_y - f_j)/||grad(f_y - f_j)||_q, "
              f"gamma = {mmr_gamma_factor:g} eps."),
  }
  dm_form = ("(1 - lam) CE(z) + lam CE_split(upper, lower)  [= CE + lam R]"
             if lam_form == "paper" else
             "kappa CE(z) + (1 - kappa) CE_split(upper, lower)  [SingleProp form]")
  for n, what in (("dm", "Double Margin (Algorithm 1): z +/- (s + v)"),
                  ("dm_s_only", "Double Margin Variation 1 (s only): z +/- s"),
                  ("dm_ibp_v", "Double Margin Variation 2 (IBP + v): [l - v, u + v]")):
    table[n] = (dm_loss, f"{what}; loss {dm_form}; CE_split(u, l) = logsumexp(u) - l_y "
                "(eq. 9, DoubleMargin ICLR 2020 submission).")
  loss_fn, description = table[name]
  if name in ("crown_ibp", "bounded"):
    loss_fn.__doc__ = description
  if l1 and name != "l1":
    description += f" Plus {l1:g} * l1 penalty."
  if l2 and name != "l2":
    description += f" Plus {l2:g} * l2 penalty."
  return Method(name=name, loss=loss_fn, description=description, needs_ensemble=False,
                prune=bool(prune), options=options)
