"""The paper's unified framework as a tool (Section 3.1, Appendices E and F).

Training with a regularizer is minimising ``L + lam R``, ``L`` the clean loss. Near a
minimum ``theta`` of ``L``, with ``H`` the Hessian of ``L`` there:

* Proposition 1: the minimum of ``L + lam R`` is ``theta - lam H^-1 grad R`` + O(lam^2)
  (:func:`predicted_shift`);
* Proposition 2: minimising ``L + lam R1`` lowers ``L + lam R2`` below its value at
  ``theta`` (for small lam) iff ``||grad R1 - grad R2||_{H^-1} < ||grad R2||_{H^-1}``,
  ``||g||_{H^-1} = sqrt(g^T H^-1 g)`` (:func:`regularizer_distance`). Precisely,
  ``D(lam) = [L + lam R2](theta) - [L + lam R2](theta*(lam))`` has ``D(0) = D'(0) = 0``
  and ``D''(0) = ||grad R2||^2 - ||grad R1 - grad R2||^2`` (H^-1 norms), so among
  candidate regularizers the one whose gradient is closest to a target's ``grad R_J``
  in the H^-1 norm is best for small lam (:func:`rank_regularizers`).

No Hessian is ever formed: ``H v`` is a Hessian-vector product over data batches
(:func:`hvp`), ``H^-1 g`` a conjugate-gradient solve on the flattened pytree
(:func:`inverse_norm`, :func:`conjugate_gradient`); :func:`top_eigenvalue` (power
iteration) bounds the conditioning that CG faces.

Conventions:

* A loss or regularizer is ``fn(params, batch) -> scalar``, a mean over the batch's
  examples; ``batch`` is any pytree of arrays, ``(x, y)`` for the classification helpers.
* ``batches`` is that pytree with a leading axis of ``num_batches`` (:func:`stack_batches`).
  Every function averages over it with a ``lax.scan`` (memory of one batch) or, with
  ``unroll=True``, a loop in the trace; with equal batch sizes the average is the mean
  over all examples.
* ``H`` is the Hessian of ``mean_b loss_fn(params, b)``, or with ``gauss_newton=True`` its
  generalised Gauss-Newton matrix ``J^T H_out J`` (``J`` the Jacobian of the model's
  outputs, ``H_out`` the Hessian of the loss in the outputs: positive semi-definite for a
  loss convex in the outputs such as softmax cross-entropy). A network trained for finite
  time is not at a minimum and its Hessian is in general indefinite there, so CG on it
  may break down (reported); the Gauss-Newton matrix plus ``damping * I`` is positive
  definite. ``damping`` is added in either case: ``H + damping I``.
* Hessian-vector products are reverse-over-reverse, ``grad_theta <grad L(theta), v>``,
  and ``J v = grad_u <J^T u, v>``: the models' convolutions are ``custom_vjp`` functions
  (:mod:`dm_jax.core.conv`), which forward mode (``jax.jvp`` of ``jax.grad``) cannot
  differentiate.
* CG is this module's own loop (``lax.while_loop``) rather than
  ``jax.scipy.sparse.linalg.cg``, which reports neither the iterations, the residual nor
  a breakdown; the tests check both give the same solution. The squared norm is
  reported as ``2 g^T x - x^T H x`` for the CG solution ``x``: for a positive definite
  ``H`` it equals ``g^T H^-1 g - ||x - H^-1 g||_H^2``, a lower bound with an error
  quadratic in the solution's error (also when CG stopped early).
* Loops. XLA:CPU runs convolution gradients inside a ``lax.scan``/``while_loop`` body
  10-25x slower than the same ops outside a loop (measured with jaxlib 0.10.2 on the
  small CNN: a batch's CE gradient 0.07 s, in a one-trip loop 1.3 s; forward
  convolutions are unaffected). So for a CNN on CPU: ``unroll=True`` over a few large
  batches (each batch traced once, no loop) and ``host_loop=True`` (CG's iterations in
  Python, each one call of a compiled Hessian-vector product). Both default off: the
  loops are what keeps everything jit-able and memory flat.

The candidate regularizers come from the training-method registry
(:func:`method_regularizer`): every registered loss is ``CE + w R`` with its weight ``w``
either ``hyper.lam`` or ``1 - hyper.kappa`` (:func:`dm_jax.train.methods.kappa_form`),
so ``R = loss(w = 1) - loss(w = 0)`` and a new method is analysable without new code.

Everything here is pure and jit-able except :func:`rank_regularizers`, a driver that
compiles one solve and returns Python numbers, and the ``host_loop=True`` paths.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from dm_jax.train import methods as methods_lib
from dm_jax.train.methods.penalties import l1_penalty, l2_penalty

Params = Any
Batch = Any
LossFn = Callable[[Params, Batch], jax.Array]
Operator = Callable[[Params], Params]

# The regularizers of the paper's Table 1 that the registry has (Sections 3.1-3.2).
PAPER_REGULARIZERS = ("dm", "dm_s_only", "ibp", "crown_ibp", "relu_stability", "l1", "l2")
DEFAULT_TOL = 1e-4      # relative residual ||g - H x|| / ||g|| (float32 arithmetic)
DEFAULT_MAXITER = 100
_PENALTIES = {"l1": l1_penalty, "l2": l2_penalty}


# ----------------------------------------------------------------------------- losses

@dataclasses.dataclass(frozen=True)
class SplitLoss:
  """A loss written as ``output_loss(predict(params, batch), batch)`` (for Gauss-Newton).

  Attributes:
    predict: ``(params, batch) -> outputs`` (a pytree, e.g. (B, K) logits).
    output_loss: ``(outputs, batch) -> scalar``; the Gauss-Newton matrix is positive
      semi-definite when it is convex in ``outputs``.

  Calling it, ``loss(params, batch)``, gives the composed loss.
  """
  predict: Callable[[Params, Batch], Any]
  output_loss: Callable[[Any, Batch], jax.Array]

  def __call__(self, params: Params, batch: Batch) -> jax.Array:
    return self.output_loss(self.predict(params, batch), batch)


def classification_loss(apply_fn: Callable[[Params, jax.Array], jax.Array]) -> SplitLoss:
  """The clean loss L: mean softmax cross-entropy of ``apply_fn(params, x)`` (B, K) with
  the (B,) integer labels ``y`` of a batch ``(x, y)``."""
  def predict(params, batch):
    return apply_fn(params, batch[0])

  def output_loss(logits, batch):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))

  return SplitLoss(predict, output_loss)


# ----------------------------------------------------------------------------- batches

def stack_batches(data: Any, batch_size: int) -> Any:
  """Splits a pytree of (N, ...) arrays into ``N // batch_size`` batches.

  Args:
    data: pytree of arrays sharing the leading axis N, e.g. ``(x, y)``.
    batch_size: examples per batch; the last ``N % batch_size`` examples are dropped.

  Returns:
    The pytree with leaves (N // batch_size, batch_size, ...) (numpy in, numpy out).

  Raises:
    ValueError: leaves with different N, no leaves, or batch_size not in [1, N].
  """
  n = _leading_size(data, "data")
  if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or not (
      1 <= batch_size <= n):
    raise ValueError(f"batch_size must be an integer in [1, {n}] (the number of "
                     f"examples); got {batch_size!r}.")
  count = n // batch_size
  return jax.tree_util.tree_map(
      lambda a: a[:count * batch_size].reshape((count, batch_size) + a.shape[1:]), data)


def num_batches(batches: Any) -> int:
  """The leading (batch) axis shared by every leaf of ``batches``.

  Raises:
    ValueError: no leaves, a scalar leaf, leaves with different leading sizes, or 0.
  """
  return _leading_size(batches, "batches")


def _leading_size(tree: Any, what: str) -> int:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError(f"{what} has no arrays.")
  sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
  if None in sizes:
    raise ValueError(f"every leaf of {what} needs a leading axis; got a scalar leaf.")
  if len(sizes) != 1:
    raise ValueError(f"the leaves of {what} must share their leading axis; got sizes "
                     f"{sorted(sizes)}.")
  size = sizes.pop()
  if size == 0:
    raise ValueError(f"{what} is empty (leading axis 0).")
  return int(size)


def batch_mean(fn: Callable[[Batch], Any], batches: Any, *,
               unroll: Union[bool, int] = 1) -> Any:
  """``mean_b fn(b)`` over the leading axis of ``batches`` (a ``lax.scan``).

  Args:
    fn: ``batch -> pytree`` of floating arrays.
    batches: pytree with leaves (num_batches, ...).
    unroll: ``lax.scan``'s ``unroll``; True traces ``fn`` once per batch (no loop: see
      the module docstring on convolution gradients in XLA:CPU loops).

  Returns:
    The mean of ``fn``'s outputs, a pytree like one output.
  """
  count = num_batches(batches)
  first = jax.tree_util.tree_map(lambda a: a[0], batches)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(fn, first))

  def body(total, batch):
    return jax.tree_util.tree_map(jnp.add, total, fn(batch)), None

  if unroll is True:  # a Python loop: lax.scan(unroll=True) of length 1 keeps a loop
    total = zeros
    for i in range(count):
      total, _ = body(total, jax.tree_util.tree_map(lambda a: a[i], batches))
  else:
    total, _ = lax.scan(body, zeros, batches, unroll=unroll)
  return jax.tree_util.tree_map(lambda t: t / count, total)


def batch_value_and_grad(fn: LossFn, params: Params, batches: Any, *,
                         unroll: Union[bool, int] = 1) -> Tuple[jax.Array, Params]:
  """``(mean_b fn(params, b), its gradient in params)`` over ``batches``."""
  return batch_mean(lambda b: jax.value_and_grad(fn)(params, b), batches, unroll=unroll)


def batch_gradient(fn: LossFn, params: Params, batches: Any, *,
                   unroll: Union[bool, int] = 1) -> Params:
  """The gradient in ``params`` of ``mean_b fn(params, b)``: a pytree like ``params``."""
  return batch_mean(lambda b: jax.grad(fn)(params, b), batches, unroll=unroll)


# ----------------------------------------------------------------------------- H v

def hvp(loss_fn: Union[LossFn, SplitLoss], params: Params, batches: Any, *,
        gauss_newton: bool = False, damping: Union[float, jax.Array] = 0.0,
        unroll: Union[bool, int] = 1) -> Operator:
  """The Hessian-vector product ``v -> (H + damping I) v`` of the batch-averaged loss.

  ``H`` is the Hessian in ``params`` of ``mean_b loss_fn(params, b)`` at ``params`` (or,
  with ``gauss_newton``, the generalised Gauss-Newton matrix ``mean_b J_b^T H_out,b J_b``).
  Each product costs about two backward passes per batch (four with Gauss-Newton, a
  forward pass less than the exact one here); nothing of size ``|params|^2`` is formed.

  Args:
    loss_fn: ``(params, batch) -> scalar``; a :class:`SplitLoss` (e.g.
      :func:`classification_loss`) for ``gauss_newton``.
    params: the point (a pytree of floating arrays).
    batches: pytree with leaves (num_batches, ...) (:func:`stack_batches`).
    gauss_newton: use ``J^T H_out J`` (positive semi-definite for a convex output loss).
    damping: ``delta >= 0`` of ``H + delta I``.
    unroll: the loop over batches (:func:`batch_mean`).

  Returns:
    ``product(v)``: ``v`` a pytree like ``params``, the result likewise. Pure and
    jit-able (the batches and params are closed over).

  Raises:
    ValueError: negative damping, ``gauss_newton`` without a :class:`SplitLoss`, bad
      ``batches``; ``product`` raises for a ``v`` not shaped like ``params``.
  """
  _check_damping(damping)
  num_batches(batches)
  _check_gauss_newton(loss_fn, gauss_newton)

  def one_batch(batch, v):
    if not gauss_newton:
      return jax.grad(lambda p: _vdot(jax.grad(loss_fn)(p, batch), v))(params)
    outputs, pullback = jax.vjp(lambda p: loss_fn.predict(p, batch), params)
    jv = jax.grad(lambda u: _vdot(pullback(u)[0], v))(
        jax.tree_util.tree_map(jnp.zeros_like, outputs))
    h_jv = jax.grad(lambda o: _vdot(jax.grad(loss_fn.output_loss)(o, batch), jv))(outputs)
    return pullback(h_jv)[0]

  def product(v: Params) -> Params:
    _check_like(v, params, "the vector")
    hv = batch_mean(lambda b: one_batch(b, v), batches, unroll=unroll)
    return jax.tree_util.tree_map(lambda h, t: h + damping * t, hv, v)

  return product


# ----------------------------------------------------------------------------- CG

class CGInfo(NamedTuple):
  """Diagnostics of a conjugate-gradient solve of ``A x = b``.

  Attributes:
    iterations: () int32, matrix-vector products in the loop.
    residual: () the true relative residual ``||b - A x|| / ||b||`` (recomputed with one
      more product; 0 for b = 0).
    converged: () bool, ``residual <= tol`` and no negative curvature.
    negative_curvature: () bool, a direction with ``p^T A p <= 0`` (or NaN) was met: A is
      not positive definite and the loop stopped there.
  """
  iterations: jax.Array
  residual: jax.Array
  converged: jax.Array
  negative_curvature: jax.Array


def conjugate_gradient(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *,
                       tol: float = DEFAULT_TOL, maxiter: int = DEFAULT_MAXITER,
                       host_loop: bool = False) -> Tuple[jax.Array, CGInfo]:
  """Solves ``A x = b`` by conjugate gradients from ``x = 0`` (``A`` symmetric PD).

  Stops when the recursive residual is ``<= tol ||b||``, after ``maxiter`` products, or
  at a direction of non-positive curvature (then ``x`` is the last iterate before it).

  Args:
    matvec: ``v -> A v`` on (n,) vectors.
    b: (n,) right-hand side.
    tol: relative residual tolerance, > 0.
    maxiter: most products in the loop, >= 1.
    host_loop: iterate in Python (one ``matvec`` call per iteration; give a jitted one)
      instead of a ``lax.while_loop``: the same arithmetic, not jit-able, for operators
      that XLA:CPU runs slowly inside loops (convolution gradients).

  Returns:
    ``(x, info)``: x (n,), and :class:`CGInfo`.
  """
  x, info, _ = _cg(matvec, b, tol, maxiter, host_loop)
  return x, info


def _cg_step(state, ap):
  """One CG iteration given ``ap = A p``: the new ``(k, x, r, p, rr, bad)``."""
  k, x, r, p, rr, _ = state
  pap = jnp.vdot(p, ap)
  bad = ~(pap > 0)
  alpha = jnp.where(bad, 0.0, rr / jnp.where(bad, 1.0, pap))
  x = x + alpha * p
  r = r - alpha * ap
  rr_new = jnp.vdot(r, r)
  p = r + (rr_new / jnp.where(rr > 0, rr, 1.0)) * p
  return k + 1, x, r, p, rr_new, bad


_cg_step_jit = jax.jit(_cg_step)


def _cg(matvec, b, tol, maxiter, host_loop=False):
  """:func:`conjugate_gradient`, also returning ``A x`` (one more product)."""
  if not (isinstance(tol, (numbers.Real, np.floating)) and tol > 0 and math.isfinite(tol)):
    raise ValueError(f"tol must be a finite number > 0; got {tol!r}.")
  if isinstance(maxiter, bool) or not isinstance(maxiter, numbers.Integral) or maxiter < 1:
    raise ValueError(f"maxiter must be an integer >= 1; got {maxiter!r}.")
  b = jnp.asarray(b)
  if b.ndim != 1:
    raise ValueError(f"b must be a vector (n,); got shape {b.shape}.")
  b_norm = jnp.linalg.norm(b)
  threshold_sq = jnp.square(tol * b_norm)
  state = (jnp.zeros((), jnp.int32), jnp.zeros_like(b), b, b, jnp.vdot(b, b),
           jnp.zeros((), bool))

  def cond(state):
    k, _, _, _, rr, bad = state
    return (k < maxiter) & (rr > threshold_sq) & ~bad

  if host_loop:
    while bool(cond(state)):
      state = _cg_step_jit(state, matvec(state[3]))
  else:
    state = lax.while_loop(cond, lambda s: _cg_step(s, matvec(s[3])), state)
  k, x, _, _, _, bad = state
  ax = matvec(x)
  residual = jnp.linalg.norm(b - ax) / jnp.where(b_norm > 0, b_norm, 1.0)
  return x, CGInfo(k, residual, (residual <= tol) & ~bad, bad), ax


class InverseNorm(NamedTuple):
  """``||g||_{A^-1} = sqrt(g^T A^-1 g)`` by CG.

  Attributes:
    norm: () the norm, ``sqrt(max(squared, 0))``; NaN after negative curvature.
    squared: () ``2 g^T x - x^T A x`` for the CG solution x (a lower bound of
      ``g^T A^-1 g`` for PD A, exact up to ``||x - A^-1 g||_A^2``).
    solution: x ~ ``A^-1 g``, a pytree like ``g``.
    info: the :class:`CGInfo`.
  """
  norm: jax.Array
  squared: jax.Array
  solution: Params
  info: CGInfo


def inverse_norm(g: Params, operator: Operator, *, tol: float = DEFAULT_TOL,
                 maxiter: int = DEFAULT_MAXITER, host_loop: bool = False) -> InverseNorm:
  """``||g||_{A^-1}`` for a symmetric positive definite linear ``operator`` ``v -> A v``
  on pytrees like ``g``, by CG on the flattened pytree (``ravel_pytree``).

  ``host_loop``: iterate in Python, calling ``operator`` (give a jitted one) once per
  iteration (see :func:`conjugate_gradient`).
  """
  flat, unravel = ravel_pytree(g)
  matvec = lambda v: ravel_pytree(operator(unravel(v)))[0]
  return _inverse_norm_flat(flat, matvec, unravel, tol, maxiter, host_loop)


def _inverse_norm_flat(flat, matvec, unravel, tol, maxiter, host_loop):
  x, info, ax = _cg(matvec, flat, tol, maxiter, host_loop)
  squared = 2 * jnp.vdot(flat, x) - jnp.vdot(x, ax)
  norm = jnp.where(info.negative_curvature, jnp.nan, jnp.sqrt(jnp.maximum(squared, 0.0)))
  return InverseNorm(norm, squared, unravel(x), info)


@functools.lru_cache(maxsize=32)
def _compiled_flat_hvp(loss_fn, gauss_newton: bool, unroll):
  """jit ``(params, batches, damping, v) -> (H + damping I) v`` on flat vectors (one
  compile per loss and shapes, reused by every host-loop solve)."""
  def product(params, batches, damping, v):
    unravel = ravel_pytree(params)[1]
    op = hvp(loss_fn, params, batches, gauss_newton=gauss_newton, damping=damping,
             unroll=unroll)
    return ravel_pytree(op(unravel(v)))[0]
  return jax.jit(product)


def _hessian_inverse_norm(g, loss_fn, params, batches, gauss_newton, damping, unroll,
                          tol, maxiter, host_loop):
  """:func:`inverse_hessian_norm` without the argument checks."""
  if not host_loop:
    return inverse_norm(g, hvp(loss_fn, params, batches, gauss_newton=gauss_newton,
                               damping=damping, unroll=unroll), tol=tol, maxiter=maxiter)
  flat, unravel = ravel_pytree(g)
  product = _compiled_flat_hvp(loss_fn, gauss_newton, unroll)
  damping = jnp.asarray(damping, flat.dtype)
  return _inverse_norm_flat(flat, lambda v: product(params, batches, damping, v), unravel,
                            tol, maxiter, True)


def top_eigenvalue(operator: Operator, like: Params, key: jax.Array, *, iters: int = 20,
                   host_loop: bool = False) -> jax.Array:
  """The largest eigenvalue of a symmetric positive semi-definite ``operator`` by power
  iteration (``iters`` products from a random start): a lower bound converging to it.

  With :func:`hvp` it bounds CG's condition number, ``(lambda_max + delta) / delta`` for
  ``H + delta I`` with H positive semi-definite (Gauss-Newton), and so the iterations CG
  needs (about its square root, times log(1 / tol)).

  Args:
    operator: ``v -> A v`` on pytrees like ``like``.
    like: a pytree giving the shapes (e.g. params).
    key: PRNG key of the start vector.
    iters: products, >= 1.
    host_loop: iterate in Python, calling ``operator`` (give a jitted one) once per
      iteration (see :func:`conjugate_gradient`).

  Returns:
    () the Rayleigh quotient ``v^T A v`` of the last unit iterate.
  """
  if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
    raise ValueError(f"iters must be an integer >= 1; got {iters!r}.")
  flat, unravel = ravel_pytree(like)
  matvec = lambda v: ravel_pytree(operator(unravel(v)))[0]
  v = jax.random.normal(key, flat.shape, flat.dtype)
  v = v / jnp.linalg.norm(v)

  def step(_, state):
    v, _ = state
    av = matvec(v)
    return av / jnp.maximum(jnp.linalg.norm(av), jnp.finfo(av.dtype).tiny), jnp.vdot(v, av)

  state = (v, jnp.zeros((), flat.dtype))
  if host_loop:
    for i in range(iters):
      state = step(i, state)
  else:
    state = lax.fori_loop(0, iters, step, state)
  return state[1]


def inverse_hessian_norm(g: Params, loss_fn: Union[LossFn, SplitLoss], params: Params,
                         batches: Any, *, gauss_newton: bool = False,
                         damping: Union[float, jax.Array] = 0.0,
                         unroll: Union[bool, int] = 1, tol: float = DEFAULT_TOL,
                         maxiter: int = DEFAULT_MAXITER,
                         host_loop: bool = False) -> InverseNorm:
  """``||g||_{H^-1} = sqrt(g^T (H + damping I)^-1 g)``, H of :func:`hvp`, by CG.

  Args:
    g: a pytree like ``params`` (e.g. a regularizer's gradient).
    loss_fn, params, batches, gauss_newton, damping, unroll: the Hessian (:func:`hvp`).
    tol, maxiter: CG's relative residual tolerance and most iterations.
    host_loop: CG's iterations in Python, each a call of one compiled (cached) HVP; not
      jit-able (:func:`conjugate_gradient`).

  Returns:
    :class:`InverseNorm`: the norm, its square, ``H^-1 g`` and the CG diagnostics
    (iterations, residual, converged, negative curvature).

  Raises:
    ValueError: ``g`` not shaped like ``params``, or a bad option (see :func:`hvp`).
  """
  _check_like(g, params, "g")
  _check_damping(damping)
  num_batches(batches)
  _check_gauss_newton(loss_fn, gauss_newton)
  return _hessian_inverse_norm(g, loss_fn, params, batches, gauss_newton, damping, unroll,
                               tol, maxiter, host_loop)


# ----------------------------------------------------------------------------- Props 1-2

Gradient = Union[Params, LossFn]


def _gradient(r: Gradient, params: Params, batches: Any, what: str, unroll) -> Params:
  """``r``'s batch-averaged gradient if ``r`` is a function, else ``r`` (a gradient)."""
  if callable(r):
    return batch_gradient(r, params, batches, unroll=unroll)
  _check_like(r, params, what)
  return r


class Shift(NamedTuple):
  """Proposition 1's predicted move of the minimum, ``-lam H^-1 grad R``.

  Attributes:
    shift: a pytree like params.
    info: the :class:`CGInfo` of the solve.
  """
  shift: Params
  info: CGInfo


def predicted_shift(params: Params, loss_fn: Union[LossFn, SplitLoss], R: Gradient,
                    lam: Union[float, jax.Array], batches: Any, *,
                    reg_batches: Any = None, gauss_newton: bool = False,
                    damping: Union[float, jax.Array] = 0.0, unroll: Union[bool, int] = 1,
                    tol: float = DEFAULT_TOL, maxiter: int = DEFAULT_MAXITER,
                    host_loop: bool = False) -> Shift:
  """Proposition 1: the minimum of ``L + lam R`` is ``params + shift`` + O(lam^2).

  Args:
    params: a minimum of L (the loss averaged over ``batches``).
    loss_fn: the clean loss ``(params, batch) -> scalar``.
    R: the regularizer ``(params, batch) -> scalar`` (e.g. a :class:`Regularizer`), or
      its gradient at ``params`` (a pytree like params).
    lam: the regularizer weight.
    batches: the data of L (and of R unless ``reg_batches``).
    reg_batches: the data of R (default ``batches``).
    gauss_newton, damping, unroll: the Hessian (:func:`hvp`).
    tol, maxiter, host_loop: the CG solve (:func:`inverse_hessian_norm`).

  Returns:
    :class:`Shift`: ``-lam H^-1 grad R`` and the CG diagnostics.
  """
  _check_finite(lam, "lam")
  grad = _gradient(R, params, batches if reg_batches is None else reg_batches, "R", unroll)
  solved = inverse_hessian_norm(grad, loss_fn, params, batches, gauss_newton=gauss_newton,
                                damping=damping, unroll=unroll, tol=tol, maxiter=maxiter,
                                host_loop=host_loop)
  return Shift(jax.tree_util.tree_map(lambda u: -lam * u, solved.solution), solved.info)


class Proposition2(NamedTuple):
  """Both sides of Proposition 2 and its verdict.

  Attributes:
    distance: () ``||grad R1 - grad R2||_{H^-1}``.
    reference: () ``||grad R2||_{H^-1}``.
    verdict: () bool, ``distance < reference``: for small lam the minimum of
      ``L + lam R1`` has a lower ``L + lam R2`` than ``params`` has.
    second_derivative: () ``reference^2 - distance^2 = D''(0)``, so the gain is
      ``D(lam) ~ lam^2 / 2 * second_derivative``.
    distance_info, reference_info: the two solves' :class:`CGInfo`.
  """
  distance: jax.Array
  reference: jax.Array
  verdict: jax.Array
  second_derivative: jax.Array
  distance_info: CGInfo
  reference_info: CGInfo


def regularizer_distance(params: Params, loss_fn: Union[LossFn, SplitLoss], R1: Gradient,
                         R2: Gradient, batches: Any, *, r1_batches: Any = None,
                         r2_batches: Any = None, gauss_newton: bool = False,
                         damping: Union[float, jax.Array] = 0.0,
                         unroll: Union[bool, int] = 1, tol: float = DEFAULT_TOL,
                         maxiter: int = DEFAULT_MAXITER,
                         host_loop: bool = False) -> Proposition2:
  """Proposition 2: does minimising ``L + lam R1`` improve the objective ``L + lam R2``?

  Args:
    params: a minimum of L (averaged over ``batches``).
    loss_fn: the clean loss ``(params, batch) -> scalar``.
    R1: the regularizer trained with, a function ``(params, batch) -> scalar`` or its
      gradient at ``params``.
    R2: the target regularizer (same forms), e.g. the robust loss on held-out data.
    batches: the data of L (and of R1/R2 unless given).
    r1_batches, r2_batches: the data of R1 and R2 (default ``batches``).
    gauss_newton, damping, unroll: the Hessian (:func:`hvp`).
    tol, maxiter, host_loop: the two CG solves (:func:`inverse_hessian_norm`).

  Returns:
    :class:`Proposition2`: both sides (solved directly, each a CG lower bound), the
    verdict and ``D''(0)``.
  """
  g1 = _gradient(R1, params, batches if r1_batches is None else r1_batches, "R1", unroll)
  g2 = _gradient(R2, params, batches if r2_batches is None else r2_batches, "R2", unroll)
  kw = dict(gauss_newton=gauss_newton, damping=damping, unroll=unroll, tol=tol,
            maxiter=maxiter, host_loop=host_loop)
  diff = inverse_hessian_norm(jax.tree_util.tree_map(jnp.subtract, g1, g2), loss_fn,
                              params, batches, **kw)
  ref = inverse_hessian_norm(g2, loss_fn, params, batches, **kw)
  return Proposition2(diff.norm, ref.norm, diff.norm < ref.norm,
                      ref.squared - diff.squared, diff.info, ref.info)


def rank_regularizers(params: Params, loss_fn: Union[LossFn, SplitLoss], batches: Any,
                      candidates: Mapping[str, Params], target: Params, *,
                      gauss_newton: bool = False, damping: float = 0.0,
                      unroll: Union[bool, int] = 1, tol: float = DEFAULT_TOL,
                      maxiter: int = DEFAULT_MAXITER, host_loop: bool = False
                      ) -> Dict[str, Any]:
  """Ranks candidate regularizers by ``||grad R_i - grad R_J||_{H^-1}`` (Proposition 2).

  One CG solve (compiled once) is run for ``grad R_J`` and for each
  ``grad R_i - grad R_J``. From the target's solution ``u = H^-1 grad R_J`` it also
  derives, without more solves, the H^-1 inner product ``c_i = grad R_i^T u``, the H^-1
  cosine between the gradients, the weight ratio ``s_i = c_i / ||grad R_i||^2`` that
  brings ``s grad R_i`` closest to ``grad R_J``, and that closest distance (scale-free:
  Proposition 2 itself compares regularizers at the same lam, so at the scale they are
  given in). ``||grad R_i||^2`` is ``||grad R_i - grad R_J||^2 - ||grad R_J||^2 + 2 c_i``,
  so these derived columns lose accuracy when the terms cancel.

  Args:
    params, loss_fn, batches: the point and the clean loss whose Hessian is used.
    candidates: name -> ``grad R_i`` at params (pytrees like params).
    target: ``grad R_J`` at params.
    gauss_newton, damping, unroll: the Hessian (:func:`hvp`).
    tol, maxiter, host_loop: the solves (:func:`inverse_hessian_norm`).

  Returns:
    A dict with ``target`` (``norm``, ``squared``, ``euclidean`` and the CG diagnostics
    of ``||grad R_J||_{H^-1}``) and ``rows``: one dict per candidate, sorted by
    ``distance`` (NaN last), with ``name``, ``rank`` (1 = closest), ``distance``,
    ``squared``, ``verdict`` (``distance < ||grad R_J||_{H^-1}``),
    ``second_derivative``, ``euclidean`` (the plain ``||grad R_i - grad R_J||_2``, for
    comparison), ``cosine``, ``best_scale``, ``scaled_distance`` and the CG diagnostics
    ``iterations``, ``residual``, ``converged``, ``negative_curvature``.
  """
  if not candidates:
    raise ValueError("candidates is empty: give at least one regularizer gradient.")
  _check_like(target, params, "target")
  for name, g in candidates.items():
    _check_like(g, params, f"candidate {name!r}")
  _check_damping(damping)
  num_batches(batches)
  _check_gauss_newton(loss_fn, gauss_newton)
  args = (loss_fn, params, batches, gauss_newton, damping, unroll, tol, maxiter)
  if host_loop:
    solve = lambda g: _hessian_inverse_norm(g, *args, True)
  else:
    compiled = jax.jit(lambda p, b, d, g: _hessian_inverse_norm(
        g, loss_fn, p, b, gauss_newton, d, unroll, tol, maxiter, False))
    solve = lambda g: compiled(params, batches, damping, g)
  flat_target = ravel_pytree(target)[0]
  ref = solve(target)
  ref_sq = float(ref.squared)
  u = ravel_pytree(ref.solution)[0]
  rows = []
  for name, g in candidates.items():
    flat = ravel_pytree(g)[0]
    res = solve(jax.tree_util.tree_map(jnp.subtract, g, target))
    d_sq = float(res.squared)
    cross = float(jnp.vdot(flat, u))
    g_sq = d_sq - ref_sq + 2 * cross
    scale = cross / g_sq if g_sq > 0 else float("nan")
    cosine = (cross / math.sqrt(g_sq * ref_sq) if g_sq > 0 and ref_sq > 0
              else float("nan"))
    rows.append(dict(
        name=name, distance=float(res.norm), squared=d_sq,
        verdict=bool(res.norm < ref.norm), second_derivative=ref_sq - d_sq,
        euclidean=float(jnp.linalg.norm(flat - flat_target)),
        cosine=cosine, best_scale=scale,
        scaled_distance=(math.sqrt(max(ref_sq - cross * scale, 0.0)) if g_sq > 0
                         else float("nan")),
        **_info_dict(res.info)))
  rows.sort(key=lambda r: (math.isnan(r["distance"]), r["distance"]))
  for i, r in enumerate(rows):
    r["rank"] = i + 1
  target_row = dict(norm=float(ref.norm), squared=ref_sq,
                    euclidean=float(jnp.linalg.norm(flat_target)), **_info_dict(ref.info))
  return dict(target=target_row, rows=rows)


def _info_dict(info: CGInfo) -> Dict[str, Any]:
  return dict(iterations=int(info.iterations), residual=float(info.residual),
              converged=bool(info.converged),
              negative_curvature=bool(info.negative_curvature))


# ----------------------------------------------------------------------------- registry

@dataclasses.dataclass(frozen=True)
class Regularizer:
  """A registered training method's regularizer R, a function of params over a batch.

  Attributes:
    name: the method's name as given (an alias stays an alias).
    fn: ``(params, (x, y)) -> R``, a scalar (mean over the batch).
    objective: ``(params, (x, y), w) -> `` the method's objective at regularizer weight
      ``w`` (``CE + w R`` up to terms constant in w): ``fn = objective(1) -
      objective(0)``, and :func:`regularizer_check` measures that it is affine in w.
    weight: which hyper-parameter ``w`` is: ``"lam"`` or ``"1 - kappa"``.
    penalties: the weight penalties the method is (``("l1",)`` for ``l1``), added at
      weight w with unit coefficient.
    description: the method's description.

  Calling it, ``reg(params, batch)``, is ``reg.fn(params, batch)``.
  """
  name: str
  fn: Callable[[Params, Batch], jax.Array]
  objective: Callable[[Params, Batch, Any], jax.Array]
  weight: str
  penalties: Tuple[str, ...]
  description: str

  def __call__(self, params: Params, batch: Batch) -> jax.Array:
    return self.fn(params, batch)


def method_regularizer(name: str, apply_fn: Callable, eps: float, *,
                       key: Optional[jax.Array] = None, **options: Any) -> Regularizer:
  """The regularizer R of a registered training method (``dm_jax.train.methods``).

  Every registered loss is written either ``CE + lam R`` (``hyper.lam``: relu_stability,
  mmr, dm with ``lam_form="paper"``, whose ``(1 - lam) CE + lam CE_split`` is
  ``CE + lam (CE_split - CE)``) or ``kappa CE + (1 - kappa) robust`` (``hyper.kappa``:
  ibp, crown_ibp, bounded, dm with ``lam_form="kappa"``, i.e. ``CE + (1 - kappa)
  (robust - CE)``), both affine in the weight ``w`` (lam, or 1 - kappa). So
  ``R = loss(w = 1) - loss(w = 0)``: the clean CE cancels, and so do the weight
  penalties given as options (``l1=``, ``l2=``). The penalty methods ``l1``/``l2`` (whose
  loss is CE plus their penalty) get R = the penalty with unit weight. The other
  hyper-parameter is held at its neutral value (kappa = 1 in lam form, lam = 0 in kappa
  form: crown_ibp with ``crown_ibp_beta="lam"`` is then pure IBP). A method whose loss
  reads neither (normal, adv, trades) has R = 0: :func:`regularizer_check` reports it.

  Args:
    name: a registered method or alias (``dm``, ``dm_s_only``, ``ibp``, ``crown_ibp``,
      ``relu_stability``, ``l1``, ``l2``, ...).
    apply_fn: ``(params, x) -> logits`` (B, K).
    eps: the radius of the method's bounds (>= 0).
    key: PRNG key given to the loss (PGD starts, MMR's sampled units; the same key for
      every batch); default ``PRNGKey(0)``.
    **options: options of :func:`dm_jax.train.methods.get_method` (``norm``,
      ``lam_form``, ``dm_loss``, ...).

  Returns:
    The :class:`Regularizer`.

  Raises:
    ValueError: an unknown method or option, or a negative eps.
  """
  _check_finite(eps, "eps")
  if isinstance(eps, numbers.Real) and eps < 0:
    raise ValueError(f"eps must be >= 0; got {eps!r}.")
  spec = methods_lib.spec(name)
  method = methods_lib.get_method(name, **options)
  kappa_form = methods_lib.kappa_form(name, method.options["lam_form"])
  penalties = tuple(p for p in _PENALTIES if p in spec.penalty_defaults)
  key = jax.random.PRNGKey(0) if key is None else key

  def hyper(w):
    if kappa_form:
      return methods_lib.Hyper.create(eps=eps, lam=0.0, kappa=1.0 - jnp.asarray(w))
    return methods_lib.Hyper.create(eps=eps, lam=w, kappa=1.0)

  def objective(params, batch, w):
    x, y = batch
    value, _ = method.loss(params, apply_fn, x, y, hyper(w), key)
    for p in penalties:
      value = value + w * _PENALTIES[p](params)
    return value

  def fn(params, batch):
    return objective(params, batch, 1.0) - objective(params, batch, 0.0)

  return Regularizer(name=name, fn=fn, objective=objective,
                     weight="1 - kappa" if kappa_form else "lam", penalties=penalties,
                     description=method.description)


class RegularizerCheck(NamedTuple):
  """What :func:`regularizer_check` measures on one batch.

  Attributes:
    value: () R.
    affinity_error: () ``max_w |objective(w) - (1 - w) objective(0) - w objective(1)|``
      over the check weights, relative to ``max(1, |objective(0)|, |objective(1)|)``:
      ~1e-7 (float32 rounding) when the objective is ``CE + w R``.
    grad_norm: () ``||grad R||_2`` on the batch; 0 (with value 0) for a method whose
      loss has no regularizer term.
  """
  value: jax.Array
  affinity_error: jax.Array
  grad_norm: jax.Array


def regularizer_check(reg: Regularizer, params: Params, batch: Batch,
                      weights: Tuple[float, ...] = (0.5, 2.0)) -> RegularizerCheck:
  """Measures that ``reg.objective`` is affine in its weight and R's size on a batch."""
  lo, hi = reg.objective(params, batch, 0.0), reg.objective(params, batch, 1.0)
  scale = jnp.maximum(1.0, jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
  err = jnp.zeros(())
  for w in weights:
    err = jnp.maximum(err, jnp.abs(reg.objective(params, batch, w) - (1 - w) * lo - w * hi))
  grad = ravel_pytree(jax.grad(reg.fn)(params, batch))[0]
  return RegularizerCheck(hi - lo, err / scale, jnp.linalg.norm(grad))


# ----------------------------------------------------------------------------- checks

def _vdot(a: Any, b: Any) -> jax.Array:
  """Sum over the leaves of ``<a, b>``: a scalar."""
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda s, t: jnp.vdot(s, t), a, b))
  return sum(leaves, jnp.zeros(()))


