"""Statistics: estimates with intervals, the verdict rule, seed spreads and the reseed CLI.

Kept import-free: importing a module of this package must not import torch
before :func:`harness.models.determinism.pin` has run."""
