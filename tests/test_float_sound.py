"""Certificates sound in floating point (``sound=True``, issue 18 item 6).

The networks here are one-hidden-layer MLPs whose exact minimum margin over the input
set is known in exact rational arithmetic (Python integers: every float32 is an integer
times 2^-149): the ReLUs are stable over the set (each pre-activation's sign fixed by a
large bias), so the network is affine there and the minimum has a closed form (l-inf:
the box's corner; l1: the largest coefficient; l2: the coefficient norm, compared
squared). The output biases then move that minimum to within 1e-6 of zero, at
magnitudes (weights 1e-3 ... 1e3) and widths (up to 300) where float32's own rounding is
far above 1e-6. ``sound=True`` must stay at or below the exact minimum every time; the
plain float32 bound is shown to exceed it (so a margin just above 0 was no proof).
Networks with unstable ReLUs are checked against the exact margins at the box's
vertices and random points. Nothing here uses dm_jax to compute a reference.
"""
from __future__ import annotations

from fractions import Fraction as Q

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from dm_jax.bounds import linear
from dm_jax.bounds.interval import interval_bounds
from dm_jax.core import rounding
from dm_jax.verify import certify as certify_lib
from dm_jax.verify import pipeline as pipeline_lib

# The extra cases of every test here go to the slow tier (conftest.py: each first case
# runs by default): together they would push CI past its time limit. Run them with
# pytest -m "" before changing the code they test.
SLOW_SWEEPS = "all"

SHIFT = 149  # float32 v == int(v * 2^149) * 2^-149 exactly (subnormals included)
METHODS = ("crown", "ibp", "crown_ibp", "fastlin", "zero", "alpha_crown")
ALPHA = linear.AlphaConfig(steps=3)


def apply(p, x):
  h = jnp.maximum(x @ p["w1"] + p["b1"], 0.0)
  return h @ p["w2"] + p["b2"]


def ints(a) -> np.ndarray:
  """The float32 array as exact Python integers (object array), scale 2^SHIFT."""
  a = np.asarray(a, np.float32).astype(np.float64)
  return np.array([int(v) for v in np.ldexp(a, SHIFT).ravel()], object).reshape(a.shape)


def exact_logits(p, pts) -> np.ndarray:
  """Exact logits at float32 points (N, d): integers at scale 2^(3 SHIFT)."""
  w1, b1, w2, b2 = (ints(p[k]) for k in ("w1", "b1", "w2", "b2"))
  pre = ints(pts).dot(w1) + b1 * 2 ** SHIFT
  h = np.where(pre > 0, pre, 0)
  return h.dot(w2) + b2 * 2 ** (2 * SHIFT)


def affine_form(p, active, v):
  """``(c, d)`` with ``<v, f(x')> = <c, x'> + d`` where the ReLUs are ``active``: c at
  scale 2^(3 SHIFT), d at 2^(4 SHIFT) (v: Python ints, unscaled)."""
  w1, b1, w2, b2 = (ints(p[k]) for k in ("w1", "b1", "w2", "b2"))
  g = w2.dot(np.array(v, object)) * np.array(active, object)  # (h,), scale 2^SHIFT
  c = w1.dot(g)  # 2^(2 SHIFT)
  d = b1.dot(g) * 2 ** SHIFT + b2.dot(np.array(v, object)) * 2 ** (2 * SHIFT)  # 2^(3 SHIFT)
  return c * 2 ** SHIFT, d * 2 ** SHIFT


