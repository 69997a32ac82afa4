"""The resume contract, over ``methods.list_methods()``: a run resumed from any checkpoint ends as an uninterrupted one.

A trial checkpoints the :class:`methods.TrainingState` that :meth:`methods.Pipeline.run` hands
to ``on_epoch_end`` after every epoch (``search/trial/body.py`` writes it with ``torch.save``) and,
when retried, passes it back as ``resume``. Here each method runs alone on its first example
model (``Method.example_models``) with every training budget at 2 epochs, so that each of its
phases has a checkpoint inside it and one at its end; the run is then resumed from every
checkpoint in turn, in a fresh model, context and pipeline built from the JSON recipe, as a
retried trial is. The final weights, outputs on the validation batch, every later epoch's
metrics and the method's own figures must equal the uninterrupted run's bit for bit; only
wall-clock timings (decouple's ``latency_ms_*``), which no two runs share, are left out.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from methods import Pipeline, TrainingState, create_method, get_method, hyperparameters, list_methods

METHODS = list_methods()
EPOCHS = 2  # of every phase: a checkpoint inside it and one at its end


def is_timing(key: str) -> bool:
    """A figure timed on the clock (``decouple.latency_ms_static``): it differs between any two runs."""
    return key.split(".")[-1].startswith("latency_ms")


def learnt(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` without the timings."""
    return {key: value for key, value in metrics.items() if not is_timing(key)}


def recipe(name: str) -> list[dict[str, Any]]:
    """``name`` at its defaults, with every training budget (epochs of each phase) at :data:`EPOCHS`, as JSON gives it."""
    budgets = {h.name: EPOCHS for h in hyperparameters(get_method(name).Config) if h.budget}
    return json.loads(json.dumps(Pipeline([create_method(name, budgets)]).recipe()))


def _saved(state: TrainingState) -> bytes:
    # What a trial does: the state is written out, so nothing the run does later can change it.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _loaded(data: bytes) -> TrainingState:
    return torch.load(io.BytesIO(data), weights_only=False)


@dataclass
class Run:
    weights: dict[str, torch.Tensor]
    outputs: torch.Tensor
    metrics: dict[str, float]
    history: list[dict[str, float]]
    checkpoints: list[bytes]


def run(example_models, name: str, resume: bytes | None = None) -> Run:
    """Method ``name`` on its first example model from the start, or from the checkpoint ``resume``."""
    model, ctx = example_models(get_method(name).example_models[0], epochs=EPOCHS, shuffle=True)
    history: list[dict[str, float]] = []
    checkpoints: list[bytes] = []

    def on_epoch_end(state: TrainingState, metrics: dict[str, float]) -> None:
        checkpoints.append(_saved(state))
        history.append(metrics)

    torch.manual_seed(0)  # as the trial seeds itself; a resumed run then takes the checkpoint's random state
    pipeline = Pipeline.from_recipe(recipe(name))
    final = pipeline.run(model, ctx, on_epoch_end=on_epoch_end, resume=_loaded(resume) if resume is not None else None).eval()
    inputs = ctx.val_loader[0][0]
    with torch.no_grad():
        outputs = final(inputs)
    return Run(final.state_dict(), outputs, pipeline.metrics(), history, checkpoints)


def where(checkpoint: bytes, following: bytes | None) -> str:
    """``stage/phase/epoch`` and whether the checkpoint is inside its phase or at its end (the next one is in another phase)."""
    state = _loaded(checkpoint)
    inside = following is not None and (_loaded(following).stage, _loaded(following).phase) == (state.stage, state.phase)
    return f"stage {state.stage}, phase {state.phase}, epoch {state.epoch} ({'inside the phase' if inside else 'at its end'})"


@pytest.mark.parametrize("name", METHODS)
def test_resumed_run_ends_with_the_uninterrupted_weights_and_metrics(example_models, name: str) -> None:
    reference = run(example_models, name)
    count = len(reference.checkpoints)
    places = [where(c, reference.checkpoints[i + 1] if i + 1 < count else None) for i, c in enumerate(reference.checkpoints)]
    # Every phase has EPOCHS epochs: the run is resumed inside phases and at their ends.
    assert any("inside" in p for p in places) and any("at its end" in p for p in places), places
    for index, place in enumerate(places):
        resumed = run(example_models, name, resume=reference.checkpoints[index])
        assert resumed.history == reference.history[index + 1 :], f"{name} resumed at {place}: the later epochs' metrics differ"
        assert resumed.weights.keys() == reference.weights.keys(), f"{name} resumed at {place}: other parameters"
        for key, value in reference.weights.items():
            assert torch.equal(resumed.weights[key], value), f"{name} resumed at {place}: {key} differs"
        assert torch.equal(resumed.outputs, reference.outputs), f"{name} resumed at {place}: the outputs differ"
        assert resumed.metrics.keys() == reference.metrics.keys(), f"{name} resumed at {place}: other figures"
        assert learnt(resumed.metrics) == learnt(reference.metrics), f"{name} resumed at {place}: the method's figures differ"
        assert len(resumed.checkpoints) == count - index - 1
