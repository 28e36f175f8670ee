"""The local Ray cluster of the distributed tests: a head without CPUs (so every task runs
on a worker) and two one-CPU worker nodes, all on this machine."""
from __future__ import annotations

from ray.cluster_utils import Cluster

STORE = 80 * 1024**2     # the smallest object store Ray accepts, per node


def start() -> tuple[Cluster, list]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": STORE,
                                                            "include_dashboard": False})
    workers = [add_worker(cluster) for _ in range(2)]
    cluster.wait_for_nodes()
    return cluster, workers


def add_worker(cluster: Cluster):
    return cluster.add_node(num_cpus=1, object_store_memory=STORE)
