"""Per-op time totals of a jit-compiled training step or bound computation.

Usage (from the repository root; needs ``pip install xprof`` to read the trace):

  python -m benchmarks.profile_ops --what=step --method=crown_ibp [--arch=small_s2]
  python -m benchmarks.profile_ops --what=bounds --method=ibp --batch=256

``--what=step``: ``value_and_grad`` of the method's loss (batch 100, eps 0.3, lam and
kappa 0.5) as in ``benchmarks/train_bench.py``; ``--what=bounds``: the margin lower
bounds of ``dm_jax.bounds.linear.margin_lower_bounds`` (eps 0.01) as in
``benchmarks/certify_bench.py``. The call is compiled, run once, then traced
``--calls`` times with ``jax.profiler``; the trace's complete events are summed per name
(XLA fusions and thunks) and the ``--top`` largest are printed in ms per call, with the
HLO line of each fusion (its shape and operands) so it can be traced to the code. The
trace is written under ``--trace_dir`` for TensorBoard/xprof as well.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def build(args):
  import jax
  import jax.numpy as jnp
  from dm_jax import models
  from dm_jax.bounds import linear
  from dm_jax.train import methods
  model = models.get_model(args.arch)
  x = jax.random.uniform(jax.random.PRNGKey(0), (args.batch, 28, 28, 1))
  y = jax.random.randint(jax.random.PRNGKey(1), (args.batch,), 0, 10)
  params = model.init(jax.random.PRNGKey(2), x[:1])
  if args.what == "step":
    hyper = methods.Hyper.create(eps=0.3, lam=0.5, kappa=0.5)
    method = methods.get_method(args.method)
    fn = jax.jit(jax.value_and_grad(
        lambda p: method.loss(p, model.apply, x, y, hyper, jax.random.PRNGKey(3))[0]))
    return fn, (params,)
  fn = jax.jit(lambda p, x, y: linear.margin_lower_bounds(
      model.apply, p, x, y, jnp.float32(0.01), "linf", method=args.method))
  return fn, (params, x, y)


def op_totals(trace_dir):
  from xprof.convert import raw_to_tool_data  # pylint: disable=import-outside-toplevel
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  data, _ = raw_to_tool_data.xspace_to_tool_data([path], "trace_viewer@", {})
  if isinstance(data, bytes):
    try:
      data = gzip.decompress(data)
    except OSError:
      pass
    data = data.decode()
  events = json.loads(data)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  totals = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X":
      totals[e["name"]] += e.get("dur", 0.0)
  return totals


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--what", choices=("step", "bounds"), default="step")
  p.add_argument("--method", default="dm")
  p.add_argument("--arch", default="small_s2")
  p.add_argument("--batch", type=int, default=None, help="default 100 (step), 256 (bounds)")
  p.add_argument("--calls", type=int, default=20)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--trace_dir", default="/tmp/dm_jax_profile")
  args = p.parse_args(argv)
  args.batch = args.batch or (100 if args.what == "step" else 256)
  import jax
  fn, fn_args = build(args)
  jax.block_until_ready(fn(*fn_args))
  hlo = fn.lower(*fn_args).compile().as_text()
  with jax.profiler.trace(args.trace_dir):
    for _ in range(args.calls):
      jax.block_until_ready(fn(*fn_args))
  try:
    totals = op_totals(args.trace_dir)
  except ImportError:
    print(f"trace written to {args.trace_dir}; `pip install xprof` to print per-op totals")
    return
  skip = ("ThreadpoolListener", "ThunkExecutor", "$", "PjitFunction", "CommonPjRt",
          "Slinky")
  rows = sorted(((n, t) for n, t in totals.items() if not n.startswith(skip)),
                key=lambda kv: -kv[1])[:args.top]
  print(f"{args.what} {args.method} {args.arch} batch {args.batch}: ms per call "
        f"({args.calls} calls traced)")
  for name, total in rows:
    m = re.search(r"^\s*(?:ROOT )?%" + re.escape(name) + r" = (\S+)[^\n]*?"
                  r"(?:fusion|convolution|dot)\(([^)]*)\)", hlo, re.M)
    what = f"{m.group(1)} <- ({m.group(2)[:80]})" if m else ""
    print(f"  {total / 1000 / args.calls:8.3f}  {name:32s} {what}")


if __name__ == "__main__":
  main()
