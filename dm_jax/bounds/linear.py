"""Linear (CROWN-family) bounds over the traced model: CNN-Cert-ReLU/-Ada/-Zero, IBP
with the specification folded into the last affine layer, and CROWN-IBP.

A forward interval pass (:mod:`dm_jax.core.propagation`) records a *tape*: one entry per
input-dependent equation, with the interval of every value. Bounds of ``C f(x)`` are then
computed by a backward pass that carries coefficients ``A`` of shape (B, R, *value_shape)
from the output to the input:

* affine equations: ``A`` goes through the transpose of the equation's linear part
  (``jax.linear_transpose`` of the primitive itself, vmapped over the R rows, so a
  convolution stays a convolution) and the bias part adds ``<A, bias>`` to the offset;
* ReLU ``y = max(x, 0)`` with pre-activation bounds ``l < 0 < u``: the upper line through
  ``(l, 0)`` and ``(u, u)`` and a lower line ``alpha x`` whose slope is the method's:
  ``u / (u - l)`` (fastlin = CNN-Cert-ReLU), ``1[u >= -l]`` (crown = CNN-Cert-Ada),
  ``0`` (zero = CNN-Cert-Zero);
* max pooling: lower bound by the window element with the largest lower bound, upper bound
  by that element when it dominates the window, else by the window's largest upper bound
  (the DeepPoly relaxation);
* other element-wise nonlinearities (tanh, logistic, erf, exp, softplus, integer powers,
  ...): per-neuron tangent/secant lines chosen from the function's curvature on its
  pre-activation interval, as CROWN does for general activations
  (:mod:`dm_jax.bounds.activations`; the same for fastlin, crown and zero, whose choices
  differ for ReLU only);
* products ``x * y`` of two input-dependent values: McCormick's planes over the bounds
  of both operands;
* at the input, ``min A x' + c`` over the set in closed form: ``A x + c - eps ||A||_q`` or
  the top-k sum for l0; with a data box, the exact box minimum for l-inf.

Intermediate pre-activation bounds are computed layer by layer with the same method
(identity specification over the layer's neurons, in chunks to bound memory), or taken
from the interval pass (``intermediate="ibp"``, i.e. CROWN-IBP). ``method="ibp"`` stops
the backward pass at the last nonlinearities and uses their intervals there: IBP with the
specification folded into the last affine layer (Gowal et al.'s tighter form).

``intersect_ibp=True`` (fastlin/crown/zero) intersects every bound the linear method
computes with IBP's bound of the same quantity over the same set: each intermediate
pre-activation ``(l, u)`` becomes ``(max(l, l_ibp), min(u, u_ibp))`` with the interval of
the tape (so later layers relax their ReLUs on the tighter bounds and more neurons are
stable), and the output rows take the larger of the two lower bounds (the folded IBP
one, :func:`folded_lower_bounds`). Both are sound, so the result is sound and never
looser than IBP; as auto_LiRPA does. The default (False) is the textbook method, whose
numbers compare with CNN-Cert and the paper.

``method="alpha_crown"`` (alpha-CROWN, Xu et al. 2021) makes the lower slope of every
unstable ReLU a parameter in [0, 1] (sound for every value), starts from CROWN's choice
and raises the output rows' bounds by projected Adam (:class:`AlphaConfig`,
:func:`alpha_crown_lower_bounds`); each row keeps its best iterate, CROWN's included.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.typing import DTypeLike

from dm_jax.bounds import activations, float_error, patches, relaxations
from dm_jax.bounds.interval import Bounds, IntervalDomain, no_tighter
# record_tape and Tape are re-exported: the tape is this module's input.
from dm_jax.bounds.relaxations import DENSE
from dm_jax.bounds.tape import (Entry, NodeRef, Tape, interval_of,  # noqa: F401
                                node_shape, nominal_of, record_tape)
from dm_jax.core import conv, fast_paths, primitives, rounding
from dm_jax.core.errors import UnsupportedPrimitiveError
from dm_jax.core.input_sets import InputSet, make_input_set

_METHOD_ALIASES = {
    "fastlin": "fastlin", "relu": "fastlin", "cnn-cert-relu": "fastlin",
    "cnn_cert_relu": "fastlin", "convex": "fastlin",
    "crown": "crown", "ada": "crown", "cnn-cert-ada": "crown", "cnn_cert_ada": "crown",
    "deeppoly": "crown",
    "zero": "zero", "cnn-cert-zero": "zero", "cnn_cert_zero": "zero",
    "ibp": "ibp", "interval": "ibp",
    "crown_ibp": "crown_ibp", "crown-ibp": "crown_ibp",
    "alpha_crown": "alpha_crown", "alpha-crown": "alpha_crown", "alphacrown": "alpha_crown",
    "α-crown": "alpha_crown", "α_crown": "alpha_crown", "acrown": "alpha_crown",
}
METHODS = ("fastlin", "crown", "zero", "ibp", "crown_ibp", "alpha_crown")

# Default memory budget for one chunk of identity-specification rows (bytes).
DEFAULT_CHUNK_BYTES = 256 * 2**20


def canonical_method(method: str) -> str:
  key = str(method).strip().lower()
  if key not in _METHOD_ALIASES:
    raise ValueError(f"Unknown bound method {method!r}; expected one of "
                     f"{', '.join(METHODS)} (aliases: relu, ada, cnn-cert-relu, ...).")
  return _METHOD_ALIASES[key]


# ------------------------------------------------------------------ backward pass

def _transpose_rows(fn, A, primal):
  """Applies the transpose of linear ``fn`` (on ``primal``-shaped inputs) to each row."""
  t = jax.linear_transpose(fn, primal)
  return jax.vmap(lambda a: t(a)[0], in_axes=1, out_axes=1)(A)


def _affine_backward(entry: Entry, A, env_const):
  """Returns ([(node, A_node)], offset (B, R)) for an affine entry."""
  eqn = entry.eqn
  name = eqn.primitive.name
  nodes = entry.nodes()
  primals = {i: env_const(node) for i, node in nodes}

  prim = primitives.rule(name)

  def operand(j, i, t):
    ref = entry.refs[j]
    if j == i:
      return t
    if isinstance(ref, NodeRef):
      return jnp.zeros_like(primals[j])
    if primitives.is_bias_operand(prim, j):
      return jnp.zeros_like(ref.value)
    return ref.value

  out = []
  if name == "conv_general_dilated" and [i for i, _ in nodes] == [0] \
      and conv.is_nhwc_conv(eqn):
    # Faster transpose for strided convolutions (see conv.conv_input_transpose).
    (_, node), = nodes
    shape = primals[0].shape
    rows = A.reshape((-1,) + A.shape[2:])
    back = conv.conv_input_transpose(rows, entry.refs[1].value, eqn.params["window_strides"],
                                        eqn.params["padding"], shape[1:3])
    return [(node, back.reshape(A.shape[:2] + shape[1:]))], None
  for i, node in nodes:
    fn = lambda t, i=i: eqn.primitive.bind(
        *[operand(j, i, t) for j in range(len(entry.refs))], **eqn.params)
    out.append((node, _transpose_rows(fn, A, primals[i])))
  bias = eqn.primitive.bind(
      *[jnp.zeros_like(primals[j]) if isinstance(r, NodeRef) else r.value
        for j, r in enumerate(entry.refs)], **eqn.params)
  offset = None if prim.constants == primitives.COEFFICIENT else DENSE.dot(A, bias)
  return out, offset


@dataclasses.dataclass(frozen=True)
class SharedRows:
  """Coefficients equal for every example: ``rows`` (R, *shape) stand for the
  (batch, R, *shape) tensor ``broadcast(rows)`` (identity specifications)."""
  rows: jax.Array
  batch: int

  def materialize(self) -> jax.Array:
    return jnp.broadcast_to(self.rows[None], (self.batch,) + self.rows.shape)


def _shared_affine_backward(entry: Entry, shared: SharedRows, env_const):
  """``_affine_backward`` for example-independent rows through a bias add, a dense layer
  (rows @ W^T once, not per example) or a flatten; None where it does not apply."""
  eqn = entry.eqn
  name = eqn.primitive.name
  nodes = [i for i, _ in entry.nodes()]
  if name == "reshape" and nodes == [0] and eqn.params.get("dimensions") is None:
    node = entry.refs[0].index
    in_shape = tuple(env_const(node).shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if in_shape[:1] == out_shape[:1]:  # the batch axis stays first (a flatten)
      rows = shared.rows.reshape(shared.rows.shape[:1] + in_shape[1:])
      return node, SharedRows(rows, shared.batch), None
    return None
  if len(nodes) != 1 or len(entry.refs) != 2:
    return None
  (i,) = nodes
  node = entry.refs[i].index
  const = entry.refs[1 - i].value
  if primitives.rule(name).forward == primitives.SUM:
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if np.broadcast_shapes(np.shape(const), out_shape) != out_shape:
      return None
    const = jnp.broadcast_to(const, out_shape)
    sign = primitives.operand_sign(name, i)  # x enters as sign * x ...
    bias = primitives.operand_sign(name, 1 - i) * const  # ... and c as sign * c
    offset = jnp.einsum("r...,b...->br", shared.rows, bias)
    return node, SharedRows(sign * shared.rows, shared.batch), offset
  if name == "dot_general" and i == 0 and np.ndim(const) == 2:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    primal_ndim = len(env_const(node).shape)
    if tuple(lc) == (primal_ndim - 1,) and tuple(rc) == (0,) and not lb and not rb:
      rows = jnp.einsum("r...o,io->r...i", shared.rows, const)
      return node, SharedRows(rows, shared.batch), None
  return None


def backward(tape: Tape, target: int, A: Union[jax.Array, SharedRows],
             bounds: Dict[int, Tuple], method: str,
             stop_nodes: Optional[Dict[int, Tuple]] = None,
             alphas: Optional[Dict[int, jax.Array]] = None,
             error: Optional[jax.Array] = None) -> jax.Array:
  """Lower bound of ``<A, value(target)>`` over the input set.

  Args:
    tape: the recorded model.
    target: node index.
    A: (B, R, *shape(target)) coefficients, or :class:`SharedRows`.
    bounds: pre-activation bounds {node: (l, u)} for every nonlinearity input needed.
    method: fastlin | crown | zero (ReLU lower slope).
    stop_nodes: {node: (l, u)}: concretize there with the interval instead of going on
      (IBP with folded specification).
    alphas: optional {ReLU input node: (B, *shape(node))} lower slopes of the unstable
      neurons, shared by the R rows (alpha-CROWN; clipped to [0, 1] by
      :func:`relaxations.relu_relaxation`); they replace ``method``'s slope at those
      nodes.
    error: the sound mode: ``target``'s float error radius (B, *shape(target),
      :func:`dm_jax.bounds.float_error.error_radius` over a sound tape, with the same
      ``bounds`` and ``stop_nodes``). The l-inf input box is then rounded outward and
      the result lowered by ``<|A|, error>`` (rounded down), so that it is sound in
      floating point (:func:`float_error.row_error`). None: the plain float bound.

  Returns:
    (B, R) lower bounds.
  """
  sound = error is not None
  A0 = A
  alphas = alphas or {}
  coeffs = {target: A}
  if isinstance(A, SharedRows):
    offset = jnp.zeros((A.batch, A.rows.shape[0]), A.rows.dtype)
  else:
    offset = jnp.zeros(A.shape[:2], A.dtype)
  stop_nodes = stop_nodes or {}
  dense = lambda a: a.materialize() if isinstance(a, SharedRows) else a

  def add(node, a):
    coeffs[node] = dense(coeffs[node]) + dense(a) if node in coeffs else a

  nominal = lambda node: nominal_of(tape, node)  # shapes and dtypes of the primals
  for entry in reversed(tape.entries):
    if entry.out > target or entry.out not in coeffs:
      continue
    if entry.out in stop_nodes:
      continue
    A_out = coeffs.pop(entry.out)
    if isinstance(A_out, SharedRows) and entry.kind == primitives.TAPE_AFFINE:
      fast = _shared_affine_backward(entry, A_out, nominal)
      if fast is not None:
        node, a, bias_term = fast
        add(node, a)
        if bias_term is not None:
          offset = offset + bias_term
        continue
    A_out = dense(A_out)
    if entry.kind == primitives.TAPE_AFFINE:
      pulled, bias_term = _affine_backward(entry, A_out, nominal)
      for node, a in pulled:
        add(node, a)
      if bias_term is not None:
        offset = offset + bias_term
      continue
    if entry.kind == primitives.TAPE_PRODUCT:
      (_, x_node), (_, y_node) = entry.nodes()
      planes = activations.entry_planes(tape, entry, bounds)
      A_x, A_y, extra = relaxations.product_step(A_out, planes, DENSE)
      add(x_node, A_x)
      add(y_node, A_y)
      offset = offset + extra
      continue
    node = entry.node
    l, u = bounds[node]
    if entry.kind == primitives.TAPE_ACTIVATION:
      A_in, extra = relaxations.activation_step(
          A_out, activations.entry_lines(tape, entry, bounds), DENSE)
      add(node, A_in)
    elif entry.kind == primitives.TAPE_RELU:
      A_in, extra = relaxations.relu_step(A_out, l, u, entry.relu_const, method, DENSE,
                                          alphas.get(node))
      add(node, A_in)
    else:  # maxpool: the weights go back through the window selection
      weights, extra, onehots = relaxations.maxpool_weights(A_out, l, u, entry.eqn, DENSE)
      select = lambda t: sum(o * w for o, w in zip(
          onehots, relaxations.window_slices(entry.eqn, t, 0.0)))
      add(node, _transpose_rows(select, weights, l))
    offset = offset + extra
  lower = offset
  for node, a in coeffs.items():
    a = dense(a)
    if node in stop_nodes:
      l, u = stop_nodes[node]
      lower = lower + relaxations.box_minimum(a, l, u, DENSE)
    elif node == 0:
      lower = lower + relaxations.concretize_input(a, tape.iset, DENSE, outward=sound)
    else:  # pragma: no cover - every path ends at the input or a stop node
      raise AssertionError(f"coefficients left at node {node}")
  if sound:
    lower = float_error.sound_lower(lower, float_error.row_error(dense(A0), error))
  return lower


def folded_lower_bounds(tape: Tape, A: jax.Array, sound: bool = False) -> jax.Array:
  """Lower bound of ``<A, output>`` with the specification folded into the affine
  equations after the last nonlinearities, whose outputs take their range in the tape's
  domain (IBP's tighter margins, Gowal et al.; the same for Double Margin's ranges).

  Args:
    tape: the recorded model.
    A: (B, R, *output_shape) coefficients.
    sound: sound in floating point (``tape`` must be recorded in the sound interval
      domain; see :func:`backward`'s ``error``).

  Returns:
    (B, R) lower bounds: ``min <A C_out, h>`` over each stop node's range ``h``, plus the
    affine offsets; sound where the tape's ranges are (the interval domain).
  """
  stops = {e.out: interval_of(tape, e.out) for e in tape.entries
           if e.kind != primitives.TAPE_AFFINE}
  error = (float_error.error_radius(tape, tape.output, {}, stop_nodes=stops) if sound
           else None)
  return backward(tape, tape.output, A, {}, "crown", stop_nodes=stops, error=error)


# ---------------------------------------------------------- intermediate bounds

def _exact_forward_nodes(tape: Tape) -> set:
  """Nodes whose interval is already exact: reached from the input by one chain with at
  most one linear map with weights (and element-wise affine/structural steps)."""
  depth = {0: 0}
  for e in tape.entries:
    nodes = [n for _, n in e.nodes()]
    if e.kind != primitives.TAPE_AFFINE or len(nodes) != 1 or nodes[0] not in depth:
      continue
    name = e.eqn.primitive.name
    weights = 1 if name in ("dot_general", "conv_general_dilated") else 0
    if name in ("reduce_sum", "reduce_window_sum", "cumsum", "broadcast_in_dim"):
      weights = 1  # sums of several inputs are linear maps too
    d = depth[nodes[0]] + weights
    if d <= 1:
      depth[e.out] = d
  return set(depth)


def _identity_bounds(tape, node, bounds, method, chunk_bytes, alphas=None, error=None):
  """(l, u) of every element of ``node`` by backward passes, chunked by neurons
  (``alphas`` and ``error`` as in :func:`backward`, shared by the node's rows)."""
  value = nominal_of(tape, node)
  batch, shape = value.shape[0], value.shape[1:]
  n = int(np.prod(shape))
  widest = max(int(np.prod(node_shape(tape, i)[1:])) for i in range(node + 1))
  # Each row (and its negation, for the upper bound) carries coefficients over the
  # widest node on the way back.
  chunk = relaxations.identity_rows_per_chunk(n, batch * 2 * widest * 4, chunk_bytes)

  def one_chunk(start):
    rows = jax.nn.one_hot(start + jnp.arange(chunk), n, dtype=value.dtype)
    rows = rows.reshape((chunk,) + shape)
    A = SharedRows(jnp.concatenate([rows, -rows]), batch)
    low = backward(tape, node, A, bounds, method, alphas=alphas, error=error)
    return low[:, :chunk], -low[:, chunk:]

  lo, up = relaxations.chunked_identity_bounds(one_chunk, n, chunk)
  return lo.reshape(value.shape), up.reshape(value.shape)


def intersect(a: Tuple, b: Tuple) -> Tuple:
  """The intersection ``(max(l_a, l_b), min(u_a, u_b))`` of two sound bounds of the same
  value (element-wise, same shapes): sound, and never looser than either."""
  return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])


