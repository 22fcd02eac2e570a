"""Tests for dm_jax.train.methods: every training loss on every architecture, and hand checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dm_jax import double_margin, dm_regularizer, folded_margins, get_model, interval_bounds
from dm_jax.train import methods as M
from dm_jax.train.methods import Hyper, get_method

ARCHS = ("small", "pureconv", "resnet", "pooling", "medium", "large")
# Input shape per architecture in the tests (tiny batches of MNIST- or CIFAR-like data).
SHAPES = {"small": (28, 28, 1), "pureconv": (32, 32, 3), "resnet": (28, 28, 1),
          "pooling": (32, 32, 3), "medium": (28, 28, 1), "large": (32, 32, 3)}
LINEAR = ("crown_ibp", "bounded")
FAST = dict(pgd_steps=2, pgd_step_size=0.02, mmr_units=16, mmr_k_b=8)


def _batch(shape, n=4, seed=0, classes=10):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.uniform(kx, (n,) + shape)
  y = jax.random.randint(ky, (n,), 0, classes)
  return x, y


@functools.lru_cache(maxsize=None)
def _model(arch, shape, ensemble=1):
  model = get_model(arch, 10, ensemble=ensemble)
  params = model.init(jax.random.PRNGKey(1), jnp.zeros((1,) + shape))
  return model, params


def _hyper(eps=0.05, lam=0.5, kappa=0.5):
  return Hyper.create(eps, lam, kappa)


def _loss_and_grad(method, apply_fn, params, x, y, hyper, key=jax.random.PRNGKey(3)):
  f = jax.jit(jax.value_and_grad(
      lambda p, xx, yy, h, k: method.loss(p, apply_fn, xx, yy, h, k), has_aux=True))
  (loss, metrics), grads = f(params, x, y, hyper, key)
  return loss, metrics, grads


def _check_finite_nonzero(loss, metrics, grads):
  assert np.isfinite(float(loss))
  for name in ("ce_clean", "robust_loss", "acc"):
    assert name in metrics, name
  for name, v in metrics.items():
    assert np.ndim(v) == 0, name
    assert np.isfinite(float(v)), (name, float(v))
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


def _run(name, arch, ensemble=1, **kw):
  shape = SHAPES[arch]
  model, params = _model(arch, shape, ensemble)
  x, y = _batch(shape)
  method = get_method(name, **{**FAST, **kw})
  loss, metrics, grads = _loss_and_grad(method, model.apply, params, x, y, _hyper())
  _check_finite_nonzero(loss, metrics, grads)
  return loss, metrics


# ----------------------------------------------------------------------------- matrix

# "bounded" (Fast-Lin with linear intermediate bounds: one backward pass per hidden
# unit) is minutes on a CNN on CPU, so the default run checks it on an MLP.
@pytest.mark.parametrize("name", [n for n in M.METHODS if n != "bounded"])
def test_every_method_on_small(name):
  _run(name, "small")


def test_bounded_on_mlp():
  model = get_model("mlp", 10, hidden=(16, 16))
  x, y = _batch((6, 6, 1))
  params = model.init(jax.random.PRNGKey(1), x)
  method = get_method("bounded")
  loss, metrics, grads = _loss_and_grad(method, model.apply, params, x, y, _hyper())
  _check_finite_nonzero(loss, metrics, grads)


# Every architecture with Double Margin in the default run; the full
# method x architecture product is marked slow.
@pytest.mark.parametrize("arch", ARCHS[1:])
def test_dm_every_arch(arch):
  _run("dm", arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", M.METHODS)
def test_every_method_every_arch(name, arch):
  if (arch == "small" and name != "bounded") or (name == "dm" and arch != "small"):
    pytest.skip("covered by the default run")
  _run(name, arch)


@pytest.mark.parametrize("name", ("dm", "dm_s_only", "dm_ibp_v"))
def test_dm_on_ensemble(name):
  _run(name, "small", ensemble=2)


def test_options_finite():
  _run("relu_stability", "small", adv=True, l1=2e-5, prune=True)
  _run("dm", "small", l1=2e-5, lam_form="kappa")


@pytest.mark.slow
def test_more_options_finite():
  _run("dm", "small", dm_domain=True)
  _run("adv", "small", norm="l2")
  _run("trades", "small", norm="l2")
  _run("ibp", "small", norm="l2")
  _run("mmr", "small", norm="l2")
  _run("relu_stability", "small", norm="l1")

@pytest.mark.sweep
def test_linear_options_finite():
  _run("crown_ibp", "small", crown_ibp_beta="lam")
  _run("ibp", "small", ibp_margin=True)


def test_relu_stability_prune_flag():
  assert get_method("relu_stability", prune=True).prune
  assert not get_method("relu_stability").prune


# ----------------------------------------------------------------------------- API

def test_unknown_method_raises():
  with pytest.raises(ValueError, match="dm_s_only"):
    get_method("not_a_method")
  with pytest.raises(ValueError):
    get_method("dm", lam_form="other")
  with pytest.raises(ValueError):
    get_method("adv", norm="l0")


def test_methods_have_descriptions():
  for name in M.METHODS:
    m = get_method(name)
    assert m.name == name and len(m.description) > 20
    assert m.loss.__doc__
    assert not m.needs_ensemble


def test_hyper_is_pytree_and_traced():
  h = _hyper(0.1, 2.0, 0.5)
  assert len(jax.tree_util.tree_leaves(h)) == 3
  model, params = _model("small", SHAPES["small"])
  x, y = _batch(SHAPES["small"])
  method = get_method("dm")
  f = jax.jit(lambda h: method.loss(params, model.apply, x, y, h, jax.random.PRNGKey(0))[0])
  l1, l2 = f(_hyper(0.0, 0.0)), f(_hyper(0.1, 2.0))
  assert float(l1) != float(l2)


# ----------------------------------------------------------------------------- formulas

def _ce(logits, y):
  return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)))


@pytest.mark.parametrize("name,variant", [("dm", "dm"), ("dm_s_only", "s_only"),
                                          ("dm_ibp_v", "ibp_v")])
def test_dm_paper_form_equals_ce_plus_lambda_r(name, variant):
  model, params = _model("small", SHAPES["small"])
  x, y = _batch(SHAPES["small"])
  lam, eps = 2.0, 0.02
  loss, metrics = get_method(name).loss(params, model.apply, x, y, _hyper(eps, lam, 0.3),
                                        jax.random.PRNGKey(0))
  m = double_margin(model.apply, params, x, eps, "linf", variant=variant)
  ce = _ce(model.apply(params, x), y)
  expected = ce + lam * float(dm_regularizer(m, y))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ce_clean"]), ce, rtol=1e-5)


def test_dm_kappa_form():
  model, params = _model("small", SHAPES["small"])
  x, y = _batch(SHAPES["small"])
  kappa, eps = 0.7, 0.02
  loss, _ = get_method("dm", lam_form="kappa").loss(params, model.apply, x, y,
                                                    _hyper(eps, 5.0, kappa), None)
  m = double_margin(model.apply, params, x, eps, "linf")
  ce = _ce(model.apply(params, x), y)
  split = float(jnp.mean(lse(m.upper) - jnp.take_along_axis(m.lower, y[:, None], 1)[:, 0]))
  np.testing.assert_allclose(float(loss), kappa * ce + (1 - kappa) * split, rtol=1e-5)


def lse(t):
  return jax.nn.logsumexp(t, axis=-1)


def test_dm_ensemble_averages_members():
  shape = SHAPES["small"]
  ens, params = _model("small", shape, 3)
  member = get_model("small", 10)
  x, _ = _batch(shape)
  eps = 0.03
  m_ens = double_margin(ens.apply, params, x, eps, "linf")
  ms = [double_margin(member.apply, {"params": params["params"][f"member_{i}"]}, x, eps,
                      "linf") for i in range(3)]
  for field in ("z", "s", "v"):
    avg = sum(getattr(m, field) for m in ms) / 3
    np.testing.assert_allclose(getattr(m_ens, field), avg, rtol=1e-4, atol=1e-5)


def test_ibp_at_kappa_one_is_ce():
  model, params = _model("small", SHAPES["small"])
  x, y = _batch(SHAPES["small"])
  loss, metrics = get_method("ibp").loss(params, model.apply, x, y, _hyper(0.1, 0.0, 1.0),
                                         None)
  np.testing.assert_allclose(float(loss), _ce(model.apply(params, x), y), rtol=1e-6)
  assert 0 <= float(metrics["ibp_cert_acc"]) <= 1


def test_ibp_robust_term_is_worst_case_logits():
  model, params = _model("small", SHAPES["small"])
  x, y = _batch(SHAPES["small"])
  eps = 0.01
  loss, _ = get_method("ibp").loss(params, model.apply, x, y, _hyper(eps, 0.0, 0.0), None)
  b = interval_bounds(model.apply, params, x, eps, "linf", domain=(0.0, 1.0))
  lo, up = np.asarray(b.lower), np.asarray(b.upper)
  zhat = up.copy()
  zhat[np.arange(len(y)), np.asarray(y)] = lo[np.arange(len(y)), np.asarray(y)]
  np.testing.assert_allclose(float(loss), _ce(jnp.asarray(zhat), y), rtol=1e-5)


def test_ibp_eps_zero_cert_equals_acc():
  model, params = _model("small", SHAPES["small"])
  x, y = _batch(SHAPES["small"])
  y = jnp.argmax(model.apply(params, x), -1).at[0].set(
      (jnp.argmax(model.apply(params, x[:1]), -1)[0] + 1) % 10)
  _, met = get_method("ibp").loss(params, model.apply, x, y, _hyper(0.0, 0.0, 0.5), None)
  np.testing.assert_allclose(float(met["ibp_cert_acc"]), float(met["acc"]))
  np.testing.assert_allclose(float(met["acc"]), 0.75)


def _mlp_np(params):
  p = params["params"]
  names = sorted(p, key=lambda n: int(n.split("_")[-1]))
  return [(np.asarray(p[n]["kernel"], np.float64), np.asarray(p[n]["bias"], np.float64))
          for n in names]


def test_relu_stability_by_hand():
  model = get_model("mlp", 3, hidden=(8, 6))
  x, y = _batch((5,), n=4, classes=3)
  params = model.init(jax.random.PRNGKey(4), x)
  layers = _mlp_np(params)
  eps, lam = 0.1, 0.3
  # Hand-rolled IBP on [x - eps, x + eps] intersected with [0, 1].
  lo = np.clip(np.asarray(x, np.float64) - eps, 0, 1)
  hi = np.clip(np.asarray(x, np.float64) + eps, 0, 1)
  rs = np.zeros(x.shape[0])
  for i, (w, b) in enumerate(layers[:-1]):
    wp, wn = np.maximum(w, 0), np.minimum(w, 0)
    l_new = lo @ wp + hi @ wn + b
    u_new = hi @ wp + lo @ wn + b
    rs += np.sum(-np.tanh(1 + u_new * l_new), axis=-1)
    lo, hi = np.maximum(l_new, 0), np.maximum(u_new, 0)
  rs = rs.mean()
  loss, metrics = get_method("relu_stability").loss(params, model.apply, x, y,
                                                    _hyper(eps, lam, 0.5), None)
  np.testing.assert_allclose(float(metrics["rs"]), rs, rtol=1e-5)
  ce = _ce(model.apply(params, x), y)
  np.testing.assert_allclose(float(loss), ce + lam * rs, rtol=1e-5)


def test_l1_l2_penalty_by_hand():
  model = get_model("small", 10)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  l1, l2 = 0.0, 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if path[-1].key == "kernel":
      w = np.asarray(leaf, np.float64)
      l1 += np.abs(w).reshape(-1, w.shape[-1]).sum(0).max()
      l2 += (w ** 2).sum()
  np.testing.assert_allclose(float(M.l1_penalty(params)), l1, rtol=1e-5)
  np.testing.assert_allclose(float(M.l2_penalty(params)), l2, rtol=1e-5)
  x, y = _batch((28, 28, 1))
  loss, _ = get_method("l1").loss(params, model.apply, x, y, _hyper(), None)
  np.testing.assert_allclose(float(loss), _ce(model.apply(params, x), y) + 2e-5 * l1,
                             rtol=1e-6)
  loss, _ = get_method("dm", l1=1e-3).loss(params, model.apply, x, y, _hyper(0.0, 0.0), None)
  np.testing.assert_allclose(float(loss), _ce(model.apply(params, x), y) + 1e-3 * l1,
                             rtol=1e-5)


def test_prune_and_masks():
  model = get_model("small", 10)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  pruned, masks = M.prune_small_weights(params, threshold=0.05)
  for (path, p), (_, q) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                               jax.tree_util.tree_flatten_with_path(pruned)[0]):
    if path[-1].key == "kernel":
      np.testing.assert_array_equal(q, jnp.where(jnp.abs(p) < 0.05, 0.0, p))
    else:
      np.testing.assert_array_equal(q, p)
  # A gradient step revives pruned weights; apply_masks zeroes them again.
  bumped = jax.tree_util.tree_map(lambda t: t + 1.0, pruned)
  again = M.apply_masks(bumped, masks)
  for (path, p), (_, q) in zip(jax.tree_util.tree_flatten_with_path(pruned)[0],
                               jax.tree_util.tree_flatten_with_path(again)[0]):
    if path[-1].key == "kernel":
      np.testing.assert_array_equal(q == 0, p == 0)
  assert jax.jit(M.apply_masks)(bumped, masks) is not None


# ----------------------------------------------------------------------------- PGD

@pytest.mark.parametrize("norm", ("linf", "l2"))
def test_pgd_in_ball_and_domain_and_increases_loss(norm):
  model, params = _model("small", SHAPES["small"])
  x, y = _batch(SHAPES["small"], n=8)
  eps = 0.1 if norm == "linf" else 1.0
  attack = jax.jit(functools.partial(M.pgd_attack, model.apply, steps=10,
                                     step_size=eps / 4, norm=norm, restarts=2))
  x_adv = attack(params, x, y, eps, jax.random.PRNGKey(0))
  d = (x_adv - x).reshape(x.shape[0], -1)
  if norm == "linf":
    assert float(jnp.max(jnp.abs(d))) <= eps + 1e-6
  else:
    assert float(jnp.max(jnp.linalg.norm(d, axis=-1))) <= eps + 1e-5
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  ce = lambda xx: optax.softmax_cross_entropy_with_integer_labels(model.apply(params, xx), y)
  assert float(jnp.mean(ce(x_adv))) > float(jnp.mean(ce(x)))
  assert bool(jnp.all(ce(x_adv) >= ce(x) - 1e-4))


def test_pgd_margin_loss_and_eps_zero():
  model, params = _model("small", SHAPES["small"])
  x, y = _batch(SHAPES["small"])
  x_adv = M.pgd_attack(model.apply, params, x, y, 0.0, jax.random.PRNGKey(0), steps=3,
                       step_size=0.1, loss="margin")
  np.testing.assert_allclose(x_adv, x, atol=1e-7)
  x_adv = M.pgd_attack(model.apply, params, x, y, jnp.full((4,), 0.05), jax.random.PRNGKey(0),
                       steps=3, step_size=0.02, loss="margin")
  assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.05 + 1e-6
  with pytest.raises(ValueError):
    M.pgd_attack(model.apply, params, x, y, 0.1, jax.random.PRNGKey(0), loss="kl")


def test_adv_loss_is_ce_at_attack_point_and_trades_at_zero():
  model, params = _model("small", SHAPES["small"])
  x, y = _batch(SHAPES["small"])
  ce = _ce(model.apply(params, x), y)
  # eps = 0: the attack cannot move; adv = CE, TRADES KL = 0.
  loss, _ = get_method("adv", pgd_steps=2).loss(params, model.apply, x, y, _hyper(0.0),
                                                jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(loss), ce, rtol=1e-6)
  loss, met = get_method("trades", pgd_steps=2).loss(params, model.apply, x, y, _hyper(0.0),
                                                     jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(loss), ce, rtol=1e-5)
  loss, met = get_method("trades", pgd_steps=3).loss(params, model.apply, x, y, _hyper(0.1),
                                                     jax.random.PRNGKey(0))
  assert float(met["kl"]) > 0
  np.testing.assert_allclose(float(loss), ce + 6.0 * float(met["kl"]), rtol=1e-5)


# ----------------------------------------------------------------------------- MMR

def test_mmr_distances_by_hand():
  model = get_model("mlp", 3, hidden=(8,))
  x, y = _batch((5,), n=4, classes=3)
  params = model.init(jax.random.PRNGKey(5), x)
  (w1, b1), (w2, b2) = _mlp_np(params)
  xn = np.asarray(x, np.float64)
  eps, lam = 0.2, 1.0
  gamma = 1.5 * eps
  hinge = lambda d: np.maximum(0, 1 - d / gamma)
  # Region boundaries of the one hidden layer: |w_i x + b_i| / ||w_i||_1 (l-inf ball).
  z1 = xn @ w1 + b1
  d_b = np.abs(z1) / np.abs(w1).sum(0)
  reg_b = hinge(np.sort(d_b, axis=1)[:, :3]).mean()
  # Decision boundaries in the local affine region.
  act = (z1 > 0).astype(np.float64)
  reg_d = []
  for i in range(4):
    jac = (w1 * act[i]) @ w2                       # (5, 3): d logits / d x
    logits = np.maximum(z1[i], 0) @ w2 + b2
    yi = int(y[i])
    den = [np.abs(jac[:, yi] - jac[:, j]).sum() for j in range(3)]
    ds = [(logits[yi] - logits[j]) / den[j] if den[j] > 0 else np.inf
          for j in range(3) if j != yi]
    reg_d.append(hinge(np.array(ds)).mean())
  reg_d = float(np.mean(reg_d))
  method = get_method("mmr", mmr_units=400, mmr_k_b=3)  # all 8 units
  loss, met = method.loss(params, model.apply, x, y, _hyper(eps, lam), jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(met["mmr_b"]), reg_b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(met["mmr_d"]), reg_d, rtol=1e-4, atol=1e-6)
  ce = _ce(model.apply(params, x), y)
  np.testing.assert_allclose(float(loss), ce + lam * (reg_b + reg_d), rtol=1e-5)


@pytest.mark.sweep
def test_mmr_eps_zero_is_ce():
  model, params, x, y = _mlp_setup()
  loss, _ = get_method("mmr", **{k: v for k, v in FAST.items() if k.startswith("mmr")}).loss(
      params, model.apply, x, y, _hyper(0.0, 1.0), jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(loss), _ce(model.apply(params, x), y), rtol=1e-6)


# ----------------------------------------------------------------------------- linear
# These need dm_jax.bounds.linear.margin_lower_bounds (written by the lead); they fail loudly
# until it exists.

@pytest.mark.parametrize("name,lin", [("crown_ibp", "crown_ibp"), ("bounded", "fastlin")])
def test_linear_methods_match_margin_lower_bounds(name, lin):
  from dm_jax.bounds import linear
  model, params, x, y = _mlp_setup()
  eps, kappa = 0.01, 0.3
  loss, met = get_method(name).loss(params, model.apply, x, y, _hyper(eps, 0.0, kappa), None)
  lb = linear.margin_lower_bounds(model.apply, params, x, y, eps, "linf", method=lin,
                                  domain=(0.0, 1.0))
  ce = _ce(model.apply(params, x), y)
  np.testing.assert_allclose(float(loss), kappa * ce + (1 - kappa) * _ce(-lb, y), rtol=1e-5)
  loss1, _ = get_method(name).loss(params, model.apply, x, y, _hyper(eps, 0.0, 1.0), None)
  np.testing.assert_allclose(float(loss1), ce, rtol=1e-6)
  assert 0 <= float(met["cert_acc"]) <= float(met["acc"]) + 1e-6


def _mlp_setup():
  model = get_model("mlp", 10, hidden=(16, 16))
  x, y = _batch((6, 6, 1))
  return model, model.init(jax.random.PRNGKey(1), x), x, y


def test_crown_ibp_beta_mix():
  from dm_jax.bounds import linear
  model, params, x, y = _mlp_setup()
  eps, beta = 0.01, 0.25
  loss, _ = get_method("crown_ibp", crown_ibp_beta="lam").loss(
      params, model.apply, x, y, _hyper(eps, beta, 0.0), None)
  kw = dict(domain=(0.0, 1.0))
  lb = (beta * linear.margin_lower_bounds(model.apply, params, x, y, eps, "linf",
                                          method="crown_ibp", **kw)
        + (1 - beta) * linear.margin_lower_bounds(model.apply, params, x, y, eps, "linf",
                                                  method="ibp", **kw))
  np.testing.assert_allclose(float(loss), _ce(-lb, y), rtol=1e-5)


def test_dm_worst_case_loss_is_ce_of_the_worst_case_logits():
  """dm_loss="worst_case" is CE(z_hat) of the DM ends; it never exceeds eq. 9's split CE
  (whose logsumexp has u_y >= l_y in place of l_y), and both agree at eps = 0."""
  model = get_model("mlp", 10, hidden=(16,))
  x = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 8, 1))
  y = jnp.arange(6) % 10
  params = model.init(jax.random.PRNGKey(1), x[:1])
  for eps in (0.0, 0.05, 0.2):
    hyper = Hyper.create(eps=eps, lam=0.5, kappa=0.5)
    split = get_method("dm", lam_form="kappa").loss(
        params, model.apply, x, y, hyper, None)[1]["robust_loss"]
    wc = get_method("dm", lam_form="kappa", dm_loss="worst_case").loss(
        params, model.apply, x, y, hyper, None)[1]["robust_loss"]
    m = double_margin(model.apply, params, x, eps)
    zhat = jnp.where(jax.nn.one_hot(y, 10, dtype=bool), m.lower, m.upper)
    expected = jnp.mean(jax.nn.logsumexp(zhat, -1) - jnp.take_along_axis(
        zhat, y[:, None], -1)[:, 0])
    np.testing.assert_allclose(wc, expected, rtol=1e-5)
    assert wc <= split + 1e-6
    if eps == 0.0:
      np.testing.assert_allclose(wc, split, rtol=1e-5)
    else:
      assert wc < split
  with pytest.raises(ValueError, match="dm_loss"):
    get_method("dm", dm_loss="nope")


def test_dm_folded_loss_is_ce_of_the_folded_margins():
  """dm_loss="folded" is CE(-m), m from double_margin.folded_margins; it never exceeds
  the worst-case-logit loss (folding only tightens), and both agree at eps = 0."""
  model = get_model("mlp", 10, hidden=(16,))
  x = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 8, 1))
  y = jnp.arange(6) % 10
  params = model.init(jax.random.PRNGKey(1), x[:1])
  for variant in ("dm", "dm_ibp_v"):
    for eps in (0.0, 0.05):
      hyper = Hyper.create(eps=eps, lam=0.5, kappa=0.5)
      folded, fm = get_method(variant, lam_form="kappa", dm_loss="folded").loss(
          params, model.apply, x, y, hyper, None)
      wc = get_method(variant, lam_form="kappa", dm_loss="worst_case").loss(
          params, model.apply, x, y, hyper, None)[1]["robust_loss"]
      _, lb = folded_margins(model.apply, params, x, y, eps,
                             variant="ibp_v" if variant == "dm_ibp_v" else "dm")
      np.testing.assert_allclose(fm["robust_loss"], _ce(-lb, y), rtol=1e-5)
      np.testing.assert_allclose(folded, 0.5 * fm["ce_clean"] + 0.5 * fm["robust_loss"],
                                 rtol=1e-5)
      assert fm["robust_loss"] <= wc + 1e-6
      if eps == 0.0:
        np.testing.assert_allclose(fm["robust_loss"], wc, rtol=1e-5)
