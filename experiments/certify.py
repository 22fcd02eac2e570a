r"""Certify a trained checkpoint: the paper-style certified-accuracy table.

  python -m experiments.certify --checkpoint=runs/mnist_dm_small_eps0.3 \
      --methods=relu,ada,zero,ibp --eps_grid=0,0.01,0.03,0.05,0.07,0.1,0.2,0.3,0.4 \
      --num_points=200 --seed=0

Rows are certifiers, columns eps, cells certified accuracy on the same seeded random test
points for every method (as the paper does), plus the "best" row (certified by any).
``--methods=pipeline`` (alone or with others) adds the verification pipeline
(``dm_jax.verify.pipeline``): its certified row, and below the best row its falsified and
unknown shares, with the time per stage in the footer:

  python -m experiments.certify --checkpoint=runs/ibp --methods=ibp,pipeline \
      --pipeline_stages=ibp,crown_ibp,crown_intersect,pgd,mip --mip_time_limit=10

Writes ``certify_<norm>.json``, ``.csv`` and ``.png`` (certified accuracy vs eps) to
``--output_dir`` (default: the checkpoint's directory).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from absl import app, flags

from experiments import cli, grids

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A training workdir (holding checkpoints/) or its "
                    "checkpoints/ directory.")
flags.DEFINE_string("dataset", None, "Dataset; default: the one the checkpoint was trained on.")
flags.DEFINE_string("methods", "relu,ada,zero,ibp", "Certifiers: relu (fastlin), ada "
                    "(crown), zero, ibp, crown_ibp, alpha_crown (α-CROWN, --alpha_*), mip, "
                    "relu_intersect, ada_intersect, alpha_crown_intersect (intermediate "
                    "bounds intersected with IBP's; the best row counts them anyway), and "
                    "pipeline (certified / falsified / unknown).")
flags.DEFINE_string("pipeline_stages", None, "Stages of --methods=pipeline, in order "
                    "(certifier names, pgd, mip); default ibp,crown_ibp,crown_intersect,pgd "
                    "(no pgd for l1/l0). Add mip (last) for small nets.")
flags.DEFINE_integer("pipeline_pgd_steps", 50, "PGD steps of the pipeline's attack.")
flags.DEFINE_integer("pipeline_pgd_restarts", 2, "PGD restarts of the pipeline's attack.")
flags.DEFINE_float("mip_time_limit", 60.0, "Seconds per MILP (one per point and class) of "
                   "the mip certifier and the pipeline's mip stage.")
flags.DEFINE_integer("alpha_steps", 20, "alpha_crown: projected Adam steps on the lower "
                     "slopes (0: CROWN's bound).")
flags.DEFINE_float("alpha_lr", 0.1, "alpha_crown: Adam's learning rate.")
flags.DEFINE_enum("alpha_objective", "sum", ["sum", "min"], "alpha_crown: maximise the sum "
                  "of each point's margin lower bounds or the smallest one.")
flags.DEFINE_bool("alpha_per_row", False, "alpha_crown: one slope per margin row instead "
                  "of one shared by the rows.")
flags.DEFINE_bool("alpha_intermediate", False, "alpha_crown: optimise the intermediate "
                  "bounds' slopes too (about steps + 1 times CROWN's cost).")
flags.DEFINE_string("eps_grid", None, "Comma-separated eps values (fractions like 8/255 "
                    "accepted), increasing; default: the dataset's curve grid "
                    "(experiments/grids.py).")
flags.DEFINE_integer("num_points", 200, "Random test points (0: all).")
flags.DEFINE_integer("seed", 0, "Seed of the random test points.")
flags.DEFINE_string("norm", None, "linf, l2, l1 or l0; default: the training norm.")
flags.DEFINE_integer("k", None, "Changed coordinates for norm l0.")
flags.DEFINE_bool("domain_box", False, "Intersect the input set with the data box [0, 1].")
flags.DEFINE_integer("batch_size", 50, "Points per compiled certification call.")
flags.DEFINE_integer("num_devices", None, "Devices the points are split over (default: all "
                     "that JAX sees; dm_jax.sharding).")
flags.DEFINE_string("data_dir", None, "Data directory (default $DM_JAX_DATA_DIR).")
flags.DEFINE_string("output_dir", None, "Where to write the table (default: checkpoint dir).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("sound", False, "Certificates sound in floating point: the certifier "
                  "rows' margin bounds computed in float64 with rigorous rounding bounds "
                  "(dm_jax.core.rounding; never above the plain ones). The pipeline row's "
                  "verdict is sound either way.")

def run() -> None:
  import numpy as np
  from dm_jax import data as data_lib, sharding, train as train_lib
  from dm_jax.bounds import linear
  from dm_jax.verify import certify

  if not FLAGS.checkpoint:
    raise ValueError("--checkpoint is required (a training workdir).")
  workdir, config = train_lib.load_config(FLAGS.checkpoint)
  dataset_name = FLAGS.dataset or config.dataset
  grid = grids.CURVE.get(dataset_name, grids.CURVE["mnist"])
  if FLAGS.eps_grid:
    grid = grids.parse_grid(FLAGS.eps_grid, "eps_grid", grid.scale)
  eps_grid, eps_scale, eps_label = list(grid.eps), grid.scale, grid.column_label
  methods = [m.strip() for m in FLAGS.methods.split(",") if m.strip()]
  for m in methods:
    certify.canonical_certifier(m)
  alpha = linear.AlphaConfig(steps=FLAGS.alpha_steps, lr=FLAGS.alpha_lr,
                             objective=FLAGS.alpha_objective, per_row=FLAGS.alpha_per_row,
                             optimize_intermediate=FLAGS.alpha_intermediate)
  norm = FLAGS.norm or config.norm
  pipeline = None
  if "pipeline" in [certify.canonical_certifier(m) for m in methods]:
    from dm_jax.verify import pipeline as pipeline_lib
    pipeline = dict(stages=pipeline_lib.check_stages(FLAGS.pipeline_stages, norm),
                    pgd=dict(steps=FLAGS.pipeline_pgd_steps,
                             restarts=FLAGS.pipeline_pgd_restarts))
  ds = data_lib.load_dataset(dataset_name, FLAGS.data_dir)
  n = ds.num_test if FLAGS.num_points <= 0 else min(FLAGS.num_points, ds.num_test)
  idx = np.sort(np.random.default_rng(FLAGS.seed).choice(ds.num_test, n, replace=False))
  x, y = ds.x_test[idx], ds.y_test[idx]
  state = train_lib.load_params(workdir, config, ds.input_shape, ds.num_classes)
  _, apply_fn = train_lib.build_model(config, ds.num_classes)
  t0 = time.time()
  table = certify.certified_accuracy_table(
      apply_fn, state.params, x, y, eps_grid, methods, norm, progress=FLAGS.progress,
      batch_size=FLAGS.batch_size, k=FLAGS.k, domain=(0.0, 1.0) if FLAGS.domain_box else None,
      pipeline=pipeline, mip_time_limit=FLAGS.mip_time_limit,
      mesh=sharding.data_mesh(FLAGS.num_devices), alpha=alpha, sound=FLAGS.sound)
  seconds = time.time() - t0
  print(f"{dataset_name} {config.arch} trained with {config.method} (eps_train "
        f"{config.eps_train:g}); {n} test points (seed {FLAGS.seed}); norm {norm}; "
        f"{seconds:.1f} s")
  print(certify.format_table(table, eps_scale, eps_label))
  out = Path(FLAGS.output_dir) if FLAGS.output_dir else workdir
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"certify_{norm}"
  if any(certify.uses_alpha(certify.canonical_certifier(m)) for m in methods):
    table["alpha"] = dataclasses.asdict(alpha)
  table.update({"dataset": dataset_name, "seed": FLAGS.seed, "test_indices": idx.tolist(),
                "seconds": seconds, "checkpoint": str(workdir), "sound": FLAGS.sound})
  stem.with_suffix(".json").write_text(json.dumps(table, indent=1))
  stem.with_suffix(".csv").write_text(certify.table_to_csv(table))
  certify.plot_table(table, str(stem.with_suffix(".png")),
                     title=f"{dataset_name} {config.arch} {config.method}", eps_scale=eps_scale,
                     eps_label=eps_label)
  print(f"wrote {stem}.json, .csv and .png")


def main(argv):
  cli.run_main(argv, run)


if __name__ == "__main__":
  app.run(main)
