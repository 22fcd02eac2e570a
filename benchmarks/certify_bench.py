"""Certification throughput benchmark: margin lower bounds per arch x method x batch size.

Usage (from the repository root):

  python -m benchmarks.certify_bench --archs=small,small_s2 --input=mnist \
      --methods=ibp,crown_ibp,fastlin,crown,zero --batch_sizes=1,32,256 --eps=0.01 \
      --repeats=5 [--mip] [--full_mnist] [--write]

Every configuration runs in a fresh subprocess (``--_worker``) so that its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own. Inside a worker the function
``margin_lower_bounds(apply_fn, params, x, y, eps, method=...)`` is jit-compiled with
``apply_fn`` closed over, compiled once (``lower().compile()``, timed), then called
``--repeats`` (>= 3) times with ``block_until_ready``; points/s is batch / median time.
Weights: kernels re-drawn N(0, 2/fan_in) (benchmark spec), biases as initialised
(zeros). Inputs: uniform [0, 1] of the dataset's shape, random labels (the cost of the
bounds does not depend on the values).

``alpha_crown`` rows run ``--alpha_steps`` (20) projected Adam steps (``linear.AlphaConfig``
defaults otherwise) and also record whether their bounds are >= CROWN's on the same
points (``ge_crown``, the smallest difference ``min_gain_vs_crown``).

``--mip``: exact MILP certification (``dm_jax.verify.mip.exact_certify``) of 8 points of a tiny
MLP 4-16-16-3 at eps 0.1. ``--full_mnist``: ``dm_jax.verify.certify.certify`` of all 10,000
MNIST test points with fastlin (CNN-Cert-ReLU) on the small CNN (data from
``$DM_JAX_DATA_DIR``): wall time and peak RSS. ``--write`` appends the run to
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
DOC = os.path.join(ROOT, "docs", "benchmarks.md")

from dm_jax.provenance import machine_info  # noqa: E402  (re-exported for train_bench)

INPUT_SHAPES = {"mnist": (28, 28, 1), "cifar": (32, 32, 3)}

DOC_HEADER = """# Benchmarks

