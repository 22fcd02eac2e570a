"""The training loop: jit-compiled train step, per-epoch metrics, exact resume.

* :class:`TrainConfig` holds every setting (all are flags of ``experiments/``).
* :func:`create_train_state` builds the :class:`TrainState` pytree: params, Adam state
  (optionally behind ``clip_by_global_norm``), step, PRNG key and pruning masks.
* :func:`make_train_step` compiles ONE step function: eps, lambda, kappa and the
  learning rate are computed inside from ``state.step`` with :mod:`dm_jax.train.schedules`,
  and batches have a static shape (``drop_remainder``), so it compiles once per run.
* :func:`train` runs epochs over ``data.batches(x, y, batch_size, seed, epoch)``,
  writes per-epoch metrics as JSON lines to ``workdir/metrics.jsonl`` and checkpoints
  with orbax (:mod:`dm_jax.train.checkpoint`) every ``checkpoint_every_steps`` steps and at
  the end. ``resume=True`` restores the latest checkpoint and continues exactly: the
  epoch's permutation is recomputed from ``(seed, epoch)`` and the batches already done
  are skipped; the RNG key lives in the state.
* A non-finite loss or parameter raises ``FloatingPointError`` naming the step, before
  anything is saved, so the last good checkpoint is untouched.

Choices (documented here and in the report):
* Magnitude pruning (method option ``prune``): masks are all ones until
  ``prune_step`` (default: the end of the eps ramp); at that step the loop calls
  ``methods.prune_small_weights(params, prune_threshold)`` and from then on every update
  is followed by ``methods.apply_masks``.
* CIFAR normalisation is part of ``apply_fn`` (``(x - mean) / std`` before the model),
  so bounds see it and eps stays in pixel units.
* The per-epoch "IBP-certified accuracy" (``ibp_cert_acc``) on ``eval_cert_points``
  seeded random test points uses interval bounds with the margin specification folded
  into the last affine layer (``linear.margin_lower_bounds(method="ibp")``, SPEC's
  convention); if that module is missing, the looser logit-interval check
  ``lower[y] > upper[j]`` from :func:`dm_jax.interval_bounds`. Both are sound. The DM
  margin statistics ``dm_s_mean``/``dm_v_mean`` are the mean output s and v there.
  Paper-style tables come from :mod:`dm_jax.verify.certify`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dm_jax import data as data_lib
from dm_jax.train import schedules
from dm_jax.train.methods.penalties import apply_masks, no_masks, prune_small_weights
from dm_jax import models as models_lib
from dm_jax.models import get_model


@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a run. ``None`` means "the dataset's default"."""
  dataset: str = "mnist"
  arch: str = "small"
  method: str = "dm"
  norm: str = "linf"
  k: Optional[int] = None                            # norm "l0": changed coordinates
  l1: float = 0.0
  prune: bool = False
  adv: bool = False
  lam_form: str = "paper"
  method_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
  eps_train: float = 0.3
  epochs: int = 100
  batch_size: int = 100
  lr: float = 5e-4
  lr_decay: float = 0.1
  lr_boundaries: Optional[Tuple[int, ...]] = None    # None: dataset default, scaled
  eps_schedule: Optional[Tuple[int, int]] = None     # (warmup_end, ramp_end) steps
  schedule: str = "singleprop"                       # default boundaries: schedules.SHAPES
  lam_final: Optional[float] = None                  # None: schedules.default_lam_final
  kappa_final: float = 0.5
  kappa_mode: str = "schedule"                       # "schedule" or "ada" (SingleProp)
  ada_gamma: float = 10.0                            # ada: kappa = l_r / (l_r + g l_c)
  ada_holdout: int = 1000                            # ada: last N train examples held out
  seed: int = 0
  workdir: Optional[str] = None
  checkpoint_every_steps: int = 1000
  max_to_keep: int = 3
  grad_clip: float = 0.0                             # 0: no clipping
  init: str = "default"                              # models.INITIALIZATIONS
  warmup_reg: float = 0.0                            # Shi et al.'s lambda_0 (0: off)
  warmup_reg_tol: float = 0.5                        # and their tau
  ensemble: int = 1
  num_devices: Optional[int] = None                  # data-parallel devices (None: all)
  num_classes: Optional[int] = None                  # None: from the dataset
  normalize: bool = False                            # per-channel (CIFAR) in apply_fn
  mean: Optional[Tuple[float, ...]] = None
  std: Optional[Tuple[float, ...]] = None
  augment: bool = False                              # pad-4 crop + flip (CIFAR)
  max_train_examples: Optional[int] = None
  log_every: int = 50
  eval_cert_points: int = 256
  eval_test_examples: Optional[int] = None           # None: the whole test split
  eval_batch_size: int = 500
  eval_domain: bool = False                          # per-epoch check on ball & box [0, 1]
  prune_threshold: float = 1e-3
  prune_step: Optional[int] = None                   # None: end of the eps ramp
  progress: bool = True

  def to_json(self) -> Dict[str, Any]:
    out = dataclasses.asdict(self)
    for k, v in out.items():
      if isinstance(v, tuple):
        out[k] = list(v)
    return out

  def validate(self) -> None:
    if not isinstance(self.epochs, int) or self.epochs <= 0:
      raise ValueError(f"epochs must be a positive integer; got {self.epochs!r}.")
    if not isinstance(self.batch_size, int) or self.batch_size <= 0:
      raise ValueError(f"batch_size must be a positive integer; got {self.batch_size!r}.")
    if not (self.eps_train >= 0 and math.isfinite(self.eps_train)):
      raise ValueError(f"eps must be >= 0; got {self.eps_train!r}.")
    if not self.lr > 0:
      raise ValueError(f"lr must be > 0; got {self.lr!r}.")
    if self.checkpoint_every_steps < 0:
      raise ValueError("checkpoint_every_steps must be >= 0.")
    if self.grad_clip < 0:
      raise ValueError(f"grad_clip must be >= 0; got {self.grad_clip!r}.")
    if self.warmup_reg < 0 or not self.warmup_reg_tol > 0:
      raise ValueError(f"warmup_reg must be >= 0 and warmup_reg_tol > 0; got "
                       f"{self.warmup_reg!r} and {self.warmup_reg_tol!r}.")
    if self.ensemble < 1:
      raise ValueError(f"ensemble must be >= 1; got {self.ensemble!r}.")
    if self.init not in models_lib.INITIALIZATIONS:
      raise ValueError(f"init must be one of {', '.join(models_lib.INITIALIZATIONS)}; "
                       f"got {self.init!r}.")
    if self.num_devices is not None and (isinstance(self.num_devices, bool) or
                                         not isinstance(self.num_devices, int)
                                         or self.num_devices < 1):
      raise ValueError(f"num_devices must be a positive integer or None (all); got "
                       f"{self.num_devices!r}.")
    if self.norm == "l0" and (isinstance(self.k, bool) or not isinstance(self.k, int)
                              or self.k <= 0):
      raise ValueError(f"norm 'l0' needs k, a positive integer number of changed "
                       f"coordinates; got k={self.k!r}.")
    if self.norm != "l0" and self.k is not None:
      raise ValueError(f"k is only used with norm 'l0'; got k={self.k!r} with norm "
                       f"{self.norm!r}.")
    if self.max_train_examples is not None and self.max_train_examples <= 0:
      raise ValueError(f"max_train_examples must be positive; got "
                       f"{self.max_train_examples!r}.")
    if self.eps_schedule is not None and not (
        len(self.eps_schedule) == 2 and 0 <= self.eps_schedule[0] <= self.eps_schedule[1]):
      raise ValueError(f"eps_schedule must be (warmup_end, ramp_end) with 0 <= warmup_end "
                       f"<= ramp_end; got {self.eps_schedule!r}.")
    if not 0.0 <= self.kappa_final <= 1.0:
      raise ValueError(f"kappa_final must be in [0, 1]; got {self.kappa_final!r}.")
    if self.schedule not in schedules.SHAPES:
      raise ValueError(f"schedule must be one of {', '.join(schedules.SHAPES)}; got "
                       f"{self.schedule!r}.")
    if self.kappa_mode not in ("schedule", "ada"):
      raise ValueError(f"kappa_mode must be 'schedule' or 'ada'; got {self.kappa_mode!r}.")
    if self.kappa_mode == "ada":
      from dm_jax.train import methods  # lazy: methods imports the bound modules
      if not methods.kappa_form(self.method, self.lam_form):
        raise ValueError(
            "kappa_mode='ada' re-weights kappa CE(clean) + (1 - kappa) robust loss; it "
            f"applies to {methods.kappa_form_summary()}, not method={self.method!r} "
            f"(lam_form={self.lam_form!r}).")
      if not self.ada_gamma > 0:
        raise ValueError(f"ada_gamma must be > 0; got {self.ada_gamma!r}.")
      if self.ada_holdout < 1:
        raise ValueError(f"ada_holdout must be >= 1; got {self.ada_holdout!r}.")


