"""A real two-node Ray cluster on this machine (127.0.0.1), for the tests of this folder."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from search.driver.local_cluster import LocalCluster, local_cluster

#: A driver of its own that holds one CPU of a node with an actor until its stdin closes.
_HOLD = """
import sys, ray, ray._private.ray_constants as c
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
c.ENABLE_RAY_CLUSTER = False
ray.init(address=sys.argv[1], logging_level="ERROR")

@ray.remote(num_cpus=1)
class Hold:
    def ready(self):
        return True

hold = Hold.options(scheduling_strategy=NodeAffinitySchedulingStrategy(sys.argv[2], soft=False)).remote()
ray.get(hold.ready.remote())
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def two_node_cluster():
    with local_cluster(nodes=2, cpus_per_node=1) as cluster:
        yield cluster


class HeldCPU:
    """One CPU of a node taken by another driver's actor; :meth:`release` ends that driver, so
    Ray frees the CPU (the actor dies with its driver)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    def release(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)


@contextlib.contextmanager
def _cpu_held_on(cluster: LocalCluster, node_name: str) -> Iterator[HeldCPU]:
    """Hold the one CPU of ``node_name`` ('head', 'worker1') until :meth:`HeldCPU.release` or the block ends.

    Ray places a task or an actor on any node with a free CPU, and Tune hands a pending trial
    to whichever trial actor is free first: a test that needs work on a given node holds the
    others.
    """
    node_id = next(node for node, name in cluster.node_ids().items() if name == node_name)
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLD, cluster.address, node_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=cluster.env,
        text=True,
    )
    held = HeldCPU(process)
    try:
        line = process.stdout.readline()
        if line.strip() != "held":
            raise RuntimeError(f"could not hold a CPU of {node_name} (exit {process.poll()})")
        yield held
    finally:
        held.release()


@pytest.fixture
def cpu_held_on():
    """``with cpu_held_on(cluster, "head") as held: ...``: see :func:`_cpu_held_on`."""
    return _cpu_held_on
