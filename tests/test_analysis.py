"""Tests for dm_jax.analysis: Propositions 1-2 of the paper's framework as a tool.

Evidence, each against something computed independently of the module:

* H v (exact and Gauss-Newton, batch-averaged, damped) equals the dense Hessian
  (``jacrev`` of ``jacrev``) and the closed-form Gauss-Newton matrix ``J^T H_out J``
  (``H_out = diag(p) - p p^T`` for softmax cross-entropy) on a small MLP and a small
  CNN whose convolutions are ``custom_vjp``;
* CG equals a dense solve (and ``jax.scipy.sparse.linalg.cg``); stopped early, the
  reported squared norm is a lower bound that grows with the iterations; negative
  curvature is detected;
* Proposition 1 on l2-regularised logistic regression (minimisers found exactly by a
  float64 Newton method): the predicted shift's error shrinks as lam^2;
* Proposition 2 on a quadratic loss with known H and non-linear regularizers: the
  verdict is the sign of the measured objective difference after exact re-minimisation,
  and ``D(lam) ~ lam^2 / 2 * D''(0)``;
* the registry's regularizers are affine in their weight and equal the methods' own
  metrics (robust - clean CE, RS, the penalties);
* rank_regularizers' distances, cosines and scales equal dense linear algebra.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.flatten_util import ravel_pytree

from dm_jax import analysis, get_model
from dm_jax.models import ConvStack
from dm_jax.train import methods as M

ROOT = Path(__file__).resolve().parents[1]
DAMPING = 0.05


# ----------------------------------------------------------------------------- fixtures

@functools.lru_cache(maxsize=None)
def _problem(kind: str = "mlp", n: int = 24, batch: int = 8):
  """(apply_fn, params, (x, y) all, batches): a small classifier and random data."""
  if kind == "mlp":
    model, shape = get_model("mlp", 3, hidden=(8,)), (4, 4, 1)
  else:  # the models' conv (dm_jax.core.conv: custom_vjp, no forward mode)
    model, shape = ConvStack(((2, 3, 2, "SAME"),), (4,), 3), (6, 6, 1)
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.uniform(kx, (n,) + shape)
  y = jax.random.randint(ky, (n,), 0, 3)
  params = model.init(kp, x[:1])
  return model.apply, params, (x, y), analysis.stack_batches((x, y), batch)


def _dense_hessian(apply_fn, params, data):
  flat, unravel = ravel_pytree(params)
  loss = lambda t: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(unravel(t), data[0]), data[1]))
  return np.asarray(jax.jacrev(jax.jacrev(loss))(flat), np.float64)


def _dense_gauss_newton(apply_fn, params, data):
  """sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n / N, from the Jacobian of the logits."""
  flat, unravel = ravel_pytree(params)
  x, _ = data
  jac = np.asarray(jax.jacrev(lambda t: apply_fn(unravel(t), x))(flat), np.float64)
  p = np.asarray(jax.nn.softmax(apply_fn(params, x)), np.float64)
  h_out = np.einsum("nk,kl->nkl", p, np.eye(p.shape[1])) - np.einsum("nk,nl->nkl", p, p)
  return np.einsum("nkd,nkl,nle->de", jac, h_out, jac) / x.shape[0]


def _random_like(params, seed):
  flat, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(jax.random.PRNGKey(seed), flat.shape))


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


# ----------------------------------------------------------------------------- H v

class HvpTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("mlp", "conv")
  def test_matches_dense_hessian_and_gauss_newton(self, kind):
    apply_fn, params, data, batches = _problem(kind)
    loss = analysis.classification_loss(apply_fn)
    v = _random_like(params, 1)
    h = _dense_hessian(apply_fn, params, data)
    gn = _dense_gauss_newton(apply_fn, params, data)
    # The exact Hessian of a network at a random point is indefinite (why Gauss-Newton).
    self.assertLess(np.linalg.eigvalsh(h)[0], 0)
    self.assertGreater(np.linalg.eigvalsh(gn)[0], -1e-6)

    @self.variant
    def products(p, b, t):
      exact = analysis.hvp(loss, p, b)(t)
      damped = analysis.hvp(loss, p, b, damping=DAMPING)(t)
      gauss = analysis.hvp(loss, p, b, gauss_newton=True, damping=DAMPING)(t)
      return exact, damped, gauss

    exact, damped, gauss = products(params, batches, v)
    chex.assert_trees_all_equal_shapes(exact, params)
    vf = _flat(v)
    scale = np.abs(h @ vf).max()
    np.testing.assert_allclose(_flat(exact), h @ vf, atol=1e-4 * scale)
    np.testing.assert_allclose(_flat(damped), h @ vf + DAMPING * vf, atol=1e-4 * scale)
    np.testing.assert_allclose(_flat(gauss), gn @ vf + DAMPING * vf,
                               atol=1e-4 * np.abs(gn @ vf).max())

  def test_batches_average_to_the_full_data(self):
    apply_fn, params, data, _ = _problem("mlp")
    loss = analysis.classification_loss(apply_fn)
    v = _random_like(params, 2)
    one = analysis.hvp(loss, params, jax.tree_util.tree_map(lambda a: a[None], data))(v)
    three = analysis.hvp(loss, params, analysis.stack_batches(data, 8))(v)
    chex.assert_trees_all_close(one, three, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- CG

class ConjugateGradientTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(True, False)
  def test_matches_dense_solve(self, gauss_newton):
    apply_fn, params, data, batches = _problem("mlp")
    loss = analysis.classification_loss(apply_fn)
    dense = (_dense_gauss_newton if gauss_newton else _dense_hessian)(apply_fn, params, data)
    # The exact Hessian is indefinite here: damp it past its most negative eigenvalue.
    damping = DAMPING + (0.0 if gauss_newton else max(0.0, -np.linalg.eigvalsh(dense)[0]))
    a = dense + damping * np.eye(len(dense))
    g = _random_like(params, 3)
    norm_fn = self.variant(functools.partial(
        analysis.inverse_hessian_norm, loss_fn=loss, gauss_newton=gauss_newton,
        damping=damping, tol=1e-5, maxiter=500))
    out = norm_fn(g, params=params, batches=batches)
    x_dense = np.linalg.solve(a, _flat(g))
    self.assertTrue(bool(out.info.converged))
    self.assertFalse(bool(out.info.negative_curvature))
    self.assertLessEqual(float(out.info.residual), 1e-5)
    self.assertGreater(int(out.info.iterations), 1)
    np.testing.assert_allclose(_flat(out.solution), x_dense, rtol=0,
                               atol=1e-3 * np.abs(x_dense).max())
    np.testing.assert_allclose(float(out.norm), np.sqrt(_flat(g) @ x_dense), rtol=1e-4)
    # The same solution as jax.scipy's CG (which reports no diagnostics).
    op = analysis.hvp(loss, params, batches, gauss_newton=gauss_newton, damping=damping)
    x_jax, _ = jax.scipy.sparse.linalg.cg(op, g, tol=1e-5, maxiter=500)
    np.testing.assert_allclose(_flat(out.solution), _flat(x_jax), rtol=0,
                               atol=1e-3 * np.abs(x_dense).max())

  def test_stopped_early_is_a_growing_lower_bound(self):
    apply_fn, params, data, batches = _problem("mlp")
    loss = analysis.classification_loss(apply_fn)
    a = _dense_gauss_newton(apply_fn, params, data) + 1e-3 * np.eye(
        ravel_pytree(params)[0].size)
    g = _random_like(params, 4)
    exact = _flat(g) @ np.linalg.solve(a, _flat(g))
    previous = 0.0
    for maxiter in (1, 2, 4, 8, 16):
      out = analysis.inverse_hessian_norm(g, loss, params, batches, gauss_newton=True,
                                          damping=1e-3, tol=1e-6, maxiter=maxiter)
      self.assertEqual(int(out.info.iterations), maxiter)
      self.assertFalse(bool(out.info.converged))
      self.assertLessEqual(float(out.squared), exact * (1 + 1e-5))
      self.assertGreaterEqual(float(out.squared), previous * (1 - 1e-5))
      previous = float(out.squared)
    self.assertGreater(previous, 0.3 * exact)

  def test_negative_curvature_and_zero_right_hand_side(self):
    op = lambda t: {"a": jnp.array([1.0, -2.0]) * t["a"]}
    out = analysis.inverse_norm({"a": jnp.ones(2)}, op, maxiter=10)
    self.assertTrue(bool(out.info.negative_curvature))
    self.assertFalse(bool(out.info.converged))
    self.assertTrue(np.isnan(float(out.norm)))
    zero = analysis.inverse_norm({"a": jnp.zeros(2)}, lambda t: t)
    self.assertEqual(int(zero.info.iterations), 0)
    self.assertTrue(bool(zero.info.converged))
    self.assertEqual(float(zero.norm), 0.0)

  def test_host_loop_and_unrolled_batches_give_the_same_solve(self):
    apply_fn, params, _, batches = _problem("mlp")
    loss = analysis.classification_loss(apply_fn)
    g = _random_like(params, 6)
    kw = dict(gauss_newton=True, damping=DAMPING, tol=1e-5, maxiter=300)
    loop = jax.jit(lambda p, b, t: analysis.inverse_hessian_norm(t, loss, p, b, **kw))(
        params, batches, g)
    host = analysis.inverse_hessian_norm(g, loss, params, batches, unroll=True,
                                         host_loop=True, **kw)
    self.assertEqual(int(loop.info.iterations), int(host.info.iterations))
    np.testing.assert_allclose(float(host.norm), float(loop.norm), rtol=1e-5)
    chex.assert_trees_all_close(host.solution, loop.solution, atol=1e-4, rtol=1e-3)
    v = _random_like(params, 7)
    chex.assert_trees_all_close(analysis.hvp(loss, params, batches, unroll=True)(v),
                                analysis.hvp(loss, params, batches)(v), rtol=1e-4,
                                atol=1e-6)

  def test_top_eigenvalue(self):
    d = jnp.arange(1.0, 11.0)
    top = analysis.top_eigenvalue(lambda t: {"a": d * t["a"]}, {"a": d},
                                  jax.random.PRNGKey(0), iters=200)
    np.testing.assert_allclose(float(top), 10.0, rtol=1e-4)
    apply_fn, params, data, batches = _problem("mlp")
    loss = analysis.classification_loss(apply_fn)
    dense_top = np.linalg.eigvalsh(_dense_gauss_newton(apply_fn, params, data))[-1]
    op = analysis.hvp(loss, params, batches, gauss_newton=True)
    for host_loop in (False, True):
      top = float(analysis.top_eigenvalue(jax.jit(op) if host_loop else op, params,
                                          jax.random.PRNGKey(1), iters=50,
                                          host_loop=host_loop))
      self.assertLessEqual(top, dense_top * (1 + 1e-4))  # a Rayleigh quotient
      self.assertGreater(top, 0.5 * dense_top)

  def test_diagonal_closed_form(self):
    d = jnp.array([0.5, 1.0, 2.0, 4.0])
    x, info = analysis.conjugate_gradient(lambda v: d * v, jnp.ones(4), tol=1e-6)
    np.testing.assert_allclose(x, 1 / d, rtol=1e-5)
    self.assertLessEqual(int(info.iterations), 4)  # n distinct eigenvalues: n steps


# ----------------------------------------------------------------------------- Prop 1

def _softplus(t):
  return np.logaddexp(0.0, t)


def _sigmoid(t):
  return 1 / (1 + np.exp(-t))


def _logistic_parts(w, x, s):
  """Value, gradient and Hessian of mean softplus(-s x w) (float64, closed form)."""
  m = -s * (x @ w)
  q = _sigmoid(m)
  return (np.mean(_softplus(m)), x.T @ (-s * q) / len(s),
          (x.T * (q * (1 - q))) @ x / len(s))


def _newton(grad_hess, w0, steps=50):
  w = np.array(w0, np.float64)
  for _ in range(steps):
    g, h = grad_hess(w)
    w = w - np.linalg.solve(h, g)
  assert np.linalg.norm(grad_hess(w)[0]) < 1e-12
  return w


def test_proposition1_logistic_regression_error_is_quadratic_in_lam():
  rng = np.random.default_rng(0)
  n, d, alpha = 200, 5, 0.1
  x = rng.normal(size=(n, d))
  s = np.where(x @ rng.normal(size=d) + 0.5 * rng.normal(size=n) > 0, 1.0, -1.0)
  x_shift = x + 0.3 * rng.normal(size=(n, d))  # R: the logistic loss on shifted inputs

  def l_parts(w):
    v, g, h = _logistic_parts(w, x, s)
    return v + alpha / 2 * w @ w, g + alpha * w, h + alpha * np.eye(d)

  w_hat = _newton(lambda w: l_parts(w)[1:], np.zeros(d))

  def loss_fn(w, batch):
    xb, sb = batch
    return jnp.mean(jax.nn.softplus(-sb * (xb @ w))) + alpha / 2 * jnp.vdot(w, w)

  def reg_fn(w, batch):
    xb, sb = batch
    return jnp.mean(jax.nn.softplus(-sb * (xb @ w)))

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  batches = analysis.stack_batches((f32(x), f32(s)), 50)
  reg_batches = analysis.stack_batches((f32(x_shift), f32(s)), 50)
  lams = (0.4, 0.2, 0.1, 0.05)
  errors, moves = [], []
  for lam in lams:
    w_star = _newton(lambda w: tuple(a + lam * b for a, b in zip(
        l_parts(w)[1:], _logistic_parts(w, x_shift, s)[1:])), w_hat)
    pred = analysis.predicted_shift(f32(w_hat), loss_fn, reg_fn, lam, batches,
                                    reg_batches=reg_batches, tol=1e-6, maxiter=50)
    assert bool(pred.info.converged)
    errors.append(np.linalg.norm(w_hat + np.asarray(pred.shift, np.float64) - w_star))
    moves.append(np.linalg.norm(w_star - w_hat))
  errors, moves = np.array(errors), np.array(moves)
  ratios = errors[:-1] / errors[1:]          # halving lam: the error / 4
  assert np.all((ratios > 3.0) & (ratios < 5.0)), ratios
  slope = np.polyfit(np.log(lams), np.log(errors), 1)[0]
  assert 1.8 < slope < 2.2, slope
  assert errors[-1] < 0.05 * moves[-1], (errors, moves)  # first order is right


# ----------------------------------------------------------------------------- Prop 2

def test_proposition2_verdict_is_the_sign_of_the_measured_difference():
  rng = np.random.default_rng(1)
  d, lam, pairs = 6, 1e-3, 24
  q = rng.normal(size=(d, d))
  h = q @ q.T / d + 0.2 * np.eye(d)             # known Hessian
  theta = rng.normal(size=d)                     # the minimum of L

  def l_value(t):
    return 0.5 * (t - theta) @ h @ (t - theta)

  # R(t) = c^T t + sum_j logcosh(t_j - a_j): non-linear, exact derivatives below.
  def r_value(t, c, a):
    return c @ t + np.sum(np.log(np.cosh(t - a)))

  def r_grad_hess(t, c, a):
    return c + np.tanh(t - a), np.diag(1 / np.cosh(t - a) ** 2)

  def loss_fn(t, batch):
    del batch
    diff = t - jnp.asarray(theta, jnp.float32)
    return 0.5 * diff @ jnp.asarray(h, jnp.float32) @ diff

  def reg(c, a):
    return lambda t, batch: c @ t + jnp.sum(jnp.log(jnp.cosh(t - a)))

  batches = jnp.zeros((1, 1))  # the quadratic needs no data
  distance = jax.jit(lambda c1, a1, c2, a2: analysis.regularizer_distance(
      jnp.asarray(theta, jnp.float32), loss_fn, reg(c1, a1), reg(c2, a2), batches,
      tol=1e-6, maxiter=50))
  verdicts, checked = [], 0
  for i in range(pairs):
    c2, a2, a1 = rng.normal(size=d), rng.normal(size=d), rng.normal(size=d)
    # Half the pairs have R1's gradient near R2's (a verdict of True is likely).
    c1 = c2 + (0.3 if i % 2 else 2.0) * rng.normal(size=d)
    g1, g2 = r_grad_hess(theta, c1, a1)[0], r_grad_hess(theta, c2, a2)[0]
    out = distance(*(jnp.asarray(t, jnp.float32) for t in (c1, a1, c2, a2)))
    # Both sides against the known H.
    np.testing.assert_allclose(float(out.distance),
                               np.sqrt((g1 - g2) @ np.linalg.solve(h, g1 - g2)), rtol=1e-4)
    np.testing.assert_allclose(float(out.reference), np.sqrt(g2 @ np.linalg.solve(h, g2)),
                               rtol=1e-4)
    t_star = _newton(lambda t: (h @ (t - theta) + lam * r_grad_hess(t, c1, a1)[0],
                                h + lam * r_grad_hess(t, c1, a1)[1]), theta)
    measured = (l_value(theta) + lam * r_value(theta, c2, a2)
                - l_value(t_star) - lam * r_value(t_star, c2, a2))
    second = float(out.second_derivative)
    if abs(second) < 0.05 * float(out.reference) ** 2:
      continue  # a near tie: O(lam^3) terms may decide it
    checked += 1
    assert bool(out.verdict) == (measured > 0), (i, second, measured)
    np.testing.assert_allclose(measured / (lam ** 2 / 2), second, rtol=0.05,
                               atol=0.02 * float(out.reference) ** 2)
    verdicts.append(bool(out.verdict))
  assert checked >= pairs // 2 and any(verdicts) and not all(verdicts), verdicts


@pytest.mark.sweep  # heavy (10-25 s): CI's sweep tier, not the default (tests/conftest.py)
def test_regularizer_distance_takes_functions_on_their_own_batches():
  apply_fn, params, data, batches = _problem("mlp")
  loss = analysis.classification_loss(apply_fn)
  r1 = analysis.method_regularizer("l2", apply_fn, 0.0)
  r2 = analysis.method_regularizer("ibp", apply_fn, 0.05)
  other = analysis.stack_batches((data[0][::-1], data[1][::-1]), 4)
  kw = dict(gauss_newton=True, damping=DAMPING, tol=1e-5, maxiter=300)
  by_fn = analysis.regularizer_distance(params, loss, r1, r2, batches, r2_batches=other,
                                        **kw)
  g1 = analysis.batch_gradient(r1, params, batches)
  g2 = analysis.batch_gradient(r2, params, other)
  by_grad = analysis.regularizer_distance(params, loss, g1, g2, batches, **kw)
  chex.assert_trees_all_close(by_fn, by_grad, rtol=1e-5)
  a = _dense_gauss_newton(apply_fn, params, data) + DAMPING * np.eye(_flat(g1).size)
  diff = _flat(g1) - _flat(g2)
  np.testing.assert_allclose(float(by_fn.distance), np.sqrt(diff @ np.linalg.solve(a, diff)),
                             rtol=1e-3)


# ----------------------------------------------------------------------------- registry

def _expected_regularizer(name, params, apply_fn, x, y, eps):
  """R from the method's own metrics (not from the loss difference)."""
  if name == "l1":
    return M.l1_penalty(params)
  if name == "l2":
    return M.l2_penalty(params)
  method = M.get_method(name.split("/")[0], **_OPTIONS.get(name, {}))
  _, metrics = method.loss(params, apply_fn, x, y, M.Hyper.create(eps, 0.3, 0.7),
                           jax.random.PRNGKey(0))
  if name.startswith("relu_stability"):
    return metrics["rs"]
  if name == "normal":
    return 0.0
  return metrics["robust_loss"] - metrics["ce_clean"]


