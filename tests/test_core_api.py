"""Public API of the bound-propagation core: shapes, jit, vmap, grad, ensembles, errors."""
from __future__ import annotations

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
GTSRB = U.CIFAR  # 32x32x3
GTSRB_CLASSES = 43
B = 2
EPS = 8 / 255


def _finite_nonzero_grads(grads, what):
  leaves = jax.tree_util.tree_leaves(grads)
  assert leaves, what
  for g in leaves:
    assert np.all(np.isfinite(np.asarray(g))), f"{what}: non-finite gradient"
  total = sum(float(jnp.sum(jnp.square(g))) for g in leaves)
  assert total > 0, f"{what}: gradient is identically zero"


def check_shapes(variant_fn, arch):
  """GTSRB-shaped inputs (43 classes): shapes of the bounds, margins and ReLU inputs."""
  model, params = U.model_and_params(arch, GTSRB, num_classes=GTSRB_CLASSES)
  x = jnp.asarray(U.nominal_inputs(GTSRB, B, seed=3))

  def run(p, x):
    return (dm_jax.interval_bounds(model.apply, p, x, EPS, return_relu_inputs=True),
            dm_jax.double_margin(model.apply, p, x, EPS, return_relu_inputs=True),
            dm_jax.double_margin(model.apply, p, x, EPS, variant="ibp_v"))

  (ib, relus), (dm, dm_relus), ibv = variant_fn(run)(params, x)
  chex.assert_shape([ib.lower, ib.upper, dm.z, dm.s, dm.v, dm.lower, dm.upper,
                     ibv.z, ibv.s, ibv.v, ibv.lower, ibv.upper], (B, GTSRB_CLASSES))
  logits, ref_relus = U.forward_fn(arch, GTSRB, GTSRB_CLASSES)(x)
  assert len(relus) == len(dm_relus) == len(ref_relus)
  for r, m, ref in zip(relus, dm_relus, ref_relus):
    chex.assert_shape([r.lower, r.upper, m.z, m.s, m.v], ref.shape)
  chex.assert_trees_all_close(dm.z, logits, rtol=1e-5, atol=1e-5)
  chex.assert_tree_all_finite((ib, dm, ibv))


def check_vmap_grad(variant_fn, arch, shape=U.MNIST):
  """vmap over eps values and over a stacked batch; gradients w.r.t. the parameters."""
  model, params = U.model_and_params(arch, shape)
  x = jnp.asarray(U.nominal_inputs(shape, B, seed=3))
  labels = jnp.array([0, 9])
  eps_values = (0.0, 0.02, 0.1)

  def ibp_loss(q):
    b = dm_jax.interval_bounds(model.apply, q, x, EPS)
    onehot = jax.nn.one_hot(labels, 10)
    worst = jnp.where(onehot > 0, b.lower, b.upper)
    return jnp.mean(jax.nn.logsumexp(worst, -1) - jnp.sum(worst * onehot, -1))

  def dm_loss(q):
    return dm_jax.dm_regularizer(dm_jax.double_margin(model.apply, q, x, EPS), labels)

  def run(p, x):
    ib_eps = jax.vmap(lambda e: dm_jax.interval_bounds(model.apply, p, x, e))(
        jnp.asarray(eps_values))
    ib_one = dm_jax.interval_bounds(model.apply, p, x, eps_values[1])
    dm_stack = jax.vmap(lambda xx: dm_jax.double_margin(model.apply, p, xx, EPS))(
        x.reshape((B, 1) + x.shape[1:]))
    dm = dm_jax.double_margin(model.apply, p, x, EPS)
    g = jax.grad(lambda q: ibp_loss(q) + dm_loss(q))(p)
    return ib_eps, ib_one, dm_stack, dm, g

  ib_eps, ib_one, dm_stack, dm, g = variant_fn(run)(params, x)
  chex.assert_shape([ib_eps.lower, ib_eps.upper], (len(eps_values), B, 10))
  chex.assert_shape([dm_stack.z, dm_stack.s, dm_stack.v], (B, 1, 10))
  chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[1], ib_eps), ib_one,
                              rtol=1e-5, atol=1e-5 * (1 + U.tree_max_abs(ib_one)))
  chex.assert_trees_all_close(ib_eps.lower[0], ib_eps.upper[0],
                              atol=1e-5 * (1 + U.tree_max_abs(ib_one)))  # eps = 0
  assert np.all(np.asarray(ib_eps.lower[2]) <= np.asarray(ib_eps.lower[1]) + 1e-5)
  chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[:, 0], dm_stack), dm,
                              rtol=1e-5, atol=1e-5 * (1 + U.tree_max_abs(dm)))
  _finite_nonzero_grads(g, f"{arch} IBP loss + dm_regularizer")
  chex.assert_trees_all_equal_shapes(g, params)


