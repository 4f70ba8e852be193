"""Training the default ALIT model on CPU or a GPU (stage 1 VQGAN, stage 2 latent distillation, stage 3
decoder fine-tune) and evaluating any model per iteration. Needs scikit-image and scikit-learn for
their bundled sample images (training data only).

Commands, wired as `alit-serve train|gpu-job|evaluate` and `python -m service.training ...`:

    python -m service.training train [--run runs/default] [--export service/weights] ...
    python -m service.training gpu-job [--budget-minutes 10] [--corpus runs/corpus]  (any device; train.py)
    python -m service.training evaluate DIR [--model service/weights] [--out OUT] [--checks]
    python -m service.training corpus [--out runs/corpus] [--packages ...] [--skip-missing]  (corpus.py)
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _command(name: str) -> Callable[[list[str]], int]:
    """The `main(argv)` of a subcommand, imported only when it runs."""
    main: Callable[[list[str]], int]
    if name == "train":
        from .train import main
    elif name == "gpu-job":
        from .train import gpu_job_main as main
    elif name == "corpus":
        from .corpus import main
    else:
        from .evaluate import main
    return main


COMMANDS = ("train", "gpu-job", "evaluate", "corpus")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m service.training {{{','.join(COMMANDS)}}} ...  (-h after a command for its options)",
              file=sys.stderr)
        return 2
    return _command(argv[0])(argv[1:])


__all__ = ["main"]
