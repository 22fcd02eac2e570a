"""Training step benchmark: median ms per jit-compiled training step, per method.

Usage (from the repository root):

  python -m benchmarks.train_bench --arch=small_s2 --batch_size=100 --steps=50 \
      --slow_steps=10 [--methods=normal,ibp,dm,...] [--write]

The step is ``dm_jax.train.make_train_step`` (``value_and_grad`` of the method's loss +
``optax.adam`` update, the same jit-compiled step the trainer runs) on a state from
``dm_jax.train.create_train_state``. The per-step scalars are fixed at their end-of-ramp
values (eps 0.3, lam 0.5, kappa 0.5) so every branch of each loss is active. Inputs are
uniform [0, 1] images of ``--dataset``'s shape (default MNIST) with random labels (the same batch every step). Each
method runs in its own subprocess (clean peak RSS). After compiling
(``lower().compile()``, timed) and 2 warm-up steps, ``--steps`` steps (``--slow_steps``
for the slow methods adv, trades, mmr (40 PGD steps per training step or per-unit
backward passes) and crown_ibp, bounded, bounded_p50 (linear bounds; ``bounded_pK`` is
bounded with K random projections)) are
timed one by one with ``block_until_ready``. Reported: median ms/step, ratio to
``normal``, projected wall time of 100 MNIST epochs (60,000 steps of batch 100), peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks.certify_bench import (append_run, machine_info, peak_rss_mb,  # noqa: E402
                                      run_worker)

SLOW_METHODS = ("adv", "trades", "mmr", "crown_ibp", "bounded", "bounded_p50")
EPOCH_STEPS_100 = 60000  # 100 MNIST epochs at batch 100
# Input shape and classes of the (random) batches per dataset (--dataset).
INPUTS = {"mnist": ((28, 28, 1), 10), "cifar10": ((32, 32, 3), 10), "gtsrb": ((32, 32, 3), 43)}


def parse_method(entry: str):
  """``name`` or ``name[option=value;...]`` -> (name, get_method keyword options);
  ``bounded_pK`` is bounded with K random projections."""
  from dm_jax.train.methods import parse_method_entry
  name, kwargs = parse_method_entry(entry)
  projections = re.fullmatch(r"bounded_p(\d+)", name)
  if projections:
    name, kwargs = "bounded", dict(kwargs, bounded_projections=int(projections.group(1)))
  return name, kwargs


def worker(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp
  from dm_jax import train
  from dm_jax.train import methods, schedules
  dataset = spec.get("dataset", "mnist")
  input_shape, num_classes = INPUTS[dataset]
  config = train.TrainConfig(dataset=dataset, arch=spec["arch"], method=spec["method"],
                             batch_size=spec["batch"], eps_train=0.3, progress=False)
  model = train.get_model(config.arch, num_classes=num_classes)
  apply_fn = train.make_apply_fn(config, model)
  sched = schedules.resolve("mnist", EPOCH_STEPS_100, eps_final=0.3, lam_final=1.0)
  tx = train.make_optimizer(config, sched)
  state = train.create_train_state(config, jax.random.PRNGKey(0), input_shape, model=model,
                                   tx=tx)
  name, kwargs = parse_method(spec["method"])
  method = methods.get_method(name, **kwargs)  # a registered name or an alias (dm*)

  def make_hyper(eps, lam, kappa):  # end-of-ramp values: every branch active
    del eps, lam, kappa
    return methods.Hyper.create(eps=0.3, lam=0.5, kappa=0.5)

  from dm_jax import sharding
  mesh = sharding.data_mesh(spec.get("devices", 1))
  sharding.check_divisible(spec["batch"], mesh)
  step = train.make_train_step(config, apply_fn, method.loss, tx, sched,
                               make_hyper=make_hyper, prune=method.prune, mesh=mesh)
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.uniform(kx, (spec["batch"], *input_shape), jnp.float32)
  y = jax.random.randint(ky, (spec["batch"],), 0, num_classes)
  state = sharding.replicate(state, mesh)
  x, y = sharding.shard_batch((x, y), mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, x, y).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(2):
    state, metrics = jax.block_until_ready(compiled(state, x, y))
  times = []
  for _ in range(spec["steps"]):
    t0 = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, x, y))
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return dict(spec, compile_s=compile_s, median_ms=1e3 * med,
              min_ms=1e3 * min(times), steps_timed=len(times), peak_rss_mb=peak_rss_mb(),
              finite=bool(metrics["finite"]), loss=float(metrics["loss"]))


def _hours(ms):
  s = ms * EPOCH_STEPS_100 / 1e3
  return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def table(rows):
  base = next((r["median_ms"] for r in rows if r["method"] == "normal" and "error" not in r),
              None)
  lines = ["| method | median ms/step | min ms | steps timed | / normal | 100 epochs "
           "(60,000 steps) | compile s | peak RSS MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['method']} | {r['error']} | | | | | | |")
      continue
    ratio = f"{r['median_ms'] / base:.2f}x" if base else "-"
    lines.append(f"| {r['method']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
                 f"{r['steps_timed']} | {ratio} | {_hours(r['median_ms'])} | "
                 f"{r['compile_s']:.1f} | {r['peak_rss_mb']:,.0f} |")
  return "\n".join(lines)


def targets(rows, arch):
  ms = {r["method"]: r["median_ms"] for r in rows if "error" not in r}
  out = []
  def ratio(a, b, limit, label):
    if a in ms and b in ms:
      v = ms[a] / ms[b]
      out.append(f"{label} <= {limit}x: {v:.2f}x -> **{'met' if v <= limit else 'not met'}**")
  ratio("dm", "normal", 2.5, "DM / normal")
  ratio("dm", "ibp", 1.2, "DM / IBP")
  ratio("ibp", "normal", 2.5, "IBP / normal")
  ratio("crown_ibp", "normal", 10, "CROWN-IBP / normal")
  ratio("crown_ibp[loss_fusion=true]", "normal", 10, "CROWN-IBP with loss fusion / normal")
  if arch == "small_s2" and "normal" in ms:
    b = [r for r in rows if r["method"] == "normal"][0]["batch"]
    if b == 100:
      v = ms["normal"]
      out.append(f"normal step small-s2 batch 100 <= 3.0 ms: {v:.2f} ms -> "
                 f"**{'met' if v <= 3.0 else 'not met'}**")
  return out


def main(argv=None):
  from dm_jax.train.methods import METHODS
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", default="small")
  p.add_argument("--batch_size", type=int, default=100)
  p.add_argument("--dataset", default="mnist", choices=sorted(INPUTS),
                 help="input shape and classes of the random batches")
  p.add_argument("--methods", default=",".join(METHODS + ("bounded_p50",)),
                 help="registry names, each optionally with get_method options as "
                 "name[option=value;...] (e.g. dm[dm_loss=folded;lam_form=kappa]); "
                 "bounded_pK = bounded with K random projections")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--slow_steps", type=int, default=None,
                 help=f"timed steps for {', '.join(SLOW_METHODS)} (default: --steps)")
  p.add_argument("--timeout", type=float, default=600.0, help="per-method subprocess limit")
  p.add_argument("--write", action="store_true", help="append the run to docs/benchmarks.md")
  p.add_argument("--num_devices", type=int, default=1,
                 help="data-parallel devices of the step (dm_jax.sharding)")
  p.add_argument("--force_cpu_devices", type=int, default=None,
                 help="split the CPU into this many XLA devices (XLA_FLAGS "
                 "--xla_force_host_platform_device_count) in the workers: on a 2-core "
                 "machine this measures the sharding overhead, not a speed-up")
  p.add_argument("--json_out", default=None, help="also write the rows, the machine and "
                 "the load to this JSON file")
  p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._worker:
    print(json.dumps(worker(json.loads(args._worker))), flush=True)
    return
  if args.force_cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                               f"platform_device_count={args.force_cpu_devices}").strip()
  start_load = os.getloadavg()
  rows = []
  from dm_jax.train.methods import split_method_entries
  for m in split_method_entries(args.methods):
    steps = args.slow_steps if (m in SLOW_METHODS and args.slow_steps) else args.steps
    r = run_worker("benchmarks.train_bench",
                   dict(arch=args.arch, batch=args.batch_size, method=m, steps=steps,
                        dataset=args.dataset, devices=args.num_devices),
                   args.timeout)
    rows.append(r)
    print(m, r.get("error") or f"{r['median_ms']:.2f} ms/step, compile "
          f"{r['compile_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MiB", flush=True)
  body = table(rows)
  tg = targets(rows, args.arch)
  if tg:
    body += "\n\nTargets measured in this run:\n\n" + "\n".join(f"* {t}" for t in tg)
  print(body)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(dict(rows=rows, machine=machine_info(), load_at_start=start_load,
                     command=["benchmarks.train_bench"] + (argv if argv is not None
                                                          else sys.argv[1:])), f, indent=1)
  if args.write:
    append_run(f"train_bench ({args.arch}, batch {args.batch_size})",
               ["benchmarks.train_bench"] + (argv if argv is not None else sys.argv[1:]),
               machine_info(), body, start_load)


if __name__ == "__main__":
  main()