def exact_min_above(p, active, v, x, eps, norm, bound) -> bool:
  """Whether ``bound <= min over the set of <v, f(x')>`` exactly (one point x: (d,))."""
  c, d = affine_form(p, active, v)  # scale 2^(3S), 2^(4S)
  xi, e = ints(x), int(ints(np.float32(eps)))
  big = ints(np.float32(bound)) * 2 ** (3 * SHIFT)  # the bound at scale 2^(4S)
  centre = c.dot(xi) + d
  if norm == "linf":
    lo, hi = xi - e, xi + e
    return big <= sum(min(ci * a, ci * b) for ci, a, b in zip(c, lo, hi)) + d
  if norm == "l1":
    return big <= centre - e * max(abs(ci) for ci in c)
  # l2: centre - bound >= e ||c||_2, compared squared (both sides >= 0).
  gap = centre - big
  return gap >= 0 and gap * gap >= e * e * sum(ci * ci for ci in c)


def exact_min(p, active, v, x, eps) -> float:
  """The l-inf minimum as a float64 (for reporting and choosing biases)."""
  c, d = affine_form(p, active, v)
  xi, e = ints(x), int(ints(np.float32(eps)))
  m = sum(min(ci * (a - e), ci * (a + e)) for ci, a in zip(c, xi)) + d
  return m / 2 ** (4 * SHIFT)


def stable_net(seed: int, d: int, h: int, scale: float, delta: float, eps: float):
  """A 2-class MLP, ReLUs stable over the l-inf ball of radius eps around x, whose exact
  minimum margin f_0 - f_1 over that ball is ``delta`` up to a rounding of the residual
  (see the module docstring): ``(params, x (1, d), active (h,))``."""
  rng = np.random.default_rng(seed)
  f32 = lambda a: np.asarray(a, np.float32)
  x = f32(rng.uniform(0, 1, (1, d)))
  w1 = f32(rng.normal(0, scale, (d, h)))
  reach = np.abs(w1).T.dot(np.abs(x[0]) + eps)  # >= |W1^T x'| on the ball
  sign = rng.choice([-1.0, 1.0], h)
  b1 = f32(sign * (2 * reach + scale))
  w2 = f32(rng.normal(0, scale, (h, 2)))
  p = dict(w1=w1, b1=b1, w2=w2, b2=f32([0.0, 0.0]))
  active = (sign > 0).astype(int)
  m0 = exact_min(p, active, (1, -1), x[0], eps)
  b2_0 = np.float32(-m0)
  p["b2"] = f32([b2_0, 0.0])
  r = exact_min(p, active, (1, -1), x[0], eps)  # the residual, exact to float64
  p["b2"] = f32([b2_0, np.float32(r - delta)])
  true = exact_min(p, active, (1, -1), x[0], eps)
  assert abs(true) <= 1.5e-6 and (delta == 0 or true * delta > 0), (true, delta)
  return jax.tree_util.tree_map(jnp.asarray, p), jnp.asarray(x), active


CASES = [(seed, d, h, scale) for seed, (d, h, scale) in enumerate(
    [(8, 16, 1.0), (6, 300, 1e3), (20, 50, 1e-3), (12, 200, 30.0), (30, 100, 1.0),
     (4, 8, 1e2), (16, 64, 0.1)])]


def _margin(p, x, eps, method, sound, norm="linf", intersect=False):
  alpha = ALPHA if method == "alpha_crown" else None
  return float(linear.margin_lower_bounds(
      apply, p, x, jnp.array([0]), eps, norm, method=method, sound=sound, alpha=alpha,
      intersect_ibp=intersect)[0, 1])