def _bounded_nodes(tape: Tape, intermediate: str) -> List[Tuple[int, bool]]:
  """The nonlinearity inputs in execution order, each once, with whether
  :func:`intermediate_bounds` computes its bounds by backward passes (False: taken from
  the interval pass, for ``intermediate="ibp"`` and the nodes it bounds exactly)."""
  exact = _exact_forward_nodes(tape) if intermediate == "linear" else set()
  out: Dict[int, bool] = {}
  for e in tape.entries:
    if e.kind == primitives.TAPE_AFFINE:
      continue
    for _, node in e.nodes():  # (a product needs both operands' bounds)
      if node not in out:
        out[node] = intermediate == "linear" and node not in exact
  return list(out.items())


def intermediate_bounds(tape: Tape, method: str, intermediate: str,
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                        use_patches: bool = True,
                        intersect_ibp: bool = False,
                        alphas: Optional[Dict[int, Dict[int, jax.Array]]] = None,
                        sound: bool = False) -> Dict[int, Tuple]:
  """Bounds of every nonlinearity input: {node: (lower, upper)}, each (B, *shape).

  Args:
    tape: the recorded model (interval domain).
    method: fastlin | crown | zero, the relaxation of the layer-by-layer passes.
    intermediate: "linear" (layer by layer, each node's bounds by backward passes over
      the bounds of the nodes before it; the nodes the interval pass bounds exactly are
      taken from it) or "ibp" (the tape's intervals).
    chunk_bytes, use_patches: see :func:`linear_bounds`.
    intersect_ibp: intersect each linear bound with the tape's interval of the same node
      (:func:`intersect`) before the later layers use it. False: textbook CNN-Cert, the
      linear bounds as they are (see WORKSPACE.md).
    alphas: optional {node: {ReLU input node: (B, *S) lower slopes}}: the slopes the
      backward passes bounding ``node`` use (alpha-CROWN with optimised intermediate
      bounds; sound for every value); the others use ``method``'s.
    sound: sound in floating point (``tape`` recorded in the sound interval domain):
      every backward pass gets its float error radius (:mod:`dm_jax.bounds.float_error`).
  """
  bounds: Dict[int, Tuple] = {}
  alphas = alphas or {}
  cache: Dict[int, jax.Array] = {}  # the error radii, extended node by node
  for node, by_backward in _bounded_nodes(tape, intermediate):
    if not by_backward:
      bounds[node] = interval_of(tape, node)
      continue
    a = alphas.get(node)
    error = (jax.lax.stop_gradient(float_error.error_radius(tape, node, bounds, cache=cache))
             if sound else None)
    if use_patches and patches.supported(tape, node):
      lu = patches.identity_bounds(tape, node, bounds, method, chunk_bytes, a, error)
    else:
      lu = _identity_bounds(tape, node, bounds, method, chunk_bytes, a, error)
    bounds[node] = intersect(lu, interval_of(tape, node)) if intersect_ibp else lu
  return bounds


