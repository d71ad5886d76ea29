"""Secondary object stores: one protocol, an S3 implementation and a local-directory one."""

from overlaycache.store.base import ObjectStore
from overlaycache.store.local import LocalStore
from overlaycache.store.s3 import S3Store, translate_boto_error

__all__ = ["LocalStore", "ObjectStore", "S3Store", "translate_boto_error"]
