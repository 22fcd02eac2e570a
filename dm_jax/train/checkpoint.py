"""Orbax checkpoints of the full training state (params, optimizer, step, RNG key).

A checkpoint holds two items:

* ``state``: the :class:`dm_jax.train.TrainState` pytree (arrays only), saved with
  ``StandardSave`` and restored into the structure of a freshly created state;
* ``meta``: JSON (epoch, batch position within the epoch, step, the config, ...).

Nothing is ever pickled or unpickled. A state with a non-finite array is refused
(``FloatingPointError``) so the last good checkpoint is never replaced by a bad one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import jax
import numpy as np
import orbax.checkpoint as ocp


def all_finite(tree: Any) -> bool:
  """True if every floating leaf of ``tree`` is finite."""
  for leaf in jax.tree_util.tree_leaves(tree):
    arr = np.asarray(leaf)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
      return False
  return True


class Checkpointer:
  """Save/restore of ``(state, meta)`` under ``directory`` with ``max_to_keep``."""

  def __init__(self, directory, max_to_keep: int = 3):
    self.directory = Path(directory).expanduser().resolve()
    self.directory.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> List[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
    """Saves (synchronously). Raises FloatingPointError for a non-finite state."""
    if not all_finite(state):
      raise FloatingPointError(
          f"refusing to checkpoint a non-finite state at step {step}")
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def restore(self, target_state: Any,
              step: Optional[int] = None) -> Tuple[Any, Dict[str, Any]]:
    """Restores ``(state, meta)``; ``target_state`` gives the structure and dtypes."""
    if step is None:
      step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target_state)
    restored = self._manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def read_meta(self, step: Optional[int] = None) -> Dict[str, Any]:
    """The JSON metadata saved with a checkpoint (the state is not read)."""
    if step is None:
      step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(int(step), args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def latest_step(directory: Union[str, Path]) -> Optional[int]:
  """The newest checkpoint step under ``directory`` (None if there is none)."""
  directory = Path(directory)
  if not directory.is_dir():
    return None
  steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
  return max(steps) if steps else None
