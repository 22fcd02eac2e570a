"""dm_jax.core.conv: the CPU-fast strided convolution transposes and gradients against
jax.lax, and the models' use of them."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dm_jax.core import conv


def _reference_transpose(A, kernel, strides, padding, in_hw):
  n, cin = A.shape[0], kernel.shape[2]
  fwd = lambda t: jax.lax.conv_general_dilated(t, kernel, strides, padding,
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  t = jax.linear_transpose(fwd, jax.ShapeDtypeStruct((n,) + tuple(in_hw) + (cin,), A.dtype))
  return t(A)[0]


@pytest.mark.parametrize("k,s,pad,hw,cin", [
    (4, 2, ((1, 1), (1, 1)), (14, 14), 16),   # small_s2's second conv
    (4, 2, ((1, 2), (1, 2)), (14, 14), 8),    # SAME-like, asymmetric
    (3, 2, ((1, 1), (0, 1)), (9, 8), 4),      # odd sizes, kernel not a multiple of s
    (5, 3, ((2, 2), (2, 2)), (11, 11), 4),
    (3, 1, ((1, 1), (1, 1)), (6, 6), 8),      # stride 1: explicit HWIO correlation
    (4, 1, ((1, 2), (2, 1)), (7, 6), 3),      # stride 1, asymmetric (SAME for k = 4)
    (2, 1, ((2, 2), (0, 3)), (5, 5), 2),      # padding > k - 1: linear_transpose path
    (4, 2, ((1, 1), (1, 1)), (8, 8), 1)])     # cin = 1 (a first conv)
def test_conv_input_transpose_values_and_gradients(k, s, pad, hw, cin):
  cout = 6
  kernel = jax.random.normal(jax.random.PRNGKey(0), (k, k, cin, cout))
  out_hw = jax.eval_shape(lambda t: jax.lax.conv_general_dilated(
      t, kernel, (s, s), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")),
      jax.ShapeDtypeStruct((1,) + hw + (cin,), jnp.float32)).shape[1:3]
  A = jax.random.normal(jax.random.PRNGKey(1), (3,) + tuple(out_hw) + (cout,))
  w = jax.random.normal(jax.random.PRNGKey(2), (3,) + hw + (cin,))
  ours = lambda a, kk: conv.conv_input_transpose(a, kk, (s, s), pad, hw)
  ref = lambda a, kk: _reference_transpose(a, kk, (s, s), pad, hw)
  np.testing.assert_allclose(jax.jit(ours)(A, kernel), ref(A, kernel), rtol=1e-5, atol=1e-4)
  # Gradients (training differentiates through the backward pass): a custom VJP.
  loss = lambda f: (lambda a, kk: jnp.sum(w * jnp.tanh(f(a, kk))))
  g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(A, kernel)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(A, kernel)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("k,s,pad,hw", [(4, 2, ((1, 1), (1, 1)), (14, 14)),
                                         (3, 2, ((1, 2), (0, 1)), (9, 8)),
                                         (5, 3, ((2, 2), (2, 2)), (11, 11))])
def test_conv2d_has_the_gradients_of_lax_conv(k, s, pad, hw):
  x = jax.random.normal(jax.random.PRNGKey(0), (3,) + hw + (4,))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (k, k, 4, 5))
  lax_conv = lambda a, kk: jax.lax.conv_general_dilated(
      a, kk, (s, s), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = lambda a, kk: conv.conv2d(a, kk, (s, s), pad)
  _assert_same_values_and_gradients(ours, lax_conv, x, kernel)


def _assert_same_values_and_gradients(ours, ref, x, kernel):
  """ours(x, kernel) == ref(x, kernel), and so are both gradients of a nonlinear loss."""
  np.testing.assert_allclose(ours(x, kernel), ref(x, kernel), rtol=1e-5, atol=1e-5)
  w = jax.random.normal(jax.random.PRNGKey(2), ref(x, kernel).shape)
  loss = lambda f: (lambda a, kk: jnp.sum(w * jnp.tanh(f(a, kk))))
  for a, b in zip(jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, kernel),
                  jax.grad(loss(ref), argnums=(0, 1))(x, kernel)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strides,padding,kw", [
    ((2, 2), "SAME", {}), ((2, 2), ((1, 1), (1, 1)), {}), ((3, 2), "VALID", {}),
    ((1, 1), "SAME", {}),  # stride 1: plain lax
    ((2, 2), "SAME", dict(rhs_dilation=(2, 2))),  # dilated: plain lax
    ((2, 2), "SAME", dict(feature_group_count=2))])  # grouped: plain lax
def test_conv_general_dilated_drop_in(strides, padding, kw):
  """Same values and gradients as lax.conv_general_dilated, called the way Flax does."""
  cin = 4
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 10, cin))
  kernel = jax.random.normal(
      jax.random.PRNGKey(1), (3, 3, cin // kw.get("feature_group_count", 1), 6))
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
  call = lambda f: (lambda a, kk: f(a, kk, strides, padding, lhs_dilation=(1, 1),
                                    dimension_numbers=dn, precision=None,
                                    **{"rhs_dilation": (1, 1), **kw}))
  _assert_same_values_and_gradients(call(conv.conv_general_dilated),
                                    call(jax.lax.conv_general_dilated), x, kernel)


def test_fast_paths_switch_changes_the_path_not_the_values(monkeypatch):
  """One switch (dm_jax.core.fast_paths) decides the models' conv, the forward domains'
  conv gradient and the linear bounds' CPU blocks; either way the same numbers."""
  from dm_jax import models
  from dm_jax.bounds import double_margin, linear
  from dm_jax.core import fast_paths
  model = models.get_model("small_s2")
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 28, 28, 1))
  params = model.init(jax.random.PRNGKey(1), x)

  def make_loss():  # a new function per path: jax caches traces by function
    def loss(p):  # through the model and through Double Margin's forward domain
      m = double_margin.double_margin(model.apply, p, x, 0.05)
      return jnp.sum(model.apply(p, x) ** 2) + jnp.sum(m.s) + jnp.sum(m.v)
    return loss

  results = {}
  for on in (True, False):
    loss = make_loss()
    with fast_paths.forced(on):
      assert fast_paths.enabled() is on
      assert ("custom_vjp_call" in str(jax.make_jaxpr(model.apply)(params, x))) is on
      assert ("custom_vjp_call" in str(jax.make_jaxpr(loss)(params))) is on
      assert linear.default_batch_block("crown") == (linear.CPU_BATCH_BLOCK["crown"]
                                                     if on else 0)
      results[on] = jax.value_and_grad(loss)(params)
  chex.assert_trees_all_close(results[True], results[False], rtol=1e-4, atol=1e-4)
  monkeypatch.setenv(fast_paths.ENV_VAR, "off")
  assert not fast_paths.enabled()
  with fast_paths.forced(True):
    assert fast_paths.enabled()
  monkeypatch.setenv(fast_paths.ENV_VAR, "sometimes")
  with pytest.raises(ValueError, match="auto, on or off"):
    fast_paths.enabled()
  monkeypatch.setenv(fast_paths.ENV_VAR, "auto")
  assert fast_paths.enabled() == (jax.default_backend() == "cpu")


