"""Shared fixtures: the core implementations to test, and volumes in temporary directories."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def _implementations() -> list[ModuleType]:
    mods = [importlib.import_module("overlaycache._core_py")]
    try:
        mods.insert(0, importlib.import_module("overlaycache._core"))
    except ImportError:
        if os.environ.get("OVERLAYCACHE_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
    return mods


IMPLEMENTATIONS = _implementations()


@pytest.fixture(params=IMPLEMENTATIONS, ids=[m.IMPLEMENTATION for m in IMPLEMENTATIONS])
def core(request: pytest.FixtureRequest) -> ModuleType:
    """Each core implementation in turn (compiled and pure Python)."""
    return request.param  # type: ignore[no-any-return]
