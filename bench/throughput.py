"""Trials per minute of one search on a one-node Ray cluster versus a two-node cluster.

Both clusters run on this machine on 127.0.0.1 (``search.driver.local_cluster``), each node with one
CPU, so the two-node cluster has twice the trial slots. The search is the same (digits,
``l1_filter`` then ``kd`` at fixed settings, so every trial does the same work); the figure is
counted from the end of the baseline to the end of the last trial.

Where the two cores go in that window (Linux only: ``/proc``, sampled every second, so a process's
last second before it exits is missed): the trials' own CPU (``cpu_s``, which each trial reports:
projected cost, training, measuring, export), the rest of the Ray worker processes' CPU (starting
a worker and importing torch, Tune's actor, checkpoints), the driver (this process: Tune's loop,
Optuna, MLflow), Ray's daemons (GCS, raylets, agents), and everything else on the machine.

    python bench/throughput.py --trials 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

SPACE = """
name: throughput
task: digits
model: digits_cnn
baseline: {{epochs: 2}}
training: {{batch_size: 32}}
methods:
  # A search trains a configuration once (search.driver.samplers.ask_distinct): this narrow range gives
  # each trial its own configuration at the same cost.
  l1_filter: {{optional: false, params: {{ratio: {{low: 0.49, high: 0.51}}}}}}
  kd: {{optional: false}}
objectives: {{accuracy: max, macs: min}}
budget: {{trials: {trials}, concurrent: 2, epochs: {epochs}, cpus_per_trial: 1}}
sampler: {{name: random, seed: 0}}
measure: {{latency_repeats: 5}}
"""


TICK = os.sysconf("SC_CLK_TCK")


class CpuSplit:
    """CPU seconds of the driver, the cluster's processes and the rest of the machine, between :meth:`start` and :meth:`stop`.

    A process belongs to the cluster when it descends from one of its nodes' process groups
    (``LocalNode.processes``: the raylets, GCS, agents and the workers they start); among them,
    Ray's worker processes (``ray::...``, ``default_worker.py``) are told apart from its daemons.
    """

    def __init__(self, cluster, every_s: float = 1.0) -> None:
        self.cluster = cluster
        self.every_s = every_s
        self.seconds: dict[str, float] = defaultdict(float)
        self._last: dict[int, float] = {}
        self._counting = False
        self.own_s = 0.0  # this sampling's own CPU, counted in the driver's and taken out again
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _category(self, pid: int, cmdline: str, cluster_pids: set[int]) -> str:
        if pid == os.getpid():
            return "driver"
        if pid not in cluster_pids:
            return "others"
        return "ray workers" if cmdline.startswith("ray::") or "default_worker.py" in cmdline else "ray daemons"

    def _sample(self) -> None:
        cluster_pids = {pid for node in self.cluster.nodes if node.alive for pid in node.processes()}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            used = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
            if self._counting and pid in self._last:
                self.seconds[self._category(pid, cmdline, cluster_pids)] += max(0.0, used - self._last[pid])
            self._last[pid] = used

    def _loop(self) -> None:
        while not self._done.wait(self.every_s):
            began = time.thread_time()
            self._sample()
            self.own_s += time.thread_time() - began

    def start(self) -> None:
        self._sample()
        self._counting = True
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> dict[str, float]:
        self._sample()
        self._counting = False
        self._done.set()
        self.seconds["driver"] -= self.own_s
        return dict(self.seconds)


def run(nodes: int, trials: int, epochs: int, workdir: Path) -> dict[str, float]:
    from search.driver.local_cluster import local_cluster

    space = workdir / f"space{nodes}.yaml"
    space.write_text(SPACE.format(trials=trials, epochs=epochs))
    stamps: dict[str, float] = {}

    def log(message: str) -> None:
        if message.startswith("[slimtune] baseline:"):
            stamps["baseline_done"] = time.monotonic()
            split.start()
        if "finished:" in message:
            stamps["finished"] = time.monotonic()
            stamps.update(split.stop())

    with local_cluster(nodes=nodes, cpus_per_node=1) as cluster:
        split = CpuSplit(cluster)
        # Ray reads its authentication mode when it is imported: only once the cluster's token is set.
        from search.driver.runner import run_search
        from search.results.record import completed_records

        record = run_search(
            space,
            name=f"throughput{nodes}",
            results_dir=workdir / "results",
            tracking_uri=f"sqlite:///{workdir}/mlflow{nodes}.db",
            address=cluster.address,
            log=log,
        )
    seconds = stamps["finished"] - stamps["baseline_done"]
    trial_cpu = sum(float(r.metrics.get("cpu_s", 0.0)) for r in completed_records(record))
    cpu = {key: stamps.get(key, 0.0) for key in ("driver", "ray workers", "ray daemons", "others")}
    cpu["trials"] = trial_cpu
    cpu["ray workers"] = max(0.0, cpu["ray workers"] - trial_cpu)  # what the workers spent outside the trials' bodies
    return {"nodes": nodes, "trials": trials, "seconds": seconds, "per_minute": trials / seconds * 60, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the fine-tune phase of each trial")
    args = parser.parse_args()
    import torch

    print(
        f"digits / digits_cnn, l1_filter(0.5) + kd, {args.epochs} epochs per trial; torch {torch.__version__}; 1 CPU per node and per trial"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in (1, 2):
            rows.append(run(nodes, args.trials, args.epochs, Path(tmp)))
    print(f"\n{'nodes':>5}  {'trials':>6}  {'seconds':>8}  {'trials/min':>10}")
    for row in rows:
        print(f"{row['nodes']:>5}  {row['trials']:>6}  {row['seconds']:>8.1f}  {row['per_minute']:>10.2f}")
    print(f"\nspeed-up of two nodes over one: {rows[1]['per_minute'] / rows[0]['per_minute']:.2f}x")
    cores = os.cpu_count() or 1
    print(f"\nCPU seconds from the baseline's end to the last trial's end ({cores} cores: {cores} CPU-s per second of wall time)")
    names = ("trials", "ray workers", "driver", "ray daemons", "others")
    print(f"{'nodes':>5}  {'wall':>6}  " + "  ".join(f"{name:>11}" for name in names) + f"  {'idle':>6}")
    for row in rows:
        cpu = row["cpu"]
        idle = cores * row["seconds"] - sum(cpu.values())
        print(f"{row['nodes']:>5}  {row['seconds']:>6.1f}  " + "  ".join(f"{cpu[name]:>11.1f}" for name in names) + f"  {idle:>6.1f}")
    print("(ray workers: the worker processes' CPU outside the trials' own cpu_s: start, torch import, Tune's actor, checkpoints)")


if __name__ == "__main__":
    main()
