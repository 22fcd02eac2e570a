"""Shared helpers for the core bound-propagation tests (test_core_*.py), imported as
``import helpers as U``.

Everything here is written independently of dm_jax's internals: models are evaluated
with Flax (``capture_intermediates``) or with plain numpy, never with dm_jax code. This
module holds no tests itself.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import dm_jax

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)

# Float tolerance of the soundness checks (relative, per element).
RTOL = 1e-5


# ------------------------------------------------------------------------ models

class TinyMLP(nn.Module):
  """Flatten, two ReLU layers of 8, 3 classes: small enough for the exact MIP."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(8)(x))
    x = nn.relu(nn.Dense(8)(x))
    return nn.Dense(3)(x)


def init_params(model, shape, seed: int, bias_std: float = 0.1, weight_scale: float = 1.0):
  """Parameters with the shapes ``model.init`` would give, drawn with numpy (fast).

  Kernels are N(0, weight_scale^2/fan_in) (the init of SPEC.md by default), biases
  N(0, bias_std^2) (non-zero so the bias path is exercised). Only shapes come from Flax
  (``jax.eval_shape``, no compute).
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(shape)))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    if "bias" in str(path[-1]):
      val = rng.normal(0.0, bias_std, leaf.shape)
    else:
      fan_in = int(np.prod(leaf.shape[:-1]))
      val = rng.normal(0.0, weight_scale / np.sqrt(fan_in), leaf.shape)
    out.append(jnp.asarray(val, leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def model_and_params(arch: str, shape: Tuple[int, ...], num_classes: int = 10,
                     seed: int = 0, ensemble: int = 1):
  model = dm_jax.get_model(arch, num_classes, ensemble=ensemble)
  return model, init_params(model, shape, seed)


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
# triple (and its variants) exactly as the paper's equations state them. Convolutions
# are written with explicit patches (im2col); the first layer's exact range over an
# l2 / l1 / l0 ball is computed from the patches too.

def same_pads(size: int, k: int, s: int) -> Tuple[int, int]:
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def np_patches(x, kh, kw, stride, pads):
  """(B, H, W, C) -> (B, Ho, Wo, kh, kw, C), zero padded."""
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, kh, kw, x.shape[3]))
  for di in range(kh):
    for dj in range(kw):
      out[:, :, :, di, dj, :] = xp[:, di:di + stride * (ho - 1) + 1:stride,
                                  dj:dj + stride * (wo - 1) + 1:stride, :]
  return out


class LinearMap:
  """A conv (NHWC, kernel (kh, kw, C, O)) or a dense layer (kernel (I, O)), by hand."""

  def __init__(self, kernel, bias, stride=1, padding=None):
    self.kernel, self.bias, self.stride, self.padding = kernel, bias, stride, padding
    self.is_conv = kernel.ndim == 4

  def _pads(self, x):
    kh, kw = self.kernel.shape[:2]
    if self.padding == "SAME":
      return (same_pads(x.shape[1], kh, self.stride), same_pads(x.shape[2], kw, self.stride))
    p = self.padding
    return ((p, p), (p, p))

  def patches(self, x):
    """(B, ..., P) patches and the (P, O) kernel matrix."""
    if self.is_conv:
      kh, kw = self.kernel.shape[:2]
      pt = np_patches(x, kh, kw, self.stride, self._pads(x))
      return pt.reshape(pt.shape[:3] + (-1,)), self.kernel.reshape(-1, self.kernel.shape[-1])
    return x, self.kernel

  def apply(self, x, kernel=None):
    """Linear part only (no bias), with ``kernel`` in place of the layer's if given."""
    pt, kmat = self.patches(x)
    if kernel is not None:
      kmat = kernel.reshape(kmat.shape)
    return pt @ kmat

  def __call__(self, x):
    return self.apply(x) + self.bias

  def first_layer_range(self, x, eps, norm, k=None):
    """Exact (nominal, down, up) of this layer over the norm ball around x (B, ...)."""
    eps = np.broadcast_to(np.reshape(eps, (-1,) + (1,) * (x.ndim - 1)), x.shape)
    pt, kmat = self.patches(x)
    pe, _ = self.patches(eps)
    nominal = pt @ kmat + self.bias
    coef = pe[..., :, None] * kmat  # (B, ..., P, O): eps_i * W_ij
    if norm == "linf":
      h = np.abs(coef).sum(-2)
    elif norm == "l2":
      h = np.sqrt((coef ** 2).sum(-2))
    elif norm == "l1":
      h = np.abs(coef).max(-2)
    elif norm == "l0":
      mask, _ = self.patches(np.ones_like(x))  # 0 where a conv sees zero padding
      w = mask[..., :, None] * kmat
      raw = pt[..., :, None]
      up = np.maximum(np.maximum(w * (1 - raw), -w * raw), 0)
      down = np.maximum(np.maximum(-w * (1 - raw), w * raw), 0)
      topk = lambda t: -np.sort(-t, axis=-2)[..., :k, :].sum(-2)
      return nominal, topk(down), topk(up)
    else:
      raise ValueError(norm)
    return nominal, h, h


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


