r"""Rank the registered regularizers by Proposition 2 for a trained checkpoint.

  python -m experiments.select_regularizer --checkpoint=runs/mnist_normal_small_eps0.1 \
      --target=robust_val --target_method=ibp --eps=0.1
  python -m experiments.select_regularizer --checkpoint=... --eps=0.1 --validate \
      --finetune_steps=100 --finetune_lam=0.05          # + measure the ranking

For the checkpoint's parameters theta (normally, or briefly robustly, trained), the clean
loss L (cross-entropy on ``--train_points`` seeded random training examples, the data
the checkpoint was trained on) and its Hessian H there (``--gauss_newton``: the
positive semi-definite Gauss-Newton matrix, the default, as a finite-training point is
no exact minimum; plus ``--damping`` I), each candidate regularizer R_i of the
training-method registry (``--candidates``; :func:`dm_jax.analysis.method_regularizer`,
its gradient on the same training points) is scored by
``||grad R_i - grad R_J||_{H^-1}`` (Proposition 2: for small lam, minimising
``L + lam R_i`` lowers the objective ``J = L + lam R_J`` iff that distance is below
``||grad R_J||_{H^-1}``; the closest regularizer is best). The target R_J (``--target``)
is on ``--val_points`` held-out points at ``--eps``:

* ``robust_val``: ``R_J = robust_val - L`` (the paper's "robust validation loss minus
  clean training loss", so ``J = (1 - lam) L + lam robust_val``), robust_val the robust
  loss of ``--target_method`` (IBP's or CROWN-IBP's worst-case cross-entropy; in general
  the method's objective at full regularizer weight, CE + R);
* ``robust_gap_val``: ``R_J`` = the target method's regularizer on the held-out points.

Prints the table with the CG diagnostics (iterations, relative residual, converged) and
writes it as JSON (``--output``, default ``<checkpoint>/select_regularizer.json``),
with the timings: HVP seconds (one product over the Hessian's points) and total.

``--validate`` measures the ranking: from theta, ``--finetune_steps`` Adam steps on
``L + lam R_i`` (``lam = --finetune_lam``, minibatches of the same training points,
the same batches for every candidate, and a ``none`` run with lam = 0 as the baseline),
then the objective J and the certified accuracy (``--certifier`` at eps on
``--cert_points`` held-out points); the Spearman rank correlations between the predicted
distance and the measured J (and certified accuracy) are reported, not asserted.

``--benchmark`` prints a docs/benchmarks.md row (HVP time, CG iterations, wall time):

  python -m experiments.mnist --method=normal --epochs=1 --eps=0.1 --num_cert_points=0 \
      --pgd_restarts=0 --workdir=runs/select_normal_small
  python -m experiments.select_regularizer --checkpoint=runs/select_normal_small \
      --eps=0.1 --train_points=1000 --val_points=10000 --benchmark

Cost: one Gauss-Newton HVP over N Hessian points costs about a forward and three
backward passes over them (small CNN: 0.11 s for 250 points, 0.65 s for 1000 on 2
loaded cores); a solve takes about sqrt(condition number) of them, ~40 for tol 1e-3
with the default damping 0.1 (largest eigenvalue ~50 after a brief normal training,
printed); one solve per candidate plus one for the target. The held-out points only
cost the target's gradient (forward-backward passes of its bounds). The batches of the
products are unrolled and CG iterates on the host: XLA:CPU runs convolution gradients
inside loops 10-25x slower (:mod:`dm_jax.analysis`).

Choices: the Hessian is of the clean cross-entropy on training points the checkpoint was
trained on, the candidates' gradients on the same points and the target's on held-out
points; the regularizers use the checkpoint's norm, their methods' default options
(sound bounds on the ball intersected with the box [0, 1]) and PRNGKey(--seed); a
candidate whose method has no regularizer term (normal, adv, trades) is an error.
"""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import app, flags

from dm_jax.analysis import PAPER_REGULARIZERS
from experiments import cli
from experiments.grids import parse_number

FLAGS = flags.FLAGS
DEFAULT_CANDIDATES = ",".join(PAPER_REGULARIZERS)
TARGETS = ("robust_val", "robust_gap_val")


