"""Shi et al. (2021)'s warm-up regularisers: the terms by hand, the decay, the gradient's
direction on a real bound pass, and the trainer's wiring."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dm_jax import train as train_lib
from dm_jax.bounds.interval import Bounds, interval_bounds
from dm_jax.train import methods
from dm_jax.train.methods import warmup


def _bounds(lower, upper):
  return Bounds(jnp.asarray(lower, jnp.float32)[None], jnp.asarray(upper, jnp.float32)[None])


def test_tightness_by_hand():
  # Input radius 0.1 everywhere; a layer of radius 0.1 (ratio 1) costs nothing, one of
  # radius 0.4 (ratio 0.25) costs (0.5 - 0.25) / 0.5 = 0.5; the mean over layers is 0.25.
  r0 = jnp.full((1, 3), 0.1)
  same = _bounds([-0.1, 0.9, 1.9], [0.1, 1.1, 2.1])
  wide = _bounds([-0.4, 0.6], [0.4, 1.4])
  np.testing.assert_allclose(warmup.tightness_loss(r0, [same]), 0.0, atol=1e-7)
  np.testing.assert_allclose(warmup.tightness_loss(r0, [wide]), 0.5, rtol=1e-6)
  np.testing.assert_allclose(warmup.tightness_loss(r0, [same, wide]), 0.25, rtol=1e-6)
  assert float(warmup.tightness_loss(r0, [])) == 0.0


def test_relu_balance_by_hand():
  # Degenerate intervals (l = u = c). Active centres 4, 4 and inactive -1, -1: the centre
  # sums give r = 8 / 2 -> min(4, 1/4) = 0.25, a term (0.5 - 0.25) / 0.5 = 0.5; the mean
  # centre is 1.5, so both groups' squared deviations sum to 2 * 2.5^2: r = 1, term 0.
  c = [4.0, 4.0, -1.0, -1.0]
  np.testing.assert_allclose(warmup.relu_balance_loss([_bounds(c, c)]), 0.5, rtol=1e-6)
  # Balanced sums (2, 2 against -2, -2): both terms 0.
  c = [2.0, 2.0, -2.0, -2.0]
  np.testing.assert_allclose(warmup.relu_balance_loss([_bounds(c, c)]), 0.0, atol=1e-7)
  # An unstable neuron (l < 0 < u) is in neither group, but its centre enters the mean:
  # centres 2, -2, 6 (unstable, [-1, 13]); mean 2; deviations 0 and 16 -> r = 0 -> 1;
  # sums 2 / 2 -> 0: total 1.
  b = _bounds([2.0, -2.0, -1.0], [2.0, -2.0, 13.0])
  np.testing.assert_allclose(warmup.relu_balance_loss([b]), 1.0, rtol=1e-6)
  # No inactive neuron: the ratio is undefined and the layer contributes 0.
  c = [1.0, 3.0]
  np.testing.assert_allclose(warmup.relu_balance_loss([_bounds(c, c)]), 0.0, atol=1e-7)


def test_intensity_decays_to_zero_at_eps_final():
  eps = jnp.asarray([0.0, 0.1, 0.3, 0.4])
  np.testing.assert_allclose(warmup.warmup_intensity(eps, 0.3, 0.5),
                             [0.5, 0.5 * (1 - 1 / 3), 0.0, 0.0], rtol=1e-6)
  assert float(warmup.warmup_intensity(0.0, 0.0, 0.5)) == 0.0


def _mlp(params, x):
  h = x.reshape((x.shape[0], -1))
  for i, (w, b) in enumerate(params):
    h = h @ w + b
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  return h


def _mlp_params(key, sizes=(16, 32, 32, 4), scale=1.0):
  keys = jax.random.split(key, len(sizes))
  return [(scale * jax.random.normal(k, (m, n)) / np.sqrt(m), 0.1 * jax.random.normal(k, (n,)))
          for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def _zero_loss(params, apply_fn, x, y, hyper, key):
  del apply_fn, y, hyper, key
  return 0.0 * sum(jnp.sum(w) for w, _ in params), {"loss": jnp.zeros(())}


class RegularisedLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_adds_the_weighted_terms_and_fades_out(self):
    key = jax.random.PRNGKey(0)
    params = _mlp_params(key)
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 16))
    y = jnp.zeros((8,), jnp.int32)
    loss = warmup.with_warmup_regularizer(_zero_loss, weight=0.5, eps_final=0.2)
    f = self.variant(lambda p, eps: loss(p, _mlp, x, y, methods.Hyper.create(eps=eps), None))
    # The terms recomputed from an independent bound pass at eps = 0.1.
    _, relus = interval_bounds(_mlp, params, x, 0.1, domain=(0.0, 1.0),
                               return_relu_inputs=True)
    lo, hi = jnp.clip(x - 0.1, 0, 1), jnp.clip(x + 0.1, 0, 1)
    expected = (warmup.tightness_loss((hi - lo) / 2, relus)
                + warmup.relu_balance_loss(relus))
    assert float(expected) > 0  # the case tests something
    value, metrics = f(params, 0.1)
    np.testing.assert_allclose(value, 0.5 * 0.5 * expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], value)
    chex.assert_trees_all_close(metrics["warmup_reg"], value)
    # At eps_final the weight is 0, and so is the added term.
    value, metrics = f(params, 0.2)
    assert float(value) == 0.0 and float(metrics["warmup_reg"]) == 0.0
    # During the warm-up (eps 0) the bounds use 1% of eps_final: finite value and gradient.
    grads = jax.grad(lambda p: f(p, 0.0)[0])(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    assert float(f(params, 0.0)[0]) > 0


def test_a_gradient_step_on_the_tightness_term_tightens_the_bounds():
  """The sign: descending the regulariser narrows the hidden layers' intervals."""
  params = _mlp_params(jax.random.PRNGKey(3), scale=3.0)  # wide bounds at the start
  x = jax.random.uniform(jax.random.PRNGKey(4), (32, 16))

  def tightness(p):
    _, relus = interval_bounds(_mlp, p, x, 0.05, domain=(0.0, 1.0), return_relu_inputs=True)
    lo, hi = jnp.clip(x - 0.05, 0, 1), jnp.clip(x + 0.05, 0, 1)
    return warmup.tightness_loss((hi - lo) / 2, relus), relus

  before, relus0 = tightness(params)
  assert float(before) > 0
  grads = jax.grad(lambda p: tightness(p)[0])(params)
  after, relus1 = tightness(jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, params, grads))
  assert float(after) < float(before)
  width = lambda rs: sum(float(jnp.mean(b.upper - b.lower)) for b in rs)
  assert width(relus1) < width(relus0)


