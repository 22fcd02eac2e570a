"""Soundness of the interval bounds against sampled evidence, on every architecture.

For each architecture, input shape and threat model, 1000 points of the threat set per
example (random vertices / sphere / cross-polytope surface points / extreme l0 changes,
points inside, and points that attain the first layer's bound along Jacobian rows) are
run through the Flax model; the logits AND every ReLU input (captured independently with
``capture_intermediates``) must lie inside ``interval_bounds`` (with ``domain=(0, 1)``
on the points clipped to the box). Double Margin must reproduce the nominal values and
give non-negative margins. Bounds must be nested in eps (and in k for l0).
"""
from __future__ import annotations

import functools
import zlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import dm_jax
import helpers as U

ALL_ARCHS = ("mlp", "small", "small_s2", "pureconv", "resnet", "pooling", "medium", "large")
CIFAR_ARCHS = ("small", "resnet", "pooling")
NORMS = ("linf", "l2", "l1", "l0")
# Per-example radii are drawn from these ranges (l0 uses k instead).
EPS_RANGE = {"linf": (0.01, 0.1), "l2": (0.2, 1.5), "l1": (0.5, 4.0), "l0": (0.0, 0.0)}
L0_K = 4
N_POINTS = 1000
N_DIRECTED = 50  # first-layer units whose Jacobian rows direct extra points (x2 signs)
BATCH = 2


def _cases(archs, shapes, norms):
  out = []
  for shape_name, shape in shapes:
    for arch in archs:
      for norm in norms:
        out.append((f"_{arch}_{shape_name}_{norm}", arch, shape, norm))
  return out


# Default run: every architecture under linf (large with fewer points), every norm on a
# representative subset, CIFAR shapes for a couple; the rest under -m slow.
CASES = (_cases([a for a in ALL_ARCHS if a != "large"], [("mnist", U.MNIST)], ("linf",))
         + _cases(("small", "resnet", "pooling"), [("mnist", U.MNIST)], ("l2",))
         + _cases(("small", "pooling"), [("mnist", U.MNIST)], ("l1",))
         + _cases(("mlp", "small", "pooling"), [("mnist", U.MNIST)], ("l0",))
         + _cases(("small",), [("cifar", U.CIFAR)], ("linf",))
         + _cases(("pooling",), [("cifar", U.CIFAR)], ("l2",)))
LIGHT_CASES = [("_large_mnist_linf_250pts", "large", U.MNIST, "linf", 250)]
_done = {c[0] for c in CASES}
SLOW_CASES = [c for c in (_cases(ALL_ARCHS, [("mnist", U.MNIST)], NORMS)
                          + _cases(CIFAR_ARCHS, [("cifar", U.CIFAR)], NORMS))
              if c[0] not in _done]


