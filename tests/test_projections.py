"""Random-projection estimates of Fast-Lin intermediate bounds (``bounded`` training).

The estimates are checked against the exact Fast-Lin bounds of the backward pass
(``intermediate="linear"``), an independent computation: the centres must agree to float
precision and the radii within the Cauchy median estimator's error; errors and the
``bounded`` loss with projections (finite, differentiable, keyed) are checked too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dm_jax import get_model
from dm_jax.bounds import linear
from dm_jax.core.errors import UnsupportedPrimitiveError
from dm_jax.core.input_sets import make_input_set
from dm_jax.train.methods import Hyper, get_method


# The random-projection estimates are checked on the MLP by default; the conv networks'
# cases (tens of seconds each, the same estimator) are in the slow tier.
SLOW_SWEEPS = ("test_estimates_match_exact_fastlin",)


def _setup(arch, shape, n=3, seed=0):
  model = get_model(arch, 10)
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.uniform(kx, (n,) + shape)
  y = jax.random.randint(ky, (n,), 0, 10)
  params = model.init(jax.random.PRNGKey(1), x[:1])
  return model, params, x, y


@pytest.mark.parametrize("arch,shape,eps", [("mlp", (10, 10, 1), 0.05),
                                            ("small", (28, 28, 1), 0.02),
                                            ("resnet", (28, 28, 1), 0.02)])
def test_estimates_match_exact_fastlin(arch, shape, eps):
  model, params, x, _ = _setup(arch, shape)
  tape = linear.record_tape(model.apply, params, make_input_set(x, eps, "linf", None,
                                                               (0.0, 1.0)))
  exact = linear.intermediate_bounds(tape, "fastlin", "linear")
  est = linear.projected_intermediate_bounds(tape, 3000, jax.random.PRNGKey(5))
  assert set(est) == set(exact)
  estimated_layers = 0
  for node, (l_est, u_est) in est.items():
    l, u = exact[node]
    r, r_est = (u - l) / 2, (u_est - l_est) / 2
    if np.allclose(l, l_est) and np.allclose(u, u_est):
      continue  # exact interval (first layer)
    estimated_layers += 1
    rel = np.abs(np.asarray(r_est / r) - 1)
    # Median of 3000 |Cauchy|: relative standard error ~ pi / (2 sqrt(3000)) = 2.9 %.
    assert np.median(rel) < 0.04, (node, np.median(rel))
    assert np.quantile(rel, 0.99) < 0.15, (node, np.quantile(rel, 0.99))
    # The centre depends on the (estimated) earlier bounds only through the ReLU
    # slopes: it is close, and exact on the first estimated layer.
    np.testing.assert_allclose((u_est + l_est) / 2, (u + l) / 2,
                               atol=0.05 * float(jnp.max(r)))
  assert estimated_layers >= 1


def test_first_estimated_layer_has_exact_centres():
  model, params, x, _ = _setup("mlp", (10, 10, 1))
  tape = linear.record_tape(model.apply, params, make_input_set(x, 0.05, "linf"))
  exact = linear.intermediate_bounds(tape, "fastlin", "linear")
  est = linear.projected_intermediate_bounds(tape, 10, jax.random.PRNGKey(0))
  second = sorted(est)[1]  # input of the second ReLU: after one relaxed layer
  (l, u), (le, ue) = exact[second], est[second]
  np.testing.assert_allclose((le + ue) / 2, (l + u) / 2, rtol=1e-5, atol=1e-5)


@pytest.mark.sweep
def test_margin_bounds_with_projections_are_close_and_keyed():
  model, params, x, y = _setup("small", (28, 28, 1))
  exact = linear.margin_lower_bounds(model.apply, params, x, y, 0.02, method="fastlin",
                                     domain=(0.0, 1.0))
  f = jax.jit(lambda key, k: linear.margin_lower_bounds(
      model.apply, params, x, y, 0.02, method="fastlin", domain=(0.0, 1.0),
      intermediate="projections", num_projections=k, key=key), static_argnums=1)
  est = f(jax.random.PRNGKey(0), 2000)
  spread = float(jnp.max(jnp.abs(exact)))
  np.testing.assert_allclose(est, exact, atol=0.1 * spread)  # a few % per layer
  a, b = f(jax.random.PRNGKey(1), 20), f(jax.random.PRNGKey(2), 20)
  assert not np.allclose(a, b)  # the key is used
  np.testing.assert_array_equal(a, f(jax.random.PRNGKey(1), 20))


def test_projection_errors():
  model, params, x, y = _setup("mlp", (10, 10, 1))
  call = lambda **kw: linear.margin_lower_bounds(model.apply, params, x, y, 0.05,
                                                 method="fastlin", **kw)
  with pytest.raises(ValueError, match="needs a jax.random key"):
    call(intermediate="projections")
  with pytest.raises(ValueError, match="num_projections"):
    call(intermediate="projections", num_projections=0, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="linf"):
    linear.margin_lower_bounds(model.apply, params, x, y, 0.5, "l2", method="fastlin",
                               intermediate="projections", key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="intermediate must be"):
    call(intermediate="random")
  pool, pparams, px, py = _setup("pooling", (12, 12, 1))
  with pytest.raises(UnsupportedPrimitiveError, match="random projections"):
    linear.margin_lower_bounds(pool.apply, pparams, px, py, 0.05, method="fastlin",
                               intermediate="projections", key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="bounded_projections"):
    get_method("bounded", bounded_projections=-1)
  with pytest.raises(ValueError, match="linf"):
    get_method("bounded", bounded_projections=50, norm="l2")


@pytest.mark.sweep
def test_bounded_loss_with_projections_on_small():
  model, params, x, y = _setup("small", (28, 28, 1), n=4)
  method = get_method("bounded", bounded_projections=50)
  assert "50 random Cauchy projections" in method.description
  hyper = Hyper.create(0.05, 0.5, 0.5)
  f = jax.jit(jax.value_and_grad(
      lambda p, k: method.loss(p, model.apply, x, y, hyper, k), has_aux=True))
  (loss, metrics), grads = f(params, jax.random.PRNGKey(0))
  assert np.isfinite(float(loss))
  assert "estimated_cert_acc" in metrics and "cert_acc" not in metrics
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
  (loss2, _), _ = f(params, jax.random.PRNGKey(1))
  assert float(loss2) != float(loss)
