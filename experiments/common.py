"""Shared absl flags and ``main`` of the experiment scripts (Flax-examples style).

Each dataset script (``experiments/mnist.py``, ``cifar10.py``, ``gtsrb.py``) passes its
:class:`experiments.defaults.DatasetDefaults`; any flag left unset takes the dataset's default. The run:

1. validates the flags (bad values exit non-zero with one ``error: ...`` line),
2. loads the data (``--data_dir``, else ``$DM_JAX_DATA_DIR``, else TFDS),
3. trains with :func:`dm_jax.train.train` in ``--workdir`` (continuing from the latest
   checkpoint there when ``--resume``, the default),
4. certifies ``--num_cert_points`` seeded random test points with each of
   ``--cert_methods`` (default CNN-Cert-ReLU = ``fastlin`` and ``ibp``) over the
   dataset's eps grid, prints the paper-style table and writes it to
   ``workdir/certified.json`` and ``workdir/certified.csv``.
"""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import flags

from dm_jax.train import schedules
from dm_jax.train.methods.double_margin import DM_LOSSES
from experiments import cli, grids
from experiments.defaults import DatasetDefaults
from experiments.grids import parse_number

FLAGS = flags.FLAGS


flags.DEFINE_string("method", None, "Training method (dm_jax.train.methods.METHODS, or an "
                    "alias: 'dm*' = Double Margin with final lambda 1); default: the "
                    "dataset's.")
flags.DEFINE_string("arch", None, "Architecture (dm_jax.ARCHITECTURES or mlp/small_s2); "
                    "default: the dataset's.")
flags.DEFINE_string("eps", None, "Training radius eps_train (in [0, 1] pixel units; "
                    "fractions like 8/255 accepted); default: the dataset's.")
flags.DEFINE_integer("epochs", None, "Training epochs; default: the dataset's.")
flags.DEFINE_integer("batch_size", None, "Batch size; default: the dataset's.")
flags.DEFINE_float("lr", None, "Adam learning rate; default 5e-4.")
flags.DEFINE_string("lr_boundaries", None, "Comma-separated steps after which the lr is "
                    "multiplied by 0.1 (default: the dataset's, scaled for short runs).")
flags.DEFINE_float("lambda_final", None, "Final lambda (default: 2 for dm, 1 for dm*, "
                   "paper form).")
flags.DEFINE_enum("lam_form", None, ["paper", "kappa"], "DM objective form: 'paper' "
                  "((1-lam) CE + lam CE_split, the paper's lambda -> 2, which collapses on "
                  "MNIST at eps 0.3: docs/results.md) or 'kappa' (SingleProp: kappa 1 -> "
                  "kappa_final); default: the dataset's.")
flags.DEFINE_enum("schedule", None, list(schedules.SHAPES), "Default step boundaries: "
                  "'singleprop' (the reference run's steps, scaled down for short runs), "
                  "'proportional' (eps 0 for 5% of the steps, ramp to eps_train at 50%, "
                  "lr x0.1 after 75% and 90%) or 'short_ramp' (the same, the ramp ending "
                  "at 30%; dm_jax.train.schedules.FRACTIONS); --eps_schedule/"
                  "--lr_boundaries override; default: the dataset's.")
flags.DEFINE_string("eps_schedule", None, "'warmup_end,ramp_end' steps of the eps/lambda/"
                    "kappa ramp (default: the dataset's, scaled for short runs).")
flags.DEFINE_string("workdir", None, "Output directory (default "
                    "./runs/<dataset>_<method>_<arch>_eps<eps>).")
flags.DEFINE_integer("seed", 0, "Seed (init, data order, augmentation, cert points).")
flags.DEFINE_integer("cert_seed", None, "Seed of the certified test points (default: "
                     "--seed), so runs of other seeds certify the same points.")
flags.DEFINE_integer("num_cert_points", None, "Random test points to certify (0: skip); "
                     "default: the dataset's.")