# ------------------------------------------------------------------ alpha-CROWN

ALPHA_OBJECTIVES = ("sum", "min")


@dataclasses.dataclass(frozen=True)
class AlphaConfig:
  """Options of alpha-CROWN (``method="alpha_crown"``; Xu et al. 2021, "Fast and complete").

  The lower slope of every unstable ReLU is a free parameter ``alpha`` in [0, 1]
  (:func:`relaxations.relu_relaxation`); every value gives a sound bound. They start at
  CROWN's adaptive choice and are optimised by projected Adam (clipped to [0, 1] after
  every update) to raise the output rows' lower bounds; each row keeps the best bound
  of every iterate (CROWN's included), so the result is sound and never looser than
  CROWN's with the same intermediate bounds.

  Attributes:
    steps: Adam steps (0: CROWN's bound). The bound is evaluated ``steps + 2`` times
      (CROWN's, one per step, the last iterate), ``steps`` of them with gradients.
    lr: Adam's learning rate (the slopes live in [0, 1]).
    objective: what the steps maximise, per example: ``"sum"`` of its rows' lower bounds
      (auto_LiRPA's default) or ``"min"``, its smallest row (the worst margin, what
      certification needs; the gradient then reaches that row only).
    per_row: one slope per specification row, ``(B, R, *S)`` per ReLU layer, instead of
      one shared by the rows, ``(B, *S)`` (tighter, R times the parameters; each row's
      backward pass is vmapped over the rows).
    optimize_intermediate: also optimise separate slopes for the bounds of every
      intermediate layer computed by backward passes (one set per such layer and per
      ReLU layer before it, shared by the layer's neurons), recomputed at every step
      (auto_LiRPA's ``optimize_bound_args``); the output bound's gradient reaches them
      through the intermediate bounds. Sound for every value. Costs ``steps + 1``
      intermediate passes with gradients instead of one without. Needs
      ``intermediate="linear"``.
    unroll: the steps as a Python loop (True) or a ``lax.fori_loop`` (False, default:
      on XLA:CPU the loop ran faster here, 1.13 s against 1.72 s for 32 points of
      small-s2, and compiled in 16 s against 37 s; WORKSPACE.md).
  """
  steps: int = 20
  lr: float = 0.1
  objective: str = "sum"
  per_row: bool = False
  optimize_intermediate: bool = False
  unroll: bool = False

  def __post_init__(self):
    if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) \
        or self.steps < 0:
      raise ValueError(f"alpha steps must be an integer >= 0; got {self.steps!r}.")
    if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float, np.floating)) \
        or not math.isfinite(self.lr) or self.lr <= 0:
      raise ValueError(f"alpha lr must be a finite number > 0; got {self.lr!r}.")
    if self.objective not in ALPHA_OBJECTIVES:
      raise ValueError(f"alpha objective must be one of {', '.join(ALPHA_OBJECTIVES)}; got "
                       f"{self.objective!r}.")
    for name in ("per_row", "optimize_intermediate", "unroll"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"alpha {name} must be True or False; got "
                         f"{getattr(self, name)!r}.")


