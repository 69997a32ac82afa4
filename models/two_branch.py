"""Two-branch models for two-view (cross-modal) tasks, after Tian et al., CVPR 2021 (arXiv 2104.02862).

Three encoders turn an image into an *observation* ``v``: one specific to each modality and one
shared by both. Each is followed by a linear classifier on ``v`` (the observation's posterior
p(y|v)) and by an information-bottleneck encoder, an MLP ``v -> hidden -> z``, whose
*representation* ``z`` has its own classifier (p(y|z)). The bottleneck width (``bottleneck``)
is how these models compress: the paper squeezes 2048 dimensions into 512.

Input: the image's ``C`` planes plus one last plane holding the modality (0 or 1, constant over
the plane), as the two-view tasks (:mod:`tasks.two_view`) write it. The plane routes each
example through its modality's specific branch during training; the retrieval path ignores it.

Outputs follow the re-identification convention (a BNNeck baseline returns logits in training
and features in evaluation), here:

* training mode: every head's logits, ``(batch, 4, classes)`` in the order of :data:`HEADS`, so
  the task's loss (cross-entropy on every head) and the variational distillation terms
  (:mod:`methods.variational`) read them from the step's outputs;
* evaluation mode: the shared representation's logits ``(batch, classes)``: the deployed
  network is the shared encoder, its bottleneck and its classifier (what FLOPs, latency and the
  export measure), and :meth:`TwoBranch.embed` gives the representation ``z`` that retrieval
  compares by cosine distance.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from errors import UserError
from models._registry import register_model

__all__ = ["HEADS", "Branch", "TwoBranch", "two_branch_digits", "two_branch_resnet"]

#: The heads of a training-mode output, in order (index 1 of the output).
HEADS = ("specific_observation", "specific_representation", "shared_observation", "shared_representation")


class Branch(nn.Module):
    """An encoder, the observation's classifier, the information-bottleneck encoder and the representation's classifier.

    Args:
        encoder: Image -> observation features ``(batch, features)``.
        features: Width of the observation.
        num_classes: Classes (identities) of both classifiers.
        bottleneck: Width of the representation ``z``.
    """

    def __init__(self, encoder: nn.Module, features: int, num_classes: int, bottleneck: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.observation_head = nn.Linear(features, num_classes)
        self.features = features
        self.num_classes = num_classes
        self.set_bottleneck(bottleneck)

    def set_bottleneck(self, bottleneck: int) -> None:
        """Build a new, randomly initialised bottleneck of width ``bottleneck`` and its classifier."""
        if bottleneck < 1:
            raise ValueError(f"`bottleneck >= 1` must hold, but got bottleneck={bottleneck}.")
        hidden = max(bottleneck, self.features // 2)
        device = self.observation_head.weight.device
        self.bottleneck = nn.Sequential(nn.Linear(self.features, hidden), nn.ReLU(), nn.Linear(hidden, bottleneck)).to(device)
        self.representation_head = nn.Linear(bottleneck, self.num_classes).to(device)

    @property
    def bottleneck_width(self) -> int:
        return self.representation_head.in_features

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Observation logits, representation logits and the representation ``z``."""
        v = self.encoder(images)
        z = self.bottleneck(v)
        return self.observation_head(v), self.representation_head(z), z