def define_flags() -> None:
  """Defines the script's absl flags (called when run as a script, so that importing the
  module for :func:`select` and :func:`validate` defines no global flags)."""
  flags.DEFINE_string("checkpoint", None, "A training workdir (holding checkpoints/) or its "
                      "checkpoints/ directory.")
  flags.DEFINE_string("dataset", None, "Dataset; default: the checkpoint's.")
  flags.DEFINE_string("data_dir", None, "Data directory (default $DM_JAX_DATA_DIR).")
  flags.DEFINE_enum("target", "robust_val", list(TARGETS), "The target regularizer R_J: "
                    "'robust_val' (robust loss on held-out data minus the clean training "
                    "loss) or 'robust_gap_val' (the target method's regularizer on held-out "
                    "data).")
  flags.DEFINE_string("target_method", "ibp", "Registered method whose robust loss is the "
                      "target (ibp, crown_ibp, or any with a regularizer).")
  flags.DEFINE_string("eps", None, "Radius of the regularizers and the target (fractions "
                      "like 8/255 accepted); default: the checkpoint's eps_train.")
  flags.DEFINE_string("candidates", DEFAULT_CANDIDATES, "Comma-separated registered "
                      "methods, each with options in brackets, e.g. "
                      "'dm[dm_loss=worst_case;lam_form=kappa],ibp'.")
  flags.DEFINE_integer("train_points", 1000, "Seeded random training points of L, H and the "
                       "candidates' gradients.")
  flags.DEFINE_integer("val_points", 10000, "Held-out points of the target.")
  flags.DEFINE_enum("heldout", "test", ["test", "train_tail"], "Held-out points: the test "
                    "split, or the last val_points training examples (needs a checkpoint "
                    "trained with --max_train_examples leaving them out).")
  flags.DEFINE_integer("batch_size", 500, "Points per batch of the Hessian-vector products "
                       "and gradients (the point counts are rounded down to multiples).")
  flags.DEFINE_bool("gauss_newton", True, "Gauss-Newton matrix instead of the Hessian.")
  flags.DEFINE_float("damping", 0.1, "delta of H + delta I (the proximal weight of a "
                     "quadratic model trusted near theta; smaller: closer to the paper's "
                     "H^-1, more CG iterations, about sqrt(lambda_max / delta)).")
  flags.DEFINE_float("cg_tol", 1e-3, "CG relative residual tolerance.")
  flags.DEFINE_integer("cg_maxiter", 200, "CG iterations per solve at most.")
  flags.DEFINE_integer("eig_iters", 20, "Power iterations estimating the largest eigenvalue "
                       "of H (the damped matrix's condition number; 0: skip).")
  flags.DEFINE_integer("seed", 0, "Seed of the points and of the regularizers' PRNG key.")
  flags.DEFINE_string("output", None, "JSON path (default <checkpoint>/select_regularizer"
                      ".json).")
  flags.DEFINE_bool("validate", False, "Fine-tune with each regularizer and measure.")
  flags.DEFINE_integer("finetune_steps", 100, "--validate: Adam steps per candidate.")
  flags.DEFINE_float("finetune_lam", 0.05, "--validate: the regularizer weight lam.")
  flags.DEFINE_float("finetune_lr", 1e-4, "--validate: Adam learning rate.")
  flags.DEFINE_integer("finetune_batch", 100, "--validate: minibatch size.")
  flags.DEFINE_integer("cert_points", 1000, "--validate: held-out points certified.")
  flags.DEFINE_string("certifier", None, "--validate: certifier (ibp, crown_ibp, fastlin, "
                      "...); default: crown_ibp for target_method crown_ibp, else ibp.")
  flags.DEFINE_bool("check_affinity", False, "Also measure on 32 points that each "
                    "candidate's objective is affine in its weight (compiles it 4 more "
                    "times).")
  flags.DEFINE_bool("benchmark", False, "Print a docs/benchmarks.md row.")


# ----------------------------------------------------------------------------- parsing

