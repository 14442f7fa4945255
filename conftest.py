"""pytest setup for the repository root: collect it as a plain folder, not as a Python package."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


class _RootIsAFolder:
    """The root's __init__.py is ComfyUI's entry point, importable only as a pack (relative imports) and under
    any folder name; pytest would import it as a test package. The directory hook is asked by the parent
    folder's plugins, which a conftest here is not, hence a plugin registered for the whole session."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector) -> pytest.Collector | None:
        return pytest.Dir.from_parent(parent, path=path) if path == ROOT else None


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_RootIsAFolder(), "rectifid-root-is-a-folder")
