"""dm_jax's interval bounds and Double Margin against independent hand computations.

* IBP on a 2-layer MLP equals a plain numpy interval pass in the W+/W- form.
* DM's (z, s, v) (and the s_only / ibp_v variants) equal the paper's equations
  evaluated in numpy (float64) with explicit im2col convolutions, on an MLP and on the
  conv architectures.
* Invariants: eps = 0; networks that are affine on the ball (v = 0, s = IBP radius).
* The first layer is exact for l2 / l1 / l0 (and linf): checked against the Jacobian
  of the first conv / dense computed with ``jax.jacobian``.
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
import helpers as U
from dm_jax.bounds.double_margin import VARIANTS as DM_VARIANTS, folded_margins

B = 2
SMALL_IMG = (8, 8, 3)


def _close(actual, expected, what, rtol=2e-5):
  """Element-wise closeness with an absolute slack relative to the tensor's scale."""
  expected = np.asarray(expected, np.float64)
  scale = 1.0 + np.max(np.abs(expected))
  chex.assert_trees_all_close(np.asarray(actual, np.float64), expected, rtol=rtol,
                              atol=rtol * scale, custom_message=what)


# ------------------------------------------------------------------ IBP, W+/W- form

class IntervalByHandTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_two_layer_mlp_equals_plain_interval_pass(self):
    model = dm_jax.get_model("mlp", 10, hidden=(32,))  # dense 32, relu, dense 10
    params = U.init_params(model, (20,), seed=3)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (3, 20)).astype(np.float32)
    eps_cases = {
        "scalar": np.float32(0.07),
        "per_example": np.array([0.01, 0.05, 0.2], np.float32),
        "per_element": rng.uniform(0, 0.2, x.shape).astype(np.float32),
    }
    P = U.np_params(params)
    W1, b1 = P["Dense_0"]["kernel"], P["Dense_0"]["bias"]
    W2, b2 = P["Dense_1"]["kernel"], P["Dense_1"]["bias"]
    fn = self.variant(lambda p, x, e: [
        dm_jax.interval_bounds(model.apply, p, x, e, domain=d, return_relu_inputs=True)
        for d in (None, (0.0, 1.0))])
    for name, eps in eps_cases.items():
      results = fn(params, jnp.asarray(x), jnp.asarray(eps))
      for domain, (out, relus) in zip((None, (0.0, 1.0)), results):
        # The plain interval pass, written out.
        e = np.broadcast_to(eps if np.ndim(eps) != 1 else eps[:, None], x.shape)
        l0, u0 = x - e, x + e
        if domain is not None:
          l0, u0 = np.clip(l0, 0, 1), np.clip(u0, 0, 1)
        W1p, W1n = np.maximum(W1, 0), np.minimum(W1, 0)
        l1 = l0 @ W1p + u0 @ W1n + b1
        u1 = u0 @ W1p + l0 @ W1n + b1
        r_l1, r_u1 = np.maximum(l1, 0), np.maximum(u1, 0)
        W2p, W2n = np.maximum(W2, 0), np.minimum(W2, 0)
        l2 = r_l1 @ W2p + r_u1 @ W2n + b2
        u2 = r_u1 @ W2p + r_l1 @ W2n + b2
        what = f"eps {name} domain {domain}"
        chex.assert_shape([out.lower, out.upper], (3, 10))
        assert len(relus) == 1
        _close(out.lower, l2, what + " lower")
        _close(out.upper, u2, what + " upper")
        _close(relus[0].lower, l1, what + " relu lower")
        _close(relus[0].upper, u1, what + " relu upper")


# ------------------------------------------------------- DM and IBP, whole networks

def _hand(arch, params, x, eps, norm, kind, variant="dm", k=None, domain=None,
          n_dense=None):
  """(output, relu inputs) of the numpy reference, as tuples of arrays."""
  P = U.np_params(params)
  if kind == "ibp":
    dom = U.Interval()
  elif variant == "ibp_v":
    dom = U.IbpPlusV()
  else:
    dom = U.DoubleMargin(variant)
  x64 = np.asarray(x, np.float64)
  start = U.np_input(dom, x64, np.asarray(eps, np.float64), norm, k, domain)
  out = U.np_network(arch, dom, P, start, n_dense=n_dense)
  return out, dom.relu_inputs


