"""The core implementations under test: the compiled core (required in CI) and the pure-Python one."""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def _implementations() -> list[ModuleType]:
    mods = [importlib.import_module("overlaycache._core_py")]
    try:
        mods.insert(0, importlib.import_module("overlaycache._core"))
    except ImportError:
        if os.environ.get("OVERLAYCACHE_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
    return mods


IMPLEMENTATIONS = _implementations()
