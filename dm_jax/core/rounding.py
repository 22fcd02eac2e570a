"""Floating-point rounding: the error model and helpers of the sound mode (``sound=True``).

What ``sound=True`` certifies: the *real-valued* network whose weights are the given
float32 numbers, over the real input set (the ball of the float32 ``x`` and ``eps``,
intersected with the data box): ``min over the set of f_y - f_j >= L`` in exact
arithmetic for the reported ``L``. (Not the float32 *execution* of the network, whose
own rounding may differ from the real map by a similar tiny amount.)

How. The bound is computed in float64 (:func:`float64`: the float32 weights, inputs and
radii convert exactly; ``jax.enable_x64`` inside the traced function), every interval
of the forward pass and every backward bound is widened by a rigorous bound on its
float64 rounding error (:class:`dm_jax.bounds.interval.IntervalDomain` ``(sound=True)``,
:mod:`dm_jax.bounds.float_error`), and the result is rounded down to float32
(:func:`down_to`). The l-inf box is rounded outward: in float32, ``x -/+ eps`` rounds
*inward* as often as outward, so the plain float32 bound certifies a box narrower than
the ball by up to half an ulp of ``x`` per side (1.3e-5 of ``eps = 0.002`` at ``x`` in
[0.5, 1); on the small CNN this made plain margins up to 3e-5 too high, more than all
the arithmetic's rounding). In float64 the rounding bounds are ~1e-12 relative, so the
sound bound is the method's exact-arithmetic bound to within a float32 rounding.

The model (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 2.4
and Lemma 3.1/3.4): every float operation returns ``(a op b)(1 + d)``, ``|d| <= u``
(``u = 2^-53`` in float64, ``2^-24`` in float32; round to nearest); a sum or dot product
of ``n`` terms, summed in *any* order (whatever XLA's reduction or GEMM does, FMA
included), errs by at most ``gamma_n * sum |terms|``, ``gamma_n = n u / (1 - n u)``. We
use :func:`gamma` ``= 2 (n + 2) u``, above ``gamma_n`` (for ``n u <= 1/8``) with room
for the rounding of computing the bound itself. The rules are dtype-generic.

Assumptions, stated (the proof does not cover them):

* IEEE arithmetic with unit roundoff ``u`` in every dot product and convolution (sums
  of products in some order): XLA:CPU and GPU float64 do this; convolution algorithms
  that are not sums of products (Winograd, FFT) are outside the model;
* no underflow that matters: an underflowed (or flushed-to-zero) result errs by less
  than the smallest normal number (2^-1022 in float64). Every bound gets an absolute
  :data:`FLOOR` per element and step, which covers such errors of first order; the
  parameters and inputs must not hold subnormal numbers (:func:`check_no_subnormals`),
  since XLA:CPU reads them as zero.

The rules per primitive (how many terms a computed element sums, forward and in the
backward transpose) come from the primitive table's ``rounding`` field
(:mod:`dm_jax.core.primitives`), so a primitive the table does not analyse raises in
sound mode instead of being silently unsound.
"""
from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from dm_jax.core import interpreter, primitives
from dm_jax.core.errors import UnsupportedPrimitiveError

# An absolute slack per element and step (a normal float32, far above 2^-126).
FLOOR = 2.0 ** -100
# The precision the sound mode computes in.
SOUND_DTYPE = jnp.float64
DOMAIN_NAME = "sound (float-rounding) mode"


def unit_roundoff(dtype: DTypeLike = jnp.float32) -> float:
  """``u``: half the machine epsilon (2^-24 for float32)."""
  return float(jnp.finfo(dtype).eps) / 2


def gamma(n: int, dtype: DTypeLike = jnp.float32) -> float:
  """``2 (n + 2) u``: a safe bound (see the module docstring) on the relative error of
  any float sum or dot product of ``n`` terms. ValueError if ``n u`` is too large for
  the bound (n beyond about 2^20 in float32)."""
  u = unit_roundoff(dtype)
  n = int(n)
  if n < 0 or (n + 2) * u > 1 / 8:
    raise ValueError(f"no rounding bound for sums of {n} terms in {jnp.dtype(dtype).name}.")
  return 2.0 * (n + 2) * u


def slack(t: jax.Array) -> jax.Array:
  """``4 u |t| + FLOOR``: more than the error of one rounding of ``t``'s value plus the
  rounding of the correction itself (see :func:`round_down`)."""
  u = unit_roundoff(t.dtype)
  return 4 * u * jnp.abs(t) + FLOOR