@functools.lru_cache(maxsize=None)
def evidence(arch, shape, norm, n_points=N_POINTS):
  """Nominal inputs, radii and the element-wise envelopes of the sampled points.

  Returns:
    dict with x (B, *S), eps (B,), and for the raw points ("raw") and the points clipped
    to [0, 1] ("clipped"): (mins, maxs), lists over [logits, *relu_inputs] of (B, ...).
  """
  seed = zlib.crc32(repr((arch, shape, norm)).encode())
  rng = np.random.default_rng(seed)
  x = U.nominal_inputs(shape, BATCH, seed)
  lo, hi = EPS_RANGE[norm]
  eps = rng.uniform(lo, hi, BATCH).astype(np.float32)
  fwd = U.forward_fn(arch, shape)
  first = U.first_layer_fn(arch, shape)
  n_units = int(np.prod(jax.eval_shape(first, jnp.asarray(x[:1])).shape))
  n_dir = min(N_DIRECTED, n_points // 8)
  per = {"raw": [], "clipped": []}
  for b in range(BATCH):
    units = rng.choice(n_units, n_dir, replace=False)
    rows = U.first_layer_rows(first, x[b], units)
    pts = U.sample_ball(rng, x[b], float(eps[b]), norm, n_points, k=L0_K, rows=rows)
    if norm == "l0":
      assert pts.min() >= 0 and pts.max() <= 1
      assert np.all((pts != x[b][None]).reshape(n_points, -1).sum(1) <= L0_K)
      per["raw"].append(U.envelope(fwd, pts))
      per["clipped"].append(per["raw"][-1])
      continue
    # The sampled points really lie in the ball (up to float rounding).
    delta = (pts.astype(np.float64) - x[b][None]).reshape(n_points, -1)
    size = {"linf": np.abs(delta).max(1), "l2": np.linalg.norm(delta, axis=1),
            "l1": np.abs(delta).sum(1)}[norm]
    assert np.all(size <= eps[b] * (1 + 1e-5)), size.max() / eps[b]
    assert np.mean(size >= eps[b] * (1 - 1e-4)) > 0.3  # many on the boundary
    per["raw"].append(U.envelope(fwd, pts))
    # Clipping to the box keeps a point in the ball since x is in [0, 1].
    per["clipped"].append(U.envelope(fwd, np.clip(pts, 0.0, 1.0)))
  out = {"x": x, "eps": eps}
  for key, envs in per.items():
    mins = [np.stack([e[0][i] for e in envs]) for i in range(len(envs[0][0]))]
    maxs = [np.stack([e[1][i] for e in envs]) for i in range(len(envs[0][0]))]
    out[key] = (mins, maxs)
  return out


DOMAINS = (None, (0.0, 1.0))


def _bounds_both_domains(variant, model, norm):
  """One (possibly jitted) function returning the bounds for every domain in DOMAINS."""
  k = L0_K if norm == "l0" else None
  return variant(lambda p, x, e: [dm_jax.interval_bounds(
      model.apply, p, x, e, norm, k=k, domain=d, return_relu_inputs=True)
                                  for d in DOMAINS])


def check_interval_soundness(variant, arch, shape, norm, n_points=N_POINTS):
  model, params = U.model_and_params(arch, shape)
  ev = evidence(arch, shape, norm, n_points)
  x, eps = jnp.asarray(ev["x"]), jnp.asarray(ev["eps"])
  raw_min, raw_max = ev["raw"]
  clip_min, clip_max = ev["clipped"]
  nominal_logits, nominal_relus = U.forward_fn(arch, shape)(x)
  nominal = [nominal_logits] + list(nominal_relus)
  results = _bounds_both_domains(variant, model, norm)(params, x, eps)
  for domain, (out, relus) in zip(DOMAINS, results):
    bounds = [out] + list(relus)
    assert len(relus) == len(nominal_relus), (len(relus), len(nominal_relus))
    chex.assert_shape(out.lower, (BATCH, 10))
    chex.assert_shape(out.upper, (BATCH, 10))
    if domain is None:  # raw and clipped points both lie in the ball
      mins = [np.minimum(a, b) for a, b in zip(raw_min, clip_min)]
      maxs = [np.maximum(a, b) for a, b in zip(raw_max, clip_max)]
    else:
      mins, maxs = clip_min, clip_max
    for i, (bd, lo, hi, nom) in enumerate(zip(bounds, mins, maxs, nominal)):
      what = f"{arch} {norm} domain={domain} " + ("logits" if i == 0 else f"relu input {i}")
      chex.assert_equal_shape([bd.lower, bd.upper, nom])
      U.assert_within(bd.lower, bd.upper, lo, hi, what)
      U.assert_within(bd.lower, bd.upper, np.asarray(nom), np.asarray(nom), what + " nominal")
  # The evidence is not vacuous: the points directed by first-layer Jacobian rows attain
  # the first layer's bounds (exact for every norm), so a bound that is too tight by
  # more than the tolerance would have been caught there.
  first = results[0][1][0]
  n_dir = min(N_DIRECTED, n_points // 8)
  mins = [np.minimum(a, b) for a, b in zip(raw_min, clip_min)]
  maxs = [np.maximum(a, b) for a, b in zip(raw_max, clip_max)]
  for b in range(BATCH):
    up, lo = np.asarray(first.upper[b]), np.asarray(first.lower[b])
    hit_up = np.isclose(maxs[1][b], up, rtol=1e-4, atol=1e-5).sum()
    hit_lo = np.isclose(mins[1][b], lo, rtol=1e-4, atol=1e-5).sum()
    assert hit_up >= n_dir // 2 and hit_lo >= n_dir // 2, (hit_up, hit_lo, n_dir)
  # The data box can only tighten the bounds.
  (out_n, relus_n), (out_d, relus_d) = results
  for a, b in zip((out_d,) + tuple(relus_d), (out_n,) + tuple(relus_n)):
    tol = 1e-5 * (1 + U.tree_max_abs(b))
    assert np.all(np.asarray(a.lower) >= np.asarray(b.lower) - tol)
    assert np.all(np.asarray(a.upper) <= np.asarray(b.upper) + tol)


class IntervalSoundnessTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*CASES)
  def test_interval_bounds_contain_samples(self, arch, shape, norm):
    check_interval_soundness(self.variant, arch, shape, norm)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*LIGHT_CASES)
  def test_interval_bounds_contain_samples_light(self, arch, shape, norm, n_points):
    check_interval_soundness(self.variant, arch, shape, norm, n_points)


