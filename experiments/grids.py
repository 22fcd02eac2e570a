"""The certification radii of each dataset, and radii read from a flag's text.

Two grids per dataset: ``TABLE``, the columns the training scripts certify at the end of
a run (the paper's tables), and ``CURVE``, the finer grid ``experiments.certify`` draws
certified accuracy against (each radius is one more certification pass). No absl flags
are defined here, so every experiment script can import it.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Dict, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class Grid:
  """Radii (pixel units, increasing), their labels as typed, and the table's unit."""
  eps: Tuple[float, ...]
  labels: Tuple[str, ...]
  scale: float = 1.0  # columns printed in units of 1/scale (255 for the /255 grids)

  @property
  def column_label(self) -> str:
    return "eps" if self.scale == 1.0 else f"eps*{self.scale:g}"


def parse_number(text: str, what: str) -> float:
  """'0.3', '8/255', '0.5/255' -> float; ValueError naming the flag otherwise. A ratio
  is computed exactly and rounded once (Fraction alone takes no decimal numerator)."""
  try:
    if "/" in text:
      num, den = text.split("/")  # more than one '/' is a ValueError here
      return float(Fraction(num.strip()) / Fraction(den.strip()))
    return float(text)
  except (ValueError, ZeroDivisionError):
    raise ValueError(f"--{what} must be a number (e.g. 0.3 or 8/255); got {text!r}") from None


def parse_grid(text: str, what: str, scale: float = 1.0) -> Grid:
  """Comma-separated radii ('0,2/255,8/255') -> :class:`Grid`; increasing and >= 0."""
  labels = tuple(t.strip() for t in text.split(",") if t.strip())
  eps = tuple(parse_number(t, what) for t in labels)
  if not eps:
    raise ValueError(f"--{what} needs at least one radius")
  if any(e < 0 for e in eps) or any(b <= a for a, b in zip(eps, eps[1:])):
    raise ValueError(f"--{what} must be increasing radii >= 0; got {text!r}")
  return Grid(eps, labels, scale)


def _per_255(values: Sequence[str]) -> Grid:
  return Grid(tuple(float(Fraction(v)) / 255 for v in values),
              tuple(f"{v}/255" for v in values), 255.0)


_PER_255_GRID = _per_255(("0", "0.5", "1", "2", "3", "5", "7", "8", "9"))

TABLE: Dict[str, Grid] = {
    "mnist": Grid((0.0, 0.1, 0.2, 0.3), ("0", "0.1", "0.2", "0.3")),  # Table 2's columns
    "cifar10": _PER_255_GRID,
    "gtsrb": _PER_255_GRID,
}
CURVE: Dict[str, Grid] = {
    "mnist": parse_grid("0,0.01,0.03,0.05,0.07,0.1,0.2,0.3,0.4", "eps_grid"),
    "cifar10": _PER_255_GRID,
    "gtsrb": _PER_255_GRID,
}
