"""``overlaycache check-bucket --store s3://...``: is history safe from the primary's credentials?"""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import EXIT_DAMAGE, add_json, add_store_options, emit, open_store_from
from overlaycache.errors import InvalidArgumentError


def register(sub: Any) -> None:
    p = sub.add_parser("check-bucket", help="check that the S3 bucket keeps history from the primary (Object Lock)",
                       description="Report the bucket's versioning, Object Lock and retention, and what is missing "
                                   "for PITs to survive someone holding the primary's credentials: a versioned "
                                   "bucket with Object Lock, and objects written with a retention (open the store "
                                   "with ?object_lock=governance or compliance). "
                                   f"Exit status {EXIT_DAMAGE} when something is missing.")
    add_store_options(p, required=True)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    store = open_store_from(args)
    try:
        protection = getattr(store, "protection", None)
        if protection is None:
            raise InvalidArgumentError(f"{getattr(store, 'location', store)}: only S3 buckets have Object Lock")
        report = protection()
    finally:
        if store is not None:
            store.close()
    lines = [f"bucket       {report.location}",
             f"versioning   {report.versioning or 'off'}",
             f"object lock  {'enabled' if report.object_lock else 'not enabled'}"
             + (f", default retention {report.default_retention}" if report.default_retention else ""),
             f"this store   writes {'with retention ' + report.store_retention if report.store_retention else 'without retention'}"]
    lines += [f"MISSING      {p}" for p in report.problems] or ["ok: a holder of the primary's credentials cannot "
                                                               "delete a version before its retention ends"]
    emit(args, report.to_json(), lines)
    return 0 if report.ok else EXIT_DAMAGE