_OPTIONS = {"dm/kappa": dict(lam_form="kappa", dm_loss="worst_case")}


@pytest.mark.parametrize("name", ["dm", "dm_s_only", "ibp", "crown_ibp", "relu_stability",
                                  "l1", "l2", "dm/kappa", "normal"])
def test_method_regularizers_are_affine_and_match_the_metrics(name):
  apply_fn, params, (x, y), _ = _problem("mlp")
  eps = 0.05
  reg = analysis.method_regularizer(name.split("/")[0], apply_fn, eps,
                                    **_OPTIONS.get(name, {}))
  check = jax.jit(analysis.regularizer_check, static_argnums=0)(reg, params, (x, y))
  expected = float(_expected_regularizer(name, params, apply_fn, x, y, eps))
  np.testing.assert_allclose(float(check.value), expected, rtol=1e-5, atol=1e-6)
  assert float(check.affinity_error) < 1e-5
  if name == "normal":  # no regularizer term: reported as R = 0, gradient 0
    assert float(check.value) == 0.0 and float(check.grad_norm) == 0.0
  else:
    assert float(check.grad_norm) > 0
  expected_weight = "1 - kappa" if name in ("ibp", "crown_ibp", "dm/kappa") else "lam"
  assert reg.weight == expected_weight
  assert reg.penalties == ((name,) if name in ("l1", "l2") else ())


