"""The ``cifar10`` and ``cifar100`` tasks, read from torchvision's on-disk CIFAR format."""

from __future__ import annotations

from torchvision import datasets, transforms

from errors import UserError
from tasks._base import Task, TransformedSubset, check_fraction, holdout_indices
from tasks._registry import register_task

# Per-channel statistics of the CIFAR training images, as commonly used.
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
_CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _build(
    *,
    name: str,
    title: str,
    dataset_cls: type[datasets.CIFAR10],
    num_classes: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    root: str,
    download: bool,
    val_fraction: float,
    augment: bool,
    seed: int,
) -> Task:
    """Build a CIFAR task whose val split is a seeded part of the official training set."""
    fraction = check_fraction("val_fraction", val_fraction)
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    eval_transform = transforms.Compose(normalize)
    if augment:
        train_transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *normalize])
    else:
        train_transform = eval_transform

    try:
        # No transform on the full training set: train and val views apply their own.
        full_train = dataset_cls(root=str(root), train=True, download=bool(download))
        test_set = dataset_cls(root=str(root), train=False, transform=eval_transform, download=False)
    except RuntimeError as err:
        # torchvision raises RuntimeError for missing or corrupted files, without naming either.
        raise UserError(
            f"{title} not found under '{root}' (or its files are incomplete). Set task.options.root to the "
            f"folder that holds '{dataset_cls.base_folder}', or set task.options.download: true on a machine "
            "with internet."
        ) from err
    except OSError as err:
        # A failed download (no network, no write access) surfaces as an OSError such as URLError.
        raise UserError(
            f"could not download {title} to '{root}': {err}. Download it on a machine with internet and "
            f"set task.options.root to the folder that holds '{dataset_cls.base_folder}'."
        ) from err

    train_idx, val_idx = holdout_indices(len(full_train), fraction, int(seed))
    return Task(
        name=name,
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        train_set=TransformedSubset(full_train, train_idx, train_transform),
        val_set=TransformedSubset(full_train, val_idx, eval_transform),
        test_set=test_set,
    )


@register_task("cifar10")
def cifar10(
    root: str = "./data",
    download: bool = False,
    val_fraction: float = 0.1,
    augment: bool = True,
    seed: int = 0,
) -> Task:
    """Build CIFAR-10: 10 classes of 3x32x32 images.

    Args:
        root: Folder that holds ``cifar-10-batches-py``.
        download: Download the data into ``root`` when it is missing (needs internet).
        val_fraction: Share of the official training set held out as the val split.
        augment: Random 32-pixel crop with 4 pixels of padding and horizontal flips on the train split.
        seed: Seed of the choice of val examples.
    """
    return _build(
        name="cifar10",
        title="CIFAR-10",
        dataset_cls=datasets.CIFAR10,
        num_classes=10,
        mean=_CIFAR10_MEAN,
        std=_CIFAR10_STD,
        root=root,
        download=download,
        val_fraction=val_fraction,
        augment=augment,
        seed=seed,
    )


@register_task("cifar100")
def cifar100(
    root: str = "./data",
    download: bool = False,
    val_fraction: float = 0.1,
    augment: bool = True,
    seed: int = 0,
) -> Task:
    """Build CIFAR-100: 100 fine-grained classes of 3x32x32 images.

    Args:
        root: Folder that holds ``cifar-100-python``.
        download: Download the data into ``root`` when it is missing (needs internet).
        val_fraction: Share of the official training set held out as the val split.
        augment: Random 32-pixel crop with 4 pixels of padding and horizontal flips on the train split.
        seed: Seed of the choice of val examples.
    """
    return _build(
        name="cifar100",
        title="CIFAR-100",
        dataset_cls=datasets.CIFAR100,
        num_classes=100,
        mean=_CIFAR100_MEAN,
        std=_CIFAR100_STD,
        root=root,
        download=download,
        val_fraction=val_fraction,
        augment=augment,
        seed=seed,
    )
