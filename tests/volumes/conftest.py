"""The volumes' tests use ``pool_home`` (tests/conftest.py): volumes live in the pool."""