def _check_dm(m, ref, variant, what):
  """Compares a dm_jax Margins with a numpy (z, s, v) / (z, l, u, v) tuple."""
  if variant == "ibp_v":
    z, l, u, v = ref
    _close(m.z, z, what + " z")
    _close(m.s, (u - l) / 2, what + " s (IBP radius)")
    _close(m.v, v, what + " v")
    _close(m.lower, l - v, what + " lower")
    _close(m.upper, u + v, what + " upper")
  else:
    z, s, v = ref
    _close(m.z, z, what + " z")
    _close(m.s, s, what + " s")
    _close(m.v, v, what + " v")
    _close(m.lower, z - s - v, what + " lower")
    _close(m.upper, z + s + v, what + " upper")


# (name, arch, input shape, get_model kwargs, number of dense layers, settings level)
MLP2 = dict(hidden=(24,))
HAND_CASES = [
    ("_mlp2", "mlp", (6, 6, 1), MLP2, 2, "full"),
    ("_mlp3", "mlp", (5, 5, 2), {}, 3, "full"),
    ("_small", "small", SMALL_IMG, {}, None, "full"),
    ("_pooling", "pooling", SMALL_IMG, {}, None, "conv"),
    ("_resnet", "resnet", SMALL_IMG, {}, None, "conv"),
    ("_pureconv", "pureconv", SMALL_IMG, {}, None, "basic"),
    ("_small_s2", "small_s2", SMALL_IMG, {}, None, "basic"),
]
HAND_SLOW_CASES = [
    ("_medium", "medium", SMALL_IMG, {}, None, "conv"),
    ("_large", "large", SMALL_IMG, {}, None, "conv"),
    ("_small_mnist", "small", U.MNIST, {}, None, "conv"),
]


def _settings(level):
  """(kind, norm, variant, domain) combinations checked at each level."""
  basic = [("dm", "linf", "dm", None), ("ibp", "linf", None, None)]
  conv = basic + [("dm", "linf", "s_only", None), ("dm", "linf", "ibp_v", None),
                  ("dm", "linf", "dm", (0.0, 1.0)), ("ibp", "linf", None, (0.0, 1.0)),
                  ("dm", "l2", "dm", None), ("ibp", "l1", None, None),
                  ("dm", "l0", "dm", None)]
  full = conv + [("dm", "l1", "dm", None), ("dm", "l0", "s_only", None),
                 ("dm", "l0", "ibp_v", None), ("dm", "l2", "ibp_v", None),
                 ("ibp", "l2", None, None), ("ibp", "l0", None, None),
                 ("dm", "linf", "ibp_v", (0.0, 1.0))]
  return {"basic": basic, "conv": conv, "full": full}[level]


K_L0 = 3


def _eps_for(norm, eps):
  return {"linf": eps, "l2": 10 * eps, "l1": 30 * eps, "l0": None}[norm]


def check_by_hand(variant_fn, arch, shape, kw, n_dense, level):
  model = dm_jax.get_model(arch, 10, **kw)
  params = U.init_params(model, shape, seed=5)
  x = U.nominal_inputs(shape, B, seed=9)
  eps = np.array([0.03, 0.08], np.float32)
  settings = _settings(level)

  def run_all(p, x, e):
    res = []
    for kind, norm, variant, domain in settings:
      k = K_L0 if norm == "l0" else None
      if kind == "ibp":
        res.append(dm_jax.interval_bounds(model.apply, p, x, _eps_for(norm, e), norm, k=k,
                                          domain=domain, return_relu_inputs=True))
      else:
        res.append(dm_jax.double_margin(model.apply, p, x, _eps_for(norm, e), norm,
                                        variant=variant, k=k, domain=domain,
                                        return_relu_inputs=True))
    return res

  results = variant_fn(run_all)(params, jnp.asarray(x), jnp.asarray(eps))
  # The numpy network itself reproduces the model.
  conc = U.Concrete()
  logits = U.np_network(arch, conc, U.np_params(params), x.astype(np.float64),
                        n_dense=n_dense)
  _close(model.apply(params, jnp.asarray(x)), logits, f"{arch} numpy forward")
  for (kind, norm, variant, domain), (out, relus) in zip(settings, results):
    what = f"{arch} {kind} {norm} {variant} domain={domain}"
    k = K_L0 if norm == "l0" else None
    eps_np = _eps_for(norm, eps)
    ref_out, ref_relus = _hand(arch, params, x, eps_np if eps_np is not None else 0.0,
                               norm, kind, variant, k, domain, n_dense)
    assert len(relus) == len(ref_relus) == len(conc.relu_inputs), what
    if (kind, norm, variant) == ("dm", "linf", "dm"):  # unstable ReLUs: v is exercised
      assert np.max(ref_out[2]) > 0, what
    pairs = [(out, ref_out, "output")] + [
        (r, rr, f"relu input {i}") for i, (r, rr) in enumerate(zip(relus, ref_relus))]
    for got, ref, where in pairs:
      if kind == "ibp":
        _close(got.lower, ref[0], f"{what} {where} lower")
        _close(got.upper, ref[1], f"{what} {where} upper")
      else:
        _check_dm(got, ref, variant, f"{what} {where}")


class ByHandTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*HAND_CASES)
  def test_matches_numpy_reference(self, arch, shape, kw, n_dense, level):
    check_by_hand(self.variant, arch, shape, kw, n_dense, level)


@pytest.mark.slow
class ByHandSlowTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*HAND_SLOW_CASES)
  def test_matches_numpy_reference(self, arch, shape, kw, n_dense, level):
    check_by_hand(self.variant, arch, shape, kw, n_dense, level)


# ---------------------------------------------------------------------- invariants

def _positive_params(params, bias=3.0):
  """|kernels| and biases >= bias: on inputs near [0, 1] every ReLU is active."""
  def f(path, leaf):
    if "bias" in str(path[-1]):
      return jnp.full_like(leaf, bias)
    return jnp.abs(leaf)
  return jax.tree_util.tree_map_with_path(f, params)


class InvariantTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("_mlp", "mlp", (6, 6, 1)), ("_small", "small", SMALL_IMG),
                                  ("_pooling", "pooling", SMALL_IMG))
  def test_eps_zero_gives_zero_margins(self, arch, shape):
    model = dm_jax.get_model(arch)
    params = U.init_params(model, shape, seed=1)
    x = jnp.asarray(U.nominal_inputs(shape, B, seed=2))
    fn = self.variant(lambda p, x: [
        dm_jax.double_margin(model.apply, p, x, 0.0, norm, variant=v,
                             return_relu_inputs=True)
        for norm in ("linf", "l2", "l1") for v in ("dm", "ibp_v")] + [
        dm_jax.interval_bounds(model.apply, p, x, 0.0, norm) for norm in ("linf", "l2")])
    res = fn(params, x)
    logits = model.apply(params, x)
    scale = 1 + U.tree_max_abs(logits)
    for out, relus in res[:-2]:
      _close(out.z, logits, "z")
      for m in (out,) + tuple(relus):
        chex.assert_trees_all_close(m.s, jnp.zeros_like(m.s), atol=1e-6 * scale)
        chex.assert_trees_all_close(m.v, jnp.zeros_like(m.v), atol=1e-6 * scale)
    for b in res[-2:]:
      _close(b.lower, logits, "ibp lower at eps=0")
      _close(b.upper, logits, "ibp upper at eps=0")

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("_mlp", "mlp", (6, 6, 1)), ("_small", "small", SMALL_IMG))
  def test_affine_on_the_ball_gives_v_zero_and_s_ibp_radius(self, arch, shape):
    """All ReLUs active (|W|, biases 3): the net is affine on the ball, so v = 0 and
    (z, s) equals IBP's (centre, radius) for linf, l2, l1 and l0."""
    model = dm_jax.get_model(arch)
    params = _positive_params(U.init_params(model, shape, seed=4))
    x = jnp.asarray(U.nominal_inputs(shape, B, seed=5))
    settings = [("linf", 0.05, None), ("l2", 0.3, None), ("l1", 0.5, None), ("l0", None, 3)]
    fn = self.variant(lambda p, x: [
        (dm_jax.double_margin(model.apply, p, x, e, n, k=k, return_relu_inputs=True),
         dm_jax.interval_bounds(model.apply, p, x, e, n, k=k, return_relu_inputs=True))
        for n, e, k in settings])
    for (norm, _, _), ((dm, dm_relus), (ib, ib_relus)) in zip(settings, fn(params, x)):
      for b in ib_relus:
        assert np.all(np.asarray(b.lower) > 0), "precondition: every ReLU is active"
      for m, b in zip((dm,) + tuple(dm_relus), (ib,) + tuple(ib_relus)):
        scale = 1 + U.tree_max_abs(b)
        chex.assert_trees_all_close(m.v, jnp.zeros_like(m.v), atol=1e-5 * scale)
        if norm != "l0":  # (l0: IBP's centre is shifted when the range is asymmetric)
          chex.assert_trees_all_close(m.z, b.centre, rtol=1e-5, atol=1e-5 * scale)
        chex.assert_trees_all_close(m.s, b.radius, rtol=1e-5, atol=1e-5 * scale)
        chex.assert_trees_all_close(m.lower, m.z - m.s, atol=1e-5 * scale)

  @chex.variants(with_jit=True, without_jit=True)
  def test_data_box_start_is_the_clipped_interval(self):
    """On the data box DM starts from [max(x - eps, 0), min(x + eps, 1)] itself: on a
    net affine on the set (all ReLUs active), dm and s_only give v = 0, z = f(centre of
    the clipped box) and [z - s, z + s] = IBP's exact range on the same box."""
    model = dm_jax.get_model("small")
    params = _positive_params(U.init_params(model, SMALL_IMG, seed=4))
    x = U.nominal_inputs(SMALL_IMG, B, seed=5)  # ~30% exact zeros and some ones: clipped
    eps, box = 0.1, (0.0, 1.0)
    centre = (np.clip(x - eps, *box) + np.clip(x + eps, *box)) / 2
    fn = self.variant(lambda p, x: [
        dm_jax.double_margin(model.apply, p, x, eps, variant=v, domain=box)
        for v in ("dm", "s_only")] + [
        dm_jax.interval_bounds(model.apply, p, x, eps, domain=box)])
    *dms, ib = fn(params, jnp.asarray(x))
    scale = 1 + U.tree_max_abs(ib)
    for m in dms:
      chex.assert_trees_all_close(m.v, jnp.zeros_like(m.v), atol=1e-5 * scale)
      _close(m.z, model.apply(params, jnp.asarray(centre)), "z = f(centre)")
      _close(m.lower, ib.lower, "lower = IBP's on the box", rtol=1e-4)
      _close(m.upper, ib.upper, "upper = IBP's on the box", rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_tiny_eps_stable_relus_gives_v_zero(self):
    model = dm_jax.get_model("small")
    params = U.init_params(model, SMALL_IMG, seed=6)
    x = jnp.asarray(U.nominal_inputs(SMALL_IMG, B, seed=7))
    eps = 1e-7
    fn = self.variant(lambda p, x: (
        dm_jax.double_margin(model.apply, p, x, eps, return_relu_inputs=True),
        dm_jax.interval_bounds(model.apply, p, x, eps, return_relu_inputs=True)))
    (dm, dm_relus), (ib, ib_relus) = fn(params, x)
    for b in ib_relus:  # precondition: every ReLU is stable at this eps
      lo, hi = np.asarray(b.lower), np.asarray(b.upper)
      assert np.all((lo > 0) | (hi < 0))
    for m, b in zip((dm,) + tuple(dm_relus), (ib,) + tuple(ib_relus)):
      scale = 1 + U.tree_max_abs(b)
      assert np.all(np.asarray(m.s) > 0)
      chex.assert_trees_all_close(m.v, jnp.zeros_like(m.v), atol=1e-5 * scale)
      chex.assert_trees_all_close(m.s, b.radius, rtol=1e-2, atol=1e-6 * scale)
      chex.assert_trees_all_close(m.z, b.centre, rtol=1e-5, atol=1e-5 * scale)


class NormInclusionTest(chex.TestCase):
  """IBP is inclusion-monotone, so the balls' inclusions carry over to the bounds:
  l1(eps) in l2(eps) in linf(eps); and l0 with k >= d is the whole [0, 1] box, i.e.
  linf with eps = 1 and domain (0, 1) (both first layers are exact, so equal)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("_mlp", "mlp"), ("_small", "small"),
                                  ("_pooling", "pooling"))
  def test_norm_inclusions(self, arch):
    model = dm_jax.get_model(arch)
    params = U.init_params(model, SMALL_IMG, seed=12)
    x = jnp.asarray(U.nominal_inputs(SMALL_IMG, B, seed=13))
    d = int(np.prod(SMALL_IMG))
    fn = self.variant(lambda p, x: (
        [dm_jax.interval_bounds(model.apply, p, x, 0.05, n, return_relu_inputs=True)
         for n in ("l1", "l2", "linf")],
        dm_jax.interval_bounds(model.apply, p, x, None, "l0", k=d, return_relu_inputs=True),
        dm_jax.interval_bounds(model.apply, p, x, None, "l0", k=10 * d,
                               return_relu_inputs=True),
        dm_jax.interval_bounds(model.apply, p, x, 1.0, "linf", domain=(0.0, 1.0),
                               return_relu_inputs=True)))
    balls, l0_d, l0_big, box = fn(params, x)
    flat = lambda r: (r[0],) + tuple(r[1])
    for small, big in ((balls[0], balls[1]), (balls[1], balls[2])):
      for a, b in zip(flat(small), flat(big)):
        tol = 1e-5 * (1 + U.tree_max_abs(b))
        assert np.all(np.asarray(b.lower) <= np.asarray(a.lower) + tol)
        assert np.all(np.asarray(a.upper) <= np.asarray(b.upper) + tol)
    for a, b, c in zip(flat(l0_d), flat(l0_big), flat(box)):
      chex.assert_trees_all_close(a, b)
      chex.assert_trees_all_close(a, c, rtol=1e-5, atol=1e-5 * (1 + U.tree_max_abs(c)))


# ------------------------------------------------------ exact first layer (Jacobian)

class Normalised(nn.Module):
  """Per-channel normalisation before the first conv (exercises scaled inputs)."""

  @nn.compact
  def __call__(self, x):
    mean = jnp.array([0.49, 0.48, 0.45])
    std = jnp.array([0.20, 0.25, 0.15])
    x = (x - mean) / std
    x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(10)(x)


FIRST_CASES = [
    ("_mlp", "mlp", (5, 5, 2)),
    ("_small", "small", (9, 9, 3)),
    ("_pureconv", "pureconv", (10, 10, 3)),
    ("_resnet", "resnet", (9, 9, 2)),
    ("_pooling", "pooling", (8, 8, 3)),
    ("_normalised", "normalised", (8, 8, 3)),
]
FIRST_SLOW_CASES = [("_medium", "medium", (8, 8, 3)), ("_large", "large", (8, 8, 3)),
                    ("_small_s2", "small_s2", (8, 8, 3))]


def _first_layer_model(arch):
  return Normalised() if arch == "normalised" else dm_jax.get_model(arch)


def check_first_layer(variant_fn, arch, shape):
  model = _first_layer_model(arch)
  params = U.init_params(model, shape, seed=8)
  x = U.nominal_inputs(shape, B, seed=10)
  eps = np.array([0.3, 0.7], np.float32)
  k = 4

  def first(x1):  # first conv/dense output for one example
    _, st = model.apply(params, x1[None], capture_intermediates=True,
                        mutable=["intermediates"])
    inter = st["intermediates"]
    return inter[U.first_layer_name(inter)]["__call__"][0][0]

  settings = [("linf", 0.05), ("l2", None), ("l1", None), ("l0", None)]

  def run(p, x, e):
    out = []
    for norm, fixed in settings:
      ee = fixed if fixed is not None else e
      kk = k if norm == "l0" else None
      out.append((dm_jax.interval_bounds(model.apply, p, x, ee, norm, k=kk,
                                         return_relu_inputs=True)[1][0],
                  dm_jax.double_margin(model.apply, p, x, ee, norm, k=kk,
                                       return_relu_inputs=True)[1][0]))
    return out

  results = variant_fn(run)(params, jnp.asarray(x), jnp.asarray(eps))
  first_and_jacobian = jax.jit(lambda x1: (first(x1), jax.jacobian(first)(x1)))
  for b in range(B):
    z, jac = first_and_jacobian(jnp.asarray(x[b]))
    z, jac = np.asarray(z, np.float64), np.asarray(jac, np.float64)
    J = jac.reshape(z.shape + (-1,))  # (*out, d_in)
    xf = x[b].reshape(-1).astype(np.float64)
    for (norm, fixed), (ib, dm) in zip(settings, results):
      e = fixed if fixed is not None else float(eps[b])
      if norm == "linf":
        down = up = e * np.abs(J).sum(-1)
      elif norm == "l2":
        down = up = e * np.sqrt((J ** 2).sum(-1))
      elif norm == "l1":
        down = up = e * np.abs(J).max(-1)
      else:  # SPEC.md: up_i = max(W_i (1 - x_i), -W_i x_i), down_i = max(-W_i (1 - x_i), W_i x_i)
        upi = np.maximum(J * (1 - xf), -J * xf)
        downi = np.maximum(-J * (1 - xf), J * xf)
        topk = lambda t: -np.sort(-t, axis=-1)[..., :k].sum(-1)
        up, down = topk(upi), topk(downi)
      what = f"{arch} {norm} example {b}"
      _close(ib.lower[b], z - down, what + " ibp lower", rtol=1e-5)
      _close(ib.upper[b], z + up, what + " ibp upper", rtol=1e-5)
      _close(dm.z[b], z, what + " dm z", rtol=1e-5)
      _close(dm.s[b], (up + down) / 2, what + " dm s", rtol=1e-5)
      chex.assert_trees_all_close(dm.v[b], np.zeros_like(z), atol=0)


class FirstLayerExactTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*FIRST_CASES)
  def test_first_layer_range_equals_jacobian_formula(self, arch, shape):
    check_first_layer(self.variant, arch, shape)


@pytest.mark.slow
class FirstLayerExactSlowTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*FIRST_SLOW_CASES)
  def test_first_layer_range_equals_jacobian_formula(self, arch, shape):
    check_first_layer(self.variant, arch, shape)


def test_first_layer_exact_after_explicit_input_padding():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  x = jnp.full((1, 14), 0.5)
  padded = lambda p, x: jnp.pad(x, ((0, 0), (1, 1))) @ p
  b = dm_jax.interval_bounds(padded, w, x, 0.1, "l2")
  chex.assert_trees_all_close(b.radius[0], 0.1 * jnp.linalg.norm(w[1:-1], axis=0),
                              rtol=1e-5)


# ------------------------------------------------ folded margins (last layer folded in)

def _hand_folded(arch, params, x, eps, y, variant, domain, n_dense):
  """Lower ends of ``f_y - f_j`` from the numpy reference: the triple up to the last
  ReLU's output, then ``min_{h in [lower, upper]} (W_y - W_j) . h + b_y - b_j`` written
  out for the last dense layer."""
  P = U.np_params(params)
  dom = U.IbpPlusV() if variant == "ibp_v" else U.DoubleMargin(variant)
  start = U.np_input(dom, np.asarray(x, np.float64), np.asarray(eps, np.float64), "linf",
                     domain=domain)
  h = dom.relu(U.np_network(arch, dom, P, start, n_dense=n_dense - 1))
  if variant == "ibp_v":
    _, l, u, v = h
    lower, upper = l - v, u + v
  else:
    z, s, v = h
    lower, upper = z - s - v, z + s + v
  last = P[f"Dense_{n_dense - 1}"]
  W, b = last["kernel"], last["bias"]  # (hidden, K), (K,)
  out = np.zeros((x.shape[0], W.shape[1]))
  for i, yi in enumerate(y):
    c = W[:, yi][:, None] - W  # (hidden, K): the margin rows W_y - W_j
    out[i] = (np.maximum(c, 0).T @ lower[i] + np.minimum(c, 0).T @ upper[i]
              + b[yi] - b)
  return out


class FoldedMarginsByHandTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("_small", "small", SMALL_IMG, {}, 2),
                                  ("_mlp2", "mlp", (6, 6, 1), MLP2, 2))
  def test_matches_numpy_reference(self, arch, shape, kw, n_dense):
    model = dm_jax.get_model(arch, 10, **kw)
    params = U.init_params(model, shape, seed=5)
    x = U.nominal_inputs(shape, 3, seed=9)
    y = np.array([0, 4, 9])
    eps = np.array([0.03, 0.08, 0.15], np.float32)
    settings = [(v, d) for v in DM_VARIANTS for d in (None, (0.0, 1.0))]
    fn = self.variant(lambda p, x, y, e: [
        folded_margins(model.apply, p, x, y, e, variant=v, domain=d) for v, d in settings])
    results = fn(params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(eps))
    for (variant, domain), (m, lb) in zip(settings, results):
      what = f"{arch} {variant} domain={domain}"
      chex.assert_shape(lb, (3, 10))
      _close(lb, _hand_folded(arch, params, x, eps, y, variant, domain, n_dense), what)
      np.testing.assert_array_equal(np.asarray(lb)[np.arange(3), y], 0.0)
      # Folding never widens: each margin is at least lower_y - upper_j of the logits.
      unfolded = np.take_along_axis(np.asarray(m.lower), y[:, None], 1) - np.asarray(m.upper)
      unfolded[np.arange(3), y] = 0.0
      assert np.all(np.asarray(lb) >= unfolded - 1e-5), what
      assert np.any(np.asarray(lb) > unfolded + 1e-3), what

