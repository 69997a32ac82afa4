"""Up-front checks: each refuses a search that would fail later, in one line, and creates nothing.

The tests run as root, for whom permission bits do not stop a write; an unwritable folder is
therefore a path under a regular file (``file/sub``, which no one can create) or under ``/proc``
(where even root cannot create files), which the probe's real write detects.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch

from errors import UserError
from search.driver.checks import check_methods, check_resources, check_storage, check_writable_folder, local_resources
from search.space.spec import load_space, parse_space

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "spaces" / "quickstart.yaml"


@pytest.fixture(scope="module")
def space():
    return load_space(QUICKSTART)


def _with_budget(space, **changes):
    return space.with_overrides(budget=dataclasses.replace(space.budget, **changes))


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- resources ----------------------------------------------------------------------------------


def test_local_resources_are_this_machines() -> None:
    assert local_resources() == {"CPU": float(os.cpu_count()), "GPU": float(torch.cuda.device_count())}


def test_gpu_trials_on_a_cluster_without_gpus_are_refused(space) -> None:
    with pytest.raises(UserError) as info:
        check_resources(_with_budget(space, gpus_per_trial=1), {"CPU": 4.0, "GPU": 0.0, "memory": 1e9})
    assert str(info.value) == (
        f"{QUICKSTART}: budget.gpus_per_trial: each trial asks for 1 GPU, but the cluster has 4 CPUs and 0 GPUs; "
        "no trial could ever start. Set budget.gpus_per_trial: 0 to train on CPUs, or run on a cluster with GPUs (--address)."
    )


def test_more_gpus_per_trial_than_the_cluster_has_are_refused(space) -> None:
    with pytest.raises(UserError, match=r"asks for 2 GPUs, but the cluster has 8 CPUs and 1 GPU;.*at most 1,"):
        check_resources(_with_budget(space, gpus_per_trial=2), {"CPU": 8.0, "GPU": 1.0})


def test_more_cpus_per_trial_than_the_cluster_has_are_refused(space) -> None:
    with pytest.raises(
        UserError, match=r"budget.cpus_per_trial: each trial asks for 4 CPUs, but the cluster has 2 CPUs and 0 GPUs;.*at most 2,"
    ):
        check_resources(_with_budget(space, cpus_per_trial=4), {"CPU": 2.0})


@pytest.mark.parametrize(
    ("cpus", "gpus", "cluster"), [(1, 0, {"CPU": 1.0}), (2, 0.5, {"CPU": 2.0, "GPU": 1.0}), (0.5, 1, {"CPU": 16.0, "GPU": 1.0})]
)
def test_trials_that_fit_pass(space, cpus: float, gpus: float, cluster: dict[str, float]) -> None:
    assert check_resources(_with_budget(space, cpus_per_trial=cpus, gpus_per_trial=gpus), cluster) is None


# -- folders and stores -------------------------------------------------------------------------


def test_a_folder_that_can_be_created_passes_and_is_not_created(tmp_path: Path) -> None:
    check_writable_folder(tmp_path / "a" / "b", "--results-dir")
    assert _tree(tmp_path) == []


def test_a_folder_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as info:
        check_writable_folder(tmp_path / "file" / "sub", "--out")
    assert (
        str(info.value)
        == f"--out {tmp_path / 'file' / 'sub'}: cannot be a folder, since {tmp_path / 'file'} is a file. Choose another path."
    )


def test_a_folder_where_even_root_cannot_write_is_refused() -> None:
    with pytest.raises(UserError) as info:
        check_writable_folder("/proc/slimtune-results", "--results-dir")
    assert str(info.value).startswith(
        "--results-dir /proc/slimtune-results: cannot write there (inside /proc, the nearest existing folder): "
    )
    assert not Path("/proc/slimtune-results").exists()


def test_storage_in_writable_folders_passes_and_creates_nothing(space, tmp_path: Path) -> None:
    check_storage(space, tmp_path / "results", f"sqlite:///{tmp_path}/db/mlflow.db")
    assert _tree(tmp_path) == []


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/file/mlflow.db", "sqlite:////proc/slimtune/mlflow.db"])
def test_sqlite_store_in_an_unwritable_folder_is_refused(space, tmp_path: Path, uri: str) -> None:
    (tmp_path / "file").write_text("x")
    uri = uri.format(tmp=tmp_path)
    with pytest.raises(UserError) as info:
        check_storage(space, tmp_path / "results", uri)
    assert str(info.value).startswith(f"MLflow tracking store (--tracking-uri / output.tracking_uri) {uri}: the database's folder ")
    assert _tree(tmp_path) == ["file"]


def test_sqlite_store_that_is_a_folder_is_refused(space, tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").mkdir()
    with pytest.raises(UserError, match=r"mlflow.db is not a writable file"):
        check_storage(space, tmp_path / "results", f"sqlite:///{tmp_path}/mlflow.db")


def test_unwritable_results_folder_is_refused(space, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^results folder \(--results-dir / output.results_dir\) .*file/r: cannot be a folder"):
        check_storage(space, tmp_path / "file" / "r", f"sqlite:///{tmp_path}/mlflow.db")


def test_unreachable_tracking_server_is_refused_at_once(space, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, then released
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError) as info:
        check_storage(space, tmp_path, f"http://127.0.0.1:{port}")
    assert f"cannot connect to 127.0.0.1:{port} within 5 s" in str(info.value)


def test_in_memory_optuna_storage_is_refused(space, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^Optuna storage \(output.optuna_storage\) sqlite:///:memory:: an in-memory database"):
        check_storage(space.with_overrides(optuna_storage="sqlite:///:memory:"), tmp_path, f"sqlite:///{tmp_path}/m.db")


# -- model and methods on a real batch -----------------------------------------------------------


def test_quickstart_methods_pass(space) -> None:
    lines: list[str] = []
    assert check_methods(space, log=lines.append) == 4
    assert sum(line.startswith("  [ok  ]") for line in lines) == 4


def test_model_that_rejects_the_task_input_is_one_line() -> None:
    data = {"task": "digits", "model": "vit_b_16", "methods": {"l1_filter": {}}, "objectives": {"accuracy": "max", "macs": "min"}}
    with pytest.raises(UserError) as info:
        check_methods(parse_space(data, "vit.yaml"), log=lambda line: None)
    message = str(info.value)
    assert message.startswith(
        "vit.yaml: model: 'vit_b_16' does not accept task 'digits' input of shape (2, 1, 8, 8) "
        "(AssertionError: Wrong image height! Expected 224 but got 8!)."
    )
    assert "\n" not in message


def test_method_that_fails_on_the_model_is_refused() -> None:
    data = {
        "task": {"name": "sr", "options": {"scale": 2, "patch_size": 48, "patches_per_epoch": 32}},
        "model": "edsr_small",
        "methods": {"l1_filter": {}},
        "objectives": {"psnr": "max", "macs": "min"},
    }
    lines: list[str] = []
    with pytest.raises(UserError) as info:
        check_methods(parse_space(data, "sr.yaml"), log=lines.append)
    message = str(info.value)
    assert message.startswith("sr.yaml: 1 of 1 pre-flight check failed, so the trials that use it would fail too: l1_filter: IndexError: ")
    assert "\n" not in message
    assert len(lines) == 1 and lines[0].startswith("  [FAIL] l1_filter")


# -- the user's files ---------------------------------------------------------------------------


def _file_space(tmp_path: Path, checkpoint: Path | None = None, images: Path | None = None):
    import yaml

    data = yaml.safe_load(QUICKSTART.read_text())
    data["output"] = {"results_dir": str(tmp_path / "results"), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    data["methods"] = {"l1_filter": {"optional": False, "params": {"ratio": 0.5}}}
    if checkpoint is not None:
        data["baseline"] = {"checkpoint": str(checkpoint)}
    if images is not None:
        data["task"] = {"name": "imagefolder", "options": {"root": str(images), "image_size": 16, "resize": 16}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_space(path)


def _refused(space) -> str:
    from search.driver.checks import check_files

    with pytest.raises(UserError) as info:
        check_files(space)
    return str(info.value)


def test_a_text_file_as_baseline_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_text("epoch 1: loss 0.3\n")
    message = _refused(_file_space(tmp_path, checkpoint))
    assert f"baseline.checkpoint {checkpoint}: not a PyTorch checkpoint" in message
    assert message.endswith("Save the trained digits_cnn's weights with torch.save(model.state_dict(), path).")


def test_a_whole_pickled_model_as_baseline_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), checkpoint)
    assert f"baseline.checkpoint {checkpoint}: a pickled object other than tensors (a whole model?)" in _refused(
        _file_space(tmp_path, checkpoint)
    )


def test_a_state_dict_of_another_model_is_refused_with_its_keys(tmp_path: Path) -> None:
    from models import create_model

    checkpoint = tmp_path / "resnet.pt"
    torch.save(create_model("digits_resnet", num_classes=10, in_channels=1).state_dict(), checkpoint)
    message = _refused(_file_space(tmp_path, checkpoint))
    assert f"baseline.checkpoint {checkpoint}: not a state dict of model 'digits_cnn' on task 'digits': keys missing " in message
    assert "unexpected " in message and ", ...)" in message
    # The matching state dict passes.
    torch.save(create_model("digits_cnn", num_classes=10, in_channels=1).state_dict(), checkpoint)
    from search.driver.checks import check_files

    check_files(_file_space(tmp_path, checkpoint))


def test_a_corrupt_image_is_refused_by_check_and_by_search_before_anything_is_written(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from search.driver.runner import run_search

    images = tmp_path / "shapes"
    for split in ("train", "val"):
        for name in ("circle", "square"):
            (images / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(images / split / name / f"{i}.png")
    bad = images / "val" / "square" / "1.png"
    bad.write_bytes(b"not a png")
    space = _file_space(tmp_path, images=images)
    assert _refused(space).startswith(f"cannot read the image '{bad}' (UnidentifiedImageError: ")
    with pytest.raises(UserError, match="cannot read the image"):
        run_search(tmp_path / "space.yaml", log=lambda line: None)
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()
