"""The transcribed paper tables (experiments/paper_numbers.py): shape, sanity, spot checks.

Plain loops rather than ``pytest.mark.parametrize`` over rows: conftest.py runs only the
first case of a parametrised test by default, and every row must be checked.
"""
from __future__ import annotations

from typing import Dict, Tuple

import pytest

from experiments import paper_numbers as pn
from experiments.paper_numbers import PAPER, eps_value, rows, value

CERTIFIERS = {"CNN-Cert", "CNN-Cert-Ada", "CNN-Cert-ReLU", "CNN-Cert-Zero", "IBP"}
NORMS = {"linf", "l2", "l1", "l0"}

# Rows where the paper itself prints a certified accuracy that rises with the radius:
# (table, setting, method, eps_train, points). None found in the tables transcribed; an
# entry here must say why (e.g. the paper's own typo) rather than loosen the check.
PRINTED_INCREASES: frozenset = frozenset()


def _one(**kw) -> pn.PaperRow:
  eps = kw.pop("eps_train", "any")
  points = kw.pop("points", "any")
  found = [r for r in rows(**kw)
           if (eps == "any" or r.eps_train == eps) and (points == "any" or r.points == points)]
  assert len(found) == 1, (kw, eps, points, [r.key for r in found])
  return found[0]


def test_rows_are_well_formed():
  assert len(PAPER) > 200
  for r in PAPER:
    assert r.columns, r.key
    assert len(r.values) == len(r.columns), r.key
    if r.std is not None:
      assert len(r.std) == len(r.columns), r.key
      assert all(s is None or 0.0 <= s <= 1.0 for s in r.std), r.key
    assert all(v is None or 0.0 <= v <= 1.0 for v in r.values), r.key
    assert any(v is not None for v in r.values), r.key
    assert r.certifier in CERTIFIERS, r.key
    assert r.norm in NORMS and r.train_norm in NORMS, r.key
    assert r.table.startswith("Table "), r.key
    assert r.points is None or r.points > 0, r.key
    assert r.train_time_s is None or r.train_time_s > 0, r.key
    assert r.columns[0] == "0", r.key  # every block starts with clean accuracy
    if r.eps_train is not None:
      assert eps_value(r.eps_train) > 0, r.key


def test_columns_increase():
  for r in PAPER:
    radii = [eps_value(c) for c in r.columns]
    assert all(b > a for a, b in zip(radii, radii[1:])), (r.key, r.columns)


def test_certified_accuracy_never_rises_with_the_radius():
  # Every certifier in these tables (CNN-Cert variants, IBP) is sound, and a point
  # certified at a radius is certified at every smaller one.
  for r in PAPER:
    known = [v for v in r.values if v is not None]
    rises = any(b > a for a, b in zip(known, known[1:]))
    ident = (r.table, r.setting, r.method, r.eps_train, r.points)
    assert rises == (ident in PRINTED_INCREASES), (r.key, r.values)


def test_keys_are_unique():
  seen: Dict[Tuple, pn.PaperRow] = {}
  for r in PAPER:
    assert r.key not in seen, r.key
    seen[r.key] = r


def test_row_counts_per_table():
  counts: Dict[str, int] = {}
  for r in PAPER:
    counts[r.table] = counts.get(r.table, 0) + 1
  assert counts == {"Table 2": 42, "Table 4": 14, "Table 5": 4, "Table 6": 5, "Table 7": 32,
                    "Table 8": 61, "Table 9": 33, "Table 10": 2, "Table 11": 24,
                    "Table 13": 12, "Table 14": 12, "Table 15": 12, "Table 16": 12}


def test_eps_value():
  assert eps_value("8/255") == 8 / 255
  assert eps_value("0.5/255") == 0.5 / 255
  assert eps_value("0.3") == 0.3
  assert eps_value("0") == 0.0
  assert eps_value("2") == 2.0


