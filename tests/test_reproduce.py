"""experiments.reproduce: the tables' cells are valid commands, the estimates, the report,
and (CI's tier) the fast budget of one table end to end, resumed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("DM_JAX_DATA_DIR", str(ROOT.parent / "shared" / "data"))


def _run(args, timeout=600, cwd=ROOT):
  env = dict(os.environ, DM_JAX_DATA_DIR=DATA, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.reproduce", *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reproduce():
  from absl import flags
  from experiments import reproduce as module
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  return module


@pytest.mark.sweep  # heavy (10-25 s): CI's sweep tier, not the default (tests/conftest.py)
def test_every_cell_of_every_table_is_a_valid_command():
  # Each script's own flag checks (experiments.common.build_config) on every cell.
  r = _run(["--check"], timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "is a valid command" in r.stdout


def test_check_reports_an_invalid_cell(reproduce, monkeypatch):
  bad = reproduce.Table("bad", "bad", "mnist", ("--eps=0.3",), 1, (), (
      reproduce.Cell("wrong_option", "x", ("--method=ibp", "--dm_loss=folded")),
      reproduce.Cell("unknown_flag", "x", ("--no_such_flag=1",)),
      reproduce.Cell("ok", "x", ("--method=ibp",)),
      reproduce.Cell("bad_certifier", "x", ("--methods=relu,nope",), kind="certify",
                     source="ok")))
  monkeypatch.setitem(reproduce.TABLES, "bad", bad)
  problems = reproduce.check_cells(["bad"], "full")
  text = "\n".join(problems)
  assert len(problems) == 3, text
  assert "does not read the option dm_loss" in text
  assert "no_such_flag" in text
  assert "bad/bad_certifier" in text and "nope" in text


def test_bench_entries_build_the_cells_methods(reproduce):
  # The cost table times exactly the methods the cells train: every entry must be a
  # method get_method builds, with the options the cell's flags give.
  from benchmarks.train_bench import parse_method
  from dm_jax.train import methods
  t = reproduce.TABLES["table2_mnist"]
  entries = {c.name: reproduce.bench_entry(t, c) for c in t.cells}
  assert entries["dm_ibp_v"] == "dm_ibp_v[dm_domain=true;dm_loss=folded;lam_form=kappa]"
  assert entries["ibp"] == "ibp[ibp_margin=true]"
  assert entries["l1_rs_pruning"] == "relu_stability[l1=2e-5;prune=true]"
  assert entries["bounded"] == "bounded[bounded_projections=50]"
  assert entries["crown_ibp_fused"] == "crown_ibp[loss_fusion=true]"  # not plain crown_ibp
  for name, entry in entries.items():
    method, kwargs = parse_method(entry)
    assert methods.get_method(method, **kwargs) is not None, name


def test_steps_and_fast_commands(reproduce):
  t = reproduce.TABLES["table2_mnist"]
  assert reproduce.cell_steps(t, t.cell("dm")) == 100 * 600
  assert reproduce.cell_steps(t, t.cell("mmr")) == 600
  cifar = reproduce.TABLES["table2_cifar"]
  assert reproduce.cell_steps(cifar, cifar.cell("dm_small")) == 30 * 1000
  argv = reproduce.cell_argv(t, t.cell("dm"), "fast", Path("w"))
  assert argv[1:3] == ["-m", "experiments.mnist"]
  # The fast budget's flags come after the cell's, so they win; three radii of the grid.
  assert argv.index("--epochs=1") > argv.index("--epochs=100")
  assert argv[-1] == "--eps_grid=0,0.07,0.4" or "--eps_grid=0,0.07,0.4" in argv
  cert = reproduce.TABLES["certifiers"]
  argv = reproduce.cell_argv(cert, cert.cells[0], "full", Path("w"))
  assert "--checkpoint=runs/reproduce/full/table2_mnist/dm_ibp_v" in argv


def test_list_estimates_from_measured_step_times(tmp_path):
  cache = tmp_path / "step_times.json"
  cache.write_text(json.dumps({
      "mnist/small/normal/100": 10.0, "_machine": {"model": "test cpu"}}))
  r = _run(["--list", "--table=table2_mnist", f"--workdir={tmp_path}",
            f"--step_times={cache}", f"--results_dir={tmp_path / 'results'}"], timeout=120)
  assert r.returncode == 0, r.stderr
  line = next(l for l in r.stdout.splitlines() if " normal " in l)
  # 100 epochs of 600 steps at 10 ms: 600 s = 0.17 h.
  assert "0.17 h" in line and "todo" in line, line
  assert "test cpu" in r.stdout
  assert "estimated training CPU time of the cells to do: 0.2 h" in r.stdout


def _fake_result(reproduce, table, cell, best, fastlin, budget="full"):
  grid = [reproduce.grids.parse_number(e, "eps") for e in table.columns]
  return {"table": table.name, "cell": cell.name, "label": cell.label, "kind": "train",
          "budget": budget, "epochs": 3, "eps_train": "0.3", "command": "python -m x",
          "source": None, "train_time_s": 120.0, "driver_wall_s": 150.0,
          "machine": {"model": "test cpu", "cores": 2},
          "result": {"eps_grid": grid, "eps_labels": list(table.columns),
                     "table": {"clean": best[0], "rows": {"best": best, "fastlin": fastlin},
                               "pgd": [min(1.0, b + 0.05) for b in best]}}}


def test_render_keeps_ours_and_the_papers_apart(reproduce, tmp_path, monkeypatch):
  monkeypatch.setattr(reproduce.FLAGS, "results_dir", str(tmp_path / "results"))
  monkeypatch.setattr(reproduce.FLAGS, "report", str(tmp_path / "RESULTS.md"))
  t = reproduce.TABLES["table2_mnist"]
  n = len(t.columns)
  best = [0.9 - 0.1 * i for i in range(n)]
  fastlin = [0.8 - 0.1 * i for i in range(n)]
  for cell in (t.cell("dm"), t.cell("ibp")):
    path = tmp_path / "results" / t.name / f"{cell.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_fake_result(reproduce, t, cell, best, fastlin)))
  # one cell's training record (a partial epoch among them, left out of the curve)
  records = [{"epoch": e, "partial_epoch": False, "test_acc": 0.9,
              "ibp_cert_acc_eps_train": 0.1 * e} for e in (1, 2, 3)]
  records.insert(1, {"epoch": 1.5, "partial_epoch": True, "test_acc": 0.9,
                     "ibp_cert_acc_eps_train": 0.99})
  (tmp_path / "results" / t.name / "dm.metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records))
  assert [r["epoch"] for r in reproduce._training_curves(t, "full")["dm"]] == [1, 2, 3]
  report = reproduce.render(["table2_mnist", "certifiers"], "full")
  text = report.read_text()
  assert "Cells finished: 2 of 19" in text and "to do: normal," in text
  ours = text.split("The paper's numbers")[0]
  papers = text.split("The paper's numbers")[1]
  assert "| Double Margin (our recipe) | 3 | 2.0 min | 90.0% | 90.0% | 80.0%" in ours
  # the paper's Double Margin row of Table 2 (200 points), only in the paper's table
  assert "66.5%" in papers and "66.5%" not in ours
  assert (tmp_path / "figures" / "table2_mnist.png").stat().st_size > 1000
  assert (tmp_path / "figures" / "table2_mnist_training.png").stat().st_size > 1000
  table2 = text.split("## Tables 13-16")[0]
  assert "figures/table2_mnist_training.png" in table2 and "Training curves:" in table2
  # the certifier comparison re-reads the Table 2 cells
  section = text.split("## Tables 13-16")[1]
  assert "Ours, CNN-Cert-ReLU" in section and "Double Margin (our recipe)" in section


def _fake_selection(names_distances, eps):
  rows = [{"name": n, "method": n, "options": {}, "distance": d, "verdict": d < 10,
           "cosine": 0.5, "iterations": 7, "converged": True, "rank": i + 1,
           "best_scale": 0.5, "scaled_distance": 0.1 if n == "l1" else d / 2}
          for i, (n, d) in enumerate(names_distances)]
  runs = {n: {"objective": 100 + d, "cert_acc": 0.0} for n, d in names_distances}
  runs["none"] = {"objective": 200.0, "cert_acc": 0.0}
  return {"rows": rows, "setting": {"eps": eps, "damping": 0.1},
          "target": {"kind": "robust_val", "method": "ibp", "norm": 10.0},
          "clean": {"loss": 0.07, "grad_norm": 0.3, "top_eigenvalue": 7.5},
          "timings": {"hvp_seconds": 0.15, "wall_seconds": 70.0}, "trained_with": "normal",
          "step": 600, "validation": {"runs": runs, "spearman_distance_vs_objective": 1.0,
                                      "spearman_distance_vs_uncertified": None}}


def test_select_cells_read_their_source_and_render_both_measurements(
    reproduce, tmp_path, monkeypatch):
  t = reproduce.TABLES["regularizers"]
  argv = reproduce.cell_argv(t, t.cell("select_100ep_eps0.3"), "full", Path("w"))
  assert argv[1:3] == ["-m", "experiments.select_regularizer"]
  assert "--checkpoint=runs/reproduce/full/table2_mnist/normal" in argv
  assert "--output=w/select_regularizer.json" in argv and "--eps=0.3" in argv
  monkeypatch.setattr(reproduce.FLAGS, "results_dir", str(tmp_path / "results"))
  monkeypatch.setattr(reproduce.FLAGS, "report", str(tmp_path / "RESULTS.md"))
  t2 = reproduce.TABLES["table2_mnist"]
  n = len(t2.columns)
  i03 = list(t2.columns).index("0.3")
  for name, cert in (("ibp", 0.9), ("dm", 0.7), ("l1", 0.1)):
    best = [cert] * n
    path = tmp_path / "results" / t2.name / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_fake_result(reproduce, t2, t2.cell(name), best, best)))
  cell = t.cell("select_1ep_eps0.3")
  path = tmp_path / "results" / t.name / f"{cell.name}.json"
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps({
      "kind": "select", "label": cell.label, "command": "python -m select", "budget": "full",
      "result": _fake_selection([("ibp", 1.0), ("dm", 2.0), ("l2", 2.5), ("l1", 3.0),
                                 ("crown_ibp", 4.0)], 0.3)}))
  text = reproduce.render(["regularizers"], "full").read_text()
  section = text.split("## Section 3.1")[1]
  assert "Cells finished: 1 of 5" in section
  # The Table 2 network of each regularizer, at the select cell's eps (0.3 of the grid).
  assert i03 >= 0
  assert "| 1 | ibp | 1 | yes | 0.500 | 7 | 0.5 | 0.5 | 101 | 0.0% | 90.0% |" in section
  assert "| 3 | l2 | 2.5 | yes | 0.500 | 7 | 0.5 | 1.25 | 102.5 | 0.0% | no cell |" in section
  assert "| 5 | crown_ibp | 4 | yes | 0.500 | 7 | 0.5 | 2 | 104 | 0.0% | not run |" in section
  # distances 1 < 2 < 3 against uncertified shares 0.1 < 0.3 < 0.9: rho = +1.
  assert "Table 2 networks' uncertified share: +1.00 (" in section
  # at the best scale l1 comes first (0.1 < 0.5 < 1), the measurement puts it last
  assert "(by the distance at the best scale: -0.50; 3 of 5" in section
  assert "fine-tuning: +1.00" in section and "uncertified share: undefined" in section


@pytest.mark.sweep
def test_fast_budget_runs_a_table_and_resumes(tmp_path):
  """CI's smoke run of the driver: one cell of each method of mnist_eps (DM, IBP,
  CROWN-IBP; the other three cells are the same commands at the other eps, and each
  cell is a training subprocess of ~35 s), a few steps each, then the rerun."""
  if not Path(DATA, "mnist.npz").exists():
    pytest.skip("needs ../shared/data/mnist.npz")
  cells = ["dm_eps0.1", "ibp_eps0.2", "crown_ibp_eps0.2"]
  args = ["--table=mnist_eps", "--budget=fast", f"--workdir={tmp_path}",
          f"--cells={','.join(cells)}"]
  r = _run(args, timeout=1200)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  results = tmp_path / "fast" / "results" / "mnist_eps"
  names = sorted(p.stem for p in results.glob("*.json"))
  assert names == sorted(cells)
  res = json.loads((results / "dm_eps0.1.json").read_text())
  assert res["command"].startswith("python -m experiments.mnist --eps=0.1")
  assert res["machine"]["commit"] and res["epochs"] == 1
  table = res["result"]["table"]
  assert set(table["rows"]) >= {"fastlin", "ibp", "best"} and len(table["pgd"]) == 3
  assert (results / "dm_eps0.1.metrics.jsonl").exists()
  report = (tmp_path / "fast" / "RESULTS.md").read_text()
  assert "Cells finished: 3 of 6" in report
  assert (tmp_path / "fast" / "figures" / "mnist_eps.png").exists()
  # Rerun: every cell is skipped, nothing retrains.
  r = _run(args, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count(": done (") == 3, r.stdout


def test_collected_train_time_counts_a_suspended_epoch_at_the_median(
    reproduce, tmp_path, monkeypatch):
  from absl import flags
  monkeypatch.setattr(flags.FLAGS, "workdir", str(tmp_path))
  table = reproduce.TABLES["mnist_eps"]
  cell = table.cells[0]
  workdir = reproduce.cell_workdir(table, cell, "fast")
  workdir.mkdir(parents=True)
  (workdir / "certified.json").write_text(json.dumps({"table": {}}))
  times = (10.0, 9.0, 2294.0, 11.0, 10.0)  # the third epoch was SIGSTOPped
  (workdir / "metrics.jsonl").write_text(
      "".join(json.dumps({"epoch": i + 1, "epoch_time_s": t}) + "\n"
              for i, t in enumerate(times)))
  argv = reproduce.cell_argv(table, cell, "fast", workdir)
  res = json.loads(reproduce.collect_cell(table, cell, "fast", argv, 1.0).read_text())
  assert res["train_time_s"] == 50.0 and res["train_time_raw_s"] == sum(times)
