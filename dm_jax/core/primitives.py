"""What dm_jax knows about each JAX primitive, in one table.

Every bound domain reads this table instead of keeping its own sets: the forward domains
(interval, Double Margin) in :mod:`dm_jax.core.propagation`, the linear (CROWN-family) tape
and backward pass in :mod:`dm_jax.bounds.linear`, the windowed backward pass in
:mod:`dm_jax.bounds.patches`, the exact MIP in :mod:`dm_jax.verify.mip`, and the message of
:class:`dm_jax.core.errors.UnsupportedPrimitiveError`. A primitive not listed here is
unsupported wherever it depends on the perturbed input (it is evaluated as usual where
it does not: on weights, shapes, constants).

Adding a primitive: one ``Rule`` in :data:`RULES`; then, only if its ``forward`` rule is
new, one branch in ``propagation.affine`` (affine maps), ``propagation.monotone_function``
or ``propagation.nonlinear``. An element-wise nonlinearity of known curvature (``tape``
TAPE_ACTIVATION, a ``curvature``) needs nothing in the linear methods: its relaxation
lines are built from the function and its derivative (:mod:`dm_jax.bounds.activations`).

Besides primitives, the table holds *composites*: calls (``custom_jvp_call``) that are
recognised as a whole because their body, primitive by primitive, cannot be bounded
well (``jnp.logaddexp``, hence ``jax.nn.softplus``: a max, an ``abs``, a NaN test).
:data:`COMPOSITES` gives the reference function; a call is the composite when its body
is the reference's own (:func:`dm_jax.core.interpreter.composite_of`), and the domains
then see one equation named after it.
"""
from __future__ import annotations

import dataclasses
from typing import (Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Tuple,
                    Union)

import jax.numpy as jnp

# kind: what the primitive is, as a function of its input-dependent operands.
AFFINE = "affine"        # affine (linear part + offset)
MONOTONE = "monotone"    # non-decreasing in its one operand (element-wise or a window max)
MAX_MIN = "max_min"      # max/min with a constant: ReLU when max(x, 0)
CLAMP = "clamp"          # clamp(lo, x, hi), constant lo and hi
ELEMENTWISE = "elementwise"  # element-wise, not non-decreasing (x**2, |x|, erfc)

# operands: which operands may depend on the input (checked by every domain).
FIRST = "first"          # only operand 0 (the others are indices, shapes, divisors, ...)
ONE = "one"              # exactly one of the two (a bilinear map with one operand fixed)
ANY = "any"              # any of them: jointly affine
DATA = "data"            # any but operand 0 (select_n: the selector)
NOT_INDICES = "not_indices"  # operands 0 and 1, not the start indices (dynamic_update_slice)
MIDDLE = "middle"        # operand 1 only (clamp(lo, x, hi))

# constants: the role of an operand that does not depend on the input, in an affine map.
COEFFICIENT = "coefficient"  # it multiplies the input: the map has no offset (mul, dot, div)
BIAS = "bias"                # it is added: zero in the linear part, its value the offset
INDEX = "index"              # an index or shape: kept as it is, no offset

# forward: the rule of the forward domains (propagation.affine / monotone_function).
MAP = "map"              # the same op maps every centre and every radius (|coefficients| = 1)
NEG = "neg"              # radii unchanged
SUM = "sum"              # radii add up
ABS = "abs"              # radii through the op with the constant operand's absolute value
DIV = "div"              # radii divided by |divisor|
CONCAT = "concatenate"   # radii concatenated, a constant operand has radius 0
PAD = "pad"              # radii padded with 0
SELECT = "select"        # radii selected, a constant case has radius 0
UNARY = "unary"          # non-decreasing g applied to the bounds (MONOTONE kind)
EXTREMUM = "extremum"    # max/min with a constant (MAX_MIN kind)
CLAMPED = "clamped"      # clamp with constant ends (CLAMP kind)
DECREASING = "decreasing"  # non-increasing g: g(-t) is non-decreasing in -x
VALLEY = "valley"        # non-increasing below 0, non-decreasing above (x**2, |x|):
                         # the interval image [g(clip(0, l, u)), max(g(l), g(u))]