class StableNetTest(parameterized.TestCase):
  """Exact minima within 1e-6 of zero."""

  @parameterized.product(method=METHODS, case=CASES)
  def test_sound_at_or_below_exact_minimum(self, method, case):
    seed, d, h, scale = case
    eps = 0.05
    for k, delta in enumerate((-1e-6, -1e-7, 0.0, 1e-7, 1e-6)):
      p, x, active = stable_net(1000 * seed + k, d, h, scale, delta, eps)
      sound = _margin(p, x, eps, method, True)
      plain = _margin(p, x, eps, method, False)
      self.assertTrue(exact_min_above(p, active, (1, -1), x[0], eps, "linf", sound),
                      (method, case, delta, sound, plain))
      self.assertLessEqual(sound, plain)
      # Not looser than needed: CROWN-family bounds are exact on an affine network, so
      # the sound one sits within float32 rounding of the true minimum's magnitude.
      true = exact_min(p, active, (1, -1), x[0], eps)
      size = float(np.abs(np.asarray(p["w1"])).sum() * np.abs(np.asarray(p["w2"])).max()
                   + np.abs(np.asarray(p["b1"])).max() * np.abs(np.asarray(p["w2"])).sum())
      if method != "ibp" and method != "crown_ibp":
        self.assertGreater(sound, true - 1e-4 * size - 1e-5, (method, case, delta))

  @parameterized.product(norm=("l1", "l2", "linf_domain"), case=CASES[:4])
  def test_other_sets(self, norm, case):
    """l1 and l2 balls (the symbolic first layer) and the l-inf box cut by [0, 1]."""
    seed, d, h, scale = case
    eps = 0.05
    p, x, active = stable_net(seed, d, h, scale, 0.0, eps)
    for method in ("crown", "ibp"):
      if norm == "linf_domain":
        # x pushed to the data box's edge so the clip matters; the ball's minimum over
        # the clipped box is >= the unclipped one, which is what is checked.
        low = float(linear.margin_lower_bounds(apply, p, x, jnp.array([0]), eps, "linf",
                                               method=method, domain=(0.0, 1.0),
                                               sound=True)[0, 1])
        box = float(linear.margin_lower_bounds(apply, p, x, jnp.array([0]), eps, "linf",
                                               method=method, sound=True)[0, 1])
        self.assertGreaterEqual(low, box)
        # ... and the clipped set's minimum: the corner of the clipped box.
        c, dd = affine_form(p, active, (1, -1))
        xi, e = ints(x[0]), int(ints(np.float32(eps)))
        one = 2 ** SHIFT
        lo = [max(a - e, 0) for a in xi]
        hi = [min(a + e, one) for a in xi]
        m = sum(min(ci * a, ci * b) for ci, a, b in zip(c, lo, hi)) + dd
        self.assertLessEqual(int(ints(np.float32(low))) * 2 ** (3 * SHIFT), m)
        continue
      sound = _margin(p, x, eps, method, True, norm)
      self.assertTrue(exact_min_above(p, active, (1, -1), x[0], eps, norm, sound),
                      (norm, method, case, sound))
      self.assertLessEqual(sound, _margin(p, x, eps, method, False, norm))

  @pytest.mark.sweep  # heavy (15-40 s): CI's sweep tier, not the default (tests/conftest.py)
  def test_intersected_and_logit_bounds(self):
    for case in CASES[:4]:
      seed, d, h, scale = case
      p, x, active = stable_net(seed, d, h, scale, 0.0, 0.05)
      sound = _margin(p, x, 0.05, "crown", True, intersect=True)
      self.assertTrue(exact_min_above(p, active, (1, -1), x[0], 0.05, "linf", sound))
      # IBP's element-wise logit bounds: f_0 >= lower, -f_0 >= -upper.
      b = interval_bounds(apply, p, x, 0.05, sound=True)
      plain = interval_bounds(apply, p, x, 0.05)
      self.assertTrue(np.all(b.lower <= plain.lower) and np.all(b.upper >= plain.upper))
      for j in range(2):
        v = [int(i == j) for i in range(2)]
        self.assertTrue(exact_min_above(p, active, v, x[0], 0.05, "linf", b.lower[0, j]))
        self.assertTrue(exact_min_above(p, active, [-t for t in v], x[0], 0.05, "linf",
                                        -b.upper[0, j]))

  @pytest.mark.sweep  # heavy (15-40 s): CI's sweep tier, not the default (tests/conftest.py)
  def test_plain_float32_bound_exceeds_the_exact_minimum(self):
    """The problem the sound mode solves: on these networks the plain float32 CROWN
    bound is above the exact minimum, and certifies a point whose true minimum margin
    is -1e-6 (a wrong certificate); the sound bound never is."""
    above, wrong = 0, 0
    for seed, d, h, scale in CASES:
      for k in range(3):
        p, x, active = stable_net(50 + 10 * seed + k, d, h, scale, -1e-6, 0.05)
        plain = _margin(p, x, 0.05, "crown", False)
        above += not exact_min_above(p, active, (1, -1), x[0], 0.05, "linf", plain)
        wrong += plain > 0
        self.assertLessEqual(_margin(p, x, 0.05, "crown", True), 0.0)
    self.assertGreater(above, 0)
    self.assertGreater(wrong, 0)