def ada_kappa(robust_loss: float, clean_loss: float, gamma: float) -> float:
  """SingleProp's "ada" kappa: ``l_robust / (l_robust + gamma l_clean)``.

  The weighted terms are then ``kappa l_c : (1 - kappa) l_r = 1 : gamma``: the robust
  part contributes gamma times the clean part, whatever their scales.
  """
  denom = robust_loss + gamma * clean_loss
  if not (math.isfinite(denom) and denom > 0):
    return 1.0
  return float(min(max(robust_loss / denom, 0.0), 1.0))


@flax.struct.dataclass
class TrainState:
  """All of a run's mutable state (a pytree of arrays; checkpointed as a whole)."""
  step: jax.Array          # int32 scalar: optimizer steps done
  params: Any              # the model variables ({"params": ...})
  opt_state: Any
  key: jax.Array           # raw uint32 PRNG key, split once per step
  masks: Any               # float32 ones-like params (pruning masks)


# ----------------------------------------------------------------------------- setup


def make_apply_fn(config: TrainConfig, model: Any) -> Callable:
  """``(params, x) -> logits``; with ``normalize`` the per-channel normalisation is inside."""
  if not config.normalize:
    return model.apply
  mean = np.asarray(config.mean if config.mean is not None else data_lib.CIFAR10_MEAN,
                    np.float32)
  std = np.asarray(config.std if config.std is not None else data_lib.CIFAR10_STD,
                   np.float32)

  def apply_fn(params, x):
    return model.apply(params, (x - mean) / std)

  return apply_fn


