"""Secondary object stores: one key-value protocol, an S3 backend, a local-directory one, and a
registry that opens a store from a URL."""

from overlaycache.store.base import ObjectStore
from overlaycache.store.local import LocalStore
from overlaycache.store.registry import open_store, register_store
from overlaycache.store.s3 import S3Store, translate_boto_error

__all__ = ["LocalStore", "ObjectStore", "S3Store", "open_store", "register_store", "translate_boto_error"]