def test_models_use_the_fast_conv_with_unchanged_bounds():
  """dm_jax.models' strided convs trace to conv2d's custom_vjp; the bound interpreters
  see through it (IBP bounds equal those of a plain-lax copy of the model)."""
  import flax.linen as nn
  from dm_jax import models
  from dm_jax.bounds import interval
  from dm_jax.core import fast_paths
  model = models.get_model("small_s2")
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 28, 28, 1))
  params = model.init(jax.random.PRNGKey(1), x)
  with fast_paths.forced(True):  # on every backend: the path is what is tested
    jaxpr = str(jax.make_jaxpr(model.apply)(params, x))
  assert "custom_vjp_call" in jaxpr
  plain = models.ConvStack(((16, 4, 2, models.PAD1), (32, 4, 2, models.PAD1)), (100,))
  assert isinstance(plain, nn.Module)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(models.conv_lib, "conv_general_dilated", jax.lax.conv_general_dilated)
    assert "custom_vjp_call" not in str(jax.make_jaxpr(plain.apply)(params, x))
    ref = interval.interval_bounds(plain.apply, params, x, 0.1, domain=(0, 1))
  with fast_paths.forced(True):
    got = interval.interval_bounds(model.apply, params, x, 0.1, domain=(0, 1))
  np.testing.assert_allclose(got.lower, ref.lower, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.upper, ref.upper, rtol=1e-5, atol=1e-5)
