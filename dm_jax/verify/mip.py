"""Exact verification of small ReLU networks by mixed-integer linear programming.

For every example ``b`` and every class ``j != y_b``, :func:`exact_margins` computes the
exact minimum of the margin ``f(x')_y - f(x')_j`` over the input set (an l-infinity or l1
ball around ``x_b``, optionally intersected with a data box ``domain = (lo, hi)``), by
solving one MILP per (b, j) with ``scipy.optimize.milp`` (HiGHS). It is the exact
("MIP") certifier of SPEC.md: slow, but the reference every sound certifier must agree
with (their lower bounds are <= the exact minimum) and the tightest one.

How the MILP is built (Tjeng, Xiao and Tedrake 2019). The model is traced once
(``interpreter.trace``) and walked with an abstract value that is an *affine expression
over the MILP variables*: a dense matrix (n_out, n_vars) plus a constant vector, for the
flattened tensor. Variables are the perturbed input ``x'`` (and, for l1, the auxiliary
``t >= |x' - x|``), then one continuous output variable (and its binaries) per *unstable*
nonlinearity; affine layers are substituted, not given variables.

- Affine primitives (kind affine in :mod:`dm_jax.core.primitives`: dot_general, conv,
  add/sub/mul/div by constants, reshape, transpose, broadcast, concatenate, pad,
  reduce_sum, reduce_window_sum (average pooling), select_n with a constant selector, ...)
  are applied exactly: their Jacobian with respect to each input-dependent operand is
  computed by applying the primitive to the unit basis (exact for weights, since
  ``w * 1 + 0`` is exact in floating point), and composed with the expressions in
  float64.
- ``max(z, k)`` with a constant ``k`` (ReLU is ``k = 0``), ``max`` of two input-dependent
  tensors, ``min`` and ``clamp`` with constants, and max pooling (``reduce_window_max``,
  also ``reduce_max`` and ``cummax``) are encoded exactly: an output ``a`` of candidates
  ``z_1..z_n`` with bounds ``[l_i, u_i]`` gets ``a >= z_i`` for all ``i``, binaries
  ``d_i`` with ``sum d_i = 1`` and ``a <= z_i + M_i (1 - d_i)``, ``M_i = max_{k != i} u_k -
  l_i`` (one binary when two candidates remain: for a ReLU this is the standard ``a >= 0,
  a >= z, a <= z - l (1 - d), a <= u d``). Candidates that can never be the maximum are
  dropped first, so stable ReLUs are replaced exactly by ``0`` or ``z`` and cost nothing.
- Bounds ``[l, u]`` of every candidate come from its expression and the variables' bounds
  (interval arithmetic on the substituted expression, never looser than IBP; exact for the
  first layer over an l1 ball), optionally tightened by one LP per bound
  (``tighten=True``).
- Anything else that depends on the input raises
  :class:`dm_jax.core.errors.UnsupportedPrimitiveError`.

Size limits. Matrices are dense and the MILP is solved by branch and bound, so this is
meant for small networks: up to a few hundred unstable ReLUs (a few thousand ReLUs in
all) solve in seconds to minutes; the cost grows exponentially with the number of unstable
ReLUs in the worst case. More than ``max_binaries`` binaries (default 2000) raises a
ValueError before anything is solved; a MILP that hits ``time_limit`` reports the solver's
proven lower bound (still sound) with status ``'time_limit'``.

Numerical note: the optimum is exact up to the solver's tolerances (HiGHS feasibility
tolerance ~1e-7, relative MIP gap ``mip_rel_gap``); ``min_margin`` is the solver's dual
(lower) bound, ``attained_margin`` the margin of the returned minimiser
``argmin_inputs``.

Not jittable: it runs the solver on concrete numbers.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import sparse
from scipy.optimize import Bounds as ScipyBounds
from scipy.optimize import LinearConstraint, milp

from dm_jax.core import interpreter, primitives
from dm_jax.core.errors import UnsupportedPrimitiveError
from dm_jax.core.input_sets import make_input_set

DOMAIN_NAME = "MIP"
SUPPORTED_NORMS = ("linf", "l1")

_AFFINE = primitives.names(kind=primitives.AFFINE)
# Unary primitives whose every output is the maximum of a fixed subset of the inputs.
_MAX_SELECT = primitives.names(mip_max=True)


# --------------------------------------------------------------------------- results

@dataclasses.dataclass
class MipResult:
  """Exact margins of a batch.

  Attributes:
    min_margin: (B, K) minimum of ``f(x')_y - f(x')_j`` over the input set; ``+inf`` at
      ``j == y``. With status ``'optimal'`` it is the optimum (the solver's lower bound,
      equal to it up to the MIP gap tolerance); with ``'time_limit'`` the solver's proven
      lower bound (sound, possibly loose, ``-inf`` if none); with ``'error'`` ``-inf``.
    status: (B, K) strings ``'optimal'``, ``'time_limit'``, ``'error'``, or ``'true_class'``
      at ``j == y``.
    certified: (B,) nominal prediction correct and every min margin > 0.
    argmin_inputs: (B, K, ...) a minimiser ``x*`` (shape of one input); NaN at ``j == y``
      and where the solver returned no point.
    attained_margin: (B, K) the MILP objective at ``argmin_inputs`` (an upper bound of the
      minimum; equal to ``min_margin`` up to the gap when optimal).
    nominal_correct: (B,) ``argmax f(x) == y``.
    num_binaries: (B,) binary variables of each example's MILP.
    num_variables: (B,) variables of each example's MILP.
    num_constraints: (B,) linear constraints of each example's MILP.
    solve_seconds: (B, K) wall time of each MILP.
    build_seconds: (B,) wall time of building each example's MILP.
  """
  min_margin: np.ndarray
  status: np.ndarray
  certified: np.ndarray
  argmin_inputs: np.ndarray
  attained_margin: np.ndarray
  nominal_correct: np.ndarray
  num_binaries: np.ndarray
  num_variables: np.ndarray
  num_constraints: np.ndarray
  solve_seconds: np.ndarray
  build_seconds: np.ndarray

  @property
  def margin_lower(self) -> np.ndarray:
    """(B,) minimum over ``j != y`` of ``min_margin``."""
    return np.min(self.min_margin, axis=1)


# ----------------------------------------------------------------- abstract value

@dataclasses.dataclass
class MipExpr:
  """``value.reshape(-1) = A @ v[:A.shape[1]] + c`` over the MILP variables ``v``."""
  A: np.ndarray  # (n, n_cols) float64
  c: np.ndarray  # (n,) float64
  shape: Tuple[int, ...]
  dtype: Any


class _Builder:
  """Accumulates variables (bounds, integrality) and sparse constraint rows."""

  def __init__(self, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, norm: str,
               eps: float, max_binaries: int, tighten: bool):
    self.lb: List[float] = []
    self.ub: List[float] = []
    self.integer: List[int] = []
    self.rows_cols: List[np.ndarray] = []
    self.rows_vals: List[np.ndarray] = []
    self.rows_lo: List[float] = []
    self.rows_hi: List[float] = []
    self.num_binaries = 0
    self.max_binaries = max_binaries
    self.tighten = tighten
    self.norm = norm
    self.eps = eps
    self.x0 = x0
    self.n_in = x0.size
    for lo, hi in zip(lower, upper):
      self.new_var(lo, hi)
    if norm == "l1":  # t_k >= |x'_k - x0_k|, sum_k t_k <= eps
      t0 = self.n_vars
      for k in range(self.n_in):
        t = self.new_var(0.0, eps)
        assert t == t0 + k
        self.add_row([k, t], [1.0, -1.0], -np.inf, x0[k])
        self.add_row([k, t], [1.0, 1.0], x0[k], np.inf)
      self.add_row(np.arange(t0, t0 + self.n_in), np.ones(self.n_in), -np.inf, eps)

  @property
  def n_vars(self) -> int:
    return len(self.lb)

  def new_var(self, lo: float, hi: float, integer: bool = False) -> int:
    if integer:
      self.num_binaries += 1
      if self.num_binaries > self.max_binaries:
        raise ValueError(
            f"The MILP needs more than max_binaries={self.max_binaries} binary variables "
            "(unstable ReLUs / max-pool candidates); exact verification is meant for "
            "small networks. Raise max_binaries, shrink eps, or use a bound-based "
            "certifier.")
    self.lb.append(float(lo))
    self.ub.append(float(hi))
    self.integer.append(1 if integer else 0)
    return len(self.lb) - 1

  def add_row(self, cols, vals, lo: float, hi: float):
    cols = np.asarray(cols, dtype=np.int64)
    vals = np.asarray(vals, dtype=np.float64)
    keep = vals != 0
    self.rows_cols.append(cols[keep])
    self.rows_vals.append(vals[keep])
    self.rows_lo.append(float(lo))
    self.rows_hi.append(float(hi))

  def add_dense_row(self, coef: np.ndarray, extra_cols, extra_vals, lo, hi):
    """Adds ``lo <= coef . v + sum extra_vals v[extra_cols] <= hi``."""
    nz = np.nonzero(coef)[0]
    self.add_row(np.concatenate([nz, np.asarray(extra_cols, np.int64)]),
                 np.concatenate([coef[nz], np.asarray(extra_vals, np.float64)]), lo, hi)

  # --------------------------------------------------------------------- bounds

  def box_bounds(self, A: np.ndarray, c: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Interval bounds of ``A v + c`` from the variables' bounds (exact l1 first layer)."""
    n = A.shape[1]
    lbv = np.asarray(self.lb[:n])
    ubv = np.asarray(self.ub[:n])
    ap, an = np.maximum(A, 0.0), np.minimum(A, 0.0)
    lo = c + ap @ lbv + an @ ubv
    hi = c + ap @ ubv + an @ lbv
    if self.norm == "l1" and n > 0:
      k = min(self.n_in, n)
      a_in = A[:, :k]
      box_lo = ap[:, :k] @ lbv[:k] + an[:, :k] @ ubv[:k]
      box_hi = ap[:, :k] @ ubv[:k] + an[:, :k] @ lbv[:k]
      centre = a_in @ self.x0[:k]
      rad = self.eps * (np.max(np.abs(a_in), axis=1) if k else 0.0)
      lo = lo - box_lo + np.maximum(box_lo, centre - rad)
      hi = hi - box_hi + np.minimum(box_hi, centre + rad)
    return lo, hi

  def constraint(self):
    n = self.n_vars
    m = len(self.rows_lo)
    if m == 0:
      return None
    indptr = np.zeros(m + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in self.rows_cols])
    mat = sparse.csr_matrix(
        (np.concatenate(self.rows_vals), np.concatenate(self.rows_cols), indptr),
        shape=(m, n))
    return LinearConstraint(mat, np.asarray(self.rows_lo), np.asarray(self.rows_hi))

  def lp_bounds(self, A: np.ndarray, c: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Tightens ``[lo, hi]`` of the rows of ``A v + c`` by LPs over the relaxation."""
    cons = self.constraint()
    n = self.n_vars
    bounds = ScipyBounds(np.asarray(self.lb), np.asarray(self.ub))
    lo, hi = lo.copy(), hi.copy()
    for r in range(A.shape[0]):
      obj = np.zeros(n)
      obj[:A.shape[1]] = A[r]
      for sign in (1.0, -1.0):
        res = milp(sign * obj, constraints=cons, bounds=bounds,
                   integrality=np.zeros(n))
        if res.status != 0 or res.fun is None:
          continue
        val = sign * res.fun + c[r]
        slack = 1e-7 * (1.0 + abs(val))  # solver tolerance: stay sound
        if sign > 0:
          lo[r] = max(lo[r], val - slack)
        else:
          hi[r] = min(hi[r], val + slack)
    return lo, np.maximum(hi, lo)


def _cols(e: MipExpr, n: int) -> np.ndarray:
  if e.A.shape[1] == n:
    return e.A
  return np.pad(e.A, ((0, 0), (0, n - e.A.shape[1])))


def _constant_expr(value, n_cols: int) -> MipExpr:
  value = np.asarray(value)
  return MipExpr(np.zeros((value.size, n_cols)), value.astype(np.float64).reshape(-1),
                 tuple(value.shape), value.dtype)


# ------------------------------------------------------------------------- affine

def _bind(eqn, *args):
  return eqn.primitive.bind(*args, **eqn.params)


def _jacobians(eqn, invals, idx):
  """(f0, [J_i]) with ``f(..., x_i, ...) = f0 + sum_i J_i x_i`` over abstract operands."""
  base = [jnp.zeros(v.shape, v.dtype) if isinstance(v, MipExpr) else v for v in invals]
  f0 = np.asarray(_bind(eqn, *base), dtype=np.float64).reshape(-1)
  jacs = []
  for i in idx:
    v = invals[i]
    n = int(np.prod(v.shape, dtype=np.int64))
    basis = jnp.asarray(np.eye(n, dtype=np.dtype(v.dtype)).reshape((n,) + tuple(v.shape)))

    def apply(e, i=i):
      return _bind(eqn, *[e if j == i else base[j] for j in range(len(base))])

    out = np.asarray(jax.vmap(apply)(basis), dtype=np.float64).reshape(n, -1)
    jacs.append((out - f0[None, :]).T)  # (n_out, n_in)
  return f0, jacs


def _affine(eqn, invals, cache: Dict, n_vars: int) -> MipExpr:
  name = eqn.primitive.name
  idx = [i for i, v in enumerate(invals) if isinstance(v, MipExpr)]
  fail = lambda detail: UnsupportedPrimitiveError(name, DOMAIN_NAME, detail)
  prim = primitives.rule(name)
  if not primitives.operands_allowed(prim, idx):
    raise fail(primitives.OPERAND_ERRORS[prim.operands])
  key = (id(eqn), tuple(idx))
  if key not in cache:
    cache[key] = _jacobians(eqn, invals, idx)
  f0, jacs = cache[key]
  A = np.zeros((f0.size, n_vars))
  c = f0.copy()
  for i, J in zip(idx, jacs):
    e = invals[i]
    A += J @ _cols(e, n_vars)
    c += J @ e.c
  aval = eqn.outvars[0].aval
  return MipExpr(A, c, tuple(aval.shape), aval.dtype)


# --------------------------------------------------------------------------- max

def _encode_max(builder: _Builder, cands: Sequence[Tuple[np.ndarray, np.ndarray]],
                shape, dtype) -> MipExpr:
  """Exact ``max_i cand_i`` element-wise; ``cands[i] = (A_i (m, n_cols), c_i (m,))``.

  Every candidate list has the same length m (one entry per output element), except
  that an entry may be missing: pass lists per element via :func:`_encode_max_sets`.
  """
  m = cands[0][1].shape[0]
  sets = [[(A[o], c[o]) for (A, c) in cands] for o in range(m)]
  return _encode_max_sets(builder, sets, shape, dtype)


def _encode_max_sets(builder: _Builder, sets, shape, dtype) -> MipExpr:
  """Exact element-wise max; ``sets[o]`` lists ``(row, const)`` candidates of output o."""
  n0 = builder.n_vars
  m = len(sets)
  # Bounds of all candidates at once.
  flat = [(o, row, const) for o, s in enumerate(sets) for (row, const) in s]
  rows = np.zeros((len(flat), n0))
  consts = np.zeros(len(flat))
  for r, (_, row, const) in enumerate(flat):
    rows[r, :row.size] = row
    consts[r] = const
  lo, hi = builder.box_bounds(rows, consts)
  starts = np.concatenate([[0], np.cumsum([len(s) for s in sets])])

  def keep_of(o):
    sel = np.arange(starts[o], starts[o + 1])
    best = sel[np.argmax(lo[sel])]
    # A candidate whose upper bound is <= the best lower bound is never the strict max.
    return [r for r in sel if r == best or hi[r] > lo[best]], best

  if builder.tighten:
    need = []
    for o in range(m):
      keep = keep_of(o)[0]
      if len(keep) > 1:
        need += [r for r in keep if np.any(rows[r] != 0)]
    if need:
      need = np.asarray(need)
      lo[need], hi[need] = builder.lp_bounds(rows[need], consts[need], lo[need], hi[need])

  out_rows: List[Tuple[np.ndarray, float]] = []
  for o in range(m):
    keep, best = keep_of(o)
    if len(keep) == 1:  # this candidate is always the max: exact substitution
      out_rows.append((rows[best], consts[best]))
      continue
    upper = max(hi[r] for r in keep)
    a = builder.new_var(lo[best], upper)
    big_m = []
    for r in keep:
      others = max(hi[q] for q in keep if q != r)
      big_m.append(max(others - lo[r], 0.0))
      # a - z_r >= 0
      builder.add_dense_row(-rows[r], [a], [1.0], consts[r], np.inf)
    if len(keep) == 2:
      d = builder.new_var(0.0, 1.0, integer=True)  # d = 1: the first is the max
      r0, r1 = keep
      # a - z_0 <= M_0 (1 - d);  a - z_1 <= M_1 d
      builder.add_dense_row(-rows[r0], [a, d], [1.0, big_m[0]], -np.inf,
                            consts[r0] + big_m[0])
      builder.add_dense_row(-rows[r1], [a, d], [1.0, -big_m[1]], -np.inf, consts[r1])
    else:
      ds = [builder.new_var(0.0, 1.0, integer=True) for _ in keep]
      builder.add_row(ds, np.ones(len(ds)), 1.0, 1.0)
      for r, d, mm in zip(keep, ds, big_m):
        builder.add_dense_row(-rows[r], [a, d], [1.0, mm], -np.inf, consts[r] + mm)
    unit = np.zeros(a + 1)
    unit[a] = 1.0
    out_rows.append((unit, 0.0))
  n = builder.n_vars
  A = np.zeros((m, n))
  for o, (row, _) in enumerate(out_rows):
    A[o, :row.size] = row
  c = np.asarray([const for _, const in out_rows], dtype=np.float64)
  return MipExpr(A, c, tuple(shape), dtype)


def _as_expr(v, shape, n_cols) -> Tuple[np.ndarray, np.ndarray]:
  """(A, c) of ``v`` broadcast to ``shape`` (constants get zero rows)."""
  size = int(np.prod(shape, dtype=np.int64))
  if isinstance(v, MipExpr):
    if tuple(v.shape) == tuple(shape):
      return _cols(v, n_cols), v.c
    if v.c.size == 1:
      return np.repeat(_cols(v, n_cols), size, axis=0), np.repeat(v.c, size)
    raise UnsupportedPrimitiveError("max", DOMAIN_NAME,
                                    f"implicit broadcast of {v.shape} to {shape}")
  const = np.broadcast_to(np.asarray(v, dtype=np.float64), shape).reshape(-1)
  return np.zeros((size, n_cols)), const.copy()


def _neg(e: MipExpr) -> MipExpr:
  return MipExpr(-e.A, -e.c, e.shape, e.dtype)


def _elementwise_max(builder, a, b, shape, dtype) -> MipExpr:
  n = builder.n_vars
  return _encode_max(builder, [_as_expr(a, shape, n), _as_expr(b, shape, n)], shape, dtype)


def _elementwise_min(builder, a, b, shape, dtype) -> MipExpr:
  neg = lambda v: _neg(v) if isinstance(v, MipExpr) else -np.asarray(v, np.float64)
  return _neg(_elementwise_max(builder, neg(a), neg(b), shape, dtype))


def _select_max(eqn, e: MipExpr, builder: _Builder, cache: Dict) -> MipExpr:
  """Outputs that are each the max of a fixed subset of inputs (pooling, reduce_max)."""
  key = (id(eqn), "members")
  if key not in cache:
    n = int(np.prod(e.shape, dtype=np.int64))
    basis = jnp.asarray(np.eye(n, dtype=np.dtype(e.dtype)).reshape((n,) + tuple(e.shape)))
    out = np.asarray(jax.vmap(lambda t: _bind(eqn, t))(basis)).reshape(n, -1)
    cache[key] = (out == 1).T  # (n_out, n_in): input k is in output o's window
  member = cache[key]
  n = builder.n_vars
  A = _cols(e, n)
  sets = []
  for o in range(member.shape[0]):
    sel = np.nonzero(member[o])[0]
    if sel.size == 0:
      raise UnsupportedPrimitiveError(eqn.primitive.name, DOMAIN_NAME,
                                      "a window covers only padding")
    sets.append([(A[k], e.c[k]) for k in sel])
  aval = eqn.outvars[0].aval
  return _encode_max_sets(builder, sets, aval.shape, aval.dtype)


# ------------------------------------------------------------------------ driver

def _rule_factory(builder: _Builder, cache: Dict):
  def rule(eqn, invals):
    name = eqn.primitive.name
    idx = [i for i, v in enumerate(invals) if isinstance(v, MipExpr)]
    aval = eqn.outvars[0].aval
    shape, dtype = tuple(aval.shape), aval.dtype
    if name in _AFFINE:
      return [_affine(eqn, invals, cache, builder.n_vars)]
    if name in ("max", "min") and len(invals) == 2:
      f = _elementwise_max if name == "max" else _elementwise_min
      return [f(builder, invals[0], invals[1], shape, dtype)]
    if name == "clamp" and idx == [1]:
      lo_c, x, hi_c = invals
      return [_elementwise_min(builder, _elementwise_max(builder, x, lo_c, shape, dtype),
                               hi_c, shape, dtype)]
    if name in _MAX_SELECT and idx == [0] and len(invals) == 1:
      return [_select_max(eqn, invals[0], builder, cache)]
    raise UnsupportedPrimitiveError(name, DOMAIN_NAME)
  return rule


def _build_output(closed, leaves, builder, cache, x_shape, x_dtype) -> MipExpr:
  n_in = builder.n_in
  x_expr = MipExpr(np.eye(n_in), np.zeros(n_in), tuple(x_shape), x_dtype)
  (out,) = interpreter.interpret(closed, list(leaves) + [x_expr],
                                 lambda v: isinstance(v, MipExpr),
                                 _rule_factory(builder, cache))
  if not isinstance(out, MipExpr):
    out = _constant_expr(out, builder.n_vars)
  return out


def _solve(builder: _Builder, cons, obj: np.ndarray, const: float, time_limit: float,
           mip_rel_gap: float):
  options = {"time_limit": float(time_limit), "mip_rel_gap": float(mip_rel_gap)}
  res = milp(obj, constraints=cons,
             bounds=ScipyBounds(np.asarray(builder.lb), np.asarray(builder.ub)),
             integrality=np.asarray(builder.integer), options=options)
  dual = getattr(res, "mip_dual_bound", None)
  fun = res.fun
  x = None if res.x is None else np.asarray(res.x)
  if res.status == 0:
    status = "optimal"
    lower = fun if dual is None or not np.isfinite(dual) else min(dual, fun)
  elif res.status == 1:
    status = "time_limit"
    lower = dual if dual is not None and np.isfinite(dual) else -np.inf
  else:
    status, lower, x = "error", -np.inf, None
  attained = np.nan if (fun is None or x is None) else fun + const
  return status, lower + const, attained, x


def exact_margins(apply_fn: Callable, params: Any, x: chex.Array, y: chex.Array,
                  eps: chex.Numeric, norm: str = "linf", *,
                  domain: Optional[Tuple[float, float]] = None, time_limit: float = 60.0,
                  max_binaries: int = 2000, tighten: bool = False,
                  mip_rel_gap: float = 1e-6) -> MipResult:
  """Exact minimum margins ``min_{x'} f(x')_y - f(x')_j`` by one MILP per (b, j).

  Args:
    apply_fn: pure ``(params, x) -> logits`` (e.g. a Flax ``model.apply``) made of the
      supported operations (see the module docstring).
    params: its parameters (concrete arrays: this function is not jittable).
    x: (B, ...) nominal inputs.
    y: (B,) integer labels.
    eps: radius: scalar, (B,), or (linf only) x's shape.
    norm: "linf" or "l1" (aliases as in ``input_sets.canonical_norm``). The l2 ball is
      not polyhedral and l0 is not encoded: both raise ValueError.
    domain: optional (lo, hi) data box intersected with the ball.
    time_limit: seconds per MILP; on timeout the solver's proven lower bound is returned.
    max_binaries: raise ValueError if one example's MILP needs more binary variables.
    tighten: tighten each unstable ReLU's bounds by two LPs over the relaxation built so
      far (fewer binaries and smaller big-M constants, at the cost of the LPs).
    mip_rel_gap: relative optimality gap at which HiGHS stops.

  Returns:
    A :class:`MipResult`.

  Raises:
    ValueError: unsupported norm, bad arguments, or more than ``max_binaries`` binaries.
    UnsupportedPrimitiveError: the model uses an operation that cannot be encoded.
  """
  iset = make_input_set(x, eps, norm, None, domain)
  if iset.norm not in SUPPORTED_NORMS:
    raise ValueError(
        f"exact_margins supports norms {SUPPORTED_NORMS} (polyhedral balls); got "
        f"{iset.norm!r}. The l2 ball is not linear (it would need a mixed-integer "
        "second-order-cone solver).")
  if max_binaries < 0:
    raise ValueError(f"max_binaries must be >= 0; got {max_binaries}.")
  if not time_limit > 0:
    raise ValueError(f"time_limit must be > 0; got {time_limit}.")
  x = iset.x
  batch = x.shape[0]
  y = np.asarray(y)
  if y.shape != (batch,) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"y must be ({batch},) integer labels; got shape {y.shape}, "
                     f"dtype {y.dtype}.")

  logits = np.asarray(apply_fn(params, x))
  if logits.ndim != 2 or logits.shape[0] != batch:
    raise ValueError(f"apply_fn must return (B, K) logits; got shape {logits.shape}.")
  num_classes = logits.shape[1]
  if np.any(y < 0) or np.any(y >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}); got {y}.")
  nominal_correct = np.argmax(logits, axis=1) == y

  closed, leaves = interpreter.trace(apply_fn, params, x[:1])
  lower_box, upper_box = (np.asarray(t, dtype=np.float64) for t in iset.box())
  x_np = np.asarray(x, dtype=np.float64)
  eps_np = np.asarray(iset.eps, dtype=np.float64)
  in_shape = tuple(x.shape[1:])

  min_margin = np.full((batch, num_classes), np.inf)
  attained = np.full((batch, num_classes), np.inf)
  status = np.full((batch, num_classes), "true_class", dtype=object)
  argmin = np.full((batch, num_classes) + in_shape, np.nan)
  solve_s = np.zeros((batch, num_classes))
  build_s = np.zeros(batch)
  n_bin = np.zeros(batch, dtype=np.int64)
  n_var = np.zeros(batch, dtype=np.int64)
  n_con = np.zeros(batch, dtype=np.int64)
  cache: Dict = {}
  for b in range(batch):
    t0 = time.perf_counter()
    eps_b = float(eps_np[b].reshape(-1)[0]) if eps_np[b].size else 0.0
    builder = _Builder(x_np[b].reshape(-1), lower_box[b].reshape(-1),
                       upper_box[b].reshape(-1), iset.norm, eps_b, max_binaries, tighten)
    out = _build_output(closed, leaves, builder, cache, (1,) + in_shape, x.dtype)
    if out.c.size != num_classes:
      raise ValueError(f"traced output has {out.c.size} entries, expected {num_classes}.")
    A_out = _cols(out, builder.n_vars)
    cons = builder.constraint()
    build_s[b] = time.perf_counter() - t0
    n_bin[b], n_var[b], n_con[b] = builder.num_binaries, builder.n_vars, len(builder.rows_lo)
    yb = int(y[b])
    for j in range(num_classes):
      if j == yb:
        continue
      t1 = time.perf_counter()
      obj = A_out[yb] - A_out[j]
      const = float(out.c[yb] - out.c[j])
      st, lo, att, sol = _solve(builder, cons, obj, const, time_limit, mip_rel_gap)
      solve_s[b, j] = time.perf_counter() - t1
      status[b, j], min_margin[b, j], attained[b, j] = st, lo, att
      if sol is not None:
        argmin[b, j] = sol[:builder.n_in].reshape(in_shape)
  certified = nominal_correct & np.all(min_margin > 0, axis=1)
  return MipResult(min_margin=min_margin, status=status.astype(str), certified=certified,
                   argmin_inputs=argmin, attained_margin=attained,
                   nominal_correct=nominal_correct, num_binaries=n_bin,
                   num_variables=n_var, num_constraints=n_con, solve_seconds=solve_s,
                   build_seconds=build_s)


def exact_certify(apply_fn: Callable, params: Any, x: chex.Array, y: chex.Array,
                  eps: chex.Numeric, norm: str = "linf",
                  **kwargs) -> Tuple[np.ndarray, np.ndarray]:
  """``(certified (B,), margin_lower (B,))``: the exact certificate and the exact (or,
  on timeout, lower-bounded) minimum over ``j != y`` of the margin. Keyword arguments
  are those of :func:`exact_margins`."""
  res = exact_margins(apply_fn, params, x, y, eps, norm, **kwargs)
  return res.certified, res.margin_lower
