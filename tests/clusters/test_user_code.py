"""A user's model and task files, searched on a real two-node Ray cluster (127.0.0.1), then exported and replayed."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_user_files_reach_the_workers_and_the_pick_exports_and_replays(two_node_cluster, tmp_path: Path, capsys) -> None:
    # Imported here, as in test_multinode: Ray reads its auth mode once, after the cluster fixture set it.
    from search.cli import main
    from search.driver.runner import run_search
    from tests.search.test_imports import _space

    path = _space(tmp_path, name="user_cluster", model_options="{width: 8}")
    path.write_text(path.read_text().replace("baseline: {epochs: 1}", "baseline: {epochs: 4}\ntraining: {lr: 0.1, batch_size: 32}"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_search(
            path,
            results_dir=tmp_path / "results",
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
            address=two_node_cluster.address,
            log=print,
        )
    printed = out.getvalue()
    assert "2 completed trials" in printed and "training the baseline on the cluster" in printed, printed
    export = tmp_path / "export"
    assert main(["export", "user_cluster", "--pick", "max-accuracy", "--out", str(export), "--results-dir", str(tmp_path / "results")]) == 0
    assert set(json.loads((export / "recipe.json").read_text())["imports"]) == {"model", "task"}
    capsys.readouterr()
    assert main(["replay", str(export / "recipe.json"), "--out", str(tmp_path / "replayed")]) == 0
    assert "metrics equal the recipe's" in capsys.readouterr().out
