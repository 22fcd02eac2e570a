"""The forward propagation engine (dm_jax.core.propagation), rule by rule, against
independent evidence: closed forms of the exact first-layer range for every norm
(brute force over the k-subsets for l0), corners that attain a linear map's interval,
and sampled points of the set for each affine and monotone primitive of the table."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dm_jax.bounds.interval import interval_bounds
from dm_jax.core import primitives, propagation

RNG = np.random.default_rng(0)
D, H = 6, 4
W = jnp.asarray(RNG.normal(size=(D, H)), jnp.float32)
B0 = jnp.asarray(RNG.normal(size=(H,)), jnp.float32)
X = jnp.asarray(RNG.uniform(0.2, 0.8, size=(3, D)), jnp.float32)


def dense(params, x):
  return x @ params["w"] + params["b"]


PARAMS = {"w": W, "b": B0}


def _exact_range(norm, eps, k=None):
  """The exact range of x' @ W + b over the set, by closed form (or brute force, l0)."""
  nominal = np.asarray(X @ W + B0)
  w = np.asarray(W)
  if norm == "linf":
    h = eps * np.abs(w).sum(0)
    return nominal - h, nominal + h
  if norm == "l2":
    h = eps * np.linalg.norm(w, axis=0)
    return nominal - h, nominal + h
  if norm == "l1":
    h = eps * np.abs(w).max(0)
    return nominal - h, nominal + h
  # l0: any k coordinates moved anywhere in [0, 1]; the best subset per output, brute force
  lo, hi = nominal.copy(), nominal.copy()
  x = np.asarray(X)
  for b in range(x.shape[0]):
    for j in range(H):
      up = np.maximum(w[:, j] * (1 - x[b]), w[:, j] * (0 - x[b]))
      down = np.minimum(w[:, j] * (1 - x[b]), w[:, j] * (0 - x[b]))
      best_up = max(sum(up[list(s)]) for s in itertools.combinations(range(D), k))
      best_down = min(sum(down[list(s)]) for s in itertools.combinations(range(D), k))
      hi[b, j] += best_up
      lo[b, j] += best_down
  return lo, hi


@pytest.mark.parametrize("norm,eps,k", [("linf", 0.1, None), ("l2", 0.3, None),
                                        ("l1", 0.5, None), ("l0", None, 2),
                                        ("l0", None, 1)])
