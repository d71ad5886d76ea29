"""What the subcommands share: sizes, the store options, opening a volume, output and progress.

Exit statuses (documented in ``overlaycache --help``): 0 success; 1 an error (one line on stderr,
the traceback only with ``--debug``); 2 a usage error; 3 a check or scrub found damage; 130
interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import Any

from overlaycache.errors import InvalidArgumentError
from overlaycache.store.base import ObjectStore

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DAMAGE = 3
EXIT_INTERRUPTED = 130

#: Environment variables for defaults; a command-line option wins over its variable.
ENV_STORE = "OVERLAYCACHE_STORE"
ENV_ENDPOINT = "OVERLAYCACHE_ENDPOINT_URL"
ENV_PROFILE = "OVERLAYCACHE_PROFILE"
ENV_REGION_SIZE = "OVERLAYCACHE_REGION_SIZE"
ENV_LOG_LEVEL = "OVERLAYCACHE_LOG_LEVEL"

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(?:i?b)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from a human size: ``4096``, ``64K``, ``10G``, ``1.5TiB``, ``512M``.

    Units are powers of 1024 (``K``, ``M``, ``G``, ``T``, ``P``, ``E``; ``KiB`` and ``KB`` alike,
    as ``qemu-img`` reads them). A fraction must come out as whole bytes.
    """
    m = _SIZE.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64K, 10G, 1.5TiB)")
    try:
        value = Decimal(m.group(1)) * _UNITS[m.group(2).lower()]
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only numbers
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from exc
    if value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes")
    return int(value)


def human(n: float) -> str:
    """``n`` bytes as a short human size (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def when(t: float) -> str:
    """A time as UTC ISO 8601."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z"


def region_list(regions: Sequence[int], limit: int = 32) -> str:
    """Regions as ranges (``0-3,7``), at most ``limit`` ranges, then how many in all."""
    from overlaycache.local.geometry import region_ranges

    return region_ranges(list(regions), limit) if regions else "none"


# -- options ----------------------------------------------------------------------------------------

STORE_HELP = (f"the secondary: s3://BUCKET/PREFIX, file:///DIR or a directory (default: ${ENV_STORE}); "
              "S3 credentials come from boto3's standard chain (environment, shared files, --profile), "
              "never from the URL or the volume")


def add_store_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    """``--store``, ``--endpoint-url`` and ``--profile``."""
    p.add_argument("--store", default=os.environ.get(ENV_STORE), metavar="URL",
                   help=STORE_HELP + (" (required)" if required else ""))
    p.add_argument("--endpoint-url", default=os.environ.get(ENV_ENDPOINT), metavar="URL",
                   help=f"the S3 endpoint, e.g. http://127.0.0.1:8333 (default: ${ENV_ENDPOINT})")
    p.add_argument("--profile", default=os.environ.get(ENV_PROFILE),
                   help=f"the AWS shared-credentials profile (default: ${ENV_PROFILE}, else boto3's own)")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def open_store_from(args: argparse.Namespace, required: bool = True) -> ObjectStore | None:
    """The store named by ``--store`` (and ``--endpoint-url``, ``--profile``); None when not
    given and not ``required``."""
    from overlaycache.store import open_store

    url = getattr(args, "store", None)
    if not url:
        if required:
            raise InvalidArgumentError(f"this command needs the secondary: give --store URL (or set ${ENV_STORE})")
        return None
    options: dict[str, Any] = {}
    endpoint = getattr(args, "endpoint_url", None)
    profile = getattr(args, "profile", None)
    if url.startswith("s3://"):
        if endpoint:
            options["endpoint_url"] = check_endpoint(endpoint)
        if profile:
            options["profile_name"] = profile
    elif endpoint or profile:
        raise InvalidArgumentError("--endpoint-url and --profile are for s3:// stores")
    return open_store(url, **options)


def check_endpoint(url: str) -> str:
    """``url`` if it is an http(s) URL; a one-line error otherwise (``127.0.0.1:8333`` has no
    scheme: botocore would take the host for one)."""
    if not re.match(r"https?://[^/\s]+", url):
        raise InvalidArgumentError(f"endpoint {url!r} is not an http:// or https:// URL "
                                   f"(did you mean http://{url}?)")
    return url


@contextmanager
def opened(args: argparse.Namespace, *, readonly: bool = False, store: str = "optional",
           **kwargs: Any) -> Iterator[Any]:
    """The volume at ``args.path``, with its secondary if ``--store`` is given (``store``:
    ``"optional"``, ``"required"`` or ``"none"``)."""
    from overlaycache.volume import Volume

    secondary = None if store == "none" else open_store_from(args, required=store == "required")
    try:
        with Volume.open(args.path, readonly=readonly, secondary=secondary if not readonly else None,
                         **kwargs) as vol:
            yield vol
    finally:
        if secondary is not None:
            secondary.close()


def where(vol: Any) -> str | None:
    """Where a volume's secondary is (its location, no credentials), or None."""
    store = vol.secondary
    return None if store is None else str(getattr(store, "location", store))


# -- output -----------------------------------------------------------------------------------------

def emit(args: argparse.Namespace, obj: Any, text: str | Sequence[str] | None = None) -> None:
    """Print ``obj`` as JSON with ``--json``, else ``text`` (lines)."""
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable))
        return
    if text is None:
        return
    print(text if isinstance(text, str) else "\n".join(text))


def _jsonable(x: Any) -> Any:
    if hasattr(x, "to_json"):
        return x.to_json()
    if isinstance(x, (set, frozenset, tuple)):
        return sorted(x) if isinstance(x, (set, frozenset)) else list(x)
    if hasattr(x, "__dict__"):
        return {k: v for k, v in vars(x).items() if not k.startswith("_")}
    return str(x)


def snapshot_json(s: Any) -> dict[str, Any]:
    """A local snapshot or a PIT as JSON."""
    out = {"id": s.id, "label": s.label, "created_at": s.created_at}
    if hasattr(s, "layer"):
        out["layer"] = s.layer
    if hasattr(s, "seq"):
        out["seq"] = s.seq
    return out


class Progress:
    """``progress(done, total)`` for the package's long jobs: a tqdm bar on a terminal, nothing
    otherwise (or with ``--json``)."""

    def __init__(self, args: argparse.Namespace, desc: str, unit: str = "region") -> None:
        self._bar: Any = None
        self.desc = desc
        self.unit = unit
        self.enabled = sys.stderr.isatty() and not getattr(args, "json", False) and not getattr(args, "quiet", False)

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, leave=False,
                             dynamic_ncols=True)
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Handler = Callable[[argparse.Namespace], int]
