"""Training methods (losses and regularizers) of the DoubleMargin paper and its baselines."""
from dm_jax.methods.attacks import pgd_attack, trades_attack
from dm_jax.methods.base import (DEFAULT_L1, DEFAULT_L2, METHODS, Hyper, Method, accuracy,
                                 cross_entropy, get_method, margin_certified,
                                 worst_case_logits)
from dm_jax.methods.penalties import apply_masks, l1_penalty, l2_penalty, prune_small_weights
