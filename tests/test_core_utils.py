"""Shared helpers for the core bound-propagation tests (test_core_*.py).

Everything here is written independently of dm_jax's internals: models are evaluated
with Flax (``capture_intermediates``) or with plain numpy, never with dm_jax code. This
module holds no tests itself.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import dm_jax

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)

# Float tolerance of the soundness checks (relative, per element).
RTOL = 1e-5


# ------------------------------------------------------------------------ models

def randomize_biases(params, seed: int, scale: float = 0.1):
  """Replaces every bias (zero at init) by N(0, scale^2) so biases are exercised."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    name = str(path[-1])
    if "bias" in name:
      leaf = jnp.asarray(rng.normal(0.0, scale, leaf.shape), leaf.dtype)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def model_and_params(arch: str, shape: Tuple[int, ...], num_classes: int = 10,
                     seed: int = 0, ensemble: int = 1):
  model = dm_jax.get_model(arch, num_classes, ensemble=ensemble)
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + tuple(shape)))
  params = randomize_biases(params, seed + 100)
  return model, params


def nominal_inputs(shape, batch: int, seed: int) -> np.ndarray:
  """Inputs in [0, 1] with ~30% exact zeros (like MNIST backgrounds) and a few ones."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.0, 1.0, (batch,) + tuple(shape))
  u = rng.uniform(size=x.shape)
  x[u < 0.3] = 0.0
  x[u > 0.95] = 1.0
  return x.astype(np.float32)


def _index(key: str) -> int:
  return int(re.search(r"_(\d+)$", key).group(1))


def relu_inputs_from_intermediates(arch: str, inter) -> List[jax.Array]:
  """Every ReLU input, in execution order, from Flax's captured module outputs."""
  out = lambda key: inter[key]["__call__"][0]
  convs = sorted([k for k in inter if k.startswith("Conv_")], key=_index)
  denses = sorted([k for k in inter if k.startswith("Dense_")], key=_index)
  if arch == "resnet":
    c0, c1, c2 = (out(k) for k in convs)
    return [c0, c1, jax.nn.relu(c0) + c2]
  # ConvStack (mlp, small, small_s2, pureconv, medium, large) and Pooling: every conv
  # and every dense but the last is followed by a ReLU.
  return [out(k) for k in convs] + [out(k) for k in denses[:-1]]


def first_layer_name(inter) -> str:
  return "Conv_0" if "Conv_0" in inter else "Dense_0"


@functools.lru_cache(maxsize=None)
def forward_fn(arch: str, shape, num_classes: int = 10, seed: int = 0):
  """Jitted ``x -> (logits, [relu inputs])`` computed with Flax only."""
  model, params = model_and_params(arch, shape, num_classes, seed)

  @jax.jit
  def fwd(x):
    logits, state = model.apply(params, x, capture_intermediates=True,
                                mutable=["intermediates"])
    return logits, relu_inputs_from_intermediates(arch, state["intermediates"])

  return fwd


@functools.lru_cache(maxsize=None)
def first_layer_fn(arch: str, shape, num_classes: int = 10, seed: int = 0):
  """``x -> output of the first conv/dense`` (pre-activation), via Flax."""
  model, params = model_and_params(arch, shape, num_classes, seed)

  def first(x):
    _, state = model.apply(params, x, capture_intermediates=True,
                           mutable=["intermediates"])
    inter = state["intermediates"]
    return inter[first_layer_name(inter)]["__call__"][0]

  return first


def first_layer_rows(first, x1: np.ndarray, units: np.ndarray) -> np.ndarray:
  """Rows of the Jacobian of ``first`` at one example ``x1`` (shape S) for flat units."""
  x1 = jnp.asarray(x1)[None]
  y, vjp = jax.vjp(first, x1)
  n = int(np.prod(y.shape))

  def row(u):
    ct = jnp.zeros((n,), y.dtype).at[u].set(1.0).reshape(y.shape)
    return vjp(ct)[0][0]

  return np.asarray(jax.lax.map(row, jnp.asarray(units)))


# ---------------------------------------------------------------------- sampling

