"""Certification tests of the linear (CROWN-family) bounds of ``dm_jax.bounds.linear``.

1. Monte-Carlo soundness: for every method (ibp, crown_ibp, fastlin, crown, zero) and
   threat model (linf, linf with the [0, 1] data box, l2, l1, l0), sampled points of the
   set (vertices, sphere / faces, interior points, and points found by a few projected
   gradient steps that push each specification row down or up) never give
   ``spec @ f(x')`` outside ``linear_bounds``; random specification matrices and margin
   rows; mlp, small CNN, pooling CNN, resnet and a 2-member ensemble. The radii are chosen
   so that many ReLUs are unstable (checked, so the test is not vacuous).
2. Exact comparison against the MIP (``dm_jax.verify.mip.exact_margins``) on tiny nets (MLPs,
   a conv net, a max-pooling net, a residual net): every certifier's margin lower bound
   is <= the exact minimum; IBP is never tighter than CNN-Cert-Zero (Appendix K). The
   gaps are collected and printed by ``test_zz_gap_summary`` (run with ``-s``).
3. jit / grad: ``margin_lower_bounds`` is the same under jit; its gradient w.r.t. the
   parameters is finite (training uses it).
4. ``intersect_ibp``: on nets where IBP's intervals beat the linear ones at some neurons
   (a diagonal first layer, a 1x1 first conv: the dense and the windowed paths), the
   intersected bounds hold at sampled points of the ball and of ball ∩ box (jit and
   eager), of the margins and of every ReLU input; they are never looser than IBP's,
   strictly tighter than the textbook ones somewhere, and below the exact MIP minimum.
5. alpha-CROWN: sound at sampled and PGD-directed points (every option: shared or
   per-row slopes, sum or min objective, optimised intermediate bounds, with IBP's
   intersection, unrolled loop; dense, windowed, pooling and residual paths; jit and
   eager), never looser than CROWN with the same starting intermediate bounds and
   strictly tighter somewhere; sound for random slopes (also outside [0, 1], which the
   relaxation clips) at the output and at every intermediate layer; slopes 0 and
   u / (u - l) reproduce zero's and fastlin's passes; blocks and 0 steps change nothing;
   below the exact MIP minimum in every case of section 2, where the gap shrinks.

Models are evaluated with Flax directly; points are drawn with numpy.
"""
from __future__ import annotations

import collections
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import dm_jax
import helpers
from dm_jax.verify import certify as certify_lib
from dm_jax.bounds import linear
from dm_jax.verify import mip

METHODS = ("ibp", "crown_ibp", "fastlin", "crown", "zero")
LINEAR_METHODS = ("fastlin", "crown", "zero")
# The IBP-intersected versions (certify's names), compared with the MIP too.
INTERSECTED = tuple(m + "_intersect" for m in LINEAR_METHODS)


def margin_bounds(apply_fn, params, x, y, eps, norm, certifier, **kw):
  """``linear.margin_lower_bounds`` for a method or an intersected version's name."""
  method, intersect = certify_lib.linear_options(certifier)
  return linear.margin_lower_bounds(apply_fn, params, x, y, eps, norm, method=method,
                                    intersect_ibp=intersect, **kw)


# ------------------------------------------------------------------------- helpers

random_params = helpers.init_params


