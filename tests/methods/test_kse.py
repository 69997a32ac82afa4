"""KSE: the indicator by hand, the clustered convolution's two paths, packed indices, channel removal,
exact resume, and composition with kd and minmax_quant."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from deploy import check_round_trip, count_flops, count_params, export_model, export_program, load_program, size_bytes
from methods import Pipeline, TrainingState, check_pipeline, create_method, get_method
from methods.kse import (
    ClusteredConv2d,
    cluster_counts,
    cluster_kernels,
    eligible_convs,
    index_bits,
    indicator_levels,
    kernel_entropy,
    kernel_sparsity,
    kse_indicator,
)

# --- the indicator ------------------------------------------------------------------------------

# Three filters of 1x1 kernels reading three channels: each channel's kernels are three numbers.
POINTS = {0: [0.0, 1.0, 3.0], 1: [0.0, 2.0, 2.0], 2: [-1.0, 0.0, 4.0]}


def _hand_entropy(points: list[float]) -> float:
    # N = 3 kernels, so each sums its distances to its min(5, N - 1) = 2 neighbours: all the others.
    dm = [sum(abs(a - b) for j, b in enumerate(points) if j != i) for i, a in enumerate(points)]
    p = [d / sum(dm) for d in dm]
    return -sum(x * math.log2(x) for x in p if x > 0)


def _weight() -> torch.Tensor:
    weight = torch.zeros(3, 3, 1, 1, dtype=torch.float64)
    for channel, values in POINTS.items():
        weight[:, channel, 0, 0] = torch.tensor(values, dtype=torch.float64)
    return weight


def test_sparsity_entropy_and_indicator_match_a_hand_computation() -> None:
    weight = _weight()
    s = [4.0, 4.0, 5.0]  # sum of |values| per channel
    e = [_hand_entropy(POINTS[c]) for c in range(3)]
    # channel 0: dm = 4, 3, 5; channel 1: dm = 4, 2, 2 (the two 2s are 0 apart); channel 2: 6, 5, 9.
    assert e[1] == pytest.approx(1.5)
    assert e[0] == pytest.approx(-(4 / 12 * math.log2(4 / 12) + 3 / 12 * math.log2(3 / 12) + 5 / 12 * math.log2(5 / 12)))
    assert kernel_sparsity(weight).tolist() == s
    assert kernel_entropy(weight).tolist() == pytest.approx(e, abs=1e-12)

    def min_max(xs):
        return [(x - min(xs)) / (max(xs) - min(xs)) for x in xs]

    sn, en = min_max(s), min_max(e)
    v = min_max([math.sqrt(a / (1 + b)) for a, b in zip(sn, en)])
    assert kse_indicator(weight).tolist() == pytest.approx(v, abs=1e-12)
    # v = [0, 0, 1] here (channels 0 and 1 have the lowest sparsity): G = 4 removes both, keeps 2.
    assert indicator_levels(kse_indicator(weight), 4) == [min(math.floor(x * 4), 3) for x in v] == [0, 0, 3]


def test_entropy_sums_the_five_nearest_neighbours_when_there_are_more() -> None:
    weight = torch.randn(9, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for channel in range(2):
        points = weight[:, channel].reshape(9, -1)
        dm = []
        for i in range(9):
            distances = sorted(float((points[i] - points[j]).norm()) for j in range(9) if j != i)
            dm.append(sum(distances[:5]))
        p = [d / sum(dm) for d in dm]
        assert float(kernel_entropy(weight)[channel]) == pytest.approx(-sum(x * math.log2(x) for x in p), abs=1e-10)


def test_cluster_counts_per_level() -> None:
    # G = 4, T = 0 (the paper's example): removed, N/4, N/2, all.
    assert cluster_counts(64, 4, 0) == [0, 16, 32, None]
    assert cluster_counts(64, 4, 1) == [0, 8, 16, None]  # T halves the clustered levels again
    assert cluster_counts(64, 6, 0) == [0, 4, 8, 16, 32, None]
    assert cluster_counts(10, 3, 0) == [0, 5, None]
    assert cluster_counts(3, 6, 1) == [0, 1, 1, 1, 1, None]
    assert cluster_counts(8, 2, 0) == [0, None]


# --- the clustered convolution ------------------------------------------------------------------


def _conv(seed: int = 0, bias: bool = True) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(6, 8, 3, padding=1, bias=bias)


def _outputs(layer: ClusteredConv2d, x: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.eval()
    out = {}
    with torch.no_grad():
        for path in ("dense", "clustered"):
            layer.path = path
            out[path] = layer(x)
    return out


X = torch.randn(3, 6, 7, 7, generator=torch.Generator().manual_seed(1))


def test_clustered_conv_with_one_centroid_per_kernel_equals_the_original() -> None:
    conv = _conv()
    layer = ClusteredConv2d.from_conv(conv, [8] * 6, seed=0)
    assert [(g.q, g.channels) for g in layer.channel_groups] == [(8, 6)]
    with torch.no_grad():
        expected = conv(X)
    for path, got in _outputs(layer, X).items():
        assert (got - expected).abs().max() <= 1e-5, path


def test_output_error_falls_as_the_number_of_centroids_rises() -> None:
    conv = _conv(bias=False)
    with torch.no_grad():
        expected = conv(X)
    errors = []
    for q in (1, 2, 3, 5, 8):
        out = _outputs(ClusteredConv2d.from_conv(conv, [q] * 6, seed=0), X)
        assert (out["dense"] - out["clustered"]).abs().max() <= 1e-5
        errors.append(float((out["dense"] - expected).norm() / expected.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.5 and errors[-1] <= 1e-6


def test_mixed_channels_kept_removed_and_clustered_give_the_same_output_on_both_paths_and_count_what_runs() -> None:
    conv = _conv()
    clusters = [0, None, 2, 2, 1, 4]
    layer = ClusteredConv2d.from_conv(conv, clusters, seed=0)
    out = _outputs(layer, X)
    assert (out["dense"] - out["clustered"]).abs().max() <= 1e-5
    # The full channel is bit-identical to the original kernels; the removed one is not read.
    assert torch.equal(layer.weight_full, conv.weight[:, [1]])
    assert layer.kept.tolist() == [1, 4, 2, 3, 5]  # full first, then groups by q
    reference = copy.deepcopy(conv)
    with torch.no_grad():
        reference.weight.zero_()
        reference.weight[:, layer.kept.long()] = layer.dense_weight()  # the rebuilt weight, in kept's order
        assert (reference(X) - out["dense"]).abs().max() <= 1e-5
    # params: full kernels 8*9, centroids (1 + 2*2 + 4)*9, bias 8, one index per (filter, clustered channel
    # with q > 1): 8 * (2 + 1); size: floats at 4 bytes, packed indices ceil(8*2*1/8) + ceil(8*1*2/8), kept 5 * 4.
    assert count_params(layer) == 8 * 9 + 9 * 9 + 8 + 8 * 3
    assert size_bytes(layer) == 4 * (8 * 9 + 9 * 9 + 8) + 2 + 2 + 5 * 4
    pixels = 7 * 7
    for path in ("dense", "clustered"):
        layer.path = path
        assert count_flops(layer, X[:1]).macs == layer.macs(path, pixels)
    assert layer.macs("dense", pixels) == pixels * 8 * 5 * 9
    assert layer.macs("clustered", pixels) == pixels * 9 * (8 * 1 + 1 + 2 * 2 + 4)


def test_clustered_conv_exports_on_both_paths(tmp_path) -> None:
    layer = ClusteredConv2d.from_conv(_conv(), [0, None, 2, 3, 1, 3], seed=0).eval()
    for path in ("dense", "clustered"):
        layer.path = path
        export_model(layer, X[:1], tmp_path / path)
        assert check_round_trip(tmp_path / path, X) <= 1e-5


def _batch_norm(features: int, seed: int = 3) -> nn.BatchNorm2d:
    """A batch norm with statistics and affine weights far from the identity, so that a missing fold shows."""
    generator = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(features)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(features, generator=generator))
        bn.running_var.copy_(torch.rand(features, generator=generator) * 3 + 0.2)
        bn.weight.copy_(torch.randn(features, generator=generator))  # negative scales too
        bn.bias.copy_(torch.randn(features, generator=generator))
    return bn


@pytest.mark.parametrize("bias", [True, False])
def test_an_absorbed_batch_norm_is_folded_on_both_paths_in_eval_mode_and_runs_as_before_in_training(bias: bool) -> None:
    conv = _conv(bias=bias)
    clusters = [0, None, 2, 2, 1, 4]
    plain, bn = ClusteredConv2d.from_conv(conv, clusters, seed=0), _batch_norm(8)
    layer = copy.deepcopy(plain)
    layer.absorb_batch_norm(copy.deepcopy(bn))
    with torch.no_grad():
        expected = bn.eval()(plain.eval()(X))
    for path, got in _outputs(layer, X).items():
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=path)
    # Folded: the layer's eval-mode computation calls no batch norm.
    ran: list[str] = []
    layer.batch_norm.register_forward_pre_hook(lambda m, i: ran.append("bn"))
    with torch.no_grad():
        layer(X)
    assert not ran
    # Training mode: batch statistics and running averages, as the separate batch norm would.
    layer.train()
    plain.train()
    bn.train()
    torch.testing.assert_close(layer(X), bn(plain(X)), rtol=0, atol=1e-6)
    assert ran == ["bn"]
    torch.testing.assert_close(layer.batch_norm.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.batch_norm.running_var, bn.running_var)
    # The eval-mode fold follows the new statistics (the unpacked weights are not stale).
    layer.eval()
    bn.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(X), bn(plain(X)), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="holds a batch norm already"):
        layer.absorb_batch_norm(_batch_norm(8))
    with pytest.raises(ValueError, match="num_features=7, track_running_stats=True"):
        plain.absorb_batch_norm(nn.BatchNorm2d(7))


def _ops(layer: ClusteredConv2d, x: torch.Tensor) -> list[str]:
    """The aten ops one eval-mode call runs once the unpacked weights are cached."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        layer(x)
        with Recorder() as recorder:
            layer(x)
    return recorder.ops