flags.DEFINE_string("cert_methods", None, "Certifiers for the table (comma-separated: "
                    "fastlin, crown, zero, ibp, crown_ibp, alpha_crown (20 steps), mip, "
                    "fastlin_intersect, crown_intersect, alpha_crown_intersect); default: "
                    "the dataset's.")
flags.DEFINE_integer("cert_batch_size", 50, "Certification batch size.")
flags.DEFINE_integer("pgd_steps", 50, "PGD steps of the table's attack row (the empirical "
                     "upper bound; margin loss, step 2.5 eps / steps).")
flags.DEFINE_integer("pgd_restarts", 2, "PGD random restarts of the table's attack row (0: "
                     "no attack row).")
flags.DEFINE_bool("pgd_attack_certified", False, "Attack the certified points too, counting "
                  "any PGD breaks (soundness evidence); off: only the uncertified ones (the "
                  "same row when the certifiers are sound, a fraction of the time).")
flags.DEFINE_string("data_dir", None, "Data directory (default $DM_JAX_DATA_DIR).")
flags.DEFINE_bool("resume", True, "Continue from the latest checkpoint in workdir.")
flags.DEFINE_integer("max_train_examples", None, "Train on the first N examples only.")
flags.DEFINE_integer("ensemble", 1, "Number of ensemble members (Appendix H.2).")
flags.DEFINE_float("l1", 0.0, "l1 weight penalty added to the method (DM + L1).")
flags.DEFINE_string("norm", "linf", "Threat model: linf, l2, l1 or l0 (training and cert). "
                    "For l0, --eps and the --eps_grid radii are numbers of changed pixels k "
                    "(integers; the paper's 'eps = 2' of Table 4): the set has k pixels "
                    "from the first step (the ramp moves kappa/lambda only).")
flags.DEFINE_bool("prune", False, "Magnitude pruning (relu_stability + pruning).")
flags.DEFINE_bool("adv", False, "relu_stability: PGD CE instead of clean CE.")
flags.DEFINE_float("grad_clip", 0.0, "Global-norm gradient clipping (0: off).")
flags.DEFINE_string("init", None, "Initial weights: 'default' (N(0, 1/fan_in)) or "
                    "'ibp' (Shi et al. 2021, dm_jax.models.ibp_initialization); default: "
                    "the dataset's.")
flags.DEFINE_float("warmup_reg", None, "Shi et al. (2021)'s warm-up regularisers (bound "
                   "tightness + ReLU balance of the IBP bounds, dm_jax.train.methods.warmup) "
                   "on top of any method, weight lambda_0 * (1 - eps_t / eps) during the eps "
                   "ramp; 0: off, Shi et al.: 0.5; default: the dataset's.")
flags.DEFINE_float("warmup_reg_tol", 0.5, "--warmup_reg: the tolerance tau of both terms.")
flags.DEFINE_integer("checkpoint_every_steps", 1000, "Checkpoint period in steps.")
flags.DEFINE_integer("eval_cert_points", 256, "Test points for the per-epoch IBP check.")
flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
flags.DEFINE_integer("projections", 0, "bounded: random Cauchy projections for the "
                     "intermediate bounds (Wong et al. 2018; 0: exact), the method option "
                     "bounded_projections. The paper's baseline used 50.")
flags.DEFINE_enum("kappa_mode", "schedule", ["schedule", "ada"], "kappa on the ramp, or "
                  "SingleProp's 'ada': reset every epoch to l_robust / (l_robust + gamma "
                  "l_clean) on held-out training data (ibp, crown_ibp, bounded, dm with "
                  "--lam_form=kappa).")
flags.DEFINE_float("ada_gamma", 10.0, "kappa_mode=ada: gamma.")
flags.DEFINE_float("kappa_final", 0.5, "Final weight kappa of the clean loss (kappa forms: "
                   "ibp, crown_ibp, bounded, dm with --lam_form=kappa); 1 -> kappa_final on "
                   "the eps ramp.")
flags.DEFINE_string("eps_grid", None, "Comma-separated radii of the certification table, "
                    "increasing (fractions like 8/255 accepted); default: the dataset's.")