def test_nonaffine_objective_is_detected():
  reg = analysis.Regularizer(name="sq", fn=lambda p, b: p["w"] ** 2,
                             objective=lambda p, b, w: (1 + w) ** 2 * jnp.sum(p["w"]),
                             weight="lam", penalties=(), description="")
  check = analysis.regularizer_check(reg, {"w": jnp.ones(())}, None)
  assert float(check.affinity_error) > 0.1


# ----------------------------------------------------------------------------- ranking

def test_rank_regularizers_matches_dense_linear_algebra():
  apply_fn, params, data, batches = _problem("mlp")
  loss = analysis.classification_loss(apply_fn)
  grads = {name: analysis.batch_gradient(analysis.method_regularizer(name, apply_fn, 0.05),
                                         params, batches)
           for name in ("dm", "ibp", "relu_stability")}
  target = grads.pop("ibp")
  # A scaled copy of the target: distance > 0 at scale 1 but scaled_distance ~ 0.
  grads["half_target"] = jax.tree_util.tree_map(lambda t: 0.5 * t, target)
  out = analysis.rank_regularizers(params, loss, batches, grads, target, gauss_newton=True,
                                   damping=DAMPING, tol=1e-6, maxiter=300)
  a = _dense_gauss_newton(apply_fn, params, data) + DAMPING * np.eye(_flat(target).size)
  inv = np.linalg.inv(a)
  gj = _flat(target)
  np.testing.assert_allclose(out["target"]["norm"], np.sqrt(gj @ inv @ gj), rtol=1e-4)
  distances = [r["distance"] for r in out["rows"]]
  assert distances == sorted(distances)
  assert [r["rank"] for r in out["rows"]] == [1, 2, 3]
  for row in out["rows"]:
    gi = _flat(grads[row["name"]])
    d = gi - gj
    np.testing.assert_allclose(row["distance"], np.sqrt(d @ inv @ d), rtol=1e-3)
    cos = gi @ inv @ gj / np.sqrt((gi @ inv @ gi) * (gj @ inv @ gj))
    np.testing.assert_allclose(row["cosine"], cos, atol=1e-3)
    np.testing.assert_allclose(row["best_scale"], gi @ inv @ gj / (gi @ inv @ gi),
                               rtol=1e-3)
    np.testing.assert_allclose(row["euclidean"], np.linalg.norm(d), rtol=1e-5)
    assert row["verdict"] == (row["distance"] < out["target"]["norm"])
    assert row["converged"]
  half = next(r for r in out["rows"] if r["name"] == "half_target")
  np.testing.assert_allclose(half["cosine"], 1.0, atol=1e-3)
  np.testing.assert_allclose(half["best_scale"], 2.0, rtol=1e-3)
  assert half["scaled_distance"] < 0.02 * out["target"]["norm"]
  assert half["verdict"]  # ||g/2 - g|| = ||g|| / 2 < ||g||