def parse_candidates(text: str) -> List[Tuple[str, str, Dict[str, Any]]]:
  """'dm,ibp[ibp_margin=true]' -> [(label, method, options)] (the method syntax of
  ``benchmarks.train_bench --methods``); ValueError when malformed."""
  from dm_jax.train import methods
  out, labels = [], set()
  for entry in methods.split_method_entries(text):
    try:
      name, options = methods.parse_method_entry(entry)
    except ValueError as e:
      raise ValueError(f"--candidates: {e}") from None
    methods.spec(name)  # ValueError listing the registered methods
    if entry in labels:
      raise ValueError(f"--candidates: {entry!r} is given twice.")
    labels.add(entry)
    out.append((entry, name, options))
  if not out:
    raise ValueError("--candidates is empty.")
  return out


# ----------------------------------------------------------------------------- loading

def load_checkpoint(path: str, data_dir: Optional[str] = None,
                    dataset: Optional[str] = None):
  """``(config, dataset, apply_fn, params, step)`` of a training workdir's latest
  checkpoint (orbax, :mod:`dm_jax.train.checkpoint`)."""
  from dm_jax import data as data_lib
  from dm_jax import train as train_lib

  workdir, config = train_lib.load_config(path)
  ds = data_lib.load_dataset(dataset or config.dataset, data_dir)
  num_classes = config.num_classes or ds.num_classes
  state = train_lib.load_params(workdir, config, ds.input_shape, num_classes)
  _, apply_fn = train_lib.build_model(config, num_classes)
  return config, ds, apply_fn, state.params, int(state.step), workdir


def choose_points(ds, config, train_points: int, val_points: int, heldout: str,
                  seed: int):
  """Seeded ``(x_train, y_train), (x_val, y_val)``: training points among those the
  checkpoint was trained on, held-out points from the test split or the training tail."""
  import numpy as np
  used = min(config.max_train_examples or ds.num_train, ds.num_train)
  if heldout == "train_tail":
    if used > ds.num_train - val_points:
      raise ValueError(f"--heldout=train_tail: the checkpoint trained on the first {used} "
                       f"of {ds.num_train} training examples, so the last {val_points} "
                       "are not held out (train with --max_train_examples, or "
                       "--heldout=test).")
    pool_x, pool_y = ds.x_train[ds.num_train - val_points:], ds.y_train[
        ds.num_train - val_points:]
  else:
    pool_x, pool_y = ds.x_test, ds.y_test
  for what, n, have in (("train_points", train_points, used),
                        ("val_points", val_points, len(pool_x))):
    if not 1 <= n <= have:
      raise ValueError(f"--{what} must be in [1, {have}]; got {n}.")
  rng = np.random.default_rng(seed)
  tr = np.sort(rng.choice(used, train_points, replace=False))
  va = np.sort(rng.choice(len(pool_x), val_points, replace=False))
  return (ds.x_train[tr], ds.y_train[tr]), (pool_x[va], pool_y[va])


# ----------------------------------------------------------------------------- core

def _batches(data, batch_size):
  from dm_jax import analysis
  n = len(data[1])
  return analysis.stack_batches(data, min(batch_size, n))


def _timed(fn, *args):
  import jax
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def host_mean(fn, params, batches):
  """``mean_b fn(params, b)`` over the leading axis of ``batches``, one call of the
  (jitted) ``fn`` per batch from Python (XLA:CPU runs convolution gradients slowly
  inside loops: :mod:`dm_jax.analysis`)."""
  import jax
  count = len(jax.tree_util.tree_leaves(batches)[0])
  total = None
  for i in range(count):
    out = fn(params, jax.tree_util.tree_map(lambda a: a[i], batches))
    total = out if total is None else jax.tree_util.tree_map(lambda s, t: s + t, total, out)
  return jax.tree_util.tree_map(lambda t: t / count, total)