def build_model(config: TrainConfig, num_classes: int) -> Tuple[Any, Callable]:
  model = get_model(config.arch, num_classes=num_classes, ensemble=config.ensemble)
  return model, make_apply_fn(config, model)


def make_optimizer(config: TrainConfig,
                   sched: schedules.ResolvedSchedule) -> optax.GradientTransformation:
  adam = optax.adam(sched.learning_rate())
  if config.grad_clip and config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adam)
  return adam


def create_train_state(config: TrainConfig, key: jax.Array, input_shape: Tuple[int, ...], *,
                       model: Any = None, tx: Optional[optax.GradientTransformation] = None,
                       num_classes: Optional[int] = None) -> TrainState:
  """Initialises params (N(0, 1/fan_in); ``config.init="ibp"``: Shi et al.'s, see
  :func:`dm_jax.models.ibp_initialization`), the optimizer state, step 0 and the key."""
  if model is None:
    model = get_model(config.arch, num_classes=num_classes or config.num_classes or 10,
                      ensemble=config.ensemble)
  if tx is None:
    sched = schedules.resolve(config.dataset, 1 << 30, eps_final=config.eps_train,
                              lam_final=1.0, lr=config.lr)
    tx = make_optimizer(config, sched)
  key = jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  init_key, state_key = jax.random.split(key)
  params = model.init(init_key, jnp.zeros((1,) + tuple(input_shape), jnp.float32))
  params = jax.tree_util.tree_map(jnp.asarray, flax.core.unfreeze(params))
  if config.init == "ibp":
    params = models_lib.ibp_initialization(params, jax.random.fold_in(init_key, 1))
  masks = no_masks(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), key=state_key, masks=masks)


def canonical_method(name: str) -> str:
  """The registered method an alias stands for (``dm*`` -> ``dm``), see
  :func:`dm_jax.train.methods.canonical_name`."""
  from dm_jax.train import methods
  return methods.canonical_name(name)


def _get_method(config: TrainConfig):
  from dm_jax.train import methods  # lazy: methods imports the bound modules
  return methods.get_method(config.method, norm=config.norm, k=config.k, l1=config.l1,
                            prune=config.prune, adv=config.adv, lam_form=config.lam_form,
                            **config.method_kwargs)


