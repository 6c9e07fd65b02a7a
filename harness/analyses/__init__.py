"""Analyses: hook arithmetic (H), weight-decoded tokens (W geometry) and agreement (W).

Kept import-free: importing a module of this package must not import torch
before :func:`harness.models.determinism.pin` has run."""
