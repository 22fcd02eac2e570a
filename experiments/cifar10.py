"""CIFAR-10: Double Margin (or any method) on the small CNN, then certify.

    python -m experiments.cifar10                    # eps_train 8/255, 350 epochs
    python -m experiments.cifar10 --eps=2/255

Defaults (SPEC.md): batch 50, Adam 5e-4 (x0.1 after steps 60000, 90000), eps warm-up
5000 steps and ramp to step 55000; per-channel normalisation applied INSIDE the model
function (so bounds see it and eps stays in pixel units); pad-4 random crop + horizontal
flip augmentation. Certified on eps 0, .5, 1, 2, 3, 5, 7, 8, 9 (/255).
"""
from absl import app

from experiments import common, defaults

DEFAULTS = defaults.CIFAR10


def main(argv):
  common.main(argv, DEFAULTS)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
