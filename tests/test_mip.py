"""Tests for dm_jax.verify.mip: the exact MILP verifier.

Independent evidence of exactness: the MILP minimum is <= the margin at every sampled
point of the ball (vertices included), and it is *attained*: the returned minimiser lies
in the ball and the network evaluated there gives that margin.
"""
from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dm_jax
from dm_jax.core.errors import UnsupportedPrimitiveError
from dm_jax.bounds.interval import interval_bounds
from dm_jax.verify.mip import MipResult, exact_certify, exact_margins

ATOL = 1e-4
NUM_SAMPLES = 2000


class TinyConv(nn.Module):
  """conv 3 2x2 VALID, relu, dense 3."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (2, 2), padding="VALID")(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


class TinyPool(nn.Module):
  """conv 2 2x2 SAME, [relu], maxpool 2x2/2, [relu], dense 3."""
  relu_first: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(2, (2, 2), padding="SAME")(x)
    if self.relu_first:
      x = nn.relu(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    if not self.relu_first:  # max over 4 signed candidates, then a ReLU
      x = nn.relu(x)
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def _setup(model, in_shape, batch=2, seed=0):
  x = jax.random.uniform(jax.random.PRNGKey(seed + 100), (batch,) + in_shape)
  params = model.init(jax.random.PRNGKey(seed), x)
  y = np.asarray(jnp.argmax(model.apply(params, x), axis=1))
  return model.apply, params, x, y


def _margins(apply_fn, params, pts, y):
  logits = np.asarray(apply_fn(params, jnp.asarray(pts, jnp.float32)), np.float64)
  return logits[:, y][:, None] - logits  # (N, K) margins of class y against every j


def _linf_samples(x0, eps, rng, domain=None):
  """Vertices of the box (all, or 1000 random ones) and uniform points inside it."""
  n = x0.size
  if 2**n <= 1000:
    signs = np.asarray(list(itertools.product((-1.0, 1.0), repeat=n)))
  else:
    signs = rng.choice((-1.0, 1.0), size=(1000, n))
  inside = rng.uniform(-1.0, 1.0, size=(NUM_SAMPLES - len(signs), n))
  pts = x0.reshape(1, -1) + eps * np.concatenate([signs, inside])
  if domain is not None:
    pts = np.clip(pts, *domain)
  return pts.reshape((-1,) + x0.shape)


def _l1_samples(x0, eps, rng):
  """The 2n vertices +-eps e_k and points of the ball (surface and inside)."""
  n = x0.size
  vertices = np.concatenate([np.eye(n), -np.eye(n)]) * eps
  m = NUM_SAMPLES - 2 * n
  direction = rng.exponential(size=(m, n)) * rng.choice((-1.0, 1.0), size=(m, n))
  direction /= np.sum(np.abs(direction), axis=1, keepdims=True)
  radius = eps * np.where(rng.uniform(size=(m, 1)) < 0.5, 1.0, rng.uniform(size=(m, 1)))
  pts = x0.reshape(1, -1) + np.concatenate([vertices, direction * radius])
  return pts.reshape((-1,) + x0.shape)


def _check_exact(res: MipResult, apply_fn, params, x, y, eps, norm="linf", domain=None,
                 seed=0):
  rng = np.random.default_rng(seed)
  x = np.asarray(x, np.float64)
  batch, num_classes = res.min_margin.shape
  for b in range(batch):
    assert np.isinf(res.min_margin[b, y[b]])
    if norm == "linf":
      pts = _linf_samples(x[b], eps, rng, domain)
    else:
      pts = _l1_samples(x[b], eps, rng)
    sampled = _margins(apply_fn, params, pts, y[b])
    for j in range(num_classes):
      if j == y[b]:
        continue
      assert res.status[b, j] == "optimal"
      # Lower bound of every sampled margin ...
      assert res.min_margin[b, j] <= sampled[:, j].min() + 1e-5, (b, j)
      # ... and attained at a point of the set.
      xs = res.argmin_inputs[b, j]
      delta = xs - x[b]
      if norm == "linf":
        assert np.max(np.abs(delta)) <= eps + 1e-6
      else:
        assert np.sum(np.abs(delta)) <= eps + 1e-6
      if domain is not None:
        assert xs.min() >= domain[0] - 1e-6 and xs.max() <= domain[1] + 1e-6
      at_xs = _margins(apply_fn, params, xs[None], y[b])[0, j]
      assert abs(at_xs - res.min_margin[b, j]) <= ATOL, (b, j, at_xs, res.min_margin[b, j])
      assert abs(res.attained_margin[b, j] - res.min_margin[b, j]) <= ATOL
  expected = res.nominal_correct & np.all(res.min_margin > 0, axis=1)
  np.testing.assert_array_equal(res.certified, expected)


@pytest.fixture(scope="module")
def mlp():
  return _setup(dm_jax.get_model("mlp", 3, hidden=(8, 8)), (4, 1, 1))


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
def test_mlp_exact_linf(mlp, eps):
  apply_fn, params, x, y = mlp
  res = exact_margins(apply_fn, params, x, y, eps)
  _check_exact(res, apply_fn, params, x, y, eps)
  if eps >= 0.2:
    assert res.num_binaries.max() > 0  # the test exercises unstable ReLUs


def test_mlp_sound_vs_interval(mlp):
  apply_fn, params, x, y = mlp
  for eps in (0.05, 0.2, 0.5):
    res = exact_margins(apply_fn, params, x, y, eps)
    bounds = interval_bounds(apply_fn, params, x, eps)
    lo, hi = np.asarray(bounds.lower), np.asarray(bounds.upper)
    for b in range(len(y)):
      ibp = lo[b, y[b]] - hi[b]
      ibp[y[b]] = np.inf
      assert np.all(res.min_margin[b] >= ibp - 1e-5)


def test_mlp_tighten_and_domain(mlp):
  apply_fn, params, x, y = mlp
  plain = exact_margins(apply_fn, params, x, y, 0.5)
  tight = exact_margins(apply_fn, params, x, y, 0.5, tighten=True)
  np.testing.assert_allclose(tight.min_margin, plain.min_margin, atol=ATOL)
  assert np.all(tight.num_binaries <= plain.num_binaries)
  res = exact_margins(apply_fn, params, x, y, 0.5, domain=(0.0, 1.0))
  _check_exact(res, apply_fn, params, x, y, 0.5, domain=(0.0, 1.0))
  # A subset of the ball: the minimum can only go up.
  assert np.all(res.min_margin >= plain.min_margin - 1e-6)


def test_mlp_exact_l1(mlp):
  apply_fn, params, x, y = mlp
  for eps in (0.3, 1.0):
    res = exact_margins(apply_fn, params, x, y, eps, norm="l1")
    _check_exact(res, apply_fn, params, x, y, eps, norm="l1")
    linf = exact_margins(apply_fn, params, x, y, eps)
    # The l1 ball lies inside the linf ball of the same radius.
    assert np.all(res.min_margin >= linf.min_margin - 1e-6)


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_conv_exact(eps):
  apply_fn, params, x, y = _setup(TinyConv(), (3, 3, 1), seed=1)
  res = exact_margins(apply_fn, params, x, y, eps)
  _check_exact(res, apply_fn, params, x, y, eps, seed=1)


@pytest.mark.parametrize("relu_first", [True, False])
def test_maxpool_exact(relu_first):
  apply_fn, params, x, y = _setup(TinyPool(relu_first), (4, 4, 1), seed=2)
  for eps in (0.02, 0.15):
    res = exact_margins(apply_fn, params, x, y, eps)
    _check_exact(res, apply_fn, params, x, y, eps, seed=2)
  assert res.num_binaries.max() > 0


def _two_neuron(params, x):
  """f(x) = [relu(x) + relu(-x) - 0.1, 0] for x of shape (B, 1): margin |x| - 0.1."""
  h = jax.nn.relu(x @ params["w1"])
  return h @ params["w2"] + params["b2"]


TWO_NEURON = {"w1": jnp.array([[1.0, -1.0]]), "w2": jnp.array([[1.0, 0.0], [1.0, 0.0]]),
              "b2": jnp.array([-0.1, 0.0])}


def test_two_neuron_closed_form():
  x = jnp.array([[0.3], [2.0], [-0.4]])
  y = np.array([0, 0, 0])
  res = exact_margins(_two_neuron, TWO_NEURON, x, y, 0.5)
  # Balls [-0.2, 0.8] (min |x| - 0.1 at x = 0), [1.5, 2.5] (at 1.5), [-0.9, 0.1] (at 0).
  np.testing.assert_allclose(res.min_margin[:, 1], [-0.1, 1.4, -0.1], atol=1e-6)
  np.testing.assert_allclose(res.argmin_inputs[:, 1, 0], [0.0, 1.5, 0.0], atol=1e-6)
  np.testing.assert_array_equal(res.certified, [False, True, False])
  assert res.num_binaries.tolist() == [2, 0, 2]  # both ReLUs unstable iff 0 is inside
  # Negated: margin 1 - |x|, minimum at the far end of the ball, where IBP is loose
  # (it cannot see that relu(x) and relu(-x) are never both at their maximum).
  neg = {"w1": TWO_NEURON["w1"], "w2": -TWO_NEURON["w2"], "b2": jnp.array([1.0, 0.0])}
  res = exact_margins(_two_neuron, neg, x, y, 0.5)
  np.testing.assert_allclose(res.min_margin[:, 1], [0.2, -1.5, 0.1], atol=1e-6)
  np.testing.assert_allclose(res.argmin_inputs[:, 1, 0], [0.8, 2.5, -0.9], atol=1e-6)
  ibp = interval_bounds(_two_neuron, neg, x, 0.5)
  np.testing.assert_allclose(np.asarray(ibp.lower[:, 0] - ibp.upper[:, 1]),
                             [0.0, -1.5, 0.0], atol=1e-6)
  certified, margin = exact_certify(_two_neuron, TWO_NEURON, x, y, 0.5)
  np.testing.assert_array_equal(certified, [False, True, False])
  np.testing.assert_allclose(margin, [-0.1, 1.4, -0.1], atol=1e-6)
  # With the domain [0, 1] the first ball is [0, 0.8]: same minimum, at 0.
  res = exact_margins(_two_neuron, TWO_NEURON, x[:1], y[:1], 0.5, domain=(0.0, 1.0))
  np.testing.assert_allclose(res.min_margin[0, 1], -0.1, atol=1e-6)


def test_misclassified_not_certified():
  x = jnp.array([[2.0]])
  res = exact_margins(_two_neuron, TWO_NEURON, x, np.array([1]), 0.1)
  assert not res.nominal_correct[0] and not res.certified[0]
  np.testing.assert_allclose(res.min_margin[0, 0], -(2.1 - 0.1), atol=1e-6)


def test_time_limit_is_sound(mlp):
  apply_fn, params, x, y = mlp
  exact = exact_margins(apply_fn, params, x, y, 0.5)
  res = exact_margins(apply_fn, params, x, y, 0.5, time_limit=1e-6)
  assert set(np.unique(res.status)) <= {"optimal", "time_limit", "true_class"}
  assert np.all(res.min_margin <= exact.min_margin + 1e-6)


def test_bad_inputs(mlp):
  apply_fn, params, x, y = mlp
  with pytest.raises(ValueError, match="l2"):
    exact_margins(apply_fn, params, x, y, 0.1, norm="l2")
  with pytest.raises(ValueError):
    exact_margins(apply_fn, params, x, y, 0.1, norm="l0")
  with pytest.raises(ValueError):
    exact_margins(apply_fn, params, x, y, -0.1)
  with pytest.raises(ValueError, match="y must"):
    exact_margins(apply_fn, params, x, y[:1], 0.1)
  with pytest.raises(ValueError, match="labels"):
    exact_margins(apply_fn, params, x, np.array([0, 7]), 0.1)
  with pytest.raises(ValueError, match="max_binaries"):
    exact_margins(apply_fn, params, x, y, 0.5, max_binaries=1)


def test_unsupported_primitive():
  x = jnp.array([[0.3]])
  with pytest.raises(UnsupportedPrimitiveError, match="tanh"):
    exact_margins(lambda p, x: jnp.tanh(_two_neuron(p, x)), TWO_NEURON, x, np.array([0]),
                  0.1)
  with pytest.raises(UnsupportedPrimitiveError, match="mul"):
    exact_margins(lambda p, x: _two_neuron(p, x * x), TWO_NEURON, x, np.array([0]), 0.1)


def test_other_max_forms():
  """max(z, c) with c != 0, min, clamp, and max of two input-dependent tensors."""

  def fn(p, x):
    h = x @ p["w1"]
    a = jnp.maximum(h, 0.2)
    b = jnp.minimum(h, -0.1)
    c = jnp.clip(h, -0.3, 0.4)
    d = jnp.maximum(h[:, :1], -h[:, 1:])
    return jnp.concatenate([a + b, c, d], axis=1) @ p["w3"]

  params = {"w1": jnp.array([[1.0, -0.7]]),
            "w3": jnp.array([[1.0, -0.5], [0.3, 0.2], [-0.4, 1.0], [0.6, 0.1],
                             [0.5, -1.0]])}
  x = jnp.array([[0.1], [-0.2]])
  y = np.array([0, 1])
  res = exact_margins(fn, params, x, y, 0.6)
  grid = np.linspace(-1.0, 1.0, 20001)
  for b in range(2):
    pts = np.clip(grid, float(x[b, 0]) - 0.6, float(x[b, 0]) + 0.6)[:, None]
    brute = _margins(fn, params, pts, y[b])[:, 1 - y[b]].min()
    np.testing.assert_allclose(res.min_margin[b, 1 - y[b]], brute, atol=1e-4)
  _check_exact(res, fn, params, x, y, 0.6)
