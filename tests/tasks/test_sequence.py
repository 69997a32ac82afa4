"""Tests of the sequence tasks (adding, copy_memory, seq_digits, char_text) and of metric directions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from errors import UserError
from search.space.spec import metrics_of_task
from tasks import create_task, task_kind, task_metrics
from tasks.sequence import ADDING_VARIANCE


class Constant(nn.Module):
    """Returns ``value`` for every example: ``(batch,)`` or, with ``classes``, logits favouring class ``value``."""

    def __init__(self, value: float, classes: int = 0, per_step: bool = False) -> None:
        super().__init__()
        self.value, self.classes, self.per_step = value, classes, per_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.classes:
            return torch.full((x.shape[0],), self.value)
        shape = (x.shape[0], x.shape[1], self.classes) if self.per_step else (x.shape[0], self.classes)
        logits = torch.zeros(shape)
        logits[..., int(self.value)] = 1.0
        return logits


def test_metric_directions_are_declared_by_each_task() -> None:
    assert task_metrics("adding") == {"mse": "min"}
    assert task_metrics("char_text") == {"bpc": "min", "accuracy": "max"}
    assert task_metrics("digits") == {"accuracy": "max"}
    assert task_metrics("sr") == {"psnr": "max", "ssim": "max"}
    known = metrics_of_task("adding")
    assert (known["mse"], known["mse_drop"], known["macs"]) == ("min", "min", "min")
    assert (task_kind("adding"), task_kind("copy_memory"), task_kind("seq_digits")) == (
        "regression",
        "sequence_labelling",
        "classification",
    )


def test_adding_targets_are_the_sum_of_the_two_marked_values_and_the_mean_scores_the_variance() -> None:
    task = create_task("adding", length=40, train_size=20, val_size=10, test_size=4000)
    x, y = task.test_set.tensors
    assert x.shape == (4000, 40, 2) and task.input_shape == (40, 2)
    assert torch.all(x[:, :20, 1].sum(1) == 1) and torch.all(x[:, 20:, 1].sum(1) == 1)
    assert torch.allclose((x[..., 0] * x[..., 1]).sum(1), y)
    mse = task.evaluate(Constant(1.0), [(x, y)], "cpu")["mse"]
    assert mse == pytest.approx(ADDING_VARIANCE, abs=0.01)
    assert task.reference == {"mse": pytest.approx(0.1667, abs=1e-4)}
    perfect = task.evaluate(Constant(0.0), [(x, y)], "cpu")["mse"]
    assert perfect == pytest.approx((y**2).mean().item(), rel=1e-5)
    assert task.model_kwargs() == {"num_classes": 1, "in_channels": 2, "per_step": False}


def test_adding_is_the_same_for_the_same_seed_and_refuses_a_bad_length() -> None:
    a, b = (create_task("adding", length=10, train_size=5, val_size=5, test_size=5, seed=3) for _ in range(2))
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    with pytest.raises(UserError, match="task option length must be a whole number >= 2, got 1"):
        create_task("adding", length=1)


def test_copy_memory_scores_only_the_recalled_symbols() -> None:
    task = create_task("copy_memory", delay=5, length=3, train_size=4, val_size=4, test_size=200)
    x, y = task.test_set.tensors
    assert x.shape == (200, 11, 10) and y.shape == (200, 11)
    assert torch.equal(x[:, :3].argmax(-1), y[:, -3:])  # the targets repeat the first symbols
    assert torch.all(x[:, 3 + 5 - 1].argmax(-1) == 9)  # the delimiter
    assert torch.all(y[:, :-3] == 0)
    # Always "symbol 1": right on a recalled step 1 time in 8; the blank steps do not count.
    accuracy = task.evaluate(Constant(1, classes=10, per_step=True), [(x, y)], "cpu")["accuracy"]
    assert accuracy == pytest.approx((y[:, -3:] == 1).float().mean().item())
    assert 0.05 < accuracy < 0.2


def test_seq_digits_reads_rows_or_pixels_of_the_digits_split() -> None:
    rows, pixels, images = create_task("seq_digits"), create_task("seq_digits", pixels=True), create_task("digits")
    assert rows.input_shape == (8, 8) and pixels.input_shape == (64, 1)
    assert torch.equal(rows.test_set.tensors[0], images.test_set.tensors[0].reshape(-1, 8, 8))
    assert torch.equal(pixels.val_set.tensors[1], images.val_set.tensors[1])
    assert rows.evaluate(Constant(3, classes=10), [rows.test_set.tensors], "cpu")["accuracy"] == pytest.approx(
        (rows.test_set.tensors[1] == 3).float().mean().item()
    )


def test_char_text_scores_bits_per_character_on_a_users_file(tmp_path) -> None:
    path = tmp_path / "text.txt"
    path.write_text("ab" * 500)
    task = create_task("char_text", path=str(path), seq_len=10)
    assert task.metrics == ("bpc", "accuracy") and task.input_shape == (10, 2)
    x, y = task.train_set.tensors
    assert len(task.train_set) == (900 - 1) // 10 and x.shape == (89, 10, 2)
    assert torch.equal(x[:, 1:].argmax(-1), y[:, :-1])  # targets are the next characters
    # Logits (1, 0) at every step: p(a) = e / (e + 1); half the targets are "a", half "b".
    says_a = task.evaluate(Constant(0, classes=2, per_step=True), [task.test_set.tensors], "cpu")
    p_a = math.e / (math.e + 1)
    assert says_a["bpc"] == pytest.approx(-(math.log2(p_a) + math.log2(1 - p_a)) / 2, rel=1e-3)
    assert says_a["accuracy"] == pytest.approx(0.5, abs=0.05)


def test_char_text_errors_name_the_option(tmp_path) -> None:
    with pytest.raises(UserError, match="task option path: no text file at"):
        create_task("char_text", path=str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("abc" * 30)
    with pytest.raises(UserError, match="fewer than one window of seq_len \\+ 1 = 101"):
        create_task("char_text", path=str(short))
    with pytest.raises(UserError, match="val_path and test_path go together"):
        create_task("char_text", path=str(short), val_path=str(short))


def test_a_minimised_metric_drops_by_rising_and_its_spaces_load_without_warnings() -> None:
    from search.space.spec import load_space
    from search.trial.body import measure

    root = Path(__file__).resolve().parents[2]
    space = load_space(root / "spaces" / "adding_wavelet.yaml").with_overrides(latency_repeats=1)
    assert {o.metric: o.direction for o in space.objectives} == {"mse": "min", "params": "min"}
    assert space.warnings == ()
    task = create_task("adding", length=30, train_size=4, val_size=4, test_size=500)
    metrics = measure(Constant(1.0), space, task, torch.device("cpu"), baseline={"mse": 0.1})
    assert metrics["mse"] == pytest.approx(ADDING_VARIANCE, abs=0.03)
    assert metrics["mse_drop"] == pytest.approx(metrics["mse"] - 0.1)
    assert load_space(root / "spaces" / "seq_digits_wavelet.yaml").warnings == ()


def test_hypervolume_of_a_minimised_quality_metric_reaches_to_what_learning_nothing_scores(tmp_path: Path) -> None:
    from search.results.ranking import search_hypervolume
    from search.results.record import SearchRecord, TrialRecord
    from search.space.spec import load_space

    space = load_space(Path(__file__).resolve().parents[2] / "spaces" / "adding_wavelet.yaml")
    search = SearchRecord.from_space("adding", tmp_path, space, "sqlite:///unused.db", "sqlite:///unused.db")
    search.baseline_metrics = {"mse": 0.01, "params": 1000.0, "reference_mse": 0.167}
    # mse 0.02 is twice the baseline's, so it would fall outside a 1.1 x baseline reference.
    trial = TrialRecord(0, "t0", None, [], {"mse": 0.02, "params": 500.0}, None, rank=0)
    # Normalised: mse 2 against the reference 16.7, params 0.5 against 1.1.
    assert search_hypervolume(search, [trial]) == pytest.approx((16.7 - 2.0) * (1.1 - 0.5))
    del search.baseline_metrics["reference_mse"]
    # Without it, the reference moves past the trial's mse by a tenth of the baseline's (2.1 normalised).
    assert search_hypervolume(search, [trial]) == pytest.approx((2.1 - 2.0) * (1.1 - 0.5))
