"""The six architectures of the paper (Appendix G; shapes per SPEC.md) and ensembles.

All models take NHWC inputs scaled to [0, 1] (any spatial size and channel count) and
return (B, num_classes) logits. ReLU follows every layer but the last. Weights are
initialised N(0, 1/fan_in), biases 0 (SPEC.md, "Training setup").
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Sequence, Tuple

import flax.linen as nn
import jax

from dm_jax.core import conv as conv_lib

KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
PAD1 = ((1, 1), (1, 1))


def _conv(features, kernel, stride=1, padding="SAME"):
  # Same values as lax's convolution; strided ones get a faster input gradient on CPU
  # (dm_jax.core.conv.conv2d), which plain (normal/PGD/TRADES) training spends most time in.
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 kernel_init=KERNEL_INIT, conv_general_dilated=conv_lib.conv_general_dilated)


def _dense(features):
  return nn.Dense(features, kernel_init=KERNEL_INIT)


def _flatten(x):
  return x.reshape((x.shape[0], -1))


class ConvStack(nn.Module):
  """conv layers (features, kernel, stride, padding) -> dense layers -> logits."""
  convs: Sequence[Tuple[int, int, int, object]]
  denses: Sequence[int]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for features, kernel, stride, padding in self.convs:
      x = nn.relu(_conv(features, kernel, stride, padding)(x))
    x = _flatten(x)
    for features in self.denses:
      x = nn.relu(_dense(features)(x))
    return _dense(self.num_classes)(x)


class ResNet(nn.Module):
  """conv 16 3x3/2, one residual block [conv, relu, conv] + identity, dense."""
  num_classes: int = 10
  width: int = 16

  @nn.compact
  def __call__(self, x):
    x = nn.relu(_conv(self.width, 3, 2, PAD1)(x))
    h = nn.relu(_conv(self.width, 3, 1, PAD1)(x))
    h = _conv(self.width, 3, 1, PAD1)(h)
    x = nn.relu(x + h)
    return _dense(self.num_classes)(_flatten(x))


class Pooling(nn.Module):
  """conv 16 3x3, maxpool 2x2/2, conv 16 3x3, maxpool 2x2/2, dense."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = nn.relu(_conv(16, 3, 1, PAD1)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return _dense(self.num_classes)(_flatten(x))


class Ensemble(nn.Module):
  """Mean of the logits of ``num_members`` independent copies of ``member``.

  Bound propagation sees N parallel branches summed and scaled by 1/N, so Double
  Margin's z, s and v of the ensemble are the averages of the members' (Appendix H.2).
  """
  member: Callable[[], nn.Module]
  num_members: int = 3

  @nn.compact
  def __call__(self, x):
    logits = [self.member(name=f"member_{i}")(x) for i in range(self.num_members)]
    return sum(logits) / self.num_members


def small(num_classes: int = 10, **kw: Any) -> nn.Module:
  """conv 16 4x4/2 SAME, conv 32 4x4/1 SAME, dense 100, dense classes (Gowal's small)."""
  return ConvStack(((16, 4, 2, "SAME"), (32, 4, 1, "SAME")), (100,), num_classes, **kw)


def small_s2(num_classes: int = 10, **kw: Any) -> nn.Module:
  """Benchmark variant: conv 16 4x4/2 pad 1, conv 32 4x4/2 pad 1, dense 100, dense."""
  return ConvStack(((16, 4, 2, PAD1), (32, 4, 2, PAD1)), (100,), num_classes, **kw)


def pureconv(num_classes: int = 10, **kw: Any) -> nn.Module:
  return ConvStack(((16, 4, 2, PAD1),) * 3, (), num_classes, **kw)


def medium(num_classes: int = 10, **kw: Any) -> nn.Module:
  return ConvStack(((16, 3, 1, PAD1), (16, 4, 2, PAD1), (32, 3, 1, PAD1), (32, 4, 2, PAD1)),
                   (512, 512), num_classes, **kw)


