"""Harnesses shared by the test suites (``tests/``, ``localstack/``) and by anyone testing a store
or a deployment: the store contract, fault scenarios and state-machine models."""
