"""Data parallelism (dm_jax.sharding): sharded training and certification give the one-
device results; checkpoints move between device counts; two processes on localhost
(jax.distributed) train like one. The devices are forced CPU devices in subprocesses
(``--xla_force_host_platform_device_count``), so every check runs on a laptop."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dm_jax import sharding

ROOT = Path(__file__).resolve().parents[1]

# Shared by the subprocess programs: a 4-class synthetic dataset and a run's config.
_SETUP = r"""
import json, os, sys
import numpy as np
sys.path.insert(0, ROOT)
def dataset():
  from dm_jax import data as data_lib
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (300, 8, 8, 1)).astype(np.float32)
  y = ((x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int32)
       + 2 * (x[:, 0, 0, 0] > 0.5)).astype(np.int32)
  return data_lib.Dataset("synthetic", x[:200], y[:200], x[200:], y[200:], 4, (8, 8, 1),
                          "synthetic")
def config(method, workdir, **kw):
  from dm_jax import train as T
  base = dict(dataset="mnist", arch="mlp", method=method, eps_train=0.1, epochs=2,
              batch_size=40, lr=1e-3, eps_schedule=(1, 4), workdir=workdir,
              checkpoint_every_steps=3, eval_cert_points=20, eval_test_examples=50,
              progress=False)
  base.update(kw)
  return T.TrainConfig(**base)
def flat(params):
  import jax
  return np.concatenate([np.ravel(l) for l in jax.tree_util.tree_leaves(
      jax.device_get(params))])
"""

_SINGLE_HOST = _SETUP + r"""
import jax
from dm_jax import sharding, train as T
from dm_jax.verify import certify as C
out = {"devices": len(jax.devices())}
ds, tmp = dataset(), sys.argv[1]
for method, kw in (("ibp", {}), ("dm", dict(lam_form="kappa"))):
  one, _ = T.train(config(method, f"{tmp}/{method}1", num_devices=1, **kw), ds)
  four, hist = T.train(config(method, f"{tmp}/{method}4", num_devices=4, **kw), ds)
  out[f"{method}_diff"] = float(np.max(np.abs(flat(one.params) - flat(four.params))))
  out[f"{method}_replicated"] = str(four.params["params"]["Dense_0"]["kernel"].sharding)
  # Stopped after 3 steps on 4 devices, resumed on 2: the one-device run's parameters.
  T.train(config(method, f"{tmp}/{method}r", num_devices=4, **kw), ds, max_steps=3)
  resumed, _ = T.train(config(method, f"{tmp}/{method}r", num_devices=2, **kw), ds)
  out[f"{method}_resume_diff"] = float(np.max(np.abs(flat(one.params)
                                                     - flat(resumed.params))))
try:
  T.train(config("ibp", f"{tmp}/odd", num_devices=4, batch_size=30), ds)
except ValueError as e:
  out["odd_batch_error"] = str(e)
# Certification: the same booleans and margins on 4 devices, 37 points (padded).
import dm_jax
model = dm_jax.get_model("mlp", 10, hidden=(32, 32))
x = np.random.default_rng(1).uniform(0, 1, (37, 8, 8, 1)).astype(np.float32)
params = model.init(jax.random.PRNGKey(0), x[:1])
y = np.asarray(model.apply(params, x)).argmax(-1)
mesh = sharding.data_mesh()
for m in ("ibp", "crown", "crown_ibp"):
  a, la = C.certify(model.apply, params, x, y, 0.01, method=m, batch_size=16)
  b, lb = C.certify(model.apply, params, x, y, 0.01, method=m, batch_size=16, mesh=mesh)
  out[f"cert_{m}"] = [int(a.sum()), bool((a == b).all()), float(np.abs(la - lb).max())]
