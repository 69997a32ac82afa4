"""Trials per minute of one search on a one-node Ray cluster versus a two-node cluster.

Both clusters run on this machine on 127.0.0.1 (``search.driver.local_cluster``), each node with one
CPU, so the two-node cluster has twice the trial slots. The search is the same (digits,
``l1_filter`` then ``kd`` at fixed settings, so every trial does the same work); the figure is
counted from the end of the baseline to the end of the last trial.

    python bench/throughput.py --trials 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
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


def run(nodes: int, trials: int, epochs: int, workdir: Path) -> dict[str, float]:
    from search.driver.local_cluster import local_cluster
    from search.driver.runner import run_search

    space = workdir / f"space{nodes}.yaml"
    space.write_text(SPACE.format(trials=trials, epochs=epochs))
    stamps: dict[str, float] = {}

    def log(message: str) -> None:
        if message.startswith("[slimtune] baseline:"):
            stamps["baseline_done"] = time.monotonic()
        if "finished:" in message:
            stamps["finished"] = time.monotonic()

    with local_cluster(nodes=nodes, cpus_per_node=1) as cluster:
        run_search(
            space,
            name=f"throughput{nodes}",
            results_dir=workdir / "results",
            tracking_uri=f"sqlite:///{workdir}/mlflow{nodes}.db",
            address=cluster.address,
            log=log,
        )
    seconds = stamps["finished"] - stamps["baseline_done"]
    return {"nodes": nodes, "trials": trials, "seconds": seconds, "per_minute": trials / seconds * 60}


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


if __name__ == "__main__":
    main()