POWER = "power"          # integer_pow: UNARY for odd powers, VALLEY for even ones
# (The interval domain only: VALLEY, and PRODUCT, mul's rule when both operands depend on
# the input: the interval product, min and max of the four corner products. Double
# Margin's rules are for monotone maps.)
PRODUCT = "product"
INTERVAL_ONLY = frozenset({VALLEY, PRODUCT})

# tape: how the linear (CROWN-family) methods record it; None: they do not support it.
TAPE_AFFINE, TAPE_RELU, TAPE_MAXPOOL = "affine", "relu", "maxpool"
TAPE_ACTIVATION = "activation"  # element-wise g of one node: lines from its curvature
TAPE_PRODUCT = "product"        # x * y of two nodes: McCormick planes

# curvature: the shape of an element-wise nonlinearity, for its linear relaxation.
CONVEX = "convex"        # exp, softplus, x**2, |x|
CONCAVE = "concave"      # log1p
S_SHAPED = "s_shaped"    # convex below 0, concave above (tanh, logistic, erf)
REVERSE_S = "reverse_s"  # concave below 0, convex above (x**3, erfc)

# rounding: (forward, transpose) rounding classes of an affine primitive for the sound mode
# (dm_jax.core.rounding.terms): how many roundings one computed element goes through,
# evaluated forward and in the backward pass's transpose. None: not analysed (the sound
# mode raises). Monotone primitives: ROUND_EXACT where the map itself is exact (a max).
ROUND_EXACT = "exact"    # no rounding (permutations, selections, 0/1 coefficients, max)
ROUND_ONE = "one"        # one rounding per element (a + b, a * c)
ROUND_TWO = "two"        # two (the patch form's division: A * (1 / c))
ROUND_SUM = "sum"        # a sum of n terms, n from the equation (rounding.terms)
ROUND_CAST = "cast"      # exact if the cast keeps every value, else unsupported

# patch: the windowed backward pass (dm_jax.bounds.patches) for conv stacks; None: dense only.
PATCH_PASS = "pass"              # identity on values (dtype casts, copies)
PATCH_ELEMENTWISE = "elementwise"  # element-wise with a same-shape or broadcast constant
PATCH_CONV = "conv"              # NHWC convolution of the input-dependent lhs
PATCH_NEG = "neg"                # negation


@dataclasses.dataclass(frozen=True)
class Rule:
  """One primitive's facts (see the constants above for each field's values).

  Attributes:
    kind: AFFINE, MONOTONE, MAX_MIN or CLAMP.
    operands: which operands may depend on the perturbed input.
    constants: the role of the constant operands of an affine map (None otherwise).
    forward: the forward domains' rule, or None where only the MIP supports it.
    tape: how the linear methods record it, or None where they do not support it.
    symbolic: passes the exact first-layer value (an affine function of the input)
      coordinate by coordinate (a permutation or selection), so a row norm stays exact.
    patch: the windowed backward pass's rule, or None.
    mip_max: the MIP encodes it as a max over fixed subsets of its input (MONOTONE only).
    signs: for a sum of operands (forward SUM), the sign each operand enters with
      (``sub``: +1, -1); None means all +1.
    curvature: an element-wise nonlinearity's shape (CONVEX, CONCAVE, S_SHAPED,
      REVERSE_S) from which the linear methods build its lines, or a function of the
      equation's params giving it (None: not relaxed); see :func:`curvature_of`.
    product: mul: with both operands input-dependent it is an element-wise product
      (forward PRODUCT, tape TAPE_PRODUCT), and the same operand twice is its square
      (the rule of ``square``).
    note: what the domains' support depends on, in words (for error messages).
    rounding: (forward, transpose) ROUND_* classes for the sound mode, or None.
  """
  kind: str
  operands: str = ANY
  constants: Optional[str] = None
  forward: Optional[str] = None
  tape: Optional[str] = None
  symbolic: bool = False
  patch: Optional[str] = None
  mip_max: bool = False
  signs: Optional[Tuple[float, ...]] = None
  curvature: Union[None, str, Callable[[Mapping], Optional[str]]] = None
  product: bool = False
  note: str = ""
  rounding: Optional[Tuple[str, str]] = None


