"""Double Margin training (DoubleMargin ICLR 2020 submission, Algorithm 1): ``dm`` and the
variations ``dm_s_only`` and ``dm_ibp_v``; ``dm*`` ("Double Margin *") is ``dm`` with
final lambda 1."""
from __future__ import annotations

from typing import Tuple

import jax.numpy as jnp

from dm_jax.bounds.double_margin import (double_margin, expands_at_box_centre, folded_margins,
                                         split_cross_entropy)
from dm_jax.train.methods.base import (LossFn, MethodSpec, Options, accuracy, cross_entropy,
                                       interval_margins, margin_certified, register,
                                       worst_case_logits)

DM_LAM_FINAL = 2.0     # "Double Margin": final lambda 2 (paper form)
STAR_LAM_FINAL = 1.0   # "Double Margin *": dm with final lambda 1
STAR_ALIASES = ("dm*", "dm_star", "dmstar")
# (name, double_margin variant, what the description says, aliases with final lambda 1)
VARIANTS = (
    ("dm", "dm", "Double Margin (Algorithm 1): z +/- (s + v)", STAR_ALIASES),
    ("dm_s_only", "s_only", "Double Margin Variation 1 (s only): z +/- s", ()),
    ("dm_ibp_v", "ibp_v", "Double Margin Variation 2 (IBP + v): [l - v, u + v]", ()),
)
# The robust term. "split" (eq. 9): CE_split(upper, lower) = logsumexp(upper) - lower_y,
# whose logsumexp includes the true class's upper end, so it keeps penalising the width
# u_y - l_y even of a certified point. "worst_case": CE(z_hat), z_hat_y = lower_y and
# z_hat_j = upper_j (IBP's form, Gowal et al. 2018), 0 in the limit of a certified point.
# "folded": CE(-m), m the lower ends of the margins f_y - f_j with the specification
# folded into the last affine layers (double_margin.folded_margins; as IBP's tighter
# margins).
DM_LOSSES = ("split", "worst_case", "folded")


def _dm(variant: str, options: Options) -> LossFn:
  norm, k, paper_form = options["norm"], options["k"], options["lam_form"] == "paper"
  domain = options["domain"] if options["dm_domain"] else None
  robust_form = options["dm_loss"]
  z_is_clean = not expands_at_box_centre(variant, norm, domain)

  def dm_loss(params, apply_fn, x, y, hyper, key):
    """(1 - lam) CE(z) + lam CE_split(z + s + v, z - s - v)  [= CE + lam R, eq. 9]."""
    del key
    if robust_form == "folded":
      m, lb = folded_margins(apply_fn, params, x, y, hyper.eps, norm, variant=variant,
                             k=k, domain=domain)
    else:
      m = double_margin(apply_fn, params, x, hyper.eps, norm, variant=variant, k=k,
                        domain=domain)
      lb = interval_margins(m.lower, m.upper, y)
    # On the data box, dm/s_only expand at the clipped interval's centre, so m.z is the
    # network there, not at x: the clean term needs its own forward pass.
    logits = m.z if z_is_clean else apply_fn(params, x)
    ce = cross_entropy(logits, y)
    if robust_form == "split":
      robust = jnp.mean(split_cross_entropy(m.upper, m.lower, y))
    elif robust_form == "worst_case":
      robust = cross_entropy(worst_case_logits(m.lower, m.upper, y), y)
    else:
      robust = cross_entropy(-lb, y)
    if paper_form:
      loss = (1 - hyper.lam) * ce + hyper.lam * robust
    else:
      loss = hyper.kappa * ce + (1 - hyper.kappa) * robust
    metrics = dict(ce_clean=ce, robust_loss=robust, dm_reg=robust - ce,
                   acc=accuracy(logits, y),
                   dm_cert_acc=margin_certified(lb, y),
                   mean_s=jnp.mean(m.s), mean_v=jnp.mean(m.v))
    return loss, metrics

  return dm_loss


def _describe(what: str, options: Options) -> str:
  form = ("(1 - lam) CE(z) + lam CE_split(upper, lower)  [= CE + lam R]"
          if options["lam_form"] == "paper" else
          "kappa CE(z) + (1 - kappa) CE_split(upper, lower)  [SingleProp form]")
  if options["dm_loss"] == "split":
    return (f"{what}; loss {form}; CE_split(u, l) = logsumexp(u) - l_y (eq. 9, "
            "DoubleMargin ICLR 2020 submission).")
  if options["dm_loss"] == "folded":
    return (f"{what}; loss {form}; CE_split replaced by CE(-m), m_j the lower end of "
            "the margin f_y - f_j with the specification folded into the last affine "
            "layers.")
  return (f"{what}; loss {form}; CE_split replaced by CE(z_hat), z_hat_y = l_y, "
          "z_hat_j = u_j (worst-case logits).")


def _validate(options: Options) -> None:
  if options["dm_loss"] not in DM_LOSSES:
    raise ValueError(f"dm_loss must be one of {', '.join(DM_LOSSES)}; got "
                     f"{options['dm_loss']!r}.")


def _register(name: str, variant: str, what: str, aliases: Tuple[str, ...]) -> None:
  register(MethodSpec(
      name, build=lambda o: _dm(variant, o), describe=lambda o: _describe(what, o),
      options=("dm_domain", "dm_loss"), extra_options={"dm_loss": "split"},
      validate=_validate, kappa_lam_forms=("kappa",), lam_final=DM_LAM_FINAL,
      aliases={a: {"lam_final": STAR_LAM_FINAL} for a in aliases}))


for _variant_spec in VARIANTS:
  _register(*_variant_spec)
