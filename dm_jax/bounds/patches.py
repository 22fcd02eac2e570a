"""Backward linear bounds in *patch* form for convolutional layers (CNN-Cert's trick).

The bounds of a conv layer's neurons need one backward pass per neuron. In dense form
each pass carries a coefficient tensor as large as every earlier layer, and costs a full
transposed convolution per neuron. But the coefficients of neuron ``(h, w, c)`` are zero
outside its receptive field, so here each neuron carries only its window: coefficients of
shape (B, H, W, R, Kh, Kw, C_m) at an earlier node m, where the window of the neuron at
``(h, w)`` covers rows ``h * S - P + i`` (and columns likewise) for ``i < K``. A
convolution with kernel k, stride s and low padding p maps the geometry to
``K' = (K - 1) s + k``, ``S' = S s``, ``P' = P s + p``; the transposed convolution is
applied to every window as to a tiny image. ReLU relaxations, biases and element-wise
constants are read from the windows of their maps (zero outside the map, which also
removes the coefficients of zero padding).

Only chains of NHWC convolutions, element-wise affine ops, residual additions, ReLUs,
other element-wise activations (their lines, :mod:`dm_jax.bounds.activations`) and max
pooling are handled (not products of two input-dependent values); :mod:`dm_jax.bounds.linear` falls back to dense form for anything else. The
results equal the dense backward pass exactly (same relaxations, same arithmetic up to
float rounding).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dm_jax.bounds import activations, float_error, relaxations
from dm_jax.bounds.tape import NodeRef, Tape, node_shape, nominal_of
from dm_jax.core import primitives
from dm_jax.core.conv import conv_input_transpose, is_nhwc_conv
from dm_jax.core.input_sets import InputSet

_ELEMENTWISE_CONST = primitives.names(patch=primitives.PATCH_ELEMENTWISE)
_PASS_THROUGH = primitives.names(patch=primitives.PATCH_PASS)
_NEGATION = primitives.names(patch=primitives.PATCH_NEG)


# Windows whose transpose matrix has at most this many entries use a GEMM (_conv_back).
WINDOW_MATRIX_MAX_ENTRIES = 1 << 16


@dataclasses.dataclass
class Patch:
  A: jax.Array  # (B, H, W, R, Kh, Kw, Cm)
  K: Tuple[int, int]
  S: Tuple[int, int]
  P: Tuple[int, int]


def windows(t: jax.Array, K: Tuple[int, int], S: Tuple[int, int], P: Tuple[int, int],
            out_hw: Sequence[int]) -> jax.Array:
  """Windows of a (B, Hm, Wm, C) map: (B, H, W, Kh, Kw, C), zero outside the map."""
  H, W = out_hw
  pads = [(0, 0, 0)]
  for d in range(2):
    size = (out_hw[d] - 1) * S[d] + K[d]
    pads.append((P[d], size - P[d] - t.shape[1 + d], 0))
  pads.append((0, 0, 0))
  t = lax.pad(t, jnp.zeros((), t.dtype), pads)
  rows = []
  for i in range(K[0]):
    cols = []
    for j in range(K[1]):
      cols.append(lax.slice(t, (0, i, j, 0),
                            (t.shape[0], i + (H - 1) * S[0] + 1, j + (W - 1) * S[1] + 1,
                             t.shape[3]), (1, S[0], S[1], 1)))
    rows.append(jnp.stack(cols, axis=3))
  return jnp.stack(rows, axis=3)




def supported(tape: Tape, target: int) -> bool:
  """Whether every equation between the input and ``target`` has a patch rule."""
  shapes = {i: node_shape(tape, i) for i in range(len(tape.values))}
  if len(shapes[target]) != 4 or len(shapes[0]) != 4:
    return False
  needed = {target}
  for e in reversed(tape.entries):
    if e.out > target or e.out not in needed:
      continue
    nodes = e.nodes()
    needed.update(n for _, n in nodes)
    if len(shapes[e.out]) != 4:
      return False
    name = e.eqn.primitive.name
    if e.kind in (primitives.TAPE_RELU, primitives.TAPE_ACTIVATION):
      continue
    if e.kind == primitives.TAPE_MAXPOOL:
      p = e.eqn.params
      if (len(p["window_dimensions"]) != 4 or p["window_dimensions"][0] != 1
          or p["window_dimensions"][3] != 1 or p["window_strides"][0] != 1
          or p["window_strides"][3] != 1 or tuple(p["padding"][0]) != (0, 0)
          or tuple(p["padding"][3]) != (0, 0)
          or any(d != 1 for d in p["base_dilation"] + p["window_dilation"])):
        return False
      continue
    if e.kind != primitives.TAPE_AFFINE:
      return False
    if name == "conv_general_dilated":
      if [i for i, _ in nodes] != [0] or not is_nhwc_conv(e.eqn):
        return False
    elif name in _ELEMENTWISE_CONST:
      if name in ("mul", "div") and len(nodes) != 1:
        return False
      if name == "div" and nodes[0][0] != 0:
        return False
      if any(shapes[n] != shapes[e.out] for _, n in nodes):
        return False
    elif name in _NEGATION | _PASS_THROUGH:
      pass
    else:
      return False
  return True


def _pad_to(patch: Patch, K, P) -> jax.Array:
  """Re-expresses a patch on a larger window (same stride)."""
  pads = [(0, 0)] * 4
  for d in range(2):
    lo = P[d] - patch.P[d]
    pads.append((lo, K[d] - patch.K[d] - lo))
  pads.append((0, 0))
  return jnp.pad(patch.A, pads)


def _merge(a: Optional[Patch], b: Patch) -> Patch:
  if a is None:
    return b
  if a.S != b.S:
    raise NotImplementedError("patch merge with different strides")
  P = tuple(max(a.P[d], b.P[d]) for d in range(2))
  K = tuple(max(a.K[d] - a.P[d], b.K[d] - b.P[d]) + P[d] for d in range(2))
  return Patch(_pad_to(a, K, P) + _pad_to(b, K, P), K, a.S, P)


def _win_sum(A, t):
  """<A, windows> summed over the window: A (B,H,W,R,Kh,Kw,C), t (B,H,W,Kh,Kw,C)."""
  return jnp.einsum("bhwrijc,bhwijc->bhwr", A, t)


def _conv_back(patch: Patch, eqn, kernel) -> Patch:
  A = patch.A
  b, h, w, r, kh, kw, cm = A.shape
  s = eqn.params["window_strides"]
  p = [lo for lo, _ in eqn.params["padding"]]
  imgs = A.reshape(b * h * w * r, kh, kw, cm)
  K = tuple((patch.K[d] - 1) * s[d] + kernel.shape[d] for d in range(2))
  # Every window is a tiny image; its transpose through a VALID conv covers K'.
  n_in, n_out = kh * kw * cm, K[0] * K[1] * kernel.shape[2]
  if n_in * n_out <= WINDOW_MATRIX_MAX_ENTRIES:
    # The transpose restricted to one window is a small (n_in, n_out) matrix: one GEMM
    # over all windows instead of a transposed conv of many tiny images (XLA:CPU runs
    # those, with lhs dilation for strided convs, at a few GFLOP/s). The matrix is the
    # window's own, independent of the image size.
    basis = jnp.eye(n_in, dtype=A.dtype).reshape(n_in, kh, kw, cm)
    matrix = conv_input_transpose(basis, kernel, s, ((0, 0), (0, 0)), K).reshape(n_in, n_out)
    out = imgs.reshape(-1, n_in) @ matrix
  else:
    out = conv_input_transpose(imgs, kernel, s, ((0, 0), (0, 0)), K)
  out = out.reshape(b, h, w, r, K[0], K[1], kernel.shape[2])
  S = tuple(patch.S[d] * s[d] for d in range(2))
  P = tuple(patch.P[d] * s[d] + p[d] for d in range(2))
  return Patch(out, K, S, P)


def _layout(patch: Patch, out_hw) -> relaxations.Layout:
  """The windowed layout of ``patch``'s coefficients (see :mod:`dm_jax.bounds.relaxations`)."""
  win = lambda t: windows(t, patch.K, patch.S, patch.P, out_hw)
  return relaxations.Layout(lift=lambda t: win(t)[:, :, :, None],
                            dot=lambda A, t: _win_sum(A, win(t)), lead=4)