def nominal_inputs(shape, batch, seed):
  """Inputs in [0, 1], some exactly 0 or 1 (so the data box is active)."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.0, 1.0, (batch,) + tuple(shape))
  u = rng.uniform(size=x.shape)
  x[u < 0.2] = 0.0
  x[u > 0.9] = 1.0
  return x.astype(np.float32)


def project_l1(d, eps):
  """Euclidean projection of each row of d (n, D) onto the l1 ball of radius eps
  (Duchi et al. 2008)."""
  d = np.asarray(d, np.float64)
  a = np.abs(d)
  out = d.copy()
  for i in range(d.shape[0]):
    if a[i].sum() <= eps:
      continue
    u = np.sort(a[i])[::-1]
    css = np.cumsum(u)
    j = np.arange(1, u.size + 1)
    rho = np.nonzero(u - (css - eps) / j > 0)[0][-1]
    theta = (css[rho] - eps) / (rho + 1)
    out[i] = np.sign(d[i]) * np.maximum(a[i] - theta, 0.0)
  return out


@functools.lru_cache(maxsize=None)
def _weighted_grad_fn(apply_fn):
  """grad_x of sum_i <w_i, f(x_i)> (one compile per model and shape)."""
  def obj(params, xs, w):
    return jnp.sum(apply_fn(params, xs) * w)
  return jax.jit(jax.grad(obj, argnums=1))


@functools.lru_cache(maxsize=None)
def _jit_apply(apply_fn):
  return jax.jit(apply_fn)


def directed_points(apply_fn, params, x, spec, eps, norm, domain, k, steps=25, seed=0):
  """For each example b and spec row r: points that (locally) minimise and maximise
  ``spec[b, r] @ f`` by projected steepest-descent steps. Returns (B, 2R, *shape)."""
  rng = np.random.default_rng(seed)
  B, R, K = spec.shape
  shape = x.shape[1:]
  D = int(np.prod(shape))
  # copy i minimises sign_i * rows_i @ f
  w = np.concatenate([spec, -spec], axis=1).reshape(B * 2 * R, K)
  centre = np.repeat(x.reshape(B, 1, D), 2 * R, axis=1).reshape(-1, D).astype(np.float64)
  grad_fn = _weighted_grad_fn(apply_fn)
  grad = lambda pts: -np.asarray(grad_fn(params, jnp.asarray(
      pts.reshape((-1,) + shape), jnp.float32), jnp.asarray(w, jnp.float32))).reshape(-1, D)
  if norm == "l0":
    lo_d, hi_d = domain if domain is not None else (0.0, 1.0)
    pts = centre.copy()
    for _ in range(3):
      g = grad(pts)  # ascent direction of the objective -w.f
      gain_lo = g * (lo_d - centre)
      gain_hi = g * (hi_d - centre)
      target = np.where(gain_hi > gain_lo, hi_d, lo_d)
      gain = np.maximum(gain_lo, gain_hi)
      pts = centre.copy()
      idx = np.argsort(-gain, axis=1)[:, :k]
      rows = np.arange(pts.shape[0])[:, None]
      pts[rows, idx] = target[rows, idx]
    return pts.reshape((B, 2 * R) + shape)
  alpha = 2.5 * eps / steps
  if norm == "linf":
    lo, hi = centre - eps, centre + eps
    if domain is not None:
      lo, hi = np.clip(lo, *domain), np.clip(hi, *domain)
      lo, hi = np.minimum(lo, centre), np.maximum(hi, centre)
    pts = rng.uniform(lo, hi)
    for _ in range(steps):
      pts = np.clip(pts + alpha * np.sign(grad(pts)), lo, hi)
  elif norm == "l2":
    d = rng.normal(size=centre.shape)
    d *= eps * 0.5 / np.linalg.norm(d, axis=1, keepdims=True)
    for _ in range(steps):
      g = grad(centre + d)
      d = d + alpha * g / (np.linalg.norm(g, axis=1, keepdims=True) + 1e-12)
      d *= np.minimum(1.0, eps / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-12))
    pts = centre + d
  else:  # l1: greedy coordinate steps, projected
    d = np.zeros_like(centre)
    rows = np.arange(d.shape[0])
    for _ in range(steps):
      g = grad(centre + d)
      i = np.argmax(np.abs(g), axis=1)
      d[rows, i] += alpha * np.sign(g[rows, i]) * 2.0
      d = project_l1(d, eps)
    pts = centre + d
  return pts.reshape((B, 2 * R) + shape)


def sample_points(x, eps, norm, n, k=None, domain=None, seed=0):
  """Random points of the threat set around each example: (B, n', *shape)."""
  rng = np.random.default_rng(seed)
  B = x.shape[0]
  shape = x.shape[1:]
  D = int(np.prod(shape))
  xf = x.reshape(B, 1, D).astype(np.float64)
  parts = []
  q = n // 4
  if norm == "linf":
    s = rng.choice([-1.0, 1.0], size=(B, 2 * q, D))
    parts.append(xf + eps * s)                                       # vertices
    parts.append(xf + eps * rng.uniform(-1, 1, (B, q, D)))           # interior
    mixed = rng.uniform(-1, 1, (B, q, D))
    face = rng.uniform(size=(B, q, D)) < 0.7
    mixed[face] = np.sign(mixed[face])
    parts.append(xf + eps * mixed)                                   # faces
    pts = np.concatenate(parts, axis=1)
    if domain is not None:
      pts = np.clip(pts, *domain)
  elif norm == "l2":
    g = rng.normal(size=(B, 3 * q, D))
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    parts.append(xf + eps * g)                                       # sphere
    g = rng.normal(size=(B, q, D))
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    parts.append(xf + eps * g * rng.uniform(size=(B, q, 1)) ** (1.0 / D))  # interior
    pts = np.concatenate(parts, axis=1)
  elif norm == "l1":
    eye = np.eye(D)
    parts.append(xf + eps * np.concatenate([eye, -eye])[None])       # all 2D vertices
    dirich = rng.dirichlet(np.ones(D), size=(B, 2 * q))
    sgn = rng.choice([-1.0, 1.0], size=(B, 2 * q, D))
    parts.append(xf + eps * sgn * dirich)                            # surface
    parts.append(xf + eps * sgn[:, :q] * dirich[:, :q] * rng.uniform(size=(B, q, 1)))
    pts = np.concatenate(parts, axis=1)
  elif norm == "l0":
    lo_d, hi_d = domain if domain is not None else (0.0, 1.0)
    pts = np.repeat(xf, 2 * q, axis=1)
    for b in range(B):
      for i in range(2 * q):
        idx = rng.choice(D, size=k, replace=False)
        if i % 2:
          pts[b, i, idx] = rng.uniform(lo_d, hi_d, size=k)           # any value
        else:
          pts[b, i, idx] = rng.choice([lo_d, hi_d], size=k)          # extremes
  else:
    raise ValueError(norm)
  return pts.reshape((B, -1) + shape)


# ------------------------------------------------------------ 1. soundness (MC)

def _mlp(num_classes=3, hidden=(16, 16), ensemble=1):
  return dm_jax.get_model("mlp", num_classes, ensemble=ensemble, hidden=hidden)


SOUNDNESS_MODELS = {
    # name: (model factory, input shape, linf eps, l2 eps, l1 eps, l0 k)
    "mlp": (lambda: _mlp(), (6, 6, 1), 0.08, 0.4, 1.0, 3),
    "small": (lambda: dm_jax.get_model("small", 10), (8, 8, 1), 0.05, 0.3, 0.8, 2),
    "pooling": (lambda: dm_jax.get_model("pooling", 10), (8, 8, 1), 0.06, 0.3, 0.8, 2),
    "resnet": (lambda: dm_jax.get_model("resnet", 10), (8, 8, 1), 0.05, 0.3, 0.8, 2),
    "ensemble2_mlp": (lambda: _mlp(ensemble=2), (6, 6, 1), 0.08, 0.4, 1.0, 3),
}
SETS = ("linf", "linf_box", "l2", "l1", "l0")


@functools.lru_cache(maxsize=None)
def _soundness_setup(name):
  factory, shape, *_ = SOUNDNESS_MODELS[name]
  model = factory()
  params = random_params(model, shape, seed=len(name))
  return model, params


def _soundness_cases():
  cases = []
  for name in SOUNDNESS_MODELS:
    for s in SETS:
      slow = name in ("pooling", "resnet", "ensemble2_mlp") and s in ("l1", "l0")
      marks = [pytest.mark.slow] if slow else []
      cases.append(pytest.param(name, s, marks=marks, id=f"{name}-{s}"))
  return cases


@pytest.mark.parametrize("name,set_name", _soundness_cases())
def test_mc_soundness(name, set_name):
  _, shape, e_inf, e_2, e_1, k0 = SOUNDNESS_MODELS[name]
  model, params = _soundness_setup(name)
  apply_fn = model.apply
  B = 2
  x = nominal_inputs(shape, B, seed=7)
  norm = "linf" if set_name == "linf_box" else set_name
  domain = (0.0, 1.0) if set_name == "linf_box" else None
  eps = {"linf": e_inf, "l2": e_2, "l1": e_1, "l0": 0.0}[norm]
  k = k0 if norm == "l0" else None
  num_classes = int(apply_fn(params, jnp.asarray(x[:1])).shape[-1])
  rng = np.random.default_rng(3)
  y = rng.integers(0, num_classes, size=B)
  spec = np.concatenate([rng.normal(size=(B, 3, num_classes)),
                         np.asarray(linear.margin_spec(jnp.asarray(y), num_classes))],
                        axis=1).astype(np.float32)

  # Not vacuous: a decent share of ReLUs is unstable under the linear bounds.
  stab = certify_lib.relu_stability(apply_fn, params, jnp.asarray(x), eps, norm,
                                    method="crown", k=k, domain=domain)
  frac = stab["unstable"].sum() / stab["total"].sum()
  assert frac >= 0.08, f"only {frac:.3f} of the ReLUs are unstable: test too easy"

  pts = sample_points(x, eps, norm, 400, k=k, domain=domain, seed=11)
  pts = np.concatenate(
      [pts, directed_points(apply_fn, params, x, spec, eps, norm, domain, k)], axis=1)
  n = pts.shape[1]
  f = np.asarray(_jit_apply(apply_fn)(params, jnp.asarray(
      pts.reshape((-1,) + shape), jnp.float32))).reshape(B, n, -1)
  vals = np.einsum("bnk,brk->bnr", f.astype(np.float64), spec.astype(np.float64))
  vmin, vmax = vals.min(axis=1), vals.max(axis=1)
  tol = 1e-4 * (1.0 + np.abs(vals).max())
  for method in METHODS:
    b = linear.linear_bounds(apply_fn, params, jnp.asarray(x), eps, norm,
                             spec=jnp.asarray(spec), method=method, k=k, domain=domain)
    lo, up = np.asarray(b.lower, np.float64), np.asarray(b.upper, np.float64)
    assert lo.shape == up.shape == (B, spec.shape[1])
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(up)), method
    bad_lo = lo - vmin
    bad_up = vmax - up
    assert np.all(bad_lo <= tol), (
        f"{method}: lower bound above a sampled value by {bad_lo.max():.3g} "
        f"(row {np.unravel_index(bad_lo.argmax(), bad_lo.shape)})")
    assert np.all(bad_up <= tol), (
        f"{method}: upper bound below a sampled value by {bad_up.max():.3g} "
        f"(row {np.unravel_index(bad_up.argmax(), bad_up.shape)})")


