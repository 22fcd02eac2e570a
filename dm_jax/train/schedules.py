"""Training schedules: piecewise-linear ramps for eps, lambda and kappa, and the lr.

Every schedule is a pure function of the (integer) global step, so it can be evaluated
inside a jit-compiled train step from ``state.step`` (no recompilation per step).

Defaults (SPEC.md, "Training setup"; the public SingleProp code):

=========  ==========================  ===================  ======================
dataset    eps / lambda / kappa ramp   lr drops (x0.1)       reference run length
=========  ==========================  ===================  ======================
mnist      0 until 2000, linear->12000  after 15000, 25000  100 epochs x 600 = 60000
cifar10    0 until 5000, linear->55000  after 60000, 90000  350 epochs x 1000 = 350000
gtsrb      as mnist **(choice)**        as mnist            60000
=========  ==========================  ===================  ======================

kappa (the weight of the clean loss) goes 1 -> 0.5 on the eps ramp; lambda goes 0 ->
``lam_final`` on the same ramp (paper form: 2 for Double Margin, 1 for "Double Margin *").

Short runs **(choice)**: SPEC's boundaries are absolute steps of the paper-length run.
When a run has fewer total steps than the reference run length, every *default*
boundary is scaled by ``total_steps / reference_steps`` (rounded), so that a 1-epoch
run still warms up, ramps and decays in the same proportions. Runs at least as long as
the reference keep the absolute steps. Boundaries given explicitly (flags
``--eps_schedule``, ``--lr_boundaries``) are always used as given.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import jax.numpy as jnp
import optax

Schedule = Callable[[object], object]


def warmup_ramp(start_step: int, end_step: int, final: float, initial: float = 0.0
                ) -> Schedule:
  """``initial`` until ``start_step``, linear to ``final`` at ``end_step``, then ``final``.

  Returns a jit-able function ``step -> float32 scalar``. ``end_step <= start_step`` is a
  step change at ``start_step``.
  """
  start_step, end_step = int(start_step), int(end_step)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0; got {start_step}.")
  final, initial = float(final), float(initial)
  span = max(end_step - start_step, 0)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if span == 0:
      frac = (step >= start_step).astype(jnp.float32)
    else:
      frac = jnp.clip((step - start_step) / span, 0.0, 1.0)
    return jnp.asarray(initial + (final - initial) * frac, jnp.float32)

  return schedule


def lr_schedule(lr: float, boundaries: Sequence[int] = (), decay: float = 0.1
                ) -> optax.Schedule:
  """``lr``, multiplied by ``decay`` after each step in ``boundaries`` (optax)."""
  if lr <= 0:
    raise ValueError(f"lr must be > 0; got {lr}.")
  bounds = sorted(int(b) for b in boundaries)
  return optax.piecewise_constant_schedule(lr, {b: decay for b in bounds})


@dataclasses.dataclass(frozen=True)
class ScheduleDefaults:
  """A dataset's default step boundaries (absolute steps of the reference run)."""
  warmup_end: int
  ramp_end: int
  lr_boundaries: Tuple[int, ...]
  reference_steps: int


DEFAULTS = {
    "mnist": ScheduleDefaults(2000, 12000, (15000, 25000), 60000),
    "cifar10": ScheduleDefaults(5000, 55000, (60000, 90000), 350000),
    # GTSRB: the paper/SingleProp give nothing; use MNIST's (choice).
    "gtsrb": ScheduleDefaults(2000, 12000, (15000, 25000), 60000),
}


def defaults_for(dataset: str) -> ScheduleDefaults:
  return DEFAULTS.get(dataset, DEFAULTS["mnist"])


def scale_steps(steps: Sequence[int], total_steps: int, reference_steps: int
                ) -> Tuple[int, ...]:
  """Scales default boundaries by ``min(1, total_steps / reference_steps)``."""
  factor = min(1.0, total_steps / reference_steps) if reference_steps > 0 else 1.0
  return tuple(int(round(s * factor)) for s in steps)


