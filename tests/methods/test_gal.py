"""GAL: FISTA's exact zeros, the discriminator's single sigmoid, where masks go, physical removal
equal to the masked model, zero masks growing with lambda, label-free training, resume, and a trial."""

from __future__ import annotations

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploy import count_flops, count_params
from methods import MethodContext, Pipeline, Step, TrainingState, create_method, train_phase
from methods.gal import Discriminator, RemovedBlock, SoftMask, find_mask_sites, fista_step, insert_masks, lam_from_official, soft_masks
from models import create_model

from .conftest import frozen, trainable_copy

# --- deciding: FISTA and the discriminator ----------------------------------------------------


def test_fista_reaches_exact_zeros_where_sgd_with_l1_does_not() -> None:
    # min 0.5 * ||m - a||^2 + lam * ||m||_1 over m >= 0 has the solution max(0, a - lam).
    a = torch.tensor([2.0, 0.05, 0.08, 0.01, 0.3])  # >= 0, so the constraint m >= 0 is not what zeroes
    lam, lr = 0.1, 0.1
    solution = (a - lam).clamp_min(0)
    mask, x, t = torch.ones(5), torch.ones(5), 1.0
    sgd = torch.ones(5)
    for _ in range(300):
        mask, x, t = fista_step(mask, x, mask - a, t, lr, lam)
        sgd = sgd - lr * ((sgd - a) + lam * sgd.sign())  # subgradient step of the same objective
    torch.testing.assert_close(mask, solution, atol=1e-6, rtol=0)
    assert mask.tolist()[1:4] == [0.0, 0.0, 0.0]  # exactly zero, not merely small
    assert (sgd[1:4] != 0).all(), sgd  # SGD + L1 only oscillates around zero
    assert sgd[1:4].abs().max() < 0.05


def test_fista_step_by_hand() -> None:
    # t_1 = 1: no momentum on the first step, the iterate is max(0, m - lr * (g + lam)).
    y, x, t = fista_step(torch.tensor([1.0, 0.2]), torch.tensor([1.0, 0.2]), torch.tensor([0.5, 1.0]), 1.0, 0.1, 1.0)
    torch.testing.assert_close(x, torch.tensor([0.85, 0.0]))
    torch.testing.assert_close(y, x)
    assert t == pytest.approx((1 + math.sqrt(5)) / 2)
    # Then momentum (t_2 - 1) / t_3 extrapolates along x_2 - x_1.
    y2, x2, t2 = fista_step(y, x, torch.tensor([0.0, 0.0]), t, 0.1, 1.0)
    torch.testing.assert_close(x2, torch.tensor([0.75, 0.0]))
    beta = (t - 1) / t2
    torch.testing.assert_close(y2, torch.tensor([0.75 + beta * (0.75 - 0.85), 0.0]))


def test_lam_from_official_shrinks_masks_as_the_official_step_does() -> None:
    # The official step: lambda * |m| in the loss (gradient g + lambda * sign(m)), then a
    # soft-threshold by lr * lambda. Ours with lam = 2 * lambda moves the masks the same way.
    official, lr = 0.6, 0.01
    mask, grad = torch.tensor([1.0, 0.5, 0.012, 0.0]), torch.tensor([0.3, -0.2, 0.0, -0.5])
    theirs = (mask - lr * (grad + official * mask.sign()) - lr * official).clamp_min(0.0)
    _, ours, _ = fista_step(mask, mask, grad, 1.0, lr, lam_from_official(official))
    assert lam_from_official(0.6) == pytest.approx(1.2) and lam_from_official(0.8) == pytest.approx(1.6)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, torch.tensor([1.0 - 0.003 - 0.012, 0.5 + 0.002 - 0.012, 0.0, 0.0]))