def test_first_layer_range_is_exact(norm, eps, k):
  b = interval_bounds(dense, PARAMS, X, eps, norm, k=k)
  lo, hi = _exact_range(norm, eps, k)
  np.testing.assert_allclose(b.lower, lo, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(b.upper, hi, rtol=1e-5, atol=1e-5)


def test_exactness_survives_structural_ops_before_the_first_layer():
  """Normalise, reshape, pad and negate before the dense layer: still the exact range
  (the symbolic input rules), not the looser box of each coordinate."""
  def fn(params, x):
    z = -((x - 0.5) / 0.25)
    z = jnp.pad(z.reshape(x.shape[0], 2, 3), ((0, 0), (0, 0), (1, 0)))
    return z.reshape(x.shape[0], -1) @ params["w8"]
  w8 = jnp.asarray(RNG.normal(size=(8, H)), jnp.float32)
  b = interval_bounds(fn, {"w8": w8}, X, 0.2, "l2")
  # Equivalent linear map of x: x -> -(x - 0.5) / 0.25 placed at the unpadded columns.
  keep = np.array([i for i in range(8) if i % 4 != 0])
  a = -np.asarray(w8)[keep] / 0.25
  nominal = np.asarray(fn({"w8": w8}, X))
  h = 0.2 * np.linalg.norm(a, axis=0)
  np.testing.assert_allclose(b.lower, nominal - h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(b.upper, nominal + h, rtol=1e-5, atol=1e-5)


def test_linear_map_interval_is_attained_at_corners():
  """For an affine network the l_inf interval is tight: the corner x + eps sign(w_j)
  reaches the upper end of output j."""
  b = interval_bounds(dense, PARAMS, X, 0.1)
  for j in range(H):
    corner = X + 0.1 * jnp.sign(W[:, j])
    np.testing.assert_allclose(dense(PARAMS, corner)[:, j], b.upper[:, j], rtol=1e-5)


# Small functions of x (B, 6), each exercising primitives of the table with an
# input-dependent operand; jaxpr names are checked to keep the list honest.
_CASES = {
    "dot_relu_dot": (lambda x: jax.nn.relu(x @ W + B0) @ W[:H, :3],
                     {"dot_general", "max"}),
    "conv_pool": (lambda x: jax.lax.reduce_window(
        jax.lax.conv_general_dilated(x.reshape(-1, 2, 3, 1), jnp.ones((2, 2, 1, 2)) * 0.3,
                                     (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO",
                                                                        "NHWC")),
        -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "SAME"),
        {"conv_general_dilated", "reduce_window_max"}),
    "structural": (lambda x: jnp.concatenate([x[:, ::-1], jnp.transpose(
        x.reshape(-1, 2, 3), (0, 2, 1)).reshape(-1, 6)[:, 1:4]], 1).sum(-1, keepdims=True)
        - jnp.cumsum(x, axis=1), {"concatenate", "rev", "transpose", "reduce_sum",
                                  "cumsum", "sub", "slice"}),
    "elementwise": (lambda x: jax.lax.clamp(-1.0, jnp.tanh(2 * x - 1) * 3.0, 2.0)
                    + jax.nn.sigmoid(x) / 2 + jnp.maximum(x, 0.4) - jnp.minimum(x, 0.6),
                    {"tanh", "logistic", "clamp", "mul", "div", "max", "min"}),
    "reductions": (lambda x: jnp.max(x.reshape(-1, 2, 3), axis=2)
                   + jnp.mean(x, axis=1, keepdims=True)
                   + jnp.broadcast_to(x[:, :1], (x.shape[0], 2)),
                   {"reduce_max", "broadcast_in_dim"}),
}


_CALLS = ("pjit", "jit", "custom_jvp_call", "custom_vjp_call")


def _primitive_names(jaxpr) -> set:
  """Every primitive of a jaxpr, inside its calls (pjit, custom_jvp) too."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          names |= _primitive_names(inner)
  return names


@pytest.mark.parametrize("case", list(_CASES))
def test_interval_domain_contains_sampled_outputs(case):
  fn, expect = _CASES[case]
  apply_fn = lambda params, x: fn(x)
  names = _primitive_names(jax.make_jaxpr(fn)(X).jaxpr)
  assert expect <= names, (case, expect - names)
  for name in names:  # every primitive of the case is one the table knows
    assert primitives.rule(name) is not None or name in _CALLS, name
  eps = 0.15
  b = jax.jit(lambda x: interval_bounds(apply_fn, {}, x, eps, "linf"))(X)
  rng = np.random.default_rng(1)
  for _ in range(64):
    xs = X + jnp.asarray(rng.uniform(-eps, eps, X.shape), jnp.float32)
    out = fn(xs)
    assert np.all(out >= b.lower - 1e-5) and np.all(out <= b.upper + 1e-5), case
  corners = X + eps * jnp.asarray(rng.choice([-1.0, 1.0], (64,) + X.shape), jnp.float32)
  outs = jax.vmap(fn)(corners)
  assert np.all(outs >= b.lower - 1e-5) and np.all(outs <= b.upper + 1e-5), case


def test_every_affine_primitive_has_a_forward_rule():
  """The engine's affine set is the table's affine primitives with a forward rule."""
  table = primitives.names(kind=primitives.AFFINE)
  assert propagation.AFFINE_PRIMITIVES <= table
  assert {"dot_general", "conv_general_dilated", "add", "sub", "mul", "reshape",
          "pad", "reduce_sum", "concatenate"} <= propagation.AFFINE_PRIMITIVES