def unstable_net(seed: int, d: int, h: int, scale: float):
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
  p = dict(w1=f32(rng.normal(0, scale, (d, h))), b1=f32(rng.normal(0, scale, h)),
           w2=f32(rng.normal(0, scale, (h, 3))), b2=f32(rng.normal(0, scale, 3)))
  return p, f32(rng.uniform(0, 1, (2, d)))


@pytest.mark.sweep  # heavy (15-40 s): CI's sweep tier, not the default (tests/conftest.py)
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e-3])
def test_unstable_relus_below_exact_margins_at_points(scale):
  """Unstable ReLUs: every sound bound <= the exact margin at every vertex of the box
  and at random points of it (exact integer evaluation)."""
  d, h, eps = 5, 40, 0.1
  for seed in range(3):
    p, x = unstable_net(seed, d, h, scale)
    y = jnp.array([0, 2])
    rng = np.random.default_rng(seed)
    corners = np.array([[(i >> b) & 1 for b in range(d)] for i in range(2 ** d)], float)
    for b in range(2):
      xb = np.asarray(x[b], np.float64)
      pts = np.concatenate([xb - eps + 2 * eps * corners,
                            xb + rng.uniform(-eps, eps, (64, d))])
      pts = np.clip(pts, np.float32(x[b]) - np.float32(eps), np.float32(x[b]) + np.float32(eps))
      pts = np.asarray(pts, np.float32)  # float32 points of the (real) box
      inside = (pts >= np.float64(x[b]) - np.float64(np.float32(eps))) & (
          pts <= np.float64(x[b]) + np.float64(np.float32(eps)))
      pts = pts[inside.all(1)]
      logits = exact_logits(p, pts)
      for method in METHODS:
        alpha = ALPHA if method == "alpha_crown" else None
        low = np.asarray(linear.margin_lower_bounds(apply, p, x, y, eps, method=method,
                                                    sound=True, alpha=alpha))
        plain = np.asarray(linear.margin_lower_bounds(apply, p, x, y, eps, method=method,
                                                      alpha=alpha))
        assert np.all(low <= plain)
        for j in range(3):
          if j == int(y[b]):
            continue
          margins = logits[:, int(y[b])] - logits[:, j]  # scale 2^(3S)
          bound = int(ints(np.float32(low[b, j]))) * 2 ** (2 * SHIFT)
          assert bound <= min(margins), (method, scale, seed, b, j)


class JitTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.p, self.x, self.active = stable_net(3, 6, 300, 1e3, 0.0, 0.05)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("ibp", "crown", "alpha_crown")  # the cheapest first: the default tier
  def test_jit_and_eager(self, method):
    alpha = ALPHA if method == "alpha_crown" else None
    fn = lambda p, x: linear.margin_lower_bounds(apply, p, x, jnp.array([0]), 0.05,
                                                 method=method, sound=True, alpha=alpha)
    with jax.enable_x64(True):
      got = self.variant(fn)(self.p, self.x)
    self.assertEqual(got.dtype, jnp.float32)
    eager = fn(self.p, self.x)
    # The same sound bound (the plain cap may differ by a rounding under x64 tracing).
    self.assertTrue(exact_min_above(self.p, self.active, (1, -1), self.x[0], 0.05, "linf",
                                    float(got[0, 1])))
    np.testing.assert_allclose(got, eager, rtol=1e-6, atol=1e-6)
    ibp = lambda p, x: interval_bounds(apply, p, x, 0.05, sound=True).lower
    with jax.enable_x64(True):
      np.testing.assert_array_equal(self.variant(ibp)(self.p, self.x), ibp(self.p, self.x))

  def test_jit_without_x64_raises(self):
    fn = jax.jit(lambda p, x: linear.margin_lower_bounds(apply, p, x, jnp.array([0]), 0.05,
                                                         sound=True))
    with self.assertRaisesRegex(ValueError, "enable_x64"):
      fn(self.p, self.x)