def _power_forward(params: Mapping) -> Optional[str]:
  y = params["y"]
  return None if y < 1 else (UNARY if y % 2 else VALLEY)


def _power_curvature(params: Mapping) -> Optional[str]:
  y = params["y"]
  if y < 1:
    return None
  return CONVEX if y % 2 == 0 or y == 1 else REVERSE_S


def _activation(curvature, kind=MONOTONE, forward=UNARY, operands=FIRST, note="") -> Rule:
  return Rule(kind, operands, forward=forward, tape=TAPE_ACTIVATION, curvature=curvature,
              note=note)


_EXACT = (ROUND_EXACT, ROUND_EXACT)
_SUMS = (ROUND_SUM, ROUND_SUM)


def _structural(symbolic: bool = False, patch: Optional[str] = None,
                rounding: Tuple[str, str] = _EXACT) -> Rule:
  return Rule(AFFINE, FIRST, INDEX, MAP, TAPE_AFFINE, symbolic=symbolic, patch=patch,
              rounding=rounding)


RULES: Dict[str, Rule] = {
    # Shape and dtype changes, reductions by sums: linear in operand 0 with coefficients
    # 0/1, so the same op maps a radius.
    "reshape": _structural(symbolic=True),
    "transpose": _structural(symbolic=True),
    "squeeze": _structural(symbolic=True),
    "expand_dims": _structural(symbolic=True),
    "rev": _structural(symbolic=True),
    "slice": _structural(symbolic=True),
    "convert_element_type": _structural(symbolic=True, patch=PATCH_PASS,
                                        rounding=(ROUND_CAST, ROUND_CAST)),
    "copy": _structural(symbolic=True, patch=PATCH_PASS),
    "copy_p": _structural(symbolic=True, patch=PATCH_PASS),
    "reduce_precision": _structural(symbolic=True, patch=PATCH_PASS,
                                    rounding=(ROUND_CAST, ROUND_CAST)),
    "broadcast_in_dim": _structural(rounding=(ROUND_EXACT, ROUND_SUM)),
    "reduce_sum": _structural(rounding=(ROUND_SUM, ROUND_EXACT)),
    "reduce_window_sum": _structural(rounding=_SUMS),
    "dynamic_slice": _structural(),
    "cumsum": _structural(rounding=_SUMS),
    # Bilinear: affine when exactly one operand depends on the input.
    "mul": Rule(AFFINE, ONE, COEFFICIENT, ABS, TAPE_AFFINE, patch=PATCH_ELEMENTWISE,
                product=True, note="a product of two input-dependent operands: interval "
                "and linear only", rounding=(ROUND_ONE, ROUND_TWO)),
    "dot_general": Rule(AFFINE, ONE, COEFFICIENT, ABS, TAPE_AFFINE, rounding=_SUMS),
    "conv_general_dilated": Rule(AFFINE, ONE, COEFFICIENT, ABS, TAPE_AFFINE,
                                 patch=PATCH_CONV, rounding=_SUMS),
    "div": Rule(AFFINE, FIRST, COEFFICIENT, DIV, TAPE_AFFINE, patch=PATCH_ELEMENTWISE,
                rounding=(ROUND_ONE, ROUND_TWO)),
    # Jointly affine; constant operands are offsets.
    "add": Rule(AFFINE, ANY, BIAS, SUM, TAPE_AFFINE, patch=PATCH_ELEMENTWISE,
                rounding=(ROUND_ONE, ROUND_EXACT)),
    "add_any": Rule(AFFINE, ANY, BIAS, SUM, TAPE_AFFINE, patch=PATCH_ELEMENTWISE,
                    rounding=(ROUND_ONE, ROUND_EXACT)),
    "sub": Rule(AFFINE, ANY, BIAS, SUM, TAPE_AFFINE, patch=PATCH_ELEMENTWISE,
                signs=(1.0, -1.0), rounding=(ROUND_ONE, ROUND_EXACT)),
    "neg": Rule(AFFINE, ANY, BIAS, NEG, TAPE_AFFINE, patch=PATCH_NEG, rounding=_EXACT),
    "concatenate": Rule(AFFINE, ANY, BIAS, CONCAT, TAPE_AFFINE, rounding=_EXACT),
    # (Jointly linear in the operand and the padding value; the forward PAD rule takes a
    # constant padding value only.)
    "pad": Rule(AFFINE, ANY, BIAS, PAD, TAPE_AFFINE, rounding=_EXACT),
    "select_n": Rule(AFFINE, DATA, BIAS, SELECT, TAPE_AFFINE, rounding=_EXACT),
    "dynamic_update_slice": Rule(AFFINE, NOT_INDICES, BIAS),  # the MIP only
    # Non-decreasing in their one operand.
    "reduce_window_max": Rule(MONOTONE, FIRST, forward=UNARY, tape=TAPE_MAXPOOL,
                              mip_max=True, rounding=_EXACT),
    "reduce_max": Rule(MONOTONE, FIRST, forward=UNARY, mip_max=True, rounding=_EXACT),
    "cummax": Rule(MONOTONE, FIRST, forward=UNARY, mip_max=True, rounding=_EXACT),
    # Element-wise nonlinearities: a forward rule, and lines from their curvature in the
    # linear methods (dm_jax.bounds.activations).
    "tanh": _activation(S_SHAPED),
    "logistic": _activation(S_SHAPED),
    "erf": _activation(S_SHAPED),
    "exp": _activation(CONVEX),
    "expm1": _activation(CONVEX),
    "log1p": _activation(CONCAVE, note="defined above -1 only, as in the model"),
    "logaddexp": _activation(CONVEX, operands=ONE),  # a composite (COMPOSITES)
    "erfc": _activation(REVERSE_S, kind=ELEMENTWISE, forward=DECREASING),
    "square": _activation(CONVEX, kind=ELEMENTWISE, forward=VALLEY),
    "abs": _activation(CONVEX, kind=ELEMENTWISE, forward=VALLEY),
    "integer_pow": _activation(_power_curvature, kind=ELEMENTWISE, forward=POWER,
                               note="positive powers; Double Margin takes odd ones only"),
    # (The MIP also encodes max/min of two input-dependent tensors; the forward and
    # linear domains take one with a constant.)
    "max": Rule(MAX_MIN, ANY, forward=EXTREMUM, tape=TAPE_RELU, rounding=_EXACT),
    "min": Rule(MAX_MIN, ANY, forward=EXTREMUM, rounding=_EXACT),
    "clamp": Rule(CLAMP, MIDDLE, forward=CLAMPED, rounding=_EXACT),
}

