"""End-to-end runs of the absl experiment scripts in subprocesses."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _data_dir():
  env = os.environ.get("DM_JAX_DATA_DIR", "").strip()
  return Path(env) if env else ROOT.parent / "shared" / "data"


def _run(args, env_extra=None, timeout=600):
  env = dict(os.environ)
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("DM_JAX_DATA_DIR", str(_data_dir()))
  if env_extra:
    env.update(env_extra)
  return subprocess.run([sys.executable, "-m"] + args, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _need_mnist():
  if not (_data_dir() / "mnist.npz").exists():
    pytest.skip("MNIST not available")


@pytest.mark.sweep
def test_mnist_end_to_end_and_resume(tmp_path):
  _need_mnist()
  workdir = tmp_path / "run"
  args = ["experiments.mnist", "--epochs=1", "--max_train_examples=500",
          "--num_cert_points=20", f"--workdir={workdir}", "--arch=mlp", "--noprogress",
          "--kappa_final=0.25"]
  r = _run(args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Certified accuracy" in r.stdout
  out = r.stdout.lower()
  assert ("fastlin" in out or "cnn-cert-relu" in out) and "ibp" in out and "best" in out
  table = json.loads((workdir / "certified.json").read_text())
  assert table["num_points"] == 20 and table["method"] == "dm_s_only"
  # MNIST's defaults: the recipe of docs/recipes.md (Variation 1 on the ball, the short
  # ramp, Shi et al.'s initialisation and warm-up regularisers), certified on the ball
  # and the box
  assert table["lam_form"] == "kappa" and table["config"]["schedule"] == "short_ramp"
  assert table["config"]["init"] == "ibp" and table["config"]["warmup_reg"] == 0.5
  assert table["config"]["method_kwargs"] == {"dm_loss": "folded"}
  assert table["config"]["kappa_final"] == 0.25 and "kappa_final=0.25" in r.stdout
  assert table["cert_domain"] == [0.0, 1.0] and "pgd" in table["table"]
  assert table["command"].startswith("python -m experiments.mnist --epochs=1")
  rows = list(csv.reader((workdir / "certified.csv").open()))
  # MNIST's grid is the paper's Table 2 columns: 0, .1, .2, .3
  assert table["eps_grid"] == [0.0, 0.1, 0.2, 0.3]
  assert rows[0][0] == "certifier" and len(rows[0]) == 1 + len(table["eps_grid"])
  assert {row[0] for row in rows[1:]} >= {"fastlin", "ibp", "best"}
  metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert metrics[-1]["step"] == 5 and "ibp_cert_acc" in metrics[-1]
  # Run again: the checkpoint at the end is found, nothing is retrained.
  r2 = _run(args + ["--num_cert_points=0"])
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert "training done: step 5" in r2.stdout
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == len(metrics)
  # experiments.certify on the same checkpoint: its own grid, written beside it.
  r3 = _run(["experiments.certify", f"--checkpoint={workdir}", "--methods=ibp,α-CROWN",
             "--num_points=10", "--eps_grid=0,0.05,1/10", "--noprogress", "--alpha_steps=3",
             "--alpha_objective=min"])
  assert r3.returncode == 0, r3.stderr[-3000:]
  cert = json.loads((workdir / "certify_linf.json").read_text())
  assert cert["eps"] == [0.0, 0.05, 0.1] and set(cert["rows"]) == {"ibp", "alpha_crown",
                                                                    "best"}
  assert cert["alpha"]["steps"] == 3 and cert["alpha"]["objective"] == "min"
  # The verification pipeline: its rows, per-stage times, and the falsified share.
  r5 = _run(["experiments.certify", f"--checkpoint={workdir}", "--methods=ibp,pipeline",
             "--num_points=10", "--eps_grid=0,0.1", "--pipeline_pgd_steps=10",
             "--pipeline_stages=ibp,crown_ibp,pgd", "--output_dir=" + str(tmp_path / "p"),
             "--noprogress", "--sound"])
  assert r5.returncode == 0, r5.stderr[-3000:]
  assert "pipeline: falsified" in r5.stdout and "time per stage" in r5.stdout
  sound_table = json.loads((tmp_path / "p" / "certify_linf.json").read_text())
  assert sound_table["sound"] is True and cert["sound"] is False
  pipe = sound_table["pipeline"]
  assert pipe["stages"] == ["clean", "ibp", "crown_ibp", "pgd"]
  assert all(abs(c + f + u - 1) < 1e-9 for c, f, u in
             zip(pipe["certified"], pipe["falsified"], pipe["unknown"]))
  r4 = _run(["experiments.certify", f"--checkpoint={workdir}", "--eps_grid=0.1,0"])
  assert r4.returncode != 0 and "eps_grid" in r4.stderr


@pytest.mark.slow
def test_mnist_small_cnn_brief_command(tmp_path):
  """The command of the brief verbatim (small CNN; CNN-Cert on it is slow on CPU)."""
  _need_mnist()
  r = _run(["experiments.mnist", "--epochs=1", "--max_train_examples=500",
            "--num_cert_points=20", f"--workdir={tmp_path / 'tmp'}", "--noprogress"],
           timeout=3600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Certified accuracy" in r.stdout


@pytest.mark.parametrize("module,flag,needle", [
    ("experiments.mnist", "--method=nope", "method"),
    ("experiments.mnist", "--arch=nope", "arch"),
    ("experiments.mnist", "--eps=-0.1", "eps"),
    ("experiments.mnist", "--epochs=0", "epochs"),
    ("experiments.cifar10", "--eps=abc", "eps"),
    ("experiments.gtsrb", "--no_such_flag=1", "no_such_flag"),
    ("experiments.mnist", "--epochs=two", "epochs"),
    ("experiments.mnist", "--method=ibp --dm_domain", "dm_domain"),
    ("experiments.mnist", "--method=ibp --loss_fusion", "loss_fusion"),
    ("experiments.mnist", "--kappa_final=1.5", "kappa_final"),
    ("experiments.mnist", "--pgd_steps=0", "pgd_steps"),
    ("experiments.mnist", "--eps_grid=0.3,0.1", "eps_grid"),
    ("experiments.mnist", "--eps_schedule=100,50", "eps_schedule"),
    ("experiments.mnist", "--lr=0", "lr"),
    ("experiments.mnist", "--norm=l0 --eps=0.5", "changed pixels"),
])
def test_bad_flags_exit_with_one_line(tmp_path, module, flag, needle):
  r = _run([module, *flag.split(), f"--workdir={tmp_path / 'w'}"], timeout=120)
  assert r.returncode != 0
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith("error:") and needle in lines[0], lines
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_parse_number_takes_ratios_with_decimal_numerators():
  from experiments import grids
  assert grids.parse_number("8/255", "eps") == 8 / 255
  assert grids.parse_number(" 0.5 / 255", "eps_grid") == 0.5 / 255  # CIFAR's grid
  assert grids.parse_number("0.3", "eps") == 0.3
  assert grids.parse_grid("0,0.5/255,2/255", "eps_grid").eps == (0.0, 0.5 / 255, 2 / 255)
  for bad in ("1/0", "a/2", "1/2/3", "", "0.5/x"):
    with pytest.raises(ValueError, match="--eps must be a number"):
      grids.parse_number(bad, "eps")


def test_train_seconds_counts_a_suspended_epoch_at_the_median():
  from experiments import cli
  records = [{"epoch_time_s": t} for t in (10.0, 9.0, 11.0, 2294.0, 10.0)]
  assert cli.train_seconds(records) == 50.0  # the 2294 s epoch was SIGSTOPped
  ramp = [{"epoch_time_s": t} for t in (10.0, 20.0, 40.0, 45.0)]  # under 5x: kept
  assert cli.train_seconds(ramp) == 115.0
  assert cli.train_seconds([{"epoch_time_s": 3.0}, {}]) == 3.0


def test_missing_data_exits_with_one_line(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  r = _run(["experiments.gtsrb", f"--data_dir={empty}", f"--workdir={tmp_path / 'w'}"],
           timeout=120)
  assert r.returncode != 0
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
  assert "gtsrb" in lines[0].lower()


def test_recipe_search_list_summary_collect(tmp_path):
  """The recipe driver lists its commands, tabulates finished runs and copies their
  small files (a finished run is faked: certified.json + metrics.jsonl)."""
  r = _run(["experiments.recipe_search", "--stage=mnist_short", f"--root={tmp_path}",
            "--list"], timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert lines and all(l.startswith("todo  -m experiments.mnist") for l in lines)
  recipe = lines[0].split("--workdir=")[1].rsplit("/", 1)[1]
  run = tmp_path / "mnist_short" / recipe
  run.mkdir(parents=True)
  grid = [0, 0.1, 0.2, 0.3]
  (run / "certified.json").write_text(json.dumps({
      "eps_grid": grid, "train_time_s": 1.0,
      "table": {"clean": 0.9, "rows": {"ibp": [0.9, 0.8, 0.7, 0.6],
                                       "best": [0.9, 0.8, 0.7, 0.65]},
                "pgd": [0.9, 0.85, 0.75, 0.7]}}))
  (run / "metrics.jsonl").write_text(
      json.dumps({"epoch": 1, "test_acc": 0.91, "epoch_time_s": 10.0}) + "\n"
      + json.dumps({"epoch": 2, "test_acc": 0.92, "epoch_time_s": 12.5}) + "\n")
  dest = tmp_path / "results"
  r = _run(["experiments.recipe_search", "--stage=mnist_short", f"--root={tmp_path}",
            f"--collect={dest}"], timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  row = next(l for l in r.stdout.splitlines() if l.startswith(f"| {recipe} |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[1:5] == ["done", "92.0%", "90.0%", "80.0%"] and cells[-1] == "22"
  assert "65.0%" in cells and "70.0%" in cells  # best and PGD at 0.3
  assert sorted(p.name for p in (dest / "mnist_short" / recipe).iterdir()) == [
      "certified.json", "metrics.jsonl"]
  assert (dest / "mnist_short" / "summary.csv").exists()
  r = _run(["experiments.recipe_search", "--only=nope", f"--root={tmp_path}"], timeout=120)
  assert r.returncode != 0 and "unknown recipe" in r.stderr


# Resolves each command line given on stdin (JSON lists) to its TrainConfig, as the
# script would before training; prints them as JSON (workdir and progress dropped), and
# the method options' defaults.
_RESOLVE_PROGRAM = r"""
import dataclasses, json, sys
from absl import flags
from dm_jax.train import methods
from experiments import common, mnist
out = [methods.option_defaults()]
for argv in json.loads(sys.stdin.read()):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["mnist"] + argv)
  config = dataclasses.asdict(common.build_config(mnist.DEFAULTS))
  out.append({k: v for k, v in config.items() if k not in ("workdir", "progress")})
