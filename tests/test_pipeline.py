"""Tests of ``dm_jax.verify.pipeline``: certified, falsified or unknown per point.

Independent evidence for each claim of the pipeline:

1. certified: the pipeline's certified set equals the union of its certifier stages'
   certified sets, each certifier run on *all* points by ``certify`` (not through the
   pipeline); no falsified point is certified by any of them;
2. falsified: every falsified point has a counterexample that lies in the input set
   (checked here in float64 with numpy, not with dm_jax's ``contains``) and that the
   network misclassifies (a forward pass here); misclassified clean points are falsified
   by the clean stage with ``x`` itself;
3. complete with the MIP: on tiny nets no point stays unknown, and the pipeline agrees
   with ``mip.exact_margins`` run on its own;
4. the API: ``certify(method="pipeline")``, the table's rows, the text and CSV tables,
   argument errors; ``input_sets.contains`` / ``pull_inside`` on points at the set's
   float boundary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dm_jax.core.input_sets import contains, make_input_set, pull_inside
from dm_jax.verify import certify as C
from dm_jax.verify import mip
from dm_jax.verify import pipeline as P

import helpers as U
from test_certify import trained  # noqa: F401  (the module-scoped MNIST MLP fixture)


def _forward_check(apply_fn, params, x, y, eps, cex, norm, domain=None):
  """Float64 numpy membership and a forward pass: (inside (M,), misclassified (M,))."""
  d = (np.asarray(cex, np.float64) - np.asarray(x, np.float64)).reshape(len(y), -1)
  # The set's radius is the float32 eps (as every bound uses it), compared in float64.
  eps = np.broadcast_to(np.asarray(np.float32(eps), np.float64), (len(y),))
  size = {"linf": np.abs(d).max(1), "l2": np.sqrt((d * d).sum(1)),
          "l1": np.abs(d).sum(1)}[norm]
  inside = size <= eps
  if domain is not None:
    flat = np.asarray(cex, np.float64).reshape(len(y), -1)
    inside &= np.all((flat >= domain[0]) & (flat <= domain[1]), axis=1)
  pred = np.asarray(apply_fn(params, jnp.asarray(cex))).argmax(-1)
  return inside, pred != np.asarray(y)


def _certifier_stages(res):
  return [s for s in res.stages[1:] if s not in P.FALSIFIERS]


@pytest.mark.sweep  # heavy (10-25 s): CI's sweep tier, not the default (tests/conftest.py)
@pytest.mark.parametrize("norm,eps,domain", [("linf", 0.03, (0.0, 1.0)),
                                             ("linf", 0.03, None), ("l2", 0.3, None)])
def test_certified_union_and_falsified_counterexamples(trained, norm, eps, domain):
  apply_fn, params, x, y = trained
  n = x.shape[0]
  y = y.copy()
  y[:3] = (y[:3] + 1) % 10  # three misclassified points
  res = P.verify_points(apply_fn, params, x, y, eps, norm, domain=domain,
                        pgd=dict(steps=20, restarts=1), batch_size=n)
  assert res.stages == ("clean",) + P.DEFAULT_STAGES
  assert res.status.shape == res.stage.shape == res.margin_lower.shape == (n,)
  # Not vacuous: some points of each kind.
  assert res.certified.sum() >= 5 and (res.falsified & (res.stage > 0)).sum() >= 3, \
      res.summary()
  # 1. certified = union of the certifier stages, each run on every point.
  union = np.zeros(n, bool)
  first = np.full(n, -1)
  for s in _certifier_stages(res):
    c, low = C.certify(apply_fn, params, x, y, eps, norm, method=s, domain=domain,
                       batch_size=n)
    i = res.stages.index(s)
    first[(first < 0) & c] = i
    union |= c
    ran = (res.stage < 0) | (res.stage >= i)  # the points still undecided at stage s
    assert np.all(res.margin_lower[ran] >= low[ran] - 1e-5), s  # the best bound is kept
    assert not np.any(c & res.falsified), f"{s} certifies a falsified point"
  np.testing.assert_array_equal(res.certified, union)
  np.testing.assert_array_equal(res.stage[res.certified], first[res.certified])
  assert np.all(res.margin_lower[res.certified] > 0)
  # A lower bound of the minimum margin is below the margin at any point of the set.
  assert np.all(res.margin_lower <= res.margin_upper + 1e-5)
  # 2. falsified: a verified counterexample, inside the set, misclassified.
  fal = np.flatnonzero(res.falsified)
  inside, wrong = _forward_check(apply_fn, params, x[fal], y[fal], eps,
                                 res.counterexamples[fal], norm, domain)
  assert np.all(inside) and np.all(wrong)
  assert np.all(res.margin_upper[fal] <= 0)
  assert np.all(np.isnan(res.counterexamples[~res.falsified]))
  clean = np.asarray(apply_fn(params, jnp.asarray(x))).argmax(-1) != y
  assert np.all(res.falsified[clean]) and np.all(res.decided_by[clean] == "clean")
  np.testing.assert_array_equal(res.counterexamples[clean], x[clean])
  # The three outcomes partition the points; the counts add up.
  assert np.all(res.certified.astype(int) + res.falsified + res.unknown == 1)
  assert sum(res.decided.values()) == int(np.sum(~res.unknown))
  assert res.checked["clean"] == n and set(res.seconds) == set(res.stages)
  s = res.summary()
  assert s["certified"] + s["falsified"] + s["unknown"] == pytest.approx(1.0)




@pytest.mark.parametrize("norm,eps_list", [("linf", (0.6,)), ("l1", (0.3, 1.0)),
                                           ("linf", (0.3,))])
def test_tiny_net_with_mip_decides_every_point(norm, eps_list):
  """The MIP is complete: no point stays unknown, and the pipeline agrees with it."""
  model = U.TinyMLP()
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (10, 4)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(3), jnp.asarray(x[:1]))
  params = jax.tree_util.tree_map(  # non-zero biases: no exact ties at dead units
      lambda a: a + 0.05 * jnp.asarray(rng.normal(size=a.shape), a.dtype), params)
  y = np.asarray(model.apply(params, jnp.asarray(x))).argmax(-1)
  y[:1] = (y[:1] + 1) % 3
  stages = P.default_stages(norm) + ("mip",)
  seen = set()
  for eps in eps_list:
    res = P.verify_points(model.apply, params, x, y, eps, norm, stages=stages,
                          mip_time_limit=20.0, pgd=dict(steps=10))
    assert not np.any(res.unknown), res.summary()
    exact = mip.exact_margins(model.apply, params, jnp.asarray(x), y, eps, norm,
                              time_limit=20.0)
    np.testing.assert_array_equal(res.certified, exact.certified)
    np.testing.assert_array_equal(res.falsified, ~exact.certified)
    # The sound lower bound never exceeds the exact minimum.
    assert np.all(res.margin_lower <= exact.margin_lower + 1e-5)
    fal = np.flatnonzero(res.falsified)
    inside, wrong = _forward_check(model.apply, params, x[fal], y[fal], eps,
                                   res.counterexamples[fal], norm)
    assert np.all(inside) and np.all(wrong)
    seen |= set(res.decided_by)
  assert "mip" in seen  # the MIP decided something: the test is not vacuous


@pytest.mark.sweep  # heavy (15-40 s): CI's sweep tier, not the default (tests/conftest.py)
def test_certify_pipeline_and_table(trained):
  apply_fn, params, x, y = trained
  n = x.shape[0]
  grid = (0.0, 0.02, 0.06)
  opts = dict(pgd=dict(steps=10, restarts=1))
  kw = dict(norm="linf", progress=False, batch_size=n, domain=(0.0, 1.0))
  table = C.certified_accuracy_table(apply_fn, params, x, y, grid,
                                     methods=("ibp", "pipeline"), pipeline=opts, **kw)
  p = table["pipeline"]
  assert p["stages"] == ["clean"] + list(P.DEFAULT_STAGES)
  for i, e in enumerate(grid):
    cert, low = C.certify(apply_fn, params, x, y, e, "linf", method="pipeline",
                          domain=(0.0, 1.0), batch_size=n, pipeline=opts)
    assert table["rows"]["pipeline"][i] == pytest.approx(cert.mean())
    assert p["certified"][i] == pytest.approx(cert.mean())
    assert p["certified"][i] + p["falsified"][i] + p["unknown"][i] == pytest.approx(1.0)
    assert table["rows"]["best"][i] >= table["rows"]["pipeline"][i]
    assert table["rows"]["best"][i] <= 1 - p["falsified"][i] + 1e-9  # the honest bound
    assert cert.shape == low.shape == (n,)
  assert p["falsified"][0] == pytest.approx(1 - table["clean"])
  assert p["unknown"][0] == 0.0 and p["falsified"][2] > p["falsified"][0]
  assert p["reused"][1] >= round(n * (1 - table["clean"]))  # the clean counterexamples
  text = C.format_table(table)
  for needle in ("pipeline: certified", "pipeline: falsified", "pipeline: unknown",
                 "time per stage: clean"):
    assert needle in text, needle
  csv = C.table_to_csv(table)
  assert "pipeline_falsified," in csv and "pipeline_unknown," in csv
  # Monotone pass or not: the same certified row.
  full = C.certified_accuracy_table(apply_fn, params, x, y, grid, methods=("pipeline",),
                                    pipeline=opts, monotone=False, **kw)
  assert full["rows"]["pipeline"] == table["rows"]["pipeline"]


def test_bad_arguments(trained):
  apply_fn, params, x, y = trained
  x, y = x[:4], y[:4]
  for stages, norm in ((("crown", "nope"),), "linf"), ((("ibp", "ibp"),), "linf"), \
      ((("pgd",),), "l1"), ((("mip",),), "l2"), ((("pipeline",),), "linf"), \
      ((("clean",),), "linf"):
    with pytest.raises(ValueError):
      P.verify_points(apply_fn, params, x, y, 0.01, norm, stages=stages[0])
  with pytest.raises(ValueError, match="pgd settings"):
    P.verify_points(apply_fn, params, x, y, 0.01, pgd=dict(step=3))
  with pytest.raises(ValueError, match="certifiable"):
    P.verify_points(apply_fn, params, x, y, 0.01, certifiable=np.ones(3, bool))
  with pytest.raises(ValueError):
    P.verify_points(apply_fn, params, x, y, -0.1)
  with pytest.raises(ValueError, match="pipeline"):
    C.certify(apply_fn, params, x, y, 0.01, method="crown", pipeline=dict(stages=("ibp",)))
  with pytest.raises(ValueError, match="pipeline options"):
    C.certify(apply_fn, params, x, y, 0.01, method="pipeline", pipeline=dict(nope=1))
  assert P.check_stages("ibp, crown+ibp ,pgd", "linf") == ("ibp", "crown_intersect", "pgd")
  assert P.default_stages("l1") == ("ibp", "crown_ibp", "crown_intersect")
  assert C.canonical_certifier("Pipeline") == "pipeline"


@pytest.mark.parametrize("norm", ["linf", "l2", "l1", "l0"])
def test_contains_and_pull_inside(norm):
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (64, 9)).astype(np.float32)
  x[:, 0] = 0.0
  domain = (0.0, 1.0)
  k = 2 if norm == "l0" else None
  eps = np.float32(0.1) if norm != "l1" else np.float32(0.3)
  iset = make_input_set(x, eps, norm, k, domain)
  assert np.all(contains(iset, x))
  if norm == "linf":  # float32 vertices: outside in exact arithmetic for most points
    p = (x + rng.choice([-1.0, 1.0], x.shape).astype(np.float32) * eps).astype(np.float32)
  elif norm == "l0":
    p = x.copy()
    p[:, 1:3] = rng.uniform(0, 1, (64, 2))
    assert np.all(contains(iset, p))
    p[:, 3] = 2.0  # a third coordinate changed, and out of the box
    assert not np.any(contains(iset, p))
    return
  else:
    d = rng.normal(size=x.shape)
    d /= np.linalg.norm(d, ord=2 if norm == "l2" else 1, axis=1, keepdims=True)
    p = (x + eps * d).astype(np.float32)
  q = pull_inside(iset, p)
  assert q.dtype == np.float32 and np.all(contains(iset, q))
  assert np.max(np.abs(q.astype(np.float64) - np.clip(p, *domain))) <= 1e-5
  # The check is exact: a point outside by a float step is outside.
  if norm == "linf":
    out = x.copy()
    out[:, 1] = np.nextafter(np.float32(x[:, 1] + np.float64(eps) + 1e-7), np.float32(2))
    assert not np.any(contains(iset, out))
  else:
    assert not np.any(contains(iset, (x + 1.01 * eps * d).astype(np.float32)))
  with pytest.raises(ValueError):
    contains(iset, x[:3])