# ----------------------------------------------------------------------------- errors

def test_bad_inputs_raise_value_errors():
  apply_fn, params, _, batches = _problem("mlp")
  loss = analysis.classification_loss(apply_fn)
  plain = lambda p, b: loss(p, b)
  g = _random_like(params, 5)
  with pytest.raises(ValueError, match="damping"):
    analysis.hvp(loss, params, batches, damping=-1.0)
  with pytest.raises(ValueError, match="SplitLoss"):
    analysis.hvp(plain, params, batches, gauss_newton=True)
  with pytest.raises(ValueError, match="leading axis"):
    analysis.hvp(loss, params, (jnp.zeros((2, 3)), jnp.zeros((3, 3))))
  with pytest.raises(ValueError, match="like params"):
    analysis.inverse_hessian_norm({"w": jnp.ones(3)}, loss, params, batches)
  bad_shape = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape + (1,)), params)
  with pytest.raises(ValueError, match="leaf shapes"):
    analysis.hvp(loss, params, batches)(bad_shape)
  with pytest.raises(ValueError, match="tol"):
    analysis.inverse_hessian_norm(g, loss, params, batches, tol=0.0)
  with pytest.raises(ValueError, match="maxiter"):
    analysis.inverse_hessian_norm(g, loss, params, batches, maxiter=0)
  with pytest.raises(ValueError, match="lam"):
    analysis.predicted_shift(params, loss, g, float("nan"), batches)
  with pytest.raises(ValueError, match="batch_size"):
    analysis.stack_batches((jnp.zeros((4, 2)),), 5)
  with pytest.raises(ValueError, match="Unknown method"):
    analysis.method_regularizer("no_such_method", apply_fn, 0.1)
  with pytest.raises(ValueError, match="eps"):
    analysis.method_regularizer("ibp", apply_fn, -0.1)
  with pytest.raises(ValueError, match="does not read"):
    analysis.method_regularizer("ibp", apply_fn, 0.1, dm_loss="worst_case")
  with pytest.raises(ValueError, match="empty"):
    analysis.rank_regularizers(params, loss, batches, {}, g)