@pytest.mark.slow
class IntervalSoundnessSlowTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*SLOW_CASES)
  def test_interval_bounds_contain_samples(self, arch, shape, norm):
    check_interval_soundness(self.variant, arch, shape, norm)


DM_ARCHS = [(f"_{a}", a) for a in ALL_ARCHS]


def _dm_all(model, p, x, eps):
  """Double Margin for every variant / domain under linf, and dm under l2, l1, l0."""
  out = {}
  for variant in ("dm", "s_only", "ibp_v"):
    for domain in DOMAINS:
      out[("linf", variant, str(domain))] = dm_jax.double_margin(
          model.apply, p, x, eps, "linf", variant=variant, domain=domain,
          return_relu_inputs=True)
  for norm in ("l2", "l1"):
    out[(norm, "dm", "None")] = dm_jax.double_margin(
        model.apply, p, x, 10 * eps, norm, return_relu_inputs=True)
  out[("l0", "dm", "None")] = dm_jax.double_margin(
      model.apply, p, x, None, "l0", k=L0_K, return_relu_inputs=True)
  return out


class DoubleMarginNominalTest(chex.TestCase):
  """z is the model's value (logits and every ReLU input) at x, or for dm/s_only on the
  data box at the clipped box's centre; s, v >= 0; all variants."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*DM_ARCHS)
  def test_z_is_nominal_and_margins_nonnegative(self, arch):
    model, params = U.model_and_params(arch, U.MNIST)
    x = jnp.asarray(U.nominal_inputs(U.MNIST, BATCH, 7))
    eps = jnp.asarray(np.array([0.05, 0.1], np.float32))
    e = np.asarray(eps).reshape(-1, 1, 1, 1)
    centre = (np.clip(np.asarray(x) - e, 0, 1) + np.clip(np.asarray(x) + e, 0, 1)) / 2
    at_x = U.forward_fn(arch, U.MNIST)(x)
    at_centre = U.forward_fn(arch, U.MNIST)(jnp.asarray(centre, jnp.float32))
    results = self.variant(lambda p, x, e: _dm_all(model, p, x, e))(params, x, eps)
    for (norm, dm_variant, domain), (out, relus) in results.items():
      what = f"{arch} {norm} {dm_variant} domain={domain}"
      logits, relus_ref = (at_centre if domain != "None" and dm_variant != "ibp_v"
                           else at_x)
      assert len(relus) == len(relus_ref), what
      for m, ref in zip((out,) + tuple(relus), [logits] + list(relus_ref)):
        chex.assert_equal_shape([m.z, m.s, m.v, m.lower, m.upper, ref])
        scale = 1.0 + U.tree_max_abs(ref)
        chex.assert_trees_all_close(m.z, ref, rtol=1e-5, atol=1e-5 * scale,
                                    custom_message=what)
        s, v = np.asarray(m.s), np.asarray(m.v)
        assert np.all(s >= 0) and np.all(v >= 0), what
        assert np.all(np.isfinite(s)) and np.all(np.isfinite(v)), what
        assert np.all(np.asarray(m.lower) <= np.asarray(m.upper)), what
        if dm_variant == "s_only":
          assert np.all(v == 0), what
        if dm_variant in ("dm", "s_only"):
          chex.assert_trees_all_close(m.lower, m.z - m.s - m.v, atol=1e-6 * scale)
          chex.assert_trees_all_close(m.upper, m.z + m.s + m.v, atol=1e-6 * scale)
      if norm == "linf" and domain == "None":
        # s of "dm" and "s_only" agree (v does not feed back into s).
        if dm_variant == "s_only":
          ref_out = results[("linf", "dm", "None")][0]
          chex.assert_trees_all_close(out.s, ref_out.s, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------- monotonicity

def _nested(inner, outer, what, rtol=1e-5):
  inner_l, inner_u = np.asarray(inner.lower), np.asarray(inner.upper)
  outer_l, outer_u = np.asarray(outer.lower), np.asarray(outer.upper)
  tol = rtol * (1 + np.maximum(np.abs(outer_l), np.abs(outer_u)))
  assert np.all(outer_l <= inner_l + tol), f"{what}: lower bounds not nested"
  assert np.all(inner_u <= outer_u + tol), f"{what}: upper bounds not nested"


SCALES = np.array([0.0, 0.5, 1.0, 2.0], np.float32)
BASE_EPS = {"linf": 0.02, "l2": 0.3, "l1": 1.0}
L0_KS = (1, 2, 5, 20)


def _monotone_all(model, p, x):
  """Bounds over a vmapped axis of increasing eps (every norm, both domains), DM margins
  over the same eps, and l0 bounds for increasing k."""
  out = {}
  for norm, base in BASE_EPS.items():
    eps = jnp.asarray(base * SCALES)
    for domain in DOMAINS:
      out[("ibp", norm, str(domain))] = jax.vmap(lambda e: dm_jax.interval_bounds(
          model.apply, p, x, e, norm, domain=domain, return_relu_inputs=True))(eps)
    out[("dm", norm, "None")] = jax.vmap(lambda e: dm_jax.double_margin(
        model.apply, p, x, e, norm, return_relu_inputs=True))(eps)
  out[("ibp", "l0", "None")] = [dm_jax.interval_bounds(
      model.apply, p, x, None, "l0", k=k, return_relu_inputs=True) for k in L0_KS]
  return out


MONO_ARCHS = ("mlp", "small", "resnet", "pooling")


def _unstack(tree, n):
  return [jax.tree_util.tree_map(lambda a: a[i], tree) for i in range(n)]


class MonotonicityTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(f"_{a}", a) for a in MONO_ARCHS])
  def test_bounds_nested_in_eps_and_k(self, arch):
    check_monotone(self.variant, arch)


@pytest.mark.slow
class MonotonicitySlowTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(f"_{a}", a) for a in ALL_ARCHS if a not in MONO_ARCHS])
  def test_bounds_nested_in_eps_and_k(self, arch):
    check_monotone(self.variant, arch)


def check_monotone(variant, arch):
  model, params = U.model_and_params(arch, U.MNIST)
  x = jnp.asarray(U.nominal_inputs(U.MNIST, BATCH, 11))
  res = variant(lambda p, x: _monotone_all(model, p, x))(params, x)
  for (kind, norm, domain), val in res.items():
    seq = val if norm == "l0" else _unstack(val, len(SCALES))
    for i in range(1, len(seq)):
      (out_a, relus_a), (out_b, relus_b) = seq[i - 1], seq[i]
      for j, (a, b) in enumerate(zip((out_a,) + tuple(relus_a), (out_b,) + tuple(relus_b))):
        what = f"{arch} {kind} {norm} domain={domain} step {i} tensor {j}"
        if kind == "ibp":
          _nested(a, b, what)
        else:
          # s is non-decreasing in eps through ReLU, max pooling and |W|; so is v when
          # every nonlinearity is a ReLU (through max pooling v may shrink).
          tol = 1e-5 * (1 + U.tree_max_abs(b.s))
          assert np.all(np.asarray(a.s) <= np.asarray(b.s) + tol), what
          if arch != "pooling":
            tol = 1e-5 * (1 + U.tree_max_abs(b.v))
            assert np.all(np.asarray(a.v) <= np.asarray(b.v) + tol), what
    if kind == "ibp" and norm != "l0":  # eps = 0: the bounds collapse to the value
      out0 = seq[0][0]
      chex.assert_trees_all_close(out0.lower, out0.upper,
                                  atol=1e-5 * (1 + U.tree_max_abs(out0)))


# ------------------------------------------------ other primitives (custom function)

def _misc_fn(p, x):
  """Exercises transpose, rev, scaling, pad, reshape, concatenate, max/min with
  constants, tanh, sigmoid, clip, avg / max pooling, cumsum, reduce_sum, select_n."""
  x = jnp.transpose(x, (0, 3, 1, 2))[:, :, ::-1, :]
  x = x * 2.0 - 1.0
  x = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  x = x.reshape(x.shape[0], -1)
  h = x @ p["w1"] + p["b1"]
  h2 = jnp.concatenate([h, -h, jnp.ones_like(h)], axis=-1)
  h2 = jnp.minimum(jnp.maximum(h2, 0.1), 2.0)
  h3 = jnp.tanh(h2 @ p["w2"]) - jax.nn.sigmoid(h2 @ p["w3"]) / 3.0
  img = jnp.clip(h3, -0.5, 0.7).reshape(-1, 4, 4, 1)
  pooled = nn.avg_pool(img, (2, 2), strides=(2, 2)).reshape(-1, 4)
  mp = nn.max_pool(img, (2, 2), strides=(1, 1), padding="SAME").reshape(-1, 16)
  c = jnp.cumsum(pooled, axis=-1)
  s = jnp.sum(mp, axis=-1, keepdims=True)
  out = jnp.concatenate([c, s, pooled[:, 1:3] - c[:, :2]], axis=-1)
  return jnp.where(jnp.array([True, False, True, True, False, True, True]), out, 2.0 * out)


class MiscPrimitivesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("_linf", "linf", 0.1), ("_l2", "l2", 0.5),
                                  ("_l0", "l0", None))
  def test_sound_on_custom_function(self, norm, eps):
    rng = np.random.default_rng(0)
    p = {"w1": rng.normal(size=(128, 8)) / 8, "b1": rng.normal(size=8) * 0.1,
         "w2": rng.normal(size=(24, 16)) / 3, "w3": rng.normal(size=(24, 16)) / 3}
    p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
    x = rng.uniform(0, 1, (BATCH, 6, 6, 2)).astype(np.float32)
    k = L0_K if norm == "l0" else None
    ib, dm = self.variant(lambda p, x: (
        dm_jax.interval_bounds(_misc_fn, p, x, eps, norm, k=k),
        dm_jax.double_margin(_misc_fn, p, x, eps, norm, k=k)))(p, jnp.asarray(x))
    f = jax.jit(_misc_fn)
    chex.assert_trees_all_close(dm.z, f(p, jnp.asarray(x)), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(dm.s) >= 0) and np.all(np.asarray(dm.v) >= 0)
    for b in range(BATCH):
      pts = U.sample_ball(rng, x[b], eps, norm, N_POINTS, k=k)
      vals = np.asarray(f(p, jnp.asarray(pts)))
      U.assert_within(ib.lower[b], ib.upper[b], vals.min(0), vals.max(0), f"misc {norm}")


# ----------------------------------------------- Variation 2's folded margins are sound

class FoldedIbpVSoundnessTest(chex.TestCase):
  """Variation 2's range [l - v, u + v] contains IBP's interval, so its folded margins
  are sound lower bounds (below IBP's folded ones) though the objective is not a
  certifier: checked against the margins of points sampled in the box."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("_small", "small"), ("_pooling", "pooling"))
  def test_below_ibp_folded_and_sampled_margins(self, arch):
    from dm_jax.bounds import linear  # pylint: disable=import-outside-toplevel
    model, params = U.model_and_params(arch, U.MNIST, seed=2)
    x = jnp.asarray(U.nominal_inputs(U.MNIST, BATCH, seed=4))
    y = jnp.array([3, 7])
    eps, box = 0.02, (0.0, 1.0)
    fn = self.variant(lambda p, x: (
        dm_jax.folded_margins(model.apply, p, x, y, eps, variant="ibp_v", domain=box)[1],
        linear.margin_lower_bounds(model.apply, p, x, y, eps, method="ibp", domain=box)))
    lb_v, lb_ibp = fn(params, x)
    assert np.all(np.asarray(lb_v) <= np.asarray(lb_ibp) + 1e-5)
    rng = np.random.default_rng(0)
    xn = np.asarray(x)
    lo, hi = np.clip(xn - eps, *box), np.clip(xn + eps, *box)
    for i in range(BATCH):
      pts = rng.uniform(lo[i], hi[i], (200,) + xn.shape[1:]).astype(np.float32)
      pts[:100] = np.where(rng.uniform(size=pts[:100].shape) < 0.5, lo[i], hi[i])
      f = np.asarray(model.apply(params, jnp.asarray(pts)))
      margins = f[:, int(y[i])][:, None] - f
      assert np.all(margins.min(0) >= np.asarray(lb_v)[i] - 1e-4), arch
