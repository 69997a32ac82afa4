"""The ``sr`` task: single-image super-resolution at x2, x3 or x4, judged by PSNR and SSIM on Y.

Data. High-resolution (HR) images are cropped to a multiple of the scale (``mod_crop``, top
left kept, as MATLAB's ``modcrop``); the low-resolution (LR) input is the HR image shrunk by
the scale with antialiased bicubic interpolation (``torch.nn.functional.interpolate(...,
mode="bicubic", antialias=True)``, PIL's kernel, the closest torch has to MATLAB's ``imresize``)
and rounded to 8 bits, as a stored LR image is. Pixels are RGB in ``[0, rgb_range]`` (255, the
EDSR convention).

- Training: random aligned patches, ``patch_size`` HR pixels square (``patch_size / scale`` LR),
  ``patches_per_epoch`` per epoch, each from a uniformly chosen image with random flips and
  transposition. Positions come from torch's global random state, like torchvision's random
  crops, so a seeded trial draws the same patches.
- Evaluation: whole images, one per batch (``eval_batch_size`` 1).

Sources. ``train_root`` is a folder of HR images or a folder holding ``DIV2K_train_HR`` (DIV2K);
``test_root`` a folder of HR images or one holding ``HR`` (EDSR's ``benchmark/Set14/HR``
layout); files named ``*_HR.*`` are used alone when present (the ``image_SRF_4`` layout).
``val_root`` likewise; without it the last ``val_images`` images (at most a tenth) of the
training folder are held out. Without folders the task uses images that ship inside
scikit-image (``skimage.data``, no download): :data:`EMBEDDED_TRAIN` for patches,
:data:`EMBEDDED_VAL` and :data:`EMBEDDED_TEST` held out, each centre-cropped to
``EMBEDDED_EVAL_CROP`` pixels so an evaluation takes a fraction of a second on a CPU; grey
images are replicated to RGB.

Metrics (EDSR's Python evaluation, which follows the MATLAB scripts): the output is clipped to
``[0, rgb_range]`` and rounded to 8 bits; Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 for
RGB in [0, 255] (ITU-R BT.601, not rounded); ``scale`` pixels are cut off each border; PSNR =
10 log10(255^2 / MSE) (MSE floored at 1e-10, so identical images give about 148 dB); SSIM with
an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03 and L = 255, averaged over the
positions where the window fits. Both are averaged over the images.

The task has no classes: ``num_classes`` is 0 and :meth:`SRTask.model_kwargs` gives the
model ``scale``, ``in_channels`` and ``rgb_range`` instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from errors import UserError
from tasks._base import Task
from tasks._registry import register_task

__all__ = [
    "SRTask",
    "SRPatches",
    "SRImages",
    "BicubicUpsampler",
    "bicubic_baseline",
    "bicubic_downsample",
    "mod_crop",
    "rgb_to_y",
    "psnr",
    "ssim",
    "load_image_folder",
    "EMBEDDED_TRAIN",
    "EMBEDDED_VAL",
    "EMBEDDED_TEST",
]

#: ``skimage.data`` images (all bundled with the package) used for training patches.
EMBEDDED_TRAIN = ("astronaut", "rocket", "immunohistochemistry", "retina", "hubble_deep_field", "brick", "grass", "moon")
#: Held out for model selection inside trials.
EMBEDDED_VAL = ("chelsea", "gravel")
#: Held out for the reported metrics.
EMBEDDED_TEST = ("coffee", "camera", "coins")
EMBEDDED_EVAL_CROP = 256

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SCALES = (2, 3, 4)

# SSIM constants of Wang et al. (2004) for 8-bit images.
_SSIM_WINDOW, _SSIM_SIGMA, _K1, _K2, _PEAK = 11, 1.5, 0.01, 0.03, 255.0

Image = torch.Tensor  # uint8, (3, H, W)


# --- image helpers ------------------------------------------------------------------------------


def to_rgb_uint8(array: np.ndarray) -> Image:
    """An ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array as a ``(3, H, W)`` uint8 tensor (grey replicated, alpha dropped)."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, got dtype {array.dtype}.")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected a grey, RGB or RGBA image, got shape {array.shape}.")
    return torch.from_numpy(np.array(array[:, :, :3])).permute(2, 0, 1).contiguous()


def mod_crop(image: Image, scale: int) -> Image:
    """Crop height and width down to multiples of ``scale``, keeping the top-left corner."""
    h, w = image.shape[-2:]
    return image[..., : h - h % scale, : w - w % scale]


def center_crop(image: Image, size: int) -> Image:
    """The central ``size`` x ``size`` region (each side at most the image's)."""
    h, w = image.shape[-2:]
    th, tw = min(size, h), min(size, w)
    top, left = (h - th) // 2, (w - tw) // 2
    return image[..., top : top + th, left : left + tw]