def _relu_inputs(tape: Tape, target: int) -> Dict[int, Any]:
  """{ReLU input node: its constant c} of the ReLUs a backward pass from ``target``
  crosses (the nodes its slopes live on), in backward order."""
  needed, out = {target}, {}
  for e in reversed(tape.entries):
    if e.out > target or e.out not in needed:
      continue
    needed.update(n for _, n in e.nodes())
    if e.kind == primitives.TAPE_RELU:
      out.setdefault(e.node, e.relu_const)
  return out


def _initial_alphas(tape: Tape, target: int, bounds: Dict[int, Tuple], rows=None):
  """CROWN's slopes at every ReLU before ``target``: {node: (B, *S)}, or (B, rows, *S)."""
  out = {}
  for node, const in _relu_inputs(tape, target).items():
    a = relaxations.initial_alpha(*bounds[node], const)
    out[node] = a if rows is None else jnp.broadcast_to(
        a[:, None], a.shape[:1] + (rows,) + a.shape[1:])
  return out


def alpha_crown_lower_bounds(tape: Tape, A: jax.Array, bounds: Dict[int, Tuple],
                             config: AlphaConfig, *,
                             chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                             use_patches: bool = True,
                             intersect_ibp: bool = False,
                             sound: bool = False) -> jax.Array:
  """alpha-CROWN's lower bounds of the rows ``A`` (B, R, *output_shape): (B, R).

  Args:
    tape: the recorded model.
    A: the rows' coefficients at the output.
    bounds: the intermediate bounds (CROWN's or IBP's, computed once): every iterate uses
      them unless ``config.optimize_intermediate``, where they give the starting slopes
      and the iterates recompute their own (layer by layer with their slopes, each
      intersected with IBP's interval with ``intersect_ibp``).
    config: the options (:class:`AlphaConfig`).
    chunk_bytes, use_patches: as :func:`linear_bounds` (the intermediate passes).
    sound: every iterate's bound sound in floating point (a sound tape; the float error
      radius of :mod:`dm_jax.bounds.float_error` does not depend on the slopes, so one
      serves every iterate unless the intermediate bounds move).

  Returns:
    The element-wise maximum over the iterates of the row bounds: CROWN's (with
    ``bounds``), one per Adam step, and the last. Each is sound (every slope in [0, 1]
    is), so is their maximum, and it is never below CROWN's.
  """
  out = tape.output
  rows = A.shape[1]
  radius = lambda b: (jax.lax.stop_gradient(float_error.error_radius(tape, out, b))
                      if sound else None)
  error = radius(bounds)
  crown = backward(tape, out, A, bounds, "crown", error=error)
  if config.steps == 0:
    return crown
  params = {"output": _initial_alphas(tape, out, bounds, rows if config.per_row else None)}
  if config.optimize_intermediate:
    params["layers"] = {node: _initial_alphas(tape, node, bounds)
                        for node, by_backward in _bounded_nodes(tape, "linear")
                        if by_backward}

  def lower(alphas):
    inter, err = bounds, error
    if config.optimize_intermediate:
      inter = intermediate_bounds(tape, "crown", "linear", chunk_bytes, use_patches,
                                  intersect_ibp, alphas=alphas["layers"], sound=sound)
      err = radius(inter)
    if not config.per_row:
      return backward(tape, out, A, inter, "crown", alphas=alphas["output"], error=err)
    # Row r's bound depends on its coefficients and slopes only: a pass per row.
    one = lambda a, al: backward(tape, out, a[:, None], inter, "crown", alphas=al,
                                 error=err)[:, 0]
    return jax.vmap(one, in_axes=(1, 1), out_axes=1)(A, alphas["output"])

  def loss(alphas):
    low = lower(alphas)
    gain = jnp.sum(low) if config.objective == "sum" else jnp.sum(jnp.min(low, axis=1))
    return -gain, low

  opt = optax.adam(config.lr)
  value_and_grad = jax.value_and_grad(loss, has_aux=True)

  def step(carry):
    alphas, state, best = carry
    (_, low), grads = value_and_grad(alphas)
    updates, state = opt.update(grads, state, alphas)
    alphas = jax.tree_util.tree_map(lambda a: jnp.clip(a, 0.0, 1.0),
                                    optax.apply_updates(alphas, updates))
    return alphas, state, jnp.maximum(best, low)

  carry = (params, opt.init(params), crown)
  if config.unroll:
    for _ in range(config.steps):
      carry = step(carry)
  else:
    carry = lax.fori_loop(0, config.steps, lambda _, c: step(c), carry)
  alphas, _, best = carry
  return jnp.maximum(best, lower(alphas))


