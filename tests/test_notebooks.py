"""The notebooks in ``notebooks/``: stored without outputs, linked from README, and run.

* default tier: every committed notebook parses and validates with nbformat, has no
  outputs and no execution counts (outputs are stripped in the repository), and README
  links it;
* sweep tier (CI): each notebook is executed top to bottom with nbclient in a ``python3``
  kernel, with ``DM_JAX_NOTEBOOK_SMOKE=1`` (a few hundred training examples, one epoch,
  16 certified points) and ``DM_JAX_DATA_DIR`` (default ``../shared/data``). Each takes
  about a minute on 2 cores; the time is printed (``pytest -s``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("quickstart.ipynb", "bring_your_own_model.ipynb")
TIMEOUT_S = 600  # per cell; a smoke run takes about a minute in all


def _data_dir() -> Path:
  env = os.environ.get("DM_JAX_DATA_DIR", "").strip()
  return Path(env).resolve() if env else (ROOT.parent / "shared" / "data").resolve()


def test_notebooks_are_stored_without_outputs():
  for name in NOTEBOOKS:
    path = NOTEBOOK_DIR / name
    assert path.is_file(), f"missing {path}"
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4, name
    assert nb["metadata"]["kernelspec"]["name"] == "python3", name
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name} has no code cells"
    for i, cell in enumerate(code):
      assert cell.get("outputs") == [], f"{name}: code cell {i} has outputs (strip them)"
      assert cell.get("execution_count") is None, f"{name}: code cell {i} was executed"
  assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


def test_notebooks_validate_and_are_linked_from_readme():
  nbformat = pytest.importorskip(
      "nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
  readme = (ROOT / "README.md").read_text()
  for name in NOTEBOOKS:
    nb = nbformat.read(str(NOTEBOOK_DIR / name), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        compile(cell.source, f"{name}:{cell.get('id')}", "exec")  # no syntax errors
    assert f"notebooks/{name}" in readme, f"README.md does not link notebooks/{name}"


@pytest.mark.sweep
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_in_smoke_mode(name, tmp_path, monkeypatch):
  nbformat = pytest.importorskip(
      "nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
  nbclient = pytest.importorskip(
      "nbclient", reason="nbclient is not installed (pip install -e '.[test]')")
  pytest.importorskip(
      "ipykernel", reason="ipykernel (the python3 kernel) is not installed "
      "(pip install -e '.[test]')")
  data_dir = _data_dir()
  if not (data_dir / "mnist.npz").exists():
    pytest.skip(f"MNIST not available ({data_dir / 'mnist.npz'}; set DM_JAX_DATA_DIR)")
  # The kernel inherits this environment: small settings, the data, this checkout, and
  # the notebooks' temporary folders under tmp_path.
  monkeypatch.setenv("DM_JAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("DM_JAX_DATA_DIR", str(data_dir))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  monkeypatch.delenv("DM_JAX_REINSTALL", raising=False)
  nb = nbformat.read(str(NOTEBOOK_DIR / name), as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  start = time.time()
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{name} failed in smoke mode:\n{e}")
  print(f"\n{name}: executed in {time.time() - start:.1f} s (smoke mode)")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors
  figures = sum("image/png" in o.get("data", {}) for c in nb.cells
                if c.cell_type == "code" for o in c.outputs)
  if name == "quickstart.ipynb":
    assert figures >= 3, f"expected the three figures, got {figures}"
