"""Training methods (losses and regularizers) of the DoubleMargin paper and its baselines.

Every method is a pure, jit-able loss ``loss(params, apply_fn, x, y, hyper, key) ->
(scalar_loss, metrics)`` (see :mod:`dm_jax.train.methods.base`), built by
``get_method(name, **options)`` from the registry. Methods (SPEC.md "Double Margin" and
"Baselines"), by the module that registers them:

=================  =========================================================================
normal             CE(f(x), y)                                          normal.py
l1                 CE + l1 * sum_layers ||W||_{op,inf}  (max row l1 norm; default 2e-5)
l2                 CE + l2 * sum_layers ||W||_F^2       (default 1e-4, a choice)
adv                CE(f(x_pgd), y)                       Madry et al. 2018  adversarial.py
trades             CE(f(x), y) + beta KL(p(x) || p(x'))  Zhang et al. 2019
ibp                kappa CE(f(x)) + (1 - kappa) CE(z_hat) Gowal et al. 2018  ibp.py
crown_ibp          kappa CE(f(x)) + (1 - kappa) CE(-lb)   Zhang et al. 2020  linear.py
bounded            kappa CE(f(x)) + (1 - kappa) CE(-lb_fastlin)  Wong & Kolter 2018
relu_stability     CE + lam RS (+ l1, + pruning, + PGD)   Xiao et al. 2019  relu_stability.py
mmr                CE + lam (hinge on region / decision boundary distances)  Croce et al.
                   2019                                                     mmr.py
dm, dm_s_only,     (1 - lam) CE(z) + lam CE_split(z + s + v, z - s - v)  double_margin.py
dm_ibp_v           (Algorithm 1; ``lam_form="kappa"``: kappa CE(z) + (1 - kappa) CE_split)
dm* (dm_star)      dm with final lambda 1 ("Double Margin *"), an alias
=================  =========================================================================

The ``l1=`` / ``l2=`` options add the weight penalties to ANY method ("DM + L1",
"L1+RS+Pruning"). Weight matrices are the pytree leaves named ``kernel``.

The linear-bound methods (``crown_ibp``, ``bounded`` and ``ibp`` with ``ibp_margin=True``)
use :func:`dm_jax.bounds.linear.margin_lower_bounds`, imported lazily when the loss is traced.

A new method is one module here that calls :func:`register` with a :class:`MethodSpec`,
imported below.
"""
from typing import Tuple

from dm_jax.train.methods.attacks import pgd_attack, trades_attack
from dm_jax.train.methods.base import (COMMON_OPTIONS, LAM_FORMS, SOLVER_OPTIONS, Hyper, LossFn,
                                       Method, MethodSpec, Options, accuracy, canonical_name,
                                       cross_entropy, default_lam_final, get_method,
                                       interval_margins, kappa_form, kappa_form_summary,
                                       margin_certified, names, option_defaults,
                                       parse_method_entry, parse_option_value, register,
                                       spec, split_method_entries, unregister,
                                       worst_case_logits)
from dm_jax.train.methods.penalties import (apply_masks, l1_penalty, l2_penalty,  # noqa: F401
                                            no_masks, prune_small_weights)
# The families: importing a module registers its methods (in this order: METHODS).
from dm_jax.train.methods import normal, adversarial, ibp, linear, relu_stability, mmr  # noqa
from dm_jax.train.methods import double_margin  # noqa: E402
from dm_jax.train.methods.normal import DEFAULT_L1, DEFAULT_L2


def __getattr__(name: str) -> Tuple[str, ...]:
  """``METHODS``: the registered method names, in registration order (kept current)."""
  if name == "METHODS":
    return names()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