def test_mc_soundness_default_spec_and_per_example_eps():
  """spec=None bounds every logit; per-example (B,) eps and elementwise linf eps."""
  model, params = _soundness_setup("mlp")
  shape = SOUNDNESS_MODELS["mlp"][1]
  x = nominal_inputs(shape, 2, seed=5)
  eps_b = np.array([0.02, 0.1], np.float32)
  eps_el = (np.random.default_rng(0).uniform(0.0, 0.1, x.shape)).astype(np.float32)
  for eps in (eps_b, eps_el):
    e = eps if eps.ndim > 1 else eps.reshape(-1, 1, 1, 1)
    rng = np.random.default_rng(1)
    pts = x[:, None] + e[:, None] * rng.choice([-1.0, 1.0], size=(2, 300) + shape)
    f = np.asarray(_jit_apply(model.apply)(params, jnp.asarray(
        pts.reshape((-1,) + shape), jnp.float32))).reshape(2, 300, -1)
    for method in METHODS:
      b = linear.linear_bounds(model.apply, params, jnp.asarray(x), jnp.asarray(eps),
                               "linf", method=method)
      assert np.all(np.asarray(b.lower)[:, None] <= f + 1e-4), method
      assert np.all(np.asarray(b.upper)[:, None] >= f - 1e-4), method
  # The radius matters: per-example eps must not be mixed up between examples.
  lo_small = linear.linear_bounds(model.apply, params, jnp.asarray(x), 0.02, "linf",
                                  method="crown").lower
  lo_mixed = linear.linear_bounds(model.apply, params, jnp.asarray(x), eps_b, "linf",
                                  method="crown").lower
  np.testing.assert_allclose(lo_mixed[0], lo_small[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ 2. comparison with the MIP

GAPS = collections.defaultdict(list)        # method -> list of (mip - bound) gaps
FASTLIN_VS_CROWN = collections.Counter()    # "fastlin", "crown", "tie"
ALPHA_VS_CROWN = collections.Counter()      # alpha_crown "tighter" than crown, or "tie"
MIP_TOL = 1e-5
# alpha-CROWN's rows of the comparison: name -> (intersect_ibp, options, the CROWN
# certifier with the same starting intermediate bounds, which it never falls below).
ALPHA_MIP = {
    "alpha_crown": (False, linear.AlphaConfig(), "crown"),
    "alpha_crown_intersect": (True, linear.AlphaConfig(), "crown_intersect"),
    "alpha_crown_row_inter": (False, linear.AlphaConfig(per_row=True,
                                                        optimize_intermediate=True), "crown"),
}


class TinyConv(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(8)(x))
    return nn.Dense(self.num_classes)(x)


class TinyPool(nn.Module):
  num_classes: int = 3
  relu_first: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), padding="SAME")(x)
    if self.relu_first:
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    else:
      x = nn.relu(nn.max_pool(x, (2, 2), strides=(2, 2)))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


# Jitted margin bounds of _compare_with_mip, one compile per model, set and certifier,
# shared by every radius and every seed (eager, each certifier's operations compile
# apart at each call: most of the MIP tests' time).
_MIP_COMPILED = {}


def _compiled_margins(model, norm, domain, method, intersect, alpha=None):
  key = (type(model), repr(model), norm, domain, method, intersect, alpha)
  if key not in _MIP_COMPILED:
    _MIP_COMPILED[key] = _jit_margins(model.apply, norm, domain, method, intersect, alpha)
  return _MIP_COMPILED[key]


def _compare_with_mip(model, params, x, y, eps, norm, domain=None, label=""):
  """Asserts every certifier's margins <= MIP's and IBP <= Zero; records the gaps."""
  apply_fn = model.apply
  res = mip.exact_margins(apply_fn, params, jnp.asarray(x), y, eps, norm, domain=domain,
                          time_limit=30.0)
  off = ~np.eye(res.min_margin.shape[1], dtype=bool)[y]
  assert np.all(res.status[off] == "optimal"), res.status
  exact = res.min_margin[off]
  # The MIP's own consistency: its minimiser lies in the set and attains the value.
  att = res.attained_margin[off]
  assert np.all(att >= exact - 1e-5 * (1 + np.abs(exact)))
  np.testing.assert_allclose(att, exact, atol=1e-4, rtol=1e-4)
  bounds = {}
  for method in METHODS + INTERSECTED:
    lb = np.asarray(_compiled_margins(model, norm, domain,
                                      *certify_lib.linear_options(method))(
        params, jnp.asarray(x), jnp.asarray(y), jnp.float32(eps)), np.float64)
    assert np.all(lb[~off] == 0.0), f"{method}: margin at j == y must be 0"
    lb = lb[off]
    viol = lb - exact
    assert np.all(viol <= MIP_TOL * (1 + np.abs(exact))), (
        f"{label} {method} {norm} eps={eps}: lower bound exceeds the exact minimum by "
        f"{viol.max():.3g}")
    bounds[method] = lb
    GAPS[method].extend((exact - lb).tolist())
  for name, (intersect, alpha, base) in ALPHA_MIP.items():
    lb = np.asarray(_compiled_margins(model, norm, domain, "alpha_crown", intersect, alpha)(
        params, jnp.asarray(x), jnp.asarray(y), jnp.float32(eps)), np.float64)
    assert np.all(lb[~off] == 0.0), f"{name}: margin at j == y must be 0"
    lb = lb[off]
    assert np.all(lb <= exact + MIP_TOL * (1 + np.abs(exact))), (
        f"{label} {name} {norm} eps={eps}: lower bound exceeds the exact minimum by "
        f"{(lb - exact).max():.3g}")
    assert np.all(lb >= bounds[base] - 1e-5 * (1 + np.abs(bounds[base]))), (
        f"{label} {name}: looser than {base} by {(bounds[base] - lb).max():.3g}")
    bounds[name] = lb
    GAPS[name].extend((exact - lb).tolist())
  ALPHA_VS_CROWN["tighter"] += int(np.sum(bounds["alpha_crown"] > bounds["crown"] + 1e-6))
  ALPHA_VS_CROWN["tie"] += int(np.sum(bounds["alpha_crown"] <= bounds["crown"] + 1e-6))
  # Appendix K: CNN-Cert-Zero is never looser than IBP (elementwise).
  worse = bounds["ibp"] - bounds["zero"]
  assert np.all(worse <= 1e-5 * (1 + np.abs(bounds["zero"]))), (
      f"{label}: IBP tighter than CNN-Cert-Zero by {worse.max():.3g}")
  for m in INTERSECTED:  # never looser than IBP (the output rows are intersected too)
    assert np.all(bounds[m] >= bounds["ibp"] - 1e-5 * (1 + np.abs(bounds["ibp"]))), m
  d = bounds["fastlin"] - bounds["crown"]
  FASTLIN_VS_CROWN["fastlin"] += int(np.sum(d > 1e-6))
  FASTLIN_VS_CROWN["crown"] += int(np.sum(d < -1e-6))
  FASTLIN_VS_CROWN["tie"] += int(np.sum(np.abs(d) <= 1e-6))
  return res, bounds


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("norm,eps_list", [("linf", (0.03, 0.1, 0.25)),
                                           ("l1", (0.2, 0.6))])