flags.DEFINE_bool("dm_domain", None, "Double Margin: start from the ball intersected "
                  "with the data box [0, 1] (dm/dm_s_only expand at the clipped interval's "
                  "centre; dm_ibp_v takes it in its IBP part); default: the dataset's.")
flags.DEFINE_enum("dm_loss", None, list(DM_LOSSES), "Double Margin's robust "
                  "term: 'split' (eq. 9, logsumexp(upper) - lower_y), 'worst_case' "
                  "(CE of the worst-case logits, IBP's form) or 'folded' (CE of the "
                  "margins' lower ends with the specification folded into the last "
                  "affine layers); default: the dataset's.")
flags.DEFINE_bool("ibp_margin", None, "IBP: the robust term on the margins' lower "
                  "bounds with the specification folded into the last affine layer "
                  "(Gowal et al.'s tighter form) instead of the worst-case logits; "
                  "default: the dataset's.")
flags.DEFINE_bool("loss_fusion", None, "crown_ibp: train on an upper bound of the "
                  "worst-case cross-entropy by one CROWN backward row (loss fusion, "
                  "dm_jax.bounds.loss_fusion; ~6x faster steps, an objective near IBP's) "
                  "instead of CE(-lb) over K - 1 rows; default: off.")
flags.DEFINE_bool("cert_domain", None, "Certify (final table and per-epoch IBP check) on "
                  "the eps ball intersected with the data box [0, 1] (the threat model of "
                  "Gowal et al. and Zhang et al.); off: the plain ball; default: the "
                  "dataset's.")
flags.DEFINE_integer("num_devices", None, "Data-parallel devices for training and "
                     "certification (default: all that JAX sees; the batch is split over "
                     "them, dm_jax.sharding).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                    "(jax.distributed); every host runs the same command with its "
                    "--process_id.")
flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process (0 .. num_processes - 1).")
flags.DEFINE_bool("dry_run", False, "Validate the flags, print the resolved training "
                  "configuration as JSON and exit (no data, no training).")
flags.DEFINE_integer("ada_holdout", 1000, "kappa_mode=ada: last N training examples held "
                     "out to measure the losses.")


def eps_grid(defaults: DatasetDefaults) -> Tuple[Tuple[float, ...], Tuple[str, ...]]:
  """The certification table's radii and their labels: ``--eps_grid`` or the dataset's."""
  if FLAGS.eps_grid is None:
    return defaults.eps_grid, defaults.eps_grid_label
  grid = grids.parse_grid(FLAGS.eps_grid, "eps_grid")
  return grid.eps, grid.labels


def parse_steps(text: Optional[str], what: str, count: Optional[int] = None):
  if text is None or text.strip() == "":
    return None
  try:
    steps = tuple(int(s) for s in text.split(",") if s.strip())
  except ValueError:
    raise ValueError(f"--{what} must be comma-separated integers; got {text!r}") from None
  if count is not None and len(steps) != count:
    raise ValueError(f"--{what} needs {count} comma-separated steps; got {text!r}")
  if any(s < 0 for s in steps):
    raise ValueError(f"--{what} steps must be >= 0; got {text!r}")
  return steps


def setting(name: str, defaults: DatasetDefaults):
  """The flag ``--name`` if given, else the dataset's default of the same name."""
  value = getattr(FLAGS, name)
  return getattr(defaults, name) if value is None else value


