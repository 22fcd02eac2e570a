"""ReLU-stability training, ``relu_stability`` (Xiao et al. 2019): "RS", "Adv+RS",
"L1+RS+Pruning" with the options ``adv``, ``l1`` and ``prune``."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from dm_jax.bounds.interval import Bounds, interval_bounds
from dm_jax.train.methods.adversarial import PGD_OPTIONS, pgd_settings
from dm_jax.train.methods.attacks import check_attack_norm, pgd_attack
from dm_jax.train.methods.base import (LossFn, MethodSpec, Options, accuracy, cross_entropy,
                                       interval_margins, margin_certified, register)


def relu_stability_penalty(relu_bounds: Sequence[Bounds]) -> jax.Array:
  """RS = mean over the batch of -sum_i tanh(1 + u_i * l_i) over every ReLU input.

  Args:
    relu_bounds: the interval bounds of every ReLU input, each (B, ...).

  Returns:
    A scalar.
  """
  total = 0.0
  for b in relu_bounds:
    t = -jnp.tanh(1.0 + b.upper * b.lower)
    total = total + jnp.sum(t.reshape((t.shape[0], -1)), axis=-1)
  return jnp.mean(total) if relu_bounds else jnp.zeros(())


def _relu_stability(options: Options) -> LossFn:
  norm, domain, k, adv = options["norm"], options["domain"], options["k"], options["adv"]
  pgd = pgd_settings(options)

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
    rs = relu_stability_penalty(relus)
    n_units = sum(b.lower[0].size for b in relus)
    unstable = sum(jnp.sum((b.lower < 0) & (b.upper > 0)) for b in relus) if relus else 0
    metrics.update(robust_loss=base, rs=rs,
                   unstable_share=unstable / max(n_units * x.shape[0], 1),
                   ibp_cert_acc=margin_certified(interval_margins(out.lower, out.upper, y),
                                                 y))
    return base + hyper.lam * rs, metrics

  return rs_loss


def _check_norm(options: Options) -> None:
  if options["adv"]:
    check_attack_norm(options["norm"])


register(MethodSpec(
    "relu_stability", build=_relu_stability, options=("adv",) + PGD_OPTIONS,
    validate=_check_norm,
    describe=lambda o: ("ReLU stability (Xiao et al. 2019): "
                        + ("CE(f(x_pgd))" if o["adv"] else "CE(f(x))")
                        + " + lam * mean_batch[-sum_i tanh(1 + u_i l_i)], IBP bounds of "
                        "every ReLU input" + (" + l1" if o["l1"] else "")
                        + (" + magnitude pruning" if o["prune"] else "") + ".")))
