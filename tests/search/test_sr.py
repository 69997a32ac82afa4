"""The super-resolution task and models: metrics against scikit-image, data, loaders, registry, a trial."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch.utils.data import DataLoader

from deploy import count_params
from errors import UserError
from models import create_model
from search.space.spec import metrics_of_task, parse_space
from tasks import create_task, task_kind
from tasks.sr import (
    BicubicUpsampler,
    SRImages,
    SRPatches,
    bicubic_baseline,
    bicubic_downsample,
    make_pairs,
    mod_crop,
    psnr,
    rgb_to_y,
    ssim,
    to_rgb_uint8,
)

SPACES = Path(__file__).resolve().parents[2] / "spaces"


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def task():
    return create_task("sr", scale=2, patch_size=24, patches_per_epoch=32)


def _y_numpy(rgb: np.ndarray) -> np.ndarray:
    """Reference luma: (H, W, 3) RGB in [0, 255] -> BT.601 Y in [16, 235], float64."""
    rgb = rgb.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


# --- metrics ------------------------------------------------------------------------------------


def test_y_of_black_and_white_is_16_and_235() -> None:
    rgb = torch.tensor([[0.0, 0.0, 0.0], [255.0, 255.0, 255.0]]).T.reshape(1, 3, 1, 2)
    torch.testing.assert_close(rgb_to_y(rgb).flatten(), torch.tensor([16.0, 235.0], dtype=torch.float64), atol=1e-3, rtol=0)


def test_psnr_of_a_constant_offset_is_exact() -> None:
    x = torch.full((1, 1, 20, 20), 100.0)
    assert psnr(x + 5, x).item() == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-9)
    assert psnr(x, x).item() == pytest.approx(10 * math.log10(255**2 / 1e-10))


@pytest.mark.parametrize("name", ["astronaut", "camera", "coffee"])
def test_psnr_and_ssim_on_y_agree_with_scikit_image(name: str) -> None:
    hr = to_rgb_uint8(getattr(skdata, name)())[:, :120, :160]
    degraded = BicubicUpsampler(2)(bicubic_downsample(hr, 2)[None].float()).clamp(0, 255).round()
    y_ref = _y_numpy(hr.permute(1, 2, 0).numpy())[2:-2, 2:-2]
    y_deg = _y_numpy(degraded[0].permute(1, 2, 0).numpy())[2:-2, 2:-2]
    ours_y_ref = rgb_to_y(hr[None].float())[..., 2:-2, 2:-2]
    ours_y_deg = rgb_to_y(degraded)[..., 2:-2, 2:-2]
    np.testing.assert_allclose(ours_y_ref[0, 0].numpy(), y_ref, atol=1e-9)
    expected_psnr = peak_signal_noise_ratio(y_ref, y_deg, data_range=255)
    expected_ssim = structural_similarity(y_ref, y_deg, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert psnr(ours_y_deg, ours_y_ref).item() == pytest.approx(expected_psnr, abs=1e-3)
    assert ssim(ours_y_deg, ours_y_ref).item() == pytest.approx(expected_ssim, abs=1e-3)
    assert 20 < expected_psnr < 50 and 0.5 < expected_ssim < 0.999  # a real degradation, not a trivial one


def test_ssim_of_identical_images_is_one_and_falls_with_noise() -> None:
    y = rgb_to_y(to_rgb_uint8(skdata.camera())[None, :, :64, :64].float())
    noisy = y + torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    assert ssim(y, y).item() == pytest.approx(1.0)
    assert ssim(noisy, y).item() < 0.9


def test_evaluate_matches_a_reference_computation_on_known_images(task) -> None:
    """task.evaluate on bicubic upsampling = scikit-image metrics on Y with a border of `scale` cut."""
    result = task.evaluate(BicubicUpsampler(2), DataLoader(task.test_set, batch_size=1), "cpu")
    psnrs, ssims = [], []
    for lr, hr in task.test_set:
        sr = BicubicUpsampler(2)(lr[None])[0].clamp(0, 255).round()
        y_sr = _y_numpy(sr.permute(1, 2, 0).numpy())[2:-2, 2:-2]
        y_hr = _y_numpy(hr.permute(1, 2, 0).numpy())[2:-2, 2:-2]
        psnrs.append(peak_signal_noise_ratio(y_hr, y_sr, data_range=255))
        ssims.append(structural_similarity(y_hr, y_sr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255))
    assert result["psnr"] == pytest.approx(float(np.mean(psnrs)), abs=1e-3)
    assert result["ssim"] == pytest.approx(float(np.mean(ssims)), abs=1e-3)
    assert result == pytest.approx(bicubic_baseline(task, "test"))
    assert 25 < result["psnr"] < 35 and result["loss"] > 0


# --- data ---------------------------------------------------------------------------------------


def test_bicubic_downsample_shapes_and_constant_images() -> None:
    hr = torch.full((3, 12, 18), 77, dtype=torch.uint8)
    lr = bicubic_downsample(hr, 3)
    assert lr.shape == (3, 4, 6) and lr.dtype == torch.uint8
    assert (lr == 77).all()
    assert mod_crop(torch.zeros(3, 13, 17), 4).shape == (3, 12, 16)
    with pytest.raises(ValueError, match="mod_crop"):
        bicubic_downsample(torch.zeros(3, 13, 16, dtype=torch.uint8), 2)


def test_patches_are_aligned_and_scaled() -> None:
    torch.manual_seed(0)
    hr = torch.randint(0, 256, (3, 60, 60), dtype=torch.uint8)
    # An LR whose pixel (i, j) is the centre (3i + 1, 3j + 1) of its 3x3 HR cell: flips and
    # transposition of aligned patches keep it so.
    pair = (hr[:, 1::3, 1::3].contiguous(), hr)
    patches = SRPatches([pair], scale=3, patch_size=24, length=5, rgb_range=1.0, augment=True)
    assert len(patches) == 5
    for _ in range(5):
        lr, hr_patch = patches[0]
        assert lr.shape == (3, 8, 8) and hr_patch.shape == (3, 24, 24)
        torch.testing.assert_close(lr, hr_patch[:, 1::3, 1::3])
        assert 0.0 <= lr.min() and lr.max() <= 1.0


def test_embedded_task_splits(task) -> None:
    assert task_kind("sr") == "super_resolution"
    assert task.metrics == ("psnr", "ssim") and task.metric == "psnr"
    assert task.model_kwargs() == {"scale": 2, "in_channels": 3, "rgb_range": 255.0}
    assert task.example_input(1).shape == (1, 3, 12, 12)
    assert (len(task.train_set.pairs), len(task.val_set), len(task.test_set)) == (8, 2, 3)
    lr, hr = task.val_set[0]
    assert hr.shape == (3, 256, 256) and lr.shape == (3, 128, 128)
    lr, hr = next(iter(DataLoader(task.train_set, batch_size=4)))
    assert lr.shape == (4, 3, 12, 12) and hr.shape == (4, 3, 24, 24)
    assert task.loss(hr, hr).item() == 0.0


def _write_pngs(folder: Path, sizes: list[tuple[int, int]], suffix: str = "") -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:04d}{suffix}.png")


def test_folder_loaders_read_div2k_and_benchmark_layouts(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "DIV2K" / "DIV2K_train_HR", [(40, 44)] * 5)
    _write_pngs(tmp_path / "Set14" / "HR", [(30, 33), (27, 41)])
    task = create_task("sr", scale=3, patch_size=24, train_root=str(tmp_path / "DIV2K"), test_root=str(tmp_path / "Set14"))
    assert len(task.train_set.pairs) == 4 and len(task.val_set) == 1  # at most a tenth held out, at least one
    assert [tuple(hr.shape) for _, hr in task.test_set] == [(3, 30, 33), (3, 27, 39)]  # mod-cropped to x3
    assert [tuple(lr.shape) for lr, _ in task.test_set] == [(3, 10, 11), (3, 9, 13)]
    first = np.array(Image.open(tmp_path / "Set14" / "HR" / "0000.png"))
    torch.testing.assert_close(task.test_set[0][1], torch.from_numpy(first).permute(2, 0, 1).float())
    result = bicubic_baseline(task)
    assert math.isfinite(result["psnr"]) and 0 < result["ssim"] < 1


def test_hr_files_are_used_alone_in_the_srf_layout(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "train", [(40, 40)] * 3)
    _write_pngs(tmp_path / "test", [(30, 30)] * 2, suffix="_HR")
    Image.fromarray(np.zeros((15, 15, 3), dtype=np.uint8)).save(tmp_path / "test" / "0000_LR.png")
    task = create_task("sr", scale=2, patch_size=16, train_root=str(tmp_path / "train"), test_root=str(tmp_path / "test"))
    assert len(task.test_set) == 2 and task.test_set.names == ["0000_HR.png", "0001_HR.png"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train_root": "/no/such/DIV2K"}, r"train_root: folder '/no/such/DIV2K' not found. Set task.options.train_root"),
        ({"test_root": "/no/such/Set14"}, r"test_root: folder '/no/such/Set14' not found"),
        ({"patch_size": 50, "scale": 3}, "patch_size must be a multiple of scale=3"),
        ({"scale": 5}, "scale must be one of 2, 3, 4"),
    ],
)
def test_bad_options_are_user_errors(options, message: str) -> None:
    with pytest.raises(UserError, match=message):
        create_task("sr", **options)


def test_empty_folder_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no png, jpg or bmp images"):
        create_task("sr", val_root=str(tmp_path / "empty"))


# --- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "params"), [(2, 1_369_859), (3, 1_554_499), (4, 1_517_571)])
def test_edsr_baseline_has_the_published_size(scale: int, params: int) -> None:
    model = create_model("edsr", scale=scale)
    assert count_params(model) == params
    assert model(torch.rand(2, 3, 10, 12) * 255).shape == (2, 3, 10 * scale, 12 * scale)


def test_rdn_config_b_size_and_body_features() -> None:
    assert count_params(create_model("rdn", scale=2)) == 22_123_395  # 22.1M, as published for x2
    model = create_model("rdn_small", scale=4).eval()
    seen = {}
    model.body_out.register_forward_hook(lambda m, i, o: seen.setdefault("f", o))
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)
    assert seen["f"].shape == (1, 32, 8, 8)


def test_models_and_tasks_must_agree_on_classes() -> None:
    with pytest.raises(UserError, match="'resnet20' is a classifier and needs num_classes"):
        create_model("resnet20", scale=2, in_channels=3)
    with pytest.raises(UserError, match="'edsr' is not a classifier"):
        create_model("edsr", 10, in_channels=3)
    with pytest.raises(UserError, match="'edsr_small' has no option 'n_feat'"):
        create_model("edsr_small", scale=2, n_feat=8)


# --- spaces and trials --------------------------------------------------------------------------


def _space(methods: dict, **budget) -> dict:
    return {
        "name": "sr_test",
        "task": {"name": "sr", "options": {"scale": 2, "patch_size": 24, "patches_per_epoch": 32}},
        "model": {"name": "edsr_small", "options": {"n_feats": 8, "n_resblocks": 2}},
        "baseline": {"epochs": 1},
        "training": {"batch_size": 16, "lr": 1e-3, "optimizer": "adam", "weight_decay": 0.0},
        "methods": methods,
        "objectives": {"psnr": "max", "size_bytes": "min"},
        "budget": {"trials": 1, "epochs": 1, **budget},
        "measure": {"latency_repeats": 2},
    }


def test_sr_metrics_and_the_kd_restriction() -> None:
    assert {"psnr": "max", "ssim": "max", "psnr_drop": "min", "ssim_drop": "min"}.items() <= metrics_of_task("sr").items()
    with pytest.raises(UserError, match=r"methods.kd: applies to classification tasks only, but task 'sr' is a super_resolution task"):
        parse_space(_space({"kd": {}}), "sr.yaml")


@pytest.mark.parametrize("method", ["gal", "od"])
def test_check_refuses_a_classification_method_on_sr_in_one_line(tmp_path: Path, capsys, method: str) -> None:
    from search.cli import main

    path = tmp_path / "sr.yaml"
    path.write_text(yaml.safe_dump(_space({method: {}})))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"slimtune: error: {path}: methods.{method}: applies to classification tasks only, but task 'sr' is a super_resolution task. Remove it from methods.\n"
    )


def test_sr_quickstart_space_parses() -> None:
    space = parse_space(__import__("yaml").safe_load((SPACES / "sr_quickstart.yaml").read_text()), "sr_quickstart.yaml")
    assert space.task == "sr" and space.model == "edsr_small"
    assert [m.name for m in space.methods][-1] == "pams"
    assert {"psnr", "size_bytes"} <= set(space.metric_names)


def test_an_sr_trial_reports_psnr_ssim_and_a_packed_size(tmp_path: Path) -> None:
    from search.trial.body import TrialSpec, run_pipeline, train_baseline
    from search.trial.preflight import preflight

    space = parse_space(_space({"pams": {"optional": False, "params": {"bits": 4, "stats_epochs": 1}}}), "sr.yaml")
    assert all(r.ok for r in preflight(space, log=lambda m: None))
    baseline, base_metrics = train_baseline(space, log=lambda m: None)
    assert {"psnr", "ssim", "psnr_drop", "ssim_drop", "size_bytes", "artifact_bytes"} <= set(base_metrics)
    spec = TrialSpec(space, {k: v.clone() for k, v in baseline.state_dict().items()}, base_metrics)
    recipe = [{"name": "pams", "params": {"bits": 4, "stats_epochs": 1}}]
    metrics = run_pipeline(spec, recipe, tmp_path / "model", torch.device("cpu"), seed=0)
    assert metrics["size_bytes"] < base_metrics["size_bytes"]
    assert metrics["psnr_drop"] == pytest.approx(base_metrics["psnr"] - metrics["psnr"])
    assert math.isfinite(metrics["psnr"]) and 0 < metrics["ssim"] <= 1
    assert metrics["pams.bits"] == 4.0 and metrics["pams.quantized_layers"] == 4.0
    assert (tmp_path / "model" / "model.pt2").is_file()


def test_sr_images_dataset_returns_whole_images() -> None:
    hr = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    images = SRImages(make_pairs([hr], 4), rgb_range=1.0)
    lr, target = images[0]
    assert lr.shape == (3, 5, 6) and target.shape == (3, 20, 24)
    torch.testing.assert_close(target, hr.float() / 255)