def target_function(kind: str, target_reg, clean_loss, with_grad: bool = True):
  """``(params, train_batches, val_batches) -> (R_J, grad R_J)`` for R_J of ``kind``
  (:data:`TARGETS`), batch by batch (:func:`host_mean`); without ``with_grad`` the
  gradient is None (only forward passes)."""
  import jax
  if with_grad:
    vg_target = jax.jit(jax.value_and_grad(target_reg))
    vg_clean = jax.jit(jax.value_and_grad(clean_loss))
  else:
    none = lambda f: jax.jit(lambda p, b: (f(p, b), jax.numpy.zeros(())))
    vg_target, vg_clean = none(target_reg), none(clean_loss)

  def value_and_grad(params, train_batches, val_batches):
    r_val, g_val = host_mean(vg_target, params, val_batches)
    if kind == "robust_gap_val":
      return r_val, g_val if with_grad else None
    ce_val, g_ce_val = host_mean(vg_clean, params, val_batches)
    ce_tr, g_ce_tr = host_mean(vg_clean, params, train_batches)
    grad = jax.tree_util.tree_map(lambda a, b, c: a + b - c, g_val, g_ce_val, g_ce_tr)
    return r_val + ce_val - ce_tr, grad if with_grad else None

  return value_and_grad


def select(apply_fn, params, train_data, val_data, *, eps: float, norm: str = "linf",
           candidates: Sequence[Tuple[str, str, Dict[str, Any]]], target: str = "robust_val",
           target_method: str = "ibp", batch_size: int = 500, gauss_newton: bool = True,
           damping: float = 0.1, tol: float = 1e-3, maxiter: int = 200, seed: int = 0,
           check_affinity: bool = False, eig_iters: int = 20,
           log=print) -> Dict[str, Any]:
  """Ranks ``candidates`` against the target at ``params`` (see the module docstring).

  The Hessian-vector products are over ``train_data`` in batches of ``batch_size``
  (unrolled: one compiled product) and CG iterates on the host; the gradients are
  batch by batch (:func:`host_mean`).

  Returns:
    A JSON-able dict: ``rows`` (:func:`dm_jax.analysis.rank_regularizers`' rows plus
    each candidate's method, options, value, weight and gradient time, and with
    ``check_affinity`` its affinity error), ``target``, ``clean`` (L and ``||grad L||``:
    how far from stationary the point is), ``setting`` and ``timings``.

  Raises:
    ValueError: a candidate with no regularizer term (R = 0 and grad R = 0), bad options.
  """
  import jax
  import numpy as np
  from jax.flatten_util import ravel_pytree
  from dm_jax import analysis

  if target not in TARGETS:
    raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}.")
  t_start = time.perf_counter()
  key = jax.random.PRNGKey(seed)
  loss = analysis.classification_loss(apply_fn)
  train_batches, val_batches = _batches(train_data, batch_size), _batches(val_data,
                                                                           batch_size)
  train_batches = jax.tree_util.tree_map(jax.numpy.asarray, train_batches)
  n_train = int(np.prod(np.shape(train_batches[1])))
  n_val = int(np.prod(np.shape(val_batches[1])))

  grads, info = {}, {}
  for label, name, options in candidates:
    reg = analysis.method_regularizer(name, apply_fn, eps, key=key,
                                      **dict(dict(norm=norm), **options))
    (value, grad), seconds = _timed(host_mean, jax.jit(jax.value_and_grad(reg)), params,
                                    train_batches)
    grad_norm = float(np.linalg.norm(ravel_pytree(grad)[0]))
    if float(value) == 0.0 and grad_norm == 0.0:
      raise ValueError(f"candidate {label!r}: method {name!r} has no regularizer term "
                       "(its loss reads neither hyper.lam nor hyper.kappa, R = 0); drop it "
                       "from --candidates.")
    grads[label] = grad
    info[label] = dict(method=name, options=options, value=float(value),
                       weight=reg.weight, grad_norm=grad_norm, grad_seconds=seconds,
                       description=reg.description)
    if check_affinity:
      first = jax.tree_util.tree_map(lambda a: a[0, :min(32, a.shape[1])], train_batches)
      check = jax.jit(functools.partial(analysis.regularizer_check, reg))(params, first)
      info[label]["affinity_error"] = float(check.affinity_error)
    log(f"  gradient of {label}: R = {float(value):.4g}, |grad R|_2 = {grad_norm:.3g} "
        f"({seconds:.1f} s)")

  target_reg = analysis.method_regularizer(target_method, apply_fn, eps, key=key,
                                           norm=norm)
  (r_j, g_j), target_seconds = _timed(target_function(target, target_reg, loss), params,
                                      train_batches, val_batches)
  l_value, l_grad = analysis.batch_value_and_grad(loss, params, train_batches,
                                                  unroll=True)
  op = jax.jit(lambda p, b, v: analysis.hvp(loss, p, b, gauss_newton=gauss_newton,
                                            damping=damping, unroll=True)(v))
  _, compile_seconds = _timed(op, params, train_batches, l_grad)
  hvp_times = [_timed(op, params, train_batches, l_grad)[1] for _ in range(3)]
  log(f"  target R_J = {float(r_j):.4g} ({target_seconds:.1f} s); one HVP over "
      f"{n_train} points: {np.median(hvp_times):.3f} s")
  lam_max = float("nan")
  if eig_iters:
    undamped = jax.jit(lambda p, b, v: analysis.hvp(loss, p, b, gauss_newton=gauss_newton,
                                                    unroll=True)(v))
    lam_max = float(analysis.top_eigenvalue(lambda v: undamped(params, train_batches, v),
                                            params, key, iters=eig_iters, host_loop=True))
    cond = (f": condition number of the damped matrix <= "
            f"{(lam_max + damping) / damping:.3g}" if damping > 0 and gauss_newton else "")
    log(f"  largest eigenvalue of the {'Gauss-Newton matrix' if gauss_newton else 'Hessian'}"
        f" ~ {lam_max:.4g} ({eig_iters} power iterations){cond}")

  t0 = time.perf_counter()
  ranking = analysis.rank_regularizers(params, loss, train_batches, grads, g_j,
                                       gauss_newton=gauss_newton, damping=damping,
                                       unroll=True, tol=tol, maxiter=maxiter,
                                       host_loop=True)
  rank_seconds = time.perf_counter() - t0
  for row in ranking["rows"]:
    row.update(info[row["name"]])
  solves = [r["iterations"] for r in ranking["rows"]] + [ranking["target"]["iterations"]]
  ranking["target"].update(kind=target, method=target_method, value=float(r_j),
                           seconds=target_seconds)
  flat_grad = ravel_pytree(l_grad)[0]
  return dict(
      rows=ranking["rows"], target=ranking["target"],
      clean=dict(loss=float(l_value), grad_norm=float(np.linalg.norm(flat_grad)),
                 top_eigenvalue=lam_max, eig_iters=eig_iters),
      setting=dict(eps=eps, norm=norm, train_points=n_train, val_points=n_val,
                   batch_size=int(np.shape(train_batches[1])[1]),
                   gauss_newton=gauss_newton, damping=damping, cg_tol=tol,
                   cg_maxiter=maxiter, seed=seed,
                   num_params=int(flat_grad.size)),
      timings=dict(hvp_seconds=float(np.median(hvp_times)),
                   hvp_compile_seconds=compile_seconds, rank_seconds=rank_seconds,
                   cg_iterations=solves, total_seconds=time.perf_counter() - t_start))