LIGHT_ARCHS = ("mlp", "small", "resnet", "pooling")


class ArchitectureApiTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(f"_{a}", a) for a in ALL_ARCHS])
  def test_gtsrb_shapes(self, arch):
    check_shapes(self.variant, arch)

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(*[(f"_{a}", a) for a in LIGHT_ARCHS])
  def test_vmap_and_grad(self, arch):
    check_vmap_grad(self.variant, arch)


@pytest.mark.slow
class ArchitectureApiSlowTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(f"_{a}", a) for a in ALL_ARCHS if a not in LIGHT_ARCHS])
  def test_vmap_and_grad(self, arch):
    check_vmap_grad(self.variant, arch)

  @chex.variants(without_jit=True)
  @parameterized.named_parameters(*[(f"_{a}", a) for a in LIGHT_ARCHS])
  def test_vmap_and_grad_eager(self, arch):
    check_vmap_grad(self.variant, arch)


class NormGradTest(chex.TestCase):
  """Gradients through the exact first layer of every norm (sqrt, max, top-k)."""

  @chex.variants(with_jit=True)
  def test_grad_finite_nonzero_every_norm(self):
    model, params = U.model_and_params("small", (8, 8, 3))
    x = jnp.asarray(U.nominal_inputs((8, 8, 3), B, seed=4))
    settings = (("l2", 0.5, None, None), ("l1", 1.0, None, None), ("l0", None, 3, None),
                ("linf", 0.1, None, (0.0, 1.0)))

    def grads(p):
      def loss(q, norm, eps, k, domain):
        m = dm_jax.double_margin(model.apply, q, x, eps, norm, k=k, domain=domain)
        return jnp.sum(m.s + m.v)
      return [jax.grad(loss)(p, *st) for st in settings]

    for st, g in zip(settings, self.variant(grads)(params)):
      _finite_nonzero_grads(g, st[0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_l2_grad_finite_with_a_zero_row(self):
    """A first-layer unit with all-zero weights has l2 row norm 0 (sqrt at 0)."""
    model = dm_jax.get_model("mlp", 10, hidden=(8,))
    params = U.init_params(model, (12,), seed=0)
    k = params["params"]["Dense_0"]["kernel"]
    params["params"]["Dense_0"]["kernel"] = k.at[:, 0].set(0.0)
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (B, 12)).astype(np.float32))
    g = self.variant(jax.grad(lambda p: jnp.sum(
        dm_jax.interval_bounds(model.apply, p, x, 0.5, "l2").radius)))(params)
    _finite_nonzero_grads(g, "l2 with a zero row")


# ----------------------------------------------------------------------- ensembles

class EnsembleTest(chex.TestCase):
  """DM of an ensemble = averages of the members' z, s, v (Appendix H.2)."""

  def _check(self, variant_fn, arch, norm="linf", eps=0.05, k=None):
    n = 3
    model, params = U.model_and_params(arch, U.MNIST, ensemble=n)
    single = dm_jax.get_model(arch)
    x = jnp.asarray(U.nominal_inputs(U.MNIST, B, seed=5))

    def run(p, x):
      ens = dm_jax.double_margin(model.apply, p, x, eps, norm, k=k)
      members = [dm_jax.double_margin(single.apply, {"params": p["params"][f"member_{i}"]},
                                      x, eps, norm, k=k) for i in range(n)]
      return ens, members

    ens, members = variant_fn(run)(params, x)
    chex.assert_shape([ens.z, ens.s, ens.v], (B, 10))
    for field in ("z", "s", "v"):
      avg = sum(getattr(m, field) for m in members) / n
      got = getattr(ens, field)
      chex.assert_trees_all_close(got, avg, rtol=1e-5, atol=1e-5 * (1 + U.tree_max_abs(avg)),
                                  custom_message=f"{arch} ensemble {field}")
    assert float(jnp.max(ens.v)) > 0 or arch == "mlp"  # the check is not vacuous
    chex.assert_trees_all_close(ens.z, model.apply(params, x), rtol=1e-5, atol=1e-5)

  @chex.variants(without_jit=True)
  @parameterized.named_parameters(*[(f"_{a}", a) for a in dm_jax.ARCHITECTURES])
  def test_ensemble_margins_are_member_averages(self, arch):
    self._check(self.variant, arch)

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(("_small_l2", "small", "l2", 0.5, None),
                                  ("_pooling_l0", "pooling", "l0", None, 3))
  def test_ensemble_margins_are_member_averages_jit_other_norms(self, arch, norm, eps, k):
    self._check(self.variant, arch, norm, eps, k)