def build_config(defaults: DatasetDefaults):
  """Validates the flags and returns a :class:`dm_jax.train.TrainConfig`."""
  from dm_jax.train import methods
  from dm_jax.models import _REGISTRY
  from dm_jax.train.loop import TrainConfig, default_workdir
  from dm_jax.core.input_sets import canonical_norm

  method = setting("method", defaults)
  if method not in methods.names(aliases=True):
    raise ValueError(f"unknown --method {method!r}; expected one of "
                     f"{', '.join(methods.names(aliases=True))}")
  arch = FLAGS.arch or defaults.arch
  if arch not in _REGISTRY:
    raise ValueError(f"unknown --arch {arch!r}; expected one of {', '.join(sorted(_REGISTRY))}")
  # What a flag sets in the TrainConfig is validated once, by TrainConfig.validate
  # (below); the checks here are the flags' own.
  eps_grid(defaults)  # a bad --eps_grid fails before training (and in reproduce --check)
  eps = defaults.eps if FLAGS.eps is None else parse_number(FLAGS.eps, "eps")
  epochs = defaults.epochs if FLAGS.epochs is None else FLAGS.epochs
  batch_size = defaults.batch_size if FLAGS.batch_size is None else FLAGS.batch_size
  lr = defaults.lr if FLAGS.lr is None else FLAGS.lr
  if setting("num_cert_points", defaults) < 0:
    raise ValueError(f"--num_cert_points must be >= 0; got {FLAGS.num_cert_points}")
  if FLAGS.pgd_restarts < 0 or FLAGS.pgd_steps < 1:
    raise ValueError(f"--pgd_steps must be >= 1 and --pgd_restarts >= 0; got "
                     f"{FLAGS.pgd_steps}, {FLAGS.pgd_restarts}")
  norm = canonical_norm(FLAGS.norm)
  k = None
  if norm == "l0":
    if FLAGS.eps is None or float(eps) != int(eps) or eps < 1:
      raise ValueError(f"--norm=l0 needs --eps=K, the number of changed pixels (an "
                       f"integer >= 1); got --eps={FLAGS.eps}")
    k = int(eps)
  eps_schedule = parse_steps(FLAGS.eps_schedule, "eps_schedule", 2)
  lr_boundaries = parse_steps(FLAGS.lr_boundaries, "lr_boundaries")
  # The method validates its options: one it does not read (--dm_domain for a method
  # other than Double Margin, --projections for one other than bounded, --adv for one
  # other than relu_stability) is an error naming both.
  method_kwargs = {}
  # A dataset's default of a method option goes to the methods that read it; the flag
  # to any method (so --dm_loss with --method=ibp is an error naming both). A method's
  # own default stays out of method_kwargs, so configs read as before.
  reads = methods.spec(method).options
  method_defaults = methods.option_defaults()
  for name in ("dm_loss", "dm_domain", "ibp_margin"):
    method_default = method_defaults[name]
    value = setting(name, defaults)
    if ((getattr(FLAGS, name) is not None and name not in reads)
        or (name in reads and value != method_default)):
      method_kwargs[name] = value
  lam_form = setting("lam_form", defaults)
  if FLAGS.projections:
    method_kwargs["bounded_projections"] = FLAGS.projections
  if FLAGS.loss_fusion is not None:
    method_kwargs["loss_fusion"] = FLAGS.loss_fusion
  try:
    methods.get_method(method, norm=norm, k=k, l1=FLAGS.l1, prune=FLAGS.prune, adv=FLAGS.adv,
                       lam_form=lam_form, **method_kwargs)
  except ValueError as e:
    raise ValueError(f"--method={method}: {e}") from None
  workdir = FLAGS.workdir or default_workdir(defaults.dataset, method, arch, eps)
  config = TrainConfig(
      dataset=defaults.dataset, arch=arch, method=method, norm=norm, k=k, l1=FLAGS.l1,
      prune=FLAGS.prune, adv=FLAGS.adv, lam_form=lam_form, eps_train=eps,
      epochs=epochs, batch_size=batch_size, lr=lr, lr_boundaries=lr_boundaries,
      eps_schedule=eps_schedule, lam_final=FLAGS.lambda_final, seed=FLAGS.seed,
      workdir=workdir, checkpoint_every_steps=FLAGS.checkpoint_every_steps,
      grad_clip=FLAGS.grad_clip, init=setting("init", defaults),
      warmup_reg=setting("warmup_reg", defaults),
      warmup_reg_tol=FLAGS.warmup_reg_tol, ensemble=FLAGS.ensemble,
      normalize=defaults.normalize,
      augment=defaults.augment, max_train_examples=FLAGS.max_train_examples,
      eval_cert_points=FLAGS.eval_cert_points,
      eval_domain=bool(setting("cert_domain", defaults)),
      schedule=setting("schedule", defaults),
      progress=FLAGS.progress,
      method_kwargs=method_kwargs, kappa_final=FLAGS.kappa_final,
      num_devices=FLAGS.num_devices,
      kappa_mode=FLAGS.kappa_mode, ada_gamma=FLAGS.ada_gamma,
      ada_holdout=FLAGS.ada_holdout)
  try:
    config.validate()
  except ValueError as e:
    raise ValueError(f"bad flag value: {e}") from None
  return config


