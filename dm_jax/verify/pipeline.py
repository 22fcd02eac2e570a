"""A verification pipeline: each point ends certified, falsified or unknown.

Per point, stages run in order, each only on the points still undecided:

* ``clean`` (always first): a point the network misclassifies is *falsified* (``x`` itself
  is in the set), at every eps;
* certifier stages, any name of :data:`dm_jax.verify.certify.CERTIFY_METHODS` (default
  ``ibp`` -> ``crown_ibp`` -> ``crown_intersect``, cheap to expensive): the point is
  *certified* when the certifier certifies it;
* ``pgd``: PGD (:func:`dm_jax.verify.certify.pgd_search`, margin loss) inside the set
  (its data box included); the point is *falsified* when the attack's end point, moved
  into the set against float rounding (:func:`dm_jax.core.input_sets.pull_inside`) and
  checked to lie in it in exact arithmetic (:func:`~dm_jax.core.input_sets.contains`),
  is misclassified by a forward pass of the network (``argmax != y``). l-inf and l2;
* ``mip``: the exact MILP (:func:`dm_jax.verify.mip.exact_margins`, small ReLU nets,
  l-inf/l1, ``mip_time_limit`` seconds per MILP): certified when every margin's proven
  lower bound is > 0; falsified when a minimiser, checked as PGD's points are, is
  misclassified. Complete up to the time limit: with no timeout no point stays unknown.

A stage list is a tuple of these names, so a new certifier (alpha-CROWN, say) is one
more name in :data:`~dm_jax.verify.certify.CERTIFY_METHODS` and a stage at once. The
default is :data:`DEFAULT_STAGES` (``pgd`` dropped for l1/l0, which PGD does not support);
``mip`` is off by default (add it last, after ``pgd``, so the MILPs only run on what the
attack did not break).

The certified verdict is sound in floating point by default (``sound=True``): a point a
certifier stage certifies with its plain float bound is certified only if the same
certifier with ``sound=True`` (float64 with rigorous rounding bounds,
:mod:`dm_jax.core.rounding`) certifies it too.

Certified points are those of a sound certifier, falsified ones have a verified
counterexample, so the two are disjoint and ``certified share <= true robust accuracy
<= 1 - falsified share``: the union of sound certificates is what users report, the
falsified share the honest upper bound.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dm_jax.bounds import linear
from dm_jax.core.input_sets import canonical_norm, contains, make_input_set, pull_inside
from dm_jax.verify import certify as certify_lib

UNKNOWN, CERTIFIED, FALSIFIED = 0, 1, 2
STATUS_NAMES = ("unknown", "certified", "falsified")
CLEAN = "clean"
FALSIFIERS = ("pgd",)
DEFAULT_STAGES = ("ibp", "crown_ibp", "crown_intersect", "pgd")
PGD_DEFAULTS = dict(steps=50, restarts=2, step_size=None, seed=0, batch_size=200,
                    chunk=10)
_PGD_NORMS = ("linf", "l2")
_MIP_NORMS = ("linf", "l1")


@dataclasses.dataclass
class PipelineResult:
  """Per-point outcome of :func:`verify_points` (N points).

  Attributes:
    status: (N,) int8, :data:`UNKNOWN` (0), :data:`CERTIFIED` (1) or :data:`FALSIFIED` (2).
    stage: (N,) int, the index in ``stages`` of the stage that decided the point; -1
      where undecided.
    margin_lower: (N,) the largest sound lower bound of ``min_{j != y} f_y - f_j`` over
      the set that the stages run on the point found (-inf where none ran; with
      ``sound``, float-sound at certified points, see :func:`verify_points`).
    margin_upper: (N,) the smallest margin ``f_y - max_{j != y} f_j`` at a point of the
      set checked by a forward pass (``x`` itself and the attacks' points that lie in
      the set): an upper bound of the minimum over the set (so ``margin_lower <=
      margin_upper``); <= 0 at falsified points.
    counterexamples: (N, ...) the verified counterexample of every falsified point
      (inside the set, misclassified); NaN elsewhere.
    stages: ``("clean",) + the stages run``.
    seconds, checked, decided: per stage name, the wall time, the number of points it
      ran on and the number it decided.
  """
  status: np.ndarray
  stage: np.ndarray
  margin_lower: np.ndarray
  margin_upper: np.ndarray
  counterexamples: np.ndarray
  stages: Tuple[str, ...]
  seconds: Dict[str, float]
  checked: Dict[str, int]
  decided: Dict[str, int]

  @property
  def certified(self) -> np.ndarray:
    return self.status == CERTIFIED

  @property
  def falsified(self) -> np.ndarray:
    return self.status == FALSIFIED

  @property
  def unknown(self) -> np.ndarray:
    return self.status == UNKNOWN

  @property
  def decided_by(self) -> np.ndarray:
    """(N,) the deciding stage's name, "" where undecided."""
    names = np.array(self.stages + ("",), dtype=object)
    return names[self.stage].astype(str)

  def summary(self) -> Dict[str, Any]:
    """Shares of certified / falsified / unknown points and the per-stage numbers."""
    n = max(1, self.status.size)
    return {"certified": float(np.sum(self.certified) / n),
            "falsified": float(np.sum(self.falsified) / n),
            "unknown": float(np.sum(self.unknown) / n), "num_points": int(self.status.size),
            "seconds": dict(self.seconds), "checked": dict(self.checked),
            "decided": dict(self.decided)}


