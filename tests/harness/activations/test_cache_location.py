"""Where the content cache lives: the user's cache directory (platformdirs, so
``$XDG_CACHE_HOME`` on Linux) unless ``--cache-dir`` says otherwise; the plugin and
``python -m harness.build`` share the one default (harness.activations.cache.default_cache_dir)."""

from __future__ import annotations

import sys
from pathlib import Path

import platformdirs
import pytest

from harness.activations.cache import default_cache_dir
from harness.build import build_parser
from tests.standins import H1_REGISTRY

pytest_plugins = ["pytester"]

REGISTRY = H1_REGISTRY

WHERE = """
from pathlib import Path

def test_where(run_state, content_cache):
    assert run_state.cache_dir == Path({expected!r})
    assert content_cache.root == run_state.cache_dir
"""

QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))
    return path


def _project(pytester: pytest.Pytester, expected: Path) -> None:
    pytester.makeini("[pytest]\n")
    (pytester.path / "fixtures").mkdir()
    (pytester.path / "fixtures" / "claims.yaml").write_text(REGISTRY, encoding="utf-8")
    pytester.makeconftest('pytest_plugins = ["harness.evidence.plugin"]\n')
    pytester.makepyfile(test_where=WHERE.format(expected=str(expected)))


def test_default_is_the_users_cache_directory(xdg: Path) -> None:
    expected = Path(platformdirs.user_cache_dir("interp-claims", appauthor=False))
    assert default_cache_dir() == expected
    if sys.platform.startswith("linux"):
        assert expected == xdg / "interp-claims"


def test_the_plugin_defaults_to_it(pytester: pytest.Pytester, xdg: Path) -> None:
    expected = default_cache_dir()
    assert pytester.path not in expected.parents  # no longer under the project root
    _project(pytester, expected)
    pytester.runpytest(*QUIET, f"--evidence-dir={pytester.path / 'ev'}").assert_outcomes(passed=1)


def test_cache_dir_overrides_it(pytester: pytest.Pytester, xdg: Path) -> None:
    # relative to where pytest was invoked, like every path option
    _project(pytester, pytester.path / "mine" / "cache")
    pytester.runpytest(*QUIET, f"--evidence-dir={pytester.path / 'ev'}",
                       "--cache-dir=mine/cache").assert_outcomes(passed=1)


def test_build_uses_the_same_default(xdg: Path, tmp_path: Path) -> None:
    assert build_parser().parse_args(["saes"]).cache_dir == default_cache_dir()
    other = tmp_path / "elsewhere"
    assert build_parser().parse_args(["corpus", f"--cache-dir={other}"]).cache_dir == other