def training_loss(config: TrainConfig, method: Any, during_ramp: bool = True) -> Callable:
  """The method's loss with what the trainer adds to every method: Shi et al.'s warm-up
  regularisers (:mod:`dm_jax.train.methods.warmup`) when ``config.warmup_reg`` > 0, on
  the method's own threat model (its resolved ``norm``, ``domain`` and ``k``).

  ``during_ramp``: the loss of the steps before the eps ramp's end; after it the
  regulariser's weight is 0, and ``during_ramp=False`` gives the method's loss with the
  regulariser's metrics at 0 (no bound pass).
  """
  if not config.warmup_reg:
    return method.loss
  from dm_jax.train.methods import warmup
  if not during_ramp:
    return warmup.with_zero_warmup_metrics(method.loss)
  options = getattr(method, "options", None) or {}
  return warmup.with_warmup_regularizer(
      method.loss, weight=config.warmup_reg, eps_final=config.eps_train,
      tol=config.warmup_reg_tol, norm=options.get("norm", config.norm),
      domain=options.get("domain", (0.0, 1.0)), k=options.get("k", config.k))


def _make_hyper(eps, lam, kappa):
  from dm_jax.train import methods
  return methods.Hyper(eps=eps, lam=lam, kappa=kappa)


def _tree_all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(config: TrainConfig, apply_fn: Callable, loss_fn: Callable,
                    tx: optax.GradientTransformation, sched: schedules.ResolvedSchedule, *,
                    make_hyper: Optional[Callable] = None, prune: Optional[bool] = None,
                    mesh: Any = None) -> Callable:
  """The jit-compiled ``train_step(state, x, y, kappa=None) -> (state, metrics)``.

  ``loss_fn(params, apply_fn, x, y, hyper, key) -> (loss, metrics)`` is the method's
  loss. eps, lambda and kappa come from the schedules at ``state.step``; a ``kappa``
  argument (a float32 scalar, ``kappa_mode="ada"``) replaces the scheduled kappa.
  With a ``mesh`` (:func:`dm_jax.sharding.data_mesh`), give it the state replicated and
  the batch sharded (:mod:`dm_jax.sharding`): the step runs data-parallel under XLA's
  SPMD partitioner and returns the state and metrics replicated.
  """
  eps_s, lam_s, kappa_s, lr_s = sched.eps(), sched.lam(), sched.kappa(), sched.learning_rate()
  make_hyper = make_hyper or _make_hyper
  augment = config.augment
  prune = config.prune if prune is None else prune

  def train_step(state: TrainState, x, y, kappa=None):
    key, aug_key, loss_key = jax.random.split(state.key, 3)
    if augment:
      x = data_lib.cifar_augment(aug_key, x)
    step = state.step
    kappa = kappa_s(step) if kappa is None else kappa
    hyper = make_hyper(eps_s(step), lam_s(step), kappa)

    def objective(params):
      return loss_fn(params, apply_fn, x, y, hyper, loss_key)

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if prune:
      params = apply_masks(params, state.masks)
    aux = dict(aux)
    if "acc" in aux:  # the method's clean accuracy at the nominal inputs
      acc = aux["acc"]
    else:
      logits = apply_fn(jax.lax.stop_gradient(state.params), x)
      acc = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
    metrics = {k: jnp.mean(jnp.asarray(v, jnp.float32)) for k, v in aux.items()}
    metrics.update(loss=jnp.asarray(loss, jnp.float32), train_acc=acc,
                   eps=hyper_value(hyper, "eps", eps_s(step)),
                   lam=lam_s(step), kappa=jnp.asarray(kappa, jnp.float32), lr=lr_s(step),
                   grad_norm=optax.global_norm(grads),
                   finite=jnp.isfinite(loss) & _tree_all_finite(params))
    new_state = state.replace(step=step + 1, params=params, opt_state=opt_state, key=key)
    return new_state, metrics

  if mesh is None:
    return jax.jit(train_step)
  from dm_jax import sharding
  return jax.jit(train_step, out_shardings=sharding.replicated_sharding(mesh))


def hyper_value(hyper: Any, name: str, default: float) -> jax.Array:
  return jnp.asarray(getattr(hyper, name, default), jnp.float32)


# ----------------------------------------------------------------------------- eval


