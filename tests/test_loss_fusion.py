"""Loss fusion (dm_jax.bounds.loss_fusion): an upper bound of the worst-case
cross-entropy by one backward row.

Evidence: the secant lies above exp at dense samples of every interval (including the
ends and the widths where its formula switches); the bound lies above the CE of sampled
points of the set and of PGD's CE-maximising points; at eps 0 it is the clean CE; with
beta 0 it is IBP's robust CE (the CE of the folded IBP margins), computed independently
by ``linear.margin_lower_bounds``.
"""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import dm_jax
import helpers
from dm_jax.bounds import linear, loss_fusion
from dm_jax.core.input_sets import make_input_set
from dm_jax.train.methods import Hyper, attacks, get_method

# The extra cases of the sampled-and-attacked bound test go to the slow tier (its first
# case runs by default; conftest.py): they would push CI past its time limit.
SLOW_SWEEPS = ("test_above_sampled_and_attacked_cross_entropy",)

WIDTHS = (0.0, 1e-7, 9.9e-5, 1e-4, 1.01e-4, 0.3, 1.0, 19.9, 20.0, 20.1, 87.0, 200.0, 3e3)


class TinyCNN(nn.Module):
  """A conv, a ReLU and two dense layers over 6x6x1 inputs, 4 classes."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Dense(8)(x.reshape((x.shape[0], -1))))
    return nn.Dense(4)(x)


def _ce(apply_fn, params, x, y):
  logits = apply_fn(params, x)
  return jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]


class SecantTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*[(w, o) for w in WIDTHS for o in (0.0, 5.0)])
  def test_secant_is_above_exp_on_the_interval(self, width, offset):
    l = jnp.array([-30.0, -2.0, 0.0, 3.0], jnp.float32)
    u = l + jnp.float32(width)
    # the shift as the bound takes it (at or above every u and 0), or further above
    shift = float(max(float(jnp.max(u)), 0.0)) + offset
    a, c = self.variant(loss_fusion.exp_secant)(l, u, jnp.float32(shift))
    chex.assert_tree_all_finite((a, c))
    # dense samples of each interval, in float64 (the check is independent of float32)
    l64, u64 = np.asarray(l, np.float64), np.asarray(u, np.float64)
    t = l64[:, None] + np.linspace(0.0, 1.0, 2001)[None, :] * (u64 - l64)[:, None]
    line = np.asarray(a, np.float64)[:, None] * t + np.asarray(c, np.float64)[:, None]
    f = np.exp(t - shift)
    # the line's own float32 rounding (a t and c cancel where |l| is large)
    # and subnormal results flushed to zero (XLA on CPU): up to tiny in a t and in c
    tiny = float(np.finfo(np.float32).tiny)
    slack = 1e-6 * (np.abs(np.asarray(a, np.float64)[:, None] * t)
                    + np.abs(np.asarray(c, np.float64)[:, None]) + f) + 2 * tiny
    assert np.all(line >= f - slack), float(np.max(f - slack - line))
    # and it touches exp at both ends (the secant, not any line above)
    a64, c64 = np.asarray(a, np.float64), np.asarray(c, np.float64)
    for end in (l64, u64):
      at, want = a64 * end + c64, np.exp(end - shift)
      tol = 2e-4 * want + 1e-6 * (np.abs(a64 * end) + np.abs(c64)) + 2 * tiny
      assert np.all(np.abs(at - want) <= tol), (at, want)

  def test_secant_gradient_is_finite_at_every_width(self):
    for width in WIDTHS:
      # (the shift as the bound takes it: above every u, so no exp overflows)
      g = jax.grad(lambda u: jnp.sum(loss_fusion.exp_secant(
          jnp.zeros(3), u, jax.lax.stop_gradient(jnp.max(u)))[0]))(
              jnp.full((3,), width, jnp.float32))
      assert np.all(np.isfinite(np.asarray(g))), width


class FusedBoundTest(chex.TestCase):

  def _case(self, kind):
    if kind == "mlp":
      model = dm_jax.get_model("mlp", 3, hidden=(8, 8))
      shape = (6,)
    else:
      model = TinyCNN()
      shape = (6, 6, 1)
    params = helpers.init_params(model, shape, seed=3, bias_std=0.2)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(0.0, 1.0, (5,) + shape), jnp.float32)
    x = x.at[0].set(jnp.round(x[0]))  # pixels at 0 and 1: the box is active
    k = 3 if kind == "mlp" else 4
    y = jnp.asarray(np.arange(5) % k)
    return model.apply, params, x, y

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*[(kind, norm, domain, beta)
                              for kind in ("mlp", "cnn")
                              for norm, domain in (("linf", (0.0, 1.0)), ("linf", None),
                                                   ("l2", None))
                              for beta in (1.0, 0.5)])
  def test_above_sampled_and_attacked_cross_entropy(self, kind, norm, domain, beta):
    apply_fn, params, x, y = self._case(kind)
    eps = 0.1 if norm == "linf" else 0.3
    iset = make_input_set(x, eps, norm, None, domain)
    upper, _ = self.variant(
        lambda p: loss_fusion.cross_entropy_upper_bound(apply_fn, p, iset, y, beta=beta))(
            params)
    chex.assert_shape(upper, (5,))
    chex.assert_tree_all_finite(upper)
    rng = np.random.default_rng(0)
    worst = np.asarray(_ce(apply_fn, params, x, y))
    for _ in range(200):
      d = rng.uniform(-1.0, 1.0, x.shape)
      if norm == "linf":
        d = eps * np.sign(d)  # the vertices, where a ReLU net's extremes lie
      else:
        flat = d.reshape(d.shape[0], -1)
        d = (eps * flat / np.linalg.norm(flat, axis=1, keepdims=True)).reshape(d.shape)
      xs = x + d
      if domain is not None:
        xs = np.clip(xs, *domain)
      worst = np.maximum(worst, np.asarray(_ce(apply_fn, params, jnp.asarray(xs, x.dtype),
                                               y)))
    adv = attacks.pgd_attack(apply_fn, params, x, y, eps, jax.random.PRNGKey(0), steps=50,
                             step_size=eps / 10, norm=norm, domain=domain, restarts=3,
                             loss="ce")
    worst = np.maximum(worst, np.asarray(_ce(apply_fn, params, adv, y)))
    tol = helpers.RTOL * (1 + np.abs(worst))
    assert np.all(np.asarray(upper) >= worst - tol), (np.asarray(upper), worst)

  @chex.variants(with_jit=True, without_jit=True)
  def test_eps_zero_is_the_clean_cross_entropy(self):
    apply_fn, params, x, y = self._case("cnn")
    upper, _ = self.variant(lambda p: loss_fusion.cross_entropy_upper_bound(
        apply_fn, p, make_input_set(x, 0.0, "linf", None, None), y))(params)
    np.testing.assert_allclose(upper, _ce(apply_fn, params, x, y), rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_beta_zero_is_ibp_robust_cross_entropy_and_margins_are_ibps(self):
    apply_fn, params, x, y = self._case("cnn")
    eps = 0.05
    upper, margins = self.variant(lambda p: loss_fusion.cross_entropy_upper_bound(
        apply_fn, p, make_input_set(x, eps, "linf", None, (0.0, 1.0)), y, beta=0.0))(params)
    lb = linear.margin_lower_bounds(apply_fn, params, x, y, eps, "linf", method="ibp",
                                    domain=(0.0, 1.0))
    np.testing.assert_allclose(margins, lb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upper, jax.nn.logsumexp(-lb, axis=1), rtol=1e-5, atol=1e-5)

  @pytest.mark.sweep  # heavy (10-25 s): CI's sweep tier, not the default (tests/conftest.py)
  def test_wide_intervals_stay_finite_with_finite_gradients(self):
    apply_fn, params, x, y = self._case("cnn")
    params = jax.tree_util.tree_map(lambda p: 30.0 * p, params)  # logits in the 1000s

    def loss(p):
      return jnp.mean(loss_fusion.cross_entropy_upper_bound(
          apply_fn, p, make_input_set(x, 0.3, "linf", None, (0.0, 1.0)), y)[0])

    val, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(val)) and float(val) > 100.0
    chex.assert_tree_all_finite(grads)

  def test_bad_labels_are_a_clear_error(self):
    apply_fn, params, x, _ = self._case("mlp")
    with pytest.raises(ValueError, match="y must have shape"):
      loss_fusion.cross_entropy_upper_bound(
          apply_fn, params, make_input_set(x, 0.1, "linf", None, None), jnp.zeros(4, int))


@pytest.mark.sweep  # heavy (15-40 s): CI's sweep tier, not the default (tests/conftest.py)
def test_crown_ibp_method_with_loss_fusion_trains_and_describes_itself():
  model = TinyCNN()
  params = helpers.init_params(model, (6, 6, 1), seed=5)
  x = jnp.asarray(np.random.default_rng(5).uniform(0.0, 1.0, (4, 6, 6, 1)), jnp.float32)
  y = jnp.array([0, 1, 2, 3])
  method = get_method("crown_ibp", loss_fusion=True, lam_form="kappa")
  assert "loss fusion" in method.description
  hyper = Hyper.create(0.05, 1.0, 0.5)
  (loss, metrics), grads = jax.value_and_grad(method.loss, has_aux=True)(
      params, model.apply, x, y, hyper, jax.random.PRNGKey(0))
  assert np.isfinite(float(loss))
  assert {"ce_clean", "robust_loss", "acc", "ibp_cert_acc"} <= set(metrics)
  chex.assert_tree_all_finite(grads)
  with pytest.raises(ValueError, match="loss_fusion must be True or False"):
    get_method("crown_ibp", loss_fusion="yes")
  with pytest.raises(ValueError):
    get_method("ibp", loss_fusion=True)


@pytest.mark.sweep  # heavy (15-40 s): CI's sweep tier, not the default (tests/conftest.py)
def test_gap_benchmark_row_orders_the_bounds_above_pgd():
  from benchmarks import loss_fusion_gap
  model = TinyCNN()
  params = helpers.init_params(model, (6, 6, 1), seed=7, bias_std=0.2)
  rng = np.random.default_rng(7)
  x = rng.uniform(0.0, 1.0, (6, 6, 6, 1)).astype(np.float32)
  y = np.arange(6) % 4
  row = loss_fusion_gap.gap_row(model.apply, params, x, y, 0.05, (0.0, 1.0),
                                jax.random.PRNGKey(0), batch_size=4)
  assert set(row) == set(loss_fusion_gap.COLUMNS)
  assert row["clean"] <= row["pgd"] + 1e-6
  for bound in ("fused", "crown_ibp", "ibp"):
    assert row[bound] >= row["pgd"] - 1e-5, row
