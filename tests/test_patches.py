"""The patch-form backward pass (dm_jax.bounds.patches) equals the dense one exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dm_jax import get_model
from dm_jax.bounds import linear, patches
from dm_jax.core import primitives

# The first case of each list runs by default (tests/conftest.py), the rest in the sweep.
# The first case runs in the default tier: the cheapest (small: 12 s here, pureconv 30 s).
CASES = [("small", (10, 10, 2)), ("pureconv", (8, 8, 1)), ("resnet", (8, 8, 1)),
         ("pooling", (8, 8, 2)), ("small_s2", (8, 8, 1))]
SETS = [("linf", 0.03, None, None), ("linf", 0.05, None, (0.0, 1.0)), ("l2", 0.3, None, None),
        ("l1", 0.6, None, None), ("l0", None, 2, None)]


# Every input set and every architecture once each (the diagonal) in CI's sweep; the
# rest of the product, and the fastlin and zero relaxations, in the slow tier.
PRODUCT = [pytest.param(*s, *c, marks=() if i == j else pytest.mark.slow)
           for i, s in enumerate(SETS) for j, c in enumerate(CASES)]


@pytest.mark.parametrize("method", [
    "crown", pytest.param("fastlin", marks=pytest.mark.slow),
    pytest.param("zero", marks=pytest.mark.slow)])
@pytest.mark.parametrize("norm,eps,k,domain,arch,shape", PRODUCT)
def test_patch_form_equals_dense(norm, eps, k, domain, arch, shape, method):
  model = get_model(arch, 5)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2,) + shape)
  params = model.init(jax.random.PRNGKey(1), x)
  kw = dict(method=method, k=k, domain=domain)
  # Jitted: run eagerly, the patch form compiles each of its ~400 small operations
  # apart (15 s against 4 s for the whole pass); what is compared is the same.
  bounds = lambda use_patches: jax.jit(lambda p, x: linear.linear_bounds(
      model.apply, p, x, eps, norm, use_patches=use_patches, **kw))(params, x)
  fast, dense = bounds(True), bounds(False)
  scale = float(jnp.abs(dense.lower).max()) + 1.0
  np.testing.assert_allclose(fast.lower, dense.lower, atol=2e-6 * scale, err_msg=norm)
  np.testing.assert_allclose(fast.upper, dense.upper, atol=2e-6 * scale, err_msg=norm)


def test_patch_form_is_used_for_conv_layers():
  model = get_model("pooling", 5)
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 8, 8, 1))
  params = model.init(jax.random.PRNGKey(1), x)
  iset = linear.make_input_set(x, 0.01)
  tape = linear.record_tape(model.apply, params, iset)
  relu_nodes = [e.node for e in tape.entries if e.kind == primitives.TAPE_RELU]
  assert len(relu_nodes) == 2
  assert all(patches.supported(tape, n) for n in relu_nodes)


def test_windows_match_slicing():
  t = jnp.arange(2 * 5 * 6 * 3, dtype=jnp.float32).reshape(2, 5, 6, 3)
  w = patches.windows(t, (3, 2), (2, 1), (1, 0), (3, 5))
  padded = np.pad(np.asarray(t), ((0, 0), (1, 4), (0, 4), (0, 0)))
  for h in range(3):
    for x in range(5):
      np.testing.assert_array_equal(w[:, h, x], padded[:, 2 * h:2 * h + 3, x:x + 2])
