"""Fixtures every test module can take by name."""

from tests.ray_cluster import ray_cluster  # noqa: F401  (a real two-node Ray cluster, started on first use)
