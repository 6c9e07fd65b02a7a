"""Root conftest: only loads the suite's pytest plugin (see harness/evidence/plugin.py)."""

pytest_plugins = ["harness.evidence.plugin"]
