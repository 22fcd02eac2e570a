"""Certification: certified points, certified accuracy over an eps grid, certified radii,
ReLU stability counts.

A point is certified at eps when it is classified correctly and a sound lower bound of
``f_y - f_j`` over the input set is > 0 for every ``j != y`` (SPEC.md, Certification).
Methods: ``ibp`` (last layer folded), ``crown_ibp``, ``fastlin`` (CNN-Cert-ReLU),
``crown`` (CNN-Cert-Ada), ``zero`` (CNN-Cert-Zero), and ``mip`` (exact, small nets only).
The "best" row of a table certifies a point if any sound method does.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dm_jax import linear
from dm_jax.input_sets import canonical_norm, make_input_set
from dm_jax.interval import interval_bounds

CERTIFY_METHODS = linear.METHODS + ("mip",)


def canonical_certifier(method: str) -> str:
  if str(method).strip().lower() == "mip":
    return "mip"
  return linear.canonical_method(method)


@functools.lru_cache(maxsize=64)
def _compiled_margin_fn(apply_fn, method, norm, k, domain, chunk_bytes):
  def fn(params, x, y, eps):
    lb = linear.margin_lower_bounds(apply_fn, params, x, y, eps, norm, method=method, k=k,
                                    domain=domain, chunk_bytes=chunk_bytes)
    lb = jnp.where(jax.nn.one_hot(y, lb.shape[-1], dtype=bool), jnp.inf, lb)
    correct = jnp.argmax(apply_fn(params, x), axis=-1) == y
    return jnp.min(lb, axis=-1), correct
  return jax.jit(fn)


def _check_xy(x, y):
  x = np.asarray(x) if not isinstance(x, jax.Array) else x
  y = np.asarray(y) if not isinstance(y, jax.Array) else y
  if x.ndim < 2:
    raise ValueError(f"x must be (N, ...) with a batch axis; got shape {x.shape}.")
  if y.shape != (x.shape[0],):
    raise ValueError(f"y must have shape (N,) = ({x.shape[0]},); got {y.shape}.")
  return x, y


def certify(apply_fn: Callable, params, x, y, eps, norm="linf", *, method="crown",
            k: Optional[int] = None, domain=None, batch_size: int = 256,
            chunk_bytes: int = linear.DEFAULT_CHUNK_BYTES, progress: bool = False,
            mip_time_limit: float = 60.0) -> Tuple[np.ndarray, np.ndarray]:
  """Certifies N points at radius ``eps`` (scalar or (N,) per point).

  Args:
    apply_fn, params: the model.
    x: (N, ...) inputs; y: (N,) labels.
    eps: scalar or (N,).
    method: ibp | crown_ibp | fastlin (relu) | crown (ada) | zero | mip.
    batch_size: points per compiled call (the last chunk is padded, so one compile).

  Returns:
    (certified (N,) bool, margin_lower (N,) float): the lower bound of
    ``min_{j != y} f_y - f_j`` over the set.
  """
  method = canonical_certifier(method)
  norm = canonical_norm(norm)
  x, y = _check_xy(x, y)
  n = x.shape[0]
  eps_arr = np.asarray(0.0 if eps is None else eps, np.float32)
  if eps_arr.ndim > 1 or (eps_arr.ndim == 1 and eps_arr.shape != (n,)):
    raise ValueError(f"eps must be a scalar or have shape (N,) = ({n},); got {eps_arr.shape}.")
  eps_arr = np.broadcast_to(eps_arr, (n,))
  # Every eps is checked here: inside the compiled call eps is traced and cannot be.
  if not np.all(np.isfinite(eps_arr)) or np.any(eps_arr < 0):
    raise ValueError(f"eps must be finite and >= 0 for every point; got min {eps_arr.min()}.")
  make_input_set(jnp.asarray(x[:1]), eps_arr[:1], norm, k, domain)  # validate the rest
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  if method == "mip":
    from dm_jax import mip  # scipy solver: small nets only, not jit-able
    if norm not in ("linf", "l1") or np.unique(eps_arr).size != 1:
      raise ValueError("method='mip' needs norm linf or l1 and one eps for all points.")
    cert, lower = mip.exact_certify(apply_fn, params, x, y, float(eps_arr[0]), norm,
                                    domain=domain, time_limit=mip_time_limit)
    return np.asarray(cert), np.asarray(lower)
  fn = _compiled_margin_fn(apply_fn, method, norm, k, None if domain is None else
                           tuple(domain), chunk_bytes)
  batch_size = min(batch_size, n)
  certified, lowers = [], []
  chunks = range(0, n, batch_size)
  for start in tqdm(chunks, desc=f"certify {method}", disable=not progress, leave=False):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    take = lambda a: np.concatenate([a[start:stop], np.repeat(a[stop - 1:stop], pad, 0)])
    low, correct = fn(params, jnp.asarray(take(x)), jnp.asarray(take(y)),
                      jnp.asarray(take(eps_arr)))
    low, correct = np.asarray(low)[:stop - start], np.asarray(correct)[:stop - start]
    lowers.append(low)
    certified.append(correct & (low > 0))
  return np.concatenate(certified), np.concatenate(lowers)


def certified_accuracy(apply_fn, params, x, y, eps_grid: Sequence[float], norm="linf", *,
                       method="crown", **kw) -> np.ndarray:
  """Share of the N points certified at each eps of the grid: (len(eps_grid),)."""
  return np.array([certify(apply_fn, params, x, y, e, norm, method=method, **kw)[0].mean()
                   for e in eps_grid])


def certified_accuracy_table(apply_fn, params, x, y, eps_grid: Sequence[float],
                             methods: Sequence[str] = ("fastlin", "ibp"), norm="linf", *,
                             progress: bool = True, **kw) -> Dict:
  """Paper-style table: certified accuracy per certifier and eps, plus the "best" row.

  Returns:
    dict with ``eps`` (list), ``rows`` {method: [accuracy per eps]} including "best"
    (a point counts if any method certifies it), ``num_points``, ``norm`` and ``clean``
    (plain accuracy).
  """
  methods = [canonical_certifier(m) for m in methods]
  x, y = _check_xy(x, y)
  rows = {m: [] for m in methods}
  best = []
  bar = tqdm(total=len(methods) * len(eps_grid), desc="certification", disable=not progress)
  for e in eps_grid:
    union = np.zeros(x.shape[0], bool)
    for m in methods:
      cert, _ = certify(apply_fn, params, x, y, e, norm, method=m, **kw)
      rows[m].append(float(cert.mean()))
      union |= cert
      bar.update(1)
    best.append(float(union.mean()))
  bar.close()
  rows["best"] = best
  logits = np.asarray(apply_fn(params, jnp.asarray(x)))
  return {"eps": [float(e) for e in eps_grid], "rows": rows, "num_points": int(x.shape[0]),
          "norm": canonical_norm(norm),
          "clean": float((logits.argmax(-1) == np.asarray(y)).mean())}


_LABELS = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "fastlin": "CNN-Cert-ReLU",
           "crown": "CNN-Cert-Ada", "zero": "CNN-Cert-Zero", "mip": "MIP (exact)",
           "best": "best (union)"}


def format_table(table: Dict, eps_scale: float = 1.0, eps_label: str = "eps") -> str:
  """Renders a certified-accuracy table as aligned text (rows certifiers, columns eps)."""
  eps = [e * eps_scale for e in table["eps"]]
  head = [f"{eps_label}:"] + [f"{e:g}" for e in eps]
  lines = [head]
  for m, accs in table["rows"].items():
    lines.append([_LABELS.get(m, m)] + [f"{100 * a:.1f}%" for a in accs])
  widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
  out = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
         for r in lines]
  out.insert(1, "-" * len(out[0]))
  return "\n".join(out) + f"\n({table['num_points']} points, norm {table['norm']}, " \
      f"clean accuracy {100 * table['clean']:.1f}%)"


def table_to_csv(table: Dict) -> str:
  lines = ["method," + ",".join(f"{e:g}" for e in table["eps"])]
  for m, accs in table["rows"].items():
    lines.append(m + "," + ",".join(f"{a:.4f}" for a in accs))
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
    ax.plot(eps, 100 * np.array(accs), marker="o", label=_LABELS.get(m, m),
            linestyle="--" if m == "best" else "-")
  ax.set_xlabel(eps_label)
  ax.set_ylabel("certified accuracy (%)")
  ax.set_ylim(-2, 102)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(title or f"certified accuracy ({table['num_points']} points, {table['norm']})")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def certified_radius(apply_fn, params, x, y, norm="linf", *, method="crown",
                     eps_max: float = 1.0, iterations: int = 12, **kw) -> np.ndarray:
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


def relu_stability(apply_fn, params, x, eps, norm="linf", *, method="ibp", k=None,
                   domain=None) -> Dict[str, np.ndarray]:
  """Counts of stable-active, stable-inactive and unstable ReLUs per layer.

  Returns:
    dict of arrays of shape (num_relu_layers,), summed over the batch: ``active``,
    ``inactive``, ``unstable``, ``total``. ``method`` chooses the pre-activation bounds:
    ibp, or fastlin/crown/zero (layer-by-layer linear bounds).
  """
  method = linear.canonical_method(method)
  if method == "ibp":
    _, relus = interval_bounds(apply_fn, params, x, eps, norm, k=k, domain=domain,
                               return_relu_inputs=True)
    pairs = [(b.lower, b.upper) for b in relus]
  else:
    pairs = linear.relu_input_bounds(apply_fn, params, x, eps, norm, method=method, k=k,
                                     domain=domain)
  active = np.array([int(jnp.sum(l >= 0)) for l, _ in pairs])
  inactive = np.array([int(jnp.sum(u <= 0)) for l, u in pairs])
  total = np.array([int(np.prod(l.shape)) for l, _ in pairs])
  return {"active": active, "inactive": inactive, "unstable": total - active - inactive,
          "total": total}
