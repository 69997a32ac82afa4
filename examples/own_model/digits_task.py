"""A user's own task: scikit-learn's 8x8 digits, split and normalised by the user's own code."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from tasks import Task


class DigitsTask(Task):
    kind = "classification"
    metric_directions = {"accuracy": "max"}

    def __init__(self, limit: int = 1797, seed: int = 0) -> None:
        data = load_digits()
        order = np.random.default_rng(seed).permutation(len(data.target))[:limit]
        images = torch.tensor(data.images[order] / 16.0, dtype=torch.float32).unsqueeze(1)
        labels = torch.tensor(data.target[order], dtype=torch.int64)
        n_train, n_val = int(0.6 * len(order)), int(0.2 * len(order))
        cut = [0, n_train, n_train + n_val, len(order)]
        train, val, test = (TensorDataset(images[a:b], labels[a:b]) for a, b in zip(cut, cut[1:]))
        super().__init__(name="my_digits", num_classes=10, input_shape=(1, 8, 8), train_set=train, val_set=val, test_set=test)