def test_training_loss_wraps_only_when_asked():
  method = methods.get_method("ibp")
  config = train_lib.TrainConfig(method="ibp")
  assert train_lib.training_loss(config, method) is method.loss
  config = train_lib.TrainConfig(method="ibp", warmup_reg=0.5)
  assert train_lib.training_loss(config, method) is not method.loss
  with pytest.raises(ValueError, match="warmup_reg"):
    train_lib.TrainConfig(warmup_reg=-1.0).validate()
  with pytest.raises(ValueError, match="warmup_reg_tol"):
    train_lib.TrainConfig(warmup_reg=0.5, warmup_reg_tol=0.0).validate()


def test_trainer_regularises_until_the_ramp_ends(tmp_path):
  """200 synthetic examples, batch 50: eps ramps over steps 2-6; the regulariser is on
  (and positive once eps > 0) before step 6 and off after, with its metrics kept."""
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (300, 8, 8, 1)).astype(np.float32)
  y = (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int32)
  from dm_jax import data as data_lib
  ds = data_lib.Dataset("synthetic", x[:200], y[:200], x[200:], y[200:], 2, (8, 8, 1),
                        "synthetic")
  config = train_lib.TrainConfig(
      dataset="mnist", arch="mlp", method="ibp", eps_train=0.1, epochs=3, batch_size=50,
      lr=1e-3, eps_schedule=(2, 6), workdir=str(tmp_path / "run"), eval_cert_points=20,
      eval_test_examples=50, progress=False, warmup_reg=0.5, lam_form="kappa")
  seen = {}
  train_lib.train(config, ds, callback=lambda step, m: seen.update({step: m}))
  assert sorted(seen) == list(range(1, 13))
  before = [seen[s]["warmup_reg"] for s in range(3, 7)]   # steps 2..5 (1-based 3..6)
  after = [seen[s]["warmup_reg"] for s in range(7, 13)]
  assert all(r > 0 for r in before), before
  assert all(r == 0 for r in after), after