def canonical_stage(stage: str) -> str:
  """A stage's canonical name: ``pgd``, or a certifier's (``certify.canonical_certifier``;
  ``mip`` included). ``clean`` always runs first and ``pipeline`` is no stage."""
  key = str(stage).strip().lower()
  if key in FALSIFIERS:
    return key
  if key in (CLEAN, "pipeline"):
    raise ValueError(f"{stage!r} is not a stage (the clean check always runs first).")
  return certify_lib.canonical_certifier(key)


def default_stages(norm: str) -> Tuple[str, ...]:
  """:data:`DEFAULT_STAGES`, without ``pgd`` for the norms PGD does not support."""
  norm = canonical_norm(norm)
  return tuple(s for s in DEFAULT_STAGES if s != "pgd" or norm in _PGD_NORMS)


def check_stages(stages: Optional[Sequence[str]], norm: str) -> Tuple[str, ...]:
  """Canonical stage names for ``norm``; ValueError for unknown, repeated or unsupported
  ones."""
  norm = canonical_norm(norm)
  if stages is None:
    return default_stages(norm)
  if isinstance(stages, str):
    stages = [s for s in stages.split(",") if s.strip()]
  out = tuple(canonical_stage(s) for s in stages)
  if len(set(out)) != len(out):
    raise ValueError(f"stages must not repeat; got {list(out)}.")
  if "pgd" in out and norm not in _PGD_NORMS:
    raise ValueError(f"the pgd stage supports norms {_PGD_NORMS}; got {norm!r} (drop it).")
  if "mip" in out and norm not in _MIP_NORMS:
    raise ValueError(f"the mip stage supports norms {_MIP_NORMS}; got {norm!r} (drop it).")
  return out


@functools.lru_cache(maxsize=32)
def _compiled_logits(apply_fn):
  return jax.jit(apply_fn)


def _margins(apply_fn, params, pts: np.ndarray, y: np.ndarray, batch_size: int):
  """(margin ``f_y - max_{j != y} f_j``, misclassified ``argmax != y``) at the points:
  a forward pass in batches of a power of two (padded), so few shapes compile."""
  fn = _compiled_logits(apply_fn)
  m = pts.shape[0]
  if not m:
    return np.zeros(0), np.zeros(0, bool)
  bs = min(batch_size, 1 << (m - 1).bit_length())
  pad = np.concatenate([pts, np.repeat(pts[-1:], -m % bs, axis=0)])
  logits = np.concatenate([np.asarray(fn(params, jnp.asarray(pad[s:s + bs])))
                           for s in range(0, pad.shape[0], bs)])[:m]
  true = logits[np.arange(y.size), y]
  other = np.max(np.where(np.eye(logits.shape[1], dtype=bool)[y], -np.inf, logits), axis=1)
  return true - other, logits.argmax(-1) != y