# -------------------------------------------------------------------------- errors

class SinModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(x.reshape((x.shape[0], -1)))
    return nn.Dense(3)(jnp.sin(h))


class SinOfWeightsModel(nn.Module):
  """sin only of a parameter: input-independent, so it must be supported."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], 3))
    return x @ jnp.sin(w)


def _dense_model(n_in=784):
  model = nn.Dense(10)
  return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, n_in)))


class ErrorTest(parameterized.TestCase):

  @parameterized.parameters("linf", "l2")
  def test_sin_of_input_raises_unsupported_primitive(self, norm):
    model = SinModel()
    x = jnp.ones((2, 5))
    params = model.init(jax.random.PRNGKey(0), x)
    for fn in (dm_jax.interval_bounds, dm_jax.double_margin):
      with pytest.raises(dm_jax.UnsupportedPrimitiveError, match="sin") as info:
        fn(model.apply, params, x, 0.1, norm)
      assert info.value.primitive == "sin"
      assert isinstance(info.value, NotImplementedError)
    with pytest.raises(dm_jax.UnsupportedPrimitiveError, match="sin"):
      jax.jit(lambda p, x: dm_jax.interval_bounds(model.apply, p, x, 0.1, norm))(params, x)

  def test_product_of_input_dependent_values_raises_in_double_margin(self):
    # Products of two input-dependent values have interval and linear rules
    # (tests/test_activations.py), not Double Margin ones.
    fn = lambda p, x: (x @ p) * (x @ p)
    dm_jax.interval_bounds(fn, jnp.ones((3, 4)), jnp.ones((2, 3)), 0.1)
    with pytest.raises(dm_jax.UnsupportedPrimitiveError, match="mul.*interval and linear"):
      dm_jax.double_margin(fn, jnp.ones((3, 4)), jnp.ones((2, 3)), 0.1)

  def test_sin_of_weights_is_fine(self):
    model = SinOfWeightsModel()
    x = jnp.full((2, 4), 0.5)
    params = model.init(jax.random.PRNGKey(0), x)
    b = dm_jax.interval_bounds(model.apply, params, x, 0.1)
    w = np.sin(np.asarray(params["params"]["w"]))
    centre = np.asarray(x) @ w
    chex.assert_trees_all_close(b.centre, centre, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(b.radius, np.broadcast_to(0.1 * np.abs(w).sum(0), (2, 3)),
                                rtol=1e-5, atol=1e-6)

  @parameterized.parameters(-0.1, -1e-6)
  def test_negative_eps(self, eps):
    model, params = _dense_model()
    x = jnp.zeros((2, 784))
    for fn in (dm_jax.interval_bounds, dm_jax.double_margin):
      with pytest.raises(ValueError, match="eps"):
        fn(model.apply, params, x, eps)
      with pytest.raises(ValueError, match="eps"):
        fn(model.apply, params, x, jnp.array([0.1, eps]), "l2")

  def test_non_finite_or_misshapen_eps(self):
    model, params = _dense_model()
    x = jnp.zeros((2, 784))
    with pytest.raises(ValueError, match="eps"):
      dm_jax.interval_bounds(model.apply, params, x, float("nan"))
    with pytest.raises(ValueError, match="eps"):
      dm_jax.interval_bounds(model.apply, params, x, jnp.ones(3))
    with pytest.raises(ValueError, match="eps"):  # per-element eps is linf only
      dm_jax.interval_bounds(model.apply, params, x, jnp.full(x.shape, 0.1), "l2")

  @parameterized.parameters("l3", "linfinity", "", 3, 0.5, None)
  def test_unknown_norm(self, norm):
    model, params = _dense_model()
    x = jnp.zeros((2, 784))
    for fn in (dm_jax.interval_bounds, dm_jax.double_margin):
      with pytest.raises(ValueError, match="norm"):
        fn(model.apply, params, x, 0.1, norm)

  def test_norm_aliases(self):
    model, params = _dense_model()
    x = jnp.full((2, 784), 0.5)
    for canonical, aliases in (("linf", ("inf", np.inf, "Linf")), ("l2", (2, "2", "L2")),
                               ("l1", (1, "1"))):
      ref = dm_jax.interval_bounds(model.apply, params, x, 0.1, canonical)
      for alias in aliases:
        chex.assert_trees_all_close(dm_jax.interval_bounds(model.apply, params, x, 0.1, alias),
                                    ref)

  @parameterized.parameters(None, 0, -1, 2.5, True, "3")
  def test_l0_bad_k(self, k):
    model, params = _dense_model()
    x = jnp.zeros((2, 784))
    for fn in (dm_jax.interval_bounds, dm_jax.double_margin):
      with pytest.raises(ValueError, match=r"\bk\b"):
        fn(model.apply, params, x, 0.1, "l0", k=k)

  def test_k_without_l0(self):
    model, params = _dense_model()
    with pytest.raises(ValueError, match=r"\bk\b"):
      dm_jax.interval_bounds(model.apply, params, jnp.zeros((2, 784)), 0.1, "linf", k=3)

  def test_bad_domain_and_dtype(self):
    model, params = _dense_model()
    x = jnp.zeros((2, 784))
    for domain in ((1.0, 0.0), (0.5, 0.5), (0.0,), "ab"):
      with pytest.raises(ValueError, match="domain"):
        dm_jax.interval_bounds(model.apply, params, x, 0.1, domain=domain)
    with pytest.raises(ValueError, match="float"):
      dm_jax.interval_bounds(model.apply, params, jnp.zeros((2, 784), jnp.int32), 0.1)

  def test_wrong_input_shape_plain_function(self):
    """A plain apply function whose matmul fails on the wrong input size."""
    w = jnp.ones((784, 10))
    with pytest.raises(ValueError, match=r"\(2, 100\)"):
      dm_jax.interval_bounds(lambda p, x: x @ p, w, jnp.zeros((2, 100)), 0.1)

  @parameterized.parameters(dm_jax.interval_bounds, dm_jax.double_margin)
  def test_wrong_input_shape_flax_dense(self, fn):
    """A Flax Dense initialised on 784-vectors, given 100-vectors.

    Flax raises its own ScopeParamShapeError (not a TypeError/ValueError) while
    tracing; the API promises a ValueError naming the shape.
    """
    model, params = _dense_model(784)
    with pytest.raises(ValueError, match=r"\(2, 100\)"):
      fn(model.apply, params, jnp.zeros((2, 100)), 0.1)

  def test_wrong_input_shape_conv_model(self):
    model, params = U.model_and_params("small", U.MNIST)
    with pytest.raises(ValueError, match=r"\(2, 32, 32, 3\)"):
      dm_jax.interval_bounds(model.apply, params, jnp.zeros((2, 32, 32, 3)), 0.1)

  def test_unknown_variant(self):
    model, params = _dense_model()
    for variant in ("DM", "ibp", "", None):
      with pytest.raises(ValueError, match="variant"):
        dm_jax.double_margin(model.apply, params, jnp.zeros((2, 784)), 0.1, variant=variant)

  def test_unknown_architecture(self):
    for name in ("Small", "resnet18", ""):
      with pytest.raises(ValueError, match="architecture"):
        dm_jax.get_model(name, 10)
    with pytest.raises(ValueError, match="num_classes"):
      dm_jax.get_model("small", 1)
    with pytest.raises(ValueError, match="ensemble"):
      dm_jax.get_model("small", 10, ensemble=0)
    assert set(dm_jax.ARCHITECTURES) == {"small", "pureconv", "resnet", "pooling", "medium",
                                         "large"}


# -------------------------------------------------- ReLU detection, jit vs no jit

class ReluInputsUnderJitTest(chex.TestCase):
  """``return_relu_inputs`` must report the same ReLUs with and without jit.

  ``jnp.maximum(h, jnp.zeros_like(h))`` is a ReLU like ``jax.nn.relu(h)``; its zero
  operand is ``broadcast_in_dim 0.0`` in the jaxpr. Without jit that constant is
  concrete and dm_jax reports the ReLU; under jit it is a tracer, so
  ``propagation.monotone_function``'s ``not isinstance(other, jax.core.Tracer)`` test
  fails and the ReLU is silently not reported.
  """

  @chex.variants(with_jit=True, without_jit=True)
  def test_maximum_with_zeros_like_is_a_relu(self):
    def apply_fn(p, x):
      h = x @ p
      return jnp.maximum(h, jnp.zeros_like(h)) @ jnp.ones((4, 2))

    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32))
    x = jnp.ones((2, 3))
    out, relus = self.variant(lambda p, x: dm_jax.interval_bounds(
        apply_fn, p, x, 0.1, return_relu_inputs=True))(w, x)
    assert len(relus) == 1, f"expected 1 ReLU input, got {len(relus)}"
    chex.assert_trees_all_close(relus[0].centre, x @ w, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nn_relu_is_reported(self):
    def apply_fn(p, x):
      return jax.nn.relu(x @ p)

    w = jnp.ones((3, 4))
    _, relus = self.variant(lambda p, x: dm_jax.interval_bounds(
        apply_fn, p, x, 0.1, return_relu_inputs=True))(w, jnp.ones((2, 3)))
    assert len(relus) == 1
