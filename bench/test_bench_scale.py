"""Costs over volume size (bench/scale.py) in the benchmark suite, at sizes that fit a short run.

``python bench/scale.py --sizes 1G,64G,1T,15T`` measures the full curve; here 1 GiB and 64 GiB are
measured so that a run of the suite shows whether a cost started to follow the volume's size (the
64 GiB row is 64x the regions of the 1 GiB one). Each step runs in a child process; the numbers
travel in ``extra_info`` (seconds, bytes, bits per region). Nothing is asserted on time.
"""

from __future__ import annotations

import tempfile
from typing import Any

import pytest

from _support import record
from scale import human, measure, parse_size


@pytest.mark.parametrize("size", ["1G", "64G"])
def test_costs_over_volume_size(benchmark: Any, size: str) -> None:
    """create, open, memory, failover (1% unavailable), reopen after kill -9, file sizes."""
    nbytes = parse_size(size)
    record(benchmark, f"scale_{size}", "info", human(nbytes), note="costs of a volume of this size")
    row = benchmark.pedantic(measure, args=(nbytes, tempfile.gettempdir(), 300.0), rounds=1)
    benchmark.extra_info["scale"] = row
    errors = {k: v for k, v in row.items() if k.endswith("_error")}
    assert not errors, errors
    assert row["regions"] == nbytes // 65536 and row["largest_file"] <= nbytes
