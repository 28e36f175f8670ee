from __future__ import annotations

import pytest
import ray
from local_cluster import start


@pytest.fixture(scope="session")
def cluster():
    """The local cluster (local_cluster.py), started once for every test that needs it
    (~20 s on a busy 2-core machine); a test that removes a worker node adds one back."""
    cluster, workers = start()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
