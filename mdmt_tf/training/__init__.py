"""Training: the bi-level trainer, MAMDR, losses, evaluation, runs, comparisons."""