class RawInput:
  """The perturbation set, before the first linear layer (l2 / l1 / l0 balls)."""

  def __init__(self, x, eps, norm, k=None):
    self.x, self.eps, self.norm, self.k = x, eps, norm, k


class Concrete:
  """Plain evaluation; records ReLU inputs."""

  def __init__(self):
    self.relu_inputs = []

  def linear(self, x, layer):
    return layer(x)

  def relu(self, x):
    self.relu_inputs.append(x)
    return np_relu(x)

  def maxpool(self, x):
    return np_maxpool(x)

  def add(self, a, b):
    return a + b

  def flatten(self, x):
    return x.reshape(x.shape[0], -1)


class _Abstract:
  """Domains whose values are tuples of same-shape arrays."""

  def __init__(self):
    self.relu_inputs = []

  def relu(self, x):
    self.relu_inputs.append(x)
    return self.monotone(np_relu, x)

  def maxpool(self, x):
    return self.monotone(np_maxpool, x)

  def add(self, a, b):
    return tuple(p + q for p, q in zip(a, b))

  def flatten(self, x):
    return tuple(t.reshape(t.shape[0], -1) for t in x)

  def linear(self, x, layer):
    if isinstance(x, RawInput):
      return self.from_range(*layer.first_layer_range(x.x, x.eps, x.norm, x.k))
    return self.affine(x, layer)


class Interval(_Abstract):
  """IBP in the W+/W- form of SPEC.md: values are (l, u)."""

  def from_range(self, nominal, down, up):
    return (nominal - down, nominal + up)

  def affine(self, x, layer):
    l, u = x
    w = layer.kernel
    pos = lambda t: layer.apply(t, np.maximum(w, 0))
    neg = lambda t: layer.apply(t, np.minimum(w, 0))
    return (pos(l) + neg(u) + layer.bias, pos(u) + neg(l) + layer.bias)

  def monotone(self, g, x):
    return (g(x[0]), g(x[1]))


class DoubleMargin(_Abstract):
  """The paper's eqs. 7-8: values are (z, s, v); variant 'dm' or 's_only'."""

  def __init__(self, variant="dm"):
    super().__init__()
    self.variant = variant

  def from_range(self, nominal, down, up):
    s = (up + down) / 2
    return (nominal, s, np.zeros_like(s))

  def affine(self, x, layer):
    z, s, v = x
    absw = np.abs(layer.kernel)
    return (layer(z), layer.apply(s, absw), layer.apply(v, absw))

  def monotone(self, g, x):
    z, s, v = x
    gz = g(z)
    s2 = (g(z + s) - g(z - s)) / 2
    if self.variant == "s_only":
      return (gz, s2, np.zeros_like(s2))
    v2 = (g(z + v) - g(z - v)) / 2 + np.abs(g(z + s + v) + g(z - s - v) - 2 * gz) / 2
    return (gz, s2, v2)


class IbpPlusV(_Abstract):
  """Variation 2: values are (z, l, u, v); IBP's l, u replace z -/+ s in the v rule."""

  def from_range(self, nominal, down, up):
    return (nominal, nominal - down, nominal + up, np.zeros_like(up))

  def affine(self, x, layer):
    z, l, u, v = x
    lo, hi = Interval.affine(self, (l, u), layer)
    return (layer(z), lo, hi, layer.apply(v, np.abs(layer.kernel)))

  def monotone(self, g, x):
    z, l, u, v = x
    gz = g(z)
    v2 = (g(z + v) - g(z - v)) / 2 + np.abs(g(u + v) + g(l - v) - 2 * gz) / 2
    return (gz, g(l), g(u), v2)


