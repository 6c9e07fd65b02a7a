"""Subjects and models: what a claim runs on, how it loads, planted controls, the size ladder, pinned float math.

Kept import-free: importing a module of this package must not import torch
before :func:`harness.models.determinism.pin` has run."""