def bicubic_downsample(hr: Image, scale: int) -> Image:
    """Shrink a uint8 image whose sides are multiples of ``scale`` by ``scale`` (antialiased bicubic), rounded to uint8."""
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"the HR image {h}x{w} is not a multiple of the scale {scale}; mod_crop it first.")
    lr = F.interpolate(hr[None].float(), size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    return lr[0].clamp(0, 255).round().to(torch.uint8)


def rgb_to_y(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of ``(N, 3, H, W)`` RGB in [0, 255]: ``(N, 1, H, W)`` float64 in [16, 235]."""
    rgb = rgb.to(torch.float64)
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64, device=rgb.device).reshape(1, 3, 1, 1)
    return 16.0 + (rgb * weights).sum(dim=1, keepdim=True) / 255.0


def psnr(x: torch.Tensor, y: torch.Tensor, peak: float = _PEAK) -> torch.Tensor:
    """Per-image PSNR in dB of two ``(N, C, H, W)`` batches (MSE floored at 1e-10)."""
    mse = (x.to(torch.float64) - y.to(torch.float64)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(peak**2 / mse.clamp_min(1e-10))


@functools.lru_cache(maxsize=8)
def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).reshape(1, 1, size, size)


def ssim(x: torch.Tensor, y: torch.Tensor, peak: float = _PEAK) -> torch.Tensor:
    """Per-image SSIM of two ``(N, 1, H, W)`` batches with values in ``[0, peak]``.

    Gaussian window 11x11, sigma 1.5; means and (population) variances over the window;
    the SSIM map is averaged where the window fits entirely (MATLAB's ``filter2(..., 'valid')``).
    """
    if x.shape[-1] < _SSIM_WINDOW or x.shape[-2] < _SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {_SSIM_WINDOW}x{_SSIM_WINDOW} pixels, got {tuple(x.shape[-2:])}.")
    x, y = x.to(torch.float64), y.to(torch.float64)
    window = _gaussian_window(_SSIM_WINDOW, _SSIM_SIGMA).to(x.device)
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x**2
    var_y = F.conv2d(y * y, window) - mu_y**2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    c1, c2 = (_K1 * peak) ** 2, (_K2 * peak) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


# --- data sets ----------------------------------------------------------------------------------


Pair = tuple[Image, Image]  # (LR, HR), uint8


def make_pairs(images: list[Image], scale: int) -> list[Pair]:
    """(LR, HR) uint8 pairs: each HR mod-cropped to ``scale``, its LR made by bicubic downsampling."""
    pairs = []
    for image in images:
        hr = mod_crop(image, scale)
        pairs.append((bicubic_downsample(hr, scale), hr))
    return pairs


class SRPatches(Dataset):
    """Random aligned (LR, HR) patches of a list of image pairs; ``len`` patches per epoch.

    Args:
        pairs: (LR, HR) uint8 images.
        scale: HR size / LR size.
        patch_size: Side of an HR patch (a multiple of ``scale``).
        length: Patches per epoch.
        rgb_range: Pixel values are scaled to ``[0, rgb_range]``.
        augment: Random horizontal and vertical flips and transposition.
    """

    def __init__(self, pairs: list[Pair], scale: int, patch_size: int, length: int, rgb_range: float, augment: bool = True) -> None:
        self.pairs = pairs
        self.scale = scale
        self.patch_size = patch_size
        self.length = length
        self.rgb_range = rgb_range
        self.augment = augment

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        lr, hr = self.pairs[int(torch.randint(len(self.pairs), ()))]
        lp, s = self.patch_size // self.scale, self.scale
        y = int(torch.randint(lr.shape[1] - lp + 1, ()))
        x = int(torch.randint(lr.shape[2] - lp + 1, ()))
        lr_patch = lr[:, y : y + lp, x : x + lp]
        hr_patch = hr[:, y * s : (y + lp) * s, x * s : (x + lp) * s]
        if self.augment:
            flips = torch.rand(3)
            if flips[0] < 0.5:
                lr_patch, hr_patch = lr_patch.flip(2), hr_patch.flip(2)
            if flips[1] < 0.5:
                lr_patch, hr_patch = lr_patch.flip(1), hr_patch.flip(1)
            if flips[2] < 0.5:
                lr_patch, hr_patch = lr_patch.transpose(1, 2), hr_patch.transpose(1, 2)
        unit = self.rgb_range / 255.0
        return lr_patch.float() * unit, hr_patch.float() * unit


class SRImages(Dataset):
    """Whole (LR, HR) images for evaluation, pixel values in ``[0, rgb_range]``."""

    def __init__(self, pairs: list[Pair], rgb_range: float, names: list[str] | None = None) -> None:
        self.pairs = pairs
        self.rgb_range = rgb_range
        self.names = names or [str(i) for i in range(len(pairs))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        lr, hr = self.pairs[index]
        unit = self.rgb_range / 255.0
        return lr.float() * unit, hr.float() * unit


def image_files(folder: Path) -> list[Path]:
    """Image files of ``folder``, sorted; only the ``*_HR.*`` ones when there are any."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    hr_only = [p for p in files if p.stem.endswith("_HR")]
    return hr_only or files


def load_image_folder(root: str, option: str, subfolder: str | None = None, limit: int | None = None) -> list[tuple[str, Image]]:
    """Read the images of a folder (png, jpg, bmp) as RGB uint8 tensors, sorted by file name.

    Args:
        root: The folder, or a folder holding ``subfolder`` (``DIV2K_train_HR``, ``HR``).
        option: The task option that named it, for the error message.
        subfolder: Used instead of ``root`` when it exists inside it.
        limit: Read at most this many (the first ones).

    Raises:
        UserError: The folder does not exist or holds no images.
    """
    from PIL import Image as PILImage

    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"task option {option}: folder '{root}' not found. Set task.options.{option} to a folder of HR images "
            f"(png, jpg or bmp){f' or one that holds {subfolder!r}' if subfolder else ''}."
        )
    if subfolder and (folder / subfolder).is_dir():
        folder = folder / subfolder
    files = image_files(folder)
    if not files:
        raise UserError(f"task option {option}: no png, jpg or bmp images in '{folder}'.")
    if limit is not None:
        files = files[:limit]
    out = []
    for path in files:
        with PILImage.open(path) as image:
            out.append((path.name, to_rgb_uint8(np.asarray(image.convert("RGB")))))
    return out


@functools.cache
def _embedded_image(name: str) -> Image:
    import skimage.data

    return to_rgb_uint8(getattr(skimage.data, name)())


def _embedded(names: tuple[str, ...], crop: int | None) -> list[tuple[str, Image]]:
    images = [(name, _embedded_image(name)) for name in names]
    return [(name, center_crop(img, crop) if crop else img) for name, img in images]


# --- the task -----------------------------------------------------------------------------------


class BicubicUpsampler(nn.Module):
    """Bicubic interpolation by ``scale``: the baseline every SR model must beat."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)


@dataclass
class SRTask(Task):
    """A super-resolution task: (LR, HR) pairs, L1 loss, PSNR and SSIM on Y.

    Attributes:
        scale: Upscaling factor.
        rgb_range: Pixel values run from 0 to this.
    """

    scale: int = 2
    rgb_range: float = 255.0

    def model_kwargs(self) -> dict[str, Any]:
        return {"scale": self.scale, "in_channels": 3, "rgb_range": self.rgb_range}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean absolute error between the super-resolved and the HR images (EDSR's L1)."""
        return F.l1_loss(outputs, targets)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device | str) -> dict[str, float]:
        """PSNR and SSIM on Y (module docstring) and the mean L1 loss, averaged over the images.

        The model runs in eval mode without gradients; its previous mode is restored afterwards.

        Returns:
            ``{"psnr": dB, "ssim": in [0, 1], "loss": mean L1 per pixel}``.

        Raises:
            ValueError: The loader yields no images, or the output's shape is not the HR image's.
        """
        was_training = model.training
        model.eval()
        psnrs, ssims, losses = [], [], []
        to_255 = 255.0 / self.rgb_range
        try:
            with torch.no_grad():
                for lr, hr in loader:
                    lr, hr = lr.to(device), hr.to(device)
                    sr = model(lr)
                    if sr.shape != hr.shape:
                        raise ValueError(
                            f"the model turned an LR batch {tuple(lr.shape)} into {tuple(sr.shape)}, expected {tuple(hr.shape)}."
                        )
                    losses.append(F.l1_loss(sr, hr, reduction="none").flatten(1).mean(1))
                    sr_8bit = (sr.clamp(0, self.rgb_range) * to_255).round()
                    s = self.scale
                    y_sr = rgb_to_y(sr_8bit)[..., s:-s, s:-s]
                    y_hr = rgb_to_y(hr * to_255)[..., s:-s, s:-s]
                    psnrs.append(psnr(y_sr, y_hr))
                    ssims.append(ssim(y_sr, y_hr))
        finally:
            model.train(was_training)
        if not psnrs:
            raise ValueError(f"cannot evaluate task '{self.name}': the loader yielded no images.")
        return {
            "psnr": torch.cat(psnrs).mean().item(),
            "ssim": torch.cat(ssims).mean().item(),
            "loss": torch.cat(losses).mean().item(),
        }


def bicubic_baseline(task: SRTask, split: str = "test", device: torch.device | str = "cpu") -> dict[str, float]:
    """PSNR, SSIM and L1 of plain bicubic upsampling on ``split`` (``"val"`` or ``"test"``)."""
    dataset = {"val": task.val_set, "test": task.test_set}[split]
    return task.evaluate(BicubicUpsampler(task.scale), DataLoader(dataset, batch_size=1), device)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise UserError(f"task option {name} must be a positive whole number, got {value!r}.")
    return int(value)


@register_task("sr", metrics={"psnr": "max", "ssim": "max"}, kind="super_resolution")
def sr(
    scale: int = 2,
    patch_size: int = 48,
    patches_per_epoch: int = 800,
    train_root: str | None = None,
    val_root: str | None = None,
    test_root: str | None = None,
    val_images: int = 10,
    rgb_range: float = 255.0,
    augment: bool = True,
) -> SRTask:
    """Build the super-resolution task (data and metrics: module docstring).

    Args:
        scale: Upscaling factor, 2, 3 or 4.
        patch_size: Side of a training HR patch, a multiple of ``scale`` (EDSR x2 trains on 96, x4 on 192).
        patches_per_epoch: Training patches per epoch (EDSR's "epoch" is 1000 batches of 16).
        train_root: DIV2K HR training images (or the folder holding ``DIV2K_train_HR``);
            None uses the images bundled with scikit-image.
        val_root: HR images for model selection; None holds out training images.
        test_root: HR images of the reported metrics, e.g. Set14 (or a folder holding ``HR``);
            None uses bundled images.
        val_images: At most this many validation images (first of ``val_root``, or the last of
            ``train_root``, there at most a tenth of them).
        rgb_range: Pixel values run from 0 to this.
        augment: Random flips and transposition of the training patches.
    """
    if scale not in SCALES:
        raise UserError(f"task option scale must be one of {', '.join(map(str, SCALES))}, got {scale!r}.")
    scale = int(scale)
    patch_size = _positive_int("patch_size", patch_size)
    if patch_size % scale:
        raise UserError(f"task option patch_size must be a multiple of scale={scale}, got {patch_size}; 48 fits x2, x3 and x4.")
    patches_per_epoch = _positive_int("patches_per_epoch", patches_per_epoch)
    val_images = _positive_int("val_images", val_images)
    rgb_range = float(rgb_range)
    if not rgb_range > 0:
        raise UserError(f"task option rgb_range must be positive, got {rgb_range}; use 255 (EDSR) or 1.")

    if train_root is not None:
        train = load_image_folder(train_root, "train_root", "DIV2K_train_HR")
    else:
        train = _embedded(EMBEDDED_TRAIN, None)
    if val_root is not None:
        val = load_image_folder(val_root, "val_root", "HR", limit=val_images)
    elif train_root is not None:
        if len(train) < 2:
            raise UserError(
                f"task option train_root: '{train_root}' holds {len(train)} image; 2 or more are needed to hold one out for validation, or set val_root."
            )
        held = max(1, min(val_images, len(train) // 10))
        train, val = train[:-held], train[-held:]
    else:
        val = _embedded(EMBEDDED_VAL, EMBEDDED_EVAL_CROP)
    test = load_image_folder(test_root, "test_root", "HR") if test_root is not None else _embedded(EMBEDDED_TEST, EMBEDDED_EVAL_CROP)

    train_pairs = make_pairs([img for _, img in train], scale)
    lr_patch = patch_size // scale
    small = [name for (name, _), (lr, _) in zip(train, train_pairs) if min(lr.shape[1:]) < lr_patch]
    if small:
        raise UserError(
            f"training image(s) {', '.join(small)} are smaller than patch_size={patch_size} at x{scale}; "
            "lower task.options.patch_size or remove them."
        )
    for split, images in (("val", val), ("test", test)):
        too_small = [name for name, img in images if min(img.shape[1:]) < 2 * scale + 11]
        if too_small:
            raise UserError(
                f"{split} image(s) {', '.join(too_small)} are too small to evaluate at x{scale} (SSIM needs 11 pixels after the border crop)."
            )

    return SRTask(
        name="sr",
        num_classes=0,
        input_shape=(3, lr_patch, lr_patch),
        train_set=SRPatches(train_pairs, scale, patch_size, patches_per_epoch, rgb_range, bool(augment)),
        val_set=SRImages(make_pairs([img for _, img in val], scale), rgb_range, [name for name, _ in val]),
        test_set=SRImages(make_pairs([img for _, img in test], scale), rgb_range, [name for name, _ in test]),
        metrics=("psnr", "ssim"),
        eval_batch_size=1,
        scale=scale,
        rgb_range=rgb_range,
    )
