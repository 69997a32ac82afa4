"""Tests of the task registry and the digits, CIFAR and image-folder tasks, on tiny local data."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import cifar as tv_cifar

from errors import UserError
from tasks import Task, create_task, list_tasks, register_task
from tasks.digits import split_indices

CIFAR_PER_BATCH = 20


class ConstantClassifier(nn.Module):
    """Predicts one class for every input, whatever the input."""

    def __init__(self, num_classes: int, predicted: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.predicted = predicted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.num_classes)
        logits[:, self.predicted] = 1.0
        return logits


# --- registry ---------------------------------------------------------------------------------


def test_builtin_tasks_are_listed() -> None:
    assert {"digits", "cifar10", "cifar100", "imagefolder"} <= set(list_tasks())


def test_unknown_task_suggests_close_name() -> None:
    with pytest.raises(UserError, match="Did you mean 'digits'"):
        create_task("digit")


def test_unknown_option_lists_accepted_options() -> None:
    with pytest.raises(UserError) as info:
        create_task("digits", sed=1)
    message = str(info.value)
    assert "'sed'" in message
    assert "Did you mean 'seed'" in message
    assert "Accepted options: seed" in message


def test_missing_required_option_is_user_error() -> None:
    with pytest.raises(UserError, match="needs option 'root'"):
        create_task("imagefolder")


def test_register_task_rejects_a_second_factory_for_one_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_task("digits")(lambda: None)


# --- digits -----------------------------------------------------------------------------------


def test_digits_split_sizes_and_shapes() -> None:
    task = create_task("digits")
    sizes = (len(task.train_set), len(task.val_set), len(task.test_set))
    assert sizes == (1077, 360, 360)
    assert sum(sizes) == 1797
    assert task.num_classes == 10
    assert task.input_shape == (1, 8, 8)
    x, y = task.train_set[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert task.example_input(4).shape == (4, 1, 8, 8)
    assert task.example_input().abs().sum() == 0


def test_digits_splits_are_disjoint_and_stratified() -> None:
    train, val, test = (set(part.tolist()) for part in split_indices(0))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(1797))
    task = create_task("digits")
    all_labels = torch.cat([d.tensors[1] for d in (task.train_set, task.val_set, task.test_set)])
    overall = torch.bincount(all_labels, minlength=10).double()
    for dataset in (task.train_set, task.val_set, task.test_set):
        counts = torch.bincount(dataset.tensors[1], minlength=10).double()
        # Stratification keeps each class's count within one example of its share of the split.
        proportional = overall * len(dataset) / 1797
        assert (counts - proportional).abs().max() <= 1.0


def test_digits_train_split_is_standardised() -> None:
    x = create_task("digits").train_set.tensors[0]
    assert abs(x.mean().item()) < 1e-5
    assert x.std().item() == pytest.approx(1.0, abs=1e-3)


def test_digits_is_deterministic_and_seeded() -> None:
    a, b = create_task("digits"), create_task("digits")
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert torch.equal(a.test_set.tensors[1], b.test_set.tensors[1])
    # Separate tensors per call, so changing one task's data leaves the cache intact.
    assert a.train_set.tensors[0].data_ptr() != b.train_set.tensors[0].data_ptr()
    other = create_task("digits", seed=1)
    assert not np.array_equal(split_indices(0)[2], split_indices(1)[2])
    assert len(other.test_set) == 360


# --- Task methods -----------------------------------------------------------------------------


def test_evaluate_constant_model_scores_class_share() -> None:
    task = create_task("digits")
    labels = task.test_set.tensors[1]
    expected = (labels == 0).float().mean().item()
    model = ConstantClassifier(10, predicted=0)
    model.train()
    result = task.evaluate(model, DataLoader(task.test_set, batch_size=64), "cpu")
    assert result["accuracy"] == pytest.approx(expected)
    assert result["accuracy"] == pytest.approx(36 / 360)
    # Logits of 1 on one class and 0 elsewhere: the true class gets e^1 or e^0 out of (e + 9).
    log_z = np.log(np.e + 9)
    expected_loss = expected * (log_z - 1) + (1 - expected) * log_z
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert model.training, "evaluate must restore train mode"
    model.eval()
    task.evaluate(model, DataLoader(task.test_set, batch_size=64), "cpu")
    assert not model.training


def test_evaluate_runs_without_gradients_in_eval_mode() -> None:
    seen: dict[str, bool] = {}

    class Probe(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["training"] = self.training
            seen["grad"] = torch.is_grad_enabled()
            return super().forward(x.flatten(1))

    task = create_task("digits")
    task.evaluate(Probe(64, 10), DataLoader(task.val_set, batch_size=500), torch.device("cpu"))
    assert seen == {"training": False, "grad": False}


def test_loss_is_cross_entropy() -> None:
    task = create_task("digits")
    outputs = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    targets = torch.tensor([0, 0])
    expected = torch.nn.functional.cross_entropy(outputs, targets)
    assert torch.allclose(task.loss(outputs, targets), expected)


def test_evaluate_empty_loader_raises() -> None:
    task = create_task("digits")
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="no examples"):
        task.evaluate(ConstantClassifier(10, 0), DataLoader(empty), "cpu")


# --- CIFAR ------------------------------------------------------------------------------------


def _write_fake_cifar10(root: Path) -> dict[str, list[int]]:
    """Write a tiny CIFAR-10 in torchvision's on-disk pickle format; return the labels per file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels_per_file: dict[str, list[int]] = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in rng.integers(0, 10, CIFAR_PER_BATCH)]
        data = rng.integers(0, 256, (CIFAR_PER_BATCH, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        labels_per_file[name] = labels
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return labels_per_file


@pytest.fixture
def skip_cifar_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accept the fake files: torchvision's CIFAR checks each file's md5 through this module-level name."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def test_cifar10_reads_on_disk_format(tmp_path: Path, skip_cifar_checksums: None) -> None:
    labels = _write_fake_cifar10(tmp_path)
    task = create_task("cifar10", root=str(tmp_path))
    assert task.num_classes == 10
    assert task.input_shape == (3, 32, 32)
    assert (len(task.train_set), len(task.val_set), len(task.test_set)) == (90, 10, 20)
    assert set(task.train_set.indices).isdisjoint(task.val_set.indices)
    assert sorted(task.train_set.indices + task.val_set.indices) == list(range(100))

    train_labels = sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    for dataset in (task.train_set, task.val_set):
        for position in (0, len(dataset) - 1):
            x, y = dataset[position]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            assert y == train_labels[dataset.indices[position]]
    assert [task.test_set[i][1] for i in range(20)] == labels["test_batch"]
    assert task.test_set[0][0].shape == (3, 32, 32)

    # The val split is fixed across calls, and val inputs are not augmented.
    again = create_task("cifar10", root=str(tmp_path))
    assert again.val_set.indices == task.val_set.indices
    assert torch.equal(again.val_set[0][0], task.val_set[0][0])

    batch_x, batch_y = next(iter(DataLoader(task.train_set, batch_size=8)))
    assert batch_x.shape == (8, 3, 32, 32) and batch_y.dtype == torch.int64


def test_cifar10_without_augment_is_deterministic(tmp_path: Path, skip_cifar_checksums: None) -> None:
    _write_fake_cifar10(tmp_path)
    task = create_task("cifar10", root=str(tmp_path), augment=False, val_fraction=0.2)
    assert (len(task.train_set), len(task.val_set)) == (80, 20)
    assert torch.equal(task.train_set[3][0], task.train_set[3][0])


def test_cifar10_missing_root_is_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as info:
        create_task("cifar10", root=str(missing))
    message = str(info.value)
    assert "cifar-10-batches-py" in message
    assert str(missing) in message
    assert "download: true" in message


def test_cifar100_missing_root_names_its_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cifar-100-python"):
        create_task("cifar100", root=str(tmp_path))


def test_bad_val_fraction_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="val_fraction"):
        create_task("cifar10", root=str(tmp_path), val_fraction=1.5)


# --- image folders ----------------------------------------------------------------------------


def _write_image_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_reads_class_folders(tmp_path: Path) -> None:
    _write_image_tree(tmp_path)
    task = create_task("imagefolder", root=str(tmp_path), image_size=32, resize=36)
    assert task.num_classes == 2
    assert task.input_shape == (3, 32, 32)
    # 10% of 12 rounds to 1 held-out training image; the val folder is the 12-image test split.
    assert (len(task.train_set), len(task.val_set), len(task.test_set)) == (11, 1, 12)
    assert set(task.train_set.indices).isdisjoint(task.val_set.indices)
    for dataset in (task.train_set, task.val_set, task.test_set):
        x, y = dataset[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert y in (0, 1)
    assert sorted(task.test_set[i][1] for i in range(12)) == [0] * 6 + [1] * 6
    assert task.example_input(2).shape == (2, 3, 32, 32)


def test_imagefolder_missing_train_folder_shows_layout(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        create_task("imagefolder", root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "train") in message
    assert "train/<class>/*.jpg" in message


def test_imagefolder_missing_root_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nowhere"):
        create_task("imagefolder", root=str(tmp_path / "nowhere"))


def test_imagefolder_mismatched_classes_is_user_error(tmp_path: Path) -> None:
    _write_image_tree(tmp_path, per_class=1)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "bird")
    with pytest.raises(UserError, match="bird"):
        create_task("imagefolder", root=str(tmp_path), image_size=32, resize=36)


def test_task_is_a_dataclass_with_accuracy_metric() -> None:
    task = create_task("digits")
    assert isinstance(task, Task)
    assert task.metric == "accuracy"


def test_imagefolder_unreadable_image_is_user_error_naming_the_file(tmp_path: Path) -> None:
    # Met in a trial's training, the error fails that trial with the file's name, not the search.
    _write_image_tree(tmp_path)
    bad = tmp_path / "train" / "dog" / "2.png"
    bad.write_text("truncated")
    task = create_task("imagefolder", root=str(tmp_path), image_size=32, resize=36)
    dataset = task.train_set.dataset
    index = next(i for i, (path, _) in enumerate(dataset.samples) if path == str(bad))
    with pytest.raises(UserError, match=rf"^cannot read the image '{bad}' \(UnidentifiedImageError: .*\)\. Replace or remove the file\.$"):
        dataset[index]