class DefaultPathTest(parameterized.TestCase):

  @parameterized.parameters(*METHODS)
  def test_default_is_sound_false_and_float32(self, method):
    p, x = unstable_net(0, 5, 20, 1.0)
    y = jnp.array([0, 1])
    alpha = ALPHA if method == "alpha_crown" else None
    a = linear.margin_lower_bounds(apply, p, x, y, 0.1, method=method, alpha=alpha)
    b = linear.margin_lower_bounds(apply, p, x, y, 0.1, method=method, alpha=alpha,
                                   sound=False)
    self.assertEqual(a.dtype, jnp.float32)
    np.testing.assert_array_equal(a, b)
    ia, ib = interval_bounds(apply, p, x, 0.1), interval_bounds(apply, p, x, 0.1, sound=False)
    np.testing.assert_array_equal(ia.lower, ib.lower)
    np.testing.assert_array_equal(ia.upper, ib.upper)

  def test_sound_rejects_projections_and_non_bool(self):
    p, x = unstable_net(0, 5, 20, 1.0)
    with self.assertRaisesRegex(ValueError, "projections"):
      linear.margin_lower_bounds(apply, p, x, jnp.array([0, 1]), 0.1, method="crown",
                                 intermediate="projections", sound=True)
    with self.assertRaisesRegex(ValueError, "True or False"):
      linear.margin_lower_bounds(apply, p, x, jnp.array([0, 1]), 0.1, sound="yes")


class CertifyTest(parameterized.TestCase):

  def _points(self, delta):
    """Points whose exact minimum margin is delta (near 0), one network per point; the
    networks share a shape, so one is used per call."""
    return [stable_net(700 + s, 6, 300, 1e3, delta, 0.05) for s in range(4)]

  @parameterized.parameters("crown", "ibp", "crown_intersect")
  def test_certify_sound_is_subset(self, method):
    for p, x, active in self._points(-1e-6) + self._points(1e-6):
      c0, l0 = certify_lib.certify(apply, p, x, jnp.array([0]), 0.05, method=method)
      c1, l1 = certify_lib.certify(apply, p, x, jnp.array([0]), 0.05, method=method,
                                   sound=True)
      self.assertTrue(np.all(l1 <= l0) and np.all(c1 <= c0))
      self.assertTrue(exact_min_above(p, active, (1, -1), x[0], 0.05, "linf", l1[0]))
    with self.assertRaisesRegex(ValueError, "mip"):
      certify_lib.certify(apply, p, x, jnp.array([0]), 0.05, method="mip", sound=True)

  def test_pipeline_verdict(self):
    """A point the plain CROWN bound certifies although its exact minimum margin is
    -1e-6: the pipeline certifies it only with sound=False.

    Which of these networks the float32 bound wrongly certifies depends on the CPU's
    kernels (the first 4 seeds gave at least 1 on an AMD EPYC, 0 on a Xeon; 12 of the first 32 on
    the Xeon), so the seeds run until one does (at least 4, at most 32); the sound
    verdict is checked on every one."""
    wrong, checked = 0, 0
    for seed in range(700, 732):
      if wrong and checked >= 4:
        break
      p, x, active = stable_net(seed, 6, 300, 1e3, -1e-6, 0.05)
      res = pipeline_lib.verify_points(apply, p, x, jnp.array([0]), 0.05, stages=("crown",))
      self.assertFalse(res.certified[0])
      self.assertLessEqual(res.margin_lower[0], 0.0)
      plain = pipeline_lib.verify_points(apply, p, x, jnp.array([0]), 0.05, stages=("crown",),
                                         sound=False)
      wrong += int(plain.certified[0])
      checked += 1
    self.assertGreater(wrong, 0)  # the unsound verdict the sound mode prevents
    # A point the sound mode confirms: its margin_lower is the sound bound.
    p, x, active = stable_net(700, 6, 300, 1.0, 0.0, 0.05)
    p = dict(p, b2=p["b2"].at[0].add(1.0))  # the exact minimum is now about 1
    res = pipeline_lib.verify_points(apply, p, x, jnp.array([0]), 0.05, stages=("crown",))
    self.assertTrue(res.certified[0])
    self.assertTrue(exact_min_above(p, active, (1, -1), x[0], 0.05, "linf",
                                    res.margin_lower[0]))