def large(num_classes: int = 10, **kw: Any) -> nn.Module:
  return ConvStack(((64, 3, 1, PAD1), (64, 3, 1, PAD1), (64, 3, 2, PAD1),
                    (128, 3, 1, PAD1), (128, 3, 2, PAD1)), (200,), num_classes, **kw)


def mlp(num_classes: int = 10, hidden: Sequence[int] = (64, 64), **kw: Any) -> nn.Module:
  """A plain MLP (not in the paper; handy for tests and exact MIP checks)."""
  return ConvStack((), tuple(hidden), num_classes, **kw)


INITIALIZATIONS = ("default", "ibp")  # TrainConfig.init: the weights a run starts from


def _layer_groups(tree: Any, path: Tuple[str, ...] = ()):
  """Yields ``(path, layers)`` for every dict of the params tree whose values include
  layers (dicts holding a ``kernel``), the layers in creation order (flax's dicts keep
  it): one group per model, one per ensemble member."""
  if not isinstance(tree, dict):
    return
  layers = [k for k, v in tree.items() if isinstance(v, dict) and "kernel" in v]
  if layers:
    yield path, layers
  for k, v in tree.items():
    if isinstance(v, dict) and "kernel" not in v:
      yield from _layer_groups(v, path + (k,))


def ibp_initialization(params: Dict[str, Any], key: jax.Array) -> Dict[str, Any]:
  """Shi et al. (2021, "Fast certified robust training with short warmup")'s IBP
  initialisation: every kernel but each model's output layer redrawn from
  ``N(0, 2 pi / fan_in^2)`` (``fan_in``: the kernel's size over its last axis), so that an
  interval's width keeps its expected size from layer to layer at initialisation: a
  width ``r`` leaves ``|W| r`` with mean ``fan_in sigma sqrt(2 / pi) r``, and about half
  of it passes the ReLU, so ``sigma = sqrt(2 pi) / fan_in`` keeps it (the default
  ``N(0, 1 / fan_in)`` grows it by about ``sqrt(fan_in / (2 pi))`` per layer). Biases
  and the output layer keep their values. Their halving of the layers after a residual
  addition is not applied. Returns a new tree; ``params`` is not modified.
  """
  out = jax.tree_util.tree_map(lambda a: a, params)  # a structural copy
  groups = list(_layer_groups(out))
  if not groups:
    raise ValueError("ibp_initialization found no layer with a 'kernel' in the params.")
  for g, (path, layers) in enumerate(groups):
    node = out
    for k in path:
      node = node[k]
    for i, name in enumerate(layers[:-1]):
      kernel = node[name]["kernel"]
      fan_in = math.prod(kernel.shape[:-1])
      std = math.sqrt(2 * math.pi) / fan_in
      sub = jax.random.fold_in(jax.random.fold_in(key, g), i)
      node[name] = dict(node[name], kernel=std * jax.random.normal(sub, kernel.shape,
                                                                   kernel.dtype))
  return out


_REGISTRY = {
    "small": small, "small_s2": small_s2, "pureconv": pureconv,
    "resnet": lambda num_classes=10, **kw: ResNet(num_classes, **kw),
    "pooling": lambda num_classes=10, **kw: Pooling(num_classes, **kw),
    "medium": medium, "large": large, "mlp": mlp,
}
ARCHITECTURES = ("small", "pureconv", "resnet", "pooling", "medium", "large")


def get_model(name: str, num_classes: int = 10, ensemble: int = 1, **kwargs) -> nn.Module:
  """Builds an architecture by name; ``ensemble > 1`` averages that many copies."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown architecture {name!r}; expected one of "
                     f"{', '.join(sorted(_REGISTRY))}.")
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}.")
  if not isinstance(ensemble, int) or ensemble < 1:
    raise ValueError(f"ensemble must be a positive integer; got {ensemble!r}.")
  make = lambda **kw: _REGISTRY[name](num_classes, **kwargs, **kw)
  if ensemble == 1:
    return make()
  return Ensemble(make, ensemble)
