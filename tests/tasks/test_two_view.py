"""The two-view tasks: retrieval metrics by hand, digits_2view's views, the re-id folder loader on a tiny written folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from errors import UserError
from tasks import create_task, task_kind, task_metrics
from tasks.two_view import retrieval_metrics, with_modality


def test_retrieval_metrics_match_a_hand_computed_example() -> None:
    # Gallery a..d at angles 0, 37, 53 and 90 degrees; identities 1, 0, 0, 1.
    gallery = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    gallery_ids = torch.tensor([1, 0, 0, 1])
    # q1 (identity 0) ranks a, b, c, d: hits at 2 and 3, AP = (1/2 + 2/3) / 2 = 7/12.
    # q2 (identity 1) ranks d, c, b, a: hits at 1 and 4, AP = (1/1 + 2/4) / 2 = 3/4.
    # q3 (identity 7) has no match: it counts in no metric.
    query = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    query_ids = torch.tensor([0, 1, 7])
    out = retrieval_metrics(query, query_ids, gallery, gallery_ids)
    assert out["rank1"] == pytest.approx(0.5)
    assert out["rank5"] == pytest.approx(1.0) and out["rank10"] == pytest.approx(1.0)
    assert out["mAP"] == pytest.approx((7 / 12 + 3 / 4) / 2)
    with pytest.raises(ValueError, match="none of the 1 queries has a match among the 4 gallery items"):
        retrieval_metrics(query[2:], query_ids[2:], gallery, gallery_ids)


def test_digits_2view_pairs_both_modalities_in_both_orders() -> None:
    task = create_task("digits_2view")
    assert task_kind("digits_2view") == "two_view"
    assert task_metrics("digits_2view") == {"rank1": "max", "mAP": "max", "rank5": "max", "rank10": "max"}
    assert (task.input_shape, task.num_classes, task.model_kwargs()) == ((2, 8, 8), 10, {"num_classes": 10, "in_channels": 1})
    half = len(task.train_set) // 2
    (first, second), label = task.train_set[3]
    (swapped_first, swapped_second), swapped_label = task.train_set[half + 3]
    assert (first[1].unique().tolist(), second[1].unique().tolist()) == ([0.0], [1.0])
    assert torch.equal(swapped_first, second) and torch.equal(swapped_second, first) and label == swapped_label
    # The second modality is a fixed transform: built twice, the same.
    again = create_task("digits_2view", seed=0).train_set[3][0][1]
    assert torch.equal(again, second)
    # Val and test: every example in each modality, no example shared with training.
    assert len(task.test_set) == 2 * 360 and len(task.train_set) == 2 * 1077


def test_digits_2view_evaluates_a_perfect_embedding_at_one() -> None:
    """An embedding that is the one-hot identity ranks every match first: all metrics 1."""
    task = create_task("digits_2view")

    class Oracle(torch.nn.Module):
        def embed(self, x: torch.Tensor) -> torch.Tensor:
            return self.identities

    loader = DataLoader(task.test_set, batch_size=len(task.test_set))
    inputs, targets = next(iter(loader))
    oracle = Oracle()
    oracle.identities = torch.nn.functional.one_hot(targets, 10).float()
    out = task.evaluate(oracle, [(inputs, targets)], "cpu")
    assert out == {"rank1": 1.0, "rank5": 1.0, "rank10": 1.0, "mAP": pytest.approx(1.0), "loss": pytest.approx(0.0)}


def _write_folder(root: Path, identities: dict[str, tuple[int, int]]) -> None:
    rng = np.random.default_rng(0)
    for identity, counts in identities.items():
        for modality, count in zip(("Visible", "Thermal"), counts):
            folder = root / modality / identity
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 255, size=(12, 6, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")


def test_reid_folder_splits_identities_disjointly(tmp_path: Path) -> None:
    _write_folder(tmp_path, {f"{i:04d}": (2, 3) for i in range(6)})
    task = create_task("reid_folder", root=str(tmp_path), height=8, width=4, test_fraction=0.34, val_fraction=0.25)
    assert task.input_shape == (4, 8, 4) and task.model_kwargs() == {"num_classes": task.num_classes, "in_channels": 3}
    # 6 identities: 2 test, 1 val, 3 train; each train identity pairs max(2, 3) = 3 times, both orders.
    assert task.num_classes == 3 and len(task.train_set) == 2 * 3 * 3
    (view0, view1), label = task.train_set[0]
    assert view0.shape == (4, 8, 4) and (view0[3].unique().tolist(), view1[3].unique().tolist()) == ([0.0], [1.0])
    train_labels = {task.train_set[k][1] for k in range(len(task.train_set))}
    val_labels = {task.val_set[k][1] for k in range(len(task.val_set))}
    test_labels = {task.test_set[k][1] for k in range(len(task.test_set))}
    assert train_labels == {0, 1, 2} and len(val_labels) == 1 and len(test_labels) == 2
    assert not (train_labels & val_labels) and not (train_labels & test_labels) and not (val_labels & test_labels)
    assert len(task.test_set) == 2 * (2 + 3)  # both modalities of the two test identities


@pytest.mark.parametrize(
    ("layout", "options", "says"),
    [
        (None, {}, "re-id folder root"),
        ({"0001": (1, 1), "0002": (1, 1), "0003": (1, 1)}, {"modality_b": "IR"}, "modality folder"),
        ({"0001": (1, 1), "0002": (0, 1), "0003": (1, 1)}, {}, "have images in only one of 'Visible' and 'Thermal'"),
        ({"0001": (1, 1), "0002": (1, 1)}, {}, "at least 3 are needed"),
        ({"0001": (1, 1), "0002": (1, 1), "0003": (1, 1)}, {"test_fraction": 1.5}, "test_fraction must be a number between 0 and 1"),
    ],
    ids=["no-root", "no-modality-folder", "one-sided-identity", "too-few-identities", "bad-fraction"],
)
def test_reid_folder_bad_folders_are_one_line_user_errors(tmp_path: Path, layout, options, says: str) -> None:
    root = tmp_path / "data"
    if layout is not None:
        _write_folder(root, layout)
    with pytest.raises(UserError) as info:
        create_task("reid_folder", root=str(root), **options)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_with_modality_adds_a_constant_last_plane() -> None:
    tagged = with_modality(torch.zeros(2, 3, 4, 4), 1)
    assert tagged.shape == (2, 4, 4, 4) and tagged[:, 3].eq(1).all() and tagged[:, :3].eq(0).all()
