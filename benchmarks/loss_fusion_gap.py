r"""How tight is loss fusion's bound of the worst-case cross-entropy, on trained networks?

    python -m benchmarks.loss_fusion_gap --checkpoint=runs/ibp,runs/crown_ibp --eps=0.3

For each checkpoint, on ``--num_points`` seeded test points, the mean over points of
five numbers about ``max_{x' in S} CE(f(x'), y)`` (S the eps ball, in the data box [0, 1]
unless ``--nodomain_box``):

* ``pgd``: the CE at a PGD point (50 steps, 2 restarts, CE loss): a lower bound;
* ``fused``: :func:`dm_jax.bounds.loss_fusion.cross_entropy_upper_bound` (beta 1);
* ``crown_ibp``: ``logsumexp(-lb)``, lb CROWN-IBP's margin lower bounds (the upper bound
  CROWN-IBP training takes, through K - 1 backward rows);
* ``ibp``: the same with IBP's folded margins;
* ``clean``: the CE at x.

Every upper bound is sound, so each is >= ``pgd``; which is smallest depends on the
network (docs: WORKSPACE.md, "Loss fusion"). ``--output`` writes the rows as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags, defined when run as a script only: the tests import gap_row beside
  other modules' absl flags of the same names (--data_dir)."""
  flags.DEFINE_list("checkpoint", None, "Training workdirs (comma-separated).")
  flags.DEFINE_float("eps", 0.3, "The radius.")
  flags.DEFINE_integer("num_points", 200, "Seeded test points.")
  flags.DEFINE_integer("seed", 0, "Seed of the points and of PGD.")
  flags.DEFINE_integer("batch_size", 50, "Points per bound computation.")
  flags.DEFINE_bool("domain_box", True, "Intersect the ball with the data box [0, 1].")
  flags.DEFINE_string("data_dir", None, "Data directory (default $DM_JAX_DATA_DIR).")
  flags.DEFINE_string("output", None, "Write the rows as JSON here.")


COLUMNS = ("clean", "pgd", "fused", "crown_ibp", "ibp")


def gap_row(apply_fn, params, x, y, eps, domain, key, batch_size):
  """Mean of each of :data:`COLUMNS` over the points, and the fused bound's time share."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dm_jax.bounds import linear, loss_fusion
  from dm_jax.core.input_sets import make_input_set
  from dm_jax.train.methods import attacks

  def ce(logits, labels):
    return jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(
        logits, labels[:, None], 1)[:, 0]

  fused_fn = jax.jit(lambda p, xb, yb: loss_fusion.cross_entropy_upper_bound(
      apply_fn, p, make_input_set(xb, eps, "linf", None, domain), yb)[0])

  def margin_ce(method):
    return jax.jit(lambda p, xb, yb: jax.nn.logsumexp(-linear.margin_lower_bounds(
        apply_fn, p, xb, yb, eps, "linf", method=method, domain=domain), axis=1))

  bound_fns = {"fused": fused_fn, "crown_ibp": margin_ce("crown_ibp"),
               "ibp": margin_ce("ibp")}
  sums = dict.fromkeys(COLUMNS, 0.0)
  for start in range(0, len(x), batch_size):
    xb, yb = jnp.asarray(x[start:start + batch_size]), jnp.asarray(y[start:start + batch_size])
    key, sub = jax.random.split(key)
    adv = attacks.pgd_attack(apply_fn, params, xb, yb, eps, sub, steps=50,
                             step_size=eps / 10, norm="linf", domain=domain, restarts=2,
                             loss="ce")
    sums["clean"] += float(jnp.sum(ce(apply_fn(params, xb), yb)))
    sums["pgd"] += float(jnp.sum(ce(apply_fn(params, adv), yb)))
    for name, fn in bound_fns.items():
      sums[name] += float(jnp.sum(fn(params, xb, yb)))
  row = {name: sums[name] / len(x) for name in COLUMNS}
  lowest = min(("fused", "crown_ibp", "ibp"), key=row.get)
  if row[lowest] < row["pgd"] - 1e-3 * (1 + abs(row["pgd"])):
    raise AssertionError(f"an upper bound ({lowest}) is below PGD's cross-entropy: {row}")
  return row


def main(argv):
  del argv
  import jax
  import numpy as np
  from dm_jax import data as data_lib, train as train_lib

  if not FLAGS.checkpoint:
    raise app.UsageError("--checkpoint is required (training workdirs).")
  rows = []
  for path in FLAGS.checkpoint:
    workdir, config = train_lib.load_config(path)
    ds = data_lib.load_dataset(config.dataset, FLAGS.data_dir)
    n = min(FLAGS.num_points, ds.num_test)
    idx = np.sort(np.random.default_rng(FLAGS.seed).choice(ds.num_test, n, replace=False))
    state = train_lib.load_params(workdir, config, ds.input_shape, ds.num_classes)
    _, apply_fn = train_lib.build_model(config, ds.num_classes)
    row = gap_row(apply_fn, state.params, ds.x_test[idx], ds.y_test[idx], FLAGS.eps,
                  (0.0, 1.0) if FLAGS.domain_box else None,
                  jax.random.PRNGKey(FLAGS.seed), FLAGS.batch_size)
    rows.append({"checkpoint": str(workdir), "method": config.method,
                 "eps_train": config.eps_train, "eps": FLAGS.eps, "points": n, **row})
  print("| network | eps | " + " | ".join(COLUMNS) + " |")
  print("|---|---:|" + "---:|" * len(COLUMNS))
  for r in rows:
    print(f"| {r['method']} ({Path(r['checkpoint']).name}) | {r['eps']:g} | "
          + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + " |")
  if FLAGS.output:
    from dm_jax import provenance
    out = {"command": "python -m benchmarks.loss_fusion_gap " + " ".join(sys.argv[1:]),
           "commit": provenance.git_commit(), "machine": provenance.machine_info(),
           "rows": rows}
    Path(FLAGS.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