def test_discriminator_returns_one_raw_logit_and_the_loss_applies_one_sigmoid(digits_context) -> None:
    model, ctx = digits_context()
    d = Discriminator(10)
    assert d(torch.randn(6, 10)).shape == (6,)
    assert [type(m) for m in d.layers] == [nn.Linear] * 4
    assert (
        d.layers[0].in_features,
        d.layers[0].out_features,
        d.layers[1].out_features,
        d.layers[2].out_features,
        d.layers[3].out_features,
    ) == (10, 128, 256, 128, 1)

    method = create_method("gal", {"disc_lr": 1e-12})  # D barely moves during its update
    model = method.prepare(model, ctx)
    with torch.no_grad():
        for layer in method.discriminator.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        method.discriminator.layers[-1].bias.fill_(3.0)  # D(anything) = 3: a logit, not a probability
    inputs, targets = ctx.train_loader[0]
    method.phases(ctx)[0].on_epoch_start(model, 0)  # as the loop does: batch-norm statistics frozen
    loss = method.adversarial_loss(Step(model, inputs, targets, ctx, [], 0, 0))
    # The student starts as the baseline (masks at 1), so the MSE is 0 and the loss is -log sigmoid(3).
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-3.0))), abs=1e-6)  # 0.0486
    double = -math.log(1 / (1 + math.exp(-1 / (1 + math.exp(-3.0)))))  # what a second sigmoid would give: 0.3222
    assert abs(loss.item() - double) > 0.25


# --- deciding: where masks go -----------------------------------------------------------------

SITES = [
    # model, input, structure, blocks, channel layers, channels
    ("digits_cnn", (1, 8, 8), "auto", 0, 3, 16 + 32 + 64),
    ("digits_resnet", (1, 8, 8), "auto", 3, 0, 0),
    ("digits_resnet", (1, 8, 8), "joint", 3, 3, 16 + 32 + 64),
    ("resnet56", (3, 32, 32), "block", 27, 0, 0),
    ("resnet56", (3, 32, 32), "joint", 27, 27, 9 * (16 + 32 + 64)),
    ("vgg16", (3, 32, 32), "auto", 0, 13, 4224),
    ("resnet50", (3, 64, 64), "auto", 16, 0, 0),
    # The stem too: its channels only feed layer1.0's convolutions, no addition.
    ("resnet50", (3, 64, 64), "channel", 0, 33, 64 + 2 * (3 * 64 + 4 * 128 + 6 * 256 + 3 * 512)),
]


@pytest.mark.parametrize(("model_name", "shape", "structure", "blocks", "layers", "channels"), SITES, ids=[f"{s[0]}-{s[2]}" for s in SITES])
def test_mask_sites_follow_the_architecture(model_name, shape, structure, blocks, layers, channels) -> None:
    model = create_model(model_name, num_classes=10, in_channels=shape[0])
    sites = find_mask_sites(model, torch.zeros(1, *shape), structure)
    assert len(sites.blocks) == blocks
    assert len(sites.channels) == layers
    masks = insert_masks(model, sites)
    assert sum(m.mask.numel() for m in masks if m.kind == "channel") == channels
    assert sum(m.mask.numel() for m in masks if m.kind == "block") == blocks
    # Residual blocks are masked on the batch norm that ends their branch; the classifier never.
    assert all(end.endswith(("bn2", "bn3")) for _, end in sites.blocks)
    assert not any(name in ("fc", "classifier") for name, _ in sites.channels)


def test_block_structure_on_a_model_without_residual_blocks_says_what_to_use() -> None:
    model = create_model("digits_cnn", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="structure 'block' needs residual blocks, but DigitsCNN has none.*use 'channel' or 'auto'"):
        find_mask_sites(model, torch.zeros(1, 1, 8, 8), "block")


def test_masked_student_starts_as_the_baseline(digits_context) -> None:
    model, ctx = digits_context()
    method = create_method("gal", {"structure": "channel"})
    model = method.prepare(model, ctx).eval()
    assert len(soft_masks(model)) == 3
    x = ctx.val_loader[0][0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ctx.teacher(x), atol=0, rtol=0)


# --- doing: physical removal ------------------------------------------------------------------


def _random_context(model_name: str, shape: tuple[int, ...], batches: int = 2, batch_size: int = 4) -> tuple[nn.Module, MethodContext]:
    """A random teacher whose batch norms know the random data (as a trained one knows its data).

    Without that, eval-mode ResNet-56 at initialisation has logits in the thousands.
    """
    torch.manual_seed(0)
    teacher = create_model(model_name, num_classes=10, in_channels=shape[0])
    generator = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(batch_size, *shape, generator=generator), torch.randint(0, 10, (batch_size,), generator=generator))
        for _ in range(batches)
    ]
    for module in teacher.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batches
    with torch.no_grad():
        for inputs, _ in data:
            teacher.train()(inputs)
    teacher = frozen(teacher)
    ctx = MethodContext(
        teacher=teacher,
        train_loader=data,
        val_loader=data[:1],
        task_loss=F.cross_entropy,
        evaluate=lambda model: {},
        example_input=torch.zeros(1, *shape),
        device=torch.device("cpu"),
        epochs=1,
        log=lambda message: None,
    )
    return trainable_copy(teacher), ctx


