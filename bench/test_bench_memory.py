"""Memory for tracking regions: bitmaps and checksum tables kept in memory, per region.

DESIGN.md section 7 asks for at most 2 bits + 16 bytes of checksum per region. This measures the
structures the open read volume keeps (two overlays over the base) from their sizes, and projects
them to a 1 TiB volume of 64 KiB regions (16M regions). Nothing is timed that matters; the numbers
travel in ``extra_info`` to report.py.
"""

from __future__ import annotations

import sys
from typing import Any

from _support import ReadImage, record
from overlaycache import Volume

TIB_REGIONS = (1 << 40) // (64 << 10)


def _bitmap_bytes(bm: Any) -> int:
    return 8 * max(int(bm.nwords), 1)


def tracking_memory(vol: Volume) -> dict[str, Any]:
    """Bytes of per-region state in memory, per layer and per region."""
    n = vol.num_regions
    layers: list[dict[str, Any]] = []
    base = vol._layers.base
    assert base is not None
    layers.append({
        "layer": "base",
        "bitmaps": {"verified": _bitmap_bytes(base.verified)},
        "sums": sys.getsizeof(base.sums),
    })
    for ov in vol._layers.overlays:
        layers.append({
            "layer": ov.name,
            "regions_held": ov.present.count(),
            "bitmaps": {
                name: _bitmap_bytes(getattr(ov, name)) for name in ("present", "which", "dirty", "verified")
            },
            "sums": sys.getsizeof(ov.sums),
        })
    total = 0
    for layer in layers:
        bm = sum(layer["bitmaps"].values())
        layer["bitmap_bits_per_region"] = round(8 * bm / n, 3)
        layer["sum_bytes_per_region"] = round(layer["sums"] / n, 3)
        layer["bytes_per_region"] = round((bm + layer["sums"]) / n, 3)
        total += bm + layer["sums"]
    per_base = layers[0]["bytes_per_region"]
    per_overlay = max(layer["bytes_per_region"] for layer in layers[1:])
    return {
        "num_regions": n,
        "overlays": len(vol._layers.overlays),
        "layers": layers,
        "total_bytes": total,
        "bytes_per_region": round(total / n, 3),
        "design_bytes_per_region": 2 / 8 + 16,
        "base_bytes_per_region": per_base,
        "overlay_bytes_per_region": per_overlay,
        "tib_64KiB_regions": TIB_REGIONS,
        "tib_bytes_2_overlays": int(TIB_REGIONS * (per_base + 2 * per_overlay)),
        "tib_bytes_per_extra_overlay": int(TIB_REGIONS * per_overlay),
    }


def test_tracking_memory(benchmark: Any, read_image: ReadImage, ro_volume: Volume) -> None:
    """Per-region memory of the read volume's bitmaps and checksum tables."""
    record(benchmark, "tracking_memory", "info", "sizes", note="bytes per region in memory")
    info = benchmark.pedantic(tracking_memory, args=(ro_volume,), rounds=1)
    benchmark.extra_info["memory"] = info
    assert info["num_regions"] == read_image.size // read_image.region_size
    assert info["bytes_per_region"] > 16
