"""Training on linear margin bounds: ``crown_ibp`` (Zhang et al. 2020) and ``bounded``
(Fast-Lin / the convex outer bound of Wong & Kolter 2018)."""
from __future__ import annotations

from typing import Any, Dict

from dm_jax.train.methods.base import (LAM_FORMS, LossFn, MethodSpec, Options, accuracy,
                                       cross_entropy, margin_certified, margin_lower_bounds,
                                       register)


def _linear_loss(lin_method: str, options: Options) -> LossFn:
  """kappa CE(f(x)) + (1 - kappa) CE(-lb), lb the ``lin_method`` margin lower bounds."""
  norm, domain, k = options["norm"], options["domain"], options["k"]
  beta_option = options.get("crown_ibp_beta", 1.0)
  projections = options.get("bounded_projections", 0)
  extra = (dict(intermediate="projections", num_projections=projections)
           if projections else {})
  # Under grad, blocking the batch (linear.default_batch_block) made the CROWN-IBP step
  # no faster (measured, docs/benchmarks.md); Fast-Lin's step it makes 2.5x faster.
  block = dict(batch_block=0) if lin_method == "crown_ibp" else {}

  def loss_fn(params, apply_fn, x, y, hyper, key):
    logits = apply_fn(params, x)
    ce = cross_entropy(logits, y)
    lb = margin_lower_bounds(apply_fn, params, x, y, hyper.eps, norm, lin_method, domain,
                             k, **(dict(extra, key=key) if projections else {}), **block)
    metrics = {}
    if beta_option != 1.0:
      beta = hyper.lam if beta_option == "lam" else beta_option
      lb_ibp = margin_lower_bounds(apply_fn, params, x, y, hyper.eps, norm, "ibp", domain, k)
      metrics["ibp_cert_acc"] = margin_certified(lb_ibp, y)
      metrics["crown_ibp_cert_acc"] = margin_certified(lb, y)
      lb = beta * lb + (1 - beta) * lb_ibp
    robust = cross_entropy(-lb, y)
    loss = hyper.kappa * ce + (1 - hyper.kappa) * robust
    metrics.update(ce_clean=ce, robust_loss=robust, acc=accuracy(logits, y))
    # With projections lb is an estimate: not a certificate, so named apart.
    metrics["estimated_cert_acc" if projections else "cert_acc"] = margin_certified(lb, y)
    return loss, metrics

  return loss_fn


def _check_beta(options: Options) -> None:
  beta = options["crown_ibp_beta"]
  if not (isinstance(beta, str) and beta == "lam" or isinstance(beta, (int, float))):
    raise ValueError(f"crown_ibp_beta must be a float or 'lam'; got {beta!r}.")


def _check_projections(options: Options) -> Dict[str, Any]:
  count = options["bounded_projections"]
  if isinstance(count, bool) or int(count) != count or count < 0:
    raise ValueError(f"bounded_projections must be an integer >= 0; got {count!r}.")
  if count and options["norm"] != "linf":
    raise ValueError("bounded_projections estimates l1 norms (the dual of l-inf): it needs "
                     f"norm='linf', got {options['norm']!r}.")
  return {"bounded_projections": int(count)}


def _describe_bounded(options: Options) -> str:
  count = options["bounded_projections"]
  return ("Convex outer bound training (Wong & Kolter 2018): kappa CE(f(x)) + "
          "(1 - kappa) CE(-lb), lb the Fast-Lin (dual network) margin lower bounds, "
          + (f"intermediate bounds estimated with {count} random Cauchy projections "
             "(Wong et al. 2018)" if count else
             "exact intermediate bounds (no random projections)") + ".")


register(MethodSpec(
    "crown_ibp", build=lambda o: _linear_loss("crown_ibp", o), options=("crown_ibp_beta",),
    validate=_check_beta, kappa_lam_forms=LAM_FORMS,
    describe=lambda o: ("CROWN-IBP (Zhang et al. 2020): kappa CE(f(x)) + (1 - kappa) "
                        "CE(-lb), lb the CROWN-IBP margin lower bounds (IBP intermediate "
                        "bounds, one CROWN backward pass); beta-mix with IBP margins: beta="
                        f"{o['crown_ibp_beta']}.")))
register(MethodSpec(
    "bounded", build=lambda o: _linear_loss("fastlin", o), options=("bounded_projections",),
    validate=_check_projections, kappa_lam_forms=LAM_FORMS, describe=_describe_bounded))
