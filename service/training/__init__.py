"""Training the default ALIT model on CPU (stage 1 VQGAN, stage 2 latent distillation, stage 3
decoder fine-tune) and evaluating any model per iteration. Needs scikit-image and scikit-learn for
their bundled sample images (training data only)."""

from .cli import evaluate_main, main, train_main

__all__ = ["main", "train_main", "evaluate_main"]