# Composite calls recognised as a whole: name -> the reference function (a call is the
# composite when its body is the reference's, traced on the same operand types).
COMPOSITES: Dict[str, Callable] = {"logaddexp": jnp.logaddexp}

# What an operand check that fails says (the primitive and domain are named around it).
OPERAND_ERRORS = {
    FIRST: "only the first operand may depend on the input",
    ONE: "both operands depend on the input (not affine)",
    DATA: "the selector depends on the input",
    NOT_INDICES: "the indices depend on the input",
}


def rule(name: str) -> Optional[Rule]:
  """The primitive's :class:`Rule`, or None where no domain supports it."""
  return RULES.get(name)


def names(**fields: Any) -> FrozenSet[str]:
  """The primitives whose rule has every given field value, e.g. ``names(kind=AFFINE)``."""
  return frozenset(n for n, r in RULES.items()
                   if all(getattr(r, f) == v for f, v in fields.items()))


def forward_of(r: Optional[Rule], params: Mapping) -> Optional[str]:
  """The forward rule of an equation with ``params`` (integer_pow's depends on its power:
  UNARY for odd, VALLEY for even, None for y < 1)."""
  if r is None:
    return None
  return _power_forward(params) if r.forward == POWER else r.forward


def curvature_of(r: Optional[Rule], params: Mapping) -> Optional[str]:
  """The curvature of an element-wise nonlinearity with ``params``, or None."""
  if r is None or r.curvature is None:
    return None
  return r.curvature(params) if callable(r.curvature) else r.curvature


