"""Command line of the training package: `train` and `evaluate` (wired as `alit-serve train|evaluate`).

    python -m service.training train [--run runs/default] [--export weights] ...
    python -m service.training evaluate DIR [--model weights] [--out OUT] [--checks]
"""

from __future__ import annotations

import sys


def train_main(argv: list[str] | None = None) -> int:
    from .pipeline import main

    return main(argv)


def evaluate_main(argv: list[str] | None = None) -> int:
    from .evaluate import main

    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "evaluate"):
        print("usage: python -m service.training {train,evaluate} ...  (-h after a command for its options)",
              file=sys.stderr)
        return 2
    return (train_main if argv[0] == "train" else evaluate_main)(argv[1:])
