"""Shared test set-up: real servers on loopback come from the fixture plugins below."""
pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.prometheus", "tests.fixtures.ray_cluster"]
