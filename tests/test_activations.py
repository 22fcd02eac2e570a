"""Activations beyond ReLU (issue 18, item 5): interval rules and linear relaxations of
tanh, logistic, erf, erfc, exp, expm1, log1p, softplus (``jnp.logaddexp``), |x|, x**2,
integer powers and products of two input-dependent values.

1. The lines of :func:`dm_jax.bounds.activations.lines` bound g at dense samples of
   [l, u] (checked in float64, with a float32 slack) for random intervals of every kind
   (degenerate, widths 1e-7 and 1e-6, straddling 0, fully negative or positive, +-50,
   very wide, overflowing, infinite), jitted and eagerly, with the curvature the
   primitive table claims; the claim itself is checked by second differences. Their
   gradients in (l, u) are finite, also on degenerate intervals. McCormick's planes
   bound x * y on dense grids of random boxes.
2. Small MLPs with tanh / sigmoid / GELU (both forms) / softplus / SiLU / x**3 hidden
   layers: IBP and the linear methods (crown, fastlin, crown_ibp, crown ∩ IBP,
   alpha-CROWN) bound the outputs at thousands of sampled, gradient-directed and PGD
   (dm_jax's ``pgd_attack``) points of the l-inf ball, the l-inf ball within the box
   [0, 1], and the l2 ball, and every margin's lower bound is below f_y - f_j at all of
   them; the mean widths are printed (run with ``-s``) and CROWN is not looser than IBP
   on average. A small CNN with tanh / GELU / sigmoid / softplus: the windowed (patch)
   pass equals the dense one, its logit and margin bounds hold (l-inf, with and
   without the box, l2). Very wide balls give no NaN.
3. ``certify`` end to end on a Flax tanh model.
4. The forward rules: exact interval images of valleys and products after one affine
   map; Double Margin through the monotone ones; jnp.logaddexp recognised as a
   composite (and a look-alike not).
5. What stays unsupported raises an error naming the primitive and the domains that
   support it.
"""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax import lax

import dm_jax
import helpers as U
from dm_jax.bounds import activations, linear
from dm_jax.core import interpreter, primitives
from dm_jax.core.errors import UnsupportedPrimitiveError
from dm_jax.train.methods import attacks
from dm_jax.verify import certify as certify_lib

# The extra cases of every test here go to the slow tier (conftest.py: each first case
# runs by default): together they would push CI past its time limit. Run them with
# pytest -m "" before changing the code they test.
SLOW_SWEEPS = "all"

# name -> (g, the table's rule name, the equation's params): the curvature the lines use
# is the table's (primitives.curvature_of), so a wrong claim there fails the tests here.
FUNCTIONS = {
    "tanh": (jnp.tanh, "tanh", {}),
    "logistic": (jax.nn.sigmoid, "logistic", {}),
    "erf": (jax.scipy.special.erf, "erf", {}),
    "erfc": (jax.scipy.special.erfc, "erfc", {}),
    "exp": (jnp.exp, "exp", {}),
    "expm1": (jnp.expm1, "expm1", {}),
    "log1p": (jnp.log1p, "log1p", {}),
    "softplus": (jax.nn.softplus, "logaddexp", {}),
    "square": (jnp.square, "square", {}),
    "abs": (jnp.abs, "abs", {}),
    "pow3": (lambda t: t ** 3, "integer_pow", {"y": 3}),
    "pow4": (lambda t: t ** 4, "integer_pow", {"y": 4}),
    "pow5": (lambda t: t ** 5, "integer_pow", {"y": 5}),
}
TOL = 1e-5  # relative, per sampled value (float32 evaluation of g)


def curvature(name):
  _, rule_name, params = FUNCTIONS[name]
  return primitives.curvature_of(primitives.rule(rule_name), params)


def random_intervals(rng, n=60):
  """(l, u) float32 of every kind: degenerate, tiny (1e-7, 1e-6), small, straddling 0,
  fully negative / positive, wide (+-50), very wide."""
  kinds = []
  c = lambda s: rng.normal(size=n) * s
  w = lambda s: np.abs(rng.normal(size=n)) * s
  for centre, width in [(c(2.0), 0.0 * w(1)), (c(2.0), w(1e-7)), (c(2.0), w(1e-6)),
                        (c(0.5), w(0.05)), (c(20.0), w(50.0)), (0 * c(1), 50 + 0 * w(1)),
                        (c(0.1), w(1.0) + 0.2), (-2 - w(3), w(1.0)), (2 + w(3), w(1.0)),
                        (c(5.0), w(10.0)), (c(50.0), w(1e3)), (c(1e3), w(1e5))]:
    kinds.append((centre - width, centre + width))
  l = np.concatenate([k[0] for k in kinds]).astype(np.float32)
  u = np.concatenate([k[1] for k in kinds]).astype(np.float32)
  return l, np.maximum(u, l)


