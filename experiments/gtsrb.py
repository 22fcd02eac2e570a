"""GTSRB: Double Margin (or any method) on the pure-conv CNN (43 classes), then certify.

    python -m experiments.gtsrb                      # eps_train 8/255, 100 epochs

Defaults: pureconv, batch 50 (choice, as CIFAR), Adam 5e-4; the paper gives no
schedule for GTSRB, so MNIST's step boundaries are used (choice, see
dm_jax/train/schedules.py); no normalisation or augmentation (choice). Certified on eps
0, .5, 1, 2, 3, 5, 7, 8, 9 (/255).
"""
from absl import app

from experiments import common, defaults

DEFAULTS = defaults.GTSRB


def main(argv):
  common.main(argv, DEFAULTS)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
