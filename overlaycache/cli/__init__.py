"""The ``overlaycache`` command line: one module per subcommand.

Each module has ``register(subparsers)``, which adds its parser and sets ``run``, the handler that
takes the parsed arguments and returns the exit status. Errors of the package become one line on
stderr (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from overlaycache import __version__
from overlaycache.cli import (
    check,
    check_bucket,
    clone,
    collapse,
    convert,
    create,
    demo,
    diff,
    export,
    failover,
    hydrate,
    import_,
    info,
    merge_down,
    replicate,
    restore,
    scrub,
    serve_nbd,
    snapshot,
    snapshots,
    status,
)
from overlaycache.cli._common import ENV_LOG_LEVEL, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, parse_size
from overlaycache.errors import OverlayCacheError

__all__ = ["COMMANDS", "build_parser", "main", "parse_size"]

#: The subcommands, in the order ``--help`` lists them: a volume's life cycle.
COMMANDS = (create, info, status, snapshot, snapshots, replicate, scrub, failover, hydrate, diff, restore,
            clone, merge_down, import_, export, serve_nbd, check, check_bucket, collapse, convert, demo)

_EPILOG = """\
exit status: 0 success, 1 error (one line on stderr; --debug shows the traceback), 2 usage error,
3 a check or scrub found damage, 130 interrupted.

environment: OVERLAYCACHE_STORE, OVERLAYCACHE_ENDPOINT_URL, OVERLAYCACHE_PROFILE (defaults of
--store, --endpoint-url, --profile), OVERLAYCACHE_REGION_SIZE (of create --region-size),
OVERLAYCACHE_LOG_LEVEL (of --log-level); S3 credentials come from boto3's standard chain
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the shared files, --profile), never from a URL or a volume.
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    p = argparse.ArgumentParser(
        prog="overlaycache", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Keep a block volume available when parts of it fail: local overlays, point-in-time "
                    "history on an S3-compatible secondary.")
    p.add_argument("--version", action="version", version=f"overlaycache {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    p.add_argument("--log-level", default=os.environ.get(ENV_LOG_LEVEL),
                   choices=["debug", "info", "warning", "error", "critical"], help="the log level (default: warning)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return p


def _log_level(args: argparse.Namespace) -> int:
    if args.log_level:
        return int(getattr(logging, args.log_level.upper()))
    if args.verbose:
        return logging.DEBUG if args.verbose > 1 else logging.INFO
    return logging.CRITICAL if args.command == "demo" else logging.WARNING  # the demo narrates itself


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``overlaycache`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=_log_level(args), format="overlaycache: %(levelname)s: %(message)s")
    try:
        status: int = args.run(args)
        return status
    except KeyboardInterrupt:
        print("overlaycache: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # pragma: no cover - output piped into head
        return EXIT_OK
    except (OverlayCacheError, OSError) as exc:
        if args.debug:
            raise
        if isinstance(exc, OverlayCacheError):
            print(f"overlaycache: error: {exc}", file=sys.stderr)
        else:
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            print(f"overlaycache: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
