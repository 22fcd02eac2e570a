"""Tests for the training-method registry (dm_jax.train.methods.base): every registered method
builds and runs, a method registered here trains through dm_jax.train with no other
change, options a method does not read are errors, aliases resolve."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dm_jax import data as data_lib
from dm_jax import get_model
from dm_jax.train import schedules
from dm_jax.train import methods as M
from dm_jax import train as train_lib

# The PGD / MMR sampling cost settings (SOLVER_OPTIONS) may go to every method.
FAST = dict(pgd_steps=2, pgd_step_size=0.02, mmr_units=8, mmr_k_b=4)


def _mlp_batch(n=4):
  model = get_model("mlp", 10, hidden=(16, 16))
  kx, ky = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.uniform(kx, (n, 6, 6, 1))
  y = jax.random.randint(ky, (n,), 0, 10)
  return model, model.init(jax.random.PRNGKey(1), x), x, y


def _loss(method, hyper=None):
  model, params, x, y = _mlp_batch()
  hyper = hyper or M.Hyper.create(0.05, 0.5, 0.5)
  f = jax.jit(jax.value_and_grad(
      lambda p: method.loss(p, model.apply, x, y, hyper, jax.random.PRNGKey(3)),
      has_aux=True))
  return f(params)


# ----------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("name", M.names(aliases=True))
def test_every_registered_method_builds_and_runs(name):
  method = M.get_method(name, **FAST)
  assert method.name == M.canonical_name(name) and method.loss.__doc__
  (loss, metrics), grads = _loss(method)
  assert np.isfinite(float(loss)) and float(metrics["loss"]) == float(loss)
  assert {"ce_clean", "robust_loss", "acc", "loss"} <= set(metrics)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_methods_is_the_registry():
  assert M.METHODS == M.names() and "dm" in M.METHODS and "dm*" not in M.METHODS
  assert set(M.names(aliases=True)) - set(M.METHODS) == {"dm*", "dm_star", "dmstar"}
  for name in M.METHODS:
    assert M.spec(name).name == name


def test_aliases_resolve():
  for alias in ("dm*", "dm_star", "dmstar"):
    assert M.canonical_name(alias) == "dm" == train_lib.canonical_method(alias)
    assert M.spec(alias).name == "dm" and M.spec(alias).lam_final == 1.0
    assert M.default_lam_final(alias) == 1.0 == schedules.default_lam_final(alias)
    assert M.get_method(alias).description == M.get_method("dm").description
  assert M.canonical_name("ibp") == "ibp" and M.canonical_name("custom") == "custom"
  assert M.default_lam_final("dm") == 2.0 and M.default_lam_final("dm_ibp_v") == 2.0
  assert M.default_lam_final("ibp") == 1.0 and M.default_lam_final("custom") == 1.0
  assert M.default_lam_final("dm", "kappa") == 0.5 == M.default_lam_final("mmr", "kappa")
  # The alias builds the same loss as its method.
  (a, _), _ = _loss(M.get_method("dm*"))
  (b, _), _ = _loss(M.get_method("dm"))
  assert float(a) == float(b)


def test_kappa_forms():
  for name in ("ibp", "crown_ibp", "bounded"):
    assert M.kappa_form(name, "paper") and M.kappa_form(name, "kappa")
  for name in ("dm", "dm_s_only", "dm_ibp_v", "dm*"):
    assert M.kappa_form(name, "kappa") and not M.kappa_form(name, "paper")
  for name in ("normal", "l1", "adv", "trades", "relu_stability", "mmr", "custom"):
    assert not M.kappa_form(name, "kappa")
  assert "dm (lam_form='kappa')" in M.kappa_form_summary()


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("name,option,value", [
    ("ibp", "dm_domain", True), ("dm", "bounded_projections", 50), ("normal", "adv", True),
    ("adv", "crown_ibp_beta", 0.5), ("dm", "trades_beta", 1.0), ("crown_ibp", "ibp_margin", True),
    ("ibp", "mmr_lam_d", 2.0), ("dm*", "ibp_margin", True)])
def test_option_the_method_does_not_read_raises(name, option, value):
  with pytest.raises(ValueError, match=rf"'{M.canonical_name(name)}'.*\b{option}="):
    M.get_method(name, **{option: value})


def test_options_at_default_and_solver_options_are_accepted():
  M.get_method("ibp", dm_domain=False, bounded_projections=0, adv=False, **FAST)
  M.get_method("normal", lam_form="kappa", l1=1e-3, prune=True, norm="l2", domain=None)
  with pytest.raises(ValueError, match="no_such_option"):
    M.get_method("dm", no_such_option=1)
  with pytest.raises(ValueError, match="Unknown method 'nope'.*dm_s_only.*dm\\*"):
    M.get_method("nope")
  with pytest.raises(ValueError, match="Unknown method"):
    M.spec("nope")


# ----------------------------------------------------------------------------- a new method


def _toy_loss(options):
  scale = options["toy_scale"]

  def toy_loss(params, apply_fn, x, y, hyper, key):
    """kappa CE(f(x)) + (1 - kappa) scale * CE(f(x + eps)): a toy robust term."""
    del key
    ce = M.cross_entropy(apply_fn(params, x), y)
    robust = scale * M.cross_entropy(apply_fn(params, x + hyper.eps), y)
    loss = hyper.kappa * ce + (1 - hyper.kappa) * robust
    return loss, dict(ce_clean=ce, robust_loss=robust, acc=M.accuracy(apply_fn(params, x), y),
                      toy_lam=hyper.lam)

  return toy_loss


@pytest.fixture
def toy_method():
  spec = M.register(M.MethodSpec(
      "toy", build=_toy_loss, describe=lambda o: f"Toy: CE + {o['toy_scale']:g} CE(x + eps).",
      options=("toy_scale",), extra_options={"toy_scale": 1.0}, kappa_lam_forms=M.LAM_FORMS,
      lam_final=3.0, aliases={"toy*": {"lam_final": 0.25}}))
  try:
    yield spec
  finally:
    M.unregister("toy")
  assert "toy" not in M.METHODS and M.canonical_name("toy*") == "toy*"


def _synthetic(n_train=200, n_test=100):
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (n_train + n_test, 8, 8, 1)).astype(np.float32)
  y = (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int32) + 2 * (x[:, 0, 0, 0] > 0.5)
  return data_lib.Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                          4, (8, 8, 1), "synthetic")


def test_registered_toy_method_trains_through_train(toy_method, tmp_path):
  assert "toy" in M.METHODS and M.spec("toy*").name == "toy"
  assert M.get_method("toy").options["toy_scale"] == 1.0
  with pytest.raises(ValueError, match=r"'dm'.*toy_scale=2"):
    M.get_method("dm", toy_scale=2.0)
  ds = _synthetic()
  common = dict(dataset="mnist", arch="mlp", eps_train=0.1, epochs=2, batch_size=50,
                lr=1e-3, eps_schedule=(1, 3), checkpoint_every_steps=0, eval_cert_points=20,
                eval_test_examples=50, progress=False)
  cfg = train_lib.TrainConfig(method="toy", method_kwargs={"toy_scale": 2.0},
                              workdir=str(tmp_path / "toy"), **common)
  state, hist = train_lib.train(cfg, ds)
  assert int(state.step) == 8 and len(hist) == 2
  assert np.isfinite(hist[-1]["loss"]) and "toy_lam" in hist[-1]
  run = json.loads((Path(cfg.workdir) / "run.json").read_text())
  assert run["schedule"]["lam_final"] == 3.0
  assert hist[-1]["toy_lam"] == pytest.approx(3.0)   # lam reached lam_final at step 3
  # Its alias, and kappa_mode="ada" (the toy loss declares the kappa form).
  cfg = train_lib.TrainConfig(method="toy*", kappa_mode="ada", ada_holdout=50,
                              workdir=str(tmp_path / "star"), **common)
  _, hist = train_lib.train(cfg, ds)
  run = json.loads((Path(cfg.workdir) / "run.json").read_text())
  assert run["schedule"]["lam_final"] == 0.25 and "kappa_next" in hist[-1]


def test_register_refuses_clashes(toy_method):
  del toy_method
  spec = M.spec("normal")
  with pytest.raises(ValueError, match="registered already"):
    M.register(spec)
  with pytest.raises(ValueError, match="registered already"):
    M.register(M.MethodSpec("other", build=spec.build, describe=spec.describe,
                            aliases={"dm*": {}}))
  with pytest.raises(ValueError, match="get_method keyword"):
    M.register(M.MethodSpec("other", build=spec.build, describe=spec.describe,
                            extra_options={"norm": "l2"}))
  with pytest.raises(ValueError, match="in another method"):
    M.register(M.MethodSpec("other", build=spec.build, describe=spec.describe,
                            extra_options={"toy_scale": 5.0}))
  with pytest.raises(ValueError, match="neither"):
    M.register(M.MethodSpec("other", build=spec.build, describe=spec.describe,
                            options=("undeclared",)))
  assert "other" not in M.METHODS


def test_method_entries_one_syntax():
  """name[option=value;...]: the one text form of a method with options (train_bench's
  --methods, select_regularizer's --candidates, the reproduction driver's estimates)."""
  from dm_jax.train import methods
  assert methods.split_method_entries("dm[lam_form=kappa;dm_loss=folded], ibp,") == [
      "dm[lam_form=kappa;dm_loss=folded]", "ibp"]
  assert methods.parse_method_entry("dm[lam_form=kappa;dm_domain=true;l1=2e-5]") == (
      "dm", {"lam_form": "kappa", "dm_domain": True, "l1": 2e-5})
  assert methods.parse_method_entry(" ibp ") == ("ibp", {})
  for bad in ("dm[lam_form]", "dm[=1]", "dm]x["):
    with pytest.raises(ValueError, match="bad"):
      methods.parse_method_entry(bad)
