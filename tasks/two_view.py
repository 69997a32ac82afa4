"""Two-view tasks: each example seen in two modalities, judged by cross-modal retrieval.

The setting of cross-modal person re-identification (visible -> infrared): a model embeds the
images of one modality (the queries) and of the other (the gallery); each query ranks the
gallery by cosine distance, and a gallery image is a match when it shows the query's identity.
The metrics (:func:`retrieval_metrics`), all in [0, 1] and higher-is-better:

* ``rank1``, ``rank5``, ``rank10`` (the CMC curve): the share of queries with a match among the
  k nearest gallery images;
* ``mAP``: the mean over queries of the average precision of the whole ranked gallery.

Every input is the image's ``C`` planes plus a last plane that holds its modality (0 for the
query modality, 1 for the gallery's), constant over the plane: the model routes each example
through its modality's branch in training (:class:`models.two_branch.TwoBranch`), and
:meth:`TwoViewTask.evaluate` splits queries from gallery with it. A training batch holds two
views (:class:`methods.Step`): view 0 an image, view 1 the same identity in the other modality;
every pair appears in both orders, so view 0 covers both modalities and the task loss alone
trains on both.

Tasks:

* ``digits_2view``: scikit-learn's 8x8 digits; modality 0 is the digit, modality 1 a fixed
  transform of it: the inverted Sobel edge map plus Gaussian noise drawn once with a fixed seed.
  Identities are the 10 digit classes (the same 60/20/20 split as ``digits``). With only ten
  classes, identities cannot be disjoint between training and test (two or three test classes
  would make Rank-1 a coin toss), so the test *examples* are disjoint and a match is any
  gallery digit of the query's class. Per-sample identities were considered and left: one pair
  per identity gives the identity posteriors p(y|v), which the variational distillation terms
  compare, nothing to learn from.
* ``reid_folder``: images laid out as RegDB (``root/Visible/<id>/*``, ``root/Thermal/<id>/*``)
  or SYSU-MM01 with its cameras grouped by modality: ``root/<modality_a>/<identity>/*`` and
  ``root/<modality_b>/<identity>/*``. Training, val and test identities are disjoint, as in
  re-identification protocols; the classifiers cover the training identities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset
from torchvision import transforms
from torchvision.datasets.folder import pil_loader

from errors import UserError
from tasks._base import Task, check_fraction
from tasks._registry import register_task
from tasks.digits import split_indices

__all__ = ["TwoViewTask", "PairedViews", "retrieval_metrics", "with_modality", "digits_2view", "reid_folder", "RETRIEVAL_METRICS"]

#: The metrics of a two-view task, headline first, with their directions.
RETRIEVAL_METRICS = {"rank1": "max", "mAP": "max", "rank5": "max", "rank10": "max"}
_RANKS = (1, 5, 10)


def retrieval_metrics(query: torch.Tensor, query_ids: torch.Tensor, gallery: torch.Tensor, gallery_ids: torch.Tensor) -> dict[str, float]:
    """Rank-1, Rank-5, Rank-10 and mAP of searching ``gallery`` with each ``query`` by cosine distance.

    Gallery items at equal distance keep their gallery order. A query without any match in the
    gallery counts in no metric (as in re-identification protocols); a rank beyond the gallery's
    size is the whole gallery.

    Args:
        query: ``(Q, D)`` features.
        query_ids: ``(Q,)`` identities.
        gallery: ``(G, D)`` features.
        gallery_ids: ``(G,)`` identities.

    Raises:
        ValueError: No query has a match in the gallery (nothing to measure).
    """
    similarity = F.normalize(query.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T
    order = torch.argsort(similarity, dim=1, descending=True, stable=True)
    matches = gallery_ids[order] == query_ids[:, None]
    scored = matches.any(dim=1)
    if not scored.any():
        raise ValueError(f"none of the {len(query)} queries has a match among the {len(gallery)} gallery items; nothing to rank.")
    matches = matches[scored].float()
    out = {f"rank{k}": matches[:, :k].amax(dim=1).mean().item() for k in _RANKS}
    positions = torch.arange(1, matches.shape[1] + 1, dtype=torch.float32)
    precision_at_hits = matches.cumsum(dim=1) / positions * matches
    out["mAP"] = (precision_at_hits.sum(dim=1) / matches.sum(dim=1)).mean().item()
    return out


def with_modality(images: torch.Tensor, modality: int) -> torch.Tensor:
    """``images`` ``(..., C, H, W)`` with a last plane of ``modality`` added: ``(..., C + 1, H, W)``."""
    plane = torch.full((*images.shape[:-3], 1, *images.shape[-2:]), float(modality), dtype=images.dtype)
    return torch.cat([images, plane], dim=-3)


class PairedViews(Dataset):
    """Training pairs of two views: ``((view 0, view 1), identity)``, each pair in both orders.

    Args:
        first: Examples of modality 0, ``(tagged image, identity)``.
        second: Examples of modality 1, likewise.
        pairs: ``(index into first, index into second)`` of the same identity.
    """

    def __init__(self, first: Dataset, second: Dataset, pairs: Sequence[tuple[int, int]]) -> None:
        self.first, self.second, self.pairs = first, second, list(pairs)

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], Any]:
        a, b = self.pairs[index % len(self.pairs)]
        (x_a, identity), (x_b, _) = self.first[a], self.second[b]
        return ((x_a, x_b), identity) if index < len(self.pairs) else ((x_b, x_a), identity)


@dataclass
class TwoViewTask(Task):
    """A task of two modalities (module docstring); ``input_shape`` counts the modality plane.

    Attributes:
        image_channels: The image planes before the modality plane.
    """

    image_channels: int = 1

    def model_kwargs(self) -> dict[str, Any]:
        """``num_classes`` (training identities) and ``in_channels`` (image planes, the modality plane not counted)."""
        return {"num_classes": self.num_classes, "in_channels": self.image_channels}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, averaged over every head of a ``(batch, heads, classes)`` output."""
        if outputs.dim() == 3:
            return F.cross_entropy(outputs.flatten(0, 1), targets.repeat_interleave(outputs.shape[1]))
        return F.cross_entropy(outputs, targets)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device | str) -> dict[str, float]:
        """Retrieval from modality 0 (queries) into modality 1 (gallery) on the model's representation.

        The representation is ``model.embed(x)`` where the model has one (the two-branch
        models' shared ``z``), else its evaluation-mode output. Batches of two views (a
        training batch, as the pre-flight evaluates on) count each view's images.

        Returns:
            ``rank1``, ``rank5``, ``rank10``, ``mAP`` and ``loss`` = 1 - mAP (the loop logs a loss;
            identities unseen in training have no classification loss).
        """
        was_training = model.training
        model.eval()
        embed = getattr(model, "embed", model)
        features, identities, modalities = [], [], []
        try:
            with torch.no_grad():
                for inputs, targets in loader:
                    views = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
                    for view in views:
                        view = view.to(device)
                        features.append(embed(view).flatten(1).cpu())
                        identities.append(targets.cpu())
                        modalities.append(view[:, self.image_channels, 0, 0].cpu() > 0.5)
        finally:
            model.train(was_training)
        if not features:
            raise ValueError(f"cannot evaluate task '{self.name}': the loader yielded no examples.")
        feats, ids, gallery = torch.cat(features), torch.cat(identities), torch.cat(modalities)
        if gallery.all() or not gallery.any():
            raise ValueError(
                f"cannot evaluate task '{self.name}': the examples hold only modality {int(gallery[0])}; retrieval needs both."
            )
        out = retrieval_metrics(feats[~gallery], ids[~gallery], feats[gallery], ids[gallery])
        out["loss"] = 1.0 - out["mAP"]
        return out


