"""Convolution transposes that XLA:CPU runs fast (used by the bound passes).

* :func:`conv_input_transpose`: the transpose of a strided NHWC convolution w.r.t. its
  input as one stride-1 convolution over the stride phases plus a depth-to-space
  shuffle, instead of the lhs-dilated convolution ``jax.linear_transpose`` produces.
* :func:`conv2d`: a strided NHWC convolution whose input gradient is that transpose (the
  forward domains use it, so training through IBP/Double Margin gets it).
* :func:`conv_general_dilated`: a drop-in for ``lax.conv_general_dilated`` that routes
  plain strided NHWC convolutions to :func:`conv2d` (the models of
  :mod:`dm_jax.models` use it, so plain training gets the fast input gradient too).
* ``_kernel_gradient``: the kernel gradient of a convolution as ``k*k`` matrix products
  (the custom VJP of :func:`conv_input_transpose`, applied to many tiny coefficient maps).

Every function is checked against ``jax.linear_transpose`` / ``jax.vjp`` of
``lax.conv_general_dilated`` in ``tests/test_patches.py``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from dm_jax.core import fast_paths

_DN = ("NHWC", "HWIO", "NHWC")
_NHWC_SPECS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lhs, rhs (HWIO), out


def is_nhwc_conv(eqn: Any) -> bool:
  """A plain NHWC/HWIO ``conv_general_dilated`` equation (no dilation, no groups)."""
  p = eqn.params
  dn = p["dimension_numbers"]
  return ((tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _NHWC_SPECS
          and p["feature_group_count"] == 1 and p["batch_group_count"] == 1
          and all(d == 1 for d in p["lhs_dilation"]) and all(d == 1 for d in p["rhs_dilation"]))


def _conv_s1(x, kernel, padding):
  """Stride-1 NHWC/HWIO convolution (the transposes below; their custom VJP supplies the
  gradients, so this one is never differentiated)."""
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_DN)


def _kernel_gradient(x, g, kernel_shape, strides, padding):
  """d<g, conv(x, K)>/dK as ``kh*kw`` matrix products over strided slices of ``x``.

  XLA:CPU's own kernel gradient (a convolution over the batch axis) is as fast for a
  training batch but slow for the batches of B*R coefficient maps of the bound passes.
  """
  kh, kw = kernel_shape[:2]
  s = tuple(strides)
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, ((0, 0, 0), (padding[0][0], padding[0][1], 0),
                         (padding[1][0], padding[1][1], 0), (0, 0, 0)))
  ho, wo = g.shape[1:3]
  g2 = g.reshape(-1, g.shape[-1])
  dk = jnp.stack([jnp.stack([
      xp[:, i:i + s[0] * (ho - 1) + 1:s[0], j:j + s[1] * (wo - 1) + 1:s[1], :]
      .reshape(-1, x.shape[-1]).T @ g2
      for j in range(kw)]) for i in range(kh)])
  return dk


def conv_input_transpose(A: jax.Array, kernel: jax.Array, strides: Sequence[int],
                         padding: Any, in_hw: Tuple[int, int]) -> jax.Array:
  """Transpose w.r.t. the input of an NHWC/HWIO convolution, applied to ``A``.

  Args:
    A: (N, Ho, Wo, Cout) cotangents of the conv output.
    kernel: (kh, kw, Cin, Cout).
    strides, padding: the conv's (2,) strides and ((lo, hi), (lo, hi)) padding.
    in_hw: the conv input's spatial size.

  Returns:
    (N, H, W, Cin). For strides > 1 this is one stride-1 convolution over the s*s phases
    of the input (sub-kernels ``K[s a + r]``) followed by a depth-to-space shuffle, which
    XLA runs several times faster on CPU than the lhs-dilated convolution that
    ``jax.linear_transpose`` produces.
  """
  strides = tuple(int(d) for d in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv_input_transpose(A, kernel, strides, padding, tuple(int(d) for d in in_hw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_input_transpose(A, kernel, strides, padding, in_hw):
  kh, kw, cin, cout = kernel.shape
  s = tuple(strides)
  pads = [(kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
          (kw - 1 - padding[1][0], kw - 1 - padding[1][1])]
  if s == (1, 1) and min(min(p) for p in pads) >= 0:
    # A correlation with the flipped, in/out-swapped kernel, written out in HWIO: the
    # transpose jax.linear_transpose builds keeps the kernel in OI layout, which XLA:CPU
    # runs on a slow generic path (10x) when the conv sits inside a loop (lax.map).
    flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
    out = _conv_s1(A, flipped, tuple(pads))
    return out[:, :in_hw[0], :in_hw[1]]
  if s == (1, 1):
    n = A.shape[0]
    fwd = lambda t: lax.conv_general_dilated(t, kernel, s, padding,
                                             dimension_numbers=_DN)
    t = jax.linear_transpose(fwd, jax.ShapeDtypeStruct((n,) + tuple(in_hw) + (cin,), A.dtype))
    return t(A)[0]
  ka = [math.ceil(kernel.shape[d] / s[d]) for d in range(2)]
  kp = jnp.pad(kernel, ((0, ka[0] * s[0] - kh), (0, ka[1] * s[1] - kw), (0, 0), (0, 0)))
  kr = kp.reshape(ka[0], s[0], ka[1], s[1], cin, cout).transpose(0, 2, 5, 1, 3, 4)
  kr = kr.reshape(ka[0], ka[1], cout, s[0] * s[1] * cin)[::-1, ::-1]
  out = _conv_s1(A, kr, ((ka[0] - 1, ka[0] - 1), (ka[1] - 1, ka[1] - 1)))
  n, qh, qw, _ = out.shape
  out = out.reshape(n, qh, qw, s[0], s[1], cin).transpose(0, 1, 3, 2, 4, 5)
  out = out.reshape(n, qh * s[0], qw * s[1], cin)
  lo = [padding[0][0], padding[1][0]]
  need = [lo[d] + in_hw[d] - out.shape[1 + d] for d in range(2)]
  out = jnp.pad(out, ((0, 0), (0, max(0, need[0])), (0, max(0, need[1])), (0, 0)))
  return out[:, lo[0]:lo[0] + in_hw[0], lo[1]:lo[1] + in_hw[1]]


def _conv_input_transpose_fwd(A, kernel, strides, padding, in_hw):
  return _conv_input_transpose(A, kernel, strides, padding, in_hw), (A, kernel)


def _conv_input_transpose_bwd(strides, padding, in_hw, res, g):
  # The transpose's own transpose is the convolution: its gradient w.r.t. A is the
  # forward strided conv of g (XLA:CPU ran the stride-1 phase-conv gradient it replaces
  # at ~30 GFLOP/s, the strided conv runs at ~200), and <g, T_K(A)> = <conv_K(g), A>
  # gives the kernel gradient as that of a conv of g with cotangent A.
  A, kernel = res
  dA = lax.conv_general_dilated(g, kernel, strides, padding, dimension_numbers=_DN)
  dk = _kernel_gradient(g, A, kernel.shape, strides, padding)
  return dA.astype(A.dtype), dk.astype(kernel.dtype)


_conv_input_transpose.defvjp(_conv_input_transpose_fwd, _conv_input_transpose_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
           padding: Any) -> jax.Array:
  """``lax.conv_general_dilated(x, kernel, strides, padding)`` (NHWC/HWIO) whose input
  gradient is :func:`conv_input_transpose` (2-3x faster than XLA's for strided convs)."""
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


def _conv2d_fwd(x, kernel, strides, padding):
  return conv2d(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, res, g):
  x, kernel = res
  dx = conv_input_transpose(g, kernel, strides, padding, x.shape[1:3])
  _, k_vjp = jax.vjp(lambda k: lax.conv_general_dilated(x, k, strides, padding,
                                                        dimension_numbers=_DN), kernel)
  (dk,) = k_vjp(g)
  return dx.astype(x.dtype), dk


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """``lax.conv_general_dilated`` with :func:`conv2d`'s input gradient where it applies.

  Same signature and forward values. Where :func:`dm_jax.core.fast_paths.enabled` (on
  CPU by default), a strided, undilated, ungrouped NHWC/HWIO convolution at default
  precision goes through :func:`conv2d` (a ``custom_vjp``, which the bound interpreters
  see through); anything else, and everything on GPU/TPU (whose own strided-conv
  gradients are tuned, and where this one is unmeasured), is ``lax.conv_general_dilated``.
  Pass it as ``flax.linen.Conv(..., conv_general_dilated=conv_general_dilated)``.
  """
  plain = (
      fast_paths.enabled() and lhs.ndim == 4 and rhs.ndim == 4
      and tuple(window_strides) != (1, 1) and dimension_numbers is not None
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN)
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and feature_group_count == 1 and batch_group_count == 1
      and precision is None and preferred_element_type is None)
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), padding)
