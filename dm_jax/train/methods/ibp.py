"""Interval bound propagation training, ``ibp`` (Gowal et al. 2018)."""
from __future__ import annotations

from dm_jax.bounds.interval import interval_bounds
from dm_jax.train.methods.base import (LAM_FORMS, LossFn, MethodSpec, Options, accuracy,
                                       cross_entropy, interval_margins, margin_certified,
                                       margin_lower_bounds, register, worst_case_logits)


def _ibp(options: Options) -> LossFn:
  norm, domain, k = options["norm"], options["domain"], options["k"]
  folded = options["ibp_margin"]

  def ibp_loss(params, apply_fn, x, y, hyper, key):
    """kappa CE(f(x)) + (1 - kappa) CE(z_hat), z_hat the IBP worst-case logits."""
    del key
    logits = apply_fn(params, x)
    ce = cross_entropy(logits, y)
    if folded:
      lb = margin_lower_bounds(apply_fn, params, x, y, hyper.eps, norm, "ibp", domain, k)
      robust = cross_entropy(-lb, y)
      cert = margin_certified(lb, y)
    else:
      b = interval_bounds(apply_fn, params, x, hyper.eps, norm, k=k, domain=domain)
      robust = cross_entropy(worst_case_logits(b.lower, b.upper, y), y)
      cert = margin_certified(interval_margins(b.lower, b.upper, y), y)
    loss = hyper.kappa * ce + (1 - hyper.kappa) * robust
    metrics = dict(ce_clean=ce, robust_loss=robust, acc=accuracy(logits, y),
                   ibp_cert_acc=cert)
    return loss, metrics

  return ibp_loss


register(MethodSpec(
    "ibp", build=_ibp, options=("ibp_margin",), kappa_lam_forms=LAM_FORMS,
    describe=lambda o: ("IBP (Gowal et al. 2018): kappa CE(f(x)) + (1 - kappa) CE(z_hat), "
                        "z_hat_y = lower bound, z_hat_j = upper bound (interval bounds on "
                        "the ball intersected with the domain)"
                        + (", margins with the last layer folded in"
                           if o["ibp_margin"] else "") + ".")))
