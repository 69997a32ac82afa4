"""Model zoo: registered CIFAR/digits models, super-resolution models (EDSR, RDN), GRU and LSTM
sequence models, the wavelet paper's MNIST CNN, plus every torchvision classification model.

Importing this package registers the built-in models.
"""

from __future__ import annotations

from models import cifar_resnet, digits, edsr, lenet, mnist_cnn, rdn, recurrent, two_branch, vgg  # noqa: F401  (imported to register their models)
from models._registry import create_model, list_models, model_factory, register_model
from models.cifar_resnet import BasicBlock, CifarResNet, ZeroPadShortcut
from models.digits import DigitsCNN
from models.edsr import EDSR, ResBlock
from models.lenet import LeNet
from models.mnist_cnn import MnistCNN
from models.rdn import RDB, RDN
from models.recurrent import GRULayer, LSTMLayer, SequenceModel
from models.torchvision_models import torchvision_model_names
from models.two_branch import TwoBranch
from models.vgg import VGG

__all__ = [
    "register_model",
    "create_model",
    "list_models",
    "model_factory",
    "torchvision_model_names",
    "BasicBlock",
    "CifarResNet",
    "ZeroPadShortcut",
    "DigitsCNN",
    "EDSR",
    "LeNet",
    "ResBlock",
    "RDN",
    "RDB",
    "TwoBranch",
    "VGG",
    "MnistCNN",
    "GRULayer",
    "LSTMLayer",
    "SequenceModel",
]
