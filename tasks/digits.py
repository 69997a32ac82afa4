"""The ``digits`` task: scikit-learn's 1797 real 8x8 handwritten digits, small enough for tests."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from tasks._base import Task
from tasks._registry import register_task

# Pixel values in load_digits are counts of set pixels in 4x4 blocks, so they run from 0 to 16.
_MAX_PIXEL = 16.0


@cache
def split_indices(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the train, val and test positions into ``load_digits()``: a stratified 60/20/20 split.

    Args:
        seed: Seed of the split; the same seed always gives the same split.

    Returns:
        Sorted position arrays ``(train, val, test)``; treat them as read-only since they are cached.
    """
    labels = load_digits().target
    positions = np.arange(len(labels))
    rest, test = train_test_split(positions, test_size=0.2, stratify=labels, random_state=seed)
    # 0.25 of the remaining 80% is 20% of the whole.
    train, val = train_test_split(rest, test_size=0.25, stratify=labels[rest], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


@cache
def _arrays(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Return normalised ``(images, labels)`` for train, val and test, computed once per seed."""
    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / _MAX_PIXEL)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    train, val, test = split_indices(seed)
    # Statistics from the train split only, so nothing about val or test leaks into the inputs.
    mean = images[train].mean()
    std = images[train].std()
    normalised = (images - mean) / std
    return tuple((normalised[idx], labels[idx]) for idx in (train, val, test))


def _tensor_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    # Copies, so that a caller changing a tensor in place cannot corrupt the cached arrays.
    return TensorDataset(torch.tensor(images, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64))


@register_task("digits")
def digits(seed: int = 0) -> Task:
    """Build the digits task: 10 classes of 1x8x8 images, normalised with the train-split mean and std.

    Args:
        seed: Seed of the stratified 60/20/20 train/val/test split.
    """
    splits = _arrays(int(seed))
    train_set, val_set, test_set = (_tensor_dataset(x, y) for x, y in splits)
    return Task(
        name="digits",
        num_classes=10,
        input_shape=(1, 8, 8),
        train_set=train_set,
        val_set=val_set,
        test_set=test_set,
    )
