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
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import dm_jax
import test_core_utils as U

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


CASES = (_cases([a for a in ALL_ARCHS if a != "large"], [("mnist", U.MNIST)], NORMS)
         + _cases(CIFAR_ARCHS, [("cifar", U.CIFAR)], NORMS)
         + _cases(["large"], [("mnist", U.MNIST)], ("linf",)))
SLOW_CASES = _cases(["large"], [("mnist", U.MNIST)], ("l2", "l1", "l0"))


@functools.lru_cache(maxsize=None)
def evidence(arch, shape, norm):
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
  n_units = int(np.prod(first(jnp.asarray(x[:1])).shape))
  per = {"raw": [], "clipped": []}
  for b in range(BATCH):
    units = rng.choice(n_units, N_DIRECTED, replace=False)
    rows = U.first_layer_rows(first, x[b], units)
    pts = U.sample_ball(rng, x[b], float(eps[b]), norm, N_POINTS, k=L0_K, rows=rows)
    if norm == "l0":
      assert pts.min() >= 0 and pts.max() <= 1
      assert np.all((pts != x[b][None]).reshape(N_POINTS, -1).sum(1) <= L0_K)
      per["raw"].append(U.envelope(fwd, pts))
      per["clipped"].append(per["raw"][-1])
      continue
    # The sampled points really lie in the ball (up to float rounding).
    delta = (pts.astype(np.float64) - x[b][None]).reshape(N_POINTS, -1)
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


def _bound_fn(variant, model, norm, domain, **kw):
  k = L0_K if norm == "l0" else None
  return variant(lambda p, x, e: dm_jax.interval_bounds(
      model.apply, p, x, e, norm, k=k, domain=domain, return_relu_inputs=True, **kw))


def check_interval_soundness(variant, arch, shape, norm):
  model, params = U.model_and_params(arch, shape)
  ev = evidence(arch, shape, norm)
  x, eps = jnp.asarray(ev["x"]), jnp.asarray(ev["eps"])
  raw_min, raw_max = ev["raw"]
  clip_min, clip_max = ev["clipped"]
  nominal_logits, nominal_relus = U.forward_fn(arch, shape)(x)
  nominal = [nominal_logits] + list(nominal_relus)
  for domain in (None, (0.0, 1.0)):
    out, relus = _bound_fn(variant, model, norm, domain)(params, x, eps)
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


class IntervalSoundnessTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*CASES)
  def test_interval_bounds_contain_samples(self, arch, shape, norm):
    check_interval_soundness(self.variant, arch, shape, norm)


@pytest.mark.slow
class IntervalSoundnessSlowTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*SLOW_CASES)
  def test_interval_bounds_contain_samples(self, arch, shape, norm):
    check_interval_soundness(self.variant, arch, shape, norm)


DM_CASES = (_cases(ALL_ARCHS, [("mnist", U.MNIST)], NORMS)
            + _cases(CIFAR_ARCHS, [("cifar", U.CIFAR)], ("linf", "l2")))