def square_rule() -> Rule:
  """The rule of ``mul(x, x)``: the same input-dependent operand twice (``square``'s)."""
  return RULES["square"]


def operands_allowed(r: Rule, idx: Iterable[int]) -> bool:
  """Whether the input-dependent operand positions ``idx`` are allowed by ``r``."""
  idx = list(idx)
  if r.operands == FIRST:
    return idx == [0]
  if r.operands == ONE:
    return len(idx) == 1
  if r.operands == DATA:
    return 0 not in idx
  if r.operands == NOT_INDICES:
    return all(i <= 1 for i in idx)
  if r.operands == MIDDLE:
    return idx == [1]
  return True


def is_bias_operand(r: Rule, j: int) -> bool:
  """Whether constant operand ``j`` of an affine map is added to the output (so it is 0
  in the map's linear part and its value is the offset), not a coefficient or index."""
  return r.constants == BIAS and not (r.operands == DATA and j == 0)


def operand_sign(name: str, j: int) -> float:
  """The sign operand ``j`` of a sum-like primitive enters its output with (``sub``'s
  second operand: -1; everything else +1)."""
  signs = rule(name).signs
  return 1.0 if signs is None else signs[j]


def supported_by(name: str) -> str:
  """Which domains support primitive ``name`` where it depends on the input, in words
  (read from its rule), e.g. for ``tanh``: "the interval, Double Margin and linear
  (CROWN-family) domains (not the MIP)"."""
  r = rule(name)
  if r is None:
    return "no domain"
  domains = []
  forward = r.forward
  if forward is not None:
    domains.append("interval")
    if forward not in INTERVAL_ONLY:
      domains.append("Double Margin")
  if r.tape is not None:
    domains.append("linear (CROWN-family)")
  mip = r.kind in (AFFINE, MAX_MIN, CLAMP) or r.mip_max
  if mip:
    domains.append("MIP")
  if not domains:
    return "no domain"
  listed = (domains[0] if len(domains) == 1
            else ", ".join(domains[:-1]) + " and " + domains[-1])
  out = f"the {listed} domain{'s' if len(domains) > 1 else ''}"
  if not mip:
    out += " (not the MIP)"
  if r.note:
    out += f"; {r.note}"
  return out


def supported_summary() -> str:
  """The supported primitives in words, for error messages (read from :data:`RULES`)."""
  def listed(ns):
    return ", ".join(sorted(ns))
  affine = names(kind=AFFINE) - names(forward=None)
  monotone = names(kind=MONOTONE)
  linear = names(tape=TAPE_ACTIVATION)
  return (f"affine maps ({listed(affine)}; mul/div by constants), ReLU and other max/min "
          f"with a constant, clamp with constant ends, non-decreasing maps "
          f"({listed(monotone)}), other element-wise maps "
          f"({listed(names(kind=ELEMENTWISE))}), products of two input-dependent "
          f"values (interval and linear only); the linear methods take ReLU, "
          f"reduce_window_max, {listed(linear)} and products; the MIP affine maps and "
          "max/min; and calls (jit/custom_jvp) made of these")
