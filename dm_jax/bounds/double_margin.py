"""The Double Margin triple ``(z, s, v)`` (paper Section 3.2, eqs. 7-9).

Propagated alongside each other over the traced model:

* affine map ``A`` with linear part ``W``: ``z' = A z``, ``s' = |W| s``, ``v' = |W| v``;
* non-decreasing ``g`` (ReLU element-wise, or max pooling):
  ``z' = g(z)``, ``s' = (g(z + s) - g(z - s)) / 2``,
  ``v' = (g(z + v) - g(z - v)) / 2 + |g(z + s + v) + g(z - s - v) - 2 g(z)| / 2``.

Start: ``z = x``, ``s = eps``, ``v = 0`` (l-inf); for l2/l1/l0 the first linear layer
gets the exact half range (see :mod:`dm_jax.core.propagation`). With a data box (``domain``,
l-inf) the expansion point moves to the centre of the clipped interval
``[max(x - eps, lo), min(x + eps, hi)]``, with ``s`` its half width, so the start is that
interval exactly (``z`` is then the network at the centre, a point of the set; it equals
``f(x)`` where nothing is clipped). Keeping ``z = x`` with a symmetric ``s`` would model a
pixel at 0 as ``[-eps/2, eps/2]`` instead of ``[0, eps]``.

Variants (paper Table 2): ``"s_only"`` (Variation 1: no v) and ``"ibp_v"`` (Variation 2:
IBP bounds ``l, u`` replace ``z - s, z + s`` in the v rule and in the objective).

Double Margin is NOT a sound bound; it is a training signal. Certify with
:mod:`dm_jax.verify.certify`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from dm_jax.bounds import linear
from dm_jax.core import propagation
from dm_jax.core.input_sets import InputSet, canonical_norm, make_input_set
from dm_jax.core.propagation import Abstract

VARIANTS = ("dm", "s_only", "ibp_v")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Margins:
  """Double Margin triple for a tensor of shape (B, ...).

  Attributes:
    z: nominal value.
    s: first-order margin (>= 0). For ``ibp_v`` the IBP radius ``(u - l) / 2``.
    v: second-order margin (>= 0); zeros for ``s_only``.
    lower, upper: the ends the objective uses: ``z -/+ (s + v)``, or for ``ibp_v``
      ``l - v`` and ``u + v``.
  """
  z: jax.Array
  s: jax.Array
  v: jax.Array
  lower: jax.Array
  upper: jax.Array


class DoubleMarginDomain(propagation.ForwardDomain):
  """centres = (z,), radii = (s, v); for s_only radii = (s,)."""

  def __init__(self, variant: str = "dm"):
    self.variant = variant
    self.name = f"double-margin ({variant})"

  def from_range(self, nominal: jax.Array, down: jax.Array, up: jax.Array) -> Abstract:
    s = (up + down) / 2
    if self.variant == "s_only":
      return Abstract((nominal,), (s,))
    return Abstract((nominal,), (s, jnp.zeros_like(s)))

  def monotone(self, g: Callable[[jax.Array], jax.Array], a: Abstract) -> Abstract:
    (z,) = a.centres
    gz = g(z)
    if self.variant == "s_only":
      (s,) = a.radii
      return Abstract((gz,), ((g(z + s) - g(z - s)) / 2,))
    s, v = a.radii
    s_new = (g(z + s) - g(z - s)) / 2
    v_new = ((g(z + v) - g(z - v)) / 2
             + jnp.abs(g(z + s + v) + g(z - s - v) - 2 * gz) / 2)
    return Abstract((gz,), (s_new, v_new))

  def value_range(self, a: Abstract) -> Tuple[jax.Array, jax.Array]:
    m = to_margins(a, self.variant)
    return m.lower, m.upper


class IbpPlusVDomain(propagation.ForwardDomain):
  """Variation 2: centres = (z, c_ibp), radii = (r_ibp, v)."""

  name = "double-margin (ibp_v)"

  def from_range(self, nominal: jax.Array, down: jax.Array, up: jax.Array) -> Abstract:
    r = (up + down) / 2
    return Abstract((nominal, nominal + (up - down) / 2), (r, jnp.zeros_like(r)))

  def monotone(self, g: Callable[[jax.Array], jax.Array], a: Abstract) -> Abstract:
    (z, c), (r, v) = a.centres, a.radii
    gz, lo, hi = g(z), g(c - r), g(c + r)
    v_new = ((g(z + v) - g(z - v)) / 2
             + jnp.abs(g(c + r + v) + g(c - r - v) - 2 * gz) / 2)
    return Abstract((gz, (hi + lo) / 2), ((hi - lo) / 2, v_new))

  def value_range(self, a: Abstract) -> Tuple[jax.Array, jax.Array]:
    m = to_margins(a, "ibp_v")
    return m.lower, m.upper


def make_domain(variant: str) -> propagation.ForwardDomain:
  if variant in ("dm", "s_only"):
    return DoubleMarginDomain(variant)
  if variant == "ibp_v":
    return IbpPlusVDomain()
  raise ValueError(f"Unknown Double Margin variant {variant!r}; expected one of "
                   f"{', '.join(VARIANTS)}.")


def to_margins(a: Abstract, variant: str) -> Margins:
  if variant == "ibp_v":
    (z, c), (r, v) = a.centres, a.radii
    return Margins(z, r, v, c - r - v, c + r + v)
  z = a.centres[0]
  s = a.radii[0]
  v = a.radii[1] if variant == "dm" else jnp.zeros_like(s)
  return Margins(z, s, v, z - s - v, z + s + v)


def expands_at_box_centre(variant: str, norm: str,
                          domain: Optional[Tuple[float, float]]) -> bool:
  """Whether :func:`double_margin` expands at the clipped box's centre instead of at x
  (``dm``/``s_only`` on the l-inf ball with a data box), so that ``Margins.z`` is the
  network there, not ``f(x)``."""
  return domain is not None and canonical_norm(norm) == "linf" and variant != "ibp_v"


def _start_set(x, eps, norm, k, domain, variant) -> InputSet:
  """The input set the triple starts from (re-centred on the clipped box, see
  :func:`expands_at_box_centre`)."""
  iset = make_input_set(x, eps, norm, k, domain)
  if expands_at_box_centre(variant, iset.norm, domain):
    lower, upper = iset.box()
    iset = make_input_set((lower + upper) / 2, (upper - lower) / 2, "linf")
  return iset


def double_margin(apply_fn: Callable, params: Any, x: jax.Array, eps: Any,
                  norm: Any = "linf", *, variant: str = "dm", k: Optional[int] = None,
                  domain: Optional[Tuple[float, float]] = None,
                  return_relu_inputs: bool = False
                  ) -> Union[Margins, Tuple[Margins, Tuple[Margins, ...]]]:
  """The Double Margin triple of ``apply_fn(params, .)`` at ``x`` for radius ``eps``.

  Args:
    apply_fn: pure function ``(params, x) -> logits`` (e.g. a Flax ``model.apply``).
    params: its parameters.
    x: (B, ...) nominal inputs.
    eps: scalar, (B,) or x.shape (linf only). Ignored for l0.
    norm: "linf", "l2", "l1" or "l0".
    variant: "dm" (default), "s_only" or "ibp_v".
    k: changed coordinates for l0.
    domain: optional (lo, hi) data box. For linf the start is the clipped interval
      itself: for ``dm``/``s_only`` it is expanded at its centre (``z`` is then the
      network's value at the centre, not at ``x``; see the module docstring), for
      ``ibp_v`` the IBP part takes it exactly and ``z`` stays ``f(x)``.
    return_relu_inputs: also return the Margins of every ReLU input.

  Returns:
    :class:`Margins` of the (B, K) output, and with ``return_relu_inputs`` a tuple of
    Margins for every ReLU input.
  """
  out, relus = propagation.propagate(apply_fn, params,
                                     _start_set(x, eps, norm, k, domain, variant),
                                     make_domain(variant))
  if return_relu_inputs:
    return to_margins(out, variant), tuple(to_margins(a, variant) for a in relus)
  return to_margins(out, variant)


def folded_margins(apply_fn: Callable, params: Any, x: jax.Array, y: jax.Array, eps: Any,
                   norm: Any = "linf", *, variant: str = "dm", k: Optional[int] = None,
                   domain: Optional[Tuple[float, float]] = None
                   ) -> Tuple[Margins, jax.Array]:
  """Double Margin's lower ends of the margins ``f_y - f_j`` with the specification
  folded into the affine layers after the last nonlinearity.

  The triple is propagated as in :func:`double_margin` up to the last nonlinearities;
  there each value ``h`` takes its Double Margin range ``[lower, upper]`` and the margin
  ``c_j . F(h)`` (F the affine rest of the network, ``c_j = e_y - e_j``) its lower end
  ``c_j . F(z_h) - |c_j W_F| (s + v)_h`` for ``dm``. Unfolded, every logit is widened
  separately and the margin's width is ``(|W_y| + |W_j|)(s + v)_h``; folded it is
  ``|W_y - W_j| (s + v)_h``, as IBP's folded margins (Gowal et al. 2018). Like the
  triple itself this is a training signal, not a bound.

  Args:
    as :func:`double_margin`; ``y``: (B,) integer labels.

  Returns:
    (margins, lower): the output :class:`Margins` and (B, K) lower ends of the margins,
    0 at ``j == y``.
  """
  tape = linear.record_tape(apply_fn, params, _start_set(x, eps, norm, k, domain, variant),
                            make_domain(variant))
  out = tape.values[tape.output]
  spec = linear.margin_spec(jnp.asarray(y), out.shape[-1], out.centres[0].dtype)
  return to_margins(out, variant), linear.folded_lower_bounds(tape, spec)


def split_cross_entropy(logits_upper: jax.Array, logits_lower: jax.Array,
                        labels: jax.Array) -> jax.Array:
  """``L+(upper) + L-(lower)`` for softmax cross-entropy: logsumexp(upper) - lower[y].

  Args:
    logits_upper, logits_lower: (B, K).
    labels: (B,) integer classes.

  Returns:
    (B,) the loss at the worst-case logits the margins describe.
  """
  lse = jax.nn.logsumexp(logits_upper, axis=-1)
  true = jnp.take_along_axis(logits_lower, labels[:, None], axis=-1)[:, 0]
  return lse - true


def dm_regularizer(m: Margins, labels: jax.Array) -> jax.Array:
  """Eq. 9: ``R = mean[L+(z + s + v) + L-(z - s - v) - L(z)]`` (cross-entropy)."""
  clean = split_cross_entropy(m.z, m.z, labels)
  return jnp.mean(split_cross_entropy(m.upper, m.lower, labels) - clean)