def backward_patches(tape: Tape, target: int, A0: Patch,
                     bounds: Mapping[int, Tuple[jax.Array, jax.Array]], method: str,
                     alphas: Optional[Mapping[int, jax.Array]] = None,
                     error: Optional[jax.Array] = None) -> jax.Array:
  """Lower bounds (B, H, W, R) of the rows in ``A0`` (patch form), like
  dm_jax.bounds.linear's dense ``backward``, with the same steps
  (:mod:`dm_jax.bounds.relaxations`) over the windowed layout. ``alphas``: optional
  {ReLU input node: (B, *S) lower slopes} (alpha-CROWN), shared by every row.
  ``error``: the sound mode, as the dense ``backward``'s (the target's float error
  radius (B, H, W, C), :func:`dm_jax.bounds.float_error.error_radius`)."""
  sound = error is not None
  alphas = alphas or {}
  coeffs: Dict[int, Patch] = {target: A0}
  out_hw = A0.A.shape[1:3]
  offset = jnp.zeros(A0.A.shape[:4], A0.A.dtype)

  def add(node, patch):
    coeffs[node] = _merge(coeffs.get(node), patch)

  for e in reversed(tape.entries):
    if e.out > target or e.out not in coeffs:
      continue
    patch = coeffs.pop(e.out)
    name = e.eqn.primitive.name
    nodes = e.nodes()
    layout = _layout(patch, out_hw)
    if e.kind == primitives.TAPE_RELU:
      (_, node), = nodes
      l, u = bounds[node]
      A, extra = relaxations.relu_step(patch.A, l, u, e.relu_const, method, layout,
                                       alphas.get(node))
      offset = offset + extra
      add(node, Patch(A, patch.K, patch.S, patch.P))
    elif e.kind == primitives.TAPE_ACTIVATION:
      lines = activations.entry_lines(tape, e, bounds)
      A, extra = relaxations.activation_step(patch.A, lines, layout)
      offset = offset + extra
      add(e.node, Patch(A, patch.K, patch.S, patch.P))
    elif e.kind == primitives.TAPE_MAXPOOL:
      (_, node), = nodes
      coef, extra = _maxpool_back(patch, e.eqn, bounds[node], layout)
      offset = offset + extra
      add(node, coef)
    elif name == "conv_general_dilated":
      add(nodes[0][1], _conv_back(patch, e.eqn, e.refs[1].value))
    elif name in _PASS_THROUGH:
      add(nodes[0][1], patch)
    elif name in _NEGATION:
      add(nodes[0][1], Patch(-patch.A, patch.K, patch.S, patch.P))
    elif name in ("mul", "div"):
      (_, node), = nodes
      const = e.refs[1 - nodes[0][0]].value
      shape = node_shape(tape, node)
      factor = jnp.broadcast_to(1 / const if name == "div" else const, shape)
      add(node, Patch(patch.A * layout.lift(factor), patch.K, patch.S, patch.P))
    else:  # add / sub / add_any
      shape = node_shape(tape, e.out)
      zeros = jnp.zeros(shape, patch.A.dtype)
      bias = e.eqn.primitive.bind(
          *[zeros if isinstance(r, NodeRef) else r.value for r in e.refs],
          **e.eqn.params)
      offset = offset + layout.dot(patch.A, jnp.broadcast_to(bias, shape))
      for i, node in nodes:
        sign = primitives.operand_sign(name, i)
        add(node, Patch(sign * patch.A, patch.K, patch.S, patch.P))
  (node, patch), = coeffs.items()
  assert node == 0, node
  lower = offset + concretize(patch, out_hw, tape.iset, outward=sound)
  if sound:
    lower = float_error.sound_lower(
        lower, float_error.row_error(A0.A, error, _layout(A0, out_hw)))
  return lower