def test_rows_and_value_helpers():
  assert len(rows()) == len(PAPER)
  assert all(r.table == "Table 16" for r in rows(table="Table 16"))
  assert rows(table="Table 99") == []
  assert {r.norm for r in rows(table="Table 7")} == NORMS
  dm = _one(table="Table 2", setting="Small CNN MNIST", method="Double Margin", points=200)
  assert value(dm, "0.3") == value(dm, 0.3) == 0.665
  cifar = _one(table="Table 2", setting="Small CNN CIFAR", method="Double Margin", points=200)
  assert value(cifar, "8/255") == value(cifar, 8 / 255) == 0.195
  with pytest.raises(KeyError):
    value(dm, "0.25")


def test_spec_headline_rows():
  # SPEC.md "Headline results": Table 2's DM row, 90.0 / 86.5 / 80.0 / 66.5 at 0 / .1 / .2 / .3.
  dm = _one(table="Table 2", setting="Small CNN MNIST", method="Double Margin", points=200)
  assert (dm.eps_train, dm.certifier, dm.norm) == ("0.3", "CNN-Cert", "linf")
  assert [value(dm, c) for c in ("0", "0.1", "0.2", "0.3")] == [0.90, 0.865, 0.80, 0.665]
  assert dm.train_time_s == 520.0
  assert len(dm.columns) == 9 and dm.columns[-1] == "0.4" and value(dm, "0.4") == 0.0


def test_spot_checks():
  # Table 2, 1000-point MNIST block with stds; the prose's "60.4 vs 0.0% on MNIST".
  star = _one(table="Table 2", setting="Small CNN MNIST", method="Double Margin *")
  assert star.points == 1000 and star.columns == ("0", "0.05", "0.1", "0.2", "0.3")
  assert star.values == (0.911, 0.901, 0.876, 0.784, 0.604)
  assert star.std == (0.026, 0.029, 0.032, 0.039, 0.047)
  ibp = _one(table="Table 2", setting="Small CNN MNIST", method="IBP", points=1000)
  assert value(ibp, "0.3") == 0.0 and ibp.std[2] == 0.051
  # "46.4 vs 26.8% on GTSRB"; MMR at 500 points.
  gtsrb = {r.method: r for r in rows(table="Table 2", setting="Pureconv CNN GTSRB")
           if r.points == 500}
  assert value(gtsrb["Double Margin *"], "8/255") == 0.464
  assert value(gtsrb["IBP *"], "8/255") == 0.268
  assert value(gtsrb["MMR (4 epochs)"], "0") == 0.882
  assert gtsrb["MMR (4 epochs)"].train_time_s == 85377.2
  # Table 16 (IBP certifier).
  t16 = _one(table="Table 16", setting="Small CNN MNIST", method="IBP")
  assert t16.certifier == "IBP" and t16.train_time_s is None and t16.points == 200
  assert value(t16, "0.3") == 0.865 and value(t16, "0.4") == 0.0
  rs = _one(table="Table 16", setting="Small CNN MNIST", method="ReLU Stability")
  assert rs.values[:3] == (0.94, 0.33, 0.0)
  assert value(_one(table="Table 13", setting="Small CNN CIFAR", method="IBP"),
               "9/255") == 0.035
  # Table 4, l0 threat model.
  l0 = _one(table="Table 4", setting="Small CNN MNIST", method="Double Margin l0", norm="l0")
  assert (l0.train_norm, l0.eps_train, l0.columns) == ("l0", "2", ("0", "1", "2", "3", "4"))
  assert l0.values == (0.86, 0.855, 0.84, 0.82, 0.605)
  linf = _one(table="Table 4", setting="Small CNN CIFAR", method="Double Margin linf",
              norm="l0")
  assert linf.values == (0.425,) * 5
  # Table 7, l2 version on l2.
  l2 = _one(table="Table 7", setting="Small CNN CIFAR", method="Double Margin l2", norm="l2")
  assert l2.eps_train == "0.2" and value(l2, "0.2") == 0.265
  # Table 5 ensembles; Table 10 on the full test set.
  ens = _one(table="Table 5", setting="Small CNN CIFAR", method="Double Margin Ensemble")
  assert value(ens, "9/255") == 0.11 and ens.train_time_s == 6566.2
  full = _one(table="Table 10", setting="Small CNN MNIST", method="Double Margin")
  assert full.points == 10000 and value(full, "0.2") == 0.7855
  assert value(_one(table="Table 10", setting="Small CNN CIFAR"), "0") is None
  # Table 8, medium CNN over 20 points.
  med = _one(table="Table 8", setting="Medium CNN MNIST", method="Double Margin",
             eps_train="0.3")
  assert med.points == 20 and value(med, "0.3") == 0.8