How to run (from the repository root; each configuration runs in its own subprocess so
the peak RSS reported is that configuration's own `ru_maxrss`):

* Certification throughput (margin lower bounds, points/s, compile time, peak RSS):

      python -m benchmarks.certify_bench --archs=small,small_s2 --input=mnist \\
          --methods=ibp,crown_ibp,fastlin,crown,zero --batch_sizes=1,32,256 \\
          --eps=0.01 --repeats=5 --mip --write
      # + --full_mnist (needs DM_JAX_DATA_DIR with mnist.npz): certify all 10,000
      #   MNIST test points with fastlin on the small CNN, wall time and peak RSS

* Training step time (jit-compiled value_and_grad + Adam step of `dm_jax.train.make_train_step`):

      python -m benchmarks.train_bench --arch=small_s2 --batch_size=100 --steps=50 \\
          --slow_steps=10 --write

Add `--write` to append the run (date, command, machine, versions, load, table) to
this file; earlier runs are kept below (history).

Weights for the certification benchmark are re-drawn N(0, 2/fan_in); inputs are
uniform [0, 1] with random labels (the cost of bound propagation does not depend on
the values). Peak RSS includes the Python + JAX runtime (about 250-350 MB by itself).

## Targets (project issue 8)

| target | requirement |
|---|---|
| DM / normal step time | <= 2.5x |
| DM / IBP step time | <= 1.2x |
| IBP / normal step time | <= 2.5x |
| CROWN-IBP / normal step time | <= 10x |
| normal step, small-s2, batch 100 | <= 3.0 ms |
| full CROWN (`crown`) margins, small-s2, batch 256 | >= 200 points/s, peak RSS <= 1 GB |
| CROWN-IBP margins, small-s2, batch 256 | >= 5,000 points/s |
| α-CROWN (`alpha_crown`, 20 steps) margins, small-s2, batch 32 (issue 18) | >= 20 points/s, bounds >= CROWN's everywhere |
| IBP margins, small-s2, batch 256 | >= 60,000 points/s |
| certify all 10,000 MNIST test points, small CNN, fastlin | completes, peak RSS <= 2 GiB |

Each run below lists the targets it measured as met / not met.

## Runs
"""


# ----------------------------------------------------------------------------- shared

def peak_rss_mb() -> float:
  """This process's peak RSS in MiB (Linux ru_maxrss is in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_worker(module: str, spec: dict, timeout: float) -> dict:
  """Runs ``python -m module --_worker=<json>`` and parses its last JSON line."""
  cmd = [sys.executable, "-m", module, "--_worker=" + json.dumps(spec)]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(spec, error=f"timeout after {timeout:.0f} s")
  wall = time.perf_counter() - t0
  for line in reversed(proc.stdout.strip().splitlines()):
    if line.startswith("{"):
      res = json.loads(line)
      res.setdefault("process_wall_s", wall)
      return res
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return dict(spec, error=f"rc {proc.returncode}: " + " | ".join(tail)[-300:])


def ensure_doc() -> None:
  if not os.path.exists(DOC):
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w") as f:
      f.write(DOC_HEADER)


def append_run(title: str, argv, info: dict, body: str, start_load=None) -> None:
  ensure_doc()
  load = start_load if start_load is not None else info["load"]
  cmd = "python -m " + " ".join(shlex.quote(a) for a in argv)
  text = (f"\n### {title} -- {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
          f"* command: `{cmd}`\n"
          f"* machine: {info['model']}, {info['cores']} cores (shared with other "
          f"workers), backend {info['backend']}\n"
          f"* code: commit {info.get('commit', '?')}\n"
          f"* jax {info['jax']}, jaxlib {info['jaxlib']}, Python {info['python']}\n"
          f"* load average (1/5/15 min) at start: "
          f"{' / '.join(f'{x:.2f}' for x in load)}; at end: "
          f"{' / '.join(f'{x:.2f}' for x in info['load'])}\n\n{body}\n")
  with open(DOC, "a") as f:
    f.write(text)


def fmt(x, spec=",.0f", missing="-"):
  return missing if x is None else format(x, spec)


# ----------------------------------------------------------------------------- worker

def he_normal_params(params, key):
  """Re-draws every ``kernel`` leaf N(0, 2/fan_in), fan_in = prod(shape[:-1])."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      leaf = jax.random.normal(k, leaf.shape, leaf.dtype) * jnp.sqrt(2.0 / fan_in)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def _init_model(arch, num_classes, input_shape, seed=0, **model_kw):
  import jax
  import jax.numpy as jnp
  import dm_jax
  model = dm_jax.get_model(arch, num_classes=num_classes, **model_kw)
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = model.init(k1, jnp.zeros((1,) + tuple(input_shape), jnp.float32))
  return model, he_normal_params(params, k2)


def worker_margins(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp
  from dm_jax.bounds import linear
  shape = INPUT_SHAPES[spec["input"]]
  model, params = _init_model(spec["arch"], 10, shape)
  b = spec["batch"]
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.uniform(kx, (b,) + shape, jnp.float32)
  y = jax.random.randint(ky, (b,), 0, 10)
  eps = jnp.float32(spec["eps"])
  method = spec["method"]

  alpha = (linear.AlphaConfig(steps=spec.get("alpha_steps", 20))
           if linear.canonical_method(method) == "alpha_crown" else None)

  def fn(params, x, y, eps, method=method, alpha=alpha):
    return linear.margin_lower_bounds(model.apply, params, x, y, eps, "linf", method=method,
                                      alpha=alpha)

  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(params, x, y, eps).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(params, x, y, eps))  # warm-up call
  times = []
  budget_end = time.perf_counter() + spec.get("time_budget", 60.0)
  while len(times) < spec["repeats"] or (len(times) < 3):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, x, y, eps))
    times.append(time.perf_counter() - t0)
    if len(times) >= 3 and time.perf_counter() > budget_end:
      break
  med = statistics.median(times)
  rss = peak_rss_mb()
  extra = {}
  if alpha is not None:  # against CROWN on the same points (after the RSS is read)
    crown = jax.jit(functools.partial(fn, method="crown", alpha=None))(params, x, y, eps)
    gain = out - crown
    # >= up to float32 rounding: CROWN compiled separately may round differently.
    extra = dict(alpha_steps=alpha.steps,
                 ge_crown=bool(jnp.all(gain >= -1e-6 * (1 + jnp.abs(crown)))),
                 min_gain_vs_crown=float(jnp.min(gain)),
                 mean_gain_vs_crown=float(jnp.mean(gain)))
  return dict(spec, compile_s=compile_s, median_s=med, calls=len(times),
              points_per_s=b / med, peak_rss_mb=rss,
              finite=bool(jnp.all(jnp.isfinite(out) | (out == 0))), **extra)


def worker_mip(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dm_jax.verify import mip
  model, params = _init_model("mlp", 3, (4,), hidden=(16, 16))
  n = spec["batch"]
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  x = np.asarray(jax.random.uniform(kx, (n, 4), jnp.float32))
  y = np.asarray(jnp.argmax(model.apply(params, x), -1))  # correctly classified points
  mip.exact_certify(model.apply, params, x[:1], y[:1], spec["eps"])  # warm-up
  times, certs = [], None
  for _ in range(max(3, spec["repeats"])):
    t0 = time.perf_counter()
    certs, _ = mip.exact_certify(model.apply, params, x, y, spec["eps"])
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return dict(spec, compile_s=None, median_s=med, calls=len(times), points_per_s=n / med,
              peak_rss_mb=peak_rss_mb(), certified=int(np.sum(certs)))


def worker_full_mnist(spec: dict) -> dict:
  import numpy as np
  from dm_jax import data
  from dm_jax.verify import certify
  t_start = time.perf_counter()
  ds = data.load_dataset("mnist")
  x, y = ds.x_test, ds.y_test
  model, params = _init_model("small", 10, (28, 28, 1))
  t0 = time.perf_counter()
  cert, lower = certify.certify(model.apply, params, x, y, spec["eps"], method="fastlin",
                                batch_size=spec["batch"])
  wall = time.perf_counter() - t0
  return dict(spec, n=int(x.shape[0]), certify_wall_s=wall,
              total_wall_s=time.perf_counter() - t_start, peak_rss_mb=peak_rss_mb(),
              certified=int(np.sum(cert)), finite=bool(np.all(np.isfinite(lower))))


# ----------------------------------------------------------------------------- driver

def targets(rows) -> list:
  out = []
  def find(arch, method, batch):
    for r in rows:
      if (r.get("kind") == "margins" and r["arch"] == arch and r["method"] == method
          and r["batch"] == batch and "error" not in r):
        return r
    return None
  r = find("small_s2", "crown", 256)
  if r:
    ok = r["points_per_s"] >= 200 and r["peak_rss_mb"] <= 1000
    out.append(f"full CROWN small-s2 batch 256 >= 200 points/s and <= 1 GB: "
               f"{r['points_per_s']:,.0f} points/s, {r['peak_rss_mb']:,.0f} MiB -> "
               f"**{'met' if ok else 'not met'}**")
  r = find("small_s2", "alpha_crown", 32)
  if r and r.get("alpha_steps") == 20:
    ok = r["points_per_s"] >= 20 and r["ge_crown"]
    crown = find("small_s2", "crown", 32)
    ratio = (f", {crown['points_per_s'] / r['points_per_s']:.1f}x CROWN's time per point "
             "in this run" if crown else "")
    out.append(f"α-CROWN (20 steps) small-s2 batch 32 >= 20 points/s and >= CROWN: "
               f"{r['points_per_s']:,.1f} points/s{ratio}, min(α-CROWN - CROWN) "
               f"{r['min_gain_vs_crown']:.2g}, mean gain {r['mean_gain_vs_crown']:.3g} -> "
               f"**{'met' if ok else 'not met'}**")
  r = find("small_s2", "crown_ibp", 256)
  if r:
    ok = r["points_per_s"] >= 5000
    out.append(f"CROWN-IBP small-s2 batch 256 >= 5,000 points/s: "
               f"{r['points_per_s']:,.0f} -> **{'met' if ok else 'not met'}**")
  r = find("small_s2", "ibp", 256)
  if r:
    ok = r["points_per_s"] >= 60000
    out.append(f"IBP small-s2 batch 256 >= 60,000 points/s: "
               f"{r['points_per_s']:,.0f} -> **{'met' if ok else 'not met'}**")
  for r in rows:
    if r.get("kind") == "full_mnist":
      if "error" in r:
        out.append(f"certify 10,000 MNIST test points (small, fastlin): failed ({r['error']}) "
                   "-> **not met**")
      else:
        ok = r["peak_rss_mb"] <= 2048
        out.append(f"certify 10,000 MNIST test points (small, fastlin) completes, <= 2 GiB: "
                   f"completed in {r['certify_wall_s']:.1f} s, peak RSS "
                   f"{r['peak_rss_mb']:,.0f} MiB -> **{'met' if ok else 'not met'}**")
  return out


def table(rows) -> str:
  lines = ["| arch | method | batch | points/s (median) | median ms/call | calls | "
           "compile s | peak RSS MiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if r.get("kind") == "full_mnist":
      continue
    arch = r["arch"] if r.get("kind") == "margins" else "mlp 4-16-16-3"
    if "error" in r:
      lines.append(f"| {arch} | {r['method']} | {r['batch']} | {r['error']} | | | | |")
      continue
    lines.append(f"| {arch} | {r['method']} | {r['batch']} | {r['points_per_s']:,.1f} | "
                 f"{1e3 * r['median_s']:,.2f} | {r['calls']} | "
                 f"{fmt(r['compile_s'], '.2f')} | {r['peak_rss_mb']:,.0f} |")
  for r in rows:
    if r.get("kind") == "full_mnist":
      lines.append("")
      if "error" in r:
        lines.append(f"Full MNIST certification (small, fastlin, batch {r['batch']}): "
                     f"{r['error']}")
      else:
        lines.append(f"Full MNIST certification (small CNN, fastlin, eps {r['eps']}, batch "
                     f"{r['batch']}, N(0, 2/fan_in) untrained weights): {r['n']} points, "
                     f"certify() wall {r['certify_wall_s']:.1f} s (incl. one compile; "
                     f"{r['n'] / r['certify_wall_s']:,.0f} points/s), process total "
                     f"{r['total_wall_s']:.1f} s incl. data load, peak RSS "
                     f"{r['peak_rss_mb']:,.0f} MiB, certified {r['certified']}.")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--archs", default="small,small_s2")
  p.add_argument("--input", default="mnist", choices=sorted(INPUT_SHAPES))
  p.add_argument("--methods", default="ibp,crown_ibp,fastlin,crown,zero")
  p.add_argument("--batch_sizes", default="1,32,256")
  p.add_argument("--eps", type=float, default=0.01)
  p.add_argument("--alpha_steps", type=int, default=20, help="alpha_crown's Adam steps")
  p.add_argument("--repeats", type=int, default=5, help="timed calls (>= 3)")
  p.add_argument("--time_budget", type=float, default=30.0,
                 help="stop timing a config after this many seconds once 3 calls are done")
  p.add_argument("--timeout", type=float, default=600.0, help="per-config subprocess limit")
  p.add_argument("--mip", action="store_true", help="add the MIP row (tiny MLP)")
  p.add_argument("--full_mnist", action="store_true",
                 help="certify the 10,000 MNIST test points (fastlin, small CNN)")
  p.add_argument("--full_mnist_batch", type=int, default=256)
  p.add_argument("--write", action="store_true", help="append the run to docs/benchmarks.md")
  p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args._worker:
    spec = json.loads(args._worker)
    fn = dict(margins=worker_margins, mip=worker_mip, full_mnist=worker_full_mnist)[spec["kind"]]
    print(json.dumps(fn(spec)), flush=True)
    return

  start_load = os.getloadavg()
  repeats = max(3, args.repeats)
  specs = []
  # Empty lists are allowed (e.g. --methods= with --full_mnist runs only that row).
  for arch in [a for a in args.archs.split(",") if a]:
    for method in [m for m in args.methods.split(",") if m]:
      for b in (int(s) for s in args.batch_sizes.split(",") if s):
        specs.append(dict(kind="margins", arch=arch, input=args.input, method=method,
                          batch=b, eps=args.eps, repeats=repeats,
                          time_budget=args.time_budget, alpha_steps=args.alpha_steps))
  if args.mip:
    specs.append(dict(kind="mip", arch="mlp", method="mip", batch=8, eps=0.1,
                      repeats=repeats))
  if args.full_mnist:
    specs.append(dict(kind="full_mnist", arch="small", method="fastlin",
                      batch=args.full_mnist_batch, eps=args.eps))
  rows = []
  for spec in specs:
    r = run_worker("benchmarks.certify_bench", spec, args.timeout)
    rows.append(r)
    if "error" in r:
      print(f"{spec['kind']} {spec['arch']} {spec['method']} b={spec['batch']}: {r['error']}",
            flush=True)
    elif r["kind"] == "full_mnist":
      print(f"full_mnist: {r['certify_wall_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MiB",
            flush=True)
    else:
      print(f"{r['arch']:9s} {r['method']:9s} b={r['batch']:4d}: {r['points_per_s']:12,.1f} "
            f"points/s  compile {fmt(r['compile_s'], '.2f')} s  peak {r['peak_rss_mb']:.0f} "
            f"MiB", flush=True)
  info = machine_info()
  body = table(rows)
  tg = targets(rows)
  if tg:
    body += "\n\nTargets measured in this run:\n\n" + "\n".join(f"* {t}" for t in tg)
  if not args.full_mnist:
    body += "\n\n(The 10,000-point MNIST certification was not run in this invocation.)"
  print(body)
  if args.write:
    title = (f"certify_bench ({args.input}, eps {args.eps}, "
             f"{len([s for s in specs if s['kind'] == 'margins'])} configurations)")
    append_run(title, ["benchmarks.certify_bench"] + (argv if argv is not None else sys.argv[1:]),
               info, body, start_load)


if __name__ == "__main__":
  main()
