"""The one place that chooses the core implementation.

``OVERLAYCACHE_PURE_PYTHON=1`` forces the pure-Python reference; ``OVERLAYCACHE_REQUIRE_EXTENSIONS=1``
makes a missing compiled core an ImportError instead of a silent fallback.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import TYPE_CHECKING

_log = logging.getLogger(__name__)


def _choose() -> ModuleType:
    if os.environ.get("OVERLAYCACHE_PURE_PYTHON", "") not in ("", "0"):
        from overlaycache import _core_py

        return _core_py
    try:
        from overlaycache import _core

        return _core  # type: ignore[return-value,unused-ignore]
    except ImportError:
        if os.environ.get("OVERLAYCACHE_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
        _log.warning("overlaycache: compiled core not available, using the pure-Python reference")
        from overlaycache import _core_py

        return _core_py


if TYPE_CHECKING:
    # Both implementations have the API of the stub ``_core.pyi``, which mypy checks every use against.
    from overlaycache import _core as core
else:
    core = _choose()

__all__ = ["core"]
