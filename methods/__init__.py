"""Compression methods: one lifecycle, a registry and a pipeline.

Importing this package registers every method below; adding a method is one new file plus one
import line here.
"""

from methods._base import LOSS_SCOPES, Method, MethodContext, NotApplicable, Touches
from methods._hyperparameters import Bounds, HyperparameterInfo, Range, check_value_type, hyperparameter, hyperparameters
from methods._pipeline import NonFiniteLossError, Pipeline, TrainingState, check_pipeline, train_phase, training_loss
from methods._registry import create_method, get_method, list_methods, register_method
from methods._training import Phase, Step, Update

# Each import registers one method.
from methods import decouple, gal, kd, kse, l1_filter, minmax_quant, od, pams, ssr, variational, wavelet  # noqa: E402,F401  isort: skip

__all__ = [
    "Method",
    "NotApplicable",
    "MethodContext",
    "Touches",
    "Phase",
    "Range",
    "Step",
    "Update",
    "LOSS_SCOPES",
    "Bounds",
    "hyperparameter",
    "hyperparameters",
    "HyperparameterInfo",
    "check_value_type",
    "Pipeline",
    "TrainingState",
    "NonFiniteLossError",
    "check_pipeline",
    "train_phase",
    "training_loss",
    "create_method",
    "get_method",
    "list_methods",
    "register_method",
]