class Evaluator:
  """Per-epoch evaluation: clean test accuracy, IBP-certified accuracy, DM margins."""

  def __init__(self, config: TrainConfig, apply_fn, dataset):
    from dm_jax.bounds.double_margin import double_margin
    from dm_jax.bounds.linear import margin_lower_bounds, worst_margin
    self.config = config
    n_test = dataset.num_test if config.eval_test_examples is None else min(
        config.eval_test_examples, dataset.num_test)
    self.x_test, self.y_test = dataset.x_test[:n_test], dataset.y_test[:n_test]
    rng = np.random.default_rng([config.seed, 12345])
    n_cert = min(config.eval_cert_points, dataset.num_test)
    idx = np.sort(rng.choice(dataset.num_test, n_cert, replace=False)) if n_cert else []
    self.x_cert, self.y_cert = dataset.x_test[idx], dataset.y_test[idx]
    norm = config.norm

    def logits_fn(params, x):
      return apply_fn(params, x)

    domain = (0.0, 1.0) if config.eval_domain else None

    def cert_fn(params, x, y, eps):
      # IBP with the margin specification folded into the last affine layer.
      lb = margin_lower_bounds(apply_fn, params, x, y, eps, norm, method="ibp",
                               domain=domain, k=config.k)
      certified = worst_margin(lb, y) > 0
      correct = jnp.argmax(apply_fn(params, x), -1) == y
      m = double_margin(apply_fn, params, x, eps, norm, k=config.k)
      return (jnp.mean((certified & correct).astype(jnp.float32)),
              jnp.mean(m.s), jnp.mean(m.v))

    self._logits = jax.jit(logits_fn)
    self._cert = jax.jit(cert_fn)

  def test_accuracy(self, params: Any) -> float:
    bs = self.config.eval_batch_size
    n = len(self.x_test)
    correct = 0
    for i in range(0, n, bs):
      x = self.x_test[i:i + bs]
      pad = bs - len(x)
      if pad and n > bs:  # keep one compiled shape
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      pred = np.asarray(jnp.argmax(self._logits(params, x), -1))[:len(self.y_test[i:i + bs])]
      correct += int(np.sum(pred == self.y_test[i:i + bs]))
    return correct / max(n, 1)

  def certified(self, params: Any, eps: float) -> Tuple[float, float, float]:
    if len(self.x_cert) == 0:
      return float("nan"), float("nan"), float("nan")
    acc, s, v = self._cert(params, self.x_cert, self.y_cert, jnp.float32(eps))
    return float(acc), float(s), float(v)


# ----------------------------------------------------------------------------- loop


