"""Which tests a plain ``pytest`` runs (the tiers are the markers in setup.cfg).

* default, ``pytest``: one case of every test, a few minutes on 2 cores, for working;
* ``sweep``: the other cases of every parametrised test, and the tests marked
  ``@pytest.mark.sweep`` by hand (heavy end-to-end checks). ``pytest -m "not slow"``
  runs them with the default tier; that is README's test command and what CI runs, so
  every piece of evidence still runs before anything lands;
* ``slow``: training runs and long sweeps that neither runs (``pytest -m slow``),
  among them the extra cases of the tests a module names in ``SLOW_SWEEPS``.

The rule, applied here so that a new test needs no marking: the cases generated from
one test function (``pytest.mark.parametrize``, absl's ``parameterized`` and
``chex.variants`` alike) form a group; its first case, the jitted one where a case runs
both jitted and eagerly, runs by default and the rest are ``sweep``. So the cheapest
case goes first in a parameter list. Jit = eager is checked once per test in CI: the
first case's eager twin is ``sweep``, the other cases' eager twins are ``slow`` (the
jitted path is the one users run; an eager twin costs as much as its case, often
more). (The markers select even a case named on the command line: run a sweep case with ``pytest -m "not slow" 'tests/test_x.py::test_y[c]'``,
or any case with ``-m ""``.)

The default tier alone compiles without XLA's backend (LLVM) optimisations
(``FAST_COMPILE_XLA_FLAGS``): most of its time is compiling small programs, and they
compile faster that way. The sweep, the slow tier and everything a user runs keep XLA's
defaults, so CI checks every assertion on the code users get; set
``DM_JAX_TEST_XLA_DEFAULTS=1`` to run the default tier on them too.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List

import pytest
from _pytest.mark.expression import Expression

# Timings in WORKSPACE.md ("The test tiers"). --xla_cpu_use_fusion_emitters=false gains
# as much; both together more, but they make one jitted gradient non-finite (SiLU's
# CROWN-IBP bound in test_activations), not understood, so only this one, the
# long-standing flag of the two, is used.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0",)


def _selects(markexpr: str, marker: str = "") -> bool:
  """Whether ``-m markexpr`` selects a test carrying only ``marker`` (none if "")."""
  return not markexpr or Expression.compile(markexpr).evaluate(
      lambda name, **kwargs: name == marker)


def pytest_configure(config):
  """The default tier's compile flags (before any test builds a JAX backend; the
  workers of pytest-xdist run this too, and subprocesses inherit it)."""
  markexpr = config.option.markexpr
  if (_selects(markexpr) and not _selects(markexpr, "sweep")
      and os.environ.get("DM_JAX_TEST_XLA_DEFAULTS") != "1"):
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in FAST_COMPILE_XLA_FLAGS
                                                if f not in flags])

EAGER = "__without_jit"  # the suffix chex.variants gives the eager twin of a case
JIT = "__with_jit"  # ... and the jitted one


def _origin(fn: Callable) -> Callable:
  """The test function as written (absl and chex wrap it with functools.wraps)."""
  while hasattr(fn, "__wrapped__"):
    fn = fn.__wrapped__
  return fn


def pytest_collection_modifyitems(config, items):
  del config
  groups: Dict[int, List[pytest.Item]] = {}
  for item in items:
    fn = getattr(item, "function", None)
    if fn is None or item.get_closest_marker("slow") is not None:
      continue
    groups.setdefault(id(_origin(fn)), []).append(item)
  for group in groups.values():
    first, *rest = sorted(group, key=_order)
    first_eager = first.name[:-len(JIT)] + EAGER if first.name.endswith(JIT) else None
    for item in rest:
      slow = _slow_sweep(item) or (item.name.endswith(EAGER) and item.name != first_eager)
      item.add_marker(pytest.mark.slow if slow else pytest.mark.sweep)


def _slow_sweep(item: pytest.Item) -> bool:
  """Whether the module names the item's test in ``SLOW_SWEEPS`` (or sets it to
  ``"all"``, for every test of the module): its first case stays
  in the default tier and the others go to ``slow``, where one case costs tens of
  seconds and the group would push CI past its time limit."""
  names = getattr(getattr(item, "module", None), "SLOW_SWEEPS", ())
  return names == "all" or _origin(item.function).__name__ in names


def _order(item: pytest.Item):
  """Jitted before eager, then the order the cases were written in: pytest collects a
  unittest class's methods sorted by name, but absl and chex add them to the class in
  parameter order (sorted() is stable, so module-level cases keep collection order)."""
  cls = getattr(item, "cls", None)
  names = list(vars(cls)) if cls is not None else []
  return item.name.endswith(EAGER), names.index(item.name) if item.name in names else 0