def _adversarial(method, model: nn.Module, ctx: MethodContext) -> nn.Module:
    """Prepare and train the before-finalize phases, as the pipeline does."""
    model = method.prepare(model, ctx)
    for phase in method.phases(ctx):
        if not phase.after_finalize:
            train_phase(model, phase, ctx, loss_terms=[])
    return model


REMOVAL = [
    ("digits_resnet", (1, 8, 8), "joint"),
    ("digits_cnn", (1, 8, 8), "channel"),
    ("resnet56", (3, 32, 32), "joint"),
    ("vgg16", (3, 32, 32), "channel"),
    ("resnet50", (3, 64, 64), "joint"),
]


@pytest.mark.parametrize(("model_name", "shape", "structure"), REMOVAL, ids=[f"{m}-{s}" for m, _, s in REMOVAL])
def test_removal_is_physical_and_keeps_the_masked_models_outputs(model_name, shape, structure) -> None:
    model, ctx = _random_context(model_name, shape)
    params_before, macs_before = count_params(ctx.teacher), count_flops(ctx.teacher, ctx.example_input).macs
    # N(0, 1) masks: about half start negative and are exactly zero after the first FISTA step.
    method = create_method("gal", {"structure": structure, "mask_init": "normal", "adversarial_epochs": 1})
    model = _adversarial(method, model, ctx)
    masks = soft_masks(model)
    zeros = sum(int((m.mask == 0).sum()) for m in masks)
    assert 0 < zeros < sum(m.mask.numel() for m in masks)
    masked = copy.deepcopy(model).eval()

    final = method.finalize(model, ctx).eval()

    assert not any(isinstance(m, SoftMask) for m in final.modules())
    params_after, macs_after = count_params(final), count_flops(final, ctx.example_input).macs
    assert params_after < params_before and macs_after < macs_before
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference, got = masked(x), final(x)
    assert (got - reference).abs().max().item() <= 1e-5 * max(1.0, reference.abs().max().item())
    metrics = method.metrics()
    assert metrics["zero_mask_fraction"] == pytest.approx(zeros / sum(m.mask.numel() for m in masks))
    assert metrics["removal_error"] <= 1e-5 * max(1.0, reference.abs().max().item())
    removed_blocks = sum(isinstance(m, RemovedBlock) for m in final.modules())
    assert removed_blocks == metrics["blocks_removed"]
    if structure == "joint":
        assert 0 < removed_blocks < metrics["blocks"]