def test_the_dense_path_reads_a_fully_kept_input_as_it_is_and_keeps_a_channels_last_one_channels_last() -> None:
    """Kept channels stored out of order (full first, then by group) cost no copy of the input on the dense path;
    removed ones are selected without leaving the channels-last layout of the inference copy."""
    conv = _conv()
    x = X.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(x)
    every = ClusteredConv2d.from_conv(conv, [None, 8, 8, None, 8, 8], seed=0).eval()
    assert every.kept.tolist() == [0, 3, 1, 2, 4, 5]
    torch.testing.assert_close(every(x), expected, rtol=0, atol=1e-5)
    assert "index_select" not in _ops(every, x)
    some = ClusteredConv2d.from_conv(conv, [None, 0, 8, None, 8, 8], seed=0).eval()
    out = some(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    reference = copy.deepcopy(conv)
    with torch.no_grad():
        reference.weight[:, 1] = 0
        torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-5)


def test_kse_folds_resnet20s_batch_norms_and_its_exported_program_runs_none(cifar_context, tmp_path) -> None:
    """The deployed program equals the unfolded model within 1e-5, and ``macs``/``params`` are the folded model's."""
    model, ctx = cifar_context()
    with torch.no_grad():  # statistics a trained network has, not a fresh batch norm's identity
        for i, bn in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            fresh = _batch_norm(bn.num_features, seed=i)
            bn.load_state_dict(fresh.state_dict())
            bn.running_var.abs_().add_(0.5)
    method = create_method("kse", {"path": "dense"})
    unfolded = method.prepare(model, ctx).eval()
    reference = copy.deepcopy(unfolded)
    folded = method.finalize(unfolded, ctx).eval()
    # Only the stem's batch norm is left where it was (after a plain convolution).
    called = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d) and ".batch_norm" not in name]
    assert called == ["bn1"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    program, rewrites = export_program(folded, ctx.example_input)
    assert rewrites.folded_batch_norms == 1  # the stem's, by the inference rewrite
    batch_norms = [n for n in program.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    assert batch_norms == []
    assert method.metrics()["batch_norms_folded"] == 18.0  # both batch norms of each of the 9 blocks
    with torch.no_grad():
        expected = reference(x)
        for path in ("dense", "clustered"):
            for m in folded.modules():
                if isinstance(m, ClusteredConv2d):
                    m.path = path
            torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-5, msg=path)
    for m in folded.modules():
        if isinstance(m, ClusteredConv2d):
            m.path = "dense"
    export_model(folded, ctx.example_input, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_program(tmp_path)(x), expected, rtol=0, atol=1e-5)
    # The measured figures: of the folded layers (gamma and beta still stored), the same MACs (a batch norm counts none).
    assert count_params(folded) == count_params(reference)
    assert count_flops(folded, ctx.example_input).macs == count_flops(reference, ctx.example_input).macs


def test_kmeans_restarts_reach_the_best_clustering_one_start_misses() -> None:
    # 16 random 3x3 kernels into 4 centroids: one k-means++ start (seed 0) ends 12% above the best
    # within-cluster sum of squares that 50 single starts find; the paper's ten restarts reach it.
    from sklearn.cluster import KMeans

    kernels = torch.randn(16, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    centroids, index = cluster_kernels(kernels, 4, seed=0)
    inertia = float((kernels - centroids[index]).pow(2).sum())
    points = kernels.reshape(16, -1).numpy()
    best = min(KMeans(n_clusters=4, n_init=1, random_state=seed).fit(points).inertia_ for seed in range(50))
    one_start = KMeans(n_clusters=4, n_init=1, random_state=0).fit(points).inertia_
    assert one_start > 1.1 * best
    assert inertia == pytest.approx(best, rel=1e-9)


def test_index_bits_are_ceil_log2_of_the_centroids() -> None:
    assert [index_bits(q) for q in (1, 2, 3, 4, 5, 16, 17)] == [0, 1, 2, 2, 3, 4, 5]


# --- the method ---------------------------------------------------------------------------------


def test_removed_channels_are_gone_from_the_layer_that_produces_them_where_only_this_layer_reads_them(cifar_context) -> None:
    """With G = 2 (remove or keep, no clustering) the pruned network computes what the original does with
    the removed kernels zeroed; inside a block the producing conv and batch norm shrink, on the residual
    stream (read by the shortcut too) only the reading conv stops reading."""
    model, ctx = cifar_context()
    model.eval()
    reference = copy.deepcopy(model)
    removed = {}
    for name in eligible_convs(model, ctx.example_input):
        levels = indicator_levels(kse_indicator(model.get_submodule(name).weight), 2)
        removed[name] = [c for c, g in enumerate(levels) if g == 0]
        with torch.no_grad():
            reference.get_submodule(name).weight[:, removed[name]] = 0
    assert sum(map(len, removed.values())) > 0
    method = create_method("kse", {"levels": 2, "path": "dense"})
    pruned = method.prepare(model, ctx).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (pruned(x) - reference(x)).abs().max() <= 1e-4
    block = pruned.layer2[1]
    inner = removed["layer2.1.conv2"]
    assert inner, "the test needs a removed channel inside a block"
    assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels == 32 - len(inner)
    assert len(block.conv2.kept) == block.conv2.in_channels  # reads every channel that is left
    stream = removed["layer2.1.conv1"]
    assert stream and block.conv1.in_channels == 32 and len(block.conv1.kept) == 32 - len(stream)
    assert method.metrics()["layers_removed_upstream"] == 9.0  # every block's conv2


def test_full_channels_keep_the_original_kernels_and_the_aggressive_end_compresses_more(digits_context) -> None:
    sizes = []
    for levels, halvings in ((3, 0), (4, 0), (5, 0), (5, 1)):
        model, ctx = digits_context()
        original = copy.deepcopy(model)
        out = create_method("kse", {"levels": levels, "halvings": halvings}).prepare(model, ctx)
        layer = out.features[3]
        assert isinstance(layer, ClusteredConv2d)
        full = layer.kept[: layer.full_channels].long()
        # the block-free digits_cnn: features[3] reads features[0]'s channels, which were pruned upstream
        assert layer.full_channels >= 1
        # features[0] (the stem) and features[3] lost the output channels that the next conv removed
        inputs = [c for c in range(16) if c not in _removed(original.features[3].weight, levels)]
        filters = [n for n in range(32) if n not in _removed(original.features[7].weight, levels)]
        assert torch.equal(layer.weight_full, original.features[3].weight[filters][:, inputs][:, full])
        sizes.append(size_bytes(out))
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3], sizes


def _removed(weight: torch.Tensor, levels: int) -> list[int]:
    return [c for c, g in enumerate(indicator_levels(kse_indicator(weight), levels)) if g == 0]


def _saved(state: TrainingState) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _loaded(data: bytes) -> TrainingState:
    return torch.load(io.BytesIO(data), weights_only=False)


RECIPE = [{"name": "kse", "params": {"epochs": 2, "path": "clustered"}}]


def _run(digits_context, resume: bytes | None = None):
    model, ctx = digits_context(epochs=2, shuffle=True, examples=96, seed=0)
    states: list[bytes] = []
    history: list[dict[str, float]] = []

    def on_epoch_end(state: TrainingState, metrics: dict[str, float]) -> None:
        states.append(_saved(state))
        history.append(metrics)

    torch.manual_seed(0)
    pipeline = Pipeline.from_recipe(RECIPE)
    final = pipeline.run(model, ctx, on_epoch_end=on_epoch_end, resume=_loaded(resume) if resume is not None else None).eval()
    with torch.no_grad():
        outputs = final(ctx.val_loader[0][0])
    return final, outputs, states, history, pipeline.metrics()


def test_resume_gives_the_same_weights_outputs_and_metrics(digits_context) -> None:
    model, outputs, states, history, metrics = _run(digits_context)
    assert len(states) == 2
    resumed, resumed_outputs, _, resumed_history, resumed_metrics = _run(digits_context, resume=states[0])
    assert resumed_history[0]["train_loss"] == history[1]["train_loss"]
    reference, got = model.state_dict(), resumed.state_dict()
    assert got.keys() == reference.keys()
    for key in reference:
        assert torch.equal(got[key], reference[key]), key
    assert torch.equal(resumed_outputs, outputs)
    assert resumed_metrics == metrics and metrics["kse.clustered_path_layers"] == 2.0


def test_composes_with_kd(digits_context, tmp_path) -> None:
    alone, ctx = digits_context()
    torch.manual_seed(0)
    kse_alone = Pipeline([create_method("kse")])
    history_alone: list[dict[str, float]] = []
    alone = kse_alone.run(alone, ctx, on_epoch_end=lambda s, m: history_alone.append(m)).eval()

    model, ctx = digits_context()
    torch.manual_seed(0)
    pipeline = Pipeline([create_method("kse"), create_method("kd")])
    history: list[dict[str, float]] = []
    out = pipeline.run(model, ctx, on_epoch_end=lambda s, m: history.append(m)).eval()
    # kd's term is added to kse's fine-tune: the same first step, a larger loss.
    assert history[0]["train_loss"] > history_alone[0]["train_loss"]
    assert sum(isinstance(m, ClusteredConv2d) for m in out.modules()) == 2
    assert size_bytes(out) == size_bytes(alone)
    batch = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    export_model(out, torch.zeros(1, 1, 8, 8), tmp_path)
    assert check_round_trip(tmp_path, batch) <= 1e-5


def test_nothing_may_change_the_architecture_after_kse_and_the_refusal_says_why() -> None:
    # Quantization after kse would leave the centroids (the clustered layers' weights) in float.
    for later in ("l1_filter", "gal", "od", "minmax_quant", "pams"):
        with pytest.raises(
            ValueError,
            match=f"after method 'kse' no method may change the architecture \\(its clustered convolutions .* centroids in float\\), but '{later}'",
        ):
            check_pipeline([get_method("kse"), get_method(later)])
    with pytest.raises(ValueError, match=r"follows it in \['kse', 'kd', 'minmax_quant'\]\. Leave it out\."):
        check_pipeline([get_method("kse"), get_method("kd"), get_method("minmax_quant")])
    check_pipeline([get_method("l1_filter"), get_method("kse"), get_method("kd")])
    check_pipeline([get_method("minmax_quant")])


def test_path_auto_records_its_choice_in_the_recipe_and_a_replay_reuses_it(digits_context, monkeypatch) -> None:
    """The timed choice depends on the machine's load: a replay must not time again."""
    import json

    import methods.kse

    def run(recipe: list[dict], faster: str) -> tuple[Pipeline, nn.Module]:
        monkeypatch.setattr(methods.kse, "_faster_path", lambda layer, x: faster)
        model, ctx = digits_context()
        pipeline = Pipeline.from_recipe(recipe)
        method = pipeline.methods[0]
        return pipeline, method.finalize(method.prepare(model, ctx), ctx)

    pipeline, model = run([{"name": "kse", "params": {"epochs": 0}}], faster="clustered")
    recipe = json.loads(json.dumps(pipeline.recipe()))
    assert recipe[0]["params"]["path"] == "auto"
    assert recipe[0]["params"]["layer_paths"] == ["clustered", "clustered"]
    # Replayed where the dense path times faster: the recorded paths, the same MACs.
    replayed, again = run(recipe, faster="dense")
    assert [m.path for m in again.modules() if isinstance(m, ClusteredConv2d)] == ["clustered", "clustered"]
    assert replayed.metrics() == pipeline.metrics()
    assert count_flops(again, torch.zeros(1, 1, 8, 8)).macs == count_flops(model, torch.zeros(1, 1, 8, 8)).macs
    with pytest.raises(ValueError, match=r"`layer_paths` must name one path per clustered layer \(2\), but got 1"):
        run([{"name": "kse", "params": {"epochs": 0, "layer_paths": ["dense"]}}], faster="dense")


def test_the_flop_counter_sees_the_macs_of_the_chosen_path(digits_context) -> None:
    """So the trial's measured ``macs`` are what runs and ``Method.cost`` has nothing to correct."""
    model, ctx = digits_context()
    method = create_method("kse", {"path": "dense"})
    model = method.finalize(method.prepare(model, ctx), ctx).eval()
    dense = count_flops(model, ctx.example_input).macs
    for module in model.modules():
        if isinstance(module, ClusteredConv2d):
            module.path = "clustered"
    clustered = count_flops(model, ctx.example_input).macs
    metrics = method.metrics()
    assert dense - clustered == metrics["layer_macs_dense"] - metrics["layer_macs_clustered"] > 0
    assert metrics["dense_path_layers"] == 2.0 and metrics["clustered_path_layers"] == 0.0