# --- digits_2view ---------------------------------------------------------------------------------

#: Seed of the second modality's noise: drawn once, the same for every run.
_NOISE_SEED = 1234


_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edge_modality(images: np.ndarray, noise: float) -> np.ndarray:
    """The second modality of ``images`` ``(N, H, W)`` in [0, 1]: inverted Sobel edge magnitude plus fixed Gaussian noise."""
    x = torch.from_numpy(images).float()[:, None]
    kernels = torch.stack([_SOBEL, _SOBEL.T])[:, None]  # d/dx and d/dy, zero padding at the border
    gradients = F.conv2d(x, kernels, padding=1)
    edges = gradients.pow(2).sum(dim=1).sqrt().numpy()
    edges /= np.maximum(edges.max(axis=(1, 2), keepdims=True), 1e-8)
    rng = np.random.default_rng(_NOISE_SEED)
    return (1.0 - edges + noise * rng.standard_normal(images.shape)).astype(np.float32)


@cache
def _digit_modalities(seed: int, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both modalities ``(N, 1, 8, 8)``, each normalised with its train-split mean and std, and the labels."""
    bunch = load_digits()
    raw = bunch.images.astype(np.float32) / 16.0
    train, _, _ = split_indices(seed)
    out = []
    for images in (raw, edge_modality(raw, noise)):
        out.append(((images - images[train].mean()) / images[train].std())[:, None])
    return out[0], out[1], bunch.target.astype(np.int64)


@register_task("digits_2view", metrics=RETRIEVAL_METRICS, kind="two_view")
def digits_2view(seed: int = 0, noise: float = 0.3) -> TwoViewTask:
    """Build ``digits_2view`` (module docstring): 10 identities, inputs ``(2, 8, 8)``.

    Args:
        seed: Seed of the stratified 60/20/20 split (the same as ``digits``).
        noise: Standard deviation of the second modality's noise (its edges lie in [0, 1]).
    """
    try:
        noise = float(noise)
    except (TypeError, ValueError):
        noise = -1.0
    if not noise >= 0:
        raise UserError(f"task option noise must be a number >= 0, got {noise!r}. Set task.options.noise to e.g. 0.3.")
    first, second, labels = _digit_modalities(int(seed), noise)
    modalities = [TensorDataset(with_modality(torch.tensor(images), m), torch.tensor(labels)) for m, images in enumerate((first, second))]
    train, val, test = split_indices(int(seed))

    def both(indices: np.ndarray) -> ConcatDataset:
        return ConcatDataset([torch.utils.data.Subset(m, indices.tolist()) for m in modalities])

    return TwoViewTask(
        name="digits_2view",
        num_classes=10,
        input_shape=(2, 8, 8),
        train_set=PairedViews(*modalities, [(int(i), int(i)) for i in train]),
        val_set=both(val),
        test_set=both(test),
        metrics=tuple(RETRIEVAL_METRICS),
        image_channels=1,
    )


# --- reid_folder ----------------------------------------------------------------------------------

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Per-channel statistics of the ImageNet training images, the usual choice for person images.
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _TaggedImages(Dataset):
    """Image files of one modality as ``(tagged image, identity)``, read when asked for."""

    def __init__(self, items: list[tuple[Path, int]], modality: int, transform: Any) -> None:
        self.items, self.modality, self.transform = items, modality, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, identity = self.items[index]
        return with_modality(self.transform(pil_loader(str(path))), self.modality), identity


def _identity_images(folder: Path, layout: str) -> dict[str, list[Path]]:
    """``{identity: sorted image paths}`` of one modality folder; UserError when there is none."""
    if not folder.is_dir():
        raise UserError(
            f"modality folder '{folder}' not found; expected the layout {layout}. Set task.options.modality_a / modality_b to its two modality folders."
        )
    found = {
        sub.name: sorted(p for p in sub.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        for sub in sorted(folder.iterdir())
        if sub.is_dir()
    }
    found = {identity: paths for identity, paths in found.items() if paths}
    if not found:
        raise UserError(f"no identity folder with images ({', '.join(_IMAGE_SUFFIXES)}) in '{folder}'; expected the layout {layout}.")
    return found


@register_task("reid_folder", metrics=RETRIEVAL_METRICS, kind="two_view")
def reid_folder(
    root: str,
    modality_a: str = "Visible",
    modality_b: str = "Thermal",
    height: int = 128,
    width: int = 64,
    test_fraction: float = 0.5,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> TwoViewTask:
    """Build a cross-modal re-identification task from ``root/<modality>/<identity>/*`` (module docstring).

    Queries are ``modality_a`` images, the gallery ``modality_b`` images (RegDB's
    visible -> thermal). Training pairs the i-th image of an identity in one modality with its
    i-th in the other (cycling through the shorter list).

    Args:
        root: Folder holding the two modality folders.
        modality_a: The query modality's folder under ``root``.
        modality_b: The gallery modality's folder under ``root``.
        height: Height the images are resized to.
        width: Width the images are resized to.
        test_fraction: Share of the identities held out for the test split.
        val_fraction: Share of the remaining identities held out for the val split.
        seed: Seed of the choice of identities.
    """
    test_share = check_fraction("test_fraction", test_fraction)
    val_share = check_fraction("val_fraction", val_fraction)
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise UserError(
            f"task options height and width must be positive, got height={height}, width={width}. Set e.g. task.options.height: 128."
        )
    layout = f"'{root}/{modality_a}/<identity>/*.jpg' and '{root}/{modality_b}/<identity>/*.jpg'"
    if not Path(root).is_dir():
        raise UserError(f"re-id folder root '{root}' not found; set task.options.root to a folder laid out as {layout}.")
    first = _identity_images(Path(root) / modality_a, layout)
    second = _identity_images(Path(root) / modality_b, layout)
    one_sided = sorted(set(first) ^ set(second))
    if one_sided:
        raise UserError(
            f"identities {', '.join(one_sided[:5])}{' ...' if len(one_sided) > 5 else ''} have images in only one of "
            f"'{modality_a}' and '{modality_b}' under '{root}'; every identity needs images in both."
        )
    identities = sorted(first)
    if len(identities) < 3:
        raise UserError(
            f"'{root}' holds {len(identities)} identities; training, val and test take disjoint identities, so at least 3 are needed."
        )
    order = [identities[i] for i in np.random.default_rng(int(seed)).permutation(len(identities))]
    n_test = min(max(1, round(len(order) * test_share)), len(order) - 2)
    n_val = min(max(1, round((len(order) - n_test) * val_share)), len(order) - n_test - 1)
    test_ids, val_ids, train_ids = order[:n_test], order[n_test : n_test + n_val], sorted(order[n_test + n_val :])

    resize = [transforms.Resize((height, width)), transforms.ToTensor(), transforms.Normalize(_MEAN, _STD)]
    train_transform = transforms.Compose([transforms.RandomHorizontalFlip(), *resize])
    eval_transform = transforms.Compose(resize)

    def items(images: dict[str, list[Path]], ids: list[str], label: dict[str, int]) -> list[tuple[Path, int]]:
        return [(path, label[i]) for i in ids for path in images[i]]

    train_label = {identity: k for k, identity in enumerate(train_ids)}
    train_first = _TaggedImages(items(first, train_ids, train_label), 0, train_transform)
    train_second = _TaggedImages(items(second, train_ids, train_label), 1, train_transform)
    pairs, start_a, start_b = [], 0, 0
    for identity in train_ids:
        n_a, n_b = len(first[identity]), len(second[identity])
        pairs += [(start_a + k % n_a, start_b + k % n_b) for k in range(max(n_a, n_b))]
        start_a, start_b = start_a + n_a, start_b + n_b

    # Held-out identities keep their own labels (never a classifier's): they only decide matches.
    held_label = {identity: len(train_ids) + k for k, identity in enumerate(order[: n_test + n_val])}

    def held_out(ids: list[str]) -> ConcatDataset:
        return ConcatDataset([_TaggedImages(items(images, ids, held_label), m, eval_transform) for m, images in enumerate((first, second))])

    return TwoViewTask(
        name="reid_folder",
        num_classes=len(train_ids),
        input_shape=(4, height, width),
        train_set=PairedViews(train_first, train_second, pairs),
        val_set=held_out(val_ids),
        test_set=held_out(test_ids),
        metrics=tuple(RETRIEVAL_METRICS),
        eval_batch_size=64,
        image_channels=3,
    )
