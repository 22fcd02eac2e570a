"""Whether the CPU-tuned code paths run: decided once, here, per backend.

dm_jax has code paths measured to be faster on XLA:CPU than what XLA emits by itself
(docs/benchmarks.md), each computing the same values as the plain path:

* the strided-convolution input gradient of :func:`dm_jax.core.conv.conv2d` (a custom
  VJP), used by the models' convolutions (:func:`dm_jax.core.conv.conv_general_dilated`)
  and by the forward bound domains (:mod:`dm_jax.core.propagation`);
* the linear bounds' batch blocks (:func:`dm_jax.bounds.linear.default_batch_block`),
  which keep coefficient tensors inside a CPU's caches.

They are on where they were measured, on CPU, and off on GPU/TPU (plain XLA) until
measured there. :func:`enabled` is the one place that decides; ``DM_JAX_FAST_PATHS``
(``auto``, ``on``, ``off``) or :func:`forced` override it, so tests run every path on
CPU. The choice is read when a function is traced, and JAX caches a trace per function
(``jax.jit``, ``jax.make_jaxpr``): a function traced before a switch keeps its path.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional

import jax

ENV_VAR = "DM_JAX_FAST_PATHS"
MEASURED_BACKENDS = ("cpu",)  # where the fast paths beat plain XLA (docs/benchmarks.md)

_forced: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar(
    "dm_jax_fast_paths", default=None)


def enabled() -> bool:
  """Whether the CPU-tuned paths run: :func:`forced`, else ``$DM_JAX_FAST_PATHS``, else
  whether the default backend is one they were measured on.

  Raises:
    ValueError: ``$DM_JAX_FAST_PATHS`` is not auto, on or off.
  """
  value = _forced.get()
  if value is not None:
    return value
  setting = os.environ.get(ENV_VAR, "auto").strip().lower()
  if setting in ("on", "1", "true"):
    return True
  if setting in ("off", "0", "false"):
    return False
  if setting not in ("auto", ""):
    raise ValueError(f"${ENV_VAR} must be auto, on or off; got {setting!r}.")
  return jax.default_backend() in MEASURED_BACKENDS


@contextlib.contextmanager
def forced(value: bool) -> Iterator[None]:
  """Within the block, :func:`enabled` is ``value`` (for tests and measurements)."""
  token = _forced.set(bool(value))
  try:
    yield
  finally:
    _forced.reset(token)
