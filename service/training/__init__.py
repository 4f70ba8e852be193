"""Training the default ALIT model on CPU (stage 1 VQGAN, stage 2 latent distillation, stage 3
decoder fine-tune) and evaluating any model per iteration. Needs scikit-image and scikit-learn for
their bundled sample images (training data only).

Two commands, wired as `alit-serve train|evaluate` and `python -m service.training train|evaluate`:

    python -m service.training train [--run runs/default] [--export weights] ...
    python -m service.training evaluate DIR [--model weights] [--out OUT] [--checks]
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "evaluate"):
        print("usage: python -m service.training {train,evaluate} ...  (-h after a command for its options)",
              file=sys.stderr)
        return 2
    if argv[0] == "train":
        from .train import main as command
    else:
        from .evaluate import main as command
    return command(argv[1:])


__all__ = ["main"]
