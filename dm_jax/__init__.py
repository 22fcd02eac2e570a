"""dm_jax: Double Margin training and certification of robust networks in JAX/Flax."""
import importlib as _importlib
import sys as _sys

from dm_jax.bounds.double_margin import (Margins, dm_regularizer, double_margin,
                                         folded_margins, split_cross_entropy)
from dm_jax.bounds.interval import Bounds, interval_bounds
from dm_jax.core.errors import UnsupportedPrimitiveError
from dm_jax.core.input_sets import make_input_set
from dm_jax.models import ARCHITECTURES, get_model

__all__ = [
    "ARCHITECTURES", "Bounds", "Margins", "UnsupportedPrimitiveError", "dm_regularizer",
    "double_margin", "folded_margins", "get_model", "interval_bounds", "make_input_set",
    "split_cross_entropy",
]
__version__ = "0.1.0"

# The module paths before the core/bounds/verify/train layout (0.1.0), kept importable
# for one release as aliases of the same module objects (one registry, one state).
_OLD_PATHS = {
    "interpreter": "core.interpreter", "input_sets": "core.input_sets",
    "primitives": "core.primitives", "conv": "core.conv", "errors": "core.errors",
    "propagation": "core.propagation", "interval": "bounds.interval",
    "linear": "bounds.linear", "patches": "bounds.patches", "certify": "verify.certify",
    "mip": "verify.mip", "schedules": "train.schedules", "checkpoint": "train.checkpoint",
    "methods": "train.methods",
}
for _old, _new in _OLD_PATHS.items():
  _module = _importlib.import_module(f"dm_jax.{_new}")
  _sys.modules[f"dm_jax.{_old}"] = _module
  globals().setdefault(_old, _module)
# dm_jax.double_margin stays the function; the module is dm_jax.bounds.double_margin,
# also importable by its old path.
_sys.modules["dm_jax.double_margin"] = _importlib.import_module("dm_jax.bounds.double_margin")
for _name in list(_sys.modules):  # dm_jax.methods.<method module>
  if _name.startswith("dm_jax.train.methods."):
    _sys.modules["dm_jax.methods." + _name.rsplit(".", 1)[1]] = _sys.modules[_name]
del _old, _new, _module, _name