# ----------------------------------------------------------------------------- the CLI

def _mnist_dir():
  env = os.environ.get("DM_JAX_DATA_DIR", "").strip()
  return Path(env) if env else ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory):
  """A briefly, normally trained MLP on 200 MNIST examples (an orbax checkpoint)."""
  if not (_mnist_dir() / "mnist.npz").exists():
    pytest.skip("MNIST not available")
  from dm_jax import data as data_lib
  from dm_jax.train import TrainConfig, train
  workdir = tmp_path_factory.mktemp("select") / "run"
  config = TrainConfig(dataset="mnist", arch="mlp", method="normal", eps_train=0.05,
                       epochs=1, batch_size=50, max_train_examples=200, eval_cert_points=0,
                       eval_test_examples=100, workdir=str(workdir), progress=False)
  train(config, data_lib.load_dataset("mnist", _mnist_dir()))
  return workdir


@pytest.mark.sweep  # heavy (10-25 s): CI's sweep tier, not the default (tests/conftest.py)
def test_select_ranks_the_target_method_itself_first(mlp_checkpoint):
  from experiments import select_regularizer as S
  config, ds, apply_fn, params, step, _ = S.load_checkpoint(str(mlp_checkpoint),
                                                            _mnist_dir())
  assert (config.arch, step) == ("mlp", 4)
  train_data, _ = S.choose_points(ds, config, 100, 10, "test", 0)
  candidates = S.parse_candidates("l2,ibp,dm_s_only")
  # The target on the same points: the ibp candidate's gradient is the target's.
  result = S.select(apply_fn, params, train_data, train_data, eps=0.05,
                    candidates=candidates, target="robust_gap_val", target_method="ibp",
                    batch_size=50, tol=1e-4, maxiter=200, eig_iters=3, log=lambda s: None)
  rows = result["rows"]
  assert [r["rank"] for r in rows] == [1, 2, 3]
  assert rows[0]["name"] == "ibp"
  assert rows[0]["distance"] < 1e-3 * result["target"]["norm"]
  np.testing.assert_allclose(rows[0]["cosine"], 1.0, atol=1e-3)
  assert all(r["converged"] for r in rows) and result["target"]["converged"]
  assert result["setting"]["train_points"] == 100
  assert result["clean"]["top_eigenvalue"] > 0
  text = S.format_table(result)
  assert "ibp" in text and "converged" in text
  with pytest.raises(ValueError, match="no regularizer term"):
    S.select(apply_fn, params, train_data, train_data, eps=0.05,
             candidates=S.parse_candidates("normal"), batch_size=50, log=lambda s: None)