print(json.dumps(out))
"""


# The MNIST training cells of experiments.reproduce: {committed result path: argv}.
_REPRODUCE_CELLS_PROGRAM = r"""
import json
from absl import flags
from experiments import reproduce
flags.FLAGS(["reproduce", "--workdir=/nonexistent"])
out = {}
for table in reproduce.TABLES.values():
  for cell in table.cells:
    if table.script == "mnist" and cell.kind not in ("bench", "certify", "select"):
      argv = reproduce.cell_argv(table, cell, "full", reproduce.cell_workdir(table, cell, "full"))
      out[str(reproduce.result_path(table, cell, "full"))] = [
          a for a in argv[3:] if not a.startswith("--workdir=")]
print(json.dumps(out))
"""


def test_committed_recipe_results_resolve_to_their_configs_today(tmp_path):
  """Every recipe whose results are committed under results/mnist/<stage>/, and every
  MNIST cell of experiments.reproduce under results/<table>/, still trains what it
  trained: its command resolves today to the config its committed result holds, so a
  change of MNIST's defaults (the main job's) leaves them as they ran."""
  commands = {}
  for stage in ("mnist_short", "mnist_full"):
    r = _run(["experiments.recipe_search", f"--stage={stage}", f"--root={tmp_path}",
              "--list"], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for line in r.stdout.strip().splitlines():
      argv = line.split()[3:]  # drop "todo  -m experiments.mnist"
      recipe = [a for a in argv if a.startswith("--workdir=")][-1].rsplit("/", 1)[1]
      result = ROOT / "results" / "mnist" / stage / recipe / "certified.json"
      if result.exists():
        commands[result] = [a for a in argv if not a.startswith("--workdir=")]
  assert len(commands) >= 20  # the committed search
  # The same for the MNIST training cells of experiments.reproduce (results/<table>/).
  r = subprocess.run([sys.executable, "-c", _REPRODUCE_CELLS_PROGRAM], capture_output=True,
                     text=True, cwd=ROOT, timeout=300, env=dict(
                         os.environ, PYTHONPATH=str(ROOT) + os.pathsep
                         + os.environ.get("PYTHONPATH", "")))
  assert r.returncode == 0, r.stderr[-3000:]
  cells = 0
  for path, argv in json.loads(r.stdout.strip().splitlines()[-1]).items():
    if (ROOT / path).exists():
      commands[ROOT / path] = argv
      cells += 1
  assert cells >= 10  # Table 2's MNIST cells at least
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "-c", _RESOLVE_PROGRAM], input=json.dumps(
      list(commands.values())), capture_output=True, text=True, cwd=ROOT, env=env,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  option_defaults, *configs = json.loads(r.stdout.strip().splitlines()[-1])

  def normalized(config):  # a method option at its default is the option left out
    kwargs = {k: v for k, v in config["method_kwargs"].items() if option_defaults[k] != v}
    return {**config, "method_kwargs": kwargs}

  for result, today in zip(commands, configs):
    saved = json.loads(result.read_text())
    committed = normalized(saved.get("result", saved)["config"])  # reproduce: in "result"
    today = normalized(today)
    # Fields added after a run was made are compared where the run has them.
    diff = {k: (committed[k], v) for k, v in today.items()
            if k in committed and committed[k] != v}
    assert not diff, f"{result.relative_to(ROOT)}: committed vs today {diff}"