class RoundingTest(chex.TestCase):
  """The helpers of dm_jax.core.rounding against exact rational arithmetic, as compiled
  by XLA (jit) and eagerly: directed sums, conversions, boxes and the gamma bound."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_directed_helpers(self):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
      a = rng.normal(size=4000) * 10.0 ** rng.integers(-30, 30, 4000)
      b = rng.normal(size=4000) * 10.0 ** rng.integers(-30, 30, 4000)
      a[:50], b[:50] = 1.0, 2.0 ** -60  # ties and exact sums
      fn = self.variant(lambda a, b: (rounding.add_down(a, b), rounding.add_up(a, b),
                                      rounding.down_to(a + b, jnp.float32),
                                      rounding.up_to(a + b, jnp.float32),
                                      *rounding.centre_radius(jnp.minimum(a, b),
                                                              jnp.maximum(a, b))))
      lo, hi, lo32, hi32, c, r = (np.asarray(t) for t in fn(jnp.asarray(a), jnp.asarray(b)))
    for i in range(a.size):
      exact = Q(a[i]) + Q(b[i])
      self.assertLessEqual(Q(lo[i]), exact)
      self.assertGreaterEqual(Q(hi[i]), exact)
      if Q(lo[i]) != exact:  # the largest float below: one step up passes the sum
        self.assertGreater(Q(float(np.nextafter(lo[i], np.inf))), exact)
      s64 = a[i] + b[i]  # the float64 value the conversion rounds
      self.assertLessEqual(Q(float(lo32[i])), Q(s64))
      self.assertGreaterEqual(Q(float(hi32[i])), Q(s64))
      m, n = min(a[i], b[i]), max(a[i], b[i])
      self.assertLessEqual(Q(c[i]) - Q(r[i]), Q(m))
      self.assertGreaterEqual(Q(c[i]) + Q(r[i]), Q(n))

  @chex.variants(with_jit=True, without_jit=True)
  def test_gamma_bounds_any_dot_product(self):
    rng = np.random.default_rng(1)
    for n in (3, 100, 3000):
      with jax.enable_x64(True):
        x = rng.normal(size=(4, n)) * 10.0 ** rng.integers(-5, 5, (4, n))
        w = rng.normal(size=(n, 2))
        got = np.asarray(self.variant(jnp.dot)(jnp.asarray(x), jnp.asarray(w)))
      for i in range(4):
        for j in range(2):
          exact = sum(Q(float(p)) * Q(float(q)) for p, q in zip(x[i], w[:, j]))
          size = Q(float(np.abs(x[i]) @ np.abs(w[:, j])))
          self.assertLessEqual(abs(Q(float(got[i, j])) - exact),
                               Q(rounding.gamma(n, jnp.float64)) * size * (1 + Q(1, 10**6)))

if __name__ == "__main__":
  absltest.main()
