"""The ``imagefolder`` task: ImageNet-style class folders of image files."""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

from errors import UserError
from tasks._base import Task, TransformedSubset, check_fraction, holdout_indices
from tasks._registry import register_task

# Per-channel statistics of the ImageNet training images, the usual choice for natural photos.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def read_image(path: str):
    """An image file as RGB; a file that cannot be read is a UserError that names it.

    Used as the folders' loader: met by the pre-flight's sample it stops the search before it
    starts, met later in training it fails that trial with the file's name.
    """
    try:
        return datasets.folder.default_loader(path)
    except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise UserError(
            f"cannot read the image '{path}' ({type(err).__name__}: {' '.join(str(err).split())}). Replace or remove the file."
        ) from None


def _load_folder(path: Path, root: str, option: str) -> datasets.ImageFolder:
    """Open one split folder, turning a missing or empty folder into a UserError that shows the layout."""
    layout = f"'{root}/{path.name}/<class>/*.jpg' (one subfolder per class)"
    if not path.is_dir():
        raise UserError(
            f"image folder '{path}' not found. Expected the layout {layout}; set task.options.root to the "
            f"folder that holds it, or task.options.{option} to the name of the split folder."
        )
    try:
        return datasets.ImageFolder(str(path), loader=read_image)
    except FileNotFoundError as err:
        # ImageFolder raises this when there are no class subfolders or no image files in them.
        raise UserError(f"no images found in '{path}' ({err}). Expected the layout {layout}.") from err


@register_task("imagefolder")
def imagefolder(
    root: str,
    train_dir: str = "train",
    val_dir: str = "val",
    image_size: int = 224,
    resize: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Task:
    """Build a classification task from ``root/<train_dir>/<class>/*`` and ``root/<val_dir>/<class>/*``.

    A seeded part of the ``train_dir`` images is the val split used for model selection; the
    ``val_dir`` images are the test split, as is usual for ImageNet, whose test labels are not public.

    Args:
        root: Folder that holds the split folders.
        train_dir: Name of the training split folder under ``root``.
        val_dir: Name of the folder under ``root`` used as the test split.
        image_size: Side of the square crop fed to the model.
        resize: Shorter side the eval images are resized to before the center crop.
        val_fraction: Share of the training images held out as the val split.
        seed: Seed of the choice of val examples.
    """
    fraction = check_fraction("val_fraction", val_fraction)
    image_size = int(image_size)
    resize = int(resize)
    if image_size < 1 or resize < 1:
        raise UserError(
            f"task options image_size and resize must be positive, got image_size={image_size}, "
            f"resize={resize}. Set e.g. task.options.image_size: 224 and task.options.resize: 256."
        )

    normalize = [transforms.ToTensor(), transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)]
    train_transform = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), *normalize])
    eval_transform = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size), *normalize])

    if not Path(root).is_dir():
        raise UserError(
            f"image folder root '{root}' not found. Set task.options.root to a folder laid out as "
            f"'root/{train_dir}/<class>/*.jpg' and 'root/{val_dir}/<class>/*.jpg'."
        )
    full_train = _load_folder(Path(root) / train_dir, root, "train_dir")
    test_set = _load_folder(Path(root) / val_dir, root, "val_dir")
    if test_set.class_to_idx != full_train.class_to_idx:
        # Labels are folder positions, so differing class folders would silently mislabel the test split.
        missing = sorted(set(full_train.classes) ^ set(test_set.classes))
        raise UserError(
            f"class folders differ between '{Path(root) / train_dir}' and '{Path(root) / val_dir}': "
            f"{', '.join(missing)}. Both splits need the same <class> subfolders."
        )
    test_set.transform = eval_transform

    train_idx, val_idx = holdout_indices(len(full_train), fraction, int(seed))
    return Task(
        name="imagefolder",
        num_classes=len(full_train.classes),
        input_shape=(3, image_size, image_size),
        train_set=TransformedSubset(full_train, train_idx, train_transform),
        val_set=TransformedSubset(full_train, val_idx, eval_transform),
        test_set=test_set,
    )