def test_parse_candidates():
  from experiments import select_regularizer as S
  assert S.parse_candidates("dm[dm_loss=worst_case;lam_form=kappa], l1") == [
      ("dm[dm_loss=worst_case;lam_form=kappa]", "dm",
       {"dm_loss": "worst_case", "lam_form": "kappa"}), ("l1", "l1", {})]
  assert S.parse_candidates("ibp[ibp_margin=true]")[0][2] == {"ibp_margin": True}
  assert [c[1] for c in S.parse_candidates(S.DEFAULT_CANDIDATES)] == list(
      analysis.PAPER_REGULARIZERS)
  for bad, needle in (("nosuch", "Unknown method"), ("dm[dm_loss]", "option=value"),
                      ("ibp,ibp", "twice"), (",", "empty")):
    with pytest.raises(ValueError, match=needle):
      S.parse_candidates(bad)


def test_choose_points_holds_out_and_refuses_a_tail_it_trained_on():
  from dm_jax import data as data_lib
  from dm_jax.train import TrainConfig
  from experiments import select_regularizer as S
  x = np.arange(40, dtype=np.float32).reshape(40, 1, 1, 1)
  y = np.arange(40, dtype=np.int32) % 3
  ds = data_lib.Dataset("synthetic", x[:30], y[:30], x[30:], y[30:], 3, (1, 1, 1), "test")
  (xt, _), (xv, _) = S.choose_points(ds, TrainConfig(max_train_examples=20), 20, 10,
                                     "train_tail", 0)
  assert set(xt.ravel()) == set(range(20)) and set(xv.ravel()) == set(range(20, 30))
  (xt, _), (xv, _) = S.choose_points(ds, TrainConfig(), 5, 10, "test", 0)
  assert set(xt.ravel()) <= set(range(30)) and set(xv.ravel()) == set(range(30, 40))
  with pytest.raises(ValueError, match="not held out"):
    S.choose_points(ds, TrainConfig(max_train_examples=25), 5, 10, "train_tail", 0)
  with pytest.raises(ValueError, match="val_points"):
    S.choose_points(ds, TrainConfig(), 5, 11, "test", 0)