def sample_ball(rng, x1: np.ndarray, eps: float, norm: str, n: int, k: int = None,
                rows: np.ndarray = None) -> np.ndarray:
  """n points of the threat set around one example x1 (shape S).

  Includes extreme points: linf vertices, l2 points exactly on the sphere, l1 vertices
  and surface points, l0 changes to the extremes 0/1; plus points directed by Jacobian
  rows of the first layer (where the first-layer bound is attained).
  """
  shape = x1.shape
  d = x1.size
  flat = x1.reshape(-1).astype(np.float64)
  pts = []
  n_dir = 0 if rows is None else 2 * len(rows)
  n_rand = n - n_dir
  if norm == "linf":
    a = n_rand // 2
    pts.append(flat + eps * rng.choice([-1.0, 1.0], (a, d)))  # vertices
    b = n_rand // 4
    pts.append(flat + eps * rng.uniform(-1, 1, (b, d)))  # inside
    c = n_rand - a - b  # mixed: some coordinates at vertices, others at nominal
    mask = rng.uniform(size=(c, d)) < 0.5
    pts.append(flat + eps * mask * rng.choice([-1.0, 1.0], (c, d)))
    if rows is not None:
      s = np.sign(rows.reshape(len(rows), -1))
      pts += [flat + eps * s, flat - eps * s]
  elif norm == "l2":
    g = rng.normal(size=(n_rand, d))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    radius = np.ones((n_rand, 1))
    radius[n_rand // 2:, 0] = rng.uniform(0, 1, n_rand - n_rand // 2)
    pts.append(flat + eps * radius * g)  # half exactly on the sphere
    if rows is not None:
      r = rows.reshape(len(rows), -1).astype(np.float64)
      r /= np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-30)
      pts += [flat + eps * r, flat - eps * r]
  elif norm == "l1":
    a = n_rand // 3  # Laplace directions on the surface
    g = rng.laplace(size=(a, d))
    g /= np.abs(g).sum(axis=1, keepdims=True)
    pts.append(flat + eps * g)
    b = n_rand // 3  # sparse directions (1, 2 or 5 coordinates), on the surface
    sp = np.zeros((b, d))
    for i in range(b):
      m = [1, 2, 5][i % 3]
      idx = rng.choice(d, m, replace=False)
      w = rng.laplace(size=m)
      sp[i, idx] = w / np.abs(w).sum()
    pts.append(flat + eps * sp)
    c = n_rand - a - b  # inside
    g = rng.laplace(size=(c, d))
    g /= np.abs(g).sum(axis=1, keepdims=True)
    pts.append(flat + eps * rng.uniform(0, 1, (c, 1)) * g)
    if rows is not None:
      r = rows.reshape(len(rows), -1)
      j = np.argmax(np.abs(r), axis=1)
      e = np.zeros((len(rows), d))
      e[np.arange(len(rows)), j] = np.sign(r[np.arange(len(rows)), j])
      pts += [flat + eps * e, flat - eps * e]
  elif norm == "l0":
    out = np.repeat(flat[None], n_rand, axis=0)
    for i in range(n_rand):
      idx = rng.choice(d, k, replace=False)
      if i % 2 == 0:
        out[i, idx] = rng.uniform(0, 1, k)
      else:
        out[i, idx] = rng.choice([0.0, 1.0], k)
    pts.append(out)
    if rows is not None:
      r = rows.reshape(len(rows), -1).astype(np.float64)
      for sign in (1.0, -1.0):
        rs = sign * r
        gain = np.maximum(rs * (1 - flat), -rs * flat)  # best change of each coordinate
        top = np.argsort(-gain, axis=1)[:, :k]
        p = np.repeat(flat[None], len(rows), axis=0)
        for i in range(len(rows)):
          p[i, top[i]] = (rs[i, top[i]] > 0).astype(np.float64)
        pts.append(p)
  else:
    raise ValueError(norm)
  out = np.concatenate(pts, axis=0)
  assert out.shape[0] == n, (out.shape, n)
  return out.reshape((n,) + shape).astype(np.float32)


def envelope(fwd, points: np.ndarray, chunk: int = 500):
  """Element-wise (min, max) of the logits and of every ReLU input over ``points``."""
  mins = maxs = None
  for start in range(0, len(points), chunk):
    logits, relus = fwd(jnp.asarray(points[start:start + chunk]))
    vals = [logits] + list(relus)
    lo = [np.asarray(jnp.min(v, axis=0)) for v in vals]
    hi = [np.asarray(jnp.max(v, axis=0)) for v in vals]
    if mins is None:
      mins, maxs = lo, hi
    else:
      mins = [np.minimum(a, b) for a, b in zip(mins, lo)]
      maxs = [np.maximum(a, b) for a, b in zip(maxs, hi)]
  return mins, maxs


