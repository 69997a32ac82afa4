"""A real multi-node Ray cluster on this machine, on 127.0.0.1 only (tests and benchmarks).

Each node is started with ``ray start`` in its own session (process group) with its own ports
and temp folder, so it can be killed alone (a node failure) and every process it started can be
stopped exactly, also when the caller fails::

    with local_cluster(nodes=2, cpus_per_node=1) as cluster:
        run_search(space, address=cluster.address)
        cluster.nodes[1].kill()

Run as ``python -m search.driver.local_cluster start ...`` it is Ray's own command line, except that
Ray's "which address do I have" question is answered with 127.0.0.1: Ray otherwise replaces a
loopback ``--node-ip-address`` with the machine's network address in cluster mode, and refuses a
second node when cluster mode is off.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ray._raylet import AuthenticationTokenLoader

__all__ = ["local_cluster", "LocalCluster", "LocalNode"]


# One token per process, so clusters started one after another accept the same client.
_TOKEN = secrets.token_hex(16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalNode:
    name: str
    pgid: int
    manager_port: int
    alive: bool = True

    def processes(self) -> list[int]:
        """Pids of this node's processes: its process group and every descendant of it.

        Ray starts some worker processes in sessions of their own (and renames them
        ``ray::...``), so the process group alone misses them; their parent is the node's raylet.
        """
        parents: dict[int, int] = {}
        group: set[int] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat = (entry / "stat").read_text()
                if os.getpgid(pid) == self.pgid:
                    group.add(pid)
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
            parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        found, grew = set(group), True
        while grew:
            children = {pid for pid, parent in parents.items() if parent in found} - found
            found |= children
            grew = bool(children)
        return sorted(found)

    def kill(self) -> None:
        """SIGKILL every process of this node (raylet, agents, workers; GCS on the head)."""
        if not self.alive:
            return
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.alive = False


@dataclass
class LocalCluster:
    address: str
    nodes: list[LocalNode]
    env: dict[str, str] = field(default_factory=dict)

    def node_ids(self) -> dict[str, str]:
        """Ray node id -> node name ('head', 'worker1', ...) of the nodes alive now."""
        code = (
            "import json, ray, ray._private.ray_constants as c; c.ENABLE_RAY_CLUSTER = False; "
            "ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps([[n['NodeID'], n['NodeManagerPort']] for n in ray.nodes() if n['Alive']]))"
        ) % self.address
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env, timeout=120, check=True)
        by_port = {node.manager_port: node.name for node in self.nodes}
        return {node_id: by_port.get(port, "?") for node_id, port in json.loads(out.stdout.strip().splitlines()[-1])}


def _forget_cached_token() -> None:
    """Make this process read the token from the environment again (Ray caches the first one)."""
    AuthenticationTokenLoader.instance().reset_cache()


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> int:
    """Run ``ray start`` in a new session and return that session's process group id."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "search.driver.local_cluster", "start", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    if proc.wait(timeout=180) != 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{log.read_text()[-3000:]}")
    return proc.pid


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[LocalCluster]:
    """Start a head and ``nodes - 1`` workers on 127.0.0.1; stop exactly them on exit.

    The cluster uses token authentication with a token made here; while the block runs, this
    process's environment carries it so ``ray.init(address=cluster.address)`` can connect.
    """
    with contextlib.ExitStack() as stack:
        # Ray puts unix sockets under its temp folder, whose paths may not exceed 107 bytes.
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stc-", dir="/tmp")))
        env = dict(os.environ)
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _TOKEN, "RAY_USAGE_STATS_ENABLED": "0"})
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        # Run `python -m search.driver.local_cluster` with this package importable.
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
        gcs_port = free_port()
        common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--disable-usage-stats"]
        started: list[LocalNode] = []
        try:
            for i in range(nodes):
                name = "head" if i == 0 else f"worker{i}"
                manager_port = free_port()
                role = ["--head", f"--port={gcs_port}", "--include-dashboard=false"] if i == 0 else [f"--address=127.0.0.1:{gcs_port}"]
                pgid = _ray_start(
                    [
                        *role,
                        f"--temp-dir={tmp / name}",
                        f"--node-manager-port={manager_port}",
                        f"--object-manager-port={free_port()}",
                        *common,
                    ],
                    env,
                    tmp / f"{name}.log",
                )
                started.append(LocalNode(name, pgid, manager_port))
            cluster = LocalCluster(address=f"127.0.0.1:{gcs_port}", nodes=started, env=env)
            deadline = time.monotonic() + 120
            while len(cluster.node_ids()) < nodes:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(cluster.node_ids())} of {nodes} nodes joined within 120 s")
                time.sleep(1)
            saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
            os.environ.update({key: env[key] for key in saved})
            _forget_cached_token()
            try:
                yield cluster
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
                _forget_cached_token()
        finally:
            for node in started:
                node.kill()


def _main() -> None:
    # This process is a node of its own: the address Ray reports is patched before its CLI loads.
    import ray._private.services as services

    services.node_ip_address_from_perspective = lambda *args, **kwargs: "127.0.0.1"
    from ray.scripts.scripts import main  # after the patch above

    sys.argv = ["ray", *sys.argv[1:]]
    main()


if __name__ == "__main__":
    _main()