# ------------------------------------------------ random-projection estimates

def _linear_part(entry: Entry, node_values: Dict[int, Any]):
  """The entry's equation with operand ``j`` replaced by ``node_values[j]`` for every
  input-dependent operand, and its bias (the constants added) set to zero."""
  eqn = entry.eqn
  prim = primitives.rule(eqn.primitive.name)
  args = []
  for j, ref in enumerate(entry.refs):
    if isinstance(ref, NodeRef):
      args.append(node_values[j])
    elif primitives.is_bias_operand(prim, j):
      args.append(jnp.zeros_like(ref.value))
    else:
      args.append(ref.value)
  return eqn.primitive.bind(*args, **eqn.params)


def cauchy_scale(samples: jax.Array, axis: int) -> jax.Array:
  """Estimate of ``gamma`` from i.i.d. Cauchy(0, gamma) samples along ``axis``.

  The bias-corrected geometric mean ``cos(pi / (2k))^k prod_j |x_j|^(1/k)`` (Li, 2008,
  "Estimators and tail bounds for dimension reduction in l_alpha"): the same asymptotic
  variance as the sample median Wong et al. use (``pi^2 gamma^2 / (4k)``), unbiased, and
  smooth; a median needs a sort, which made half of a training step on CPU.
  """
  k = samples.shape[axis]
  log_abs = jnp.log(jnp.maximum(jnp.abs(samples), jnp.finfo(samples.dtype).tiny))
  return math.cos(math.pi / (2 * k)) ** k * jnp.exp(jnp.mean(log_abs, axis=axis))


def projected_intermediate_bounds(tape: Tape, num_projections: int,
                                  key: jax.Array) -> Dict[int, Tuple]:
  """Estimates of the Fast-Lin intermediate bounds by random Cauchy projections.

  Wong, Schmidt, Metzen & Kolter, "Scaling provable adversarial defenses" (NeurIPS
  2018), Section 3.2. With Fast-Lin's relaxation every ReLU output is
  ``y = d x + b + delta``, ``delta`` in ``[0, gap]`` (``d = u / (u - l)`` on unstable
  neurons, the gap between the upper and lower lines), so every later value is
  ``c + G [delta_input; delta_1; ...]`` with the noise symbols in ``[-1, 1]`` and a
  generator matrix ``G``; its Fast-Lin bounds are ``c -/+ ||G_row||_1``. One forward
  pass gives the centres ``c``; the row l1 norms are estimated by pushing
  ``num_projections`` random Cauchy vectors through the same linear maps (fresh noise
  at every ReLU, scaled by the half gap): ``g . r`` is Cauchy with scale ``||g||_1`` for
  ``r`` i.i.d. standard Cauchy, estimated by :func:`cauchy_scale` (geometric mean; Wong et
  al. take the median, which has the same asymptotic variance). Cost:
  ``num_projections + 1`` forward passes, instead of one backward pass per neuron.

  The estimates are NOT sound bounds (a consistent estimator, off by about
  ``pi / (2 sqrt(k))``, 22% at k = 50, per neuron). They are for training (``bounded`` with
  projections); certify with exact bounds.

  Args:
    tape: the recorded model (its input set must be l-inf).
    num_projections: k, the number of Cauchy vectors.
    key: ``jax.random`` key.

  Returns:
    {node: (lower, upper)} for every ReLU input (exact intervals where the interval pass
    is exact, i.e. up to the first linear layer).
  """
  if tape.iset.norm != "linf":
    raise ValueError("Random projections estimate l1 norms (the dual of l-inf); they "
                     f"support norm='linf' only, got {tape.iset.norm!r}. Use exact "
                     "intermediate bounds for other norms.")
  if int(num_projections) < 1:
    raise ValueError(f"num_projections must be >= 1; got {num_projections!r}.")
  k = int(num_projections)
  lower, upper = tape.iset.box()
  centre = {0: (upper + lower) / 2}
  keys = iter(jax.random.split(key, len(tape.entries) + 1))
  noise = lambda half_width: half_width[:, None] * jax.random.cauchy(
      next(keys), (half_width.shape[0], k) + half_width.shape[1:], half_width.dtype)
  proj = {0: noise((upper - lower) / 2)}
  exact = _exact_forward_nodes(tape)
  bounds: Dict[int, Tuple] = {}
  last = max((i for i, e in enumerate(tape.entries) if e.kind != primitives.TAPE_AFFINE),
             default=-1)
  for entry in tape.entries[:last + 1]:
    nodes = dict(entry.nodes())
    if entry.kind == primitives.TAPE_AFFINE:
      centre[entry.out] = entry.eqn.primitive.bind(
          *[centre[r.index] if isinstance(r, NodeRef) else r.value for r in entry.refs],
          **entry.eqn.params)
      js = sorted(nodes)
      lin = lambda *ts, js=js, entry=entry: _linear_part(entry, dict(zip(js, ts)))
      proj[entry.out] = jax.vmap(lin, in_axes=1, out_axes=1)(*[proj[nodes[j]] for j in js])
      continue
    if entry.kind != primitives.TAPE_RELU:
      raise UnsupportedPrimitiveError(entry.eqn.primitive.name, "random projections",
                                      "only ReLU networks; use exact intermediate bounds")
    (node,) = nodes.values()
    if node not in bounds:
      if node in exact:
        bounds[node] = interval_of(tape, node)
      else:
        radius = cauchy_scale(proj[node], axis=1)
        bounds[node] = (centre[node] - radius, centre[node] + radius)
    l, u = bounds[node]
    slope, lo_b, _, up_b = relaxations.relu_relaxation(l, u, entry.relu_const, "fastlin")
    lo_b = 0.0 if lo_b is None else lo_b
    centre[entry.out] = slope * centre[node] + (lo_b + up_b) / 2
    proj[entry.out] = slope[:, None] * proj[node] + noise((up_b - lo_b) / 2)
  return bounds


