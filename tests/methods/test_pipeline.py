"""The pipeline: resuming from a checkpoint, failing on a non-finite loss, ordering, loss-only methods."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from methods import NonFiniteLossError, Pipeline, TrainingState, create_method

RECIPE = [{"name": "l1_filter", "params": {"ratio": 0.5}}, {"name": "minmax_quant", "params": {"bits": 4}}]
EPOCHS = 2  # per phase: 4 epochs in all


def _saved(state: TrainingState) -> bytes:
    # What a trial does: the state is written to disk, so nothing later can change it.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _loaded(data: bytes) -> TrainingState:
    return torch.load(io.BytesIO(data), weights_only=False)


def _run(digits_context, resume: bytes | None = None):
    """Run RECIPE from scratch (or from a saved state) in a fresh process-like setting."""
    model, ctx = digits_context(epochs=EPOCHS, shuffle=True, examples=96, seed=0)
    states: list[bytes] = []
    history: list[dict[str, float]] = []

    def on_epoch_end(state: TrainingState, metrics: dict[str, float]) -> None:
        states.append(_saved(state))
        history.append(metrics)

    torch.manual_seed(0)
    final = Pipeline.from_recipe(RECIPE).run(
        model, ctx, on_epoch_end=on_epoch_end, resume=_loaded(resume) if resume is not None else None
    )
    final.eval()
    with torch.no_grad():
        outputs = final(ctx.val_loader[0][0])
    return final, outputs, states, history


@pytest.fixture(scope="module")
def uninterrupted(digits_context):
    return _run(digits_context)


def test_uninterrupted_run_checkpoints_every_epoch(uninterrupted) -> None:
    _, _, states, history = uninterrupted
    assert len(states) == 2 * EPOCHS
    assert [(m["epoch"], m["stage"]) for m in history] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    positions = [(s.stage, s.phase, s.epoch) for s in map(_loaded, states)]
    assert positions == [(0, 0, 1), (0, 0, 2), (1, 0, 1), (1, 0, 2)]


@pytest.mark.parametrize("after_epoch", [1, 2, 3])
def test_resume_gives_the_same_weights_and_outputs(digits_context, uninterrupted, after_epoch: int) -> None:
    """Epoch 1: mid-phase of l1_filter; 2: between the methods; 3: mid-phase of minmax_quant."""
    model, outputs, states, history = uninterrupted
    resumed, resumed_outputs, resumed_states, resumed_history = _run(digits_context, resume=states[after_epoch - 1])

    assert len(resumed_states) == 2 * EPOCHS - after_epoch
    assert [m["epoch"] for m in resumed_history] == list(range(after_epoch + 1, 2 * EPOCHS + 1))
    for expected, got in zip(history[after_epoch:], resumed_history, strict=True):
        assert got["train_loss"] == expected["train_loss"]
    reference = model.state_dict()
    got = resumed.state_dict()
    assert got.keys() == reference.keys()
    for key in reference:
        assert torch.equal(got[key], reference[key]), f"{key} differs after resuming from epoch {after_epoch}"
    assert torch.equal(resumed_outputs, outputs)


def test_nan_loss_raises_non_finite_loss_error(digits_context) -> None:
    model, ctx = digits_context()
    ctx.task_loss = lambda outputs, targets: F.cross_entropy(outputs, targets) * float("nan")
    with pytest.raises(NonFiniteLossError, match=r"the loss became nan in 'l1_filter/finetune' at epoch 0, iteration 0"):
        Pipeline([create_method("l1_filter", {})]).run(model, ctx)


def test_method_that_must_be_last_cannot_come_first() -> None:
    with pytest.raises(ValueError, match=r"'minmax_quant' must be last.*\['minmax_quant', 'l1_filter'\]"):
        Pipeline([create_method("minmax_quant", {}), create_method("l1_filter", {})])
    assert len(Pipeline([create_method("l1_filter", {}), create_method("minmax_quant", {})]).methods) == 2


def test_method_cannot_appear_twice() -> None:
    with pytest.raises(ValueError, match="'l1_filter' appears twice"):
        Pipeline([create_method("l1_filter", {}), create_method("l1_filter", {"ratio": 0.2})])


def _count_kd_calls(kd):
    calls = []
    original = kd.loss

    def loss(step):
        value = original(step)
        calls.append(float(value.detach()))
        return value

    kd.loss = loss  # the pipeline collects each method's bound `loss` when it runs
    return calls


def test_kd_beside_l1_filter_only_shapes_l1_filter_training(digits_context) -> None:
    model, ctx = digits_context(epochs=EPOCHS)
    kd = create_method("kd", {})
    calls = _count_kd_calls(kd)
    history = []
    Pipeline([create_method("l1_filter", {}), kd]).run(model, ctx, on_epoch_end=lambda s, m: history.append(m))
    assert [(m["epoch"], m["stage"]) for m in history] == [(1, 0), (2, 0)]
    # The distillation term was added at every step of l1_filter's fine-tune (2 batches an epoch).
    assert len(calls) == EPOCHS * len(ctx.train_loader)
    assert all(c > 0 for c in calls)


def test_kd_alone_runs_its_own_phase(digits_context) -> None:
    model, ctx = digits_context(epochs=EPOCHS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kd = create_method("kd", {})
    calls = _count_kd_calls(kd)
    history = []
    final = Pipeline([kd]).run(model, ctx, on_epoch_end=lambda s, m: history.append(m))
    assert [(m["epoch"], m["stage"]) for m in history] == [(1, 0), (2, 0)]
    assert len(calls) == EPOCHS * len(ctx.train_loader)
    changed = [k for k, v in final.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert "classifier.weight" in changed
