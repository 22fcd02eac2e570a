"""Training: the loop (:mod:`dm_jax.train.loop`), the step schedules, checkpoints and the
registered training methods (:mod:`dm_jax.train.methods`).

``dm_jax.train.train(config, dataset)`` and the loop's public names are importable from
here.
"""
from dm_jax.train.loop import (Evaluator, TrainConfig, TrainState, ada_kappa, build_model,
                               canonical_method, create_train_state, default_workdir,
                               get_model, hyper_value, load_config, load_params,
                               make_apply_fn, make_optimizer, make_train_step, train,
                               training_loss)

__all__ = [
    "Evaluator", "TrainConfig", "TrainState", "ada_kappa", "build_model", "canonical_method",
    "create_train_state", "default_workdir", "get_model", "hyper_value", "load_config",
    "load_params", "make_apply_fn", "make_optimizer", "make_train_step", "train",
    "training_loss",
]
