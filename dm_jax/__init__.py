"""dm_jax: Double Margin training and certification of robust networks in JAX/Flax."""
from dm_jax.double_margin import (Margins, dm_regularizer, double_margin, folded_margins,
                                  split_cross_entropy)
from dm_jax.errors import UnsupportedPrimitiveError
from dm_jax.input_sets import make_input_set
from dm_jax.interval import Bounds, interval_bounds
from dm_jax.models import ARCHITECTURES, get_model

__all__ = [
    "ARCHITECTURES", "Bounds", "Margins", "UnsupportedPrimitiveError", "dm_regularizer",
    "double_margin", "folded_margins", "get_model", "interval_bounds", "make_input_set", "split_cross_entropy",
]
__version__ = "0.1.0"