def test_mlp_vs_mip(seed, norm, eps_list):
  model = _mlp(3, hidden=(8, 8))
  params = random_params(model, (4,), seed=100 + seed, bias_std=0.3)
  x = nominal_inputs((4,), 4, seed=seed)
  y = np.random.default_rng(seed).integers(0, 3, size=4)
  for eps in eps_list:
    _compare_with_mip(model, params, x, y, eps, norm, label=f"mlp seed {seed}")


def test_mlp_vs_mip_with_domain():
  model = _mlp(3, hidden=(8, 8))
  params = random_params(model, (4,), seed=7, bias_std=0.3)
  x = nominal_inputs((4,), 4, seed=7)
  y = np.array([0, 1, 2, 0])
  for eps in (0.1, 0.3):
    res_box, b_box = _compare_with_mip(model, params, x, y, eps, "linf", domain=(0.0, 1.0),
                                       label="mlp box")
    res, b = _compare_with_mip(model, params, x, y, eps, "linf", label="mlp")
    off = ~np.eye(3, dtype=bool)[y]
    # The box only shrinks the set: the exact minimum and the bounds can only go up.
    assert np.all(res_box.min_margin[off] >= res.min_margin[off] - 1e-5)
    for m in METHODS:
      assert np.all(b_box[m] >= b[m] - 1e-5), m


@pytest.mark.sweep  # heavy (10-25 s): CI's sweep tier, not the default (tests/conftest.py)
@pytest.mark.parametrize("eps", [0.02, 0.08])
def test_conv_vs_mip(eps):
  model = TinyConv()
  params = random_params(model, (6, 6, 1), seed=3, bias_std=0.2)
  x = nominal_inputs((6, 6, 1), 3, seed=3)
  y = np.array([0, 1, 2])
  res, _ = _compare_with_mip(model, params, x, y, eps, "linf", label="conv")
  assert res.num_binaries.max() > 0  # some unstable ReLUs: not a trivial comparison


@pytest.mark.sweep  # heavy (10-25 s): CI's sweep tier, not the default (tests/conftest.py)
@pytest.mark.parametrize("relu_first", [True, False])
@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("linf", 0.15), ("l1", 0.5)])
def test_maxpool_vs_mip(relu_first, norm, eps):
  model = TinyPool(relu_first=relu_first)
  params = random_params(model, (4, 4, 1), seed=5, bias_std=0.2)
  x = nominal_inputs((4, 4, 1), 3, seed=5)
  y = np.array([2, 0, 1])
  res, _ = _compare_with_mip(model, params, x, y, eps, norm, label="pool")
  assert res.num_binaries.max() > 0


@pytest.mark.slow
def test_resnet_vs_mip():
  model = dm_jax.get_model("resnet", 3, width=2)
  params = random_params(model, (4, 4, 1), seed=9, bias_std=0.2)
  x = nominal_inputs((4, 4, 1), 3, seed=9)
  y = np.array([0, 2, 1])
  for eps in (0.05, 0.15):
    _compare_with_mip(model, params, x, y, eps, "linf", label="resnet")


def test_zz_gap_summary():
  """Prints the average gap to the MIP per method and fastlin-vs-crown counts."""
  if not GAPS:
    pytest.skip("no MIP comparison ran")
  lines = ["", "gap to the exact MIP minimum of the margin lower bounds:",
           f"{'method':>10} {'n':>5} {'mean gap':>10} {'median':>9} {'tight(<=1e-4)':>14}"]
  summary = {}
  for m in METHODS + INTERSECTED + tuple(ALPHA_MIP):
    g = np.array(GAPS[m])
    tight = float(np.mean(g <= 1e-4))
    summary[m] = (float(g.mean()), tight)
    lines.append(f"{m:>10} {g.size:>5} {g.mean():>10.4f} {np.median(g):>9.4f} "
                 f"{100 * tight:>13.1f}%")
  lines.append(f"fastlin tighter: {FASTLIN_VS_CROWN['fastlin']}, crown tighter: "
               f"{FASTLIN_VS_CROWN['crown']}, tie: {FASTLIN_VS_CROWN['tie']}")
  lines.append(f"alpha_crown tighter than crown: {ALPHA_VS_CROWN['tighter']}, tie: "
               f"{ALPHA_VS_CROWN['tie']}")
  print("\n".join(lines))
  # Zero never looser than IBP elementwise, hence on average too.
  assert summary["zero"][0] <= summary["ibp"][0] + 1e-6
  assert all(np.all(np.array(GAPS[m]) >= -1e-4) for m in METHODS + tuple(ALPHA_MIP))
  # alpha-CROWN shrinks the gap (never looser elementwise, asserted per case).
  assert summary["alpha_crown"][0] < summary["crown"][0], summary
  assert summary["alpha_crown_intersect"][0] < summary["crown_intersect"][0], summary


# ---------------------------------------------------------------- 3. jit and grad

class JitGradTest(chex.TestCase):

  def _variant_is_jit(self):
    return self._testMethodName.endswith("with_jit")

  def setUp(self):
    super().setUp()
    self.model = _mlp(3, hidden=(8, 8))
    self.params = random_params(self.model, (6,), seed=21, bias_std=0.2)
    self.x = jnp.asarray(nominal_inputs((6,), 3, seed=21))
    self.y = jnp.array([0, 1, 2])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*([(m, "linf") for m in METHODS]
                              + [("crown", "l2"), ("crown_ibp", "l2"), ("fastlin", "l1")]))
  def test_jit_equals_eager(self, method, norm):
    eps = 0.1 if norm == "linf" else 0.3
    fn = lambda p, x, y, e: linear.margin_lower_bounds(self.model.apply, p, x, y, e, norm,
                                                       method=method)
    ref = np.asarray(fn(self.params, self.x, self.y, eps))
    got = np.asarray(self.variant(fn)(self.params, self.x, self.y, jnp.float32(eps)))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # With a traced per-example eps too.
    e = jnp.full((3,), eps, jnp.float32)
    got2 = np.asarray(self.variant(fn)(self.params, self.x, self.y, e))
    np.testing.assert_allclose(got2, ref, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("fastlin", "linf"), ("crown_ibp", "linf"),
                            ("fastlin", "l2"), ("crown_ibp", "l2"), ("zero", "l1"))
  def test_grad_finite(self, method, norm):
    eps = {"linf": 0.1, "l2": 0.3, "l1": 0.5}[norm]

    def loss(p):
      lb = linear.margin_lower_bounds(self.model.apply, p, self.x, self.y, eps, norm,
                                      method=method)
      return jnp.mean(lb)

    val, g = self.variant(jax.value_and_grad(loss))(self.params)
    leaves = jax.tree_util.tree_leaves(g)
    assert np.isfinite(float(val))
    assert all(np.all(np.isfinite(np.asarray(l))) for l in leaves), method
    assert any(np.any(np.asarray(l) != 0) for l in leaves), "gradient is all zero"
    if not self._variant_is_jit():
      return
    # The directional derivative agrees with difference quotients. The bounds of crown
    # and zero (and crown_ibp) jump where a ReLU changes its relaxation, so compare with
    # the median quotient over a small grid rather than one central difference.
    d = jax.tree_util.tree_map(
        lambda l: jnp.asarray(np.random.default_rng(0).normal(size=l.shape), l.dtype), g)
    loss_j = jax.jit(loss)
    ts = np.linspace(-1e-3, 1e-3, 11)
    vals = [float(loss_j(jax.tree_util.tree_map(lambda a, b: a + t * b, self.params, d)))
            for t in ts]
    fd = float(np.median(np.diff(vals) / np.diff(ts)))
    an = sum(float(jnp.sum(a * b)) for a, b in zip(leaves, jax.tree_util.tree_leaves(d)))
    np.testing.assert_allclose(an, fd, rtol=5e-2, atol=1e-2)


