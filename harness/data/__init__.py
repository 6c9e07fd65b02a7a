"""Data: the background corpus, the categorised texts, the hook-math prompts.

Kept import-free: importing a module of this package must not import torch
before :func:`harness.models.determinism.pin` has run."""