# ------------------------------------------------------------------------ public

def margin_spec(y: jax.Array, num_classes: int, dtype: DTypeLike = jnp.float32) -> jax.Array:
  """Rows ``e_y - e_j`` for every class j: (B, K, K); row y is zero."""
  eye = jnp.eye(num_classes, dtype=dtype)
  return eye[y][:, None, :] - eye[None, :, :]


def _other_classes(y, num_classes: int):
  """(B, K-1): the classes j != y of each example, in increasing order."""
  j = jnp.arange(num_classes - 1)[None, :]
  return j + (j >= jnp.asarray(y)[:, None]).astype(j.dtype)


def linear_bounds(apply_fn: Callable, params: Any, x: jax.Array, eps: Any,
                  norm: Any = "linf", *, spec: Optional[jax.Array] = None,
                  method: str = "crown", intermediate: Optional[str] = None,
                  k: Optional[int] = None, domain: Optional[Tuple[float, float]] = None,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES, use_patches: bool = True,
                  upper: bool = True, num_projections: int = 50,
                  key: Optional[jax.Array] = None,
                  batch_block: Optional[int] = None, intersect_ibp: bool = False,
                  alpha: Optional[AlphaConfig] = None, sound: bool = False) -> Bounds:
  """Sound bounds of ``spec @ f(x')`` over the input set.

  Args:
    apply_fn, params: the model ``(params, x) -> (B, K) logits``.
    x: (B, ...) nominal inputs; eps, norm, k, domain: the input set (see
      :func:`dm_jax.core.input_sets.make_input_set`).
    spec: (B, R, K) or (R, K) rows; default the identity (per-logit bounds).
    method: fastlin (CNN-Cert-ReLU), crown (CNN-Cert-Ada), zero (CNN-Cert-Zero), ibp
      (interval bounds with the spec folded into the last affine layer), crown_ibp, or
      alpha_crown (CROWN's relaxation with optimised lower slopes, see ``alpha``).
    intermediate: "linear" (layer by layer with the same method; default for
      fastlin/crown/zero, and CROWN's for alpha_crown), "ibp" (interval intermediates;
      default for crown_ibp; with alpha_crown, alpha-CROWN-IBP) or
      "projections" (estimates of the Fast-Lin intermediate bounds by random Cauchy
      projections, Wong et al. 2018; l-inf, ReLU networks; for training only: the
      result is then an estimate, not a sound bound).
    chunk_bytes: memory budget of one chunk of intermediate-bound rows.
    use_patches: compute conv-layer intermediate bounds in patch form (same result,
      much faster; see :mod:`dm_jax.bounds.patches`); False forces the dense form.
    upper: also compute upper bounds (False halves the final pass; ``upper`` is then
      +inf).
    num_projections, key: the number of Cauchy vectors and the ``jax.random`` key for
      ``intermediate="projections"``.
    batch_block: examples per block; the blocks run one after another (``lax.map``),
      which bounds the working set. Each example's bounds do not depend on the others,
      so the bounds are the same (up to float rounding). ``None`` picks
      :func:`default_batch_block`; 0 turns blocking off.
    intersect_ibp: fastlin/crown/zero with ``intermediate="linear"``: intersect every
      intermediate bound with IBP's interval of the same node and take the larger of
      the output bound and IBP's folded one (sound, never looser than IBP; see the
      module docstring). A no-op for ibp and crown_ibp (their intermediates are IBP's).
      False (default): the textbook method.
    alpha: alpha_crown's options (:class:`AlphaConfig`; None: its defaults, 20 steps);
      a ValueError with another method. With ``upper`` the upper rows are ``-spec``'s
      lower rows and share the slopes unless ``alpha.per_row``.
    sound: bounds sound in floating point, for the real-valued network with these
      float weights over the real input set: computed in float64 with the tape's
      intervals and every backward bound widened by a rigorous bound on their rounding
      error and the l-inf box rounded outward, then rounded outward to the input's
      dtype (:mod:`dm_jax.core.rounding`, :mod:`dm_jax.bounds.float_error`). They
      differ from the plain float32 bounds by about a float32 rounding (either way: the
      plain ones are not exact) and are never tighter than them (the plain bounds are
      computed too, :func:`dm_jax.bounds.interval.no_tighter`); the cost is float64
      arithmetic plus the plain pass. Not with
      projections. Under ``jax.jit``, trace and call inside ``jax.enable_x64(True)``
      (:func:`dm_jax.core.rounding.check_x64_trace`).

  Returns:
    Bounds with (B, R) lower and upper.
  """
  return linear_bounds_over(apply_fn, params, make_input_set(x, eps, norm, k, domain),
                            spec=spec, method=method, intermediate=intermediate,
                            chunk_bytes=chunk_bytes, use_patches=use_patches, upper=upper,
                            num_projections=num_projections, key=key,
                            batch_block=batch_block, intersect_ibp=intersect_ibp,
                            alpha=alpha, sound=sound)


