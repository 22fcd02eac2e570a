"""MNIST: Double Margin (or any method) on the small CNN, then certify.

    python -m experiments.mnist --eps=0.3            # paper setting, 100 epochs
    python -m experiments.mnist --method=ibp --eps=0.3
    python -m experiments.mnist --epochs=1 --max_train_examples=500 --num_cert_points=20

Defaults (SPEC.md): small CNN, batch 100, Adam 5e-4 (x0.1 after steps 15000, 25000),
eps 0 for 2000 steps then a linear ramp to eps_train at 12000 (lambda and kappa on the
same ramp), 100 epochs; certification with CNN-Cert-ReLU (fastlin) and IBP on 200 random
test points over eps 0, .01, .03, .05, .07, .1, .2, .3, .4.
"""
from absl import app

from experiments import common

GRID = (0.0, 0.01, 0.03, 0.05, 0.07, 0.1, 0.2, 0.3, 0.4)
DEFAULTS = common.DatasetDefaults(
    dataset="mnist", arch="small", eps=0.3, epochs=100, batch_size=100, lr=5e-4,
    eps_grid=GRID, eps_grid_label=tuple(f"{e:g}" for e in GRID))


def main(argv):
  common.main(argv, DEFAULTS)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