# ----------------------------------------------------------------------------- certify


def certify_table(apply_fn, params, x, y, eps_grid, methods, norm, batch_size,
                  eps_scale=1.0, progress=True, domain=None, pgd=None, mesh=None):
  """``dm_jax.verify.certify.certified_accuracy_table`` and its formatted table."""
  from dm_jax.verify import certify
  table = certify.certified_accuracy_table(apply_fn, params, x, y, eps_grid,
                                           methods=tuple(methods), norm=norm,
                                           batch_size=batch_size, progress=progress,
                                           domain=domain, pgd=pgd, mesh=mesh)
  label = "eps" if eps_scale == 1.0 else f"eps*{eps_scale:g}"
  return table, certify.format_table(table, eps_scale=eps_scale, eps_label=label)


def _to_jsonable(obj):
  import numpy as np
  if isinstance(obj, dict):
    return {str(k): _to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_to_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _to_jsonable(obj.tolist())
  if isinstance(obj, (np.floating, np.integer, np.bool_)):
    return obj.item()
  if hasattr(obj, "__array__"):
    return _to_jsonable(np.asarray(obj))
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)
  return obj


def write_table(workdir: Path, table: Dict[str, Any], eps_grid, labels, info) -> None:
  (workdir / "certified.json").write_text(json.dumps(
      _to_jsonable({**info, "eps_grid": list(eps_grid), "eps_labels": list(labels),
                    "table": table}), indent=1))
  with (workdir / "certified.csv").open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["certifier"] + list(labels))
    for name, vals in table["rows"].items():
      w.writerow([name] + [f"{float(v):.4f}" for v in _to_jsonable(vals)])
    for key in ("falsified", "unknown") if "pipeline" in table else ():
      w.writerow([f"pipeline_{key}"] + [f"{float(v):.4f}" for v in table["pipeline"][key]])
    if "pgd" in table:
      w.writerow(["pgd"] + [f"{float(v):.4f}" for v in table["pgd"]])


# ----------------------------------------------------------------------------- main