def assert_within(lower, upper, vmin, vmax, what: str, rtol: float = RTOL):
  """lower - tol <= vmin and vmax <= upper + tol, element-wise."""
  lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
  tol = rtol * (1.0 + np.maximum(np.abs(lower), np.abs(upper)))
  below = lower - tol - vmin
  above = vmax - (upper + tol)
  assert lower.shape == np.shape(vmin), (what, lower.shape, np.shape(vmin))
  assert np.all(below <= 0), (
      f"{what}: a sampled value lies below the lower bound by {below.max():.3g} "
      f"({int((below > 0).sum())} elements)")
  assert np.all(above <= 0), (
      f"{what}: a sampled value lies above the upper bound by {above.max():.3g} "
      f"({int((above > 0).sum())} elements)")


# ------------------------------------------------------------ numpy forward passes
# Independent numpy (float64) implementations of the architectures of SPEC.md, run in
# several "domains": concrete values, IBP in the W+/W- form, and the Double Margin
# triple (and its variants) exactly as the paper's equations state them.

def same_pads(size: int, k: int, s: int) -> Tuple[int, int]:
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def np_conv(x, kernel, stride, pads):
  """NHWC conv, kernel (kh, kw, C, O), pads ((top, bottom), (left, right))."""
  kh, kw, _, o = kernel.shape
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, o))
  for di in range(kh):
    for dj in range(kw):
      patch = xp[:, di:di + stride * (ho - 1) + 1:stride, dj:dj + stride * (wo - 1) + 1:stride]
      out += np.einsum("bhwc,co->bhwo", patch, kernel[di, dj])
  return out


def np_maxpool(x, k=2, s=2):
  b, h, w, c = x.shape
  ho, wo = (h - k) // s + 1, (w - k) // s + 1
  out = np.full((b, ho, wo, c), -np.inf)
  for di in range(k):
    for dj in range(k):
      out = np.maximum(out, x[:, di:di + s * (ho - 1) + 1:s, dj:dj + s * (wo - 1) + 1:s])
  return out


def np_relu(x):
  return np.maximum(x, 0.0)


class Concrete:
  """Plain evaluation; records ReLU inputs."""

  def __init__(self):
    self.relu_inputs = []

  def linear(self, x, lin, bias):
    return lin(x) + bias

  def relu(self, x):
    self.relu_inputs.append(x)
    return np_relu(x)

  def maxpool(self, x):
    return np_maxpool(x)

  def add(self, a, b):
    return a + b

  def flatten(self, x):
    return x.reshape(x.shape[0], -1)


class Interval:
  """IBP in the W+/W- form of SPEC.md: values are (l, u)."""

  def __init__(self):
    self.relu_inputs = []

  def linear(self, x, lin, bias, pos_neg):
    l, u = x
    lin_pos, lin_neg = pos_neg
    return (lin_pos(l) + lin_neg(u) + bias, lin_pos(u) + lin_neg(l) + bias)

  def relu(self, x):
    self.relu_inputs.append(x)
    return (np_relu(x[0]), np_relu(x[1]))

  def maxpool(self, x):
    return (np_maxpool(x[0]), np_maxpool(x[1]))

  def add(self, a, b):
    return (a[0] + b[0], a[1] + b[1])

  def flatten(self, x):
    return tuple(t.reshape(t.shape[0], -1) for t in x)


class DoubleMargin:
  """The paper's eqs.: values are (z, s, v); variant 'dm' or 's_only'."""

  def __init__(self, variant="dm"):
    self.variant = variant
    self.relu_inputs = []

  def linear(self, x, lin, bias, abs_lin):
    z, s, v = x
    return (lin(z) + bias, abs_lin(s), abs_lin(v))

  def _g(self, g, x):
    z, s, v = x
    gz = g(z)
    s2 = (g(z + s) - g(z - s)) / 2
    if self.variant == "s_only":
      return (gz, s2, np.zeros_like(s2))
    v2 = (g(z + v) - g(z - v)) / 2 + np.abs(g(z + s + v) + g(z - s - v) - 2 * gz) / 2
    return (gz, s2, v2)

  def relu(self, x):
    self.relu_inputs.append(x)
    return self._g(np_relu, x)

  def maxpool(self, x):
    return self._g(np_maxpool, x)

  def add(self, a, b):
    return tuple(p + q for p, q in zip(a, b))

  def flatten(self, x):
    return tuple(t.reshape(t.shape[0], -1) for t in x)


