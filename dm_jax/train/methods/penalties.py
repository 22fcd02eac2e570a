"""Weight penalties and magnitude pruning (Xiao et al. 2019) of the training methods.

Weight matrices are the pytree leaves named ``kernel``.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp


def _is_kernel(path) -> bool:
  """Whether a pytree path's last key is ``kernel``."""
  last = path[-1] if path else None
  return getattr(last, "key", getattr(last, "name", None)) == "kernel"


def _kernels(params):
  """The leaves of ``params`` whose last path key is ``kernel``."""
  return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
          if _is_kernel(path)]


def l1_penalty(params: Any) -> jax.Array:
  """sum over layers of ||W||_{op,inf}: the max over output units of the l1 norm of the
  unit's weights. Dense kernel (in, out): l1 over ``in``; conv kernel (h, w, in, out):
  l1 over h, w, in (the weights of one output channel). A scalar."""
  total = jnp.zeros((), jnp.float32)
  for k in _kernels(params):
    k2 = jnp.abs(k).reshape((-1, k.shape[-1]))
    total = total + jnp.max(jnp.sum(k2, axis=0))
  return total


def l2_penalty(params: Any) -> jax.Array:
  """sum over layers of the squared Frobenius norm of the kernel: a scalar."""
  total = jnp.zeros((), jnp.float32)
  for k in _kernels(params):
    total = total + jnp.sum(jnp.square(k))
  return total


def prune_small_weights(params: Any, threshold: float = 1e-3) -> Tuple[Any, Any]:
  """Magnitude pruning (Xiao et al. 2019): zero every kernel weight with |w| < threshold.

  Returns:
    ``(pruned_params, masks)``; ``masks`` is the one mask format of dm_jax: a float32
    0/1 array of each leaf's shape (1 = kept; biases and other non-kernels all ones), as
    :func:`no_masks` and the trainer's state hold. Keep the pruned weights at zero while
    fine-tuning with :func:`apply_masks`.
  """
  def mask_of(path, leaf):
    keep = (jnp.abs(leaf) >= threshold) if _is_kernel(path) else jnp.ones(leaf.shape, bool)
    return keep.astype(jnp.float32)
  masks = jax.tree_util.tree_map_with_path(mask_of, params)
  return apply_masks(params, masks), masks


def no_masks(params: Any) -> Any:
  """Masks that keep every weight (float32 ones of each leaf's shape)."""
  return jax.tree_util.tree_map(lambda p: jnp.ones(jnp.shape(p), jnp.float32), params)


def apply_masks(params: Any, masks: Any) -> Any:
  """``params * masks``, leaf by leaf (masks as :func:`prune_small_weights` returns)."""
  return jax.tree_util.tree_map(lambda p, m: p * m.astype(p.dtype), params, masks)


def add_penalties(loss: jax.Array, metrics: Dict[str, jax.Array], params: Any, l1: float,
                  l2: float) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Adds the weight penalties to a method's objective.

  Args:
    loss: the scalar objective.
    metrics: the method's scalar metrics; gains ``l1_penalty`` / ``l2_penalty`` (for the
      nonzero weights) and ``loss`` (updated in place).
    params: the model variables.
    l1, l2: the penalty weights (0: none).

  Returns:
    ``(loss + l1 * l1_penalty(params) + l2 * l2_penalty(params), metrics)``.
  """
  for weight, penalty in ((l1, l1_penalty), (l2, l2_penalty)):
    if weight:
      p = penalty(params)
      loss = loss + weight * p
      metrics[penalty.__name__] = p
  metrics["loss"] = loss
  return loss, metrics