def test_reconstructed_interleaved_rows():
  # "Normal Weight Regularization<TAB>1164.9 828.8<TAB>65.0% 59.0%<TAB>0.0% 0.0% ..."
  normal = _one(table="Table 2", setting="Pooling CNN CIFAR", method="Normal")
  wr = _one(table="Table 2", setting="Pooling CNN CIFAR", method="Weight Regularization")
  assert (normal.train_time_s, value(normal, "0")) == (1164.9, 0.65)
  assert (wr.train_time_s, value(wr, "0")) == (828.8, 0.59)
  # "IBP Double Margin<TAB>e = 8/255<TAB>287.7 283.1<TAB>64.0% 68.0% ..."
  dm = _one(table="Table 2", setting="Pureconv CNN GTSRB", method="Double Margin", points=200)
  assert dm.train_time_s == 283.1 and value(dm, "8/255") == 0.5 and value(dm, "0") == 0.68
  ibp = _one(table="Table 2", setting="Pureconv CNN GTSRB", method="IBP", points=200)
  assert ibp.train_time_s == 287.7 and value(ibp, "9/255") == 0.22
  # "Normal Weight Regularization<TAB>210.1 145.1<TAB>98.5% 99.0%<TAB>2.0% 51.0% ..."
  res_wr = _one(table="Table 8", setting="Resnet CNN MNIST", method="Weight Regularization")
  assert res_wr.values[:3] == (0.99, 0.51, 0.0) and res_wr.train_time_s == 145.1
  res_n = _one(table="Table 8", setting="Resnet CNN MNIST", method="Normal")
  assert res_n.values[:3] == (0.985, 0.02, 0.0) and res_n.train_time_s == 210.1
  for r in (normal, wr, dm, ibp, res_wr, res_n):
    assert "interleaved" in r.note


def _same(a: pn.PaperRow, b: pn.PaperRow):
  assert (a.columns, a.values, a.train_time_s, a.eps_train) == \
      (b.columns, b.values, b.train_time_s, b.eps_train), (a.key, b.key)


def test_rows_the_paper_repeats_agree():
  # Each table was typed separately; where the paper prints a row twice the two agree.
  for setting, table in (("Small CNN MNIST", "Table 8"), ("Small CNN CIFAR", "Table 9"),
                         ("Pooling CNN CIFAR", "Table 9")):
    block = [r for r in rows(table="Table 2", setting=setting) if r.points == 200]
    assert block
    for r in block:
      _same(r, _one(table=table, setting=setting, method=r.method, eps_train=r.eps_train))
  for r in [r for r in rows(table="Table 2", setting="Pureconv CNN GTSRB") if r.points == 200]:
    _same(r, _one(table="Table 6", method=r.method, eps_train=r.eps_train))
  # Table 4 repeats Table 7 (its l1 blocks with other radii labels, see their note).
  for r in rows(table="Table 4"):
    twin = _one(table="Table 7", setting=r.setting, method=r.method, norm=r.norm)
    assert (r.values, r.train_time_s, r.eps_train) == \
        (twin.values, twin.train_time_s, twin.eps_train), r.key
    assert (r.columns == twin.columns) == (r.norm != "l1"), r.key
  # The medium-CNN eps_train pairs of Tables 8, 9 match Table 11 by training time.
  for table, setting in (("Table 8", "Medium CNN MNIST"), ("Table 9", "Medium CNN CIFAR")):
    for r in rows(table=table, setting=setting):
      twin = _one(table="Table 11", setting=setting, method=r.method, eps_train=r.eps_train)
      assert twin.train_time_s == r.train_time_s, r.key
