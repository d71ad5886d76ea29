"""The core implementations under test: the compiled core (required in CI) and the pure-Python one.

Parametrize core tests over `IMPLEMENTATIONS`. The compiled core is left out when it is not built,
unless ``OVERLAYCACHE_REQUIRE_EXTENSIONS`` is set, which makes its absence an ImportError here.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Protocol

__all__ = ["IMPLEMENTATIONS", "use_core"]


class _Patcher(Protocol):
    def setattr(self, target: object, name: str, value: object) -> None: ...


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


def use_core(patcher: _Patcher, mod: ModuleType) -> None:
    """Put the core ``mod`` behind every loaded module of the package (``patcher`` is a pytest
    ``MonkeyPatch``, which undoes it): each module names the core chosen in ``_impl`` as ``core``."""
    from overlaycache import _impl

    default = _impl.core
    for name, module in list(sys.modules.items()):
        if name.startswith("overlaycache.") and getattr(module, "core", None) is default:
            patcher.setattr(module, "core", mod)
