"""The 0.1.0 module paths stay importable as aliases of the same modules (one method
registry, one primitive table), the package layers import only the layers above, and
every public signature is annotated."""
import ast
import importlib
from pathlib import Path

import pytest

import dm_jax

LAYERS = ("core", "bounds", "verify", "train")  # each may import only those before it
# ... except that training needs no certifier, and certification's attack row uses the
# attacks module of the training methods (PGD).
ALLOWED_EXTRA = {"verify": {"dm_jax.train.methods.attacks"}}
PACKAGE = Path(dm_jax.__file__).parent


@pytest.mark.parametrize("old,new", sorted(dm_jax._OLD_PATHS.items()))
def test_old_paths_are_the_same_modules(old, new):
  assert importlib.import_module(f"dm_jax.{old}") is importlib.import_module(f"dm_jax.{new}")


def test_old_method_module_paths_share_the_registry():
  import dm_jax.methods.base as old_base
  from dm_jax.train.methods import base
  assert old_base is base
  assert dm_jax.methods.METHODS == base.names()
  assert callable(dm_jax.double_margin)  # the function; the module is bounds.double_margin
  assert (importlib.import_module("dm_jax.double_margin")
          is importlib.import_module("dm_jax.bounds.double_margin"))


def _imported_layers(path: Path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    for name in names:
      parts = name.split(".")
      if parts[0] == "dm_jax" and len(parts) > 1 and parts[1] in LAYERS:
        yield parts[1], name


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_the_layers_above(layer):
  allowed = set(LAYERS[:LAYERS.index(layer) + 1])
  if layer == "train":
    allowed -= {"verify"}  # training needs no certifier
  for path in sorted((PACKAGE / layer).rglob("*.py")):
    bad = {name for other, name in _imported_layers(path)
           if other not in allowed and name not in ALLOWED_EXTRA.get(layer, ())}
    assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def _public_functions(body, owner: str = ""):
  """(node, name) of every public function in ``body`` (a module's statements, also
  those inside its ``if``/``try`` blocks) and of every public method of its public
  classes (named ``Class.method``)."""
  for node in body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      if not node.name.startswith("_"):
        yield node, owner + node.name
    elif isinstance(node, ast.ClassDef):
      if not owner and not node.name.startswith("_"):
        yield from _public_functions(node.body, node.name + ".")
    elif isinstance(node, (ast.If, ast.Try)):
      blocks = [node.body, node.orelse, getattr(node, "finalbody", [])]
      blocks += [h.body for h in getattr(node, "handlers", [])]
      yield from _public_functions([s for b in blocks for s in b], owner)


def _unannotated(fn, is_method: bool):
  """The parameters of ``fn`` without an annotation (not self/cls of a method, not
  bare ``*args``/``**kwargs``), and "return" if it has no return annotation."""
  positional = fn.args.posonlyargs + fn.args.args
  if is_method and positional and positional[0].arg in ("self", "cls"):
    positional = positional[1:]
  missing = [a.arg for a in positional + fn.args.kwonlyargs if a.annotation is None]
  return missing + ([] if fn.returns is not None else ["return"])


def test_public_signatures_are_annotated():
  """Every public function and public method of a public class, in a module whose path
  has no ``_``-prefixed component (``__init__.py`` counts as public), annotates every
  parameter (but self/cls and bare ``*args``/``**kwargs``) and its return."""
  offenders, checked = [], 0
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE.parent)
    if any(part.startswith("_") and part != "__init__.py" for part in rel.parts):
      continue
    for fn, name in _public_functions(ast.parse(path.read_text()).body):
      checked += 1
      missing = _unannotated(fn, "." in name)
      if missing:
        offenders.append(f"{rel}:{fn.lineno} {name} missing [{', '.join(missing)}]")
  assert checked, f"no public functions found under {PACKAGE}"
  assert not offenders, (f"{len(offenders)} public functions lack type hints:\n"
                         + "\n".join(offenders))
