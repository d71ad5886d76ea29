"""The core implementations under test: the compiled core (required in CI) and the pure-Python one.

Parametrize core tests over `IMPLEMENTATIONS`. The compiled core is left out when it is not built,
unless ``OVERLAYCACHE_REQUIRE_EXTENSIONS`` is set, which makes its absence an ImportError here.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["IMPLEMENTATIONS"]


def _implementations() -> list[ModuleType]:
    mods = [importlib.import_module("overlaycache._core_py")]
    try:
        mods.insert(0, importlib.import_module("overlaycache._core"))
    except ImportError:
        if os.environ.get("OVERLAYCACHE_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
    return mods


#: The compiled core first (when available), then the pure-Python reference.
IMPLEMENTATIONS: list[ModuleType] = _implementations()
