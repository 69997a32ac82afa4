"""decouple: gated training moves the paths as the loss says; both deployable forms keep the gated function and export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from deploy import apply_reported_cost, check_round_trip, count_flops, count_params, export_model
from methods import Pipeline, create_method
from methods.decouple import (
    ArchitectureControl,
    auroc,
    collect_encodings,
    detection_auroc,
    expected_macs,
    find_gate_sites,
    gated_convs,
    hamming_distances,
    insert_gates,
    knn_accuracy,
    remove_inactive_filters,
    set_dynamic,
    static_macs,
)
from models import create_model


@pytest.fixture(scope="module")
def trained(digits_task, digits_context):
    """``trained(**params) -> (model, pipeline, ctx)``: decouple on the full digits train split for 10 epochs, cached."""
    cache = {}

    def run(**params):
        key = create_method("decouple", params).config  # the defaults, spelt out or not, train once
        if key not in cache:
            model, ctx = digits_context(epochs=10, shuffle=True, examples=len(digits_task.train_set))
            ctx.val_loader = list(DataLoader(digits_task.val_set, batch_size=128))
            pipeline = Pipeline([create_method("decouple", params)])
            torch.manual_seed(0)
            cache[key] = (pipeline.run(model, ctx).eval(), pipeline, ctx)
        return cache[key]

    return run


def test_higher_lambda_s_lowers_the_mean_active_filter_ratio(trained) -> None:
    ratios = [trained(lambda_s=value)[1].metrics()["decouple.active_ratio"] for value in (1e-4, 1e-3, 1e-2)]
    assert ratios[0] > ratios[1] > ratios[2] and ratios[0] > ratios[2] + 0.3, ratios
    macs = [trained(lambda_s=value)[1].metrics()["decouple.dynamic_macs"] for value in (1e-4, 1e-2)]
    assert macs[1] < 0.5 * macs[0], macs


def test_mutual_information_makes_paths_class_specific(trained) -> None:
    model, pipeline, ctx = trained(lambda_mi=1.0)
    encodings = collect_encodings(model, ctx.val_loader, "cpu")
    intra, inter = hamming_distances(encodings.paths, encodings.targets)
    assert intra < 0.5 * inter, (intra, inter)
    figures = pipeline.metrics()
    assert figures["decouple.knn_accuracy"] > 0.25  # chance is 0.1; 0.40 here, about 0.75 after 20 epochs at batch 64 (bench)
    assert figures["decouple.intra_class_hamming"] < figures["decouple.inter_class_hamming"]


def _gated(digits_context, closed_bias: float):
    """The digits baseline with gates: filter 2k of every layer never opens; the others open as the ACM decides."""
    model, ctx = digits_context()
    sites = find_gate_sites(model, ctx.example_input)
    torch.manual_seed(0)
    insert_gates(model, sites, acm_reduction=4, threshold=0.5)
    with torch.no_grad():
        for m in gated_convs(model).values():
            m.acm.fc2.bias.zero_()  # about half the gates open, depending on the input
            m.acm.fc2.bias[::2] = closed_bias
    return model.eval(), ctx, sites


def test_static_pruned_model_equals_the_gated_model_where_removed_filters_were_never_on(digits_context) -> None:
    model, ctx, sites = _gated(digits_context, closed_bias=-50.0)
    gated = copy.deepcopy(model)
    batches = ctx.val_loader
    frequency = {name: codes.float().mean(0) for name, codes in collect_encodings(model, batches, "cpu").layers.items()}
    keep = {name: (f > 0).nonzero().flatten().tolist() for name, f in frequency.items()}
    removed = remove_inactive_filters(model, sites, keep, ctx.example_input)
    assert removed == sum(len(f) for f in frequency.values()) - sum(len(k) for k in keep.values()) >= 56  # at least half of 112
    assert count_params(model) < count_params(gated)
    assert [m.conv.out_channels for m in gated_convs(model).values()] == [len(k) for k in keep.values()]
    inputs = torch.cat([x for x, _ in batches])
    with torch.no_grad():
        assert (model(inputs) - gated(inputs)).abs().max() <= 1e-5
    assert count_flops(model, ctx.example_input).macs < 0.5 * count_flops(gated, ctx.example_input).macs


def test_dynamic_form_equals_the_gated_model_and_costs_less(digits_context) -> None:
    model, ctx, _ = _gated(digits_context, closed_bias=-50.0)
    inputs = torch.cat([x for x, _ in ctx.val_loader])
    with torch.no_grad():
        gated = model(inputs)
        set_dynamic(model, True)
        dynamic = model(inputs)
        single = torch.cat([model(inputs[i : i + 1]) for i in range(8)])
    assert (dynamic - gated).abs().max() <= 1e-4
    assert (single - gated[:8]).abs().max() <= 1e-4
    set_dynamic(model, False)
    static = static_macs(model, ctx.example_input)
    assert static == count_flops(model, ctx.example_input).macs
    set_dynamic(model, True)
    # Half the filters never open: each gated conv computes at most half its outputs from at most half its inputs.
    assert expected_macs(model, ctx.val_loader, "cpu", static) < 0.75 * static


@pytest.mark.parametrize("form", ["static", "dynamic"])
def test_both_forms_export_and_round_trip(trained, tmp_path, form: str) -> None:
    model, _, ctx = trained(form=form)
    assert all(m.dynamic == (form == "dynamic") for m in gated_convs(model).values())
    export_model(model, torch.zeros(1, 1, 8, 8), tmp_path, {})
    batch = torch.cat([x for x, _ in ctx.val_loader])[:5]
    assert check_round_trip(tmp_path, batch) <= 1e-5
    program = torch.export.load(tmp_path / "model.pt2").module()
    with torch.no_grad():
        assert (program(batch) - model(batch)).abs().max() <= 1e-5


def test_dynamic_form_reports_its_expected_macs_as_the_trials_macs(trained) -> None:
    dynamic_model, dynamic, ctx = trained(form="dynamic")
    static_model, static, _ = trained(form="static")
    reported = dynamic.cost(dynamic_model, ctx)
    assert reported == {"macs": pytest.approx(dynamic.metrics()["decouple.dynamic_macs"])}
    assert static.cost(static_model, ctx) == {}
    measured = {"macs": 1.0, "flops": 2.0}
    assert apply_reported_cost(measured, reported)["macs"] == reported["macs"] < static.metrics()["decouple.static_macs"]


def test_method_state_round_trips(trained) -> None:
    _, pipeline, _ = trained(form="dynamic")
    method = pipeline.methods[0]
    rebuilt = create_method("decouple", {"form": "dynamic"})
    rebuilt.load_state_dict(method.state_dict())
    assert rebuilt.sites == method.sites and rebuilt.figures == method.figures
    assert torch.equal(rebuilt.aux.weight, method.aux.weight)


def test_gate_is_binary_with_a_straight_through_gradient() -> None:
    acm = ArchitectureControl(3, 5, 4, threshold=0.5)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    gate = acm(x)
    assert set(gate.detach().unique().tolist()) <= {0.0, 1.0}
    gate.sum().backward()
    assert acm.fc2.bias.grad.abs().sum() > 0  # the sigmoid's gradient, through the hard step
    assert set(acm.eval()(x).unique().tolist()) <= {0.0, 1.0}


def test_analysis_functions_on_known_values(tmp_path) -> None:
    paths = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.float)
    labels = torch.tensor([0, 0, 1, 1])
    assert hamming_distances(paths, labels) == (1.0, 3.0)  # same: 1 and 1; different: 4, 3, 2, 3
    assert knn_accuracy(paths, labels, paths, labels, k=1) == 1.0
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 1.0])) == 0.875


def test_fgsm_detection_counts_only_the_attacks_that_changed_the_prediction() -> None:
    clean = torch.tensor([1.0, 2.0, 3.0])
    adversarial = torch.tensor([5.0, 6.0, 0.5, 0.4])  # the two failed attacks stay close to their class
    changed = torch.tensor([True, True, False, False])
    assert detection_auroc(clean, adversarial, changed) == 1.0
    assert auroc(clean, adversarial) == 0.5  # every perturbed input as a positive: the failures drag it down
    assert detection_auroc(clean, adversarial, torch.zeros(4, dtype=torch.bool)) == 0.5


def test_report_is_written(trained, tmp_path) -> None:
    model, pipeline, ctx = trained(form="dynamic")
    files = pipeline.artifacts(model, ctx, tmp_path)
    assert sorted(p.name for p in files) == ["fgsm.png", "paths.png", "report.html"]
    assert all(p.parent == tmp_path / "decouple" and p.stat().st_size > 0 for p in files)
    page = (tmp_path / "decouple" / "report.html").read_text()
    assert "AUROC" in page and "paths.png" in page
    figures = pipeline.metrics()
    assert 0.0 <= figures["decouple.fgsm_auroc"] <= 1.0 and 0.0 <= figures["decouple.fgsm_auroc_all"] <= 1.0
    assert 0.0 <= figures["decouple.fgsm_success"] <= 1.0


def test_acm_reduction_resolves_to_each_gate_s_hidden_width() -> None:
    decouple = create_method("decouple").__class__
    model, example = create_model("digits_cnn", num_classes=10, in_channels=1), torch.zeros(1, 1, 8, 8)
    facts = decouple.model_facts(model, example)
    assert facts == (16, 32, 64)

    def effective(reduction: int) -> dict:
        return decouple.effective_config(create_method("decouple", {"acm_reduction": reduction}).config, facts)

    # max(4, C // r): 16 channels get 4 hidden units with any reduction, 64 channels 16, 8 or 4.
    assert effective(8)["acm_reduction"] == (4, 4, 8) and effective(16)["acm_reduction"] == (4, 4, 4)
    narrow = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    narrow_facts = decouple.model_facts(narrow, example)
    assert len(narrow_facts) >= 1 and set(narrow_facts) == {16}
    configs = [create_method("decouple", {"acm_reduction": r}).config for r in (4, 16)]
    assert decouple.effective_config(configs[0], narrow_facts) == decouple.effective_config(configs[1], narrow_facts)