print("RESULT " + json.dumps(out))
"""

_PROCESS = _SETUP + r"""
pid, nproc, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
from dm_jax import sharding
sharding.initialize_distributed(f"localhost:{port}", nproc, pid)
import jax
from dm_jax import train as T
state, _ = T.train(config("ibp", workdir), dataset())
np.save(f"{workdir}_process{pid}.npy", flat(sharding.to_host(state.params)))
print("RESULT " + json.dumps({"devices": len(jax.devices()),
                              "local": len(jax.local_devices())}))
"""


def _env(devices: int):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _result(stdout: str) -> dict:
  return json.loads(next(l for l in stdout.splitlines() if l.startswith("RESULT "))[7:])


@pytest.mark.sweep  # heavy (15-40 s): CI's sweep tier, not the default (tests/conftest.py)
def test_four_devices_train_and_certify_like_one(tmp_path):
  r = subprocess.run([sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + _SINGLE_HOST,
                      str(tmp_path)], env=_env(4), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = _result(r.stdout)
  assert out["devices"] == 4
  for method in ("ibp", "dm"):
    # Equal to float reduction order (the batch mean is a cross-device sum).
    assert out[f"{method}_diff"] < 1e-5, out
    assert out[f"{method}_resume_diff"] < 1e-5, out
    assert "PartitionSpec()" in out[f"{method}_replicated"] or "P()" in \
        out[f"{method}_replicated"], out
  assert "not divisible by the 4 devices" in out["odd_batch_error"]
  for m in ("ibp", "crown", "crown_ibp"):
    count, same, diff = out[f"cert_{m}"]
    assert same and diff < 1e-5, (m, out[f"cert_{m}"])
  assert out["cert_crown"][0] > 0  # something certified: the comparison is not empty


def test_mesh_and_distributed_arguments_are_checked():
  import jax
  n = len(jax.devices())
  assert sharding.data_mesh(1) is None and sharding.mesh_size(None) == 1
  with pytest.raises(ValueError, match="num_devices must be in"):
    sharding.data_mesh(n + 1)
  with pytest.raises(ValueError, match="num_devices must be in"):
    sharding.data_mesh(0)
  assert sharding.shard_batch({"x": 1}, None) == {"x": 1}
  assert sharding.initialize_distributed(None, None, None) is False
  with pytest.raises(ValueError, match="need --coordinator_address"):
    sharding.initialize_distributed(None, 2, 1)
  with pytest.raises(ValueError, match="needs --coordinator_address, --num_processes"):
    sharding.initialize_distributed("localhost:1", 2, None)
  with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):
    sharding.initialize_distributed("localhost:1", 2, 2)
  from dm_jax import train as T
  with pytest.raises(ValueError, match="num_devices must be a positive integer"):
    T.TrainConfig(num_devices=0).validate()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.sweep
def test_two_processes_train_like_one(tmp_path):
  """jax.distributed on localhost: 2 processes x 2 devices = the one-device run."""
  program = f"ROOT = {str(ROOT)!r}\n" + _PROCESS
  port = str(_free_port())
  workdir = str(tmp_path / "two")
  procs = [subprocess.Popen([sys.executable, "-c", program, str(pid), "2", port, workdir],
                            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for pid in (0, 1)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (stdout, stderr) in zip(procs, outs):
    assert p.returncode == 0, stderr[-3000:]
    assert _result(stdout) == {"devices": 4, "local": 2}
  single = subprocess.run([sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + _SETUP + r"""
from dm_jax import train as T
state, _ = T.train(config("ibp", sys.argv[1], num_devices=1), dataset())
np.save(sys.argv[1] + ".npy", flat(state.params))
""", str(tmp_path / "one")], env=_env(1), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  import numpy as np
  one = np.load(tmp_path / "one.npy")
  for pid in (0, 1):
    np.testing.assert_allclose(np.load(f"{workdir}_process{pid}.npy"), one, atol=1e-5)
  # One process wrote the metrics (one line per epoch), both took part in checkpoints.
  assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2
