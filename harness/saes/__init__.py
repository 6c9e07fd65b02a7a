"""SAEs: where a subject's SAEs come from, their training, feature usage, specialists, synthetic recovery.

Kept import-free: importing a module of this package must not import torch
before :func:`harness.models.determinism.pin` has run."""
