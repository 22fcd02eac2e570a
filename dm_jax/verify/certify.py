"""Certification: certified points, certified accuracy over an eps grid, certified radii,
ReLU stability counts.

A point is certified at eps when it is classified correctly and a sound lower bound of
``f_y - f_j`` over the input set is > 0 for every ``j != y`` (SPEC.md, Certification).
Methods (:data:`CERTIFY_METHODS`): ``ibp`` (last layer folded), ``crown_ibp``,
``fastlin`` (CNN-Cert-ReLU), ``crown`` (CNN-Cert-Ada), ``zero`` (CNN-Cert-Zero),
``alpha_crown`` (α-CROWN: CROWN with optimised lower slopes; options
``linear.AlphaConfig``, the ``alpha`` argument), their IBP-intersected versions
``fastlin_intersect``, ``crown_intersect``, ``zero_intersect``, ``alpha_crown_intersect``
(every intermediate bound intersected with IBP's, ``linear.linear_bounds(...,
intersect_ibp=True)``; also written ``<method>+ibp``), ``mip`` (exact, small nets
only) and ``pipeline`` (:mod:`dm_jax.verify.pipeline`: certifiers in turn on the points
still undecided, PGD falsification, optionally the MIP; its table rows are certified,
falsified and unknown).

The "best" row of a table certifies a point if any sound certificate does: the union of
the rows, and of the intersected versions of the textbook linear rows (sound, so the
union stays sound; they are computed only on the points no row certified).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dm_jax import sharding
from dm_jax.bounds import linear
from dm_jax.core import rounding
from dm_jax.core.input_sets import canonical_norm, make_input_set
from dm_jax.bounds.interval import interval_bounds

# The linear certifiers with layer-by-layer intermediate bounds, which the intersection
# with IBP's intervals applies to, and the name suffix of their intersected versions.
LINEAR_CERTIFIERS = ("fastlin", "crown", "zero", "alpha_crown")
INTERSECT_SUFFIX = "_intersect"
_INTERSECT_SUFFIXES = (INTERSECT_SUFFIX, "-intersect", "+ibp")
INTERSECTED = tuple(m + INTERSECT_SUFFIX for m in LINEAR_CERTIFIERS)
CERTIFY_METHODS = linear.METHODS + INTERSECTED + ("mip", "pipeline")


def canonical_certifier(method: str) -> str:
  """The canonical name of a certifier (:data:`CERTIFY_METHODS`): the bound methods'
  aliases (``relu``, ``ada``, ``cnn-cert-zero``, ...), each linear one with the suffix
  ``_intersect`` (or ``-intersect``, ``+ibp``) for its IBP-intersected version,
  ``mip`` and ``pipeline``. Unknown names raise ValueError."""
  key = str(method).strip().lower()
  if key in ("mip", "pipeline"):
    return key
  for suffix in _INTERSECT_SUFFIXES:
    if key.endswith(suffix):
      base = linear.canonical_method(key[:-len(suffix)])
      if base not in LINEAR_CERTIFIERS:
        raise ValueError(f"{method!r}: the intersection with IBP applies to "
                         f"{', '.join(LINEAR_CERTIFIERS)} (layer-by-layer intermediate "
                         f"bounds); {base} has none to intersect.")
      return base + INTERSECT_SUFFIX
  return linear.canonical_method(key)


def linear_options(certifier: str) -> Tuple[str, bool]:
  """``(bound method, intersect_ibp)`` of a linear certifier's canonical name (e.g.
  ``crown_intersect`` -> ``("crown", True)``)."""
  if certifier.endswith(INTERSECT_SUFFIX):
    return certifier[:-len(INTERSECT_SUFFIX)], True
  return certifier, False


def intersected(certifier: str) -> Optional[str]:
  """The IBP-intersected version of a textbook linear certifier (``crown`` ->
  ``crown_intersect``); None for the others."""
  return certifier + INTERSECT_SUFFIX if certifier in LINEAR_CERTIFIERS else None


# The rows whose intersected versions the "best" row adds. Not zero: Zero's bounds are
# never looser than IBP's at any layer (Appendix K; tests/test_linear.py checks the
# intersection changes nothing there), so zero_intersect equals zero.
_BEST_INTERSECTED = ("fastlin", "crown", "alpha_crown")


def uses_alpha(certifier: str) -> bool:
  """Whether a canonical certifier name is alpha-CROWN (plain or intersected)."""
  return linear_options(certifier)[0] == "alpha_crown"


@functools.lru_cache(maxsize=64)
def _compiled_margin_fn(apply_fn, certifier, chunk_bytes, alpha=None, sound=False):
  method, intersect_ibp = linear_options(certifier)

  def fn(params, iset, y):
    lb = linear.margin_lower_bounds_over(apply_fn, params, iset, y, method=method,
                                         chunk_bytes=chunk_bytes,
                                         intersect_ibp=intersect_ibp, alpha=alpha,
                                         sound=sound)
    correct = jnp.argmax(apply_fn(params, iset.x), axis=-1) == y
    return linear.worst_margin(lb, y), correct
  return jax.jit(fn)


def _sound(plain, sound):
  """The compiled margin function of ``certify(..., sound=True)``: ``sound`` traced,
  lowered and called inside ``jax.enable_x64(True)`` (it computes in float64;
  :func:`dm_jax.core.rounding.check_x64_trace`), its bound capped by the plain one
  computed exactly as ``sound=False`` computes it, so that the certified points are a
  subset of the plain ones bit for bit."""
  def call(params, iset, y):
    low, correct = plain(params, iset, y)
    with jax.enable_x64(True):
      low_sound, _ = jax.block_until_ready(sound(params, iset, y))
    return jnp.minimum(low, low_sound.astype(low.dtype)), correct
  return call


def _check_xy(x, y):
  x = np.asarray(x) if not isinstance(x, jax.Array) else x
  y = np.asarray(y) if not isinstance(y, jax.Array) else y
  if x.ndim < 2:
    raise ValueError(f"x must be (N, ...) with a batch axis; got shape {x.shape}.")
  if y.shape != (x.shape[0],):
    raise ValueError(f"y must have shape (N,) = ({x.shape[0]},); got {y.shape}.")
  return x, y


# The options of certify(..., pipeline={...}): verify_points' own arguments.
PIPELINE_OPTIONS = ("stages", "pgd", "mip_options", "certifiable", "sound")


def check_eps(eps: Optional[chex.Numeric], n: int) -> np.ndarray:
  """A scalar or (N,) radius as an (N,) float32 array; ValueError if it has another
  shape or a negative or non-finite entry (checked here: in a compiled call eps is
  traced and cannot be)."""
  eps_arr = np.asarray(0.0 if eps is None else eps, np.float32)
  if eps_arr.ndim > 1 or (eps_arr.ndim == 1 and eps_arr.shape != (n,)):
    raise ValueError(f"eps must be a scalar or have shape (N,) = ({n},); got {eps_arr.shape}.")
  eps_arr = np.array(np.broadcast_to(eps_arr, (n,)))
  if not np.all(np.isfinite(eps_arr)) or np.any(eps_arr < 0):
    raise ValueError(f"eps must be finite and >= 0 for every point; got min {eps_arr.min()}.")
  return eps_arr


def certify(apply_fn: Callable, params: chex.ArrayTree, x: chex.Array, y: chex.Array,
            eps: Optional[chex.Numeric], norm: str = "linf", *, method: str = "crown",
            k: Optional[int] = None, domain: Optional[Tuple[float, float]] = None,
            batch_size: int = 256,
            chunk_bytes: int = linear.DEFAULT_CHUNK_BYTES, progress: bool = False,
            mip_time_limit: float = 60.0, pipeline: Optional[Dict] = None,
            mesh: Optional[Mesh] = None, alpha: Optional[linear.AlphaConfig] = None,
            sound: bool = False) -> Tuple[np.ndarray, np.ndarray]:
  """Certifies N points at radius ``eps`` (scalar or (N,) per point).

  Args:
    apply_fn, params: the model.
    x: (N, ...) inputs; y: (N,) labels.
    eps: scalar or (N,).
    method: ibp | crown_ibp | fastlin (relu) | crown (ada) | zero | alpha_crown, a
      linear one's IBP-intersected version (``crown_intersect``, ...), mip, or pipeline.
    batch_size: points per compiled call (the last chunk is padded, so one compile).
    mip_time_limit: seconds per MILP (one per point and class) of ``mip`` (also the
      pipeline's mip stage).
    pipeline: for ``method="pipeline"``, keyword arguments of
      :func:`dm_jax.verify.pipeline.verify_points` (``stages``, ``pgd``,
      ``mip_options``, ``certifiable``); the full outcome (falsified points, stages,
      times) is ``verify_points``' result.
    mesh: optional :func:`dm_jax.sharding.data_mesh`: each chunk's points are split over
      its devices (data parallel; the chunk is rounded up to a multiple of them).
    alpha: alpha-CROWN's options (``linear.AlphaConfig``: steps, lr, ...; None: its
      defaults) for the alpha_crown certifiers; the other certifiers ignore it (so one
      table can pass it to every row).
    sound: margin bounds sound in floating point (``linear.margin_lower_bounds(...,
      sound=True)``: float64 with rigorous rounding bounds, never above the plain
      bound, so the certified points are a subset of the plain ones); for the pipeline,
      ``True`` sets its ``sound`` option (which is on by default). ValueError with ``mip``, whose
      solver's tolerances are not analysed.

  Returns:
    (certified (N,) bool, margin_lower (N,) float): the lower bound of
    ``min_{j != y} f_y - f_j`` over the set (for the pipeline the best of its stages',
    -inf where none ran, e.g. a misclassified point).
  """
  method = canonical_certifier(method)
  norm = canonical_norm(norm)
  x, y = _check_xy(x, y)
  n = x.shape[0]
  eps_arr = check_eps(eps, n)
  if pipeline is not None and method != "pipeline":
    raise ValueError(f"pipeline options are for method='pipeline'; got method={method!r}.")
  bad = set(pipeline or {}) - set(PIPELINE_OPTIONS)
  if bad:
    raise ValueError(f"unknown pipeline options {sorted(bad)}; expected some of "
                     f"{list(PIPELINE_OPTIONS)}.")
  # The set of every point, built and validated once; chunks of it go to the compiled
  # bound (the set is a pytree).
  iset = make_input_set(jnp.asarray(x), jnp.asarray(eps_arr), norm, k, domain)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  if method == "pipeline":
    from dm_jax.verify import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel
    opts = dict(pipeline or {})
    if sound:
      opts["sound"] = True
    res = pipeline_lib.verify_points(apply_fn, params, x, y, eps_arr, norm, k=k,
                                     domain=domain, batch_size=batch_size,
                                     chunk_bytes=chunk_bytes, mip_time_limit=mip_time_limit,
                                     **opts)
    return res.certified, res.margin_lower
  if method == "mip":
    if sound:
      raise ValueError("sound=True is not available for method='mip' (the MILP solver's "
                       "tolerances are not analysed).")
    from dm_jax.verify import mip  # scipy solver: small nets only, not jit-able
    if norm not in ("linf", "l1") or np.unique(eps_arr).size != 1:
      raise ValueError("method='mip' needs norm linf or l1 and one eps for all points.")
    cert, lower = mip.exact_certify(apply_fn, params, x, y, float(eps_arr[0]), norm,
                                    domain=domain, time_limit=mip_time_limit)
    return np.asarray(cert), np.asarray(lower)
  if alpha is not None and not isinstance(alpha, linear.AlphaConfig):
    raise ValueError(f"alpha must be a linear.AlphaConfig or None; got {alpha!r}.")
  if not isinstance(sound, (bool, np.bool_)):
    raise ValueError(f"sound must be True or False; got {sound!r}.")
  fn = _compiled_margin_fn(apply_fn, method, chunk_bytes,
                           alpha if uses_alpha(method) else None)
  if sound:
    # Checked here, on the host: inside the compiled call the arrays are traced.
    rounding.check_no_subnormals(params, iset.x, iset.eps)
    fn = _sound(fn, _compiled_margin_fn(apply_fn, method, chunk_bytes,
                                        alpha if uses_alpha(method) else None, True))
  # A power of two no larger than batch_size: subsets of any size (the table's
  # monotone pass) reuse a few compiled shapes; the last chunk is padded.
  batch_size = min(batch_size, 1 << (n - 1).bit_length())
  devices = sharding.mesh_size(mesh)
  batch_size = -(-batch_size // devices) * devices  # every device gets as many points
  params = sharding.replicate(params, mesh)
  certified, lowers = [], []
  chunks = range(0, n, batch_size)
  for start in tqdm(chunks, desc=f"certify {method}", disable=not progress, leave=False):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    take = lambda a, m=jnp: m.concatenate([a[start:stop], m.repeat(a[stop - 1:stop], pad, 0)])
    if mesh is None:
      low, correct = fn(params, iset.take(take), jnp.asarray(take(y, np)))
    else:
      chunk_set, chunk_y = sharding.shard_batch(
          (iset.take(lambda a: take(np.asarray(a), np)), take(y, np)), mesh)
      low, correct = sharding.to_host(fn(params, chunk_set, chunk_y))
    low, correct = np.asarray(low)[:stop - start], np.asarray(correct)[:stop - start]
    lowers.append(low)
    certified.append(correct & (low > 0))
  return np.concatenate(certified), np.concatenate(lowers)


def certified_accuracy(apply_fn: Callable[..., jax.Array], params: chex.ArrayTree,
                       x: chex.Array, y: chex.Array,
                       eps_grid: Sequence[float], norm: str = "linf", *,
                       method: str = "crown", **kw) -> np.ndarray:
  """Share of the N points certified at each eps of the grid: (len(eps_grid),)."""
  return np.array([certify(apply_fn, params, x, y, e, norm, method=method, **kw)[0].mean()
                   for e in eps_grid])


def certified_accuracy_table(apply_fn: Callable[..., jax.Array], params: chex.ArrayTree,
                             x: chex.Array, y: chex.Array, eps_grid: Sequence[float],
                             methods: Sequence[str] = ("fastlin", "ibp"), norm: str = "linf", *,
                             progress: bool = True, pgd: Optional[Dict] = None,
                             monotone: bool = True, best_intersect: bool = True,
                             pipeline: Optional[Dict] = None, **kw: Any) -> Dict:
  """Paper-style table: certified accuracy per certifier and eps, plus the "best" row.

  Args:
    apply_fn, params, x (N, ...), y (N,): the model and the points.
    eps_grid: the radii (columns). For ``norm="l0"`` without ``k``, the radii are the
      numbers of changed coordinates k (integers >= 0; k = 0 is the point itself, so
      its column is the clean accuracy), as the paper's l0 tables write them.
    methods: certifiers (rows), see :func:`certify`. The textbook rows (fastlin, crown,
      zero) keep their plain numbers (those of CNN-Cert and the paper).
    best_intersect: the "best" row also counts the IBP-intersected versions of the
      fastlin, crown and alpha_crown rows (``crown`` -> ``crown_intersect``; zero's would
      equal zero), run only on the points no row certified. They are sound, so "best"
      stays the union of sound certificates; the intersected bound is never looser than
      IBP's, and usually (not always: tighter intermediate bounds change the relaxations'
      slopes) tighter than the plain one, which stays in the union too.
    pipeline: options of the ``pipeline`` row (``stages``, ``pgd``, ``mip_options``,
      ``sound``;
      see :func:`dm_jax.verify.pipeline.verify_points`; ``mip_time_limit`` comes from
      ``**kw``). The row is its certified share (it enters "best"); the table gets
      ``pipeline`` with the falsified and unknown shares and the seconds per stage.
    pgd: optional keyword arguments of :func:`pgd_robust` (e.g. ``dict(steps=50,
      restarts=2)``): adds the PGD row, the accuracy under attack, an upper bound of
      what any sound certifier can reach. With ``attack_certified=True`` (the default)
      certified points are attacked too and ``certified_but_attacked`` counts, per eps,
      those PGD broke (0, or a certifier is unsound); ``False`` attacks only the
      uncertified points (cheaper; the row is the same if the certifiers are sound).
    monotone: certify, at each radius, only the points a method certified at the
      previous smaller radius of the grid. Every method here is monotone in eps (a
      certificate at eps holds at every smaller eps), so this changes no number and
      saves the work on points already lost; it can only under-report, never
      certify a point without checking it. ``False`` checks every point at every eps.
    **kw: passed to :func:`certify` (``batch_size``, ``domain``, ``k``, ``alpha``,
      ``sound``, ...).

  Returns:
    dict with ``eps`` (list), ``rows`` {method: [accuracy per eps]} including "best"
    (a point counts if any sound certificate holds), ``best_of`` (the certifiers the
    union took: the rows and the added intersected versions), ``num_points``, ``norm``,
    ``clean`` (plain accuracy), and with ``pgd``: ``pgd`` [accuracy under attack per
    eps], ``certified_but_attacked`` [count per eps] and ``pgd_settings``; with the
    ``pipeline`` method: ``pipeline`` = {``stages``, ``certified``, ``falsified``,
    ``unknown`` [share per eps], ``seconds``, ``checked``, ``decided`` {stage: [per
    eps]}, ``reused`` [falsified points whose counterexample from a smaller eps lies in
    this eps' set, per eps]}.
  """
  methods = [canonical_certifier(m) for m in methods]
  x, y = _check_xy(x, y)
  n = x.shape[0]
  logits = np.asarray(apply_fn(params, jnp.asarray(x)))
  correct = logits.argmax(-1) == np.asarray(y)
  l0_grid = canonical_norm(norm) == "l0" and kw.get("k") is None
  if l0_grid:
    kw.pop("k", None)
    if any(float(e) != int(e) or e < 0 for e in eps_grid):
      raise ValueError(f"for norm 'l0' without k the grid holds the numbers of changed "
                       f"coordinates k, integers >= 0; got {list(eps_grid)}.")
    if pgd is not None:
      raise ValueError("the PGD row supports norms linf and l2; got norm 'l0'.")

  def certify_at(i, todo, m):
    if not l0_grid:
      return certify(apply_fn, params, x[todo], y[todo], eps_grid[i], norm, method=m,
                     **kw)[0]
    k = int(eps_grid[i])
    if k == 0:  # the set is the point itself
      return correct[todo]
    return certify(apply_fn, params, x[todo], y[todo], None, norm, method=m, k=k, **kw)[0]

  order = np.argsort(np.asarray(eps_grid, np.float64), kind="stable")
  extra = [intersected(m) for m in methods if best_intersect and m in _BEST_INTERSECTED
           and intersected(m) not in methods]
  cert_at = {m: [None] * len(eps_grid) for m in methods}
  bar = tqdm(total=(len(methods) + len(extra)) * len(eps_grid), desc="certification",
             disable=not progress)

  def run(m, i, todo):
    cert = np.zeros(n, bool)
    if todo.size:
      cert[todo] = certify_at(i, todo, m)
    bar.update(1)
    return cert

  pipe = None
  for m in methods:
    if m == "pipeline":
      pipe = _pipeline_pass(apply_fn, params, x, y, eps_grid, order, norm, monotone,
                            pipeline or {}, kw, bar)
      cert_at[m] = pipe.pop("certified_points")
      continue
    alive = np.ones(n, bool)
    for i in order:
      cert_at[m][i] = alive = run(m, i, np.flatnonzero(alive) if monotone else np.arange(n))
  union = [np.any([cert_at[m][i] for m in methods], axis=0) for i in range(len(eps_grid))]
  for m in extra:  # only where no row certified (and, monotone, not lost at a smaller eps)
    lost = np.zeros(n, bool)
    for i in order:
      todo = ~union[i] & ~lost
      cert = run(m, i, np.flatnonzero(todo))
      if monotone:
        lost |= todo & ~cert
      union[i] = union[i] | cert
  bar.close()
  rows = {m: [float(c.mean()) for c in cert_at[m]] for m in methods}
  rows["best"] = [float(u.mean()) for u in union]
  table = {"eps": [float(e) for e in eps_grid], "rows": rows, "best_of": methods + extra,
           "num_points": int(n), "norm": canonical_norm(norm),
           "clean": float(correct.mean())}
  if pipe is not None:
    table["pipeline"] = pipe
  if pgd is not None:
    settings = dict(pgd)
    attack_certified = settings.pop("attack_certified", True)
    robust = pgd_robust(apply_fn, params, x, y, eps_grid, norm, domain=kw.get("domain"),
                        skip=None if attack_certified else union, **settings)
    table["pgd"] = [float(r.mean()) for r in robust]
    if attack_certified:
      table["certified_but_attacked"] = [int(np.sum(u & ~r))
                                         for u, r in zip(union, robust)]
    table["pgd_settings"] = dict(settings, attack_certified=attack_certified)
  return table


def _pipeline_pass(apply_fn, params, x, y, eps_grid, order, norm, monotone, options, kw,
                   bar) -> Dict:
  """The pipeline at every eps of the grid (increasing), for the table.

  Monotone: at a larger eps the certifying stages see only the points certified at the
  previous one, and a falsified point whose counterexample lies in the larger set stays
  falsified without running anything (``reused``).
  """
  from dm_jax.verify import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel
  from dm_jax.core.input_sets import contains  # pylint: disable=import-outside-toplevel
  bad = set(options) - set(PIPELINE_OPTIONS) | ({"certifiable"} & set(options))
  if bad:
    raise ValueError(f"the table's pipeline options are some of "
                     f"{[o for o in PIPELINE_OPTIONS if o != 'certifiable']}; got "
                     f"{sorted(bad)}.")
  n, g = x.shape[0], len(eps_grid)
  stages = (pipeline_lib.CLEAN,) + pipeline_lib.check_stages(options.get("stages"), norm)
  out = {"stages": list(stages), "certified": [0.0] * g, "falsified": [0.0] * g,
         "unknown": [0.0] * g, "reused": [0] * g,
         "seconds": {s: [0.0] * g for s in stages}, "checked": {s: [0] * g for s in stages},
         "decided": {s: [0] * g for s in stages}, "certified_points": [None] * g}
  certifiable = np.ones(n, bool)
  found = np.zeros(n, bool)
  cex = np.zeros(x.shape, np.asarray(x).dtype)
  vk = {key: kw[key] for key in ("k", "domain", "batch_size", "chunk_bytes",
                                 "mip_time_limit") if key in kw}
  if kw.get("sound"):  # the rows' sound=True holds the pipeline to it too
    vk["sound"] = True
  for i in order:
    eps = np.full(n, float(eps_grid[i]), np.float32)
    reused = np.zeros(n, bool)
    if monotone and found.any():
      iset = make_input_set(jnp.asarray(x[found]), jnp.asarray(eps[found]), norm,
                            kw.get("k"), kw.get("domain"))
      reused[np.flatnonzero(found)[contains(iset, cex[found])]] = True
    todo = np.flatnonzero(~reused)
    status = np.full(n, pipeline_lib.FALSIFIED, np.int8)
    if todo.size:
      res = pipeline_lib.verify_points(
          apply_fn, params, x[todo], y[todo], eps[todo], norm,
          certifiable=certifiable[todo] if monotone else None, **vk,
          **{key: v for key, v in options.items() if key != "certifiable"})
      status[todo] = res.status
      hit = todo[res.falsified]
      cex[hit], found[hit] = res.counterexamples[res.falsified], True
      for s in stages:
        out["seconds"][s][i] = float(res.seconds[s])
        out["checked"][s][i] = int(res.checked[s])
        out["decided"][s][i] = int(res.decided[s])
    cert = status == pipeline_lib.CERTIFIED
    out["certified_points"][i] = cert
    out["reused"][i] = int(reused.sum())
    for key, code in (("certified", pipeline_lib.CERTIFIED),
                      ("falsified", pipeline_lib.FALSIFIED), ("unknown", pipeline_lib.UNKNOWN)):
      out[key][i] = float(np.mean(status == code))
    if monotone:
      certifiable = cert
    bar.update(1)
  return out


def pgd_robust(apply_fn: Callable[..., jax.Array], params: chex.ArrayTree,
               x: chex.Array, y: chex.Array, eps_grid: Sequence[float], norm: str = "linf", *,
               steps: int = 50, restarts: int = 2, step_size: Optional[float] = None,
               seed: int = 0, domain: Optional[Tuple[float, float]] = None,
               batch_size: int = 200,
               skip: Optional[Sequence[np.ndarray]] = None, chunk: int = 10) -> list:
  """Points PGD does not break, per eps: a list of (N,) bool (the empirical upper bound).

  PGD (:func:`dm_jax.train.methods.pgd_attack`) on the margin loss ``max_{j != y} f_j - f_y``,
  ``steps`` steps of ``step_size`` (default ``2.5 eps / steps``, Madry et al.'s rule)
  from each of ``restarts`` uniform random starts, inside the ball and the data box
  (``domain``, default [0, 1]: images stay images). A point is robust at eps if it is
  classified correctly at x and at the end of every restart. ``norm``: linf or l2.

  ``skip`` (one (N,) bool per eps) marks points not to attack (e.g. certified ones,
  which a sound certificate says PGD cannot break); they count as robust. The steps run
  in compiled chunks of ``chunk`` (one compile for every eps and restart).
  """
  x, y = _check_xy(x, y)
  if steps < 1 or restarts < 1 or chunk < 1:
    raise ValueError(f"PGD needs steps, restarts and chunk >= 1; got {steps}, {restarts}, "
                     f"{chunk}.")
  box = (0.0, 1.0) if domain is None else tuple(float(d) for d in domain)
  n = x.shape[0]
  correct = np.asarray(_compiled_pgd(apply_fn, norm, box)[1](params, jnp.asarray(x))) \
      == np.asarray(y)
  out = []
  for i, eps in enumerate(eps_grid):
    ok = correct.copy()
    todo = np.flatnonzero(ok & ~skip[i]) if skip is not None else np.flatnonzero(ok)
    if float(eps) > 0 and todo.size:
      _, broken = pgd_search(apply_fn, params, x[todo], y[todo],
                             np.full(todo.size, float(eps), np.float32), norm, steps=steps,
                             restarts=restarts, step_size=step_size, seed=seed, domain=box,
                             batch_size=min(batch_size, n), chunk=chunk, salt=i)
      ok[todo] &= ~broken
    out.append(ok)
  return out


@functools.lru_cache(maxsize=32)
def _compiled_pgd(apply_fn, norm, box):
  """(advance, predict): ``n_steps`` PGD steps (compiled per chunk length) and argmax."""
  from dm_jax.train.methods.attacks import pgd_attack  # pylint: disable=import-outside-toplevel

  @functools.partial(jax.jit, static_argnames=("n_steps", "start"))
  def advance(params, xb, yb, xa, eps, step, key, n_steps, start):
    return pgd_attack(apply_fn, params, xb, yb, eps, key, steps=n_steps, step_size=step,
                      norm=norm, domain=box, loss="margin",
                      x_init=None if start else xa, unroll=True)

  predict = jax.jit(lambda params, xb: jnp.argmax(apply_fn(params, xb), -1))
  return advance, predict


def pgd_search(apply_fn: Callable[..., jax.Array], params: chex.ArrayTree,
               x: chex.Array, y: chex.Array, eps: chex.Numeric, norm: str = "linf", *,
               steps: int = 50, restarts: int = 2, step_size: Optional[float] = None,
               seed: int = 0, domain: Optional[Tuple[float, float]] = None,
               batch_size: int = 200, chunk: int = 10,
               salt: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """PGD on every point (the driver of :func:`pgd_robust` and the pipeline's attack).

  Args:
    x: (M, ...) points; y: (M,) labels; eps: (M,) radii (> 0).
    norm: linf or l2. steps, restarts, step_size (default ``2.5 eps / steps`` per
      point), chunk: as :func:`pgd_robust`.
    domain: the box the attack stays in (None: none).
    batch_size: points per compiled call (the last batch padded with the last point).
    seed, salt: the random starts' keys (``salt`` tells calls apart, e.g. the eps index).

  Returns:
    (x_adv (M, ...), broken (M,) bool): per point, the end of the first restart whose
    prediction is not ``y`` (then ``broken``), else of the last restart. The points lie
    in the ball and the box up to float rounding (check with
    :func:`dm_jax.core.input_sets.contains`).
  """
  from dm_jax.train.methods.attacks import (  # pylint: disable=import-outside-toplevel
      check_attack_norm)
  norm = check_attack_norm(norm)
  if steps < 1 or restarts < 1 or chunk < 1:
    raise ValueError(f"PGD needs steps, restarts and chunk >= 1; got {steps}, {restarts}, "
                     f"{chunk}.")
  x, y = _check_xy(x, y)
  eps = np.broadcast_to(np.asarray(eps, np.float32), (x.shape[0],))
  box = None if domain is None else tuple(float(d) for d in domain)
  advance, predict = _compiled_pgd(apply_fn, norm, box)
  sizes = [chunk] * (steps // chunk) + ([steps % chunk] if steps % chunk else [])
  m = x.shape[0]
  bs = max(1, min(batch_size, m))
  adv = np.array(x, copy=True)
  broken = np.zeros(m, bool)
  for start in range(0, m, bs):
    idx = np.arange(start, min(start + bs, m))
    pad = np.concatenate([idx, np.repeat(idx[-1:], bs - idx.size)])
    xb, yb = jnp.asarray(x[pad]), jnp.asarray(y[pad])
    eb = jnp.asarray(eps[pad])
    step = eb * (2.5 / steps) if step_size is None else jnp.full_like(eb, step_size)
    step = step.reshape((bs,) + (1,) * (x.ndim - 1))
    done = np.zeros(bs, bool)
    best = np.array(xb)
    for r in range(restarts):
      key = jax.random.fold_in(jax.random.PRNGKey(seed), (salt * 1009 + start) * 101 + r)
      xa = xb
      for j, size in enumerate(sizes):
        xa = advance(params, xb, yb, xa, eb, step, jax.random.fold_in(key, j),
                     n_steps=size, start=j == 0)
      xa = np.asarray(xa)
      best[~done] = xa[~done]
      done |= np.asarray(predict(params, jnp.asarray(xa))) != np.asarray(yb)
    adv[idx] = best[:idx.size]
    broken[idx] = done[:idx.size]
  return adv, broken


_LABELS = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "fastlin": "CNN-Cert-ReLU",
           "crown": "CNN-Cert-Ada", "zero": "CNN-Cert-Zero", "alpha_crown": "α-CROWN",
           "mip": "MIP (exact)", "best": "best (union)", "pipeline": "pipeline: certified"}
_LABELS.update({intersected(m): _LABELS[m] + " ∩ IBP" for m in LINEAR_CERTIFIERS})


def label(certifier: str) -> str:
  """The display name of a row (``crown`` -> ``CNN-Cert-Ada``)."""
  return _LABELS.get(certifier, certifier)


def _extra_rows(table: Dict) -> list:
  """The rows below "best", in groups: the pipeline's falsified / unknown shares, the
  PGD row; each (csv name, label, values)."""
  groups = []
  if "pipeline" in table:
    p = table["pipeline"]
    groups.append([("pipeline_falsified", "pipeline: falsified", p["falsified"]),
                   ("pipeline_unknown", "pipeline: unknown", p["unknown"])])
  if "pgd" in table:
    groups.append([("pgd", "PGD (upper bound)", table["pgd"])])
  return groups


def format_table(table: Dict, eps_scale: float = 1.0, eps_label: str = "eps") -> str:
  """Renders a certified-accuracy table as aligned text (rows certifiers, columns eps;
  below rules, the pipeline's falsified and unknown shares and the PGD row)."""
  eps = [e * eps_scale for e in table["eps"]]
  head = [f"{eps_label}:"] + [f"{e:g}" for e in eps]
  cells = lambda accs: [f"{100 * a:.1f}%" for a in accs]
  groups = [[head], [[label(m)] + cells(accs) for m, accs in table["rows"].items()]]
  groups += [[[name] + cells(vals) for _, name, vals in g] for g in _extra_rows(table)]
  widths = [max(len(r[i]) for g in groups for r in g) for i in range(len(head))]
  render = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
  lines = []
  for i, group in enumerate(groups):
    lines += (["-" * len(render(head))] if i else []) + [render(r) for r in group]
  tail = f"\n({table['num_points']} points, norm {table['norm']}, " \
      f"clean accuracy {100 * table['clean']:.1f}%"
  added = [m for m in table.get("best_of", ()) if m not in table["rows"]]
  if added:
    tail += "; best also counts " + ", ".join(label(m) for m in added)
  if "pipeline" in table:
    p = table["pipeline"]
    times = ", ".join(f"{st} {sum(p['seconds'][st]):.1f} s" for st in p["stages"])
    tail += f"; pipeline {' -> '.join(p['stages'])}, time per stage: {times}"
  if "pgd" in table:
    s = table["pgd_settings"]
    tail += (f"; PGD: {s.get('steps', 50)} steps, {s.get('restarts', 2)} restarts, margin "
             "loss")
    if "certified_but_attacked" in table:
      tail += f"; certified points PGD broke: {sum(table['certified_but_attacked'])}"
    else:
      tail += " on the uncertified points"
  return "\n".join(lines) + tail + ")"


def table_to_csv(table: Dict) -> str:
  lines = ["method," + ",".join(f"{e:g}" for e in table["eps"])]
  for m, accs in table["rows"].items():
    lines.append(m + "," + ",".join(f"{a:.4f}" for a in accs))
  for group in _extra_rows(table):
    for name, _, vals in group:
      lines.append(name + "," + ",".join(f"{a:.4f}" for a in vals))
  return "\n".join(lines) + "\n"


def plot_table(table: Dict, path: str, title: str = "", eps_scale: float = 1.0,
               eps_label: str = "eps") -> None:
  """Writes a PNG of certified accuracy vs eps, one line per certifier."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  eps = np.array(table["eps"]) * eps_scale
  for m, accs in table["rows"].items():
    ax.plot(eps, 100 * np.array(accs), marker="o", label=label(m),
            linestyle="--" if m == "best" else "-")
  if "pgd" in table:
    ax.plot(eps, 100 * np.array(table["pgd"]), marker="x", color="k", linestyle=":",
            label="PGD (upper bound)")
  if "pipeline" in table:
    ax.plot(eps, 100 * (1 - np.array(table["pipeline"]["falsified"])), marker="v",
            color="gray", linestyle=":", label="pipeline: not falsified (upper bound)")
  ax.set_xlabel(eps_label)
  ax.set_ylabel("certified accuracy (%)")
  ax.set_ylim(-2, 102)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(title or f"certified accuracy ({table['num_points']} points, {table['norm']})")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def certified_radius(apply_fn: Callable[..., jax.Array], params: chex.ArrayTree,
                     x: chex.Array, y: chex.Array, norm: str = "linf", *,
                     method: str = "crown", eps_max: float = 1.0, iterations: int = 12,
                     **kw) -> np.ndarray:
  """Largest certified eps per point by bisection on [0, eps_max] (the CNN-Cert figure).

  Certification is monotone in eps for every method here, so bisection is valid.
  Returns (N,) radii (0 for points not certified even at eps = 0, i.e. misclassified).
  """
  if iterations <= 0 or eps_max <= 0:
    raise ValueError("iterations and eps_max must be positive.")
  x, y = _check_xy(x, y)
  lo = np.zeros(x.shape[0], np.float32)
  hi = np.full(x.shape[0], eps_max, np.float32)
  ok0, _ = certify(apply_fn, params, x, y, 0.0, norm, method=method, **kw)
  ok_max, _ = certify(apply_fn, params, x, y, hi, norm, method=method, **kw)
  lo = np.where(ok_max, hi, lo)
  for _ in range(iterations):
    mid = (lo + hi) / 2
    ok, _ = certify(apply_fn, params, x, y, mid, norm, method=method, **kw)
    lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
  return np.where(ok0, lo, 0.0)


def relu_stability(apply_fn: Callable[..., jax.Array], params: chex.ArrayTree,
                   x: jax.Array, eps: chex.Numeric, norm: str = "linf", *,
                   method: str = "ibp", k: Optional[int] = None,
                   domain: Optional[Tuple[float, float]] = None) -> Dict[str, np.ndarray]:
  """Counts of stable-active, stable-inactive and unstable ReLUs per layer.

  Returns:
    dict of arrays of shape (num_relu_layers,), summed over the batch: ``active``,
    ``inactive``, ``unstable``, ``total``. ``method`` chooses the pre-activation bounds:
    ibp, fastlin/crown/zero (layer-by-layer linear bounds) or their intersected
    versions (``crown_intersect``, ...: each intersected with IBP's interval).
  """
  method, intersect_ibp = linear_options(canonical_certifier(method))
  if method in ("mip", "pipeline"):
    raise ValueError(f"relu_stability needs bounds of a bound method, not {method!r}.")
  if method == "ibp":
    _, relus = interval_bounds(apply_fn, params, x, eps, norm, k=k, domain=domain,
                               return_relu_inputs=True)
    pairs = [(b.lower, b.upper) for b in relus]
  else:
    pairs = linear.relu_input_bounds(apply_fn, params, x, eps, norm, method=method, k=k,
                                     domain=domain, intersect_ibp=intersect_ibp)
  active = np.array([int(jnp.sum(l >= 0)) for l, _ in pairs])
  inactive = np.array([int(jnp.sum(u <= 0)) for l, u in pairs])
  total = np.array([int(np.prod(l.shape)) for l, _ in pairs])
  return {"active": active, "inactive": inactive, "unstable": total - active - inactive,
          "total": total}
