"""Evidence and plugin: registry, verdicts, the evidence report, stages, quarantine, the pytest plugin.

Kept import-free: importing a module of this package must not import torch
before :func:`harness.models.determinism.pin` has run."""