class IbpPlusV:
  """Variation 2: values are (z, l, u, v); IBP's l, u replace z -/+ s in the v rule."""

  def __init__(self):
    self.relu_inputs = []

  def linear(self, x, lin, bias, abs_lin, pos_neg):
    z, l, u, v = x
    lin_pos, lin_neg = pos_neg
    return (lin(z) + bias, lin_pos(l) + lin_neg(u) + bias, lin_pos(u) + lin_neg(l) + bias,
            abs_lin(v))

  def _g(self, g, x):
    z, l, u, v = x
    gz = g(z)
    v2 = (g(z + v) - g(z - v)) / 2 + np.abs(g(u + v) + g(l - v) - 2 * gz) / 2
    return (gz, g(l), g(u), v2)

  def relu(self, x):
    self.relu_inputs.append(x)
    return self._g(np_relu, x)

  def maxpool(self, x):
    return self._g(np_maxpool, x)

  def add(self, a, b):
    return tuple(p + q for p, q in zip(a, b))

  def flatten(self, x):
    return tuple(t.reshape(t.shape[0], -1) for t in x)


def _layer_call(dom, x, make_lin, w, b):
  """Calls dom.linear with whatever linear maps the domain needs."""
  lin = make_lin(w)
  if isinstance(dom, Concrete):
    return dom.linear(x, lin, b)
  pos_neg = (make_lin(np.maximum(w, 0)), make_lin(np.minimum(w, 0)))
  if isinstance(dom, Interval):
    return dom.linear(x, lin, b, pos_neg)
  abs_lin = make_lin(np.abs(w))
  if isinstance(dom, DoubleMargin):
    return dom.linear(x, lin, b, abs_lin)
  return dom.linear(x, lin, b, abs_lin, pos_neg)


def np_params(params) -> Dict:
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])


def conv_layer(dom, x, p, stride, padding, in_hw):
  k = p["kernel"]
  if padding == "SAME":
    pads = (same_pads(in_hw[0], k.shape[0], stride), same_pads(in_hw[1], k.shape[1], stride))
  else:
    pads = ((padding, padding), (padding, padding))
  make = lambda w: (lambda t: np_conv(t, w, stride, pads))
  return _layer_call(dom, x, make, k, p["bias"])


def dense_layer(dom, x, p):
  make = lambda w: (lambda t: t @ w)
  return _layer_call(dom, x, make, p["kernel"], p["bias"])


# (features, kernel, stride, padding) per SPEC.md's architecture table.
CONV_STACKS = {
    "mlp": ((), 2),
    "small": (((16, 4, 2, "SAME"), (32, 4, 1, "SAME")), 2),
    "small_s2": (((16, 4, 2, 1), (32, 4, 2, 1)), 2),
    "pureconv": (((16, 4, 2, 1),) * 3, 1),
    "medium": (((16, 3, 1, 1), (16, 4, 2, 1), (32, 3, 1, 1), (32, 4, 2, 1)), 3),
    "large": (((64, 3, 1, 1), (64, 3, 1, 1), (64, 3, 2, 1), (128, 3, 1, 1),
               (128, 3, 2, 1)), 2),
}


def _hw(dom, x):
  t = x if isinstance(dom, Concrete) else x[0]
  return t.shape[1:3]


def np_network(arch: str, dom, P, x):
  """Runs architecture ``arch`` (SPEC.md) in numpy domain ``dom`` from params P."""
  if arch in CONV_STACKS:
    convs, n_dense = CONV_STACKS[arch]
    for i, (_, ksz, stride, pad) in enumerate(convs):
      x = dom.relu(conv_layer(dom, x, P[f"Conv_{i}"], stride, pad, _hw(dom, x)))
    x = dom.flatten(x)
    for j in range(n_dense):
      x = dense_layer(dom, x, P[f"Dense_{j}"])
      if j < n_dense - 1:
        x = dom.relu(x)
    return x
  if arch == "resnet":
    x = dom.relu(conv_layer(dom, x, P["Conv_0"], 2, 1, _hw(dom, x)))
    h = dom.relu(conv_layer(dom, x, P["Conv_1"], 1, 1, _hw(dom, x)))
    h = conv_layer(dom, h, P["Conv_2"], 1, 1, _hw(dom, h))
    x = dom.relu(dom.add(x, h))
    return dense_layer(dom, dom.flatten(x), P["Dense_0"])
  if arch == "pooling":
    for i in range(2):
      x = dom.relu(conv_layer(dom, x, P[f"Conv_{i}"], 1, 1, _hw(dom, x)))
      x = dom.maxpool(x)
    return dense_layer(dom, dom.flatten(x), P["Dense_0"])
  raise ValueError(arch)


def tree_max_abs(tree) -> float:
  return float(max(np.max(np.abs(np.asarray(a))) for a in jax.tree_util.tree_leaves(tree)))
