"""Adversarial training: ``adv`` (Madry et al. 2018) and ``trades`` (Zhang et al. 2019)."""
from __future__ import annotations

from typing import Any, Dict

import jax.numpy as jnp
from jax import lax

from dm_jax.train.methods.attacks import check_attack_norm, pgd_attack, softmax_kl, trades_attack
from dm_jax.train.methods.base import LossFn, MethodSpec, Options, accuracy, cross_entropy, register

PGD_OPTIONS = ("pgd_steps", "pgd_step_size", "pgd_random_start")


def pgd_settings(options: Options) -> Dict[str, Any]:
  """The keyword arguments of :func:`pgd_attack` that the options set."""
  return dict(steps=options["pgd_steps"], step_size=options["pgd_step_size"],
              norm=options["norm"], domain=options["domain"],
              random_start=options["pgd_random_start"])


def _check_norm(options: Options) -> None:
  check_attack_norm(options["norm"])


def _adv(options: Options) -> LossFn:
  pgd = pgd_settings(options)

  def adv_loss(params, apply_fn, x, y, hyper, key):
    """CE(f(x_adv), y), x_adv = PGD with random start on the eps ball, in the domain."""
    x_adv = pgd_attack(apply_fn, params, x, y, hyper.eps, key, **pgd)
    logits = apply_fn(params, x)
    logits_adv = apply_fn(params, x_adv)
    ce_adv = cross_entropy(logits_adv, y)
    metrics = dict(ce_clean=lax.stop_gradient(cross_entropy(logits, y)), robust_loss=ce_adv,
                   acc=accuracy(logits, y), adv_acc=accuracy(logits_adv, y))
    return ce_adv, metrics

  return adv_loss


def _trades(options: Options) -> LossFn:
  steps, step_size = options["pgd_steps"], options["pgd_step_size"]
  norm, domain, beta = options["norm"], options["domain"], options["trades_beta"]

  def trades_loss(params, apply_fn, x, y, hyper, key):
    """CE(f(x), y) + beta mean KL(softmax f(x) || softmax f(x')), x' = PGD on the KL."""
    x_adv = trades_attack(apply_fn, params, x, hyper.eps, key, steps, step_size, norm,
                          domain)
    logits = apply_fn(params, x)
    logits_adv = apply_fn(params, x_adv)
    ce = cross_entropy(logits, y)
    kl = jnp.mean(softmax_kl(logits, logits_adv))
    metrics = dict(ce_clean=ce, robust_loss=kl, kl=kl, acc=accuracy(logits, y),
                   adv_acc=accuracy(logits_adv, y))
    return ce + beta * kl, metrics

  return trades_loss


register(MethodSpec(
    "adv", build=_adv, options=PGD_OPTIONS, validate=_check_norm,
    describe=lambda o: ("Adversarial training (Madry et al. 2018): CE(f(x_pgd), y), PGD "
                        f"{o['pgd_steps']} steps of {o['pgd_step_size']:g}, random start, "
                        f"on the {o['norm']} ball and the domain.")))
register(MethodSpec(
    "trades", build=_trades, options=("pgd_steps", "pgd_step_size", "trades_beta"),
    validate=_check_norm,
    describe=lambda o: (f"TRADES (Zhang et al. 2019): CE(f(x), y) + {o['trades_beta']:g} "
                        "KL(softmax f(x) || softmax f(x')), x' = PGD on the KL from "
                        "x + 0.001 N(0, 1).")))
