"""vsd, vcd and vml: the divergences with numbers, the official call's bug, what the methods do in a pipeline and a space."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from deploy import count_flops, count_params, size_bytes
from errors import UserError
from methods import MethodContext, NotApplicable, Phase, Pipeline, Step, create_method, training_loss
from methods.variational import jensen_shannon, official_kl, variational_kl
from models import create_model
from search.space.spec import load_space
from tasks import create_task

TRAIN_PAIRS = 256


def logits(seed: int, batch: int = 32, classes: int = 10) -> torch.Tensor:
    return 3 * torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed))


def test_correct_kl_is_zero_only_when_the_posteriors_match() -> None:
    v = logits(0)
    assert variational_kl(v, v).abs().item() < 1e-6
    assert variational_kl(v, v + 5.0).abs().item() < 1e-6  # a shifted logit vector is the same posterior
    assert variational_kl(v, logits(1)).item() > 1.0
    assert variational_kl(v, logits(1), temperature=4.0).item() > 0.1
    # The official call is not a divergence: it is far from zero on matching posteriors.
    assert official_kl(v, v).abs().item() > 0.1


def test_official_call_has_a_far_smaller_loss_and_gradient_than_the_correct_kl() -> None:
    v = logits(0)
    z_correct = logits(1).requires_grad_()
    z_official = logits(1).requires_grad_()
    correct, official = variational_kl(v, z_correct), official_kl(v, z_official)
    correct.backward()
    official.backward()
    # Measured: loss 5.15 vs -0.086, gradient norm 0.175 vs 0.0059 (32 x 10 logits of scale 3).
    assert correct.item() > 20 * abs(official.item())
    assert z_correct.grad.norm() > 20 * z_official.grad.norm()


def test_vml_is_symmetric_and_bounded_and_trains_both_views() -> None:
    a, b = logits(0).requires_grad_(), logits(1).requires_grad_()
    forward, backward = jensen_shannon(a, b), jensen_shannon(b, a)
    assert forward.item() == pytest.approx(backward.item(), abs=1e-6)
    assert 0.1 < forward.item() <= torch.log(torch.tensor(2.0)).item()
    assert jensen_shannon(a, a).abs().item() < 1e-6
    forward.backward()
    assert a.grad.norm() > 0 and b.grad.norm() > 0


def two_view_context(task, epochs: int = 1, lr: float = 0.01) -> tuple[torch.nn.Module, MethodContext]:
    model = create_model("two_branch_digits", **task.model_kwargs())
    half = len(task.train_set) // 2
    train = Subset(task.train_set, [*range(TRAIN_PAIRS), *range(half, half + TRAIN_PAIRS)])
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = [next(iter(DataLoader(task.val_set, batch_size=len(task.val_set))))]
    ctx = MethodContext(
        teacher=model, train_loader=loader, val_loader=val, task_loss=task.loss, evaluate=lambda m: task.evaluate(m, val, "cpu"),
        example_input=task.example_input(1), device=torch.device("cpu"), metric="rank1", epochs=epochs, lr=lr, optimizer="adam",
        seed=0, log=lambda message: None,
    )  # fmt: skip
    return model, ctx


def observation_to_representation_kl(model: torch.nn.Module, ctx: MethodContext) -> float:
    """KL(p(y|v) || p(y|z)) of the specific and the shared branch on the val examples."""
    inputs, _ = ctx.val_loader[0]
    with torch.no_grad():
        heads = model.train().heads(inputs)
    return (variational_kl(heads[:, 0], heads[:, 1]) + variational_kl(heads[:, 2], heads[:, 3])).item()


@pytest.fixture(scope="module")
def task():
    return create_task("digits_2view")


def test_vsd_brings_the_representation_posterior_to_the_observation_faster(task) -> None:
    """80 SGD steps (lr 0.09, momentum 0.9, batches of 64) with the task loss alone and with VSD added: the val KL along the way."""
    curves = {}
    for terms in ((), ("vsd",)):
        torch.manual_seed(0)
        model, ctx = two_view_context(task)
        methods = [create_method(name, {"weight": 2.0}) for name in terms]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.09, momentum=0.9)
        batches = list(ctx.train_loader)
        curves[terms] = []
        for iteration in range(80):
            inputs, targets = batches[iteration % len(batches)]
            step = Step(model.train(), inputs, targets, ctx, [m.loss for m in methods], iteration)
            loss = training_loss(Phase("train", 1), step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if iteration % 20 == 19:
                curves[terms].append(observation_to_representation_kl(model, ctx))
    with_vsd, without = curves[("vsd",)], curves[()]
    # Measured: 0.012, 0.147, 0.405, 0.221 with VSD; 0.033, 0.199, 0.810, 0.594 without.
    assert all(a < b for a, b in zip(with_vsd, without)), curves
    assert sum(with_vsd) < 0.6 * sum(without), curves


def test_vsd_bottleneck_shrinks_params_and_macs_and_the_three_share_one_fine_tune(task) -> None:
    torch.manual_seed(0)
    model, ctx = two_view_context(task)
    example = task.example_input(1)
    params, macs = count_params(model), count_flops(model.eval(), example).macs
    phases = []
    ctx.log = lambda message: phases.append(message) if "phase" in message else None
    pipeline = Pipeline([create_method("vsd", {"bottleneck": 4}), create_method("vcd"), create_method("vml")])
    out = pipeline.run(model, ctx).eval()
    training = {"training_params": float(count_params(out)), "training_size_bytes": float(size_bytes(out))}
    assert out.bottleneck_width == 4
    assert pipeline.metrics() == {
        "vsd.bottleneck_before": 16.0,
        "vsd.bottleneck": 4.0,
        **{f"{m}.{k}": v for m in ("vsd", "vcd", "vml") for k, v in training.items()},
    }
    assert count_params(out) < params and count_flops(out, example).macs < macs
    assert phases == ["[vsd] phase 'distill': 1 epoch"]
    assert out(example).shape == (1, 10)
    # Without vsd, vcd's fine-tune carries vml's term too: one phase.
    phases.clear()
    Pipeline([create_method("vcd"), create_method("vml")]).run(create_model("two_branch_digits", **task.model_kwargs()), ctx)
    assert phases == ["[vcd] phase 'distill': 1 epoch"]


@pytest.mark.parametrize("name", ["vsd", "vcd", "vml"])
def test_the_deployed_shared_branch_is_counted_and_the_training_size_reported_apart(task, name: str) -> None:
    torch.manual_seed(0)
    model, ctx = two_view_context(task, epochs=0)
    pipeline = Pipeline([create_method(name)])
    out = pipeline.run(model, ctx).eval()
    cost = pipeline.cost(out, ctx)
    # Evaluation runs the shared branch alone: the specific branches are training-time only.
    assert cost == {"params": float(count_params(out.shared)), "size_bytes": float(size_bytes(out.shared))}
    assert 2.5 * cost["params"] < count_params(out) == pipeline.metrics()[f"{name}.training_params"]
    assert pipeline.metrics()[f"{name}.training_size_bytes"] == size_bytes(out)


def test_vsd_on_the_shared_branch_is_an_option_off_in_the_paper(task) -> None:
    torch.manual_seed(0)
    model, ctx = two_view_context(task)
    inputs, targets = next(iter(ctx.train_loader))
    step = Step(model.train(), inputs, targets, ctx, [], 0)
    heads = step.view_outputs(0)
    specific = variational_kl(heads[:, 0], heads[:, 1])
    both = specific + variational_kl(heads[:, 2], heads[:, 3])
    torch.testing.assert_close(create_method("vsd", {"shared_branch": False}).loss(step), 2.0 * specific)
    torch.testing.assert_close(create_method("vsd").loss(step), 2.0 * both)


@pytest.mark.parametrize("name", ["vsd", "vcd", "vml"])
def test_methods_do_not_apply_to_a_single_branch_model(task, name: str) -> None:
    _, ctx = two_view_context(task)
    with pytest.raises(NotApplicable, match=f"{name} distils between the heads of a two-branch model"):
        create_method(name).prepare(create_model("digits_cnn", num_classes=10), ctx)


SPACE = """
task: {task}
model: {model}
baseline: {{epochs: 1}}
methods: {{{method}: {{optional: false}}}}
objectives: {{{objective}: max, params: min}}
"""


def write_space(tmp_path: Path, **fields: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(**{"task": "digits_2view", "model": "two_branch_digits", "method": "vsd", "objective": "rank1", **fields}))
    return path


def test_space_accepts_retrieval_objectives_for_a_two_view_task_only(tmp_path: Path) -> None:
    space = load_space(str(write_space(tmp_path)))
    assert [(o.metric, o.direction) for o in space.objectives] == [("rank1", "max"), ("params", "min")] and not space.warnings
    assert load_space(str(write_space(tmp_path, objective="mAP"))).objectives[0].metric == "mAP"
    with pytest.raises(UserError) as info:
        load_space(str(write_space(tmp_path, task="digits", model="digits_cnn", method="kd")))
    assert "unknown metric 'rank1'" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["vsd", "vcd", "vml"])
def test_space_refuses_the_methods_on_a_single_view_task_in_one_line(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError) as info:
        load_space(str(write_space(tmp_path, task="digits", model="digits_cnn", method=name, objective="accuracy")))
    message = str(info.value)
    assert f"methods.{name}" in message and "two_view" in message and "'digits'" in message and "\n" not in message