def np_params(params) -> Dict:
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])


def conv(P, stride, padding):
  return LinearMap(P["kernel"], P["bias"], stride, padding)


def dense(P):
  return LinearMap(P["kernel"], P["bias"])


# (features, kernel, stride, padding) of the conv layers and the number of dense layers,
# per SPEC.md's architecture table.
CONV_STACKS = {
    "mlp": ((), 3),
    "small": (((16, 4, 2, "SAME"), (32, 4, 1, "SAME")), 2),
    "small_s2": (((16, 4, 2, 1), (32, 4, 2, 1)), 2),
    "pureconv": (((16, 4, 2, 1),) * 3, 1),
    "medium": (((16, 3, 1, 1), (16, 4, 2, 1), (32, 3, 1, 1), (32, 4, 2, 1)), 3),
    "large": (((64, 3, 1, 1), (64, 3, 1, 1), (64, 3, 2, 1), (128, 3, 1, 1),
               (128, 3, 2, 1)), 2),
}


def np_network(arch: str, dom, P, x, n_dense=None):
  """Runs architecture ``arch`` (SPEC.md) in numpy domain ``dom`` from params P.

  ``x`` is a domain value, or a :class:`RawInput` for the l2 / l1 / l0 balls. ReLU
  inputs are recorded in ``dom.relu_inputs``.
  """
  def flatten(t):
    return t if isinstance(t, RawInput) else dom.flatten(t)

  if arch in CONV_STACKS:
    convs, nd = CONV_STACKS[arch]
    nd = nd if n_dense is None else n_dense
    for i, (_, _, stride, pad) in enumerate(convs):
      x = dom.relu(dom.linear(x, conv(P[f"Conv_{i}"], stride, pad)))
    if isinstance(x, RawInput):  # an MLP: flatten the raw input
      x = RawInput(x.x.reshape(x.x.shape[0], -1), x.eps, x.norm, x.k)
    else:
      x = dom.flatten(x)
    for j in range(nd):
      x = dom.linear(x, dense(P[f"Dense_{j}"]))
      if j < nd - 1:
        x = dom.relu(x)
    return x
  if arch == "resnet":
    x = dom.relu(dom.linear(x, conv(P["Conv_0"], 2, 1)))
    h = dom.relu(dom.linear(x, conv(P["Conv_1"], 1, 1)))
    h = dom.linear(h, conv(P["Conv_2"], 1, 1))
    x = dom.relu(dom.add(x, h))
    return dom.linear(dom.flatten(x), dense(P["Dense_0"]))
  if arch == "pooling":
    for i in range(2):
      x = dom.relu(dom.linear(x, conv(P[f"Conv_{i}"], 1, 1)))
      x = dom.maxpool(x)
    return dom.linear(dom.flatten(x), dense(P["Dense_0"]))
  raise ValueError(arch)


def np_input(dom, x, eps, norm, k=None, domain=None):
  """The input set as a value of ``dom`` (linf) or a RawInput (other norms)."""
  if norm != "linf":
    return RawInput(x, eps, norm, k)
  eps = np.broadcast_to(np.reshape(eps, (-1,) + (1,) * (x.ndim - 1)) if np.ndim(eps) == 1
                        else eps, x.shape)
  lo, hi = x - eps, x + eps
  if domain is not None:
    lo, hi = np.clip(lo, *domain), np.clip(hi, *domain)
  if isinstance(dom, Interval):
    return (lo, hi)
  if isinstance(dom, DoubleMargin):  # expanded at the box's centre (x if not clipped)
    return ((lo + hi) / 2, (hi - lo) / 2, np.zeros_like(x))
  if isinstance(dom, IbpPlusV):
    return (x, lo, hi, np.zeros_like(x))
  raise TypeError(dom)


def tree_max_abs(tree) -> float:
  return float(max(np.max(np.abs(np.asarray(a))) for a in jax.tree_util.tree_leaves(tree)))