def _maxpool_back(patch: Patch, eqn, pre_bounds, layout: relaxations.Layout):
  """Max pooling with the relaxation of :func:`relaxations.maxpool_weights`, its weights
  moved through the pooling windows (the patch grows to cover them)."""
  l, u = pre_bounds
  coef, extra, onehots = relaxations.maxpool_weights(patch.A, l, u, eqn, layout)
  p = eqn.params
  k = p["window_dimensions"][1:3]
  s = p["window_strides"][1:3]
  K = tuple((patch.K[d] - 1) * s[d] + k[d] for d in range(2))
  out = 0
  zero = jnp.zeros((), coef.dtype)
  for j, offset in enumerate(np.ndindex(*p["window_dimensions"])):
    chosen = coef * layout.lift(onehots[j])
    di, dj = offset[1], offset[2]
    # Window position i of the pooled map reads input position i * s + di.
    out = out + lax.pad(chosen, zero, [(0, 0, 0)] * 4 + [
        (di, K[0] - di - ((patch.K[0] - 1) * s[0] + 1), s[0] - 1),
        (dj, K[1] - dj - ((patch.K[1] - 1) * s[1] + 1), s[1] - 1), (0, 0, 0)])
  S = tuple(patch.S[d] * s[d] for d in range(2))
  P = tuple(patch.P[d] * s[d] + p["padding"][1 + d][0] for d in range(2))
  return Patch(out, K, S, P), extra