class DoubleMarginNominalTest(chex.TestCase):
  """z is the model's value (logits and every ReLU input); s, v >= 0; all variants."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*DM_CASES)
  def test_z_is_nominal_and_margins_nonnegative(self, arch, shape, norm):
    model, params = U.model_and_params(arch, shape)
    x = jnp.asarray(U.nominal_inputs(shape, BATCH, 7))
    eps = jnp.asarray(np.array([0.05, 0.1] if norm == "linf" else [0.5, 1.0], np.float32))
    k = L0_K if norm == "l0" else None
    logits, relus_ref = U.forward_fn(arch, shape)(x)
    variants = ("dm", "s_only", "ibp_v") if norm in ("linf", "l0") else ("dm",)
    for dm_variant in variants:
      for domain in (None, (0.0, 1.0)):
        fn = self.variant(lambda p, x, e: dm_jax.double_margin(
            model.apply, p, x, e, norm, variant=dm_variant, k=k, domain=domain,
            return_relu_inputs=True))
        out, relus = fn(params, x, eps)
        assert len(relus) == len(relus_ref)
        for m, ref in zip((out,) + tuple(relus), [logits] + list(relus_ref)):
          chex.assert_equal_shape([m.z, m.s, m.v, m.lower, m.upper, ref])
          scale = 1.0 + U.tree_max_abs(ref)
          chex.assert_trees_all_close(m.z, ref, rtol=1e-5, atol=1e-5 * scale)
          assert np.all(np.asarray(m.s) >= 0) and np.all(np.asarray(m.v) >= 0)
          assert np.all(np.isfinite(np.asarray(m.s))) and np.all(np.isfinite(np.asarray(m.v)))
          assert np.all(np.asarray(m.lower) <= np.asarray(m.upper))
          if dm_variant == "s_only":
            assert np.all(np.asarray(m.v) == 0)
          if dm_variant in ("dm", "s_only"):
            chex.assert_trees_all_close(m.lower, m.z - m.s - m.v, atol=1e-6 * scale)
            chex.assert_trees_all_close(m.upper, m.z + m.s + m.v, atol=1e-6 * scale)


# ------------------------------------------------------------------- monotonicity

def _nested(inner, outer, what, rtol=1e-5):
  inner_l, inner_u = np.asarray(inner.lower), np.asarray(inner.upper)
  outer_l, outer_u = np.asarray(outer.lower), np.asarray(outer.upper)
  tol = rtol * (1 + np.maximum(np.abs(outer_l), np.abs(outer_u)))
  assert np.all(outer_l <= inner_l + tol), f"{what}: lower bounds not nested"
  assert np.all(inner_u <= outer_u + tol), f"{what}: upper bounds not nested"


class MonotonicityTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_cases(ALL_ARCHS[:-1], [("mnist", U.MNIST)],
                                          ("linf", "l2", "l1")))
  def test_bounds_nested_in_eps(self, arch, shape, norm):
    model, params = U.model_and_params(arch, shape)
    x = jnp.asarray(U.nominal_inputs(shape, BATCH, 11))
    base = 0.02 if norm == "linf" else 0.3
    for domain in (None, (0.0, 1.0)):
      f = _bound_fn(self.variant, model, norm, domain)
      prev = None
      for scale in (0.0, 0.5, 1.0, 2.0):
        out, relus = f(params, x, jnp.float32(base * scale))
        cur = (out,) + tuple(relus)
        if prev is not None:
          for i, (a, b) in enumerate(zip(prev, cur)):
            _nested(a, b, f"{arch} {norm} domain={domain} scale={scale} tensor {i}")
        prev = cur
      dm = self.variant(lambda p, x, e: dm_jax.double_margin(
          model.apply, p, x, e, norm, domain=domain, return_relu_inputs=True))
      # s is non-decreasing in eps through ReLU, max pooling and |W|; v is too when every
      # nonlinearity is a ReLU (not through max pooling, where v may shrink).
      prev = None
      for scale in (0.0, 0.5, 1.0, 2.0):
        out, relus = dm(params, x, jnp.float32(base * scale))
        cur = (out,) + tuple(relus)
        if prev is not None:
          for a, b in zip(prev, cur):
            tol = 1e-5 * (1 + U.tree_max_abs(b.s))
            assert np.all(np.asarray(a.s) <= np.asarray(b.s) + tol)
            if arch != "pooling":
              tol = 1e-5 * (1 + U.tree_max_abs(b.v))
              assert np.all(np.asarray(a.v) <= np.asarray(b.v) + tol)
        prev = cur

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("_mlp", "mlp"), ("_small", "small"),
                                  ("_pooling", "pooling"))
  def test_l0_bounds_nested_in_k(self, arch):
    model, params = U.model_and_params(arch, U.MNIST)
    x = jnp.asarray(U.nominal_inputs(U.MNIST, BATCH, 12))
    prev = None
    for k in (1, 2, 5, 20):
      f = self.variant(lambda p, x: dm_jax.interval_bounds(
          model.apply, p, x, None, "l0", k=k, return_relu_inputs=True))
      out, relus = f(params, x)
      cur = (out,) + tuple(relus)
      if prev is not None:
        for i, (a, b) in enumerate(zip(prev, cur)):
          _nested(a, b, f"{arch} l0 k={k} tensor {i}")
      prev = cur
