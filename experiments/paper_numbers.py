"""The paper's reported numbers (Tables 2, 4-11, 13-16 of the DoubleMargin paper), as printed.

One place for them: the reproduction driver (experiments/reproduce.py) renders them beside
our measured numbers, never mixed into one column. Nothing here is measured by us; every
value is typed from the paper's text (``shared/paper/doublemargin-iclr2020.txt``, extracted
from the PDF) and checked against it twice.

How the text was read:

* Percentages become fractions (66.5% -> 0.665, through ``Decimal`` so the float is the
  nearest one to the printed decimal); "(2.6)" standard deviations likewise (0.026).
* Column labels are normalised: "cert = 0" / "=0" / "E=0" -> "0", "0.10" -> "0.1",
  "1.00" -> "1", "0.50" -> "0.5"; "8/255" stays "8/255". For l0 the labels count changed
  coordinates.
* Method names: the paper's "ReLU Stabilty" is spelled "ReLU Stability"; the l_p versions
  of Double Margin in Tables 4 and 7 are "Double Margin linf", "... l2", "... l1", "... l0".
* eps_train: the tables print it once per group of rows, in a merged cell that the PDF
  extraction puts on one row of the group (often the middle one). Group membership was
  read from the table layout and confirmed where the paper repeats a row elsewhere (the
  training times are a fingerprint: e.g. Table 8's three MNIST groups each start at
  "Adv. Training", and Normal / Weight Regularization stand above all three, so those two
  rows get ``eps_train=None``; the medium / large CNN pairs of Tables 8, 9 are matched to
  Table 11 by training time). The label is propagated to the whole group.
* Interleaved lines: where two rows were merged into one line value by value (e.g.
  "Normal Weight Regularization<TAB>1164.9 828.8<TAB>65.0% 59.0%<TAB>0.0% 0.0% ..."), the
  first of each pair belongs to the first-named row. Every such row says so in ``note``;
  where the paper prints the same row elsewhere (Tables 6, 9) the two readings agree.
* Dropped decimal points: the extraction sometimes prints "0.0%" as "00%", "2.5%" as
  "25%", "9.5%" as "95%", and prefixes stray "~", "-", "," characters. These were read as
  the decimal that the row's neighbours, the certified-accuracy ordering and (where
  available) a repeated row force; each such row says so in ``note``. A value that cannot
  be recovered with certainty is ``None`` (only Table 10's CIFAR clean accuracy).
* points: the number of test points the block header, the caption or the table's own
  prose states (Table 2 headers; "20 points" for the medium CNNs of Tables 8, 9; 200 for
  Table 6 (Appendix I.3); 10,000 = the entire test set for Table 10). ``None`` where the
  table states nothing; Section 4.1 says 200 points are used "unless otherwise noted".
* certifier: as the caption says. Tables 2, 4-10 say only "CNN-Cert" (Section 4.1 says the
  CNN-Cert evaluation uses CNN-Cert-ReLU, yet Table 14's CNN-Cert-ReLU numbers differ from
  Table 2's for the same method names, so the two are kept apart); Table 11 and Table 16
  are IBP; Tables 13, 14, 15 are CNN-Cert-Ada, -ReLU, -Zero.

Known quirks of the paper kept as printed (see the rows' notes): Table 4's l1 blocks carry
the radii of Table 7's l2 blocks (0.25 ... 1.00 on MNIST, 0.05 ... 0.20 on CIFAR) although
their numbers are those of Table 7's l1 blocks (radii 1 ... 4 and 0.5 ... 2).
"""
from __future__ import annotations

import dataclasses
from decimal import Decimal
from fractions import Fraction
from typing import Iterable, List, Optional, Sequence, Tuple, Union


@dataclasses.dataclass(frozen=True)
class PaperRow:
  table: str  # "Table 2", "Table 4", ... as captioned
  setting: str  # the block heading, normalised: "Small CNN MNIST", "Pureconv CNN GTSRB", ...
  method: str  # as printed, normalised spelling ("ReLU Stability", "Double Margin *", ...)
  certifier: str  # "CNN-Cert", "CNN-Cert-Ada", "CNN-Cert-ReLU", "CNN-Cert-Zero", "IBP"
  norm: str  # threat model of the certified columns: "linf", "l2", "l1", "l0"
  train_norm: str  # threat model the model was trained for
  eps_train: Optional[str]  # as printed ("0.3", "8/255", "2"); None when not printed
  points: Optional[int]  # test points the table states; None if not stated
  train_time_s: Optional[float]
  columns: Tuple[str, ...]  # the certified radii, normalised: "0", "0.01", "8/255", ...
  values: Tuple[Optional[float], ...]  # fractions: 66.5% -> 0.665; None where unreadable
  std: Optional[Tuple[Optional[float], ...]] = None  # "(2.6)" -> 0.026
  note: str = ""  # anything a reader must know

  @property
  def key(self) -> Tuple[str, str, str, str, str, Optional[str], Optional[int]]:
    """What identifies a row: (table, setting, method, certifier, norm, eps_train, points)."""
    return (self.table, self.setting, self.method, self.certifier, self.norm,
            self.eps_train, self.points)


def eps_value(label: str) -> float:
  """A radius label as a number: "8/255" -> 8/255, "0.5/255" -> 0.5/255, "0.3" -> 0.3."""
  text = label.strip()
  if "/" in text:
    num, den = text.split("/")
    return float(Fraction(num.strip()) / Fraction(den.strip()))
  return float(Fraction(text))


def _pct(text: str) -> Tuple[Optional[float], ...]:
  """'98.5 9.5 -' (percent, as printed) -> (0.985, 0.095, None)."""
  return tuple(None if t == "-" else float(Decimal(t) / 100) for t in text.split())


def _cols(text: str) -> Tuple[str, ...]:
  return tuple(text.split())


@dataclasses.dataclass(frozen=True)
class _R:
  """One printed row before the block's shared fields are added."""
  method: str
  eps_train: Optional[str]
  time: Optional[float]
  values: str  # percent, space separated, "-" for None
  std: Optional[str] = None
  train_norm: str = "linf"
  note: str = ""


def _block(table: str, setting: str, certifier: str, columns: Tuple[str, ...],
           entries: Sequence[_R], *, norm: str = "linf", points: Optional[int] = None,
           note: str = "") -> Tuple[PaperRow, ...]:
  out = []
  for e in entries:
    notes = "; ".join(n for n in (note, e.note) if n)
    out.append(PaperRow(
        table=table, setting=setting, method=e.method, certifier=certifier, norm=norm,
        train_norm=e.train_norm, eps_train=e.eps_train, points=points,
        train_time_s=e.time, columns=columns, values=_pct(e.values),
        std=None if e.std is None else _pct(e.std), note=notes))
  return tuple(out)