def linear_bounds_over(apply_fn: Callable, params: Any, iset: InputSet, *,
                       spec: Optional[jax.Array] = None, method: str = "crown",
                       intermediate: Optional[str] = None,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES, use_patches: bool = True,
                       upper: bool = True, num_projections: int = 50,
                       key: Optional[jax.Array] = None,
                       batch_block: Optional[int] = None,
                       intersect_ibp: bool = False,
                       alpha: Optional[AlphaConfig] = None, sound: bool = False) -> Bounds:
  """:func:`linear_bounds` over a built (validated) input set: (B, R) bounds."""
  method = canonical_method(method)
  batch = iset.x.shape[0]
  if batch_block is None:
    batch_block = default_batch_block(method, intermediate)
  if not isinstance(batch_block, (int, np.integer)) or batch_block < 0:
    raise ValueError(f"batch_block must be a non-negative integer or None; got "
                     f"{batch_block!r}.")
  if not isinstance(intersect_ibp, (bool, np.bool_)):
    raise ValueError(f"intersect_ibp must be True or False; got {intersect_ibp!r}.")
  if intersect_ibp and intermediate == "projections":
    raise ValueError("intersect_ibp applies to exact intermediate bounds "
                     "(intermediate='linear'); projections are estimates for training.")
  alpha = _check_alpha(method, intermediate, alpha)
  if not isinstance(sound, (bool, np.bool_)):
    raise ValueError(f"sound must be True or False; got {sound!r}.")
  if sound and intermediate == "projections":
    raise ValueError("sound=True needs sound intermediate bounds; projections are "
                     "estimates for training.")
  if sound and jnp.dtype(iset.x.dtype) != jnp.dtype(rounding.SOUND_DTYPE):
    # Computed in float64 (the float32 numbers convert exactly), rounded back outward.
    rounding.check_no_subnormals(params, iset.x, iset.eps)
    rounding.check_x64_trace(iset.x)
    dtype = iset.x.dtype
    plain = linear_bounds_over(
        apply_fn, params, iset, spec=spec, method=method, intermediate=intermediate,
        chunk_bytes=chunk_bytes, use_patches=use_patches, upper=upper,
        num_projections=num_projections, key=key, batch_block=batch_block,
        intersect_ibp=intersect_ibp, alpha=alpha)
    with jax.enable_x64(True):
      b = linear_bounds_over(
          apply_fn, rounding.float64(params), iset.take(rounding.float64),
          spec=None if spec is None else rounding.float64(jnp.asarray(spec)),
          method=method, intermediate=intermediate, chunk_bytes=chunk_bytes,
          use_patches=use_patches, upper=upper, num_projections=num_projections, key=key,
          batch_block=batch_block, intersect_ibp=intersect_ibp, alpha=alpha, sound=True)
      return no_tighter(Bounds(rounding.down_to(b.lower, dtype),
                               rounding.up_to(b.upper, dtype)), plain)
  kwargs = dict(method=method, intermediate=intermediate, chunk_bytes=chunk_bytes,
                use_patches=use_patches, upper=upper, num_projections=num_projections,
                intersect_ibp=bool(intersect_ibp), alpha=alpha, sound=bool(sound))
  if not batch_block or batch <= batch_block:
    return _linear_bounds(apply_fn, params, iset, spec, key=key, **kwargs)

  def block_bounds(block_set, sb, i):
    # Each block draws its own projections (the same key would repeat them per block).
    return _linear_bounds(apply_fn, params, block_set, sb,
                          key=None if key is None else jax.random.fold_in(key, i), **kwargs)

  return _blocked(block_bounds, iset, spec, int(batch_block))


def _check_alpha(method: str, intermediate: Optional[str],
                 alpha: Optional[AlphaConfig]) -> Optional[AlphaConfig]:
  """alpha_crown's options, validated (defaults for None); None for the other methods."""
  if method != "alpha_crown":
    if alpha is not None:
      raise ValueError(f"alpha options apply to method='alpha_crown'; got method {method!r}.")
    return None
  if alpha is None:
    alpha = AlphaConfig()
  if not isinstance(alpha, AlphaConfig):
    raise ValueError(f"alpha must be a linear.AlphaConfig or None; got {alpha!r}.")
  if intermediate not in (None, "linear", "ibp"):
    raise ValueError("alpha_crown needs exact intermediate bounds (intermediate='linear' "
                     f"or 'ibp'); got {intermediate!r}.")
  if alpha.optimize_intermediate and intermediate == "ibp":
    raise ValueError("alpha optimize_intermediate optimises the linear intermediate "
                     "bounds; it needs intermediate='linear' (the default), not 'ibp'.")
  return alpha


# Examples per block on CPU (measured with benchmarks/certify_bench.py on a 2-core x86
# CPU, small-s2 CNN, batch 256; docs/benchmarks.md): unblocked, the coefficient tensors
# of large batches outgrow the caches and full CROWN ran at 132 points/s in 2.2 GB,
# CROWN-IBP at 3,200 points/s; blocked, 200+ and 7,000. Accelerators want whole batches.
CPU_BATCH_BLOCK = {"fastlin": 4, "crown": 4, "zero": 4, "crown_ibp": 32, "alpha_crown": 4}


def default_batch_block(method: str, intermediate: Optional[str] = None) -> int:
  """Examples per block when ``batch_block=None``: 0 (no blocking) for ``ibp`` and
  projections and where the CPU-tuned paths are off (GPU/TPU by default,
  :mod:`dm_jax.core.fast_paths`); else :data:`CPU_BATCH_BLOCK` by method."""
  if not fast_paths.enabled() or intermediate == "projections":
    return 0
  return CPU_BATCH_BLOCK.get(canonical_method(method), 0)


def _blocked(fn, iset: InputSet, spec, block: int) -> Bounds:
  """``fn(block_set, spec, block_index)`` on consecutive blocks of examples, concatenated.

  The blocks hold at most ``block`` examples and are made as even as possible; the batch
  is padded to a multiple of their size with copies of its last example (one compiled
  block for any remainder). The set and ``spec`` (where it has a batch axis) are split
  along the batch.
  """
  batch = iset.x.shape[0]
  n_blocks = -(-batch // block)
  block = -(-batch // n_blocks)  # as even as possible: 100 in blocks of <= 32 is 4 x 25
  pad = n_blocks * block - batch

  def split(a):
    a = jnp.asarray(a)
    if pad:
      a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)])
    return a.reshape((n_blocks, block) + a.shape[1:])

  per_example_spec = spec is not None and jnp.ndim(spec) == 3
  xs = (iset.take(split), split(spec) if per_example_spec else None, jnp.arange(n_blocks))

  def one(args):
    block_set, sb, i = args
    b = fn(block_set, sb if per_example_spec else spec, i)
    return b.lower, b.upper

  lo, up = lax.map(one, xs)
  merge = lambda t: t.reshape((n_blocks * block,) + t.shape[2:])[:batch]
  return Bounds(merge(lo), merge(up))


