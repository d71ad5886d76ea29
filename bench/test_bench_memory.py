"""Memory for tracking regions: bitmaps and checksum tables kept in memory, per region.

DESIGN.md section 7 asks for at most 4 bits per region for the base and the first overlay, and 2
bits for each further one. This measures the bitmaps the open read volume keeps (two overlays over
the base) from their sizes, and projects them to a 1 TiB volume of 64 KiB regions (16M regions). Nothing is timed that matters; the numbers
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
    """Bytes of per-region state in memory, per layer and per region (the checksums and slots
    live in the layers' files, read through the page cache, and are not counted)."""
    n = vol.num_regions
    stack = vol._layers
    layers: list[dict[str, Any]] = [{"layer": "live", "bitmaps": {"verified": _bitmap_bytes(stack.verified)}}]
    for ov in stack.overlays:
        bitmaps = {"present": _bitmap_bytes(ov.present)}
        layers.append({"layer": ov.name, "regions_held": ov.present.count(), "bitmaps": bitmaps})
    total = 0
    for layer in layers:
        bm = sum(layer["bitmaps"].values())
        layer["bits_per_region"] = round(8 * bm / n, 3)
        total += bm
    per_overlay = max(layer["bits_per_region"] for layer in layers[1:])
    return {
        "num_regions": n,
        "overlays": len(stack.overlays),
        "layers": layers,
        "total_bytes": total,
        "bits_per_region": round(8 * total / n, 3),
        "design_bits_base_and_first_overlay": 4,
        "design_bits_per_further_overlay": 2,
        "overlay_bits_per_region": per_overlay,
        "tib_64KiB_regions": TIB_REGIONS,
        "tib_bytes": int(TIB_REGIONS * total / n),
    }


def test_tracking_memory(benchmark: Any, read_image: ReadImage, ro_volume: Volume) -> None:
    """Per-region memory of the read volume's bitmaps and checksum tables."""
    record(benchmark, "tracking_memory", "info", "sizes", note="bits per region in memory")
    info = benchmark.pedantic(tracking_memory, args=(ro_volume,), rounds=1)
    benchmark.extra_info["memory"] = info
    assert info["num_regions"] == read_image.size // read_image.region_size
    assert info["num_regions"] > 0 and info["bits_per_region"] > 0