def round_down(t: jax.Array) -> jax.Array:
  """A float <= the exact value of a result ``t`` that one rounding (to nearest) made:
  ``t - 4u|t| - FLOOR``. (With ``|t~ - t| <= u|t| + 2^-126``, the subtraction's own
  rounding leaves ``<= t~ - 2.9u|t~| - 0.9 FLOOR <= t``.)"""
  return t - slack(t)


def round_up(t: jax.Array) -> jax.Array:
  """The mirror of :func:`round_down`: a float >= the exact value."""
  return t + slack(t)


def two_sum(a: jax.Array, b: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Knuth's error-free TwoSum: ``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e``
  exactly (round to nearest, no overflow; XLA does not reassociate float arithmetic)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def add_down(a: jax.Array, b: jax.Array) -> jax.Array:
  """The largest float <= ``a + b`` (exact where the sum is): ``fl(a + b)``, one ulp
  lower where it rounded up."""
  s, e = two_sum(a, b)
  return jnp.where(e < 0, jnp.nextafter(s, jnp.asarray(-jnp.inf, s.dtype)), s)


def add_up(a: jax.Array, b: jax.Array) -> jax.Array:
  """The smallest float >= ``a + b``."""
  return -add_down(-a, -b)


def centre_radius(lo: jax.Array, hi: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """``(c, r)`` with ``[c - r, c + r]`` holding ``[lo, hi]`` in exact arithmetic:
  ``((lo + hi) / 2, (hi - lo) / 2)``, with ``r`` widened by the rounding only where the
  sums were inexact (TwoSum), so exact boxes (``[0, u]`` of a ReLU, ``[0, 0]``) stay
  exact and the relaxations' ties do not move."""
  s, e1 = two_sum(lo, hi)
  d, e2 = two_sum(hi, -lo)
  c, r = s / 2, d / 2
  tiny = jnp.finfo(c.dtype).tiny
  halves = ((jnp.abs(s) >= 4 * tiny) | (s == 0)) & ((jnp.abs(d) >= 4 * tiny) | (d == 0))
  exact = (e1 == 0) & (e2 == 0) & halves
  return c, jnp.where(exact, r, r + 2 * (slack(c) + slack(r)))


# ------------------------------------------------------------------ per primitive

def _size(shape, dims) -> int:
  return int(np.prod([shape[d] for d in dims])) if dims else 1


def _shape(v) -> tuple:
  return tuple(getattr(getattr(v, "aval", v), "shape", np.shape(v)))


def terms(eqn: interpreter.Equation, operand: int, transpose: bool = False) -> int:
  """How many terms one computed element of ``eqn`` sums (forward: the output; with
  ``transpose``: its transpose with respect to input-dependent operand ``operand``, the
  backward pass's step), by the table's ``rounding`` classes: 0 exact, 1 or 2 roundings
  per element, or the contraction length of a sum.

  Raises:
    UnsupportedPrimitiveError: a primitive the table does not analyse (no ``rounding``),
      or a cast that loses precision.
  """
  name = eqn.primitive.name
  rule = primitives.rule(name)
  cls = None if rule is None or rule.rounding is None else rule.rounding[int(transpose)]
  if cls is None:
    raise UnsupportedPrimitiveError(name, DOMAIN_NAME, "its rounding is not analysed")
  if cls in (primitives.ROUND_EXACT, primitives.ROUND_ONE, primitives.ROUND_TWO):
    return {primitives.ROUND_EXACT: 0, primitives.ROUND_ONE: 1, primitives.ROUND_TWO: 2}[cls]
  if cls == primitives.ROUND_CAST:
    return _cast_terms(eqn)
  # ROUND_SUM: the contraction length, per primitive.
  p = eqn.params
  ins = [_shape(v) for v in eqn.invars]
  out = _shape(eqn.outvars[0])
  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    if not transpose:
      return _size(ins[0], lc)
    other = 1 - operand
    contract, batch = (rc, rb) if other == 1 else (lc, lb)
    free = [d for d in range(len(ins[other])) if d not in contract and d not in batch]
    return _size(ins[other], free)
  if name == "conv_general_dilated":
    rhs_spec = p["dimension_numbers"].rhs_spec
    kernel = ins[1]
    spatial = _size(kernel, rhs_spec[2:])
    if not transpose:
      return spatial * kernel[rhs_spec[1]]
    if operand == 0:
      return spatial * kernel[rhs_spec[0]]
    return int(np.prod(out))  # the kernel depends on the input: every output
  if name == "reduce_sum":
    return 0 if transpose else _size(ins[0], p["axes"])
  if name == "broadcast_in_dim":
    return int(np.prod(out)) // max(1, int(np.prod(ins[0]))) if transpose else 0
  if name == "cumsum":
    return ins[0][p["axis"]]
  if name == "reduce_window_sum":
    return int(np.prod(p["window_dimensions"]))
  raise UnsupportedPrimitiveError(name, DOMAIN_NAME, "no contraction length")  # pragma: no cover


def _cast_terms(eqn) -> int:
  """0 for a cast that keeps every value (same or wider float); raises otherwise."""
  name = eqn.primitive.name
  src = jnp.dtype(eqn.invars[0].aval.dtype)
  dst = jnp.dtype(eqn.outvars[0].aval.dtype)
  if name == "reduce_precision":
    ok = (jnp.issubdtype(src, jnp.floating)
          and eqn.params["mantissa_bits"] >= jnp.finfo(src).nmant
          and eqn.params["exponent_bits"] >= jnp.finfo(src).nexp)
  else:
    ok = (jnp.issubdtype(src, jnp.floating) and jnp.issubdtype(dst, jnp.floating)
          and jnp.finfo(dst).nmant >= jnp.finfo(src).nmant
          and jnp.finfo(dst).nexp >= jnp.finfo(src).nexp)
  if not ok:
    raise UnsupportedPrimitiveError(name, DOMAIN_NAME,
                                    f"a cast from {src.name} to {dst.name} loses precision")
  return 0


def check_no_subnormals(*trees: Any) -> None:
  """ValueError if a concrete floating leaf of the pytrees holds a subnormal number
  (non-zero, below the smallest normal): XLA:CPU reads those as zero, which the error
  model does not cover. Traced leaves are skipped."""
  for tree in trees:
    for leaf in jax.tree_util.tree_leaves(tree):
      if isinstance(leaf, jax.core.Tracer):
        continue
      a = np.asarray(leaf)
      if not np.issubdtype(a.dtype, np.floating) or not a.size:
        continue
      tiny = np.finfo(a.dtype).tiny
      if np.any((a != 0) & (np.abs(a) < tiny)):
        raise ValueError(f"sound=True: an array of shape {a.shape} holds subnormal "
                         f"numbers (0 < |v| < {tiny}); XLA flushes them to zero, which "
                         "the rounding analysis does not cover. Flush them to 0 first.")


# ------------------------------------------------------------- float64 evaluation

def float64(tree: Any) -> Any:
  """The pytree with every floating array leaf converted to float64 (exact from float32
  or float16); other leaves unchanged. Call inside ``jax.enable_x64(True)``."""
  def cast(a):
    if isinstance(a, (jax.Array, np.ndarray, np.generic)) and jnp.issubdtype(
        a.dtype, jnp.floating):
      return jnp.asarray(a, jnp.float64)
    return a
  return jax.tree_util.tree_map(cast, tree)


def check_x64_trace(x: jax.Array) -> None:
  """ValueError when ``x`` is traced (under ``jax.jit`` and the like) while 64-bit mode
  is off: the sound mode computes in float64 inside ``jax.enable_x64(True)``, but a
  jitted function is lowered after its tracing returns, outside that context, where
  some lowerings (argmax in max pooling) build float32 constants. Trace and call the
  jitted function inside ``jax.enable_x64(True)`` (``certify`` does)."""
  if isinstance(x, jax.core.Tracer) and not jax.config.jax_enable_x64:
    raise ValueError("sound=True under jax.jit (or another transformation) needs 64-bit "
                     "mode while the function is traced and lowered: call the jitted "
                     "function inside `with jax.enable_x64(True):` (the inputs can stay "
                     "float32).")


def down_to(t: jax.Array, dtype: DTypeLike) -> jax.Array:
  """The largest ``dtype`` number <= ``t`` (element-wise; ``t`` float64): the conversion
  rounds to nearest, and a result above ``t`` steps one ulp down (so a bound stays
  sound and keeps its sign: ``t <= 0`` gives a result <= 0)."""
  out = t.astype(dtype)
  return jnp.where(out.astype(t.dtype) > t, jnp.nextafter(out, jnp.asarray(-jnp.inf, dtype)),
                   out)


def up_to(t: jax.Array, dtype: DTypeLike) -> jax.Array:
  """The mirror of :func:`down_to`: the smallest ``dtype`` number >= ``t``."""
  return -down_to(-t, dtype)