def _linear_bounds(apply_fn, params, iset: InputSet, spec, *, method, intermediate,
                   chunk_bytes, use_patches, upper, num_projections, key,
                   intersect_ibp, alpha, sound=False) -> Bounds:
  """:func:`linear_bounds` on one block's input set (arguments validated there)."""
  tape = record_tape(apply_fn, params, iset, IntervalDomain(sound) if sound else None)
  out_lo, _ = interval_of(tape, tape.output)
  batch, num = out_lo.shape[0], int(np.prod(out_lo.shape[1:]))
  if spec is None:
    spec = jnp.eye(num, dtype=out_lo.dtype)
  spec = jnp.asarray(spec, out_lo.dtype)
  if spec.ndim == 2:
    spec = jnp.broadcast_to(spec[None], (batch,) + spec.shape)
  if spec.ndim != 3 or spec.shape[0] != batch or spec.shape[2] != num:
    raise ValueError(f"spec must have shape (B, R, K) = ({batch}, R, {num}) or (R, K); "
                     f"got {tuple(spec.shape)}.")
  R = spec.shape[1]
  # The upper bound of a row is minus the lower bound of its negation.
  rows = jnp.concatenate([spec, -spec], axis=1) if upper else spec
  A = rows.reshape((batch, -1) + out_lo.shape[1:])
  if method == "ibp":
    low = folded_lower_bounds(tape, A, sound)
  else:
    relax = "crown" if method in ("crown_ibp", "alpha_crown") else method
    if intermediate is None:
      intermediate = "ibp" if method == "crown_ibp" else "linear"
    if intermediate == "projections":
      if key is None:
        raise ValueError("intermediate='projections' needs a jax.random key (key=...).")
      if method == "crown_ibp":
        raise ValueError("crown_ibp has interval intermediate bounds; projections apply "
                         "to fastlin, crown and zero.")
      bounds = projected_intermediate_bounds(tape, num_projections, key)
    elif intermediate in ("linear", "ibp"):
      bounds = intermediate_bounds(tape, relax, intermediate, chunk_bytes, use_patches,
                                   intersect_ibp=intersect_ibp, sound=sound)
    else:
      raise ValueError("intermediate must be 'linear', 'ibp' or 'projections'; got "
                       f"{intermediate!r}.")
    if method == "alpha_crown":
      low = alpha_crown_lower_bounds(tape, A, bounds, alpha, chunk_bytes=chunk_bytes,
                                     use_patches=use_patches, intersect_ibp=intersect_ibp,
                                     sound=sound)
    else:
      error = (float_error.error_radius(tape, tape.output, bounds) if sound else None)
      low = backward(tape, tape.output, A, bounds, relax, error=error)
    if intersect_ibp and intermediate == "linear":
      # The output rows too: IBP's (folded) bound of the same rows, over the same tape.
      low = jnp.maximum(low, folded_lower_bounds(tape, A, sound))
  if not upper:
    return Bounds(low, jnp.full_like(low, jnp.inf))
  return Bounds(low[:, :R], -low[:, R:])


def margin_lower_bounds(apply_fn: Callable, params: Any, x: jax.Array, y: jax.Array,
                        eps: Any, norm: Any = "linf", *, method: str = "crown",
                        intermediate: Optional[str] = None, k: Optional[int] = None,
                        domain: Optional[Tuple[float, float]] = None,
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES, num_projections: int = 50,
                        key: Optional[jax.Array] = None,
                        batch_block: Optional[int] = None,
                        intersect_ibp: bool = False,
                        alpha: Optional[AlphaConfig] = None,
                        sound: bool = False) -> jax.Array:
  """Lower bounds of ``f_y(x') - f_j(x')`` over the set: (B, K), 0 at j == y.

  Arguments as :func:`linear_bounds` (alpha_crown optimises the K - 1 rows j != y;
  ``sound``: sound in floating point).
  """
  return margin_lower_bounds_over(
      apply_fn, params, make_input_set(x, eps, norm, k, domain), y, method=method,
      intermediate=intermediate, chunk_bytes=chunk_bytes, num_projections=num_projections,
      key=key, batch_block=batch_block, intersect_ibp=intersect_ibp, alpha=alpha,
      sound=sound)


def margin_lower_bounds_over(apply_fn: Callable, params: Any, iset: InputSet,
                             y: jax.Array, *, method: str = "crown",
                             intermediate: Optional[str] = None,
                             chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                             num_projections: int = 50, key: Optional[jax.Array] = None,
                             batch_block: Optional[int] = None,
                             intersect_ibp: bool = False,
                             alpha: Optional[AlphaConfig] = None,
                             sound: bool = False) -> jax.Array:
  """:func:`margin_lower_bounds` over a built (validated) input set: (B, K)."""
  y = jnp.asarray(y)
  x = iset.x
  if y.shape != x.shape[:1]:
    raise ValueError(f"y must have shape (B,) = {x.shape[:1]}; got {y.shape}.")
  num_classes = jax.eval_shape(lambda: apply_fn(params, x)).shape[-1]
  # Only the K-1 rows j != y are bounded (the row j == y is zero; bounding it would
  # cost one more row through every backward pass); the zero is put back after.
  others = _other_classes(y, num_classes)
  eye = jnp.eye(num_classes, dtype=x.dtype)
  spec = eye[y][:, None, :] - eye[others]
  b = linear_bounds_over(apply_fn, params, iset, spec=spec, method=method,
                         intermediate=intermediate, chunk_bytes=chunk_bytes, upper=False,
                         num_projections=num_projections, key=key, batch_block=batch_block,
                         intersect_ibp=intersect_ibp, alpha=alpha, sound=sound)
  rows = jnp.arange(x.shape[0])[:, None]
  return jnp.zeros((x.shape[0], num_classes), b.lower.dtype).at[rows, others].set(b.lower)


def worst_margin(lb: jax.Array, y: jax.Array) -> jax.Array:
  """``min_{j != y} lb_j``: (B,) from (B, K) margin lower bounds (as returned by
  :func:`margin_lower_bounds`); a point is certified exactly where it is > 0."""
  return jnp.min(jnp.where(jax.nn.one_hot(y, lb.shape[-1], dtype=bool), jnp.inf, lb),
                 axis=-1)


def relu_input_bounds(apply_fn: Callable, params: Any, x: jax.Array, eps: Any,
                      norm: Any = "linf", *, method: str = "crown",
                      k: Optional[int] = None, domain: Optional[Tuple[float, float]] = None,
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES, intersect_ibp: bool = False
                      ) -> List[Tuple[jax.Array, jax.Array]]:
  """Bounds (lower, upper) of every ReLU input, in execution order, with ``method``'s
  intermediate bounds (layer by layer; ``ibp``/``crown_ibp`` give interval bounds,
  ``alpha_crown`` CROWN's, those its default fixes), each intersected with IBP's
  interval with ``intersect_ibp``."""
  method = canonical_method(method)
  method = "crown" if method == "alpha_crown" else method
  iset = make_input_set(x, eps, norm, k, domain)
  tape = record_tape(apply_fn, params, iset)
  relax = "crown" if method in ("crown_ibp", "ibp") else method
  inter = "ibp" if method in ("crown_ibp", "ibp") else "linear"
  bounds = intermediate_bounds(tape, relax, inter, chunk_bytes, intersect_ibp=intersect_ibp)
  nodes = [e.node for e in tape.entries
           if e.kind == primitives.TAPE_RELU and relaxations.is_zero(e.relu_const)]
  return [bounds[n] for n in nodes]
