"""Training on linear margin bounds: ``crown_ibp`` (Zhang et al. 2020) and ``bounded``
(Fast-Lin / the convex outer bound of Wong & Kolter 2018)."""
from __future__ import annotations

from typing import Any, Dict

from dm_jax.core.input_sets import make_input_set
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

  if options.get("loss_fusion", False):
    return _fused_loss(options)

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


def _fused_loss(options: Options) -> LossFn:
  """kappa CE(f(x)) + (1 - kappa) U, U the loss-fusion upper bound of the worst-case CE
  (:func:`dm_jax.bounds.loss_fusion.cross_entropy_upper_bound`: one backward row
  instead of K - 1; beta mixes the bounds of the exponentials' sum)."""
  norm, domain, k = options["norm"], options["domain"], options["k"]
  beta_option = options["crown_ibp_beta"]

  def loss_fn(params, apply_fn, x, y, hyper, key):
    del key
    # Imported when traced, as base.margin_lower_bounds does (methods import no bounds).
    from dm_jax.bounds import loss_fusion  # pylint: disable=import-outside-toplevel
    logits = apply_fn(params, x)
    ce = cross_entropy(logits, y)
    beta = hyper.lam if beta_option == "lam" else beta_option
    upper, lb_ibp = loss_fusion.cross_entropy_upper_bound(
        apply_fn, params, make_input_set(x, hyper.eps, norm, k, domain), y, beta=beta)
    robust = upper.mean()
    loss = hyper.kappa * ce + (1 - hyper.kappa) * robust
    # No margins of CROWN-IBP's are computed: the certified share is IBP's (folded).
    return loss, {"ce_clean": ce, "robust_loss": robust, "acc": accuracy(logits, y),
                  "ibp_cert_acc": margin_certified(lb_ibp, y)}

  return loss_fn


def _check_crown_ibp(options: Options) -> None:
  beta = options["crown_ibp_beta"]
  if not (isinstance(beta, str) and beta == "lam" or isinstance(beta, (int, float))):
    raise ValueError(f"crown_ibp_beta must be a float or 'lam'; got {beta!r}.")
  if not isinstance(options["loss_fusion"], bool):
    raise ValueError(f"loss_fusion must be True or False; got {options['loss_fusion']!r}.")


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


def _describe_crown_ibp(options: Options) -> str:
  beta = options["crown_ibp_beta"]
  if options["loss_fusion"]:
    return ("CROWN-IBP with loss fusion (Zhang et al. 2020; Xu et al. 2020): kappa "
            "CE(f(x)) + (1 - kappa) U, U an upper bound of the worst-case CE by one "
            "CROWN backward row over IBP intermediate bounds (each exp(f_j - f_y) below "
            "its secant over IBP's interval); beta-mix with IBP's bound of the "
            f"exponentials' sum: beta={beta}.")
  return ("CROWN-IBP (Zhang et al. 2020): kappa CE(f(x)) + (1 - kappa) CE(-lb), lb the "
          "CROWN-IBP margin lower bounds (IBP intermediate bounds, one CROWN backward "
          f"pass); beta-mix with IBP margins: beta={beta}.")


register(MethodSpec(
    "crown_ibp", build=lambda o: _linear_loss("crown_ibp", o),
    options=("crown_ibp_beta", "loss_fusion"), extra_options={"loss_fusion": False},
    validate=_check_crown_ibp, kappa_lam_forms=LAM_FORMS, describe=_describe_crown_ibp))
register(MethodSpec(
    "bounded", build=lambda o: _linear_loss("fastlin", o), options=("bounded_projections",),
    validate=_check_projections, kappa_lam_forms=LAM_FORMS, describe=_describe_bounded))