def _check_like(tree: Any, params: Any, what: str) -> None:
  """ValueError unless ``tree`` has the structure and leaf shapes of ``params``."""
  s_tree, s_params = jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(params)
  if s_tree != s_params:
    raise ValueError(f"{what} must be a pytree like params; got structure {s_tree}, "
                     f"params have {s_params}.")
  for a, p in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(params)):
    if np.shape(a) != np.shape(p):
      raise ValueError(f"{what} must have the leaf shapes of params; got {np.shape(a)} "
                       f"where params have {np.shape(p)}.")


def _check_gauss_newton(loss_fn: Any, gauss_newton: bool) -> None:
  if gauss_newton and not isinstance(loss_fn, SplitLoss):
    raise ValueError("gauss_newton=True needs the loss as a SplitLoss(predict, "
                     "output_loss) (e.g. classification_loss(apply_fn)), so that the "
                     "model's Jacobian and the output loss's Hessian are apart.")


def _check_damping(damping: Any) -> None:
  """ValueError unless ``damping`` is a scalar, finite and >= 0 (a tracer: a scalar)."""
  if np.ndim(damping) != 0:
    raise ValueError(f"damping must be a scalar; got shape {np.shape(damping)}.")
  if not isinstance(damping, jax.core.Tracer) and not (
      np.isfinite(damping) and damping >= 0):
    raise ValueError(f"damping must be a finite number >= 0; got {damping!r}.")


def _check_finite(value: Any, what: str) -> None:
  """ValueError for a concrete non-finite or non-scalar value (tracers pass)."""
  if isinstance(value, jax.core.Tracer):
    return
  if np.ndim(value) != 0 or not np.isfinite(value):
    raise ValueError(f"{what} must be a finite scalar; got {value!r}.")
