"""The pipeline: resuming from a checkpoint, failing on a non-finite loss, ordering, loss-only methods,
where loss terms apply, the hooks, and the step (views, features)."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F

from methods import Method, NonFiniteLossError, Phase, Pipeline, Step, TrainingState, check_pipeline, create_method, get_method, train_phase

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
    final = Pipeline.from_recipe(RECIPE).run(model, ctx, on_epoch_end=on_epoch_end, resume=_loaded(resume) if resume is not None else None)
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


# --- loss composition: where each method's term applies ----------------------------------------


def test_gal_then_kd_distils_during_gals_adversarial_phase(digits_context) -> None:
    """gal's default (no fine-tune) beside kd: kd's term shapes every adversarial step, kd has no phase."""
    finals = {}
    for with_kd in (False, True):
        model, ctx = digits_context(epochs=EPOCHS)
        gal = create_method("gal", {"lam": 0.3})
        methods = [gal]
        calls: list[float] = []
        if with_kd:
            kd = create_method("kd", {})
            calls = _count_kd_calls(kd)
            methods.append(kd)
        history = []
        torch.manual_seed(0)
        final = Pipeline(methods).run(model, ctx, on_epoch_end=lambda s, m: history.append(m)).eval()
        assert [(m["epoch"], m["stage"]) for m in history] == [(1, 0), (2, 0)]
        with torch.no_grad():
            finals[with_kd] = final(ctx.val_loader[0][0])
    assert len(calls) == EPOCHS * len(ctx.train_loader)
    # The student starts as the baseline (masks at 1), then moves away from it.
    assert calls[0] == pytest.approx(0.0, abs=1e-6) and all(c > 1e-5 for c in calls[1:])
    # The term changed the training: the distilled student's logits differ.
    assert (finals[True] - finals[False]).abs().max().item() > 1e-4


def _probe(scope: str, loss_only: bool, name: str = "probe") -> type[Method]:
    """An unregistered method class with a loss term of ``scope``."""

    @dataclasses.dataclass(frozen=True)
    class ProbeConfig:
        pass

    return type(name, (Method,), {"name": name, "Config": ProbeConfig, "kind": "distillation", "loss_scope": scope, "loss_only": loss_only})


def test_loss_only_term_that_reaches_no_phase_is_refused_naming_both_methods() -> None:
    l1 = get_method("l1_filter")
    later = _probe("later", loss_only=True)
    check_pipeline([later, l1])  # before the trainer: its term shapes l1_filter's fine-tune
    with pytest.raises(
        ValueError,
        match=r"'probe' adds its loss term to the phases of the methods after it, but 'l1_filter' trains before it.*Move 'probe' before 'l1_filter'",
    ):
        check_pipeline([l1, later])
    with pytest.raises(ValueError, match=r"'probe' only adds a loss term to its own phases, which do not run beside 'l1_filter'"):
        check_pipeline([l1, _probe("own", loss_only=True)])
    check_pipeline([_probe("own", loss_only=True)])  # alone, its own phases run
    with pytest.raises(TypeError, match=r"`Bad.loss_scope` must be one of own, later, pipeline, but got 'everywhere'"):
        _probe("everywhere", loss_only=False, name="Bad")


def test_terms_reach_the_phases_their_scope_names(digits_context) -> None:
    """own: its own phases; later: its own and those after it; pipeline: every phase."""
    model, ctx = digits_context()
    current = {"phase": ""}
    seen: dict[str, list[str]] = {"first": [], "own": [], "later": [], "pipeline": [], "last": []}

    def make(name: str, scope: str) -> Method:
        method = _probe(scope, loss_only=False, name=name)()
        method.loss = lambda step: seen[name].append(current["phase"])
        method.phases = lambda ctx: [Phase(name, 1, on_start=lambda model: current.__setitem__("phase", name))]
        return method

    scopes = {"first": "own", "own": "own", "later": "later", "pipeline": "pipeline", "last": "own"}
    Pipeline([make(name, scope) for name, scope in scopes.items()]).run(model, ctx)
    steps = len(ctx.train_loader)
    assert seen["pipeline"] == [p for p in scopes for _ in range(steps)]
    assert seen["later"] == [p for p in ("later", "pipeline", "last") for _ in range(steps)]
    for name in ("first", "own", "last"):
        assert seen[name] == [name] * steps


# --- hooks and resume ----------------------------------------------------------------------------


class _Hooks(Method):
    """Records when the loop calls each hook of its one phase."""

    name = "hooks"
    Config = _probe("own", loss_only=False).Config
    kind = "pruning"

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def phases(self, ctx):
        return [
            Phase(
                "train",
                2,
                on_start=lambda model: self.events.append("start"),
                on_epoch_start=lambda model, epoch: self.events.append(f"epoch_start {epoch}"),
                after_step=lambda step: self.events.append(f"step {step.epoch}.{step.iteration}"),
                on_epoch_end=lambda model, epoch: self.events.append(f"epoch_end {epoch}"),
                on_end=lambda model: self.events.append("end"),
            )
        ]

    def state_dict(self):
        return {"events": list(self.events)}

    def load_state_dict(self, state):
        self.events = list(state["events"])


def test_hooks_are_called_in_order_and_a_resumed_run_skips_on_start(digits_context) -> None:
    def run(resume=None):
        model, ctx = digits_context()
        method, states = _Hooks(), []
        Pipeline([method]).run(model, ctx, on_epoch_end=lambda s, m: states.append(_saved(s)), resume=resume)
        return method.events, states

    events, states = run()
    assert events == [
        "start",
        "epoch_start 0",
        "step 0.0",
        "step 0.1",
        "epoch_end 0",
        "epoch_start 1",
        "step 1.2",
        "step 1.3",
        "epoch_end 1",
        "end",
    ]
    # The checkpoint holds the method's state dict, not the method.
    first = _loaded(states[0])
    assert first.method_states == [{"events": events[:5]}]
    assert set(first.optimizer_states) == {"model"}
    resumed, _ = run(first)
    assert resumed == events
    after_last, _ = run(_loaded(states[1]))  # resumed after the last epoch: only on_end remains
    assert after_last == events


def test_gal_resumes_bit_exactly_with_its_discriminator_and_its_optimizer(digits_context) -> None:
    recipe = [{"name": "gal", "params": {"lam": 0.3, "mask_init": "normal", "adversarial_epochs": 3}}]

    def run(resume: bytes | None = None):
        model, ctx = digits_context(shuffle=True, examples=96, seed=0)
        states: list[bytes] = []
        torch.manual_seed(0)
        pipeline = Pipeline.from_recipe(recipe)
        final = pipeline.run(model, ctx, on_epoch_end=lambda s, m: states.append(_saved(s)), resume=_loaded(resume) if resume else None)
        return final.state_dict(), [_loaded(s) for s in states], pipeline.metrics()

    weights, states, metrics = run()
    assert len(states) == 3
    assert set(states[0].optimizer_states) == {"model", "discriminator"}
    assert states[0].optimizer_states["discriminator"]["state"], "the discriminator's momentum is checkpointed"
    resumed_weights, resumed_states, resumed_metrics = run(_saved(states[0]))
    assert resumed_weights.keys() == weights.keys()
    for key in weights:
        assert torch.equal(resumed_weights[key], weights[key]), key
    assert resumed_metrics == metrics
    last, resumed_last = states[-1], resumed_states[-1]
    for key, value in last.method_states[0]["discriminator"]["weights"].items():
        assert torch.equal(resumed_last.method_states[0]["discriminator"]["weights"][key], value), key
    momentum = last.optimizer_states["discriminator"]["state"]
    assert momentum.keys() == resumed_last.optimizer_states["discriminator"]["state"].keys()
    for index, buffers in momentum.items():
        assert torch.equal(resumed_last.optimizer_states["discriminator"]["state"][index]["momentum_buffer"], buffers["momentum_buffer"])


# --- the step: views, features, labels -----------------------------------------------------------


def test_step_runs_model_and_teacher_once_and_captures_named_features(digits_context) -> None:
    model, ctx = digits_context()
    inputs, targets = ctx.train_loader[0]
    calls = {"model": 0, "teacher": 0}
    handles = [
        net.register_forward_hook(lambda m, i, o, key=key: calls.__setitem__(key, calls[key] + 1))
        for key, net in (("model", model), ("teacher", ctx.teacher))
    ]
    try:
        step = Step(model, inputs, targets, ctx, capture=["features"])
        teacher = step.teacher_outputs
        outputs = step.outputs
        assert step.outputs is outputs and step.teacher_outputs is teacher
        student_features, teacher_features = step.features("features"), step.teacher_features("features")
        assert calls == {"model": 1, "teacher": 1}
        with torch.no_grad():
            torch.testing.assert_close(student_features, model.features(inputs))
            torch.testing.assert_close(teacher_features, ctx.teacher.features(inputs))
            torch.testing.assert_close(outputs, model(inputs))
        assert not any(m._forward_hooks for m in model.features.modules())  # the capture hooks are gone
        with pytest.raises(ValueError, match=r"features of 'features.0' were not captured.*feature_modules\(\)"):
            step.features("features.0")
        with pytest.raises(ValueError, match=r"the model has no module 'nothing'"):
            step.features("nothing")
        # Asked before the model runs, a feature is captured in the one pass.
        lazy = Step(model, inputs, targets, ctx)
        with torch.no_grad():
            torch.testing.assert_close(lazy.features("features.0"), model.features[0](inputs))
        assert lazy.outputs is not None and calls["model"] == 3
    finally:
        for handle in handles:
            handle.remove()


def test_batches_with_two_views(digits_context) -> None:
    """A loader may yield ((view, view), targets): outputs are on the first view, every view is in the step."""
    model, ctx = digits_context()
    inputs, targets = ctx.train_loader[0]
    flipped = inputs.flip(-1)
    step = Step(model, (inputs, flipped), targets, ctx)
    assert len(step.views) == 2 and step.inputs is inputs and step.views[1] is flipped
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(step.outputs, model(inputs))
        torch.testing.assert_close(step.view_outputs(1), model(flipped))
        torch.testing.assert_close(step.teacher_outputs, ctx.teacher(inputs))
    # The loop hands both views over: a loss comparing the two views trains on them.
    ctx.train_loader = [((x, x.flip(-1)), y) for x, y in ctx.train_loader]
    gaps: list[float] = []

    def consistency(step: Step) -> torch.Tensor:
        gap = (step.outputs - step.view_outputs(1)).pow(2).mean()
        gaps.append(gap.item())
        return gap

    model.train()
    train_phase(model, Phase("two_views", 1, loss=consistency), ctx, loss_terms=[])
    assert len(gaps) == len(ctx.train_loader) and gaps[0] > 0


def test_space_that_can_sample_a_refused_pipeline_is_rejected_when_loaded(monkeypatch) -> None:
    from errors import UserError
    from methods import _registry
    from search.space.spec import parse_space

    monkeypatch.setitem(_registry._METHODS, "probe", _probe("later", loss_only=True))
    data = {
        "task": "digits",
        "model": "digits_cnn",
        "methods": {"probe": {"optional": True}, "l1_filter": {"optional": True}},
        "objectives": {"accuracy": "max", "macs": "min"},
    }
    assert [m.name for m in parse_space(data, "ok.yaml").methods] == ["probe", "l1_filter"]
    # Reversed, the trials that use both would distil nothing: refused before any trial runs.
    data["methods"] = {"l1_filter": {"optional": True}, "probe": {"optional": True}}
    with pytest.raises(
        UserError, match=r"^bad.yaml: methods: the pipeline l1_filter > probe cannot run: method 'probe' adds its loss term"
    ):
        parse_space(data, "bad.yaml")