def _json_safe(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def default_workdir(dataset: str, method: str, arch: str, eps_train: float) -> str:
  """Where a run goes when no workdir is given: ./runs/<dataset>_<method>_<arch>_eps<eps>."""
  return f"./runs/{dataset}_{method.replace('*', 'star')}_{arch}_eps{eps_train:.4g}"


def train(config: TrainConfig, dataset: data_lib.Dataset, *, resume: bool = True,
          method: Any = None,
          callback: Optional[Callable[[int, Dict[str, float]], None]] = None,
          max_steps: Optional[int] = None, make_hyper: Optional[Callable] = None
          ) -> Tuple[TrainState, List[Dict[str, Any]]]:
  """Trains ``config`` on ``dataset``; returns ``(state, history)``.

  Args:
    config: the run.
    dataset: a :class:`dm_jax.data.Dataset`.
    resume: continue from the latest checkpoint in ``workdir/checkpoints`` if any.
    method: optional object with ``.loss`` (default: ``methods.get_method(config...)``).
    callback: ``callback(step, metrics)`` after every step (after the finiteness
      check and any checkpoint); an exception raised there aborts the run like a kill.
    max_steps: stop (with a checkpoint) after this global step.
    make_hyper: optional ``(eps, lam, kappa) -> hyper`` (default ``methods.Hyper``).

  Returns:
    The final :class:`TrainState` and the list of per-epoch metric dicts.

  Raises:
    FloatingPointError: a non-finite loss or parameter, naming the step.
  """
  from dm_jax.train.checkpoint import Checkpointer
  config.validate()
  if config.max_train_examples is not None and config.max_train_examples < dataset.num_train:
    dataset = data_lib.subset(dataset, config.max_train_examples, None)
  ada = config.kappa_mode == "ada"
  holdout = None
  if ada:  # SingleProp measures the losses for kappa on held-out training data
    if config.ada_holdout >= dataset.num_train:
      raise ValueError(f"ada_holdout={config.ada_holdout} leaves no training data "
                       f"({dataset.num_train} examples).")
    n_fit = dataset.num_train - config.ada_holdout
    holdout = (dataset.x_train[n_fit:], dataset.y_train[n_fit:])
    dataset = data_lib.subset(dataset, n_fit, None)
  num_classes = config.num_classes or dataset.num_classes
  steps_per_epoch = data_lib.num_batches(dataset.num_train, config.batch_size, True)
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {config.batch_size} is larger than the training set "
                     f"({dataset.num_train} examples).")
  total_steps = steps_per_epoch * config.epochs
  lam_final = (config.lam_final if config.lam_final is not None
               else schedules.default_lam_final(config.method, config.lam_form))
  sched = schedules.resolve(config.dataset, total_steps, eps_final=config.eps_train,
                            lam_final=lam_final, kappa_final=config.kappa_final,
                            lr=config.lr, lr_decay=config.lr_decay,
                            eps_schedule=config.eps_schedule,
                            lr_boundaries=config.lr_boundaries, shape=config.schedule)
  prune_step = (config.prune_step if config.prune_step is not None else sched.ramp_end)
  if method is None:
    method = _get_method(config)
  do_prune = config.prune or bool(getattr(method, "prune", False))
  workdir = Path(config.workdir or default_workdir(config.dataset, config.method,
                                                   config.arch, config.eps_train))
  workdir.mkdir(parents=True, exist_ok=True)
  metrics_path = workdir / "metrics.jsonl"

  model, apply_fn = build_model(config, num_classes)
  tx = make_optimizer(config, sched)
  from dm_jax import sharding
  mesh = sharding.data_mesh(config.num_devices)
  sharding.check_divisible(config.batch_size, mesh)
  is_main = jax.process_index() == 0  # one host writes the files; all checkpoint
  state = create_train_state(config, jax.random.PRNGKey(config.seed), dataset.input_shape,
                             model=model, tx=tx)
  # Replicated before a restore, so orbax restores onto this run's devices (any count).
  state = sharding.replicate(state, mesh)
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.max_to_keep)
  resumed_from = None
  # ada: the kappa of the current epoch (1 = clean loss only until the first measure).
  kappa_now = 1.0
  if resume and ckpt.latest_step() is not None:
    _check_same_run(ckpt.read_meta().get("config"), config, ckpt.directory)
    state, meta = ckpt.restore(state)
    kappa_now = float(meta.get("kappa_ada", kappa_now))
    resumed_from = int(state.step)
    if meta.get("steps_per_epoch") not in (None, steps_per_epoch):
      raise ValueError(f"checkpoint in {ckpt.directory} has {meta['steps_per_epoch']} "
                       f"steps per epoch, this run {steps_per_epoch}: different data or "
                       "batch size; use another workdir or resume=False.")
  run_info = {"event": "start", "config": config.to_json(), "steps_per_epoch": steps_per_epoch,
              "total_steps": total_steps, "schedule": dataclasses.asdict(sched),
              "prune_step": prune_step if do_prune else None,
              "resumed_from_step": resumed_from, "dataset_source": dataset.source,
              "num_train": dataset.num_train, "devices": sharding.mesh_size(mesh),
              "processes": jax.process_count()}
  if is_main:
    (workdir / "run.json").write_text(json.dumps(run_info, indent=1, default=str))

  train_step = make_train_step(config, apply_fn, training_loss(config, method, False), tx,
                               sched, make_hyper=make_hyper, prune=do_prune, mesh=mesh)
  # Steps before the ramp's end add the warm-up regularisers (compiled on first use).
  ramp_step = (make_train_step(config, apply_fn, training_loss(config, method), tx, sched,
                               make_hyper=make_hyper, prune=do_prune, mesh=mesh)
               if config.warmup_reg else None)
  evaluator = Evaluator(config, apply_fn, dataset)
  holdout_losses = _holdout_losses_fn(apply_fn, method.loss, make_hyper) if ada else None
  if ada and resumed_from and resumed_from % steps_per_epoch == 0:
    # Saved at the last step of an epoch, before that epoch's kappa update: redo it (the
    # same params and key give the same value).
    kappa_now = ada_kappa(*_mean_holdout_losses(
        holdout_losses, state, holdout, config.batch_size, float(sched.eps()(resumed_from)),
        float(sched.lam()(resumed_from))), config.ada_gamma)
  history: List[Dict[str, Any]] = []
  step = int(state.step)
  start_epoch, skip = divmod(step, steps_per_epoch)
  last_saved = ckpt.latest_step()
  wall0 = time.time()
  stop_at = total_steps if max_steps is None else min(total_steps, int(max_steps))

  def meta_for(step_now):
    e, pos = divmod(step_now, steps_per_epoch)
    return {"step": step_now, "epoch": e, "batch_in_epoch": pos,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "config": config.to_json(), "kappa_ada": kappa_now}

  def save(step_now):
    nonlocal last_saved
    if last_saved != step_now:
      ckpt.save(step_now, state, meta_for(step_now))
      last_saved = step_now

  try:
    from tqdm.auto import tqdm
    bar = tqdm(total=stop_at, initial=min(step, stop_at), disable=not config.progress,
               desc=f"{config.dataset}/{config.method}", dynamic_ncols=True, leave=False)
    for epoch in range(start_epoch, config.epochs):
      if step >= stop_at:
        break
      sums: Dict[str, float] = {}
      count = 0
      t_epoch = time.time()
      it = data_lib.batches(dataset.x_train, dataset.y_train, config.batch_size,
                            config.seed, epoch, True)
      # Metrics stay on the device and are fetched every ``sync_every`` steps (and
      # before every checkpoint), so the host prepares the next batches while the
      # device computes; a per-step fetch cost ~15% of a DM step on CPU. The finiteness
      # check runs on the fetched steps in order, before any save: the first bad step is
      # named and no checkpoint after it is written.
      pending: List[Tuple[int, int, Any]] = []   # (step, batch, device metrics)
      done: List[Tuple[int, Dict[str, float]]] = []  # checked, for the bar and callback
      sync_every = 1 if callback is not None else max(config.log_every, 1)

      def flush():
        nonlocal count
        fetched = jax.device_get([m for _, _, m in pending])
        for (step_i, b_i, _), metrics in zip(pending, fetched):
          metrics = {k: float(v) for k, v in metrics.items()}
          if not metrics.pop("finite") or not math.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"non-finite loss or parameters at step {step_i} (epoch {epoch}, batch "
                f"{b_i}): loss={metrics['loss']}; the last good checkpoint (step "
                f"{last_saved}) in {ckpt.directory} is untouched.")
          for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
          count += 1
          done.append((step_i + 1, metrics))
        pending.clear()

      t_steps = time.time()
      for b, (x, y) in enumerate(it):
        if b < skip:
          continue
        if step >= stop_at:
          break
        if do_prune and step == prune_step and prune_step > 0:
          state = _prune(state, config.prune_threshold)
        x, y = sharding.shard_batch((x, y), mesh)
        step_fn = ramp_step if ramp_step is not None and step < sched.ramp_end else train_step
        if ada:
          state, metrics = step_fn(state, x, y, np.float32(kappa_now))
        else:
          state, metrics = step_fn(state, x, y)
        pending.append((step, b, metrics))
        step += 1
        bar.update(1)
        will_save = bool(config.checkpoint_every_steps
                         and step % config.checkpoint_every_steps == 0)
        if will_save or step % sync_every == 0 or step == stop_at:
          flush()
          if config.progress and done:
            last = done[-1][1]
            bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['train_acc']:.3f}",
                            eps=f"{last['eps']:.3g}")
        if will_save:
          save(step)
        if callback is not None:
          for step_i, metrics_i in done:
            callback(step_i, metrics_i)
        done.clear()
      if pending:
        flush()
        done.clear()
      step_time = (time.time() - t_steps) / count if count else float("nan")
      skip = 0
      epoch_done = step % steps_per_epoch == 0 or step == total_steps
      if count == 0:
        continue
      record = {"epoch": epoch + 1 if epoch_done else epoch + step % steps_per_epoch
                / steps_per_epoch, "step": step, "partial_epoch": not epoch_done,
                "steps": count}
      record.update({k: v / count for k, v in sums.items()})
      record["test_acc"] = evaluator.test_accuracy(state.params)
      eps_now = float(sched.eps()(step))
      record["eval_eps"] = eps_now
      acc, s_mean, v_mean = evaluator.certified(state.params, eps_now)
      record.update(ibp_cert_acc=acc, dm_s_mean=s_mean, dm_v_mean=v_mean)
      if eps_now != config.eps_train:
        record["ibp_cert_acc_eps_train"] = evaluator.certified(
            state.params, config.eps_train)[0]
      else:
        record["ibp_cert_acc_eps_train"] = acc
      if ada and epoch_done:
        robust, clean = _mean_holdout_losses(
            holdout_losses, state, holdout, config.batch_size, eps_now,
            float(sched.lam()(step)))
        record.update(kappa=kappa_now, holdout_robust_loss=robust,
                      holdout_clean_loss=clean)
        kappa_now = ada_kappa(robust, clean, config.ada_gamma)
        record["kappa_next"] = kappa_now
      record["step_time_s"] = step_time  # mean wall time per step, host work included
      record["epoch_time_s"] = time.time() - t_epoch
      record["wall_time_s"] = time.time() - wall0
      history.append(record)
      if is_main:
        with metrics_path.open("a") as f:
          f.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
      if config.progress:
        bar.write(f"epoch {record['epoch']}: loss {record['loss']:.4f} train_acc "
                  f"{record['train_acc']:.3f} test_acc {record['test_acc']:.3f} "
                  f"ibp_cert@{eps_now:.3g} {acc:.3f} ({record['step_time_s']*1e3:.1f} ms/step)")
    save(step)
    bar.close()
  finally:
    ckpt.close()
  return state, history


