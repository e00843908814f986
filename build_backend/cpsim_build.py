"""setuptools' build backend, plus mypy in the build environment for the compiled build
(``setup.py``), which is tried unless ``CPSIM_MYPYC=0``. With ``0`` the build needs only
setuptools."""

from __future__ import annotations

import os
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the backend's other hooks, unchanged)

_MYPYC = ["mypy>=1.10"]


def _compiled() -> bool:
    return os.environ.get("CPSIM_MYPYC", "auto") != "0"


# setuptools finds build requirements by running setup.py, which for the compiled build needs
# mypyc already: ask for mypy instead (the project declares no other setup-time requirements).
def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    if _compiled():
        return list(_MYPYC)
    return list(_setuptools.get_requires_for_build_wheel(config_settings))


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    if _compiled():
        return list(_MYPYC)
    return list(_setuptools.get_requires_for_build_editable(config_settings))
