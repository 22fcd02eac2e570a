"""The primitive table (dm_jax.core.primitives) against what the domains actually do.

Each affine primitive with a forward rule is traced in a small function of the input;
the interval bounds must contain the function's values at sampled points of the set and
be exact where the map is exact (a single affine map: IBP's box is its exact range),
and the linear (CROWN) bounds must contain them too. A primitive marked unsupported by
the linear methods must raise the error that names it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import dm_jax
from dm_jax.bounds import linear
from dm_jax.core import primitives
from dm_jax.core.errors import UnsupportedPrimitiveError

X = np.random.default_rng(0).uniform(0.2, 0.8, (2, 4, 6)).astype(np.float32)
C = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
W = np.random.default_rng(2).normal(size=(6, 3)).astype(np.float32)
EPS = 0.05

# One function per affine primitive with a forward rule: x (B, 4, 6) -> (B, ...),
# affine in x, using the primitive on the input-dependent value.
AFFINE_CASES = {
    "reshape": lambda x: x.reshape(x.shape[0], -1),
    "transpose": lambda x: jnp.transpose(x, (0, 2, 1)),
    "squeeze": lambda x: lax.squeeze(x[:, :1], (1,)),
    "rev": lambda x: lax.rev(x, (2,)),
    "slice": lambda x: lax.slice(x, (0, 1, 2), (2, 3, 6)),
    # (Rounding to bfloat16 is non-decreasing, so the rounded ends bound the values.)
    "convert_element_type": lambda x: lax.convert_element_type(
        lax.convert_element_type(x, jnp.bfloat16), jnp.float32),
    "copy": lambda x: lax.copy_p.bind(x),
    "reduce_precision": lambda x: lax.reduce_precision(x, 8, 23),
    "broadcast_in_dim": lambda x: jnp.broadcast_to(x[:, None], (2, 3, 4, 6)),
    "reduce_sum": lambda x: jnp.sum(x, axis=2),
    "reduce_window_sum": lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 2, 2),
                                                     (1, 1, 1), "VALID"),
    "dynamic_slice": lambda x: lax.dynamic_slice(x, (0, 1, 1), (2, 2, 3)),
    "cumsum": lambda x: lax.cumsum(x, axis=2),
    "mul": lambda x: x * C,
    "dot_general": lambda x: x @ W,
    "conv_general_dilated": lambda x: lax.conv_general_dilated(
        x[..., None], jnp.ones((2, 2, 1, 3)), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC")),
    "div": lambda x: x / (1.0 + np.abs(C)),
    "add": lambda x: x + C,
    "sub": lambda x: C - x,
    "neg": lambda x: -x,
    "concatenate": lambda x: jnp.concatenate([x, jnp.asarray(C)[None].repeat(2, 0)], 1),
    "pad": lambda x: lax.pad(x, 0.5, ((0, 0, 0), (1, 0, 0), (0, 2, 1))),
    "select_n": lambda x: lax.select_n(jnp.broadcast_to(C > 0, x.shape), x, 2 * x),
}


def test_every_forward_affine_primitive_has_a_case():
  forward_affine = (primitives.names(kind=primitives.AFFINE)
                    - primitives.names(forward=None))
  # add_any and copy_p appear only inside transformed programs (jvp, custom rules);
  # expand_dims is not a primitive of this jax (lax.expand_dims is a broadcast_in_dim).
  assert forward_affine - set(AFFINE_CASES) == {"add_any", "copy_p", "expand_dims"}


def _jaxpr_primitives(fn):
  jaxpr = jax.make_jaxpr(fn)(jnp.asarray(X)).jaxpr
  return {e.primitive.name for e in jaxpr.eqns}


def _samples(n=200):
  rng = np.random.default_rng(3)
  corners = rng.choice([-1.0, 1.0], size=(n,) + X.shape)
  return (X[None] + EPS * corners).astype(np.float32)


@pytest.mark.parametrize("name", sorted(AFFINE_CASES))
def test_affine_primitive_bounds_contain_samples(name):
  fn = AFFINE_CASES[name]
  assert name in _jaxpr_primitives(fn), f"the case for {name} does not use it"
  apply_fn = lambda p, x: fn(x).reshape(x.shape[0], -1)
  pts = _samples()
  vals = np.stack([np.asarray(apply_fn(None, jnp.asarray(p))) for p in pts])
  lo_s, hi_s = vals.min(0), vals.max(0)
  tol = 1e-5 * (1 + np.abs(vals).max())
  if name == "convert_element_type":
    # Bounds are computed in the model's dtype: a cast to bfloat16 rounds the centre and
    # the radius separately, so they hold up to its rounding (2^-8 relative), not f32's.
    tol = 2.0 ** -7 * (1 + np.abs(vals).max())
  ib = dm_jax.interval_bounds(apply_fn, None, jnp.asarray(X), EPS)
  assert np.all(np.asarray(ib.lower) <= lo_s + tol) and np.all(
      np.asarray(ib.upper) >= hi_s - tol), name
  # One affine map: the box is its exact range, attained at a vertex; with 200 random
  # vertices the sampled range comes close on these small maps.
  width = np.asarray(ib.upper - ib.lower)
  assert np.all(hi_s - lo_s >= 0.5 * width - tol), name
  lb = linear.linear_bounds(apply_fn, None, jnp.asarray(X), EPS, method="crown")
  np.testing.assert_allclose(lb.lower, ib.lower, rtol=1e-5, atol=tol)
  np.testing.assert_allclose(lb.upper, ib.upper, rtol=1e-5, atol=tol)


@pytest.mark.parametrize("name", ["reduce_max", "cummax"])
def test_monotone_outside_the_linear_methods_is_named(name):
  # (tanh and logistic have linear relaxations now: tests/test_activations.py.)
  fn = {"reduce_max": lambda x: jnp.max(x, axis=2),
        "cummax": lambda x: lax.cummax(x, axis=2)}[name]
  apply_fn = lambda p, x: fn(x).reshape(x.shape[0], -1)
  assert primitives.rule(name).tape is None
  ib = dm_jax.interval_bounds(apply_fn, None, jnp.asarray(X), EPS)
  vals = np.asarray(apply_fn(None, jnp.asarray(X)))
  assert np.all(np.asarray(ib.lower) <= vals) and np.all(vals <= np.asarray(ib.upper))
  with pytest.raises(UnsupportedPrimitiveError, match=f"'{name}'.*linear") as err:
    linear.linear_bounds(apply_fn, None, jnp.asarray(X), EPS, method="crown")
  # The message says which domains do support it (read from the table).
  assert "supported by the interval, Double Margin and MIP domains" in str(err.value)


def test_error_message_lists_the_table():
  msg = str(UnsupportedPrimitiveError("sin", "interval"))
  for name in primitives.names(kind=primitives.MONOTONE) | primitives.names(
      kind=primitives.AFFINE) - primitives.names(forward=None):
    assert name in msg, name


def test_operand_rules():
  r = primitives.rule
  assert primitives.operands_allowed(r("dot_general"), [1])
  assert not primitives.operands_allowed(r("dot_general"), [0, 1])
  assert not primitives.operands_allowed(r("reshape"), [1])
  assert not primitives.operands_allowed(r("select_n"), [0, 1])
  assert primitives.operands_allowed(r("select_n"), [1, 2])
  assert primitives.is_bias_operand(r("add"), 1)
  assert not primitives.is_bias_operand(r("select_n"), 0)
  assert not primitives.is_bias_operand(r("mul"), 1)
  assert primitives.rule("sin") is None
