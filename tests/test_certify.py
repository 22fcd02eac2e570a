"""Certification tests of ``dm_jax.verify.certify`` on a quickly trained MNIST model.

1. Attack: for every certifier (ibp, crown_ibp, fastlin, crown, zero, alpha_crown, and
   the IBP-intersected fastlin_intersect, crown_intersect, zero_intersect,
   alpha_crown_intersect) and threat model
   (linf, linf with the [0, 1] data box, l2, l1), each test point is certified at the
   largest radius of a grid at which it is certified (per-point eps), then attacked there
   by PGD (margin loss, >= 60 steps, several restarts, the best iterate kept). The attack
   never goes below the certified lower bound of the margin, so it never finds an
   adversarial example for a certified point.
2. API: padding of the last batch, per-point eps, the table's "best" row = union (of
   the rows and the intersected versions of the linear ones), certifier names,
   ``format_table`` labels, ``certified_radius`` consistency, ``relu_stability`` counts,
   MIP certificates contain every sound certificate, and argument errors.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dm_jax
from dm_jax.verify import certify as C
from dm_jax.bounds import linear
from dm_jax.core.errors import UnsupportedPrimitiveError

import helpers as U

METHODS = ("ibp", "crown_ibp", "fastlin", "crown", "zero")
INTERSECTED = ("fastlin_intersect", "crown_intersect", "zero_intersect")
ALPHA = ("alpha_crown", "alpha_crown_intersect")  # alpha-CROWN (default options)
N_TEST = 48


def _mnist_path() -> Path:
  env = os.environ.get("DM_JAX_DATA_DIR", "").strip()
  base = Path(env).expanduser() if env else Path(__file__).resolve().parents[1].parent / \
      "shared" / "data"
  return base / "mnist.npz"


@pytest.fixture(scope="module")
def trained():
  """mlp 784-64-64-10 trained for 300 Adam steps on 2000 MNIST examples (plain CE)."""
  path = _mnist_path()
  if not path.is_file():
    pytest.skip(f"MNIST not found at {path}")
  data = np.load(path)
  x_tr = (data["x_train"][:2000].astype(np.float32) / 255.0)[..., None]
  y_tr = data["y_train"][:2000].astype(np.int32)
  x_te = (data["x_test"][:N_TEST].astype(np.float32) / 255.0)[..., None]
  y_te = data["y_test"][:N_TEST].astype(np.int32)
  model = dm_jax.get_model("mlp", 10, hidden=(64, 64))
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(x_tr[:1]))
  opt = optax.adam(2e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    def loss(p):
      logits = model.apply(p, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    g = jax.grad(loss)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state

  rng = np.random.default_rng(0)
  for _ in range(300):
    idx = rng.integers(0, 2000, 100)
    params, state = step(params, state, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]))
  acc = float(np.mean(np.asarray(model.apply(params, jnp.asarray(x_te))).argmax(-1) == y_te))
  assert acc >= 0.8, f"training failed: test accuracy {acc}"
  return model.apply, params, x_te, y_te


# --------------------------------------------------------------------------- PGD

def _project_l1(d, eps):
  """Projection of each row of d (B, D) onto the l1 ball of radius eps (B, 1)."""
  a = jnp.abs(d)
  u = -jnp.sort(-a, axis=1)
  css = jnp.cumsum(u, axis=1)
  j = jnp.arange(1, d.shape[1] + 1, dtype=d.dtype)
  cond = u - (css - eps) / j > 0
  rho = jnp.maximum(jnp.sum(cond, axis=1, keepdims=True) - 1, 0)
  theta = (jnp.take_along_axis(css, rho, axis=1) - eps) / (rho + 1).astype(d.dtype)
  w = jnp.sign(d) * jnp.maximum(a - theta, 0.0)
  return jnp.where(jnp.sum(a, axis=1, keepdims=True) > eps, w, d)


def _project(d, eps, norm):
  """Projection of perturbations d (B, D) onto the norm ball of radius eps (B, 1)."""
  if norm == "linf":
    return jnp.clip(d, -eps, eps)
  if norm == "l2":
    n = jnp.linalg.norm(d, axis=1, keepdims=True)
    return d * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))
  return _project_l1(d, eps)


def _margin(logits, y):
  """f_y - max_{j != y} f_j (< 0: misclassified)."""
  true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  other = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
  return true - jnp.max(other, axis=1)


@functools.partial(jax.jit, static_argnames=("apply_fn", "norm", "steps", "restarts",
                                             "box"))
def pgd_min_margin(apply_fn, params, x, y, eps, key, norm, steps=60, restarts=4,
                   box=False):
  """Smallest margin found by PGD over the ball (optionally clipped to [0, 1]).

  Restart 0 starts at x, the others at random points of the ball; steps are sign
  gradients (linf), normalised gradients (l2) or sparse top-coordinate steps (l1), with
  a step size decaying from 2.5 eps / sqrt(steps)-ish to small; the best iterate counts.
  """
  B = x.shape[0]
  shape = x.shape[1:]
  D = int(np.prod(shape))
  xf = x.reshape(B, D)
  e = eps.reshape(B, 1)
  f = lambda d: _margin(apply_fn(params, (xf + d).reshape((B,) + shape)), y)
  grad = jax.grad(lambda d: jnp.sum(f(d)))

  def fix(d):
    d = _project(d, e, norm)
    if box:  # clipping to [0, 1] moves each coordinate toward x: stays in the ball
      d = jnp.clip(xf + d, 0.0, 1.0) - xf
    return d

  def one(key, random_start):
    if norm == "linf":
      d0 = jax.random.uniform(key, (B, D), minval=-1.0, maxval=1.0) * e
    elif norm == "l2":
      g = jax.random.normal(key, (B, D))
      d0 = g / jnp.linalg.norm(g, axis=1, keepdims=True) * e * 0.5
    else:
      g = jax.random.laplace(key, (B, D))
      d0 = g / jnp.sum(jnp.abs(g), axis=1, keepdims=True) * e * 0.5
    d0 = fix(jnp.where(random_start, d0, 0.0))

    def body(i, carry):
      d, best = carry
      frac = 1.0 - i / steps
      g = grad(d)
      if norm == "linf":
        d = d - (0.25 * frac + 0.02) * e * jnp.sign(g)
      elif norm == "l2":
        d = d - (0.25 * frac + 0.02) * e * g / (jnp.linalg.norm(g, axis=1, keepdims=True)
                                                 + 1e-12)
      else:
        k = max(1, D // 100)
        thr = -jnp.sort(-jnp.abs(g), axis=1)[:, k - 1:k]
        mask = (jnp.abs(g) >= thr).astype(g.dtype)
        d = d - (0.5 * frac + 0.05) * e * jnp.sign(g) * mask / k
      d = fix(d)
      return d, jnp.minimum(best, f(d))

    return jax.lax.fori_loop(0, steps, body, (d0, f(d0)))[1]

  keys = jax.random.split(key, restarts)
  best = one(keys[0], False)
  for r in range(1, restarts):
    best = jnp.minimum(best, one(keys[r], True))
  return best


@pytest.mark.sweep
def test_pgd_finds_adversarial_examples(trained):
  """The attack is not toothless: at a large radius it breaks most points."""
  apply_fn, params, x, y = trained
  for norm, eps in (("linf", 0.15), ("l2", 3.0), ("l1", 15.0)):
    m = pgd_min_margin(apply_fn, params, jnp.asarray(x), jnp.asarray(y),
                       jnp.full((x.shape[0],), eps), jax.random.PRNGKey(0), norm)
    assert np.mean(np.asarray(m) < 0) >= 0.7, (norm, np.mean(np.asarray(m) < 0))


# ------------------------------------------------------------------------ attack

EPS_GRID = {
    "linf": (0.0, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064),
    "linf_box": (0.0, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064),
    "l2": (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6),
    "l1": (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
}


@pytest.mark.parametrize("set_name", list(EPS_GRID))
@pytest.mark.parametrize("method", METHODS + INTERSECTED + ALPHA)
def test_pgd_never_beats_certificate(trained, method, set_name):
  apply_fn, params, x, y = trained
  norm = "linf" if set_name == "linf_box" else set_name
  domain = (0.0, 1.0) if set_name == "linf_box" else None
  n = x.shape[0]
  grid = EPS_GRID[set_name]
  certs, lows = [], []
  for e in grid:
    c, lo = C.certify(apply_fn, params, x, y, e, norm, method=method, domain=domain,
                      batch_size=n)
    certs.append(c)
    lows.append(lo)
  certs, lows = np.stack(certs, 1), np.stack(lows, 1)
  # Monotone in eps: a larger set never gets a larger lower bound.
  assert np.all(np.diff(lows, axis=1) <= 1e-5 * (1 + np.abs(lows[:, 1:])))
  assert np.all(certs[:, :-1] >= certs[:, 1:])
  # Per point: the largest certified grid radius (the smallest positive one if none).
  idx = np.maximum(certs.sum(1) - 1, 1)
  eps_pt = np.asarray(grid, np.float32)[idx]
  assert np.sum(certs[np.arange(n), idx]) >= 5, (
      f"{method}/{set_name}: too few certified points for a meaningful test")
  cert, lower = C.certify(apply_fn, params, x, y, eps_pt, norm, method=method,
                          domain=domain, batch_size=n)
  np.testing.assert_array_equal(cert, certs[np.arange(n), idx])
  np.testing.assert_allclose(lower, lows[np.arange(n), idx], rtol=1e-5, atol=1e-5)
  found = np.asarray(pgd_min_margin(apply_fn, params, jnp.asarray(x), jnp.asarray(y),
                                    jnp.asarray(eps_pt), jax.random.PRNGKey(1), norm,
                                    box=domain is not None))
  # The attack's margin is an upper bound of the minimum, the certificate a lower bound.
  slack = found - lower
  assert np.all(slack >= -1e-4 * (1 + np.abs(found))), (
      f"{method}/{set_name}: PGD margin {found[slack.argmin()]:.5g} below the certified "
      f"lower bound {lower[slack.argmin()]:.5g} at eps {eps_pt[slack.argmin()]}")
  assert not np.any(cert & (found < 0)), "adversarial example for a certified point"
  # One grid step further (not certified there): the lower bound still holds.
  nxt = np.minimum(idx + 1, len(grid) - 1)
  found2 = np.asarray(pgd_min_margin(apply_fn, params, jnp.asarray(x), jnp.asarray(y),
                                     jnp.asarray(np.asarray(grid, np.float32)[nxt]),
                                     jax.random.PRNGKey(2), norm, box=domain is not None))
  lower2 = lows[np.arange(n), nxt]
  assert np.all(found2 - lower2 >= -1e-4 * (1 + np.abs(found2))), f"{method}/{set_name}"


# --------------------------------------------------------------------------- API

def test_certify_padding_and_per_point_eps(trained):
  apply_fn, params, x, y = trained
  n = 37
  x, y = x[:n], y[:n]
  full = C.certify(apply_fn, params, x, y, 0.01, "linf", method="crown", batch_size=n)
  for bs in (16, 64):  # 37 = 16 + 16 + 5 (padded); 64 > N
    part = C.certify(apply_fn, params, x, y, 0.01, "linf", method="crown", batch_size=bs)
    np.testing.assert_array_equal(part[0], full[0])
    np.testing.assert_allclose(part[1], full[1], rtol=1e-5, atol=1e-5)
    assert part[0].shape == part[1].shape == (n,)
  # Per-point eps: equal to certifying each group with its scalar eps.
  e_small, e_big = 0.005, 0.03
  eps = np.where(np.arange(n) % 3 == 0, e_big, e_small).astype(np.float32)
  mixed = C.certify(apply_fn, params, x, y, eps, "linf", method="crown", batch_size=16)
  small = C.certify(apply_fn, params, x, y, e_small, "linf", method="crown", batch_size=16)
  big = C.certify(apply_fn, params, x, y, e_big, "linf", method="crown", batch_size=16)
  sel = eps == e_big
  np.testing.assert_array_equal(mixed[0], np.where(sel, big[0], small[0]))
  np.testing.assert_allclose(mixed[1], np.where(sel, big[1], small[1]), rtol=1e-5,
                             atol=1e-5)
  assert big[0].sum() < small[0].sum()  # the radius matters on this model


def test_certify_eps_zero_is_accuracy(trained):
  apply_fn, params, x, y = trained
  pred = np.asarray(apply_fn(params, jnp.asarray(x))).argmax(-1)
  for method in ("ibp", "fastlin"):
    cert, lower = C.certify(apply_fn, params, x, y, 0.0, "linf", method=method,
                            batch_size=x.shape[0])
    np.testing.assert_array_equal(cert, pred == y)
    logits = np.asarray(apply_fn(params, jnp.asarray(x)))
    true_margin = logits[np.arange(len(y)), y] - np.max(
        np.where(np.eye(10, dtype=bool)[y], -np.inf, logits), axis=1)
    np.testing.assert_allclose(lower, true_margin, rtol=1e-4, atol=1e-4)


def test_table_best_is_union_and_format(trained):
  apply_fn, params, x, y = trained
  grid = (0.0, 0.01, 0.03)
  table = C.certified_accuracy_table(apply_fn, params, x, y, grid, methods=METHODS,
                                     norm="linf", progress=False, batch_size=x.shape[0],
                                     best_intersect=False)
  assert table["eps"] == list(grid)
  assert set(table["rows"]) == set(METHODS) | {"best"}
  assert table["num_points"] == x.shape[0]
  assert table["best_of"] == list(METHODS)
  for i, e in enumerate(grid):
    union = np.zeros(x.shape[0], bool)
    for m in METHODS:
      cert, _ = C.certify(apply_fn, params, x, y, e, "linf", method=m,
                          batch_size=x.shape[0])
      assert table["rows"][m][i] == pytest.approx(cert.mean())
      union |= cert
    assert table["rows"]["best"][i] == pytest.approx(union.mean())
    assert table["rows"]["best"][i] >= max(table["rows"][m][i] for m in METHODS)
  pred = np.asarray(apply_fn(params, jnp.asarray(x))).argmax(-1)
  assert table["clean"] == pytest.approx(np.mean(pred == y))
  assert table["rows"]["best"][0] == pytest.approx(table["clean"])
  text = C.format_table(table)
  for label in ("IBP", "CROWN-IBP", "CNN-Cert-ReLU", "CNN-Cert-Ada", "CNN-Cert-Zero",
                "best (union)"):
    assert label in text, label
  assert len(text.splitlines()) >= len(METHODS) + 3
  assert "best also counts" not in text
  acc = C.certified_accuracy(apply_fn, params, x, y, grid, "linf", method="crown",
                             batch_size=x.shape[0])
  np.testing.assert_allclose(acc, table["rows"]["crown"])


def test_table_best_counts_intersected(trained):
  """By default "best" is the union of the rows and of the intersected versions of the
  textbook fastlin/crown rows, whose own numbers stay the textbook ones."""
  apply_fn, params, x, y = trained
  grid = (0.01, 0.03)
  n = x.shape[0]
  table = C.certified_accuracy_table(apply_fn, params, x, y, grid, methods=("ibp", "relu"),
                                     norm="linf", progress=False, batch_size=n)
  assert table["best_of"] == ["ibp", "fastlin", "fastlin_intersect"]
  assert set(table["rows"]) == {"ibp", "fastlin", "best"}
  for i, e in enumerate(grid):
    cert = {m: C.certify(apply_fn, params, x, y, e, "linf", method=m, batch_size=n)[0]
            for m in table["best_of"]}
    assert table["rows"]["fastlin"][i] == pytest.approx(cert["fastlin"].mean())
    union = cert["ibp"] | cert["fastlin"] | cert["fastlin_intersect"]
    assert table["rows"]["best"][i] == pytest.approx(union.mean())
  assert "best also counts CNN-Cert-ReLU ∩ IBP" in C.format_table(table)


def test_certifier_names():
  for name, canonical in (("crown_intersect", "crown_intersect"), ("ADA+ibp", "crown_intersect"),
                          ("relu-intersect", "fastlin_intersect"),
                          ("cnn-cert-zero_intersect", "zero_intersect"), ("ada", "crown"),
                          ("mip", "mip")):
    assert C.canonical_certifier(name) == canonical, name
  assert C.linear_options("crown_intersect") == ("crown", True)
  assert C.linear_options("fastlin") == ("fastlin", False)
  assert set(C.INTERSECTED) <= set(C.CERTIFY_METHODS)
  for bad in ("ibp_intersect", "crown_ibp+ibp", "mip_intersect", "nope_intersect"):
    with pytest.raises(ValueError):
      C.canonical_certifier(bad)
  assert C.label("crown_intersect") == "CNN-Cert-Ada ∩ IBP"


def test_alpha_crown_certifier(trained):
  """alpha_crown through certify and the table: its margins are never below CROWN's (so
  it certifies every point CROWN does), 0 steps is CROWN, ``alpha`` reaches it (and not
  the other rows), and "best" adds its intersected version."""
  apply_fn, params, x, y = trained
  n = x.shape[0]
  e = 0.03
  c_cert, c_low = C.certify(apply_fn, params, x, y, e, method="crown", batch_size=n)
  a_cert, a_low = C.certify(apply_fn, params, x, y, e, method="α-CROWN", batch_size=n)
  assert np.all(a_low >= c_low - 1e-5 * (1 + np.abs(c_low)))
  assert np.all(a_cert >= c_cert) and np.max(a_low - c_low) > 1e-3
  _, z_low = C.certify(apply_fn, params, x, y, e, method="alpha_crown", batch_size=n,
                       alpha=linear.AlphaConfig(steps=0))
  np.testing.assert_allclose(z_low, c_low, rtol=1e-5, atol=1e-5)
  alpha = linear.AlphaConfig(steps=5, lr=0.2)
  _, f_low = C.certify(apply_fn, params, x, y, e, method="alpha_crown", batch_size=n,
                       alpha=alpha)
  assert np.max(np.abs(f_low - a_low)) > 1e-6  # the options arrived
  table = C.certified_accuracy_table(apply_fn, params, x, y, (e,), methods=("ibp", "ada",
                                     "alpha_crown"), progress=False, batch_size=n,
                                     alpha=alpha)
  assert table["best_of"] == ["ibp", "crown", "alpha_crown", "crown_intersect",
                              "alpha_crown_intersect"]
  assert table["rows"]["crown"][0] == pytest.approx(c_cert.mean())
  assert table["rows"]["alpha_crown"][0] >= table["rows"]["crown"][0]
  assert "α-CROWN" in C.format_table(table)
  with pytest.raises(ValueError, match="AlphaConfig"):
    C.certify(apply_fn, params, x, y, e, method="alpha_crown", alpha=dict(steps=3))


def test_certified_radius_consistent(trained):
  apply_fn, params, x, y = trained
  n = x.shape[0]
  eps_max, iters = 0.1, 8
  tol = eps_max / 2 ** iters
  for method in ("crown", "ibp"):
    r = C.certified_radius(apply_fn, params, x, y, "linf", method=method, eps_max=eps_max,
                           iterations=iters, batch_size=n)
    assert r.shape == (n,) and np.all(r >= 0) and np.all(r <= eps_max)
    pred = np.asarray(apply_fn(params, jnp.asarray(x))).argmax(-1)
    assert np.all(r[pred != y] == 0)
    pos = r > 0
    assert pos.sum() >= 5
    c_in, _ = C.certify(apply_fn, params, x, y, np.where(pos, 0.99 * r, 0.0), "linf",
                        method=method, batch_size=n)
    assert np.all(c_in[pos]), f"{method}: not certified at 0.99 * radius"
    below = r < eps_max
    c_out, _ = C.certify(apply_fn, params, x, y, np.minimum(eps_max, r + 2 * tol), "linf",
                         method=method, batch_size=n)
    assert not np.any(c_out[below]), f"{method}: certified beyond radius + 2 tolerance"


def test_relu_stability_counts(trained):
  apply_fn, params, x, y = trained
  n = x.shape[0]
  prev = None
  for eps in (0.0, 0.01, 0.05):
    for method in ("ibp", "crown_ibp", "fastlin", "crown", "zero", "crown_intersect"):
      s = C.relu_stability(apply_fn, params, jnp.asarray(x), eps, "linf", method=method)
      np.testing.assert_array_equal(s["total"], [64 * n, 64 * n])
      np.testing.assert_array_equal(s["active"] + s["inactive"] + s["unstable"], s["total"])
      assert all(np.all(s[k] >= 0) for k in ("active", "inactive", "unstable"))
      if eps == 0.0 and method == "ibp":
        assert s["unstable"].sum() == 0
      if method == "ibp":
        if prev is not None:  # nested intervals: never fewer unstable ReLUs
          assert np.all(s["unstable"] >= prev)
        prev = s["unstable"]
  assert prev.sum() > 0




@pytest.mark.sweep
def test_mip_contains_every_sound_certificate():
  model = U.TinyMLP()
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (12, 4)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(3), jnp.asarray(x[:1]))
  y = np.asarray(model.apply(params, jnp.asarray(x))).argmax(-1)
  y[:2] = (y[:2] + 1) % 3  # two misclassified points
  for norm, eps in (("linf", 0.05), ("l1", 0.15)):
    cm, lm = C.certify(model.apply, params, x, y, eps, norm, method="mip")
    assert not np.any(cm[:2])
    assert cm.sum() >= 3
    for m in METHODS:
      c, lo = C.certify(model.apply, params, x, y, eps, norm, method=m, batch_size=5)
      assert np.all(cm[c]), f"{m} certifies a point the exact MIP does not"
      assert np.all(lo <= lm + 1e-5 * (1 + np.abs(lm))), m
  table = C.certified_accuracy_table(model.apply, params, x, y, (0.0, 0.05),
                                     methods=("ibp", "crown", "mip"), progress=False)
  text = C.format_table(table)
  assert "MIP (exact)" in text and "best (union)" in text
  for i in range(2):
    assert table["rows"]["mip"][i] == pytest.approx(table["rows"]["best"][i])


def test_bad_inputs(trained):
  apply_fn, params, x, y = trained
  x, y = x[:4], y[:4]
  with pytest.raises(ValueError):
    C.certify(apply_fn, params, x, y, 0.1, "linf", method="no_such_method")
  with pytest.raises(ValueError):
    linear.margin_lower_bounds(apply_fn, params, jnp.asarray(x), jnp.asarray(y), 0.1,
                               method="no_such_method")
  with pytest.raises(ValueError):
    C.certify(apply_fn, params, x, y, -0.1, "linf")
  with pytest.raises(ValueError):
    C.certify(apply_fn, params, x, y[:, None], 0.1, "linf")
  with pytest.raises(ValueError):
    C.certify(apply_fn, params, x, y[:3], 0.1, "linf")
  with pytest.raises(ValueError):
    linear.margin_lower_bounds(apply_fn, params, jnp.asarray(x), jnp.asarray(y[:3]), 0.1)
  with pytest.raises(ValueError):
    C.certify(apply_fn, params, x, y, 0.1, "l7")
  with pytest.raises(ValueError):
    C.certify(apply_fn, params, x, y, 0.1, "linf", batch_size=0)
  with pytest.raises(ValueError):
    C.certify(apply_fn, params, x, y, 0.1, "l2", method="mip")
  with pytest.raises(ValueError):
    C.certified_radius(apply_fn, params, x, y, "linf", eps_max=0.0)

  w = jnp.ones((784, 10)) * 0.01
  sin_model = lambda p, xx: jnp.sin(xx.reshape(xx.shape[0], -1) @ p)
  with pytest.raises(UnsupportedPrimitiveError) as err:
    C.certify(sin_model, w, x, y, 0.1, "linf", method="crown")
  assert "sin" in str(err.value)
  for m in METHODS:
    with pytest.raises(UnsupportedPrimitiveError):
      linear.linear_bounds(sin_model, w, jnp.asarray(x), 0.1, "linf", method=m)


def test_negative_per_point_eps_rejected(trained):
  """A negative radius anywhere in a per-point eps array is an error (like a scalar)."""
  apply_fn, params, x, y = trained
  x, y = x[:4], y[:4]
  with pytest.raises(ValueError):
    C.certify(apply_fn, params, x, y, np.array([0.1, -0.1, 0.1, 0.1]), "linf",
              method="crown")
  with pytest.raises(ValueError):
    C.certify(apply_fn, params, x, y, np.array([0.1, np.nan, 0.1, 0.1]), "linf",
              method="crown")


@pytest.mark.sweep
def test_table_monotone_pass_and_pgd_row(trained):
  """The monotone pass changes no number; the PGD row bounds every certifier from above
  and breaks no certified point (independent evidence: an attack, not the bounds)."""
  apply_fn, params, x, y = trained
  grid = (0.03, 0.0, 0.01, 0.05)  # unsorted on purpose: the pass follows increasing eps
  kw = dict(methods=("ibp", "fastlin"), norm="linf", progress=False, batch_size=16)
  full = C.certified_accuracy_table(apply_fn, params, x, y, grid, monotone=False, **kw)
  table = C.certified_accuracy_table(apply_fn, params, x, y, grid,
                                     pgd=dict(steps=20, restarts=2), **kw)
  assert table["rows"] == full["rows"]
  assert table["eps"] == list(grid)
  assert len(table["pgd"]) == len(grid)
  assert table["certified_but_attacked"] == [0] * len(grid)
  for i, e in enumerate(grid):
    assert table["pgd"][i] >= table["rows"]["best"][i] - 1e-9
    assert table["pgd"][i] <= table["clean"] + 1e-9
  assert table["pgd"][grid.index(0.0)] == pytest.approx(table["clean"])
  text = C.format_table(table)
  assert "PGD (upper bound)" in text and "certified points PGD broke: 0" in text
  assert "pgd," in C.table_to_csv(table)
  # attacking only the uncertified points gives the same row (the certifiers are sound)
  cheap = C.certified_accuracy_table(apply_fn, params, x, y, grid,
                                     pgd=dict(steps=20, restarts=2, attack_certified=False),
                                     **kw)
  assert cheap["pgd"] == table["pgd"] and "certified_but_attacked" not in cheap
  assert "on the uncertified points" in C.format_table(cheap)
  # a radius where the attack succeeds somewhere: PGD finds adversarial points
  robust = C.pgd_robust(apply_fn, params, x, y, (0.3,), steps=20, restarts=1)[0]
  assert robust.mean() < table["clean"]
  with pytest.raises(ValueError, match="restarts"):
    C.pgd_robust(apply_fn, params, x, y, (0.1,), restarts=0)


def test_l0_table_grid_counts_changed_pixels(trained):
  """For norm l0 without k, the table's radii are k: its columns equal certify at each k
  (k = 0: the clean accuracy), and no sampled k-pixel change flips a certified point."""
  apply_fn, params, x, y = trained
  grid = (0, 1, 2)
  table = C.certified_accuracy_table(apply_fn, params, x, y, grid, methods=("fastlin", "ibp"),
                                     norm="l0", progress=False, batch_size=x.shape[0])
  assert table["rows"]["best"][0] == pytest.approx(table["clean"])
  certified = {}
  for i, k in enumerate(grid[1:], start=1):
    union = np.zeros(x.shape[0], bool)
    for m in ("fastlin", "ibp"):
      cert, _ = C.certify(apply_fn, params, x, y, None, "l0", method=m, k=k,
                          batch_size=x.shape[0])
      assert table["rows"][m][i] == pytest.approx(cert.mean()), (m, k)
      union |= cert
    certified[k] = union
  assert certified[2].sum() > 0, "nothing certified at k = 2: the sampling check is empty"
  rng = np.random.default_rng(0)
  flat = x.reshape(x.shape[0], -1)
  for i in np.flatnonzero(certified[2]):
    samples = np.repeat(flat[i:i + 1], 256, 0)
    for row in samples:  # k = 2 pixels, each to a random extreme or uniform value
      where = rng.choice(flat.shape[1], 2, replace=False)
      row[where] = rng.choice([0.0, 1.0, rng.uniform()], 2)
    pred = np.asarray(apply_fn(params, jnp.asarray(samples.reshape((-1,) + x.shape[1:]))))
    assert np.all(pred.argmax(-1) == y[i]), f"point {i} flipped inside its certified l0 set"
  with pytest.raises(ValueError, match="integers >= 0"):
    C.certified_accuracy_table(apply_fn, params, x, y, (0, 0.5), methods=("ibp",),
                               norm="l0", progress=False)
  with pytest.raises(ValueError, match="PGD row"):
    C.certified_accuracy_table(apply_fn, params, x, y, (0, 1), methods=("ibp",),
                               norm="l0", progress=False, pgd=dict(steps=2, restarts=1))
