"""Activations and cache: capture at hooks, the one corpus pass, the harvest, streaming top-k, the content cache.

Kept import-free: importing a module of this package must not import torch
before :func:`harness.models.determinism.pin` has run."""
