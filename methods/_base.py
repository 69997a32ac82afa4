"""The lifecycle every compression method follows inside one trial.

A method is applied to a model in three moments, like torchao's ``prepare``/``convert`` split:

1. :meth:`Method.prepare` transforms the model before training (insert masks, swap layers for
   quantized or cheap ones, prune one-shot).
2. The shared training loop (:mod:`methods._pipeline`) trains the method's :meth:`Method.phases`.
   A :class:`Phase` declares its own loss (adversarial, several students) if any, whether it
   trains on the task loss, the parameter groups of its optimizer, the optimizer steps it takes
   on parameters the method owns outside the model (:class:`Update`: a discriminator), and hooks
   the loop calls at its start and end, at the start and end of every epoch and after every
   optimizer step (FISTA, ADMM, multiplier updates).
3. :meth:`Method.finalize` makes the result real (physically remove structures, fold, pack) and
   phases marked ``after_finalize`` (a fine-tune of the smaller model) follow it.

The loop composes each step's loss (:func:`methods._pipeline.training_loss`): the task loss when
the phase trains on it, plus the :meth:`Method.loss` term of every method whose
:attr:`Method.loss_scope` reaches the phase (``"own"``: the method's own phases, a penalty;
``"later"``: its own phases and those of every method after it; ``"pipeline"``: every phase of
every method, as distillation), plus the phase's own loss. :class:`Step` hands the terms the
batch (several views where the task yields them), the model's outputs, the teacher's outputs and
named intermediate features, each computed once per step. A method keeps what it learns between
hooks (masks' sites, multipliers, a discriminator, its figures) in attributes set in
``__init__`` and saves and restores them through :meth:`Method.state_dict` and
:meth:`Method.load_state_dict`, so a trial resumes bit-exactly from any epoch's checkpoint.

Deciding (scores, masks, bits) stays apart from doing (surgery, export): methods keep their
decision logic in small functions that tests can call directly.

This module holds the method itself (:class:`Method`, its capability flags and hooks), what it
sees in a trial (:class:`MethodContext`) and how it declines a model (:class:`NotApplicable`).
What the loop and a method hand each other during training (:class:`Step`, :class:`Phase`,
:class:`~methods._training.Update`) is in :mod:`methods._training`, and what a config declares
about its fields in :mod:`methods._hyperparameters`: each is read on its own (the loop needs no
method, ``slimtune methods`` and a space's checks need only the declarations).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from methods._training import Phase, Step

__all__ = ["LOSS_SCOPES", "NotApplicable", "Method", "MethodContext", "Touches"]


@dataclass
class MethodContext:
    """Everything a method may use in a trial; built by the trial, read by methods.

    Attributes:
        teacher: The frozen uncompressed baseline (eval mode, on ``device``).
        train_loader: Batches of (inputs, targets) for training.
        val_loader: Batches used to choose between candidates (for example the best student).
        task_loss: The task's loss, ``task_loss(outputs, targets)``.
        evaluate: ``evaluate(model) -> {"accuracy": ..., "loss": ...}`` on the validation data.
        metric: The task's headline quality metric in ``evaluate``'s result (``"accuracy"``;
            ``"psnr"`` for super-resolution; ``"bpc"`` for character text); use it to choose
            between candidates.
        metric_direction: ``"max"`` when a higher ``metric`` is better, ``"min"`` when lower is.
        example_input: One input batch of size 1 on ``device``, for tracing and torch-pruning.
        device: Where the trial trains.
        epochs: Default length of a method's training phase (the space's ``budget.epochs``).
        lr: Default learning rate (the space's ``training.lr``).
        optimizer: ``"sgd"`` or ``"adam"`` (the space's ``training.optimizer``).
        weight_decay: Default weight decay of the optimizer.
        seed: The trial's seed.
        log: ``log(message)`` writes a line to the trial's log.
    """

    teacher: nn.Module
    train_loader: Any
    val_loader: Any
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    example_input: torch.Tensor
    device: torch.device
    metric: str = "accuracy"
    metric_direction: str = "max"
    epochs: int = 1
    lr: float = 0.01
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    seed: int = 0
    log: Callable[[str], None] = print


class NotApplicable(ValueError):
    """Raised by :meth:`Method.prepare` and :meth:`Method.touches` for a model the method cannot compress.

    One line that starts with the method's name and names the layer or op it cannot handle (or
    that it finds nothing it acts on) and what would work instead ("wavelet found no square
    linear map ..."); a method never silently leaves a model unchanged. ``tests/methods/
    test_foreign.py`` holds every method to this on models outside the registry. The contract suite runs a method only on the models it names in
    :attr:`Method.example_models`, and fails it where it raises this for one of them.
    """


@dataclass(frozen=True)
class Touches:
    """What a method will change on a model and what it leaves alone (:meth:`Method.touches`).

    Attributes:
        changed: Names of the layers the method changes (prunes, swaps, wraps, quantizes).
        left_alone: ``(layer, why)`` for each layer of a kind the method acts on that it leaves as it is.
    """

    changed: tuple[str, ...]
    left_alone: tuple[tuple[str, str], ...] = ()

    @classmethod
    def split(cls, model: nn.Module, changed: Iterable[str], why: Callable[[str, nn.Module], str]) -> Touches:
        """``changed`` as given, and every other layer of ``model`` left alone for the reason ``why(name, layer)``.

        A layer is a module with a weight matrix or kernel of its own (convolution, linear,
        embedding, attention), not a batch norm or an activation.
        """
        changed = tuple(changed)
        done = set(changed)
        left = tuple((name, why(name, m)) for name, m in model.named_modules() if name and name not in done and _is_layer(m))
        return cls(changed, left)


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or any(p.dim() >= 2 for p in module.parameters(recurse=False))


def _layer_signature(module: nn.Module) -> tuple[Any, ...]:
    return (type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters()))


#: Where a method's :meth:`Method.loss` term applies (:attr:`Method.loss_scope`).
LOSS_SCOPES = ("own", "later", "pipeline")


class Method:
    """Base class of a compression method. Subclasses set the class attributes and override hooks.

    Class attributes (capability flags, read without building the method):
        name: Registry name, as written in a search space.
        Config: Frozen dataclass of hyperparameters (fields made with
            :func:`methods.hyperparameter`, which declares each one's type, valid bounds and
            which end compresses more); :func:`methods.create_method` checks values against
            them, and its ``__post_init__`` checks only rules between fields.
        kind: ``"pruning"``, ``"quantization"``, ``"distillation"`` or ``"reparameterisation"``.
        needs_teacher: Uses the frozen baseline during training.
        needs_labels: Uses the task's labels during training.
        changes_architecture: Changes the model's structure (shapes or module types).
        must_be_last: Nothing may follow it in a pipeline (quantized weights are final).
        restructured_only_by: The kinds of method that may change the architecture after it
            (None: any; empty: none). A method whose layers later methods cannot see into (kse's
            clustered convolutions) admits none; methods that keep the architecture (kd) may
            always follow.
        restructured_only_by_reason: Why, for :func:`check_pipeline`'s message (None: no
            reason beyond the rule).
        loss_scope: Where :meth:`loss` applies: ``"own"`` (the method's own phases: a penalty on
            its own variables), ``"later"`` (its own phases and those of every method after it:
            a term that keeps structures it leaves in the model valid), ``"pipeline"`` (every
            phase of every method, wherever it stands: distillation).
        loss_only: The method only adds a loss term; its own phases run only when no other
            method in the pipeline trains, so "prune + kd" is one distilled fine-tune (and, among
            loss-only methods alone, a ``"pipeline"``-scoped one's phases run only when no
            loss-only method precedes it: "vcd + vml" is one fine-tune with both terms). Its
            ``loss_scope`` must then reach the other methods' phases
            (:func:`methods._pipeline.check_pipeline` refuses a pipeline where it cannot).
        task_kinds: The kinds of task it applies to (``"classification"``,
            ``"super_resolution"``); None for any. A space pairing it with another kind of task
            is rejected when loaded.
        onnx_unsupported: Why its models cannot be exported to ONNX (``model.onnx``,
            :mod:`deploy._onnx`), or None when they can. Every registered method's models export
            today; a method that adds an op without an ONNX function says so here, and trials of
            a pipeline holding it deploy the program alone (``slimtune check`` shows the reason).
        applies_to: The kinds of layer it changes, in a few words (``slimtune methods`` shows it).
        example_models: Registered models it compresses: the method contract suite
            (``tests/methods/test_contract.py``) checks the method on each, its one-step and
            resume checks on the first.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    kind: ClassVar[str]
    needs_teacher: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = True
    changes_architecture: ClassVar[bool] = False
    must_be_last: ClassVar[bool] = False
    restructured_only_by: ClassVar[tuple[str, ...] | None] = None
    restructured_only_by_reason: ClassVar[str | None] = None
    loss_only: ClassVar[bool] = False
    loss_scope: ClassVar[str] = "own"
    task_kinds: ClassVar[tuple[str, ...] | None] = None
    onnx_unsupported: ClassVar[str | None] = None
    applies_to: ClassVar[str] = "no layer (it changes how the model is trained)"
    example_models: ClassVar[tuple[str, ...]] = ("digits_cnn", "resnet20")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.loss_scope not in LOSS_SCOPES:
            raise TypeError(f"`{cls.__name__}.loss_scope` must be one of {', '.join(LOSS_SCOPES)}, but got {cls.loss_scope!r}.")

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """This method is called once before the method's phases; it returns the model to train."""
        return model

    def touches(self, model: nn.Module, ctx: MethodContext) -> Touches:
        """This method is called by ``slimtune check`` before any trial; it says which layers the method will change.

        ``model`` is left as it is. The default prepares a copy of ``model`` with a fresh method
        of the same config and compares the two: a layer (:meth:`Touches.split`) whose type or
        parameter shapes differ, or that is gone, is changed; the others are left alone. A
        method that decides later than :meth:`prepare` (during training or in :meth:`finalize`),
        or that can say why it leaves a layer alone, overrides this.

        Raises:
            NotApplicable: The method cannot compress ``model`` (as :meth:`prepare` would raise).
        """
        prepared = dict(type(self)(self.config).prepare(copy.deepcopy(model), ctx).named_modules())
        changed = [
            name for name, m in model.named_modules()
            if _is_layer(m) and (name not in prepared or _layer_signature(prepared[name]) != _layer_signature(m))
        ]  # fmt: skip
        return Touches.split(model, changed, lambda name, m: f"{self.name} changes only {self.applies_to}")

    @classmethod
    def model_facts(cls, model: nn.Module, example_input: torch.Tensor) -> Any:
        """This method is called once per search, before any trial, on a model built as the space's baseline.

        It returns what :meth:`effective_config` needs to know about the model the method will
        see (the layers it would change and their widths), computed once so that resolving a
        configuration costs microseconds. Only the structure may matter: ``model``'s weights are
        a fresh initialisation, not the trained baseline's. ``model`` is left as it is. The
        default (a method whose configuration resolves without the model, or not at all) is None.
        """
        return None

    @classmethod
    def effective_config(cls, config: Any, facts: Any) -> dict[str, Any]:
        """This method is called by the search for every proposed trial; it says what ``config`` will build.

        ``facts`` is what :meth:`model_facts` returned for the model the method will see. The
        result holds the config's values as they decide the model and its training: two configs
        with equal results must build and train the same model, bit for bit, so that a trial of
        the second would repeat the first (the search refuses it as a duplicate). A value that
        rounds to a discrete outcome on the model is replaced by that outcome (a pruning ratio by
        the channels each layer keeps); a value that acts only through training (a threshold, a
        learning rate) stays as it is; when unsure, keep the value as it is (a missed duplicate
        costs a trial's time, a false one loses a recipe). Values are hashable. The default is
        every field of the config as it is.
        """
        return asdict(config)

    def phases(self, ctx: MethodContext) -> list[Phase]:
        """This method is called after :meth:`prepare`; it lists the training the method owns.

        The default is one fine-tune of ``ctx.epochs`` on the task loss.
        """
        return [Phase(name="finetune", epochs=ctx.epochs)]

    def loss(self, step: Step) -> torch.Tensor | None:
        """This method is called every step of every phase that :attr:`loss_scope` reaches.

        It returns the method's loss term (None: nothing this step), which the loop adds to the
        step's loss.
        """
        return None

    def feature_modules(self) -> tuple[str, ...]:
        """This method is called when a phase starts in which :meth:`loss` or the method's phase loss runs.

        It names the modules whose outputs :meth:`Step.features` and :meth:`Step.teacher_features`
        must return: the step records them during the forward pass that computes the outputs.
        """
        return ()

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """This method is called once after the method's phases; it returns the final model."""
        return model

    def metrics(self) -> dict[str, float]:
        """This method is called after :meth:`finalize`; it reports the method's own figures."""
        return {}

    def cost(self, model: nn.Module, ctx: MethodContext) -> dict[str, float]:
        """This method is called once the whole pipeline has run, with the final model.

        It returns cost figures that the FLOP counter cannot see, keyed by cost metric
        (``{"macs": ...}`` for a clustered convolution's real work, a gated network's expected
        MACs on the validation data); they replace the measured values in the trial's metrics.
        The default reports nothing.
        """
        return {}

    def artifacts(self, model: nn.Module, ctx: MethodContext, folder: Path) -> list[Path]:
        """This method is called once the whole pipeline has run and the final model is measured.

        It writes files about the result (a report, plots) into ``folder``, which it creates,
        and returns their paths; the trial keeps them with its exported model. The default
        writes nothing.
        """
        return []

    def recipe_params(self) -> dict[str, Any]:
        """This method is called when the pipeline's recipe is written (``Pipeline.recipe``), also after the run.

        It returns the hyperparameters in effect, JSON-serialisable, which :func:`create_method`
        accepts back. A method that makes a decision a replay must not make again (one timed on
        the machine) adds it here as a hyperparameter. The default is the config as it is.
        """
        return asdict(self.config)

    def state_dict(self) -> dict[str, Any]:
        """This method is called at every checkpoint; it returns what the method has learnt so far.

        Everything the method keeps between hooks (not in the model): decisions, owned modules'
        weights, multipliers, figures. Values are tensors, plain Python data, or nested dicts of
        them. The default (a method that keeps nothing) is ``{}``.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This method is called when a run resumes, on a method built from the recipe, with :meth:`state_dict`'s value.

        The method is not prepared again: the checkpointed model already is.
        """
        if state:
            raise ValueError(f"method '{self.name}' keeps no state, but the checkpoint holds {sorted(state)}.")