# Config fields that may change between a run and its resumption (they do not change
# what is trained).
_RESUME_MAY_DIFFER = frozenset({
    "workdir", "progress", "num_devices", "log_every", "checkpoint_every_steps",
    "max_to_keep",
    "eval_cert_points", "eval_test_examples", "eval_batch_size", "eval_domain"})


def _check_same_run(saved: Optional[Dict[str, Any]], config: TrainConfig, directory):
  """Refuses to resume a checkpoint written by a different run configuration."""
  if not saved:
    return
  now = json.loads(json.dumps(config.to_json(), default=str))
  saved = json.loads(json.dumps(saved, default=str))
  # A field added after the checkpoint was written reads as its default there.
  defaults = json.loads(json.dumps(TrainConfig().to_json(), default=str))
  saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
  diff = sorted(k for k in set(now) | set(saved)
                if k not in _RESUME_MAY_DIFFER and now.get(k) != saved.get(k))
  if diff:
    detail = ", ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in diff)
    raise ValueError(f"the checkpoint in {directory} was written by a different run "
                     f"({detail}); use another workdir, or resume=False (--noresume) to "
                     "start over there.")


def _holdout_losses_fn(apply_fn, loss_fn, make_hyper):
  """jit ``(params, x, y, eps, lam, key) -> (robust_loss, ce_clean)`` of the method."""
  make_hyper = make_hyper or _make_hyper

  def losses(params, x, y, eps, lam, key):
    _, metrics = loss_fn(params, apply_fn, x, y, make_hyper(eps, lam, 0.5), key)
    return metrics["robust_loss"], metrics["ce_clean"]

  return jax.jit(losses)