@dataclasses.dataclass(frozen=True)
class ResolvedSchedule:
  """The concrete schedule of one run (all absolute global steps)."""
  warmup_end: int
  ramp_end: int
  lr_boundaries: Tuple[int, ...]
  eps_final: float
  lam_final: float
  kappa_final: float
  lr: float
  lr_decay: float = 0.1

  def eps(self) -> Schedule:
    return warmup_ramp(self.warmup_end, self.ramp_end, self.eps_final)

  def lam(self) -> Schedule:
    return warmup_ramp(self.warmup_end, self.ramp_end, self.lam_final)

  def kappa(self) -> Schedule:
    return warmup_ramp(self.warmup_end, self.ramp_end, self.kappa_final, initial=1.0)

  def learning_rate(self) -> optax.Schedule:
    return lr_schedule(self.lr, self.lr_boundaries, self.lr_decay)


# Shapes of the default boundaries. "singleprop": the reference run's absolute steps
# (table above), scaled down for shorter runs. The others are fractions of the run's
# steps, for any run length: (warm-up end, ramp end, lr drops), eps 0 until the warm-up
# ends, then linear to eps_train at the ramp's end, lr x0.1 after each drop.
# "proportional" **(choice, docs/recipes.md)**: warm-up 5%, ramp to 50%, drops at 75%
# and 90%, the shape of the first short MNIST recipes. "short_ramp" **(choice,
# docs/recipes.md, findings 13-14)**: the ramp ends at 30% instead, Shi et al. (2021)'s
# short warm-up (their MNIST: 20 of 70 epochs), the main job's shape.
FRACTIONS = {
    "proportional": (0.05, 0.5, (0.75, 0.9)),
    "short_ramp": (0.05, 0.3, (0.75, 0.9)),
}
SHAPES = ("singleprop",) + tuple(FRACTIONS)


def resolve(dataset: str, total_steps: int, *, eps_final: float, lam_final: float,
            kappa_final: float = 0.5, lr: float = 5e-4, lr_decay: float = 0.1,
            eps_schedule: Optional[Sequence[int]] = None,
            lr_boundaries: Optional[Sequence[int]] = None,
            shape: str = "singleprop") -> ResolvedSchedule:
  """The run's schedule: explicit boundaries as given, the rest from ``shape``."""
  if shape not in SHAPES:
    raise ValueError(f"schedule shape must be one of {', '.join(SHAPES)}; got {shape!r}.")
  d = defaults_for(dataset)
  if shape in FRACTIONS:
    warm_f, ramp_f, drops_f = FRACTIONS[shape]
    d = ScheduleDefaults(round(warm_f * total_steps), round(ramp_f * total_steps),
                         tuple(round(f * total_steps) for f in drops_f), total_steps)
  if eps_schedule is None:
    warm, ramp = scale_steps((d.warmup_end, d.ramp_end), total_steps, d.reference_steps)
  else:
    if len(eps_schedule) != 2:
      raise ValueError("eps_schedule must be two steps 'warmup_end,ramp_end'; got "
                       f"{tuple(eps_schedule)!r}.")
    warm, ramp = (int(s) for s in eps_schedule)
    if warm < 0 or ramp < warm:
      raise ValueError(f"eps_schedule needs 0 <= warmup_end <= ramp_end; got {warm},{ramp}.")
  if lr_boundaries is None:
    bounds = scale_steps(d.lr_boundaries, total_steps, d.reference_steps)
  else:
    bounds = tuple(int(b) for b in lr_boundaries)
    if any(b < 0 for b in bounds):
      raise ValueError(f"lr_boundaries must be >= 0; got {bounds}.")
  if eps_final < 0:
    raise ValueError(f"eps must be >= 0; got {eps_final}.")
  return ResolvedSchedule(warm, ramp, tuple(bounds), float(eps_final), float(lam_final),
                          float(kappa_final), float(lr), float(lr_decay))


def default_lam_final(method: str, lam_form: str = "paper") -> float:
  """Final lambda when none is given: :func:`dm_jax.train.methods.default_lam_final`.

  Paper form: 2 for ``dm`` (and its variants), 1 for ``dm*``, 1.0 for the other methods
  (their loss decides what lambda means). ``lam_form != "paper"`` (SingleProp's kappa
  form, lambda = 1 - kappa): 0.5.
  """
  from dm_jax.train import methods  # pylint: disable=import-outside-toplevel
  return methods.default_lam_final(method, lam_form)