def dense_samples(l, u, n=257):
  t = np.linspace(0.0, 1.0, n)
  x = (l[:, None].astype(np.float64) + t[None] * (u - l)[:, None]).astype(np.float32)
  return np.clip(x, l[:, None], u[:, None])  # (rounding may leave [l, u] otherwise)


def assert_lines_bound(g, ln, l, u, what):
  x = dense_samples(l, u)
  gx = np.asarray(g(jnp.asarray(x)), np.float64)
  lo = np.asarray(ln.lo_s, np.float64)[:, None] * x + np.asarray(ln.lo_b, np.float64)[:, None]
  up = np.asarray(ln.up_s, np.float64)[:, None] * x + np.asarray(ln.up_b, np.float64)[:, None]
  finite = np.isfinite(gx)
  tol = TOL * (1 + np.abs(np.where(finite, gx, 0)))
  with np.errstate(invalid="ignore"):
    below = np.where(finite, lo - gx - tol, -1.0)
    above = np.where(finite, gx - up - tol, -1.0)
  i, j = np.unravel_index(np.argmax(below), below.shape)
  assert below[i, j] <= 0, (what, "lower", float(below[i, j]), l[i], u[i], x[i, j])
  i, j = np.unravel_index(np.argmax(above), above.shape)
  assert above[i, j] <= 0, (what, "upper", float(above[i, j]), l[i], u[i], x[i, j])
  assert np.all(np.isfinite(np.asarray(ln.lo_s))) and np.all(np.isfinite(np.asarray(ln.up_s)))
  assert not np.any(np.isnan(np.asarray(ln.lo_b))) and not np.any(np.isnan(np.asarray(ln.up_b)))


# --------------------------------------------------------------------- 1. the lines

def test_table_curvature_matches_the_function():
  """The curvature the table claims, checked by second differences on [-6, 6]."""
  x = np.linspace(-6, 6, 241)  # (h = 0.05: float32 noise in d2 ~ 5e-5)
  h = x[1] - x[0]
  for name, (g, _, _) in FUNCTIONS.items():
    xs = x[x > -0.9] if name == "log1p" else x
    v = np.asarray(g(jnp.asarray(xs, jnp.float32)), np.float64)
    d2 = (v[2:] - 2 * v[1:-1] + v[:-2]) / h ** 2
    mid = xs[1:-1]
    tol = 1e-3 * (1 + np.abs(d2).max())
    shape = curvature(name)
    sign = {primitives.CONVEX: np.ones_like(mid), primitives.CONCAVE: -np.ones_like(mid),
            primitives.S_SHAPED: -np.sign(mid), primitives.REVERSE_S: np.sign(mid)}[shape]
    assert np.all(sign * d2 >= -tol), (name, shape)


class LinesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*FUNCTIONS)
  def test_lines_bound_g_on_dense_samples(self, name):
    g = FUNCTIONS[name][0]
    l, u = random_intervals(np.random.default_rng(0))
    if name == "log1p":  # defined above -1
      l, u = np.maximum(l, -0.99).astype(np.float32), np.maximum(u, -0.99).astype(np.float32)
    fallback = (jnp.full(l.shape, -jnp.inf), jnp.full(l.shape, jnp.inf))
    ln = self.variant(lambda a, b: activations.lines(g, curvature(name), a, b, fallback))(l, u)
    assert_lines_bound(g, ln, l, u, name)
    # Degenerate intervals: both lines pass through g(l).
    point = l == u
    at = lambda s, b: np.asarray(s)[point] * l[point] + np.asarray(b)[point]
    gl = np.asarray(g(jnp.asarray(l[point])))
    tol = 1e-5 * (1 + np.abs(gl) + np.abs(np.asarray(ln.up_s)[point] * l[point]))
    assert np.all(np.abs(at(ln.lo_s, ln.lo_b) - gl) <= tol), name
    assert np.all(np.abs(at(ln.up_s, ln.up_b) - gl) <= tol), name

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.sweep  # heavy (10-25 s): CI's sweep tier, not the default (tests/conftest.py)
  def test_edge_intervals_and_finite_gradients(self):
    """Points, widths 1e-7 (around 0 too), [-50, 50] and its halves: the lines bound g
    (float64 check, float32 slack), and their gradients in (l, u), as training takes
    them, are finite for every function."""
    ends = [(0.0, 0.0), (1.0, 1.0), (-3.0, -3.0), (30.0, 30.0), (0.0, 1e-7),
            (-1e-7, 1e-7), (-1e-7, 0.0), (0.5, 0.5 + 1e-7), (-2.0, -2.0 + 1e-7),
            (-50.0, 50.0), (-50.0, 0.0), (0.0, 50.0), (-50.0, -49.0), (49.0, 50.0),
            (-0.5, 50.0), (-50.0, 0.5)]
    l0, u0 = (np.asarray(e, np.float32) for e in zip(*ends))
    for name, (g, _, _) in FUNCTIONS.items():
      l, u = l0, u0
      if name == "log1p":
        l, u = np.maximum(l, -0.9).astype(np.float32), np.maximum(u, -0.9).astype(np.float32)
      fallback = (jnp.full(l.shape, -jnp.inf), jnp.full(l.shape, jnp.inf))
      fn = lambda a, b, g=g, name=name: activations.lines(g, curvature(name), a, b, fallback)
      ln = self.variant(fn)(l, u)
      assert_lines_bound(g, ln, l, u, name)

      def value(a, b, fn=fn):  # the lines at the midpoint, summed (as a backward pass)
        out = fn(a, b)
        m = (a + b) / 2
        return jnp.sum(out.lo_s * m + out.lo_b + out.up_s * m + out.up_b)

      gl, gu = self.variant(jax.grad(value, argnums=(0, 1)))(l, u)
      assert np.all(np.isfinite(gl)) and np.all(np.isfinite(gu)), (name, gl, gu)

  @chex.variants(with_jit=True, without_jit=True)
  def test_infinite_or_overflowing_bounds_fall_back(self):
    """Infinite ends, and exp's secant overflowing, take the fallback (constant) lines;
    no NaN anywhere."""
    l = jnp.asarray([-jnp.inf, -1.0, -jnp.inf, 50.0, -3.0], jnp.float32)
    u = jnp.asarray([1.0, jnp.inf, jnp.inf, 200.0, 120.0], jnp.float32)
    lo, hi = jnp.full_like(l, -7.0), jnp.full_like(l, 9.0)
    for name in ("tanh", "exp", "pow3", "softplus"):
      g = FUNCTIONS[name][0]
      ln = self.variant(lambda a, b, g=g, name=name: activations.lines(
          g, curvature(name), a, b, (lo, hi)))(l, u)
      infinite = ~(np.isfinite(np.asarray(l)) & np.isfinite(np.asarray(u)))
      np.testing.assert_array_equal(np.asarray(ln.lo_s)[infinite], 0.0)
      np.testing.assert_array_equal(np.asarray(ln.lo_b)[infinite], -7.0)
      np.testing.assert_array_equal(np.asarray(ln.up_b)[infinite], 9.0)
      for t in (ln.lo_s, ln.lo_b, ln.up_s, ln.up_b):
        assert not np.any(np.isnan(np.asarray(t))), name
    ln = activations.lines(jnp.exp, curvature("exp"), l, u, (lo, hi))
    assert float(ln.up_b[4]) == 9.0 and float(ln.up_s[4]) == 0.0  # exp(120) overflows

  @chex.variants(with_jit=True, without_jit=True)
  def test_s_shaped_tangent_through_the_far_end(self):
    """Straddling 0 where the secant is not above tanh: the upper line is the tangent
    through (l, tanh(l)) (it touches there) and the lower one through (u, tanh(u))."""
    l = jnp.asarray([-1.0, -3.0, -0.5], jnp.float32)
    u = jnp.asarray([2.0, 3.0, 4.0], jnp.float32)
    ln = self.variant(lambda a, b: activations.lines(
        jnp.tanh, primitives.S_SHAPED, a, b, (a * 0 - 1, a * 0 + 1)))(l, u)
    np.testing.assert_allclose(ln.up_s * l + ln.up_b, jnp.tanh(l), atol=1e-5)
    np.testing.assert_allclose(ln.lo_s * u + ln.lo_b, jnp.tanh(u), atol=1e-5)
    d = jnp.linspace(0, 1, 101)[:, None] * (u - l) + l
    assert float(jnp.min(ln.up_s * d + ln.up_b - jnp.tanh(d))) >= -1e-6

  @chex.variants(with_jit=True, without_jit=True)
  def test_product_planes_bound_xy(self):
    rng = np.random.default_rng(1)
    lx, ux = random_intervals(rng, 40)
    ly, uy = random_intervals(rng, 40)
    ly, uy = rng.permutation(ly), rng.permutation(uy)
    lo_f, hi_f = -np.inf * np.ones_like(lx), np.inf * np.ones_like(lx)
    pl = self.variant(lambda *a: activations.product_planes(a[:2], a[2:4], a[4:]))(
        lx, ux, ly, uy, lo_f, hi_f)
    t = np.linspace(0, 1, 17)
    xs = np.clip(lx[:, None, None] + t[None, :, None] * (ux - lx)[:, None, None],
                 lx[:, None, None], ux[:, None, None]).astype(np.float64)
    ys = np.clip(ly[:, None, None] + t[None, None, :] * (uy - ly)[:, None, None],
                 ly[:, None, None], uy[:, None, None]).astype(np.float64)
    z = xs * ys
    p = {k: np.asarray(getattr(pl, k), np.float64)[:, None, None]
         for k in ("ax_l", "ay_l", "c_l", "ax_u", "ay_u", "c_u")}
    lower = p["ax_l"] * xs + p["ay_l"] * ys + p["c_l"]
    upper = p["ax_u"] * xs + p["ay_u"] * ys + p["c_u"]
    scale = np.abs(p["ax_l"] * xs) + np.abs(p["ay_l"] * ys) + np.abs(p["c_l"])
    scale = scale + np.abs(p["ax_u"] * xs) + np.abs(p["ay_u"] * ys) + np.abs(p["c_u"])
    tol = 1e-6 * (1 + np.abs(z) + scale)
    with np.errstate(invalid="ignore"):
      assert np.all(np.nan_to_num(lower - z, nan=-1.0) <= tol)
      assert np.all(np.nan_to_num(z - upper, nan=-1.0) <= tol)