def verify_points(apply_fn: Callable, params: Any, x: chex.Array, y: chex.Array,
                  eps: Optional[chex.Numeric], norm: str = "linf", *,
                  k: Optional[int] = None, domain: Optional[Tuple[float, float]] = None,
                  stages: Optional[Sequence[str]] = None, pgd: Optional[Dict] = None,
                  mip_time_limit: float = 60.0, mip_options: Optional[Dict] = None,
                  certifiable: Optional[np.ndarray] = None, batch_size: int = 256,
                  chunk_bytes: int = linear.DEFAULT_CHUNK_BYTES,
                  sound: bool = True) -> PipelineResult:
  """Certified, falsified or unknown, per point, by the stages in turn.

  Args:
    apply_fn, params: the model ``(params, x) -> (N, K) logits``.
    x: (N, ...) inputs; y: (N,) labels; eps: scalar or (N,) radii; norm, k, domain: the
      input set (:func:`dm_jax.core.input_sets.make_input_set`).
    stages: stage names (see the module docstring), e.g. ``("ibp", "crown_ibp",
      "crown_intersect", "pgd", "mip")``, or a comma-separated string; default
      :func:`default_stages`.
    pgd: settings of the ``pgd`` stage (keys of :data:`PGD_DEFAULTS`: ``steps`` 50,
      ``restarts`` 2, ``step_size`` (default 2.5 eps / steps), ``seed``, ``batch_size``,
      ``chunk``).
    mip_time_limit: seconds per MILP (one per point and other class) of ``mip``.
    mip_options: further keyword arguments of :func:`dm_jax.verify.mip.exact_margins`
      (``max_binaries``, ``tighten``, ...).
    certifiable: optional (N,) bool: the points the certifying stages (and ``mip``) may
      see; the others only meet the falsifiers (a table's monotone pass: a point not
      certified at a smaller eps is not certified at a larger one).
    batch_size, chunk_bytes: of the certifiers (:func:`dm_jax.verify.certify.certify`).
    sound: the final verdict sound in floating point (default): a point a certifier
      stage certifies is certified only when the same certifier with ``sound=True``
      (:mod:`dm_jax.core.rounding`) certifies it too, and its ``margin_lower`` is that
      sound bound; a point it does not confirm stays undecided for the later stages.
      (The plain bound screens, so the float64 pass runs on the certified points only;
      so ``margin_lower`` is float-sound where a certifier certified the point, and
      elsewhere, where it is <= 0 and proves nothing, may be the plain float bound. The
      ``mip`` stage's verdict rests on the solver's tolerances, not analysed.)
      False: the plain float bounds decide, as before.

  Returns:
    A :class:`PipelineResult`.

  Raises:
    ValueError: bad arguments, unknown or unsupported stages (``pgd`` needs l-inf or l2,
      ``mip`` l-inf or l1).
  """
  norm = canonical_norm(norm)
  stages = check_stages(stages, norm)
  pgd_opts = dict(PGD_DEFAULTS)
  bad = set(pgd or {}) - set(PGD_DEFAULTS)
  if bad:
    raise ValueError(f"unknown pgd settings {sorted(bad)}; expected {sorted(PGD_DEFAULTS)}.")
  pgd_opts.update(pgd or {})
  if not mip_time_limit > 0:
    raise ValueError(f"mip_time_limit must be > 0; got {mip_time_limit!r}.")
  x, y = certify_lib._check_xy(x, y)  # pylint: disable=protected-access
  x = np.asarray(x)
  y = np.asarray(y)
  n = x.shape[0]
  eps_arr = certify_lib.check_eps(eps, n)
  iset = make_input_set(jnp.asarray(x), jnp.asarray(eps_arr), norm, k, domain)
  if certifiable is None:
    certifiable = np.ones(n, bool)
  certifiable = np.asarray(certifiable, bool)
  if certifiable.shape != (n,):
    raise ValueError(f"certifiable must have shape ({n},); got {certifiable.shape}.")

  names = (CLEAN,) + stages
  status = np.zeros(n, np.int8)
  stage = np.full(n, -1, np.int64)
  lower = np.full(n, -np.inf)
  upper = np.full(n, np.inf)
  cex = np.full(x.shape, np.nan, x.dtype)
  seconds = {s: 0.0 for s in names}
  checked = {s: 0 for s in names}
  decided = {s: 0 for s in names}

  def falsify(idx, candidates, index):
    """Marks idx falsified where its candidate, pulled into the set, is in it and is
    misclassified; every candidate in the set lowers the margin's upper bound."""
    sub = iset.take(lambda a: a[idx])
    pts = pull_inside(sub, candidates)
    inside = contains(sub, pts)
    margin, wrong = _margins(apply_fn, params, pts, y[idx], batch_size)
    upper[idx] = np.where(inside, np.minimum(upper[idx], margin), upper[idx])
    hit = inside & wrong & (status[idx] == UNKNOWN)
    status[idx[hit]], stage[idx[hit]] = FALSIFIED, index
    cex[idx[hit]] = pts[hit]
    return int(hit.sum())

  t0 = time.perf_counter()
  everyone = np.arange(n)
  checked[CLEAN] = n
  decided[CLEAN] = falsify(everyone, x, 0)
  seconds[CLEAN] = time.perf_counter() - t0

  for index, name in enumerate(stages, start=1):
    undecided = status == UNKNOWN
    if name == "pgd":
      undecided &= eps_arr > 0  # at eps 0 the clean check decided everything
    else:
      undecided &= certifiable
    idx = np.flatnonzero(undecided)
    checked[name] = int(idx.size)
    if not idx.size:
      continue
    t0 = time.perf_counter()
    if name == "pgd":
      # Power-of-two batches: the points left vary per call, the compiled shapes do not.
      bs = min(int(pgd_opts["batch_size"]), 1 << (idx.size - 1).bit_length())
      adv, _ = certify_lib.pgd_search(
          apply_fn, params, x[idx], y[idx], eps_arr[idx], norm, steps=pgd_opts["steps"],
          restarts=pgd_opts["restarts"], step_size=pgd_opts["step_size"],
          seed=pgd_opts["seed"], domain=domain, batch_size=bs, chunk=pgd_opts["chunk"])
      decided[name] = falsify(idx, adv, index)
    elif name == "mip":
      from dm_jax.verify import mip  # pylint: disable=import-outside-toplevel
      res = mip.exact_margins(apply_fn, params, jnp.asarray(x[idx]), y[idx], eps_arr[idx],
                              norm, domain=domain, time_limit=mip_time_limit,
                              **(mip_options or {}))
      lower[idx] = np.maximum(lower[idx], res.margin_lower)
      cert = res.certified
      status[idx[cert]], stage[idx[cert]] = CERTIFIED, index
      # The minimiser of the smallest attained margin, checked like an attack's point.
      att = np.where(np.isfinite(res.attained_margin), res.attained_margin, np.inf)
      j = np.argmin(att, axis=1)
      cand = res.argmin_inputs[np.arange(idx.size), j]
      have = np.all(np.isfinite(cand.reshape(idx.size, -1)), axis=1) & ~cert
      decided[name] = int(cert.sum())
      if np.any(have):
        decided[name] += falsify(idx[have], cand[have], index)
    else:
      run = lambda i, s: certify_lib.certify(
          apply_fn, params, x[i], y[i], eps_arr[i], norm, method=name, k=k, domain=domain,
          batch_size=batch_size, chunk_bytes=chunk_bytes, mip_time_limit=mip_time_limit,
          sound=s)
      cert, low = run(idx, False)
      if sound and np.any(cert):  # the verdict: the sound bound of what the plain one certifies
        cert_s, low_s = run(idx[cert], True)
        low = low.copy()
        low[cert] = low_s
        cert = cert.copy()
        cert[cert] = cert_s
      lower[idx] = np.maximum(lower[idx], low)
      status[idx[cert]], stage[idx[cert]] = CERTIFIED, index
      decided[name] = int(cert.sum())
    seconds[name] = time.perf_counter() - t0
  return PipelineResult(status=status, stage=stage, margin_lower=lower, margin_upper=upper,
                        counterexamples=cex, stages=names, seconds=seconds,
                        checked=checked, decided=decided)