def run(defaults: DatasetDefaults) -> None:
  """Trains and certifies per the flags. Raises ValueError / DatasetNotFoundError."""
  import jax
  import numpy as np
  from dm_jax import data as data_lib
  from dm_jax import provenance, sharding
  from dm_jax import train as train_lib
  from dm_jax.train import methods
  t_start = time.time()
  # Before anything touches a device: a multi-host run joins its peers first.
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  config = build_config(defaults)
  grid, grid_labels = eps_grid(defaults)
  cert_methods = (tuple(m.strip() for m in FLAGS.cert_methods.split(",") if m.strip())
                  if FLAGS.cert_methods is not None else defaults.cert_methods)
  num_cert_points = setting("num_cert_points", defaults)
  if num_cert_points:
    from dm_jax.verify.certify import canonical_certifier
    for m in cert_methods:
      canonical_certifier(m)  # ValueError for an unknown certifier
  if FLAGS.dry_run:
    print(json.dumps(dict(config.to_json(), cert_methods=list(cert_methods),
                          num_cert_points=num_cert_points, eps_grid=list(grid)), indent=1))
    return
  dataset = data_lib.load_dataset(defaults.dataset, FLAGS.data_dir)
  print(f"data: {dataset}", flush=True)
  print(f"run: {defaults.dataset} method={config.method} arch={config.arch} "
        f"eps_train={config.eps_train:.5g} epochs={config.epochs} batch={config.batch_size} "
        f"lam_form={config.lam_form} lambda_final="
        f"{config.lam_final if config.lam_final is not None else 'default'} "
        f"workdir={config.workdir}", flush=True)
  t0 = time.time()
  state, history = train_lib.train(config, dataset, resume=FLAGS.resume)
  train_time = time.time() - t0
  print(f"training done: step {int(state.step)} in {train_time:.1f} s", flush=True)

  workdir = Path(config.workdir)
  if num_cert_points == 0:
    return
  n = min(num_cert_points, dataset.num_test)
  cert_seed = config.seed if FLAGS.cert_seed is None else FLAGS.cert_seed
  idx = np.sort(np.random.default_rng(cert_seed).choice(dataset.num_test, n, replace=False))
  x, y = dataset.x_test[idx], dataset.y_test[idx]
  _, apply_fn = train_lib.build_model(config, dataset.num_classes)
  cert_domain = (0.0, 1.0) if setting("cert_domain", defaults) else None
  pgd = (dict(steps=FLAGS.pgd_steps, restarts=FLAGS.pgd_restarts, seed=config.seed,
              attack_certified=FLAGS.pgd_attack_certified)
         if FLAGS.pgd_restarts and config.norm in ("linf", "l2") else None)
  t1 = time.time()
  mesh = sharding.data_mesh(config.num_devices)
  table, text = certify_table(apply_fn, state.params, x, y, grid, cert_methods,
                              config.norm, FLAGS.cert_batch_size, defaults.eps_scale,
                              FLAGS.progress, cert_domain, pgd, mesh)
  cert_time = time.time() - t1
  lam = (config.lam_final if config.lam_final is not None else
         methods.default_lam_final(config.method, config.lam_form))
  header = (f"Certified accuracy ({n} random test points, seed {cert_seed}), "
            f"{defaults.dataset} {config.arch} {config.method} eps_train="
            f"{config.eps_train:.4g} lam_form={config.lam_form} lambda_final={lam:g} "
            f"kappa_final={config.kappa_final:g}; "
            f"input set: {'ball and box [0, 1]' if cert_domain else 'ball'}; "
            f"eps grid: {', '.join(grid_labels)}")
  print(header)
  print(text, flush=True)
  info = {"dataset": defaults.dataset, "method": config.method, "arch": config.arch,
          "eps_train": config.eps_train, "lam_form": config.lam_form, "lambda_final": lam,
          "num_points": n, "test_indices": idx.tolist(), "seed": config.seed,
          "cert_seed": cert_seed,
          "cert_methods": list(cert_methods), "cert_domain": cert_domain,
          "train_time_s": train_time,
          "cert_time_s": cert_time, "wall_time_s": time.time() - t_start,
          "step": int(state.step), "config": config.to_json(),
          "pgd": pgd, "command": command_line(defaults.dataset),
          "machine": provenance.machine_info()}
  if jax.process_index() == 0:  # one host writes the table
    write_table(workdir, table, grid, grid_labels, info)
  print(f"wrote {workdir / 'certified.json'} and {workdir / 'certified.csv'}", flush=True)


def command_line(dataset: str) -> str:
  """The command that reproduces this run (as typed, flags in order)."""
  import shlex
  return " ".join(["python", "-m", f"experiments.{dataset}"]
                  + [shlex.quote(a) for a in sys.argv[1:]])


def parse_flags(argv):
  """absl ``flags_parser``: an unknown or malformed flag is one ``error:`` line, exit 1."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {' '.join(str(e).split())} (see --helpshort)")


def main(argv: Sequence[str], defaults: DatasetDefaults) -> None:
  """absl entry point: one ``error: ...`` line on stderr and exit 1 on bad input."""
  cli.run_main(argv, lambda: run(defaults))
