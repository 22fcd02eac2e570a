"""Micro-benchmarks of the convolution forms behind docs/benchmarks.md's analysis.

Usage (from the repository root):

  python -m benchmarks.conv_bench

Times (median of 200 jit-compiled calls, after compiling) small-s2's second conv
(4x4/2, pad 1, 16 -> 32 channels, 14x14 input) in the forms measured against each other:
the forward pass at batch 256 as XLA's strided conv, as space-to-depth + a 2x2 conv and
as im2col + GEMM; and its kernel gradient at batch 100 as XLA's, as k*k GEMMs over
strided slices (``dm_jax.core.conv._kernel_gradient``) and as im2col + GEMM. Prints ms and
GFLOP/s (2 FLOPs per multiply-add) and checks that every form agrees with XLA's.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from dm_jax.core import conv

DN = ("NHWC", "HWIO", "NHWC")
PAD = ((1, 1), (1, 1))


def _time(fn, *args, calls=200):
  f = jax.jit(fn)
  out = jax.block_until_ready(f(*args))
  ts = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return out, statistics.median(ts)


def _slices(x, ho, wo):
  xp = jnp.pad(x, ((0, 0),) + PAD + ((0, 0),))
  return [xp[:, i:i + 2 * (ho - 1) + 1:2, j:j + 2 * (wo - 1) + 1:2, :]
          for i in range(4) for j in range(4)]


def forward_forms(b=256):
  k = jax.random.normal(jax.random.PRNGKey(0), (4, 4, 16, 32))
  x = jax.random.normal(jax.random.PRNGKey(1), (b, 14, 14, 16))
  flops = 2 * b * 7 * 7 * 32 * 4 * 4 * 16

  def xla(x, k):
    return lax.conv_general_dilated(x, k, (2, 2), PAD, dimension_numbers=DN)

  def space_to_depth(x, k):
    xp = jnp.pad(x, ((0, 0),) + PAD + ((0, 0),))
    xs = xp.reshape(b, 8, 2, 8, 2, 16).transpose(0, 1, 3, 2, 4, 5).reshape(b, 8, 8, 64)
    kk = k.reshape(2, 2, 2, 2, 16, 32).transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, 64, 32)
    return lax.conv_general_dilated(xs, kk, (1, 1), "VALID", dimension_numbers=DN)

  def im2col(x, k):
    pat = jnp.stack(_slices(x, 7, 7), axis=3).reshape(b * 49, 256)
    return (pat @ k.reshape(256, 32)).reshape(b, 7, 7, 32)

  return "forward, batch %d" % b, flops, [(n, f, (x, k)) for n, f in (
      ("xla strided conv", xla), ("space-to-depth + 2x2 conv", space_to_depth),
      ("im2col + GEMM", im2col))]


def kernel_gradient_forms(b=100):
  x = jax.random.normal(jax.random.PRNGKey(1), (b, 14, 14, 16))
  g = jax.random.normal(jax.random.PRNGKey(3), (b, 7, 7, 32))
  flops = 2 * b * 7 * 7 * 32 * 4 * 4 * 16
  kernel = jnp.zeros((4, 4, 16, 32))

  def xla(x, g):
    _, vjp = jax.vjp(lambda k: lax.conv_general_dilated(x, k, (2, 2), PAD,
                                                        dimension_numbers=DN), kernel)
    return vjp(g)[0]

  def gemms(x, g):
    return conv._kernel_gradient(x, g, kernel.shape, (2, 2), PAD)  # pylint: disable=protected-access

  def im2col(x, g):
    pat = jnp.stack(_slices(x, 7, 7), axis=3).reshape(-1, 256)
    return (pat.T @ g.reshape(-1, 32)).reshape(4, 4, 16, 32)

  return "kernel gradient, batch %d" % b, flops, [(n, f, (x, g)) for n, f in (
      ("xla", xla), ("k*k GEMMs (dm_jax.core.conv)", gemms), ("im2col + GEMM", im2col))]


def main():
  print(f"jax {jax.__version__}, backend {jax.default_backend()}")
  for title, flops, forms in (forward_forms(), kernel_gradient_forms()):
    print(f"\n{title} ({flops / 1e6:.0f} MFLOP):")
    ref = None
    for name, fn, args in forms:
      out, sec = _time(fn, *args)
      ref = out if ref is None else ref
      err = float(jnp.max(jnp.abs(out - ref)))
      print(f"  {name:28s} {1e3 * sec:7.3f} ms  {flops / sec / 1e9:6.1f} GFLOP/s  "
            f"max |diff| vs xla {err:.1e}")


if __name__ == "__main__":
  main()
