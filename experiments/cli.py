"""What every experiment entry point does around its work: bad input is one
``error: ...`` line on stderr and exit status 1, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable, Sequence, Tuple, Type

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