def validate(apply_fn, params, train_data, val_data, result: Dict[str, Any], *,
             steps: int, lam: float, lr: float, batch_size: int, cert_points: int,
             certifier: str, domain=(0.0, 1.0), seed: int = 0, log=print) -> Dict[str, Any]:
  """Fine-tunes from ``params`` with each ranked regularizer (and none) and measures the
  objective ``J = L + lam R_J`` and the certified accuracy; Spearman rank correlations
  between the predicted distance and the measurements (reported, not asserted)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from dm_jax import analysis
  from dm_jax.verify import certify

  setting = result["setting"]
  eps, norm = setting["eps"], setting["norm"]
  key = jax.random.PRNGKey(seed)
  loss = analysis.classification_loss(apply_fn)
  train_batches = _batches(train_data, setting["batch_size"])
  val_batches = _batches(val_data, setting["batch_size"])
  target_reg = analysis.method_regularizer(result["target"]["method"], apply_fn, eps,
                                           key=key, norm=norm)
  target_value = target_function(result["target"]["kind"], target_reg, loss,
                                 with_grad=False)
  clean = jax.jit(loss)
  x_tr, y_tr = train_data
  n = len(y_tr)
  bs = min(batch_size, n)
  rng = np.random.default_rng(seed + 1)  # the same minibatches for every candidate
  order = [rng.choice(n, bs, replace=False) for _ in range(steps)]
  x_cert, y_cert = val_data[0][:cert_points], val_data[1][:cert_points]

  def objective_j(p):
    r_j, _ = target_value(p, train_batches, val_batches)
    return float(host_mean(clean, p, train_batches)) + lam * float(r_j)

  def cert_acc(p):
    ok, _ = certify.certify(apply_fn, p, x_cert, y_cert, eps, norm, method=certifier,
                            domain=domain, batch_size=256)
    return float(np.mean(ok))

  def finetune(reg):
    tx = optax.adam(lr)

    def objective(p, xb, yb):
      value = loss(p, (xb, yb))
      return value if reg is None else value + lam * reg(p, (xb, yb))

    @jax.jit
    def step(p, state, xb, yb):
      g = jax.grad(objective)(p, xb, yb)
      updates, state = tx.update(g, state, p)
      return optax.apply_updates(p, updates), state

    p, state = params, tx.init(params)
    for idx in order:
      p, state = step(p, state, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]))
    return p

  j0 = objective_j(params)
  runs = {}
  labels = [None] + [r["name"] for r in result["rows"]]
  for label in labels:
    t0 = time.perf_counter()
    if label is None:
      reg = None
    else:
      row = next(r for r in result["rows"] if r["name"] == label)
      reg = analysis.method_regularizer(row["method"], apply_fn, eps, key=key,
                                        **dict(dict(norm=norm), **row["options"]))
    p = finetune(reg)
    runs[label or "none"] = dict(objective=objective_j(p), cert_acc=cert_acc(p),
                                 seconds=time.perf_counter() - t0)
    log(f"  fine-tuned with {label or 'none'}: J = {runs[label or 'none']['objective']:.5g}"
        f", certified {runs[label or 'none']['cert_acc']:.3f}")
  base = runs["none"]
  for r in runs.values():
    r["gain_vs_none"] = base["objective"] - r["objective"]
    r["gain_vs_start"] = j0 - r["objective"]
  names = [r["name"] for r in result["rows"]]
  distance = [r["distance"] for r in result["rows"]]
  rho_j = _spearman(distance, [runs[m]["objective"] for m in names])
  rho_c = _spearman(distance, [-runs[m]["cert_acc"] for m in names])
  return dict(runs=runs, start_objective=j0, cert_acc_start=cert_acc(params),
              spearman_distance_vs_objective=rho_j[0],
              spearman_distance_vs_objective_p=rho_j[1],
              spearman_distance_vs_uncertified=rho_c[0],
              spearman_distance_vs_uncertified_p=rho_c[1],
              setting=dict(steps=steps, lam=lam, lr=lr, batch_size=bs,
                           cert_points=len(y_cert), certifier=certifier))


def _spearman(a: Sequence[float], b: Sequence[float]) -> Tuple[Optional[float],
                                                               Optional[float]]:
  """Spearman's (rho, p-value); (None, None) with fewer than 3 finite pairs or a
  constant side (undefined)."""
  import numpy as np
  from scipy import stats
  a, b = np.asarray(a, float), np.asarray(b, float)
  keep = np.isfinite(a) & np.isfinite(b)
  a, b = a[keep], b[keep]
  if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return None, None
  rho, p = stats.spearmanr(a, b)
  return float(rho), float(p)


def json_safe(value):
  """``value`` with non-finite floats as None (strict JSON), recursively."""
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


# ----------------------------------------------------------------------------- output

def format_table(result: Dict[str, Any]) -> str:
  """The ranking as a plain-text table."""
  t = result["target"]
  lines = [f"{'rank':>4}  {'regularizer':<22} {'|gR-gJ|_H^-1':>12} {'< |gJ|':>6} "
           f"{'cos_H^-1':>8} {'best s':>9} {'|gR-gJ|_2':>10} {'R':>10} {'CG it':>5} "
           f"{'resid':>8} {'conv':>4}"]
  for r in result["rows"]:
    lines.append(f"{r['rank']:>4}  {r['name']:<22} {r['distance']:>12.4e} "
                 f"{'yes' if r['verdict'] else 'no':>6} {r['cosine']:>8.3f} "
                 f"{r['best_scale']:>9.3g} {r['euclidean']:>10.3e} {r['value']:>10.4g} "
                 f"{r['iterations']:>5} {r['residual']:>8.1e} "
                 f"{'yes' if r['converged'] else 'NO':>4}")
  lines.append(f"target R_J ({t['kind']}, {t['method']}): |gJ|_H^-1 = {t['norm']:.4e}, "
               f"|gJ|_2 = {t['euclidean']:.3e}, R_J = {t['value']:.4g}; CG {t['iterations']} "
               f"iterations, residual {t['residual']:.1e}, "
               f"{'converged' if t['converged'] else 'NOT converged'}"
               + (", NEGATIVE CURVATURE" if t["negative_curvature"] else ""))
  c = result["clean"]
  lines.append(f"clean L = {c['loss']:.4g}, |grad L|_2 = {c['grad_norm']:.3e} (0 at a "
               "minimum, where the propositions hold)")
  s = result["setting"]
  if c.get("top_eigenvalue") is not None and math.isfinite(c["top_eigenvalue"]):
    lines.append(f"{'Gauss-Newton' if s['gauss_newton'] else 'Hessian'} + {s['damping']:g} I"
                 f" on {s['train_points']} points; largest eigenvalue ~ "
                 f"{c['top_eigenvalue']:.4g}")
  bad = [r["name"] for r in result["rows"] if not r["converged"]]
  if bad or not t["converged"]:
    lines.append("warning: CG did not converge for " + ", ".join(
        bad + ([] if t["converged"] else ["the target"])) + "; the distances are CG lower "
        "bounds (raise --cg_maxiter or --damping).")
  return "\n".join(lines)


def format_validation(val: Dict[str, Any], rows) -> str:
  lines = [f"{'regularizer':<22} {'distance':>10} {'J after':>10} {'gain vs none':>12} "
           f"{'certified':>9}"]
  for name, r in val["runs"].items():
    dist = next((x["distance"] for x in rows if x["name"] == name), float("nan"))
    lines.append(f"{name:<22} {dist:>10.3e} {r['objective']:>10.5g} "
                 f"{r['gain_vs_none']:>12.3e} {r['cert_acc']:>9.3f}")
  fmt = lambda v: "n/a" if v is None else f"{v:+.3f}"
  lines.append(f"Spearman(distance, J after) = {fmt(val['spearman_distance_vs_objective'])}"
               f", Spearman(distance, -certified) = "
               f"{fmt(val['spearman_distance_vs_uncertified'])} (positive: the ranking "
               "predicted the measurement)")
  return "\n".join(lines)


def benchmark_row(result: Dict[str, Any], arch: str) -> str:
  """One markdown row for docs/benchmarks.md."""
  from dm_jax import provenance
  s, t = result["setting"], result["timings"]
  machine = provenance.machine_info()
  its = t["cg_iterations"]
  return (f"| {time.strftime('%Y-%m-%d %H:%M')} | {arch} ({s['num_params']:,} params) | "
          f"{s['train_points']:,} | {s['val_points']:,} | "
          f"{'GN' if s['gauss_newton'] else 'H'} + {s['damping']:g} I | "
          f"{t['hvp_seconds']:.3f} | {len(its)} solves, {min(its)}-{max(its)} "
          f"(total {sum(its)}) | {t.get('wall_seconds', t['total_seconds']):.0f} | "
          f"{machine.get('cores', '?')} cores, load {machine['load'][0]:.1f}, "
          f"{machine['commit']} |")


# ----------------------------------------------------------------------------- main

def run() -> None:
  if not FLAGS.checkpoint:
    raise ValueError("--checkpoint is required (a training workdir).")
  candidates = parse_candidates(FLAGS.candidates)
  from dm_jax.train import methods
  methods.spec(FLAGS.target_method)
  for what in ("train_points", "val_points", "batch_size", "cg_maxiter"):
    if getattr(FLAGS, what) < 1:
      raise ValueError(f"--{what} must be >= 1; got {getattr(FLAGS, what)}.")
  if not (FLAGS.damping >= 0 and math.isfinite(FLAGS.damping)):
    raise ValueError(f"--damping must be >= 0; got {FLAGS.damping}.")
  if FLAGS.validate and (FLAGS.finetune_steps < 1 or FLAGS.finetune_batch < 1
                         or FLAGS.cert_points < 1 or not FLAGS.finetune_lr > 0):
    raise ValueError("--validate needs --finetune_steps, --finetune_batch, --cert_points "
                     ">= 1 and --finetune_lr > 0.")
  t0 = time.perf_counter()
  config, ds, apply_fn, params, step, workdir = load_checkpoint(
      FLAGS.checkpoint, FLAGS.data_dir, FLAGS.dataset)
  eps = config.eps_train if FLAGS.eps is None else parse_number(FLAGS.eps, "eps")
  if not (eps >= 0 and math.isfinite(eps)):
    raise ValueError(f"--eps must be >= 0; got {FLAGS.eps}.")
  train_data, val_data = choose_points(ds, config, FLAGS.train_points, FLAGS.val_points,
                                       FLAGS.heldout, FLAGS.seed)
  print(f"{ds.name} {config.arch} trained with {config.method} (step {step}); eps {eps:g}, "
        f"norm {config.norm}; L and H on {len(train_data[1])} training points, the target "
        f"on {len(val_data[1])} held-out ({FLAGS.heldout}) points")
  result = select(apply_fn, params, train_data, val_data, eps=eps, norm=config.norm,
                  candidates=candidates, target=FLAGS.target,
                  target_method=FLAGS.target_method, batch_size=FLAGS.batch_size,
                  gauss_newton=FLAGS.gauss_newton, damping=FLAGS.damping,
                  tol=FLAGS.cg_tol, maxiter=FLAGS.cg_maxiter, seed=FLAGS.seed,
                  check_affinity=FLAGS.check_affinity, eig_iters=FLAGS.eig_iters)
  print(format_table(result))
  if FLAGS.validate:
    certifier = FLAGS.certifier or ("crown_ibp" if FLAGS.target_method == "crown_ibp"
                                    else "ibp")
    result["validation"] = validate(
        apply_fn, params, train_data, val_data, result, steps=FLAGS.finetune_steps,
        lam=FLAGS.finetune_lam, lr=FLAGS.finetune_lr, batch_size=FLAGS.finetune_batch,
        cert_points=FLAGS.cert_points, certifier=certifier, seed=FLAGS.seed)
    print(format_validation(result["validation"], result["rows"]))
  result["timings"]["wall_seconds"] = time.perf_counter() - t0
  print(f"timings: one HVP {result['timings']['hvp_seconds']:.3f} s, CG iterations "
        f"{result['timings']['cg_iterations']}, ranking {result['timings']['rank_seconds']:.1f}"
        f" s, total {result['timings']['wall_seconds']:.1f} s")
  from dm_jax import provenance
  result.update(checkpoint=str(workdir), step=step, dataset=ds.name, arch=config.arch,
                trained_with=config.method, command=" ".join(sys.argv),
                machine=provenance.machine_info(), commit=provenance.git_commit())
  if FLAGS.benchmark:
    print("| date | model | H points | target points | matrix | HVP s | CG iterations | "
          "total s | machine, commit |")
    print(benchmark_row(result, config.arch))
  out = Path(FLAGS.output) if FLAGS.output else workdir / "select_regularizer.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(json_safe(result), indent=1, default=str))
  print(f"wrote {out}")


def main(argv):
  cli.run_main(argv, run)


if __name__ == "__main__":
  define_flags()
  app.run(main)
