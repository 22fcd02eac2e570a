"""What every experiment entry point does around its work: bad input is one
``error: ...`` line on stderr and exit status 1, never a traceback; and what the drivers
of several runs (recipe_search, reproduce) read the same way: names picked from a flag,
a run's training time."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple, Type

from absl import flags


def user_errors() -> Tuple[Type[BaseException], ...]:
  """The exceptions that mean bad input (flags, data, model), not a bug."""
  from dm_jax.core.errors import UnsupportedPrimitiveError
  from dm_jax.data import DatasetNotFoundError
  return (ValueError, DatasetNotFoundError, FileNotFoundError, FloatingPointError,
          UnsupportedPrimitiveError)


def run_main(argv: Sequence[str], run: Callable[[], None],
             errors: Tuple[Type[BaseException], ...] = ()) -> None:
  """Runs ``run()`` as an absl ``main``: positional arguments and ``errors`` (default
  :func:`user_errors`) exit with one line; absl logging at WARNING unless
  ``--verbosity`` is given (orbax logs every save at INFO)."""
  if len(argv) > 1:
    sys.exit(f"error: unexpected positional arguments: {' '.join(argv[1:])}")
  from absl import logging
  if "verbosity" not in flags.FLAGS or not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    run()
  except (errors or user_errors()) as e:
    sys.exit(f"error: {' '.join(str(e).split())}")


def select_names(text: str, known: Sequence[str], what: str) -> List[str]:
  """The comma-separated names of ``text`` (a flag's value), each one of ``known``;
  ValueError naming the unknown ones and ``what`` they should be."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"unknown {what} {', '.join(unknown)}; expected some of "
                     f"{', '.join(known)}")
  return names


def read_metrics(workdir: Path) -> List[Dict]:
  """The run's ``metrics.jsonl`` records (one per epoch); [] before the first epoch."""
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


# An epoch this many times slower than the run's median epoch was suspended (SIGSTOP
# while a benchmark or CI had the cores, or a laptop asleep): it counts as the median.
PAUSED_EPOCH_FACTOR = 5.0


def raw_train_seconds(records: Sequence[Dict]) -> float:
  """The sum of the epochs' own wall times, suspended epochs included."""
  return sum(r.get("epoch_time_s", 0.0) for r in records)


def train_seconds(records: Sequence[Dict]) -> float:
  """Training wall time over all (resumed) invocations: the epochs' own wall times, an
  epoch over :data:`PAUSED_EPOCH_FACTOR` times the median counted at the median."""
  times = [r.get("epoch_time_s", 0.0) for r in records]
  if len(times) < 3:
    return sum(times)
  median = sorted(times)[len(times) // 2]
  return sum(median if t > PAUSED_EPOCH_FACTOR * median else t for t in times)