def _mean_holdout_losses(fn, state: TrainState, holdout, batch_size: int, eps: float,
                         lam: float) -> Tuple[float, float]:
  """Mean (robust, clean) loss over the held-out examples, in full batches (one shape)."""
  x, y = holdout
  bs = min(batch_size, len(x))
  key = jax.random.fold_in(state.key, 7)  # a fixed function of the state: resumable
  robust = clean = 0.0
  n = len(x) // bs
  for i in range(n):
    r, c = fn(state.params, x[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs],
              np.float32(eps), np.float32(lam), key)
    robust, clean = robust + float(r), clean + float(c)
  return robust / n, clean / n


def _prune(state: TrainState, threshold: float) -> TrainState:
  params, masks = prune_small_weights(state.params, threshold)
  return state.replace(params=params, masks=masks)


def load_config(workdir: Any) -> Tuple[Path, TrainConfig]:
  """``(workdir, config)``: the training configuration saved with the latest checkpoint
  of a run's ``workdir`` (or of its ``checkpoints/`` folder, also accepted)."""
  from dm_jax.train.checkpoint import Checkpointer, latest_step
  workdir = Path(workdir)
  if workdir.name == "checkpoints":
    workdir = workdir.parent
  if latest_step(workdir / "checkpoints") is None:
    raise ValueError(f"no checkpoint in {workdir / 'checkpoints'} (give a training "
                     "workdir, as written by experiments.<dataset> --workdir).")
  with Checkpointer(workdir / "checkpoints") as ckpt:
    saved = dict(ckpt.read_meta().get("config") or {})
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  return workdir, TrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in saved.items() if k in fields})


def load_params(workdir: Any, config: TrainConfig, input_shape: Tuple[int, ...],
                num_classes: int) -> TrainState:
  """Restores the params of the latest checkpoint in ``workdir`` (for certification)."""
  from dm_jax.train.checkpoint import Checkpointer
  sched = schedules.resolve(config.dataset, 1 << 30, eps_final=config.eps_train,
                            lam_final=1.0, lr=config.lr)
  model, _ = build_model(config, num_classes)
  target = create_train_state(config, jax.random.PRNGKey(config.seed), input_shape,
                              model=model, tx=make_optimizer(config, sched))
  with Checkpointer(Path(workdir) / "checkpoints", config.max_to_keep) as ckpt:
    state, _ = ckpt.restore(target)
  return state