@pytest.mark.sweep
def test_grad_conv_crown_ibp_finite():
  """Gradient through a conv model's CROWN-IBP bound (the training path) is finite."""
  model = TinyConv()
  params = random_params(model, (6, 6, 1), seed=4)
  x = jnp.asarray(nominal_inputs((6, 6, 1), 2, seed=4))
  y = jnp.array([0, 1])
  g = jax.grad(lambda p: jnp.mean(linear.margin_lower_bounds(
      model.apply, p, x, y, 0.05, "linf", method="crown_ibp")))(params)
  assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree_util.tree_leaves(g))


class BatchBlockTest(chex.TestCase):
  """``batch_block``: bounds computed block by block equal the unblocked ones."""

  def setUp(self):
    super().setUp()
    self.model = TinyConv()
    self.params = random_params(self.model, (6, 6, 1), seed=7)
    self.x = jnp.asarray(nominal_inputs((6, 6, 1), 7, seed=7))  # 7: uneven blocks

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*[(m, e) for m in ("crown_ibp", "fastlin", "crown")
                              for e in ("scalar", "per_example", "per_element")])
  def test_blocked_equals_unblocked(self, method, eps_kind):
    eps = {"scalar": jnp.float32(0.05),
           "per_example": jnp.linspace(0.0, 0.1, 7, dtype=jnp.float32),
           "per_element": jnp.asarray(np.random.default_rng(0).uniform(
               0.0, 0.1, self.x.shape), jnp.float32)}[eps_kind]
    spec = jnp.asarray(np.random.default_rng(1).normal(size=(7, 4, 3)), jnp.float32)

    def fn(x, e, s, block):
      return linear.linear_bounds(self.model.apply, self.params, x, e, "linf", spec=s,
                                  method=method, batch_block=block)

    ref = fn(self.x, eps, spec, 0)
    for block in (1, 3, 4):
      got = self.variant(functools.partial(fn, block=block))(self.x, eps, spec)
      chex.assert_shape((got.lower, got.upper), (7, 4))
      chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-5)
    # A shared (R, K) spec and l2 too.
    ref2 = linear.linear_bounds(self.model.apply, self.params, self.x, 0.3, "l2",
                                spec=spec[0], method=method, batch_block=0)
    got2 = self.variant(lambda x: linear.linear_bounds(
        self.model.apply, self.params, x, 0.3, "l2", spec=spec[0], method=method,
        batch_block=2))(self.x)
    chex.assert_trees_all_close(got2, ref2, rtol=1e-5, atol=1e-5)

  def test_margins_and_default(self):
    y = jnp.arange(7) % 3
    lb = linear.margin_lower_bounds(self.model.apply, self.params, self.x, y, 0.05,
                                    method="crown")  # default blocks on CPU
    ref = linear.margin_lower_bounds(self.model.apply, self.params, self.x, y, 0.05,
                                     method="crown", batch_block=0)
    chex.assert_trees_all_close(lb, ref, rtol=1e-5, atol=1e-5)
    assert linear.default_batch_block("ibp") == 0
    assert linear.default_batch_block("crown", "projections") == 0
    from dm_jax.core import fast_paths
    expected = linear.CPU_BATCH_BLOCK["crown"] if fast_paths.enabled() else 0
    assert linear.default_batch_block("CNN-Cert-Ada") == expected

  def test_bad_batch_block(self):
    for bad in (-1, 2.5, "4"):
      with pytest.raises(ValueError, match="batch_block"):
        linear.linear_bounds(self.model.apply, self.params, self.x, 0.05, method="crown",
                             batch_block=bad)


@pytest.mark.parametrize("method", METHODS)
def test_mc_soundness_relu_with_nonzero_constant(method):
  """max(h, c) with c != 0 (the shifted relaxation; plain ReLU skips the intercepts)."""
  rng = np.random.default_rng(11)
  params = {"w1": jnp.asarray(rng.normal(size=(5, 12)), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(12, 12)) / 3, jnp.float32),
            "w3": jnp.asarray(rng.normal(size=(12, 4)) / 3, jnp.float32)}

  def fn(p, x):
    h = jnp.maximum(x @ p["w1"], 0.3)
    h = jnp.maximum(h @ p["w2"] - 0.5, -0.2)
    return jax.nn.relu(h) @ p["w3"]

  x = jnp.asarray(rng.uniform(size=(3, 5)), jnp.float32)
  eps = 0.2
  b = linear.linear_bounds(fn, params, x, eps, "linf", method=method)
  pts = np.asarray(x)[:, None] + eps * rng.choice([-1.0, 1.0], size=(3, 2000, 5))
  pts[:, :1000] = np.asarray(x)[:, None] + rng.uniform(-eps, eps, size=(3, 1000, 5))
  f = np.asarray(jax.vmap(lambda p: fn(params, p))(jnp.asarray(pts, jnp.float32)))
  assert np.all(np.asarray(b.lower)[:, None] <= f + 1e-4), method
  assert np.all(np.asarray(b.upper)[:, None] >= f - 1e-4), method
  # Not vacuous: the first layer has unstable units around c = 0.3.
  pre = np.asarray(x) @ np.asarray(params["w1"])
  radius = eps * np.abs(np.asarray(params["w1"])).sum(0)
  assert np.any((pre - radius < 0.3) & (pre + radius > 0.3))


# ------------------------------------------- 4. intersection with IBP's intervals
# On random nets of the usual layers the linear bounds are tighter than IBP's at every
# neuron and the intersection changes nothing. IBP wins where the layer before a ReLU
# layer maps the set onto (nearly) independent coordinates: after a diagonal first layer
# the second pre-activations' interval is exact, after a 1x1 conv nearly so.

_DN = ("NHWC", "HWIO", "NHWC")


def _diag_mlp(p, x, taps=None):
  """x (B, 8) * scale + shift, relu, dense 12, relu, dense 12, relu, dense 3."""
  h = x.reshape((x.shape[0], -1)) * p["scale"] + p["shift"]
  for i in range(2):
    taps is not None and taps.append(h)
    h = jax.nn.relu(h) @ p[f"w{i}"] + p[f"b{i}"]
  taps is not None and taps.append(h)
  return jax.nn.relu(h) @ p["w2"] + p["b2"]


