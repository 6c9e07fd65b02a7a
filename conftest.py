"""Root conftest: only loads the suite's pytest plugin (see harness/pytest_plugin.py)."""

pytest_plugins = ["harness.pytest_plugin"]
