"""The training-method registry: the loss signature, the shared losses and ``get_method``.

Every method is a pure, jit-able loss

    loss(params, apply_fn, x, y, hyper, key) -> (scalar_loss, metrics)

where ``apply_fn(params, x) -> logits`` is the (static) model function, ``x`` a (B, ...)
batch in [0, 1], ``y`` (B,) integer labels, ``hyper`` a :class:`Hyper` of per-step
scalars (training radius ``eps``, regularizer weight ``lam``, clean-loss weight
``kappa``; traced under jit and produced by the schedules of ``dm_jax.train``) and
``key`` a PRNG key (the only source of randomness). ``metrics`` is a dict of scalars with
at least ``ce_clean``, ``robust_loss``, ``acc`` and ``loss``.

Each method is registered once, by the module of its family, with a :class:`MethodSpec`:
how to build its loss from the options, its description, the options it reads, whether
its loss is kappa-mixed, its default final lambda and its aliases. Nothing outside this
package branches on a method's name: the trainer and the experiments ask
:func:`canonical_name`, :func:`default_lam_final` and :func:`kappa_form`, and
:func:`get_method` validates the options in one place.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import types
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import optax

from dm_jax.core.input_sets import canonical_norm
from dm_jax.train.methods.penalties import add_penalties

# ``loss(params, apply_fn, x, y, hyper, key) -> (scalar, metrics)``.
LossFn = Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]
# A method's view of its options: name -> resolved value (read-only).
Options = Mapping[str, Any]

LAM_FORMS = ("paper", "kappa")
DEFAULT_LAM_FINAL = 1.0     # methods other than Double Margin: their loss says what lam is
KAPPA_FORM_LAM_FINAL = 0.5  # lam_form="kappa" (SingleProp): lambda = 1 - kappa, 1 -> 0.5

# Options every method accepts: the threat model (norm, k, domain), the weight penalties,
# pruning, and the objective form (which also sets every method's default final lambda).
COMMON_OPTIONS = ("norm", "l1", "l2", "prune", "lam_form", "domain", "k")
# Cost settings of an inner solver (PGD; MMR's sampling of ReLU units). A method without
# that solver ignores them, so one speed setting can serve a sweep over methods.
SOLVER_OPTIONS = ("pgd_steps", "pgd_step_size", "pgd_random_start", "mmr_units",
                  "mmr_k_b")


# ----------------------------------------------------------------------------- types

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Hyper:
  """Per-step scalars, traced under jit (a pytree of three leaves).

  Attributes:
    eps: current training radius (in the [0, 1] input scale).
    lam: current regularizer weight lambda (DM: final 2 for "Double Margin", 1 for
      "Double Margin *"; RS / MMR: the penalty weight; crown_ibp with
      ``crown_ibp_beta="lam"``: Zhang's beta).
    kappa: current clean-loss weight kappa of the IBP-style mixing
      ``kappa CE(clean) + (1 - kappa) CE(robust)`` (SingleProp: 1 -> 0.5).
  """
  eps: jax.Array
  lam: jax.Array
  kappa: jax.Array

  @classmethod
  def create(cls, eps: Any = 0.0, lam: Any = 0.0, kappa: Any = 1.0) -> "Hyper":
    f = lambda t: jnp.asarray(t, dtype=jnp.float32)
    return cls(eps=f(eps), lam=f(lam), kappa=f(kappa))


class Method(NamedTuple):
  """A training method, built by :func:`get_method`.

  Attributes:
    name: the registered name (an alias resolves to its method's name).
    loss: ``loss(params, apply_fn, x, y, hyper, key) -> (scalar, metrics dict)``.
    description: the formula and the paper it comes from.
    needs_ensemble: whether the model must be an ensemble (no method requires one;
      DM works on ensembles as is because their bounds average z, s, v).
    prune: whether the trainer should apply :func:`prune_small_weights` (and then
      :func:`apply_masks` after every update) -- Xiao et al.'s magnitude pruning.
    options: the resolved options (for logging beside results).
  """
  name: str
  loss: Callable
  description: str
  needs_ensemble: bool = False
  prune: bool = False
  options: Optional[Dict[str, Any]] = None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A training method as the registry knows it (what the trainer and experiments need).

  Attributes:
    name: the registered name (``get_method(name)``, ``TrainConfig.method``).
    build: ``build(options) -> loss``. ``options`` is a read-only mapping holding the
      :data:`COMMON_OPTIONS` and this method's ``options``, validated and resolved
      (``norm`` canonical, ``domain`` a float pair or None, penalties with their
      defaults). The loss returns the method's objective *without* the weight penalties
      and metrics with at least ``ce_clean``, ``robust_loss`` and ``acc``; the registry
      adds the ``l1``/``l2`` penalties and the ``loss`` metric. A loss without a
      docstring is documented by its description.
    describe: ``describe(options) -> str``: the formula and the paper it comes from.
    options: the options beyond :data:`COMMON_OPTIONS` that the method reads
      (``get_method`` keywords, or its own ``extra_options``). Any other option given a
      non-default value is a ValueError, except the :data:`SOLVER_OPTIONS` (ignored).
    extra_options: options of the method's own that ``get_method`` does not name, with
      their defaults (give them to ``get_method`` or in ``TrainConfig.method_kwargs``).
    validate: optional ``validate(options) -> dict``: raises ValueError for a bad value
      of the method's options; returns the values it normalises (e.g. an int).
    kappa_lam_forms: the ``lam_form`` values under which the loss is
      ``kappa CE(clean) + (1 - kappa) robust`` (so ``kappa_mode='ada'`` applies).
    lam_final: the default final lambda in the paper form (:func:`default_lam_final`).
    penalty_defaults: weight penalties the method *is* (``{"l1": 2e-5}`` for ``l1``): the
      option 0 means this default, and the description names the penalty already.
    aliases: other names of the method, each with the fields it overrides, e.g.
      ``{"dm*": {"lam_final": 1.0}}`` ("Double Margin *": dm with final lambda 1).
  """
  name: str
  build: Callable[[Options], LossFn]
  describe: Callable[[Options], str]
  options: Tuple[str, ...] = ()
  extra_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  validate: Optional[Callable[[Options], Optional[Dict[str, Any]]]] = None
  kappa_lam_forms: Tuple[str, ...] = ()
  lam_final: float = DEFAULT_LAM_FINAL
  penalty_defaults: Mapping[str, float] = dataclasses.field(default_factory=dict)
  aliases: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- registry

_SPECS: Dict[str, MethodSpec] = {}      # registration order is the order of names()
_ALIASES: Dict[str, str] = {}           # alias -> registered name


def register(method: MethodSpec) -> MethodSpec:
  """Adds ``method`` (and its aliases) to the registry; returns it.

  Raises:
    ValueError: a name or alias already taken, or an extra option that ``get_method``
      names already or another method declares with another default.
  """
  for n in (method.name,) + tuple(method.aliases):
    if n in _SPECS or n in _ALIASES:
      raise ValueError(f"a training method named {n!r} is registered already.")
  for option, default in method.extra_options.items():
    if option in _KEYWORD_DEFAULTS:
      raise ValueError(f"{method.name}: extra option {option!r} is a get_method keyword.")
    other = _extra_option_defaults().get(option, default)
    if other != default:
      raise ValueError(f"{method.name}: extra option {option!r} has default {other!r} "
                       f"in another method, {default!r} here.")
  for option in method.options:
    if option not in _KEYWORD_DEFAULTS and option not in method.extra_options:
      raise ValueError(f"{method.name}: option {option!r} is neither a get_method keyword "
                       "nor one of its extra_options.")
  _SPECS[method.name] = method
  _ALIASES.update((a, method.name) for a in method.aliases)
  return method


def unregister(name: str) -> None:
  """Removes the method ``name`` and its aliases (for tests and interactive use)."""
  method = _SPECS.pop(name)
  for a in method.aliases:
    del _ALIASES[a]


def names(aliases: bool = False) -> Tuple[str, ...]:
  """The registered methods in registration order (then their aliases if ``aliases``)."""
  return tuple(_SPECS) + (tuple(_ALIASES) if aliases else ())


def canonical_name(name: str) -> str:
  """The registered method an alias stands for (``dm*`` -> ``dm``); other names as given."""
  return _ALIASES.get(name, name)


def _find(name: str) -> Optional[MethodSpec]:
  """The spec of ``name`` (an alias: its method's, with the alias's overrides) or None."""
  target = canonical_name(name)
  method = _SPECS.get(target)
  if method is None or target == name:
    return method
  return dataclasses.replace(method, **method.aliases[name])


def spec(name: str) -> MethodSpec:
  """The :class:`MethodSpec` of a registered method or alias.

  Raises:
    ValueError: an unknown name (the message lists the registered ones).
  """
  found = _find(name)
  if found is None:
    alias_list = f" (or the aliases {', '.join(_ALIASES)})" if _ALIASES else ""
    raise ValueError(f"Unknown method {name!r}; expected one of {', '.join(_SPECS)}"
                     f"{alias_list}.")
  return found


def default_lam_final(name: str, lam_form: str = "paper") -> float:
  """The final lambda of method ``name`` when none is given.

  Paper form: the method's ``lam_final`` (Double Margin 2, "Double Margin *" 1, others
  1; an unregistered name 1). ``lam_form="kappa"`` (SingleProp, lambda = 1 - kappa): 0.5.
  """
  if lam_form != "paper":
    return KAPPA_FORM_LAM_FINAL
  found = _find(name)
  return found.lam_final if found is not None else DEFAULT_LAM_FINAL


def kappa_form(name: str, lam_form: str) -> bool:
  """Whether the loss of ``name`` is ``kappa CE(clean) + (1 - kappa) robust`` under
  ``lam_form`` (so ``kappa_mode='ada'`` applies); False for an unregistered name."""
  found = _find(name)
  return found is not None and lam_form in found.kappa_lam_forms


def kappa_form_summary() -> str:
  """The kappa-mixed methods, for messages: ``"ibp, ..., dm (lam_form='kappa'), ..."``."""
  out = []
  for method in _SPECS.values():
    forms = method.kappa_lam_forms
    if forms:
      only = set(forms) != set(LAM_FORMS)
      out.append(method.name + (f" (lam_form={'/'.join(map(repr, forms))})" if only else ""))
  return ", ".join(out)


# ----------------------------------------------------------------------------- helpers

def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of (B, K) logits with (B,) integer labels: a scalar."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Share of the (B, K) logits whose argmax is the (B,) label: a scalar."""
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def worst_case_logits(lower: jax.Array, upper: jax.Array, labels: jax.Array) -> jax.Array:
  """Gowal et al.'s z_hat (B, K): the lower bound for the true class, upper for others."""
  onehot = jax.nn.one_hot(labels, lower.shape[-1], dtype=bool)
  return jnp.where(onehot, lower, upper)


def margin_certified(lb: jax.Array, labels: jax.Array) -> jax.Array:
  """Share of examples whose (B, K) margin lower bounds are > 0 for all j != y."""
  from dm_jax.bounds.linear import worst_margin  # pylint: disable=import-outside-toplevel
  return jnp.mean((worst_margin(lb, labels) > 0).astype(jnp.float32))


def interval_margins(lower: jax.Array, upper: jax.Array, labels: jax.Array) -> jax.Array:
  """Margin lower bounds ``lower_y - upper_j`` (B, K) from (B, K) logit bounds."""
  return jnp.take_along_axis(lower, labels[:, None], axis=-1) - upper


def margin_lower_bounds(apply_fn: Callable, params: Any, x: jax.Array, y: jax.Array, eps: Any,
                        norm: str, method: str, domain: Optional[Tuple[float, float]],
                        k: Optional[int], **kw: Any) -> jax.Array:
  """:func:`dm_jax.bounds.linear.margin_lower_bounds` (B, K), imported when the loss is traced."""
  from dm_jax.bounds import linear  # pylint: disable=import-outside-toplevel
  return linear.margin_lower_bounds(apply_fn, params, x, y, eps, norm, method=method,
                                    domain=domain, k=k, **kw)


# ----------------------------------------------------------------------------- get_method

def get_method(name: str, *, norm: str = "linf", l1: float = 0.0, l2: float = 0.0,
               prune: bool = False, adv: bool = False, pgd_steps: int = 40,
               pgd_step_size: float = 0.01, pgd_random_start: bool = True,
               trades_beta: float = 6.0, lam_form: str = "paper",
               domain: Optional[Tuple[float, float]] = (0.0, 1.0),
               k: Optional[int] = None, ibp_margin: bool = False,
               crown_ibp_beta: Union[float, str] = 1.0, dm_domain: bool = False,
               mmr_units: int = 128, mmr_k_b: int = 64, mmr_k_d: Optional[int] = None,
               mmr_gamma_factor: float = 1.5, mmr_lam_d: float = 1.0,
               bounded_projections: int = 0, **extra_options: Any) -> Method:
  """Builds a registered training :class:`Method` by name.

  Options shared by every method: ``norm``, ``l1``, ``l2``, ``prune``, ``lam_form``,
  ``domain``, ``k``. The others belong to the methods that read them; one given a
  non-default value to another method is a ValueError (the PGD and MMR-sampling cost
  settings in :data:`SOLVER_OPTIONS` excepted: they are ignored there).

  Args:
    name: one of :data:`METHODS`, or an alias (``dm*``).
    norm: threat model of the bounds and attacks ("linf", "l2", "l1", "l0"; PGD-based
      parts support "linf" and "l2").
    l1: weight of the l1 (max row l1 norm) penalty added to any method. For
      ``name="l1"`` a value of 0 means the default 2e-5.
    l2: weight of the squared-kernel penalty added to any method; for ``name="l2"``, 0
      means the default 1e-4.
    prune: marks the method for magnitude pruning by the trainer (Method.prune); see
      :func:`prune_small_weights` / :func:`apply_masks`.
    adv: relu_stability only: replace the clean CE by the PGD CE ("Adv+RS").
    pgd_steps, pgd_step_size, pgd_random_start: PGD for adv, trades, relu_stability+adv.
    trades_beta: TRADES' beta.
    lam_form: "paper" or "kappa". Double Margin's objective: "paper" ((1 - lam) CE + lam
      CE_split, Algorithm 1, weight ``hyper.lam``) or "kappa" (kappa CE + (1 - kappa)
      CE_split, SingleProp form, weight ``hyper.kappa``); for every method "kappa" makes
      the default final lambda 0.5 (:func:`default_lam_final`).
    domain: the data box (lo, hi) or None. Clips PGD, and intersects the input set of
      the sound bounds (ibp, crown_ibp, bounded, relu_stability) -- tighter and sound
      for images. Double Margin uses the plain ball as in the paper unless
      ``dm_domain=True``.
    k: changed coordinates for norm "l0".
    ibp_margin: ibp only: use the tighter margins with the last layer folded in
      (``margin_lower_bounds(method="ibp")``) instead of Gowal's z_hat.
    crown_ibp_beta: crown_ibp only: Zhang et al.'s mix
      ``lb = beta lb_crown_ibp + (1 - beta) lb_ibp``. A float (1 = pure CROWN-IBP, the
      default) or the string "lam" to use ``hyper.lam`` as beta (so the trainer can
      ramp it from 1 to 0 as Zhang et al. do).
    dm_domain: Double Margin only: intersect the DM start interval with ``domain``.
    mmr_units: mmr: number of distinct ReLU units sampled per example (uniformly
      without replacement, fresh each step) whose region-boundary distance
      |z_i| / ||grad_x z_i||_q is computed; each costs one backward pass (memory about
      B x units x #activations floats), so this bounds memory/time. Croce et al. use
      all units; the k_B smallest are then taken among the sampled ones (choice).
    mmr_k_b: mmr: the k_B smallest boundary distances penalised (min(k_B, units)).
    mmr_k_d: mmr: the k_D smallest decision distances (default K - 1: all).
    mmr_gamma_factor: mmr: gamma_B = gamma_D = factor * hyper.eps (choice).
    mmr_lam_d: mmr: lambda_D / lambda_B (lambda_B = hyper.lam).
    bounded_projections: bounded only: 0 (default) computes the Fast-Lin intermediate
      bounds exactly (one backward pass per neuron); k > 0 estimates them with k random
      Cauchy projections (Wong et al. 2018; the paper's baseline uses 50): k + 1
      forward passes, l-inf and ReLU networks only. The final margin bounds are then
      computed exactly from the estimated intermediate bounds.
    **extra_options: options of a method's own (``MethodSpec.extra_options``).

  Returns:
    The :class:`Method`: its loss, description, pruning flag and resolved options.

  Raises:
    ValueError: unknown name or option, an option the method does not read given a
      non-default value, or a bad option value.
  """
  options = dict(locals())
  del options["name"]
  options.update(options.pop("extra_options"))
  method = spec(name)
  _check_options(method, options)
  options = {**method.extra_options, **options, **_resolve_common(method, options)}
  read = COMMON_OPTIONS + tuple(method.options)
  if method.validate is not None:
    options.update(method.validate(_view(options, read)) or {})
  view = _view(options, read)
  description = method.describe(view)
  loss_fn = _with_penalties(method.build(view), options, description)
  for penalty in ("l1", "l2"):
    if options[penalty] and penalty not in method.penalty_defaults:
      description += f" Plus {options[penalty]:g} * {penalty} penalty."
  return Method(name=method.name, loss=loss_fn, description=description,
                needs_ensemble=False, prune=bool(options["prune"]), options=options)


# get_method's keyword options and their defaults.
_KEYWORD_DEFAULTS = {p.name: p.default for p in inspect.signature(get_method).parameters
                     .values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _extra_option_defaults() -> Dict[str, Any]:
  return {o: d for m in _SPECS.values() for o, d in m.extra_options.items()}


def option_defaults() -> Dict[str, Any]:
  """Every method option (get_method's keywords and the registered methods' own) and
  its default."""
  return {**_KEYWORD_DEFAULTS, **_extra_option_defaults()}


def parse_option_value(text: str) -> Any:
  """A get_method option value written as text (command lines): true/false, none/null,
  an int, a float, else the string itself."""
  low = text.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  if low in ("none", "null"):
    return None
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text.strip()


def split_method_entries(text: str) -> List[str]:
  """``"dm[lam_form=kappa;dm_loss=folded],ibp"`` -> its entries: commas inside brackets
  do not split."""
  return [e.strip() for e in re.split(r",(?![^\[]*\])", text) if e.strip()]


def parse_method_entry(entry: str) -> Tuple[str, Dict[str, Any]]:
  """A method with options as command lines write it, ``name`` or
  ``name[option=value;...]`` (values by :func:`parse_option_value`) -> (name, options).

  Raises:
    ValueError: a malformed entry or option, naming it.
  """
  match = re.fullmatch(r"([^\[\]]+)(?:\[(.*)\])?", entry.strip())
  if match is None:
    raise ValueError(f"bad method entry {entry!r}; expected name or "
                     "name[option=value;...]")
  name, text = match.group(1).strip(), match.group(2)
  options: Dict[str, Any] = {}
  for item in filter(None, (text or "").split(";")):
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"bad option {item!r} in {entry!r}; expected option=value")
    options[key.strip()] = parse_option_value(value)
  return name, options


def _check_options(method: MethodSpec, options: Dict[str, Any]) -> None:
  """ValueError for an option ``method`` does not read that is not at its default."""
  defaults = option_defaults()
  read = set(COMMON_OPTIONS) | set(SOLVER_OPTIONS) | set(method.options)
  for option, value in options.items():
    if option in read:
      continue
    if option not in defaults:
      raise ValueError(f"Unknown option {option!r} for method {method.name!r}; the options "
                       f"are {', '.join(defaults)}.")
    if value is not defaults[option] and value != defaults[option]:
      readers = [m.name for m in _SPECS.values() if option in m.options]
      raise ValueError(f"Method {method.name!r} does not read the option "
                       f"{option}={value!r}; it is read by {', '.join(readers)}.")


def _resolve_common(method: MethodSpec, options: Dict[str, Any]) -> Dict[str, Any]:
  """The validated, normalised :data:`COMMON_OPTIONS` (penalty defaults filled in)."""
  if options["lam_form"] not in LAM_FORMS:
    raise ValueError(f"lam_form must be 'paper' or 'kappa'; got {options['lam_form']!r}.")
  domain = options["domain"]
  out = dict(norm=canonical_norm(options["norm"]),
             domain=None if domain is None else (float(domain[0]), float(domain[1])))
  for penalty in ("l1", "l2"):
    out[penalty] = float(options[penalty] or method.penalty_defaults.get(penalty, 0.0))
  return out


def _view(options: Dict[str, Any], read: Tuple[str, ...]) -> Options:
  """The read-only options a method sees: those named in ``read``."""
  return types.MappingProxyType({o: options[o] for o in read})


def _with_penalties(loss_fn: LossFn, options: Options, description: str) -> LossFn:
  """``loss_fn`` plus the options' weight penalties, with the ``loss`` metric."""
  l1, l2 = options["l1"], options["l2"]

  def loss(params, apply_fn, x, y, hyper, key):
    value, metrics = loss_fn(params, apply_fn, x, y, hyper, key)
    return add_penalties(value, dict(metrics), params, l1, l2)

  loss.__doc__ = loss_fn.__doc__ or description
  return loss