def _pixel_conv(p, x, taps=None):
  """conv 2 1x1, relu, conv 6 3x3/2 SAME, relu, dense 12, relu, dense 3 (NHWC)."""
  h = jax.lax.conv_general_dilated(x, p["k0"], (1, 1), "SAME", dimension_numbers=_DN)
  h = h + p["c0"]
  taps is not None and taps.append(h)
  h = jax.lax.conv_general_dilated(jax.nn.relu(h), p["k1"], (2, 2), "SAME",
                                   dimension_numbers=_DN) + p["c1"]
  taps is not None and taps.append(h)
  h = jax.nn.relu(h).reshape((x.shape[0], -1)) @ p["w0"] + p["b0"]
  taps is not None and taps.append(h)
  return jax.nn.relu(h) @ p["w1"] + p["b1"]


def _intersect_params(name, seed):
  rng = np.random.default_rng(seed)
  n = lambda *shape, scale=1.0: jnp.asarray(
      rng.normal(0.0, scale / np.sqrt(np.prod(shape[:-1])), shape), jnp.float32)
  b = lambda k: jnp.asarray(rng.normal(0.0, 0.3, (k,)), jnp.float32)
  if name == "diag_mlp":
    return {"scale": jnp.asarray(rng.normal(size=8), jnp.float32), "shift": b(8),
            "w0": n(8, 12), "b0": b(12), "w1": n(12, 12), "b1": b(12), "w2": n(12, 3),
            "b2": b(3)}
  return {"k0": n(1, 1, 1, 2), "c0": b(2), "k1": n(3, 3, 2, 6), "c1": b(6),
          "w0": n(54, 12), "b0": b(12), "w1": n(12, 3), "b1": b(3)}


# name: (model, input shape, eps of the checks)
INTERSECT_MODELS = {"diag_mlp": (_diag_mlp, (8,), 0.4), "pixel_conv": (_pixel_conv, (6, 6, 1), 0.2)}


