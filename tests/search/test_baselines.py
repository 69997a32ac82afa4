"""The baseline cache: its key follows the data and the model's code, not only their names."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from search.driver.baselines import baseline_key, cached_baseline, describe_key, store_baseline
from search.space.spec import parse_space

SPACE = {
    "name": "shapes",
    "task": {"name": "imagefolder", "options": {"image_size": 16, "resize": 16}},
    "model": "digits_cnn",
    "baseline": {"epochs": 1},
    "methods": {"l1_filter": {"optional": False, "params": {"ratio": 0.5}}},
    "objectives": {"accuracy": "max", "size_bytes": "min"},
    "budget": {"trials": 1},
}


def _space(root: Path):
    data = copy.deepcopy(SPACE)
    data["task"]["options"]["root"] = str(root)
    return parse_space(data, "shapes.yaml", yaml.safe_dump(data))


def _image_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, name in enumerate(("circle", "square")):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                # Each class's images have their own size: a swap changes the listing of sizes too.
                side = 8 + 4 * k
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")


def test_a_cached_baseline_is_reused_only_for_the_same_data(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    _image_tree(root)
    results = tmp_path / "results"
    folder = store_baseline(results, baseline_key(_space(root)), {"w": torch.ones(2)}, {"accuracy": 0.9}, "shapes")
    # Unchanged: reused, and the line says what the key covered.
    assert cached_baseline(results, baseline_key(_space(root)))[3] == "shapes"
    assert describe_key(folder).startswith(
        "same task and options, 1 data path(s) with 12 files by relative path, size and modification time"
    )
    # Two class folders swapped: the labels differ, so the baseline is not reused.
    train = root / "train"
    (train / "circle").rename(train / "tmp")
    (train / "square").rename(train / "circle")
    (train / "tmp").rename(train / "square")
    assert cached_baseline(results, baseline_key(_space(root))) is None


def test_a_cached_baseline_is_not_reused_once_the_model_code_changes(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "shapes"
    _image_tree(root)
    store_baseline(tmp_path, baseline_key(_space(root)), {"w": torch.ones(2)}, {"accuracy": 0.9}, "shapes")
    assert cached_baseline(tmp_path, baseline_key(_space(root))) is not None
    edited = tmp_path / "digits.py"
    edited.write_text(Path(__file__).resolve().parents[2].joinpath("models", "digits.py").read_text() + "\n# edited\n")
    real = inspect.getsourcefile
    # Only the model factory's source file reads differently.
    monkeypatch.setattr(inspect, "getsourcefile", lambda obj: str(edited) if getattr(obj, "__name__", "") == "digits_cnn" else real(obj))
    assert cached_baseline(tmp_path, baseline_key(_space(root))) is None