class TwoBranch(nn.Module):
    """Modality-specific branches and a shared branch (module docstring).

    Args:
        encoders: Three encoders (modality 0, modality 1, shared), each image -> ``(batch, features)``.
        features: Width of their observations.
        num_classes: Identities of the classifiers.
        bottleneck: Width of each representation.
        image_channels: ``C``, the image planes before the modality plane.
    """

    def __init__(self, encoders: list[nn.Module], features: int, num_classes: int, bottleneck: int, image_channels: int) -> None:
        super().__init__()
        if len(encoders) != 3:
            raise ValueError(f"a two-branch model takes 3 encoders (modality 0, modality 1, shared), but got {len(encoders)}.")
        self.specific = nn.ModuleList(Branch(e, features, num_classes, bottleneck) for e in encoders[:2])
        self.shared = Branch(encoders[2], features, num_classes, bottleneck)
        self.image_channels = image_channels

    @property
    def bottleneck_width(self) -> int:
        return self.shared.bottleneck_width

    def set_bottleneck(self, bottleneck: int) -> None:
        """Give every branch a new, randomly initialised bottleneck of width ``bottleneck``."""
        for branch in (*self.specific, self.shared):
            branch.set_bottleneck(bottleneck)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.image_channels + 1:
            raise ValueError(
                f"a two-branch model reads {self.image_channels} image planes plus a modality plane, shape "
                f"(batch, {self.image_channels + 1}, H, W), but got {tuple(x.shape)}; use it with a two-view task."
            )
        return x[:, : self.image_channels]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The shared representation ``z`` of each example, ``(batch, bottleneck)``: what retrieval compares."""
        return self.shared(self._images(x))[2]

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's logits, ``(batch, 4, classes)`` in the order of :data:`HEADS`."""
        images = self._images(x)
        modality = x[:, self.image_channels, 0, 0] > 0.5
        shared_v, shared_z, _ = self.shared(images)
        specific_v = torch.empty_like(shared_v)
        specific_z = torch.empty_like(shared_z)
        for index, rows in enumerate((~modality, modality)):
            if rows.any():
                # Each example through its own modality's branch only.
                v, z, _ = self.specific[index](images[rows])
                specific_v[rows] = v
                specific_z[rows] = z
        return torch.stack([specific_v, specific_z, shared_v, shared_z], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.heads(x)
        return self.shared(self._images(x))[1]


def _small_encoder(in_features: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 2 * width), nn.ReLU(), nn.Linear(2 * width, width), nn.ReLU())


@register_model("two_branch_digits")
def two_branch_digits(num_classes: int, in_channels: int = 1, image_size: int = 8, width: int = 64, bottleneck: int = 16) -> TwoBranch:
    """Two-branch model for small images (8x8 digits): each encoder a two-layer MLP.

    Args:
        num_classes: Identities.
        in_channels: Image planes (the modality plane comes on top).
        image_size: Side of the square images.
        width: Observation width.
        bottleneck: Representation width.
    """
    if width < 1 or bottleneck < 1 or image_size < 1:
        raise UserError(
            f"model two_branch_digits needs image_size, width and bottleneck >= 1, got image_size={image_size}, width={width}, bottleneck={bottleneck}."
        )
    encoders = [_small_encoder(in_channels * image_size * image_size, width) for _ in range(3)]
    return TwoBranch(encoders, width, num_classes, bottleneck, in_channels)


def _resnet_encoder(backbone: str, in_channels: int) -> tuple[nn.Module, int]:
    # weights=None: nothing is downloaded; a search starts from random weights (a checkpoint can be loaded as the baseline).
    net = torchvision.models.get_model(backbone, weights=None)
    if in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    features = net.fc.in_features
    net.fc = nn.Identity()
    return net, features


@register_model("two_branch_resnet")
def two_branch_resnet(num_classes: int, in_channels: int = 3, backbone: str = "resnet18", bottleneck: int = 128) -> TwoBranch:
    """Two-branch model on torchvision ResNets (the paper: three ResNet-50s, bottleneck 512).

    Args:
        num_classes: Identities.
        in_channels: Image planes (the modality plane comes on top).
        backbone: A torchvision ResNet (``resnet18``, ``resnet50``, ...).
        bottleneck: Representation width.
    """
    if not backbone.startswith(("resnet", "resnext", "wide_resnet")):
        raise UserError(f"model two_branch_resnet takes a torchvision ResNet as backbone (resnet18, resnet50, ...), got '{backbone}'.")
    if bottleneck < 1:
        raise UserError(f"model two_branch_resnet needs bottleneck >= 1, got {bottleneck}.")
    encoders = [_resnet_encoder(backbone, in_channels) for _ in range(3)]
    return TwoBranch([e for e, _ in encoders], encoders[0][1], num_classes, bottleneck, in_channels)