class IntersectTest(chex.TestCase):
  """``intersect_ibp=True``: sound, never looser than IBP, strictly tighter than the
  textbook method somewhere (so the test fails if the option does nothing)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("diag_mlp", "linf_box"), ("pixel_conv", "linf_box"),
                            ("diag_mlp", "linf"), ("pixel_conv", "linf"))
  def test_sound_never_looser_than_ibp_and_tighter(self, name, set_name):
    fn, shape, eps = INTERSECT_MODELS[name]
    params = _intersect_params(name, seed=1)
    domain = (0.0, 1.0) if set_name == "linf_box" else None
    B = 4
    x = nominal_inputs(shape, B, seed=2)
    num_classes = 3
    y = np.asarray(fn(params, jnp.asarray(x))).argmax(-1)
    rng = np.random.default_rng(3)
    spec = np.concatenate([rng.normal(size=(B, 3, num_classes)),
                           np.asarray(linear.margin_spec(jnp.asarray(y), num_classes))],
                          axis=1).astype(np.float32)

    def bounds(method, intersect, use_patches=True):
      run = lambda x_, e_: linear.linear_bounds(
          fn, params, x_, e_, "linf", spec=jnp.asarray(spec), method=method,
          domain=domain, intersect_ibp=intersect, use_patches=use_patches)
      b = self.variant(run)(jnp.asarray(x), jnp.float32(eps))
      return np.asarray(b.lower, np.float64), np.asarray(b.upper, np.float64)

    pts = sample_points(x, eps, "linf", 400, domain=domain, seed=11)
    pts = np.concatenate(
        [pts, directed_points(fn, params, x, spec, eps, "linf", domain, None)], axis=1)
    f = np.asarray(jax.jit(fn)(params, jnp.asarray(pts.reshape((-1,) + shape), jnp.float32)))
    vals = np.einsum("bnk,brk->bnr", f.reshape(B, pts.shape[1], -1).astype(np.float64),
                     spec.astype(np.float64))
    vmin, vmax = vals.min(axis=1), vals.max(axis=1)
    tol = 1e-4 * (1.0 + np.abs(vals).max())
    ibp_lo, ibp_up = bounds("ibp", False)
    gains = {}
    for m in LINEAR_METHODS:
      lo, up = bounds(m, True)
      plain_lo, plain_up = bounds(m, False)
      assert np.all(lo <= vmin + tol) and np.all(up >= vmax - tol), (
          f"{m} intersected: unsound by {max((lo - vmin).max(), (vmax - up).max()):.3g}")
      assert np.all(lo >= ibp_lo - 1e-5 * (1 + np.abs(ibp_lo))), m
      assert np.all(up <= ibp_up + 1e-5 * (1 + np.abs(ibp_up))), m
      gains[m] = max((lo - plain_lo).max(), (plain_up - up).max())
      if name == "pixel_conv" and m == "crown":  # the windowed and dense paths agree
        lo_d, up_d = bounds(m, True, use_patches=False)
        np.testing.assert_allclose(lo_d, lo, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(up_d, up, rtol=1e-4, atol=1e-4)
    # The option does something for fastlin and crown. Zero's bounds are never looser
    # than IBP's (Appendix K), at every layer, so for zero it changes nothing.
    assert gains["fastlin"] > 1e-3 and gains["crown"] > 1e-3, gains
    assert gains["zero"] <= 1e-5, gains

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("pixel_conv", "linf"), ("diag_mlp", "linf_box"))
  def test_relu_inputs_sound_and_inside_ibp(self, name, set_name):
    """Every ReLU input's intersected bounds hold at sampled points, lie inside IBP's
    interval and inside the textbook bounds at the first layer computed by backward
    passes (both start from the same exact first layer); fewer unstable ReLUs."""
    fn, shape, eps = INTERSECT_MODELS[name]
    params = _intersect_params(name, seed=1)
    domain = (0.0, 1.0) if set_name == "linf_box" else None
    x = nominal_inputs(shape, 4, seed=2)
    pts = sample_points(x, eps, "linf", 600, domain=domain, seed=5)

    def taps(xs):
      out = []
      fn(params, xs, out)
      return out

    sampled = jax.jit(taps)(jnp.asarray(pts.reshape((-1,) + shape), jnp.float32))
    sampled = [np.asarray(t).reshape((4, pts.shape[1]) + t.shape[1:]) for t in sampled]
    ibp = dm_jax.interval_bounds(fn, params, jnp.asarray(x), eps, domain=domain,
                                 return_relu_inputs=True)[1]
    for m in ("fastlin", "crown"):
      run = lambda x_, e_, i: linear.relu_input_bounds(fn, params, x_, e_, method=m,
                                                       domain=domain, intersect_ibp=i)
      got = self.variant(functools.partial(run, i=True))(jnp.asarray(x), jnp.float32(eps))
      plain = self.variant(functools.partial(run, i=False))(jnp.asarray(x), jnp.float32(eps))
      assert len(got) == len(sampled) == len(ibp) == 3
      unstable = lambda bs: sum(int(np.sum((np.asarray(l) < 0) & (np.asarray(u) > 0)))
                                for l, u in bs)
      for layer, ((l, u), t, b, (pl, pu)) in enumerate(zip(got, sampled, ibp, plain)):
        l, u = np.asarray(l, np.float64), np.asarray(u, np.float64)
        helpers.assert_within(l, u, t.min(axis=1), t.max(axis=1), f"{m} relu {layer}",
                              rtol=1e-4)
        assert np.all(l >= np.asarray(b.lower) - 1e-6), (m, layer)
        assert np.all(u <= np.asarray(b.upper) + 1e-6), (m, layer)
        if layer == 1:
          assert np.all(l >= np.asarray(pl) - 1e-5) and np.all(u <= np.asarray(pu) + 1e-5)
      assert unstable(got) < unstable(plain), m

  def test_bad_options(self):
    fn, shape, eps = INTERSECT_MODELS["diag_mlp"]
    params = _intersect_params("diag_mlp", 0)
    x = jnp.asarray(nominal_inputs(shape, 2, 0))
    with pytest.raises(ValueError, match="intersect_ibp"):
      linear.linear_bounds(fn, params, x, eps, method="fastlin", intersect_ibp="yes")
    with pytest.raises(ValueError, match="projections"):
      linear.linear_bounds(fn, params, x, eps, method="fastlin", intermediate="projections",
                           key=jax.random.PRNGKey(0), intersect_ibp=True)
    # ibp and crown_ibp have IBP's intermediates already: the option changes nothing.
    for m in ("ibp", "crown_ibp"):
      a = linear.linear_bounds(fn, params, x, eps, method=m)
      b = linear.linear_bounds(fn, params, x, eps, method=m, intersect_ibp=True)
      chex.assert_trees_all_close(a, b)


@pytest.mark.parametrize("eps", [0.3, 0.15])
def test_intersected_vs_mip(eps):
  """On a tiny diagonal-first-layer MLP where the intersection tightens the bounds, the
  intersected margins stay below the exact MIP minimum (and the textbook ones too)."""
  fn, shape, _ = INTERSECT_MODELS["diag_mlp"]
  params = _intersect_params("diag_mlp", seed=1)
  x = nominal_inputs(shape, 4, seed=2)
  y = np.asarray(fn(params, jnp.asarray(x))).argmax(-1)
  res = mip.exact_margins(fn, params, jnp.asarray(x), y, eps, "linf", time_limit=30.0)
  off = ~np.eye(3, dtype=bool)[y]
  assert np.all(res.status[off] == "optimal"), res.status
  exact = res.min_margin[off]
  gain = 0.0
  for m in LINEAR_METHODS:
    lb = np.asarray(margin_bounds(fn, params, jnp.asarray(x), jnp.asarray(y), eps, "linf",
                                  m + "_intersect"), np.float64)[off]
    plain = np.asarray(margin_bounds(fn, params, jnp.asarray(x), jnp.asarray(y), eps,
                                     "linf", m), np.float64)[off]
    assert np.all(lb <= exact + MIP_TOL * (1 + np.abs(exact))), (
        f"{m}_intersect above the exact minimum by {(lb - exact).max():.3g}")
    gain = max(gain, (lb - plain).max())
  assert gain > 1e-3, "the intersection changed no margin: the test is vacuous"
  assert res.num_binaries.max() > 0


# ------------------------------------------------------------------- 5. alpha-CROWN
# method="alpha_crown": CROWN's relaxation with the lower slope of every unstable ReLU a
# parameter in [0, 1], optimised by projected Adam; each row keeps its best iterate.

ALPHA_OPTIONS = {
    "default": linear.AlphaConfig(),
    "per_row": linear.AlphaConfig(per_row=True),
    "min": linear.AlphaConfig(objective="min", lr=0.3),
    "inter": linear.AlphaConfig(optimize_intermediate=True),
    "inter_row": linear.AlphaConfig(optimize_intermediate=True, per_row=True, steps=10),
    "unroll": linear.AlphaConfig(steps=4, unroll=True),
    "ibp": linear.AlphaConfig(),  # with intermediate="ibp" (alpha-CROWN-IBP)
}


@functools.lru_cache(maxsize=None)
def _jit_margins(apply_fn, norm, domain, method, intersect, alpha):
  """Jitted ``linear.margin_lower_bounds`` (eps traced; one compile per model and shape)."""
  return jax.jit(lambda params, x, y, eps: linear.margin_lower_bounds(
      apply_fn, params, x, y, eps, norm, method=method, domain=domain,
      intersect_ibp=intersect, alpha=alpha))


def _spec_rows(apply_fn, params, x, seed):
  """Three random rows and the margin rows of the predicted class: (B, 3 + K, K)."""
  num_classes = int(apply_fn(params, jnp.asarray(x[:1])).shape[-1])
  y = np.asarray(apply_fn(params, jnp.asarray(x))).argmax(-1)
  rng = np.random.default_rng(seed)
  return y, np.concatenate([rng.normal(size=(x.shape[0], 3, num_classes)),
                            np.asarray(linear.margin_spec(jnp.asarray(y), num_classes))],
                           axis=1).astype(np.float32)


def _sampled_values(apply_fn, params, x, spec, eps, norm, domain, k=None):
  """(min, max) of ``spec @ f`` over sampled and PGD-directed points of the set, and the
  tolerance of the comparisons."""
  B = x.shape[0]
  pts = sample_points(x, eps, norm, 400, k=k, domain=domain, seed=11)
  pts = np.concatenate(
      [pts, directed_points(apply_fn, params, x, spec, eps, norm, domain, k)], axis=1)
  f = np.asarray(_jit_apply(apply_fn)(params, jnp.asarray(
      pts.reshape((-1,) + x.shape[1:]), jnp.float32))).reshape(B, pts.shape[1], -1)
  vals = np.einsum("bnk,brk->bnr", f.astype(np.float64), spec.astype(np.float64))
  return vals.min(axis=1), vals.max(axis=1), 1e-4 * (1.0 + np.abs(vals).max())


class AlphaCrownTest(chex.TestCase):
  """Sound at sampled and PGD-directed points, never looser than CROWN with the same
  intermediate bounds, strictly tighter somewhere; jit = eager; blocks change nothing."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("mlp", "linf", "default", False),
                            ("small", "linf_box", "inter_row", False),
                            ("mlp", "l2", "min", False),
                            ("pooling", "linf", "per_row", False),
                            ("small", "linf", "inter", True),
                            ("mlp", "l1", "per_row", True),
                            ("resnet", "linf_box", "default", False),
                            ("mlp", "linf", "unroll", False),
                            ("small", "linf_box", "ibp", False))
  def test_sound_and_never_looser_than_crown(self, name, set_name, option, intersect):
    _, shape, e_inf, e_2, e_1, _ = SOUNDNESS_MODELS[name]
    model, params = _soundness_setup(name)
    apply_fn = model.apply
    norm = "linf" if set_name == "linf_box" else set_name
    domain = (0.0, 1.0) if set_name == "linf_box" else None
    eps = {"linf": e_inf, "l2": e_2, "l1": e_1}[norm]
    x = nominal_inputs(shape, 2, seed=7)
    _, spec = _spec_rows(apply_fn, params, x, seed=3)

    inter = "ibp" if option == "ibp" else None

    def bounds(method, alpha=None):
      run = lambda x_, e_: linear.linear_bounds(
          apply_fn, params, x_, e_, norm, spec=jnp.asarray(spec), method=method,
          domain=domain, intersect_ibp=intersect, alpha=alpha, intermediate=inter)
      b = self.variant(run)(jnp.asarray(x), jnp.float32(eps))
      return np.asarray(b.lower, np.float64), np.asarray(b.upper, np.float64)

    lo, up = bounds("alpha_crown", ALPHA_OPTIONS[option])
    vmin, vmax, tol = _sampled_values(apply_fn, params, x, spec, eps, norm, domain)
    assert np.all(lo <= vmin + tol) and np.all(up >= vmax - tol), (
        f"alpha_crown {option}: unsound by {max((lo - vmin).max(), (vmax - up).max()):.3g}")
    c_lo, c_up = bounds("crown" if inter is None else "crown_ibp")
    slack = 1e-5 * (1 + np.abs(c_lo) + np.abs(c_up))
    assert np.all(lo >= c_lo - slack) and np.all(up <= c_up + slack), (
        f"looser than CROWN by {max((c_lo - lo).max(), (up - c_up).max()):.3g}")
    gain = max((lo - c_lo).max(), (c_up - up).max())
    assert gain > 1e-4, f"alpha_crown {option} changed no bound: the test is vacuous"

  @chex.variants(with_jit=True, without_jit=True)
  def test_blocks_zero_steps_and_margins(self):
    """Blocks do not change the result (each example's slopes are its own: Adam acts
    per coordinate, the objective is a sum over examples); 0 steps is CROWN; the
    margins are alpha-CROWN's rows j != y with 0 at j == y."""
    model = TinyConv()
    params = random_params(model, (6, 6, 1), seed=7)
    x = jnp.asarray(nominal_inputs((6, 6, 1), 5, seed=7))
    y = jnp.arange(5) % 3
    margins = lambda block, alpha, method="alpha_crown": self.variant(
        lambda x_, e_: linear.margin_lower_bounds(model.apply, params, x_, y, e_,
                                                  method=method, alpha=alpha,
                                                  batch_block=block))(x, jnp.float32(0.08))
    for alpha in (linear.AlphaConfig(steps=5), linear.AlphaConfig(
        steps=5, objective="min", per_row=True, optimize_intermediate=True)):
      ref = margins(0, alpha)
      chex.assert_trees_all_close(margins(2, alpha), ref, rtol=1e-5, atol=1e-5)
      assert np.all(np.asarray(ref)[np.arange(5), np.asarray(y)] == 0.0)
    crown = margins(0, None, "crown")
    chex.assert_trees_all_close(margins(0, linear.AlphaConfig(steps=0)), crown,
                                rtol=1e-6, atol=1e-6)

  def test_bad_options(self):
    model, params = _soundness_setup("mlp")
    x = jnp.asarray(nominal_inputs(SOUNDNESS_MODELS["mlp"][1], 2, 0))
    bad_configs = [dict(steps=-1), dict(steps=2.5), dict(lr=0.0), dict(lr=float("nan")),
                   dict(objective="mean"), dict(per_row="yes"),
                   dict(optimize_intermediate=1), dict(unroll=None)]
    for kw in bad_configs:
      with pytest.raises(ValueError, match="alpha"):
        linear.AlphaConfig(**kw)
    run = lambda **kw: linear.linear_bounds(model.apply, params, x, 0.05, **kw)
    with pytest.raises(ValueError, match="alpha_crown"):
      run(method="crown", alpha=linear.AlphaConfig())
    with pytest.raises(ValueError, match="AlphaConfig"):
      run(method="alpha_crown", alpha={"steps": 3})
    with pytest.raises(ValueError, match="intermediate"):
      run(method="alpha_crown", intermediate="projections", key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="optimize_intermediate"):
      run(method="alpha_crown", intermediate="ibp",
          alpha=linear.AlphaConfig(optimize_intermediate=True))
    for name in ("alpha_crown", "α-CROWN", "alpha-crown"):
      assert linear.canonical_method(name) == "alpha_crown"
    assert certify_lib.canonical_certifier("α-CROWN+ibp") == "alpha_crown_intersect"
    assert certify_lib.label("alpha_crown_intersect") == "α-CROWN ∩ IBP"