_MNIST9 = _cols("0 0.01 0.03 0.05 0.07 0.1 0.2 0.3 0.4")
_PER255_9 = _cols("0 0.5/255 1/255 2/255 3/255 5/255 7/255 8/255 9/255")
_MNIST5 = _cols("0 0.05 0.1 0.2 0.3")
_PER255_5 = _cols("0 1/255 3/255 5/255 8/255")

_INTERLEAVED = "row reconstructed from an interleaved PDF line"
_GROUP_EPS = "eps_train printed once for its group of rows; propagated"

# ---------------------------------------------------------------------------------------
# Table 2: CNN-Cert certified accuracies and training times (main text).
_TABLE2 = (
    _block("Table 2", "Small CNN MNIST", "CNN-Cert", _MNIST9, points=200, entries=(
        _R("Normal", None, 185.7, "98.5 9.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("Weight Regularization", None, 626.3, "99.5 81.0 1.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("Adv. Training", "0.3", 8760.5, "99.5 98.5 91.5 38.5 1.0 0.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Bounded", "0.3", 27966.8, "30.0 30.0 30.0 30.0 30.0 29.5 28.5 25.0 0.0",
           note=_GROUP_EPS),
        _R("IBP", "0.3", 611.2, "95.5 95.5 95.5 90.5 76.5 39.5 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("ReLU Stability", "0.3", 595.8, "94.0 90.0 65.0 23.0 5.0 0.5 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("L1+RS+Pruning", "0.3", 686.5, "95.0 88.0 53.5 13.5 3.0 0.5 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Adv+RS+Pruning", "0.3", 9657.1, "90.0 86.5 70.5 55.0 30.5 13.5 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Double Margin", "0.3", 520.0, "90.0 89.0 88.5 88.0 87.5 86.5 80.0 66.5 0.0",
           note=_GROUP_EPS),
        _R("Double Margin +L1", "0.3", 547.1, "91.0 90.5 90.0 89.5 89.0 87.5 83.5 68.0 0.0",
           note=_GROUP_EPS),
    )),
    _block("Table 2", "Small CNN CIFAR", "CNN-Cert", _PER255_9, points=200, entries=(
        _R("Normal", None, 141.1, "61.5 22.0 1.5 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("Weight Regularization", None, 1062.8, "58.0 24.0 2.5 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("Adv. Training", "8/255", 51893.6, "60.5 25.0 2.5 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Bounded", "8/255", 21918.7, "4.0 4.0 4.0 4.0 4.0 4.0 3.5 3.5 3.5",
           note=_GROUP_EPS),
        _R("IBP", "8/255", 410.0, "37.5 35.0 32.5 20.0 17.5 2.5 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("ReLU Stability", "8/255", 396.1, "12.0 12.0 12.0 12.0 12.0 12.0 12.0 12.0 12.0",
           note=_GROUP_EPS),
        _R("Double Margin", "8/255", 409.7, "45.5 45.0 43.5 40.5 39.5 28.0 22.5 19.5 15.0",
           note=_GROUP_EPS),
    )),
    _block("Table 2", "Pooling CNN CIFAR", "CNN-Cert", _PER255_9, points=200,
           note="columns and points from the Small CNN CIFAR header above", entries=(
        _R("Normal", None, 1164.9, "65.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_INTERLEAVED + " (Normal / Weight Regularization); agrees with Table 9"),
        _R("Weight Regularization", None, 828.8, "59.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_INTERLEAVED + " (Normal / Weight Regularization); agrees with Table 9"),
        _R("IBP", "8/255", 4015.1, "43.0 15.5 8.5 3.0 3.0 0.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("ReLU Stability", "8/255", 1676.9, "58.5 8.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Double Margin", "8/255", 2899.5, "40.0 32.5 30.5 24.0 23.5 5.0 1.0 1.0 0.5",
           note=_GROUP_EPS),
    )),
    _block("Table 2", "Pureconv CNN GTSRB", "CNN-Cert", _PER255_9, points=200,
           note="columns and points from the Small CNN CIFAR header above", entries=(
        _R("Normal", None, 119.6, "92.0 77.5 57.5 37.0 35.0 6.5 1.0 0.0 0.0"),
        _R("IBP", "8/255", 287.7, "64.0 63.0 62.0 58.5 57.0 44.5 31.5 26.0 22.0",
           note=_INTERLEAVED + " (IBP / Double Margin); agrees with Table 6"),
        _R("Double Margin", "8/255", 283.1, "68.0 67.5 67.0 65.0 64.5 58.0 52.5 50.0 45.5",
           note=_INTERLEAVED + " (IBP / Double Margin); agrees with Table 6"),
    )),
    _block("Table 2", "Small CNN MNIST", "CNN-Cert", _MNIST5, points=1000,
           note=_GROUP_EPS + " (the '0.3' printed on the DM Variation 1 row)", entries=(
        _R("TRADES", "0.3", 8264.6, "99.5 0.0 0.0 0.0 0.0", std="0.7 0.0 0.0 0.0 0.0"),
        _R("IBP", "0.3", 611.2, "96.3 92.2 46.5 0.0 0.0", std="1.7 2.5 5.1 0.0 0.0"),
        _R("IBP *", "0.3", 460.9, "96.7 90.3 39.3 0.0 0.0", std="1.4 2.6 4.6 0.0 0.0"),
        _R("DM Variation 1", "0.3", 273.3, "94.0 92.7 90.1 78.0 33.1",
           std="2.1 2.5 3.0 3.9 4.7"),
        _R("DM Variation 2", "0.3", 589.6, "90.1 88.9 86.5 79.3 59.0",
           std="2.5 3.1 3.2 3.7 5.0"),
        _R("Double Margin", "0.3", 520.0, "88.2 86.7 84.6 76.2 61.9",
           std="2.6 3.1 3.4 3.9 4.6"),
        _R("Double Margin *", "0.3", 415.3, "91.1 90.1 87.6 78.4 60.4",
           std="2.6 2.9 3.2 3.9 4.7"),
    )),
    _block("Table 2", "Small CNN CIFAR", "CNN-Cert", _PER255_5, points=500,
           note=_GROUP_EPS + " (the '8/255' printed on the DM Variation 1 row)", entries=(
        _R("TRADES", "8/255", 56391.6, "62.2 7.2 0.0 0.0 0.0", std="4.4 2.5 0.0 0.0 0.0"),
        _R("IBP", "8/255", 2446.6, "38.0 32.8 14.6 6.0 1.2", std="4.2 4.0 3.1 2.2 0.8"),
        _R("DM Variation 1", "8/255", 1475.8, "45.0 41.0 33.8 22.8 10.4",
           std="5.1 3.8 4.4 3.9 2.6"),
        _R("DM Variation 2", "8/255", 3062.8, "43.0 40.6 34.2 27.0 18.2",
           std="4.6 4.2 4.0 4.1 3.2"),
        _R("Double Margin", "8/255", 2198.7, "43.2 40.4 32.8 28.6 19.8",
           std="4.0 4.6 4.4 4.4 3.5"),
    )),
    _block("Table 2", "Pureconv CNN GTSRB", "CNN-Cert", _PER255_5, points=500,
           note=("columns and points from the Small CNN CIFAR (500 points) header above; "
                 + _GROUP_EPS + " (the '8/255' printed on the IBP * row)"), entries=(
        _R("MMR (4 epochs)", "8/255", 85377.2, "88.2 53.6 18.2 4.2 0.0",
           std="2.8 4.0 3.7 1.8 0.0"),
        _R("IBP", "8/255", 287.7, "71.8 68.0 60.8 47.6 28.2", std="3.9 4.3 4.3 4.7 3.5"),
        _R("IBP *", "8/255", 266.6, "78.0 74.8 62.2 45.6 26.8", std="3.7 3.7 4.3 4.7 3.5"),
        _R("Double Margin", "8/255", 283.1, "67.8 66.8 61.4 56.4 48.2",
           std="4.4 4.3 4.3 4.7 4.5"),
        _R("Double Margin *", "8/255", 258.1, "75.6 73.8 65.0 57.2 46.4",
           std="3.9 4.2 4.5 4.4 4.4"),
    )),
)

# ---------------------------------------------------------------------------------------
# Table 4: CNN-Cert certified accuracies for effectiveness on other norms (Appendix J).
_T4_L1_NOTE = ("columns as printed in Table 4; the numbers equal Table 7's l1 block, whose "
               "columns are 0, 1, 2, 3, 4 (MNIST) / 0, 0.5, 1, 1.5, 2 (CIFAR): Table 4's "
               "radii look copied from Table 7's l2 block")
_TABLE4 = (
    _block("Table 4", "Small CNN MNIST", "CNN-Cert", _MNIST5, norm="linf", entries=(
        _R("Double Margin linf", "0.3", 609.7, "89.0 89.0 88.0 81.0 63.5"),
        _R("Double Margin l1", "4", 593.7, "68.5 59.5 50.5 9.0 0.5", train_norm="l1"),
        _R("Double Margin l0", "2", 593.3, "86.0 76.0 57.5 4.0 0.0", train_norm="l0"),
    )),
    _block("Table 4", "Small CNN MNIST", "CNN-Cert", _cols("0 0.25 0.5 0.75 1"), norm="l1",
           note=_T4_L1_NOTE, entries=(
        _R("Double Margin linf", "0.3", 609.7, "89.0 0.0 0.0 0.0 0.0"),
        _R("Double Margin l1", "4", 593.7, "68.5 62.5 53.0 35.5 11.0", train_norm="l1"),
    )),
    _block("Table 4", "Small CNN MNIST", "CNN-Cert", _cols("0 1 2 3 4"), norm="l0", entries=(
        _R("Double Margin linf", "0.3", 609.7, "89.0 89.0 89.0 89.0 89.0"),
        _R("Double Margin l0", "2", 593.3, "86.0 85.5 84.0 82.0 60.5", train_norm="l0"),
    )),
    _block("Table 4", "Small CNN CIFAR", "CNN-Cert", _PER255_5, norm="linf", entries=(
        _R("Double Margin linf", "8/255", 3058.8, "42.5 40.0 35.0 31.0 20.5"),
        _R("Double Margin l1", "2", 2975.4, "30.0 28.5 24.5 20.5 19.5", train_norm="l1"),
        _R("Double Margin l0", "2", 2991.7, "28.0 27.0 25.0 22.5 19.5", train_norm="l0"),
    )),
    _block("Table 4", "Small CNN CIFAR", "CNN-Cert", _cols("0 0.05 0.1 0.15 0.2"), norm="l1",
           note=_T4_L1_NOTE + "; the block heading's norm is garbled ('ι'), read as l1",
           entries=(
        _R("Double Margin linf", "8/255", 3058.8, "42.5 0.0 0.0 0.0 0.0"),
        _R("Double Margin l1", "2", 2975.4, "30.0 28.5 27.0 23.5 22.5", train_norm="l1"),
    )),
    _block("Table 4", "Small CNN CIFAR", "CNN-Cert", _cols("0 1 2 3 4"), norm="l0", entries=(
        _R("Double Margin linf", "8/255", 3058.8, "42.5 42.5 42.5 42.5 42.5"),
        _R("Double Margin l0", "2", 2991.7, "28.0 27.5 27.5 26.0 24.0", train_norm="l0"),
    )),
)

# ---------------------------------------------------------------------------------------
# Table 5: CNN-Cert accuracies for model ensembles of three models.
_T5_AVG = "averaged over three independently trained models (time and accuracies)"
_T5_EPS = "eps_train printed once for the two-row block; propagated"
_TABLE5 = (
    _block("Table 5", "Small CNN MNIST", "CNN-Cert", _MNIST9, entries=(
        _R("Double Margin", "0.2", 521.1, "95.5 95.5 95.2 94.2 93.5 91.7 81.3 0.0 0.0",
           note=_T5_AVG),
        _R("Double Margin Ensemble", "0.2", 1411.2,
           "95.5 95.5 95.5 95.5 94.5 93.5 85.5 0.0 0.0", note=_T5_EPS),
    )),
    _block("Table 5", "Small CNN CIFAR", "CNN-Cert", _PER255_9, entries=(
        _R("Double Margin", "8/255", 2517.3, "42.8 41.8 39.8 36.8 36.3 26.8 18.8 15.8 13.8",
           note=_T5_AVG),
        _R("Double Margin Ensemble", "8/255", 6566.2,
           "46.0 44.0 43.5 40.0 38.0 27.0 22.0 16.0 11.0", note=_T5_EPS),
    )),
)

# ---------------------------------------------------------------------------------------
# Table 6: CNN-Cert certified accuracies on GTSRB networks (200 points, Appendix I.3).
_T6_EPS = ("eps_train printed on the IBP row of each IBP / Double Margin pair; Appendix "
           "I.3 says both were trained at 2/255 and 8/255")
_TABLE6 = (
    _block("Table 6", "Pureconv CNN GTSRB", "CNN-Cert", _PER255_9, points=200, entries=(
        _R("Normal", None, 119.6, "92.0 77.5 57.5 37.0 35.0 6.5 1.0 0.0 0.0"),
        _R("IBP", "2/255", 289.3, "84.0 81.5 78.0 65.0 63.5 31.0 14.5 10.0 5.5"),
        _R("Double Margin", "2/255", 282.6, "83.0 80.0 77.5 68.5 67.0 43.5 27.5 22.0 16.5",
           note=_T6_EPS),
        _R("IBP", "8/255", 287.7, "64.0 63.0 62.0 58.5 57.0 44.5 31.5 26.0 22.0"),
        _R("Double Margin", "8/255", 283.1, "68.0 67.5 67.0 65.0 64.5 58.0 52.5 50.0 45.5",
           note=_T6_EPS),
    )),
)

# ---------------------------------------------------------------------------------------
# Table 7: CNN-Cert certified accuracies of every l_p version of Double Margin on every
# l_p norm (small CNN; eps_train 0.3 / 1 / 4 / 2 on MNIST, 8/255 / 0.2 / 2 / 2 on CIFAR).
def _t7(setting: str, columns: Tuple[str, ...], norm: str, eps: Tuple[str, str, str, str],
        times: Tuple[float, float, float, float], values: Tuple[str, str, str, str]
        ) -> Tuple[PaperRow, ...]:
  versions = ("linf", "l2", "l1", "l0")
  return _block("Table 7", setting, "CNN-Cert", columns, norm=norm, entries=tuple(
      _R(f"Double Margin {p}", e, t, v, train_norm=p)
      for p, e, t, v in zip(versions, eps, times, values)))


_T7_MNIST_EPS = ("0.3", "1", "4", "2")
_T7_MNIST_TIME = (609.7, 592.0, 593.7, 593.3)
_T7_CIFAR_EPS = ("8/255", "0.2", "2", "2")
_T7_CIFAR_TIME = (3058.8, 2969.9, 2975.4, 2991.7)
_TABLE7 = (
    _t7("Small CNN MNIST", _MNIST5, "linf", _T7_MNIST_EPS, _T7_MNIST_TIME, (
        "89.0 89.0 88.0 81.0 63.5",
        "68.5 61.5 50.0 22.5 1.5",
        "68.5 59.5 50.5 9.0 0.5",
        "86.0 76.0 57.5 4.0 0.0")),
    _t7("Small CNN MNIST", _cols("0 0.25 0.5 0.75 1"), "l2", _T7_MNIST_EPS, _T7_MNIST_TIME, (
        "89.0 84.5 0.0 0.0 0.0",
        "68.5 62.0 52.0 41.5 24.0",
        "68.5 61.0 51.5 34.0 9.0",
        "86.0 80.5 69.0 39.0 7.5")),
    _t7("Small CNN MNIST", _cols("0 1 2 3 4"), "l1", _T7_MNIST_EPS, _T7_MNIST_TIME, (
        "89.0 0.0 0.0 0.0 0.0",
        "68.5 60.5 39.0 0.0 0.0",
        "68.5 62.5 53.0 35.5 11.0",
        "86.0 81.0 69.0 39.5 6.5")),
    _t7("Small CNN MNIST", _cols("0 1 2 3 4"), "l0", _T7_MNIST_EPS, _T7_MNIST_TIME, (
        "89.0 89.0 89.0 89.0 89.0",
        "68.5 68.5 68.5 68.5 68.5",
        "68.5 68.5 68.5 68.5 67.5",
        "86.0 85.5 84.0 82.0 60.5")),
    _t7("Small CNN CIFAR", _PER255_5, "linf", _T7_CIFAR_EPS, _T7_CIFAR_TIME, (
        "42.5 40.0 35.0 31.0 20.5",
        "35.0 32.5 27.5 25.5 17.5",
        "30.0 28.5 24.5 20.5 19.5",
        "28.0 27.0 25.0 22.5 19.5")),
    _t7("Small CNN CIFAR", _cols("0 0.05 0.1 0.15 0.2"), "l2", _T7_CIFAR_EPS, _T7_CIFAR_TIME, (
        "42.5 33.5 18.5 3.5 0.0",
        "35.0 33.0 31.5 28.0 26.5",
        "30.0 28.5 27.0 26.0 23.5",
        "28.0 27.0 26.5 25.0 24.0")),
    _t7("Small CNN CIFAR", _cols("0 0.5 1 1.5 2"), "l1", _T7_CIFAR_EPS, _T7_CIFAR_TIME, (
        "42.5 0.0 0.0 0.0 0.0",
        "35.0 31.5 28.0 24.0 20.0",
        "30.0 28.5 27.0 23.5 22.5",
        "28.0 27.5 26.0 24.0 23.5")),
    _t7("Small CNN CIFAR", _cols("0 1 2 3 4"), "l0", _T7_CIFAR_EPS, _T7_CIFAR_TIME, (
        "42.5 42.5 42.5 42.5 42.5",
        "35.0 35.0 35.0 34.5 34.0",
        "30.0 30.0 30.0 29.0 27.5",
        "28.0 27.5 27.5 26.0 24.0")),
)

# ---------------------------------------------------------------------------------------
# Table 8: CNN-Cert certified accuracies on all MNIST networks (medium CNN: 20 points).
_POOL_RES_GROUPS = ("eps_train printed on the ReLU Stability row of each four-row group "
                    "(Adv. Training, IBP, ReLU Stability, Double Margin); propagated")
_MED_PAIR = ("eps_train printed once per IBP / Double Margin pair; pairs matched to "
             "Table 11 by training time; propagated")
_TABLE8 = (
    _block("Table 8", "Small CNN MNIST", "CNN-Cert", _MNIST9, entries=(
        _R("Normal", None, 185.7, "98.5 9.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("Weight Regularization", None, 626.3, "99.5 81.0 1.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        # eps_train = 0.1 group (label on its L1+RS+Pruning row).
        _R("Adv. Training", "0.1", 8873.6, "100.0 97.0 91.0 0.5 0.0 0.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Bounded", "0.1", 27994.8, "48.5 48.5 48.5 48.5 48.0 48.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("IBP", "0.1", 613.1, "99.5 99.5 99.0 98.0 96.5 83.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("ReLU Stability", "0.1", 602.3, "97.5 89.5 40.5 1.5 0.0 0.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("L1+RS+Pruning", "0.1", 686.7, "98.0 90.0 34.5 1.5 0.0 0.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Adv+RS+Pruning", "0.1", 9710.9, "98.5 96.5 92.0 84.5 75.0 54.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Double Margin", "0.1", 520.0, "98.5 98.5 97.0 96.5 96.5 95.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Double Margin +L1", "0.1", 545.5, "98.5 98.5 97.5 97.0 96.5 95.5 0.0 0.0 0.0",
           note=_GROUP_EPS),
        # eps_train = 0.2 group.
        _R("Adv. Training", "0.2", 8786.8, "99.0 98.5 91.0 38.0 0.5 0.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Bounded", "0.2", 27999.5, "77.5 77.5 77.5 77.5 77.5 77.5 75.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("IBP", "0.2", 614.0, "97.5 97.5 97.0 96.5 96.0 78.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("ReLU Stability", "0.2", 592.6, "95.0 90.0 59.0 12.5 0.5 0.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("L1+RS+Pruning", "0.2", 684.8, "95.0 89.5 55.5 10.5 1.0 0.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Adv+RS+Pruning", "0.2", 9669.4, "93.0 92.0 86.5 80.0 63.5 46.0 3.5 0.0 0.0",
           note=_GROUP_EPS),
        _R("Double Margin", "0.2", 518.8, "95.0 94.5 94.0 93.0 92.5 92.5 81.5 0.0 0.0",
           note=_GROUP_EPS),
        _R("Double Margin +L1", "0.2", 546.1, "95.5 95.0 95.0 95.0 95.0 93.5 82.0 0.0 0.0",
           note=_GROUP_EPS),
        # eps_train = 0.3 group (the rows of Table 2's 200-point MNIST block).
        _R("Adv. Training", "0.3", 8760.5, "99.5 98.5 91.5 38.5 1.0 0.0 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Bounded", "0.3", 27966.8, "30.0 30.0 30.0 30.0 30.0 29.5 28.5 25.0 0.0",
           note=_GROUP_EPS),
        _R("IBP", "0.3", 611.2, "95.5 95.5 95.5 90.5 76.5 39.5 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("ReLU Stability", "0.3", 595.8, "94.0 90.0 65.0 23.0 5.0 0.5 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("L1+RS+Pruning", "0.3", 686.5, "95.0 88.0 53.5 13.5 3.0 0.5 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Adv+RS+Pruning", "0.3", 9657.1, "90.0 86.5 70.5 55.0 30.5 13.5 0.0 0.0 0.0",
           note=_GROUP_EPS),
        _R("Double Margin", "0.3", 520.0, "90.0 89.0 88.5 88.0 87.5 86.5 80.0 66.5 0.0",
           note=_GROUP_EPS),
        _R("Double Margin +L1", "0.3", 547.1, "91.0 90.5 90.0 89.5 89.0 87.5 83.5 68.0 0.0",
           note=_GROUP_EPS),
    )),
    _block("Table 8", "Medium CNN MNIST", "CNN-Cert", _MNIST9, points=20, entries=(
        _R("Normal", None, 387.4, "100 0 0 0 0 0 0 0 0"),
        _R("IBP", "0.1", 1553.6, "100 100 100 100 90 85 0 0 0", note=_MED_PAIR),
        _R("Double Margin", "0.1", 1360.4, "100 100 100 100 100 100 0 0 0", note=_MED_PAIR),
        _R("IBP", "0.2", 1553.2, "100 100 100 95 80 40 0 0 0", note=_MED_PAIR),
        _R("Double Margin", "0.2", 1360.6, "100 100 100 100 100 100 90 0 0", note=_MED_PAIR),
        _R("IBP", "0.3", 1550.6, "100 100 100 100 90 50 0 0 0", note=_MED_PAIR),
        _R("Double Margin", "0.3", 1362.3, "90 90 90 90 90 90 90 80 0", note=_MED_PAIR),
    )),
    _block("Table 8", "Pooling CNN MNIST", "CNN-Cert", _MNIST9, entries=(
        _R("Normal", None, 226.0, "99.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_INTERLEAVED + " (Normal / Weight Regularization)"),
        _R("Weight Regularization", None, 145.1, "99.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_INTERLEAVED + " (Normal / Weight Regularization)"),
        _R("Adv. Training", "0.1", 7747.8, "99.5 98.5 4.5 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("IBP", "0.1", 1075.6, "98.0 92.0 77.5 64.5 40.5 1.0 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("ReLU Stability", "0.1", 337.3, "98.5 87.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("Double Margin", "0.1", 1070.3, "97.5 95.0 86.0 80.0 73.0 55.5 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("Adv. Training", "0.2", 7573.4, "99.5 98.5 16.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("IBP", "0.2", 1082.8, "96.0 78.0 63.5 51.0 39.0 20.0 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("ReLU Stability", "0.2", 336.7, "97.0 90.0 4.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("Double Margin", "0.2", 680.5, "94.5 94.0 93.0 91.5 89.0 82.5 4.5 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("Adv. Training", "0.3", 7518.9, "99.5 97.5 23.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("IBP", "0.3", 395.4, "95.0 76.5 56.0 44.0 33.5 13.5 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("ReLU Stability", "0.3", 337.5, "97.0 88.5 13.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("Double Margin", "0.3", 408.0, "88.0 88.0 87.5 86.5 85.0 81.5 43.0 0.5 0.0",
           note=_POOL_RES_GROUPS),
    )),
    _block("Table 8", "Resnet CNN MNIST", "CNN-Cert", _MNIST9,
           note="block heading printed '1-Resnet CNN MNIST, 4 layer'", entries=(
        _R("Normal", None, 210.1, "98.5 2.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_INTERLEAVED + " (Normal / Weight Regularization)"),
        _R("Weight Regularization", None, 145.1, "99.0 51.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_INTERLEAVED + " (Normal / Weight Regularization)"),
        _R("Adv. Training", "0.1", 7705.8, "99.0 97.5 93.5 22.5 0.0 0.0 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("IBP", "0.1", 600.2, "99.0 95.5 94.5 90.5 87.5 81.0 3.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("ReLU Stability", "0.1", 318.4, "93.0 85.5 58.5 25.5 9.0 1.5 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("Double Margin", "0.1", 629.3, "98.0 80.5 77.0 74.5 70.0 65.5 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("Adv. Training", "0.2", 7554.4, "98.0 98.0 95.0 69.0 9.5 0.0 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("IBP", "0.2", 593.3, "97.5 62.0 57.0 52.0 50.0 45.0 10.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("ReLU Stability", "0.2", 317.8, "93.0 85.5 67.0 34.5 17.0 2.5 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("Double Margin", "0.2", 630.0, "95.0 52.0 51.5 50.5 50.0 46.0 28.5 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("Adv. Training", "0.3", 7583.4, "99.0 97.5 94.5 73.0 17.0 0.0 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("IBP", "0.3", 600.3, "96.5 73.5 69.0 63.5 57.5 51.0 13.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("ReLU Stability", "0.3", 319.0, "93.0 86.0 70.5 40.0 19.5 4.5 0.0 0.0 0.0",
           note=_POOL_RES_GROUPS),
        _R("Double Margin", "0.3", 630.4, "92.5 77.0 77.0 75.5 75.0 74.5 62.5 46.0 0.0",
           note=_POOL_RES_GROUPS),
    )),
)

# ---------------------------------------------------------------------------------------
# Table 9: CNN-Cert certified accuracies on all CIFAR networks (medium CNN: 20 points).
_CIFAR_GROUPS = "eps_train printed on one row of its group (IBP or ReLU Stability); propagated"
_TABLE9 = (
    _block("Table 9", "Small CNN CIFAR", "CNN-Cert", _PER255_9, entries=(
        _R("Normal", None, 141.1, "61.5 22.0 1.5 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("Weight Regularization", None, 1062.8, "58.0 24.0 2.5 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("Adv. Training", "2/255", 51203.7, "57.5 24.5 1.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_CIFAR_GROUPS),
        _R("Bounded", "2/255", 22351.6, "0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_CIFAR_GROUPS),
        _R("IBP", "2/255", 394.8, "47.0 37.5 22.0 3.5 3.5 1.0 0.0 0.0 0.0",
           note=_CIFAR_GROUPS),
        _R("ReLU Stability", "2/255", 409.4, "12.0 12.0 12.0 12.0 12.0 12.0 12.0 12.0 12.0",
           note=_CIFAR_GROUPS),
        _R("Double Margin", "2/255", 394.5, "45.0 40.0 34.0 25.5 24.0 2.5 0.5 0.5 0.5",
           note=_CIFAR_GROUPS),
        _R("Adv. Training", "8/255", 51893.6, "60.5 25.0 2.5 0.0 0.0 0.0 0.0 0.0 0.0",
           note=(_CIFAR_GROUPS + "; printed '25%' at 1/255 and '00%' / '~0.0%' at 3/255 "
                 "and above, read as 2.5% and 0.0% as in Table 2")),
        _R("Bounded", "8/255", 21918.7, "4.0 4.0 4.0 4.0 4.0 4.0 3.5 3.5 3.5",
           note=_CIFAR_GROUPS),
        _R("IBP", "8/255", 410.0, "37.5 35.0 32.5 20.0 17.5 2.5 0.0 0.0 0.0",
           note=_CIFAR_GROUPS),
        _R("ReLU Stability", "8/255", 396.1, "12.0 12.0 12.0 12.0 12.0 12.0 12.0 12.0 12.0",
           note=_CIFAR_GROUPS),
        _R("Double Margin", "8/255", 409.7, "45.5 45.0 43.5 40.5 39.5 28.0 22.5 19.5 15.0",
           note=_CIFAR_GROUPS),
    )),
    _block("Table 9", "Medium CNN CIFAR", "CNN-Cert", _PER255_9, points=20, entries=(
        _R("Normal", None, 1778.3, "50.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("IBP", "2/255", 6613.4, "50.0 35.0 20.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_MED_PAIR + "; printed '00%' / '~0.0%' from 2/255 on, read as 0.0%"),
        _R("Double Margin", "2/255", 5770.2, "35.0 25.0 15.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_MED_PAIR),
        _R("IBP", "8/255", 6598.8, "20.0 15.0 15.0 10.0 10.0 0.0 0.0 0.0 0.0",
           note=_MED_PAIR + "; printed '00%' / '~0.0%' from 5/255 on, read as 0.0%"),
        _R("Double Margin", "8/255", 5762.2, "25.0 25.0 25.0 25.0 25.0 25.0 20.0 10.0 10.0",
           note=_MED_PAIR),
    )),
    _block("Table 9", "Pooling CNN CIFAR", "CNN-Cert", _PER255_9, entries=(
        _R("Normal", None, 1164.9, "65.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("Weight Regularization", None, 828.8, "59.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("IBP", "2/255", 4112.8, "52.0 24.0 16.0 6.0 4.0 0.0 0.0 0.0 0.0",
           note=_CIFAR_GROUPS),
        _R("ReLU Stability", "2/255", 1682.6, "60.5 1.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_CIFAR_GROUPS),
        _R("Double Margin", "2/255", 4091.4, "50.5 30.5 23.5 11.0 8.0 1.0 0.0 0.0 0.0",
           note=_CIFAR_GROUPS),
        _R("IBP", "8/255", 4015.1, "43.0 15.5 8.5 3.0 3.0 0.0 0.0 0.0 0.0",
           note=_CIFAR_GROUPS),
        _R("ReLU Stability", "8/255", 1676.9, "58.5 8.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
           note=_CIFAR_GROUPS),
        _R("Double Margin", "8/255", 2899.5, "40.0 32.5 30.5 24.0 23.5 5.0 1.0 1.0 0.5",
           note=_CIFAR_GROUPS),
    )),
    _block("Table 9", "Resnet CNN CIFAR", "CNN-Cert", _PER255_9,
           note="block heading printed 'I-Resnet CNN CIFAR, 4 layer'", entries=(
        _R("Normal", None, 1153.7, "52.5 4.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("Weight Regularization", None, 847.3, "58.0 3.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("IBP", "2/255", 3700.3, "48.5 8.0 6.0 2.0 2.0 0.0 0.0 0.0 0.0",
           note=_CIFAR_GROUPS),
        _R("ReLU Stability", "2/255", 1592.6, "37.5 4.0 4.0 4.0 4.0 0.0 0.0 0.0 0.0",
           note=_CIFAR_GROUPS),
        _R("Double Margin", "2/255", 3393.9, "48.5 9.0 8.0 4.0 4.0 1.5 0.5 0.5 0.5",
           note=_CIFAR_GROUPS),
        _R("IBP", "8/255", 3421.6, "42.5 2.5 2.0 1.0 1.0 0.0 0.0 0.0 0.0",
           note=_CIFAR_GROUPS),
        _R("ReLU Stability", "8/255", 1594.4, "40.0 1.0 1.0 1.0 1.0 1.0 0.5 0.5 0.0",
           note=_CIFAR_GROUPS),
        _R("Double Margin", "8/255", 3531.5, "35.0 4.0 4.0 4.0 4.0 4.0 3.5 3.5 3.5",
           note=_CIFAR_GROUPS),
    )),
)

# ---------------------------------------------------------------------------------------
# Table 10: CNN-Cert certified accuracies on the entire test set (10,000 points each).
_T10 = "points: the entire test set"
_TABLE10 = (
    _block("Table 10", "Small CNN MNIST", "CNN-Cert", _MNIST9, points=10000, note=_T10,
           entries=(
        _R("Double Margin", "0.2", 518.8,
           "93.44 93.15 92.61 92.06 91.30 89.63 78.55 0.00 0.00",
           note="clean accuracy printed ',93.44%' (stray comma)"),
    )),
    _block("Table 10", "Small CNN CIFAR", "CNN-Cert", _PER255_9, points=10000, note=_T10,
           entries=(
        _R("Double Margin", "8/255", 409.7,
           "- 41.71 40.58 37.72 37.25 28.44 22.39 19.06 16.35",
           note=("clean accuracy garbled as '.3.00%' (probably 43.00%, which must be at "
                 "least the 41.71% at 0.5/255); left None")),
    )),
)

# ---------------------------------------------------------------------------------------
# Table 11: certified accuracies for large and medium CNN models computed using IBP.
_L_PAIR = "eps_train printed once per IBP / Double Margin pair; propagated"
_TABLE11 = (
    _block("Table 11", "Medium CNN MNIST", "IBP", _MNIST9, entries=(
        _R("Normal", None, 387.4, "99.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("IBP", "0.1", 1553.6, "98.5 98.5 98.5 98.5 97.5 96.5 0.0 0.0 0.0",
           note="printed '00%' from 0.2 on, read as 0.0%"),
        _R("Double Margin", "0.1", 1360.4, "97.5 97.5 97.5 97.0 96.5 96.5 0.0 0.0 0.0",
           note=_L_PAIR),
        _R("IBP", "0.2", 1553.2, "98.5 98.5 98.5 98.0 98.0 97.0 94.0 0.0 0.0"),
        _R("Double Margin", "0.2", 1360.6, "95.0 95.0 94.5 94.5 94.0 93.5 89.5 0.0 0.0",
           note=_L_PAIR),
        _R("IBP", "0.3", 1550.6, "97.5 97.5 97.5 97.5 96.5 95.5 94.0 90.0 0.0",
           note="printed '00%' at 0.4, read as 0.0%"),
        _R("Double Margin", "0.3", 1362.3, "90.5 90.5 88.5 87.5 87.5 87.0 83.5 79.5 0.0",
           note=_L_PAIR),
    )),
    _block("Table 11", "Large CNN MNIST", "IBP", _MNIST9, entries=(
        _R("Normal", None, 930.6, "99.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("IBP", "0.1", 4162.8, "98.0 98.0 98.0 98.0 97.0 95.0 0.0 0.0 0.0",
           note="printed '00%' from 0.2 on, read as 0.0%"),
        _R("Double Margin", "0.1", 3742.5, "98.5 98.5 98.0 98.0 98.0 97.0 0.0 0.0 0.0",
           note=_L_PAIR),
        _R("IBP", "0.2", 4162.3, "98.5 98.5 98.5 98.5 97.5 97.5 93.5 0.0 0.0"),
        _R("Double Margin", "0.2", 3740.2, "97.5 97.0 96.5 96.5 96.5 96.5 95.5 0.0 0.0",
           note=_L_PAIR),
        _R("IBP", "0.3", 4161.4, "98.5 98.0 97.5 97.5 97.5 97.5 94.5 91.0 0.0",
           note="printed '00%' at 0.4, read as 0.0%"),
        _R("Double Margin", "0.3", 3739.2, "93.0 93.0 92.5 92.5 92.0 91.0 84.5 0.0 0.0",
           note=_L_PAIR),
    )),
    _block("Table 11", "Medium CNN CIFAR", "IBP", _PER255_9, entries=(
        _R("Normal", None, 1778.3, "61.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("IBP", "2/255", 6613.4, "45.5 36.5 27.0 11.0 9.5 0.0 0.0 0.0 0.0",
           note=("printed '95%' at 3/255, read as 9.5% (between 11.0% and 0.0%); '00%' "
                 "from 7/255 on read as 0.0%; " + _L_PAIR)),
        _R("Double Margin", "2/255", 5770.2, "45.0 37.0 24.5 10.5 8.0 0.5 0.0 0.0 0.0",
           note=_L_PAIR),
        _R("IBP", "8/255", 6598.8, "24.5 24.5 23.0 21.5 21.5 18.5 13.5 12.0 10.5",
           note=_L_PAIR),
        _R("Double Margin", "8/255", 5762.2, "33.5 33.0 32.5 31.5 31.5 25.0 18.5 16.0 13.5",
           note=_L_PAIR),
    )),
    _block("Table 11", "Large CNN CIFAR", "IBP", _PER255_9, entries=(
        _R("Normal", None, 4020.6, "65.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"),
        _R("IBP", "2/255", 17260.8, "45.5 33.5 23.5 10.0 8.0 0.5 0.0 0.0 0.0",
           note=_L_PAIR),
        _R("Double Margin", "2/255", 15141.5, "43.5 33.0 25.5 9.5 9.0 2.0 1.0 0.5 0.0",
           note=_L_PAIR),
        _R("IBP", "8/255", 17262.3, "27.0 27.0 26.5 25.0 25.0 23.5 23.0 22.5 21.0",
           note="training time printed '-17262.3' (stray dash); " + _L_PAIR),
        _R("Double Margin", "8/255", 15131.7, "16.5 15.5 15.0 15.0 15.0 14.5 14.5 14.5 14.5",
           note=_L_PAIR),
    )),
)

# ---------------------------------------------------------------------------------------
# Tables 13-16: certifier comparison (Appendix K.1), 200 points, no training times.
def _k(table: str, certifier: str, mnist: Sequence[str], cifar: Sequence[str]
       ) -> Tuple[PaperRow, ...]:
  """mnist: Normal, Weight Reg., Adv. Training, IBP, ReLU Stability, L1+RS+Pruning, DM;
  cifar: Normal, Weight Reg., Adv. Training, IBP, DM (percent strings)."""
  m_methods = ("Normal", "Weight Regularization", "Adv. Training", "IBP", "ReLU Stability",
               "L1+RS+Pruning", "Double Margin")
  c_methods = ("Normal", "Weight Regularization", "Adv. Training", "IBP", "Double Margin")
  m_rows = tuple(
      _R(m, None if i < 2 else "0.3", None, v, note="" if i < 2 else _GROUP_EPS)
      for i, (m, v) in enumerate(zip(m_methods, mnist, strict=True)))
  c_rows = tuple(
      _R(m, None if i < 2 else "8/255", None, v, note="" if i < 2 else _GROUP_EPS)
      for i, (m, v) in enumerate(zip(c_methods, cifar, strict=True)))
  return (_block(table, "Small CNN MNIST", certifier, _MNIST9, points=200, entries=m_rows)
          + _block(table, "Small CNN CIFAR", certifier, _PER255_9, points=200,
                   entries=c_rows))


_TABLE13 = _k("Table 13", "CNN-Cert-Ada", (
    "99.5 15.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "99.5 88.5 2.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "98.5 96.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "95.5 95.5 95.0 92.5 87.0 68.0 9.5 0.0 0.0",
    "94.0 90.0 65.0 23.0 5.0 0.5 0.0 0.0 0.0",
    "95.0 88.0 53.5 13.5 3.0 0.5 0.0 0.0 0.0",
    "91.5 91.0 90.5 90.0 88.5 87.0 77.0 67.0 0.0",
), (
    "53.5 28.5 5.5 0.0 0.0 0.0 0.0 0.0 0.0",
    "60.5 26.5 3.5 0.0 0.0 0.0 0.0 0.0 0.0",
    "57.0 27.0 3.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "47.5 44.5 41.5 35.5 35.0 18.5 8.5 5.5 3.5",
    "41.0 40.0 39.0 36.0 35.5 29.0 21.5 19.0 16.0",
))

_TABLE14 = _k("Table 14", "CNN-Cert-ReLU", (
    "99.5 5.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "99.5 81.0 1.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "98.5 95.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "95.5 95.5 95.5 93.5 85.0 45.5 0.0 0.0 0.0",
    "94.0 90.0 65.0 23.0 5.0 0.5 0.0 0.0 0.0",
    "95.0 88.0 53.5 13.5 3.0 0.5 0.0 0.0 0.0",
    "91.5 91.0 90.5 90.0 88.0 87.0 77.5 66.0 0.0",
), (
    "60.5 23.5 2.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "57.0 24.0 1.5 0.0 0.0 0.0 0.0 0.0 0.0",
    "53.5 25.0 4.5 0.0 0.0 0.0 0.0 0.0 0.0",
    "47.5 44.5 41.5 35.0 34.0 16.5 4.5 3.0 1.5",
    "41.0 40.0 39.0 36.0 35.5 29.5 20.0 17.5 15.0",
))

_TABLE15 = _k("Table 15", "CNN-Cert-Zero", (
    "99.5 11.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "99.5 85.0 1.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "98.5 95.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "95.5 95.5 95.5 95.5 95.5 95.5 93.5 86.5 0.0",
    "94.0 90.0 65.0 23.0 5.0 0.5 0.0 0.0 0.0",
    "95.0 87.5 53.5 13.0 3.0 0.5 0.0 0.0 0.0",
    "91.5 91.0 90.5 90.5 88.5 87.0 82.0 75.5 0.0",
), (
    "53.5 23.0 3.5 0.0 0.0 0.0 0.0 0.0 0.0",
    "60.5 15.5 1.5 0.0 0.0 0.0 0.0 0.0 0.0",
    "57.0 20.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "47.5 44.5 41.5 36.5 36.0 26.0 19.5 17.5 14.5",
    "41.0 40.0 39.5 36.5 35.5 30.5 25.0 21.0 19.5",
))

_TABLE16 = _k("Table 16", "IBP", (
    "99.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "99.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "98.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "95.5 95.5 95.5 95.5 95.5 95.5 93.5 86.5 0.0",
    "94.0 33.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "95.0 44.0 0.5 0.0 0.0 0.0 0.0 0.0 0.0",
    "91.5 91.0 90.5 90.5 88.5 87.0 81.0 75.5 0.0",
), (
    "53.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "60.5 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "57.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0",
    "47.5 44.5 41.5 36.0 36.0 25.5 18.5 16.5 14.0",
    "41.0 40.0 39.0 35.0 35.0 29.5 20.5 18.5 16.5",
))


def _flatten(blocks: Iterable[Tuple[PaperRow, ...]]) -> Tuple[PaperRow, ...]:
  return tuple(r for block in blocks for r in block)


PAPER: Tuple[PaperRow, ...] = _flatten(
    _TABLE2 + _TABLE4 + _TABLE5 + _TABLE6 + _TABLE7 + _TABLE8 + _TABLE9 + _TABLE10
    + _TABLE11 + (_TABLE13, _TABLE14, _TABLE15, _TABLE16))


def rows(table: Optional[str] = None, setting: Optional[str] = None,
         certifier: Optional[str] = None, norm: Optional[str] = None,
         method: Optional[str] = None) -> List[PaperRow]:
  """The rows matching every given field exactly (None = any), in the paper's order."""
  want = {"table": table, "setting": setting, "certifier": certifier, "norm": norm,
          "method": method}
  return [r for r in PAPER
          if all(v is None or getattr(r, k) == v for k, v in want.items())]


def value(row: PaperRow, column: Union[str, float]) -> Optional[float]:
  """The row's certified accuracy at a column: its label ("0.3", "8/255"), or a radius as
  a number (matched through :func:`eps_value`, to 1e-9). KeyError if the row lacks it."""
  if isinstance(column, str):
    if column in row.columns:
      return row.values[row.columns.index(column)]
    target = eps_value(column)
  else:
    target = float(column)
  for label, v in zip(row.columns, row.values):
    if abs(eps_value(label) - target) <= 1e-9:
      return v
  raise KeyError(f"{row.table} {row.setting} {row.method}: no column {column!r}; "
                 f"has {row.columns}")
