"""Where a number came from: the machine, the software and the commit that produced it.

Benchmarks (``benchmarks/``) and experiment runs (``experiments/``) record
:func:`machine_info` beside their results, so every figure in a document can be traced
to a command, a commit and a machine.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Dict

_ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = _ROOT) -> str:
  """Short hash of HEAD, marked when tracked files differ from it; "?" outside git."""
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                            capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=root, capture_output=True, text=True, check=False).stdout
  except OSError:
    return "?"
  # A dirty tree is marked: its numbers are not reproducible from the commit alone.
  return (commit + (" (with uncommitted changes)" if dirty.strip() else "")) or "?"


def machine_info() -> Dict[str, object]:
  """CPU model, cores, jax/jaxlib/python versions, backend, load average, commit."""
  model, cores = platform.processor() or "?", os.cpu_count()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  try:
    load = os.getloadavg()
  except OSError:
    load = (float("nan"),) * 3
  return dict(model=model, cores=cores, jax=jax.__version__, jaxlib=jaxlib.__version__,
              backend=jax.default_backend(), load=load, python=platform.python_version(),
              commit=git_commit())