def concretize(patch: Patch, out_hw: Sequence[int], iset: InputSet,
               outward: bool = False) -> jax.Array:
  """min over the input set of the windowed linear functions: (B, H, W, R)
  (``outward``: the l-inf box rounded outward, the sound mode)."""
  layout = _layout(patch, out_hw)
  # The windows' zero-padding positions are not coordinates of the input: drop them (a
  # row norm must not count them).
  A = patch.A * layout.lift(jnp.ones_like(iset.x))
  return relaxations.concretize_input(A, iset, layout, outward)


def identity_bounds(tape: Tape, target: int, bounds: Mapping[int, Tuple[jax.Array, jax.Array]],
                    method: str, chunk_bytes: int,
                    alphas: Optional[Mapping[int, jax.Array]] = None,
                    error: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """(l, u) of every element of the NHWC node ``target`` in patch form (``alphas`` and
  ``error`` as in :func:`backward_patches`, shared by the node's rows)."""
  ref = nominal_of(tape, target)
  b, h, w, c = ref.shape
  # Rows: +e_c (lower bounds) and -e_c (upper bounds), chunked over channels for memory.
  widest = max(int(np.prod(node_shape(tape, i)[1:])) for i in range(target + 1))
  chunk = relaxations.identity_rows_per_chunk(c, b * h * w * 2 * max(widest, 1) * 4,
                                              chunk_bytes)

  def one(start):
    eye = jax.nn.one_hot(start + jnp.arange(chunk), c, dtype=ref.dtype)  # (chunk, c)
    rows = jnp.concatenate([eye, -eye])
    A = jnp.broadcast_to(rows[None, None, None, :, None, None, :], (b, h, w, 2 * chunk, 1, 1, c))
    low = backward_patches(tape, target, Patch(A, (1, 1), (1, 1), (0, 0)), bounds, method,
                           alphas, error)
    return low[..., :chunk], -low[..., chunk:]

  return relaxations.chunked_identity_bounds(one, c, chunk)
