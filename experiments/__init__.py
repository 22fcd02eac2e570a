"""Experiment entry points: ``python -m experiments.mnist|cifar10|gtsrb`` (absl flags)."""