def test_zero_block_becomes_its_shortcut() -> None:
    model, ctx = _random_context("resnet20", (3, 32, 32))
    method = create_method("gal", {"structure": "block"})
    model = method.prepare(model, ctx)
    with torch.no_grad():
        model.layer2[0].bn2.mask.zero_()  # the stage's first block: strided, option-A shortcut
        model.layer3[2].bn2.mask.fill_(0.5)
    masked = copy.deepcopy(model).eval()
    final = method.finalize(model, ctx).eval()
    assert isinstance(final.layer2[0], RemovedBlock)
    assert not any(p.numel() for p in final.layer2[0].parameters())
    assert count_params(final) == count_params(ctx.teacher) - sum(p.numel() for p in ctx.teacher.layer2[0].parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (final(x) - masked(x)).abs().max().item() <= 1e-5
        # The folded 0.5 halves the branch: bn2's affine parameters are halved.
        torch.testing.assert_close(final.layer3[2].bn2.weight, ctx.teacher.layer3[2].bn2.weight * 0.5)


# --- training: lambda, labels, resume ---------------------------------------------------------


def test_zero_masks_grow_with_lambda_and_are_removed(digits_context) -> None:
    counts, macs = [], []
    for lam in (0.0, 0.03, 0.1, 0.3):
        model, ctx = digits_context(shuffle=True, examples=512, seed=0)
        torch.manual_seed(0)
        pipeline = Pipeline([create_method("gal", {"lam": lam, "structure": "channel", "adversarial_epochs": 15})])
        final = pipeline.run(model, ctx)
        counts.append(pipeline.metrics()["gal.channels_removed"])
        macs.append(count_flops(final, ctx.example_input).macs)
    assert counts[0] == 0
    assert counts == sorted(counts) and counts[-1] > counts[1] > 0, counts
    assert macs == sorted(macs, reverse=True) and macs[-1] < macs[0], macs


def test_adversarial_phase_never_reads_labels(digits_context) -> None:
    model, ctx = digits_context()
    # Labels no loss could use: cross-entropy on them would raise.
    ctx.train_loader = [(inputs, torch.full_like(targets, 10**6)) for inputs, targets in ctx.train_loader]
    method = create_method("gal", {"lam": 0.3, "mask_init": "normal", "adversarial_epochs": 2})
    final = Pipeline([method]).run(model, ctx)
    assert method.metrics()["channels_removed"] > 0
    assert final(ctx.val_loader[0][0]).shape == (64, 10)
    assert not create_method("gal").needs_labels


def test_finetune_phase_follows_removal_when_asked(digits_context) -> None:
    _, ctx = digits_context()
    names = [(p.name, p.after_finalize, p.epochs) for p in create_method("gal", {"finetune_epochs": 2}).phases(ctx)]
    assert names == [("adversarial", False, ctx.epochs), ("finetune", True, 2)]
    assert [p.name for p in create_method("gal").phases(ctx)] == ["adversarial"]


def test_unset_adversarial_epochs_take_the_space_budget() -> None:
    space = SimpleNamespace(epochs=7)
    assert [p.epochs for p in create_method("gal").phases(space)] == [7]
    assert [p.epochs for p in create_method("gal", {"adversarial_epochs": 0}).phases(space)] == [0]
    with pytest.raises(ValueError, match=r"`adversarial_epochs >= 0` must hold, but got adversarial_epochs=-2"):
        create_method("gal", {"adversarial_epochs": -2})
    with pytest.raises(ValueError, match=r"`structure` must be one of auto, channel, block, joint, but got 'blocks'. Did you mean 'block'"):
        create_method("gal", {"structure": "blocks"})


def test_resume_gives_the_same_model(digits_context) -> None:
    recipe = [{"name": "gal", "params": {"lam": 0.3, "adversarial_epochs": 2, "finetune_epochs": 1}}]

    def run(resume=None):
        model, ctx = digits_context(shuffle=True, examples=96, seed=0)
        states = []
        torch.manual_seed(0)
        final = Pipeline.from_recipe(recipe).run(model, ctx, on_epoch_end=lambda s, m: states.append(_saved(s)), resume=resume)
        with torch.no_grad():
            return final.eval()(ctx.val_loader[0][0]), states

    outputs, states = run()
    assert len(states) == 3
    for after in (1, 2):  # mid-adversarial (the discriminator and FISTA state travel), and after removal
        resumed, _ = run(torch.load(io.BytesIO(states[after - 1]), weights_only=False))
        assert torch.equal(resumed, outputs), f"resumed after epoch {after}"


def _saved(state: TrainingState) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


# --- a trial of a search ----------------------------------------------------------------------


def test_gal_trial_of_the_bundled_space(tmp_path) -> None:
    from pathlib import Path

    from search.space.spec import load_space
    from search.trial.body import TrialSpec, recipe_from_config, run_pipeline, train_baseline

    space = load_space(Path(__file__).parents[2] / "spaces" / "digits_gal.yaml").with_overrides(baseline_epochs=4)
    assert [m.name for m in space.methods] == ["gal", "kd", "minmax_quant"]
    baseline, baseline_metrics = train_baseline(space, "cpu", log=lambda message: None)
    spec = TrialSpec(space, {k: v.clone() for k, v in baseline.state_dict().items()}, baseline_metrics)
    # What Optuna could sample: gal then kd (its term shapes gal's fine-tune), no quantization.
    recipe = recipe_from_config(space, {"gal": {"lam": 0.3, "structure": "joint"}, "kd": {"use": True}, "minmax_quant": {"use": False}})
    # Two short epochs: N(0, 1) masks make sure something is removed in that time.
    recipe[0]["params"].update(adversarial_epochs=2, finetune_epochs=1, mask_init="normal")
    metrics = run_pipeline(spec, recipe, tmp_path / "model", torch.device("cpu"), seed=0)
    assert metrics["gal.channels_removed"] > 0
    assert metrics["macs"] < baseline_metrics["macs"] and metrics["params"] < baseline_metrics["params"]
    assert metrics["artifact_bytes"] > 0 and (tmp_path / "model" / "model.pt2").is_file()
