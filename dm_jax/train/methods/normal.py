"""Plain and weight-penalised training: ``normal``, ``l1``, ``l2``."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax

from dm_jax.train.methods.base import MethodSpec, accuracy, cross_entropy, register

DEFAULT_L1 = 2e-5   # SPEC.md (SingleProp): 2e-5 * sum_i ||W_i||_{op,inf}
DEFAULT_L2 = 1e-4   # (choice) the paper gives none


def normal_loss(params: Any, apply_fn: Callable, x: jax.Array, y: jax.Array, hyper: Any,
                key: Optional[jax.Array]) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """CE(f(x), y) (+ l1 / l2 weight penalties)."""
  del hyper, key
  logits = apply_fn(params, x)
  ce = cross_entropy(logits, y)
  return ce, dict(ce_clean=ce, robust_loss=ce, acc=accuracy(logits, y))


register(MethodSpec(
    "normal", build=lambda o: normal_loss,
    describe=lambda o: "Normal training: CE(f(x), y)."))
register(MethodSpec(
    "l1", build=lambda o: normal_loss, penalty_defaults={"l1": DEFAULT_L1},
    describe=lambda o: (f"CE + {o['l1']:g} * sum_layers ||W||_(op,inf) (max row l1 norm); "
                        "l1 weight regularisation (SingleProp default 2e-5).")))
register(MethodSpec(
    "l2", build=lambda o: normal_loss, penalty_defaults={"l2": DEFAULT_L2},
    describe=lambda o: f"CE + {o['l2']:g} * sum_layers ||W||_F^2; l2 weight regularisation."))