@pytest.mark.parametrize("name", ["diag_mlp", "pixel_conv"])
def test_sound_for_every_alpha(name):
  """Any slopes, also outside [0, 1] (clipped by the relaxation), give sound bounds:
  the output rows and every layer's intermediate bounds (dense and windowed passes) at
  sampled points; slopes 0 and u / (u - l) reproduce zero's and fastlin's passes."""
  fn, shape, eps = INTERSECT_MODELS[name]
  params = _intersect_params(name, seed=1)
  B = 3
  x = nominal_inputs(shape, B, seed=2)
  _, spec = _spec_rows(fn, params, x, seed=4)
  iset = linear.make_input_set(jnp.asarray(x), eps, "linf", None, None)
  tape = linear.record_tape(fn, params, iset)
  bounds = linear.intermediate_bounds(tape, "crown", "linear")
  relus = linear._relu_inputs(tape, tape.output)
  rng = np.random.default_rng(0)
  draw = lambda node: jnp.asarray(rng.uniform(-0.5, 1.5, node_shape(node)), jnp.float32)
  node_shape = lambda node: linear.node_shape(tape, node)
  A = jnp.asarray(spec).reshape((B, -1) + linear.node_shape(tape, tape.output)[1:])
  vmin, _, tol = _sampled_values(fn, params, x, spec, eps, "linf", None)
  for trial in range(3):
    alphas = {n: draw(n) for n in relus}
    low = np.asarray(linear.backward(tape, tape.output, A, bounds, "crown", alphas=alphas))
    assert np.all(low <= vmin + tol), f"trial {trial}: unsound by {(low - vmin).max():.3g}"
    clipped = {n: jnp.clip(a, 0, 1) for n, a in alphas.items()}
    np.testing.assert_allclose(low, linear.backward(tape, tape.output, A, bounds, "crown",
                                                    alphas=clipped), rtol=1e-6, atol=1e-6)
  for method, slope in (("zero", lambda l, u: jnp.zeros_like(l)),
                        ("fastlin", lambda l, u: u / jnp.where(u > l, u - l, 1.0))):
    alphas = {n: slope(*bounds[n]) for n in relus}
    np.testing.assert_allclose(
        linear.backward(tape, tape.output, A, bounds, "crown", alphas=alphas),
        linear.backward(tape, tape.output, A, bounds, method), rtol=1e-5, atol=1e-5)
  # Intermediate bounds with random slopes per layer, against the sampled ReLU inputs.
  pts = sample_points(x, eps, "linf", 600, seed=5)

  def taps(xs):
    out = []
    fn(params, xs, out)
    return out

  sampled = jax.jit(taps)(jnp.asarray(pts.reshape((-1,) + shape), jnp.float32))
  layer_alphas = {node: {n: draw(n) for n in linear._relu_inputs(tape, node)}
                  for node, by_backward in linear._bounded_nodes(tape, "linear")
                  if by_backward}
  assert layer_alphas and any(layer_alphas.values())
  for use_patches in (True, False):
    got = linear.intermediate_bounds(tape, "crown", "linear", use_patches=use_patches,
                                     alphas=layer_alphas)
    order = [node for node, _ in linear._bounded_nodes(tape, "linear")]
    assert len(order) == len(sampled)
    for node, t in zip(order, sampled):
      t = np.asarray(t).reshape((B, pts.shape[1]) + t.shape[1:])
      helpers.assert_within(got[node][0], got[node][1], t.min(axis=1), t.max(axis=1),
                            f"{name} node {node} patches={use_patches}", rtol=1e-4)
