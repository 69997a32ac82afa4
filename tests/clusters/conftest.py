"""A real two-node Ray cluster on this machine (127.0.0.1), for the tests of this folder."""

from __future__ import annotations

import pytest

from search.local_cluster import local_cluster


@pytest.fixture(scope="module")
def two_node_cluster():
    with local_cluster(nodes=2, cpus_per_node=1) as cluster:
        yield cluster
