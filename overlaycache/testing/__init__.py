"""Harnesses shared by the test suites (``tests/``, ``localstack/``) and by anyone testing a store
or a deployment, imported as modules of this package:

- :mod:`~overlaycache.testing.store_contract`: the behaviour every ObjectStore must have, as a
  pytest class to subclass;
- :mod:`~overlaycache.testing.faults`: the secondary killed under a distributed overlay, as
  scenarios run against any server that can be stopped and started;
- :mod:`~overlaycache.testing.stores`: store wrappers that count region requests or go offline;
- :mod:`~overlaycache.testing.servers`: endpoints and readiness of the real S3 servers that
  ``localstack/start.sh`` runs;
- :mod:`~overlaycache.testing.patterns`: random writes mirrored in a model, one character per region;
- :mod:`~overlaycache.testing.cores`: the core implementations to parametrize over;
- :mod:`~overlaycache.testing.golden`: the builders of the golden volumes in ``tests/golden/``;
- :mod:`~overlaycache.testing.kill`: run a child program and SIGKILL it once it is ready (crash tests).

``import overlaycache`` never imports this package, and this file imports none of its modules:
some of them import pytest, which is a test dependency only.
"""
