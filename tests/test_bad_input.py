"""Bad input gets a package exception (also the matching builtin), and a failed create leaves nothing.

Each case here raised a builtin exception from deep inside before (OverflowError, AttributeError,
TypeError, ValueError from the core) or left a directory behind that blocked a retry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaycache import LocalStore, Volume
from overlaycache.errors import InvalidArgumentError, InvalidBufferError, OutOfRangeError, OverlayCacheError
from overlaycache.local import layers as layers_mod

RS = 4096
SIZE = 8 * RS


@pytest.fixture
def vol(tmp_path: Path) -> Any:
    with Volume.create(tmp_path / "v", SIZE, region_size=RS) as v:
        yield v


def _readonly_buffer() -> memoryview:
    return memoryview(bytes(16))


def _strided_buffer() -> memoryview:
    return memoryview(bytearray(32))[::2]


BAD_CALLS: dict[str, tuple[Callable[[Any], object], type[Exception], type[Exception]]] = {
    "open(None)": (lambda v: Volume.open(None), InvalidArgumentError, ValueError),  # type: ignore[arg-type]
    "open(3)": (lambda v: Volume.open(3), InvalidArgumentError, ValueError),  # type: ignore[arg-type]
    "open_clone(None)": (lambda v: v.open_clone(None), InvalidArgumentError, ValueError),
    "mark_unavailable(None)": (lambda v: v.mark_unavailable(None), InvalidArgumentError, ValueError),
    "mark_unavailable('12')": (lambda v: v.mark_unavailable("12"), InvalidArgumentError, ValueError),
    "mark_unavailable([1.5])": (lambda v: v.mark_unavailable([1.5]), InvalidArgumentError, ValueError),
    "scrub(progress=1)": (lambda v: v.scrub(progress=1), InvalidArgumentError, ValueError),
    "readinto(2**64)": (lambda v: v.readinto(2**64, bytearray(8)), OutOfRangeError, ValueError),
    "readinto(-1)": (lambda v: v.readinto(-1, bytearray(8)), OutOfRangeError, ValueError),
    "readinto(1.0)": (lambda v: v.readinto(1.0, bytearray(8)), InvalidArgumentError, ValueError),
    "readinto(read-only)": (lambda v: v.readinto(0, _readonly_buffer()), InvalidBufferError, TypeError),
    "readinto(strided)": (lambda v: v.readinto(0, _strided_buffer()), InvalidBufferError, TypeError),
    "readinto(str)": (lambda v: v.readinto(0, "abc"), InvalidBufferError, TypeError),
    "read(2**64, 1)": (lambda v: v.read(2**64, 1), OutOfRangeError, ValueError),
    "write(2**64, b'x')": (lambda v: v.write(2**64, b"x"), OutOfRangeError, ValueError),
    "write(0, 'text')": (lambda v: v.write(0, "text"), InvalidBufferError, TypeError),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_calls_raise_package_errors(vol: Any, name: str) -> None:
    call, error, builtin = BAD_CALLS[name]
    with pytest.raises(error) as info:
        call(vol)
    assert isinstance(info.value, builtin) and isinstance(info.value, OverlayCacheError)
    assert vol.read(0, 4) == bytes(4)  # the volume is fine afterwards


@settings(max_examples=60, deadline=None)
@given(offset=st.one_of(st.integers(-(2**80), 2**80), st.floats(), st.none(), st.booleans(), st.text(max_size=3)),
       length=st.one_of(st.integers(-(2**80), 2**80), st.none(), st.booleans()))
def test_any_offset_and_length_give_data_or_a_package_error(tmp_path_factory: pytest.TempPathFactory,
                                                             offset: Any, length: Any) -> None:
    path = tmp_path_factory.mktemp("prop") / "v"
    with Volume.create(path, SIZE, region_size=RS) as v:
        for call in (lambda: v.read(offset, length), lambda: v.readinto(offset, bytearray(16)),
                     lambda: v.write(offset, b"abc")):
            try:
                call()
            except OverlayCacheError:
                pass


@pytest.mark.parametrize(("size", "extra"), [(2**70, {}), (0, {}), (-1, {}), (1.5, {}), (SIZE, {"secondary": "x"}),
                                             (SIZE, {"region_size": 3000}), (SIZE, {"replication": "async"})])
def test_failed_create_leaves_nothing(tmp_path: Path, size: Any, extra: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        Volume.create(tmp_path / "v", size, **extra)
    assert os.listdir(tmp_path) == []
    with Volume.create(tmp_path / "v", SIZE) as v:  # a retry works as is
        assert v.size == SIZE


def test_file_too_large_is_a_package_error_naming_the_path(tmp_path: Path) -> None:
    huge = 1 << 59  # sparse files this large exceed ext4's and most file systems' limits
    try:
        with Volume.create(tmp_path / "v", huge):
            pytest.skip("this file system holds the files of a 512 PiB volume")
    except InvalidArgumentError as exc:
        assert str(tmp_path / "v") in str(exc)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_interrupted_create_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           interrupt: type[BaseException]) -> None:
    def boom(*args: object) -> None:
        raise interrupt("interrupted")

    monkeypatch.setattr(layers_mod.Overlay, "create", staticmethod(boom))
    with pytest.raises(interrupt):
        Volume.create(tmp_path / "v", SIZE)
    assert os.listdir(tmp_path) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(interrupt):
        Volume.create(tmp_path / "empty", SIZE)
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(tmp_path / "empty") == []


def test_create_whose_open_fails_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_open(cls: type[Volume], path: str, **kwargs: object) -> Volume:
        raise KeyboardInterrupt

    monkeypatch.setattr(Volume, "open", classmethod(failing_open))
    with pytest.raises(KeyboardInterrupt):
        Volume.create(tmp_path / "v", SIZE)
    assert os.listdir(tmp_path) == []


def test_create_refuses_a_non_empty_directory_and_leaves_it_alone(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "precious").write_bytes(b"keep")
    with pytest.raises(InvalidArgumentError):
        Volume.create(tmp_path / "v", SIZE)
    assert os.listdir(tmp_path / "v") == ["precious"]


@pytest.mark.parametrize("prefix", ["../x", "a/../../b", "./a", "a//b", 3])
def test_local_store_prefix_cannot_leave_its_root(tmp_path: Path, prefix: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        LocalStore(tmp_path / "root", prefix=prefix)
    assert sorted(os.listdir(tmp_path)) in ([], ["root"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()


def test_volume_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with Volume.create(tmp_path / "v", SIZE, region_size=RS) as vol:
            vol.write(0, b"secret")
            vol.local_snapshot()
            vol.flush()
            with vol.image("1") as img, img.clone(tmp_path / "c") as clone:
                clone.write(0, b"x")
                clone.flush()
    finally:
        os.umask(old)
    for top in ("v", "c"):
        assert (tmp_path / top).stat().st_mode & 0o077 == 0, top
        for entry in (tmp_path / top).iterdir():
            assert entry.stat().st_mode & 0o077 == 0, entry