# ----------------------------------------------------------------- 2. networks

def gelu_exact(t):
  return jax.nn.gelu(t, approximate=False)


HIDDEN = {
    "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "gelu": jax.nn.gelu,
    "gelu_exact": gelu_exact, "softplus": jax.nn.softplus, "silu": jax.nn.silu,
    "pow3": lambda t: t ** 3 / 3,
}


class MLP(nn.Module):
  """5 -> 16 -> 16 -> 3 with the given hidden activation (a user's Flax model)."""
  act: str

  @nn.compact
  def __call__(self, x):
    g = HIDDEN[self.act]
    x = g(nn.Dense(16)(x))
    x = g(nn.Dense(16)(x))
    return nn.Dense(3)(x)


class ConvNet(nn.Module):
  act: str

  @nn.compact
  def __call__(self, x):
    g = HIDDEN[self.act]
    x = g(nn.Conv(4, (3, 3), strides=(2, 2))(x))
    x = g(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def directed_points(apply_fn, params, x, eps, norm, steps=10, domain=None):
  """Points of the ball (inside ``domain``) found by projected (sign-)gradient steps that
  push every output down and up (2 K rows per example): (B, 2K, ...)."""
  K = apply_fn(params, x[:1]).shape[-1]
  rows = jnp.concatenate([jnp.eye(K), -jnp.eye(K)])

  def attack(x0, row):
    grad = jax.grad(lambda z: jnp.dot(apply_fn(params, z[None])[0], row))

    def step(_, z):
      gr = grad(z)
      if norm == "linf":
        z = jnp.clip(z - eps / 4 * jnp.sign(gr), x0 - eps, x0 + eps)
      else:
        z = z - eps / 4 * gr / (jnp.linalg.norm(gr) + 1e-12)
        d = z - x0
        z = x0 + d * jnp.minimum(1.0, eps / (jnp.linalg.norm(d) + 1e-12))
      return z if domain is None else jnp.clip(z, *domain)

    return lax.fori_loop(0, steps, step, x0)

  return jax.jit(jax.vmap(lambda x0: jax.vmap(lambda r: attack(x0, r))(rows)))(x)


def pgd_points(apply_fn, params, x, eps, norm, domain=None, steps=20):
  """dm_jax's PGD (:func:`dm_jax.train.methods.attacks.pgd_attack`, margin loss) against
  every label in turn, two restarts: (B, K, ...) points of the set, each pushing its
  label's margin f_y - max_j f_j down."""
  K = apply_fn(params, x[:1]).shape[-1]
  step = eps / 4 if norm == "linf" else eps / 3
  # One compiled attack for every label (eager, each of its steps' operations compiles
  # apart: 6 s of a 14 s test).
  attack = jax.jit(lambda params, x, y, key: attacks.pgd_attack(
      apply_fn, params, x, y, eps, key, steps=steps, step_size=step, norm=norm,
      domain=domain, restarts=2, loss="margin", unroll=False))
  pts = [attack(params, x, jnp.full((x.shape[0],), y, jnp.int32), jax.random.PRNGKey(y))
         for y in range(K)]
  return jnp.stack(pts, axis=1)


def sampled_envelope(apply_fn, params, x, eps, norm, n=3000, seed=0, domain=None):
  """(min, max) of the outputs over sampled, gradient-directed and PGD points of each
  set (the ball, intersected with the box ``domain``), and the outputs at them."""
  rng = np.random.default_rng(seed)
  xn = np.asarray(x)
  pts = np.stack([U.sample_ball(rng, xn[b], eps, norm, n) for b in range(len(xn))])
  if domain is not None:  # (clipping to the box keeps a point in the ball: x is in it)
    pts = np.clip(pts, *domain)
  pts = np.concatenate(
      [pts, np.asarray(directed_points(apply_fn, params, x, eps, norm, domain=domain)),
       np.asarray(pgd_points(apply_fn, params, x, eps, norm, domain))], 1)
  vals = np.asarray(jax.vmap(lambda p: apply_fn(params, p))(jnp.asarray(pts)))
  return vals.min(1), vals.max(1), vals


def assert_margins_hold(vals, margins, what):
  """Every margin f_y - f_j at every point (vals: (B, P, K)) is at least its lower
  bound ``margins[y]`` ((B, K), from margin_lower_bounds with label y for all)."""
  for y, lb in enumerate(margins):
    lb = np.asarray(lb, np.float64)
    m = vals[:, :, y:y + 1].astype(np.float64) - vals  # (B, P, K)
    tol = U.RTOL * (1 + np.abs(lb))[:, None]
    gap = lb[:, None] - tol - m
    assert np.all(gap <= 0), (f"{what}: a margin f_{y} - f_j lies below its bound by "
                              f"{gap.max():.3g}")


NET_METHODS = ("crown", "fastlin", "crown_ibp", "crown_intersect")


class NetworkTest(chex.TestCase):

  @parameterized.parameters(*HIDDEN)
  def test_mlp_bounds_contain_samples(self, act):
    model = MLP(act)
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 5)), jnp.float32)
    params = U.init_params(model, (5,), seed=3, weight_scale=1.5)
    widths = {}
    for norm, eps in (("linf", 0.1), ("l2", 0.2)):
      vmin, vmax, _ = sampled_envelope(model.apply, params, x, eps, norm)
      ib = dm_jax.interval_bounds(model.apply, params, x, eps, norm)
      U.assert_within(ib.lower, ib.upper, vmin, vmax, f"{act} ibp {norm}")
      widths[norm, "ibp"] = float(jnp.mean(ib.upper - ib.lower))
      for certifier in NET_METHODS + (("alpha_crown",) if norm == "linf" else ()):
        method, intersect = certify_lib.linear_options(certifier)
        b = linear.linear_bounds(model.apply, params, x, eps, norm, method=method,
                                 intersect_ibp=intersect,
                                 alpha=linear.AlphaConfig(steps=5) if method == "alpha_crown"
                                 else None)
        U.assert_within(b.lower, b.upper, vmin, vmax, f"{act} {certifier} {norm}")
        widths[norm, certifier] = float(jnp.mean(b.upper - b.lower))
      widths[norm, "sampled"] = float(np.mean(vmax - vmin))
      # On average over the outputs CROWN is not looser than IBP at this small radius.
      assert widths[norm, "crown"] <= widths[norm, "ibp"], (act, norm, widths)
    print(f"\nmean widths {act}: " + ", ".join(f"{n}/{m} {w:.3g}"
                                              for (n, m), w in widths.items()))

  @parameterized.product(act=("gelu", "tanh", "sigmoid", "softplus", "gelu_exact"),
                         threat=("linf", "linf_box", "l2"))
  @pytest.mark.sweep  # heavy (15-40 s): CI's sweep tier, not the default (tests/conftest.py)
  def test_mlp_margins_hold_at_sampled_and_pgd_points(self, act, threat):
    """Every margin's lower bound (crown, fastlin, crown_ibp, crown ∩ IBP; label y for
    each y) is below f_y - f_j at sampled, gradient-directed and PGD points of the
    l-inf ball, the l-inf ball within the box [0, 1], and the l2 ball; and each logit's
    bounds (IBP's too) contain its sampled values."""
    model = MLP(act)
    rng = np.random.default_rng(20)
    x = rng.uniform(0, 1, (3, 5))
    x[0, :2], x[1, 3] = 0.0, 1.0  # on the box's faces
    x = jnp.asarray(x, jnp.float32)
    params = U.init_params(model, (5,), seed=21, weight_scale=1.5)
    norm, eps = ("l2", 0.3) if threat == "l2" else ("linf", 0.15)
    domain = (0.0, 1.0) if threat == "linf_box" else None
    vmin, vmax, vals = sampled_envelope(model.apply, params, x, eps, norm, n=2000,
                                        domain=domain)
    ib = dm_jax.interval_bounds(model.apply, params, x, eps, norm, domain=domain)
    U.assert_within(ib.lower, ib.upper, vmin, vmax, f"{act} ibp {threat}")
    for certifier in NET_METHODS:
      method, intersect = certify_lib.linear_options(certifier)
      b = linear.linear_bounds(model.apply, params, x, eps, norm, method=method,
                               domain=domain, intersect_ibp=intersect)
      U.assert_within(b.lower, b.upper, vmin, vmax, f"{act} {certifier} {threat}")
      margins = [linear.margin_lower_bounds(
          model.apply, params, x, jnp.full((3,), y), eps, norm, method=method,
          domain=domain, intersect_ibp=intersect) for y in range(3)]
      assert_margins_hold(vals, margins, f"{act} {certifier} {threat}")

  @parameterized.parameters(("gelu", "linf", None), ("tanh", "linf", None),
                            ("gelu", "linf", (0.0, 1.0)), ("sigmoid", "linf", (0.0, 1.0)),
                            ("tanh", "l2", None), ("softplus", "l2", None))
  @pytest.mark.sweep  # heavy (15-40 s): CI's sweep tier, not the default (tests/conftest.py)
  def test_conv_patches_equal_dense_and_contain_samples(self, act, norm, domain):
    """A small CNN: the windowed (patch) pass equals the dense one; its logit and
    margin bounds hold at sampled and PGD points."""
    model = ConvNet(act)
    x = jnp.asarray(np.random.default_rng(4).uniform(0, 1, (2, 8, 8, 1)), jnp.float32)
    params = U.init_params(model, (8, 8, 1), seed=5)
    eps = 0.05 if norm == "linf" else 0.3
    fast = linear.linear_bounds(model.apply, params, x, eps, norm, method="crown",
                                domain=domain)
    dense = linear.linear_bounds(model.apply, params, x, eps, norm, method="crown",
                                 use_patches=False, domain=domain)
    chex.assert_trees_all_close(fast, dense, rtol=1e-5, atol=1e-5)
    vmin, vmax, vals = sampled_envelope(model.apply, params, x, eps, norm, n=500,
                                        domain=domain)
    U.assert_within(fast.lower, fast.upper, vmin, vmax, f"conv {act}")
    for method in ("crown", "crown_ibp"):
      margins = [linear.margin_lower_bounds(model.apply, params, x, jnp.full((2,), y),
                                            eps, norm, method=method, domain=domain)
                 for y in range(3)]
      assert_margins_hold(vals, margins, f"conv {act} {method} {norm} {domain}")

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_eager_and_gradient_is_finite(self):
    """SiLU (logistic and a product) in one hidden layer: CROWN-IBP, as training uses."""
    rng = np.random.default_rng(6)
    params = {"w1": jnp.asarray(rng.normal(size=(5, 8)), jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}
    apply_fn = lambda p, z: jax.nn.silu(z @ p["w1"]) @ p["w2"]
    x = jnp.asarray(rng.uniform(-1, 1, (2, 5)), jnp.float32)
    y = jnp.array([0, 2])
    fn = lambda p: linear.margin_lower_bounds(apply_fn, p, x, y, 0.1, method="crown_ibp")
    eager = fn(params)
    chex.assert_trees_all_close(self.variant(fn)(params), eager, rtol=1e-5, atol=1e-6)
    grads = self.variant(jax.grad(lambda p: jnp.sum(fn(p))))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))

  def test_very_wide_balls_give_no_nan(self):
    """tanh saturates (finite bounds), exp overflows (infinite, never NaN); both sound."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 5)), jnp.float32)
    w1 = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(16, 3)) / 4, jnp.float32)
    for act, g in (("tanh", jnp.tanh), ("exp", lambda t: jnp.exp(2 * t))):
      f = lambda p, z, g=g: g(g(z @ w1) @ (w1.T @ w1) / 4) @ w2
      for eps in (30.0, 1e4):
        _, _, vals = sampled_envelope(f, None, x, eps, "linf", n=200)
        for method in ("crown", "crown_ibp"):
          b = linear.linear_bounds(f, None, x, eps, method=method)
          lo, up = np.asarray(b.lower), np.asarray(b.upper)
          assert not np.any(np.isnan(lo)) and not np.any(np.isnan(up)), (act, eps, method)
          if act == "tanh":
            assert np.all(np.isfinite(lo)) and np.all(np.isfinite(up)), (eps, method)
          fin = np.isfinite(vals)
          tol = 1e-4 * (1 + np.abs(np.where(fin, vals, 0)))
          assert np.all(~fin | (vals >= lo[:, None] - tol)), (act, eps, method)
          assert np.all(~fin | (vals <= up[:, None] + tol)), (act, eps, method)


# ------------------------------------------------------------------- 3. certify

@pytest.mark.sweep  # heavy (10-25 s): CI's sweep tier, not the default (tests/conftest.py)
def test_certify_a_flax_tanh_model_end_to_end():
  model = MLP("tanh")
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.uniform(-1, 1, (6, 5)), jnp.float32)
  params = U.init_params(model, (5,), seed=11, weight_scale=2.0)
  y = np.asarray(jnp.argmax(model.apply(params, x), -1))
  eps = 0.02
  _, _, vals = sampled_envelope(model.apply, params, x, eps, "linf", n=1000)
  other = np.where(np.arange(3)[None] == y[:, None], np.inf, 0.0)
  margins = vals[np.arange(6), :, y][:, :, None] - vals  # (N, points, K)
  sampled_worst = (margins + other[:, None]).min(axis=(1, 2))
  results = {}
  for method in ("ibp", "crown", "crown_intersect"):
    cert, lower = certify_lib.certify(model.apply, params, x, y, eps, method=method)
    assert np.all(lower <= sampled_worst + 1e-5), method
    assert np.all(sampled_worst[cert] > 0), method
    results[method] = (cert.mean(), lower.mean())
  assert results["crown"][1] >= results["ibp"][1]
  assert results["crown_intersect"][1] >= results["crown"][1] - 1e-6
  assert results["crown"][0] > 0  # something is certified
  print("\ncertified (fraction, mean margin bound):", results)


# ---------------------------------------------------------------- 4. forward rules

W = np.random.default_rng(12).normal(size=(3, 4)).astype(np.float32)


@pytest.mark.parametrize("name", ["square", "pow4", "abs", "product"])
def test_interval_image_exact_after_one_affine_map(name):
  """One affine map gives the exact box of the pre-activations; the valley and product
  rules then give the exact range of each element."""
  x = jnp.asarray([[0.1, -0.2, 0.3]], jnp.float32)
  eps = 0.2
  pre = lambda z: z @ W
  square = lambda h: h * h  # mul of the same value twice: its square
  fn = {"square": lambda z: square(pre(z)), "pow4": lambda z: pre(z) ** 4,
        "abs": lambda z: jnp.abs(pre(z)),
        "product": lambda z: (z @ W) * (z @ W[:, ::-1])}[name]
  b = dm_jax.interval_bounds(lambda p, z: fn(z), None, x, eps)
  c, r = np.asarray(pre(x))[0], eps * np.abs(W).sum(0)
  l, u = c - r, c + r
  if name == "product":
    c2, r2 = c[::-1], r[::-1]
    l2, u2 = c2 - r2, c2 + r2
    corners = np.stack([l * l2, l * u2, u * l2, u * u2])
    lo, hi = corners.min(0), corners.max(0)
  else:
    g = {"square": np.square, "pow4": lambda t: t ** 4, "abs": np.abs}[name]
    lo = np.where((l < 0) & (u > 0), 0.0, np.minimum(g(l), g(u)))
    hi = np.maximum(g(l), g(u))
  assert np.any((l < 0) & (u > 0))  # some straddle 0
  np.testing.assert_allclose(b.lower[0], lo, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(b.upper[0], hi, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tanh", "exp", "softplus", "erfc", "pow3", "log_sigmoid"])
def test_double_margin_through_the_monotone_ones(name):
  g = {"tanh": jnp.tanh, "exp": jnp.exp, "softplus": jax.nn.softplus,
       "erfc": jax.scipy.special.erfc, "pow3": lambda t: t ** 3,
       "log_sigmoid": jax.nn.log_sigmoid}[name]
  fn = lambda p, z: g(z @ W) @ W.T
  x = jnp.asarray(np.random.default_rng(13).uniform(-1, 1, (2, 3)), jnp.float32)
  m = dm_jax.double_margin(fn, None, x, 0.1)
  chex.assert_trees_all_close(m.z, fn(None, x), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(m.s) >= 0) and np.all(np.asarray(m.v) >= 0)
  m0 = dm_jax.double_margin(fn, None, x, 0.0)
  np.testing.assert_allclose(m0.s, 0.0, atol=1e-6)
  np.testing.assert_allclose(m0.v, 0.0, atol=1e-6)
  # Its interval is sound (the same monotone rule).
  vmin, vmax, _ = sampled_envelope(fn, None, x, 0.1, "linf", n=500)
  ib = dm_jax.interval_bounds(fn, None, x, 0.1)
  U.assert_within(ib.lower, ib.upper, vmin, vmax, name)


def test_logaddexp_is_recognised_as_a_composite():
  x = jnp.ones((2, 3))

  def call_eqns(fn):
    out, todo = [], list(jax.make_jaxpr(fn)(x).jaxpr.eqns)
    while todo:
      e = todo.pop()
      if interpreter.body_of(e) is not None:
        out.append(e)
        body = interpreter.body_of(e)
        todo += list(getattr(body, "jaxpr", body).eqns)
    return out

  names = lambda fn: {interpreter.composite_of(e) for e in call_eqns(fn)} - {None}
  assert names(jax.nn.softplus) == {"logaddexp"}
  assert names(lambda t: jnp.logaddexp(0.5, t)) == {"logaddexp"}

  @jax.custom_jvp
  def look_alike(a, b):  # a custom_jvp call with another body
    return jnp.maximum(a, b) + jnp.exp(-jnp.abs(a - b))
  look_alike.defjvp(lambda p, t: (look_alike(*p), t[0]))
  assert names(lambda t: look_alike(t, 0.0)) == set()
  # Both operand orders, and bounds that hold.
  fn = lambda p, z: jnp.logaddexp(0.5, z @ W) + jax.nn.softplus(-(z @ W))
  xs = jnp.asarray(np.random.default_rng(14).uniform(-1, 1, (2, 3)), jnp.float32)
  vmin, vmax, _ = sampled_envelope(fn, None, xs, 0.3, "linf", n=500)
  for b in (dm_jax.interval_bounds(fn, None, xs, 0.3),
            linear.linear_bounds(fn, None, xs, 0.3, method="crown")):
    U.assert_within(b.lower, b.upper, vmin, vmax, "logaddexp")


# ---------------------------------------------------------------- 5. unsupported

def test_unsupported_errors_name_the_primitive_and_the_domains():
  x = jnp.ones((2, 3))
  ib = lambda fn: dm_jax.interval_bounds(lambda p, z: fn(z @ W), None, x, 0.1)
  dm = lambda fn: dm_jax.double_margin(lambda p, z: fn(z @ W), None, x, 0.1)
  cases = [
      (ib, jnp.sin, "sin", "no domain"),
      (ib, lambda t: t ** -1, "integer_pow", "positive powers"),
      (ib, lambda t: jnp.logaddexp(t, 2 * t), "logaddexp", "Double Margin and linear"),
      (dm, jax.nn.gelu, "mul", "interval and linear only"),
      (dm, lambda t: t ** 2, "integer_pow", "Double Margin takes odd ones only"),
      (dm, jnp.abs, "abs", "the interval and linear (CROWN-family) domains (not the MIP)"),
  ]
  for run, fn, name, says in cases:
    with pytest.raises(UnsupportedPrimitiveError) as err:
      run(fn)
    assert err.value.primitive == name, (name, str(err.value))
    assert f"'{name}'" in str(err.value) and says in str(err.value), str(err.value)
  with pytest.raises(UnsupportedPrimitiveError, match="'reduce_max'.*linear") as err:
    linear.linear_bounds(lambda p, z: jnp.max(jnp.tanh(z @ W), -1, keepdims=True), None,
                         x, 0.1)
  assert "supported by the interval, Double Margin and MIP" in str(err.value)
  # The exact MIP takes none of the new activations, and says who does.
  from dm_jax.verify import mip  # pylint: disable=import-outside-toplevel
  for fn, name in ((jnp.tanh, "tanh"), (jax.nn.softplus, "logaddexp"),
                   (lambda t: t * (2 * t), "mul")):
    with pytest.raises(UnsupportedPrimitiveError) as err:
      mip.exact_margins(lambda p, z: fn(z @ W), None, x[:1], np.array([0]), 0.1)
    assert err.value.primitive == name and "MIP" in str(err.value), str(err.value)


def test_table_facts():
  r = primitives.rule
  assert primitives.forward_of(r("integer_pow"), {"y": 3}) == primitives.UNARY
  assert primitives.forward_of(r("integer_pow"), {"y": 2}) == primitives.VALLEY
  assert primitives.forward_of(r("integer_pow"), {"y": -1}) is None
  assert primitives.curvature_of(r("integer_pow"), {"y": 3}) == primitives.REVERSE_S
  assert primitives.curvature_of(r("integer_pow"), {"y": 6}) == primitives.CONVEX
  assert primitives.square_rule().curvature == primitives.CONVEX
  assert r("mul").product and not r("dot_general").product
  for name in ("tanh", "logistic", "erf", "exp", "logaddexp", "square"):
    assert r(name).tape == primitives.TAPE_ACTIVATION, name
  assert "not the MIP" in primitives.supported_by("tanh")
  assert primitives.supported_by("sin") == "no domain"