def _cli(args, timeout=300):
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.setdefault("DM_JAX_DATA_DIR", str(_mnist_dir()))
  return subprocess.run([sys.executable, "-m", "experiments.select_regularizer"] + args,
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.sweep  # an end-to-end run in a subprocess, about 30 s
def test_cli_writes_the_ranking_and_the_validation(mlp_checkpoint, tmp_path):
  out = tmp_path / "sel.json"
  proc = _cli([f"--checkpoint={mlp_checkpoint}", "--candidates=ibp,l2,relu_stability",
               "--train_points=100", "--val_points=100", "--batch_size=50",
               "--eig_iters=2", "--validate", "--finetune_steps=2", "--finetune_batch=20",
               "--cert_points=20", "--benchmark", f"--output={out}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert sorted(r["name"] for r in result["rows"]) == ["ibp", "l2", "relu_stability"]
  assert [r["rank"] for r in result["rows"]] == [1, 2, 3]
  assert result["target"]["kind"] == "robust_val" and result["setting"]["eps"] == 0.05
  assert set(result["validation"]["runs"]) == {"none", "ibp", "l2", "relu_stability"}
  assert "spearman_distance_vs_objective" in result["validation"]
  assert result["timings"]["hvp_seconds"] > 0 and len(result["timings"]["cg_iterations"]) == 4
  assert "| mlp (" in proc.stdout and "Spearman" in proc.stdout


@pytest.mark.parametrize("flag,needle", [("--candidates=nosuch", "Unknown method"),
                                         ("--train_points=100000", "train_points"),
                                         ("--damping=-1", "damping")])
def test_cli_bad_flags_exit_with_one_line(mlp_checkpoint, flag, needle):
  proc = _cli([f"--checkpoint={mlp_checkpoint}", flag, "--val_points=10"], timeout=120)
  assert proc.returncode == 1
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
