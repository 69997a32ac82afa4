"""PAMS against min-max quantization on super-resolution: PSNR/SSIM, packed size and artifact bytes.

One full-precision (FP) model is trained for ``--fp-epochs``; every quantized run starts from a
copy of it and trains for the same number of epochs (``--epochs`` in all: PAMS spends
``--stats-epochs`` of them calibrating alpha, min-max quantization trains all of them):

- ``FP32``: the trained model; ``FP32 +ft``: the same trained for the quantized runs' epochs too
  (what the extra training alone is worth);
- for each of ``--bits``: ``pams`` with SKT (``--skt-weight``), ``pams`` without SKT
  (``skt_weight 0``), ``minmax_quant`` (its defaults: every conv but the first and the last, so
  also the body's last conv and the upsampler, which PAMS leaves in floating point);
- with ``--random-init``: PAMS (with SKT) at the lowest of ``--bits`` from a randomly initialised
  student, as the official code does.

All runs use Adam at ``--lr`` (1e-4, the paper's), batches of ``--batch-size`` patches.
Metrics are on the test split (PSNR/SSIM on Y, border cropped); ``size`` is ``size_bytes`` of
the packed model, ``artifact`` the bytes of its ``model.pt2``.

CPU (embedded scikit-image data, edsr_small x2, about 10 minutes on one core):

    python bench/pams_sr.py

A GPU run toward the paper's EDSR x4 Set14 table (FP 28.576, 8-bit 28.585, 4-bit 28.199 dB):

    python bench/pams_sr.py --device cuda --model edsr --scale 4 --patch-size 192 --batch-size 16 \\
        --patches-per-epoch 16000 --fp-epochs 300 --epochs 30 --bits 8 4 \\
        --div2k-root /data/DIV2K --set14-root /data/benchmark/Set14

(``--fp-checkpoint`` loads FP weights instead of training them, or saves them when the file is
missing.)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy import count_params, export_model, size_bytes  # noqa: E402
from methods import MethodContext, Phase, Pipeline, create_method, train_phase  # noqa: E402
from models import create_model  # noqa: E402
from tasks import create_task  # noqa: E402
from tasks.sr import SRTask, bicubic_baseline  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="edsr_small", help="edsr_small, edsr, rdn_small or rdn")
    p.add_argument("--scale", type=int, default=2, choices=(2, 3, 4))
    p.add_argument("--div2k-root", help="DIV2K HR training images (or the folder holding DIV2K_train_HR)")
    p.add_argument("--set14-root", help="Set14 HR images (or the folder holding HR); the test split")
    p.add_argument("--val-root", help="validation HR images (default: held out from the training images)")
    p.add_argument("--patch-size", type=int, default=48, help="HR patch side")
    p.add_argument("--patches-per-epoch", type=int, default=480)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fp-epochs", type=int, default=12)
    p.add_argument("--fp-lr", type=float, default=1e-3)
    p.add_argument("--fp-checkpoint", help="load the FP weights from this file, or save them there when it is missing")
    p.add_argument("--epochs", type=int, default=4, help="epochs of each quantized run (PAMS: calibration included)")
    p.add_argument("--stats-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--alpha-lr", type=float, default=1.0, help="1e-2 in the paper (30k steps); alpha barely moves in a short run at that rate"
    )
    p.add_argument("--skt-weight", type=float, default=1e3)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--random-init", action="store_true", help="add PAMS from a random student at the lowest bit width")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1 is fastest on a busy 2-core machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args(argv)


def make_context(task: SRTask, teacher: nn.Module, args: argparse.Namespace, device: torch.device, epochs: int, lr: float) -> MethodContext:
    generator = torch.Generator().manual_seed(args.seed)
    train = DataLoader(task.train_set, batch_size=args.batch_size, shuffle=True, generator=generator)
    val = DataLoader(task.val_set, batch_size=1)
    return MethodContext(
        teacher=teacher,
        train_loader=train,
        val_loader=val,
        task_loss=task.loss,
        evaluate=lambda model: task.evaluate(model, val, device),
        example_input=task.example_input(1).to(device),
        device=device,
        metric=task.metric,
        epochs=epochs,
        lr=lr,
        optimizer="adam",
        weight_decay=0.0,
        seed=args.seed,
        log=lambda message: None,
    )


def measure(
    label: str, model: nn.Module, task: SRTask, device: torch.device, seconds: float, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    model.eval()
    test = task.evaluate(model, DataLoader(task.test_set, batch_size=1), device)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = export_model(model, task.example_input(1).to(device), Path(tmp), {})["model.pt2"]
    return {
        "run": label,
        "psnr": test["psnr"],
        "ssim": test["ssim"],
        "params": count_params(model),
        "size_bytes": size_bytes(model),
        "artifact_bytes": artifact,
        "seconds": seconds,
        **(extra or {}),
    }


def run_pipeline(
    label: str, recipe: list[dict[str, Any]], start: nn.Module, teacher: nn.Module, task: SRTask, args, device, epochs: int
) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = copy.deepcopy(start).train()
    for p in model.parameters():
        p.requires_grad_(True)
    pipeline = Pipeline([create_method(step["name"], step["params"]) for step in recipe])
    started = time.perf_counter()
    model = pipeline.run(model, make_context(task, teacher, args, device, epochs, args.lr))
    row = measure(label, model, task, device, time.perf_counter() - started, {"bits": recipe[-1]["params"].get("bits", 32)})
    row.update({k: v for k, v in pipeline.metrics().items() if k.endswith("alpha_ratio")})
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'run':<26} {'bits':>4} {'PSNR dB':>8} {'SSIM':>7} {'params':>9} {'size B':>9} {'artifact B':>11} {'alpha':>6} {'s':>5}")
    for r in rows:
        alpha = next((f"{v:.2f}" for k, v in r.items() if k.endswith("alpha_ratio")), "")
        size = f"{r['size_bytes']:>9,}" if "size_bytes" in r else f"{'':>9}"
        artifact = f"{r['artifact_bytes']:>11,}" if "artifact_bytes" in r else f"{'':>11}"
        params = f"{r['params']:>9,}" if "params" in r else f"{'':>9}"
        print(
            f"{r['run']:<26} {r.get('bits', ''):>4} {r['psnr']:>8.3f} {r['ssim']:>7.4f} {params} {size} {artifact} {alpha:>6} {r.get('seconds', 0):>5.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    options: dict[str, Any] = {"scale": args.scale, "patch_size": args.patch_size, "patches_per_epoch": args.patches_per_epoch}
    for key, value in (("train_root", args.div2k_root), ("test_root", args.set14_root), ("val_root", args.val_root)):
        if value:
            options[key] = value
    started = time.perf_counter()
    task = create_task("sr", **options)
    print(
        f"data: {len(task.train_set.pairs)} training images, {len(task.val_set)} val, {len(task.test_set)} test "
        f"({time.perf_counter() - started:.0f} s to load); {args.model} x{args.scale}, {args.epochs} epochs per quantized run "
        f"of {args.patches_per_epoch} patches of {args.patch_size} px",
        flush=True,
    )

    rows = [{"run": "bicubic", **bicubic_baseline(task, "test", device)}]
    fp = create_model(args.model, **task.model_kwargs()).to(device)
    started = time.perf_counter()
    checkpoint = Path(args.fp_checkpoint) if args.fp_checkpoint else None
    if checkpoint is not None and checkpoint.is_file():
        fp.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True))
    else:
        ctx = make_context(task, fp, args, device, args.fp_epochs, args.fp_lr)
        train_phase(fp, Phase("fp", args.fp_epochs), ctx, loss_terms=[])
        if checkpoint is not None:
            torch.save(fp.state_dict(), checkpoint)
    rows.append(measure("FP32", fp, task, device, time.perf_counter() - started, {"bits": 32}))
    print_table(rows)
    teacher = copy.deepcopy(fp).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def pams(bits: int, skt: float) -> list[dict[str, Any]]:
        qat = args.epochs - args.stats_epochs
        params = {
            "bits": bits,
            "skt_weight": skt,
            "alpha_lr": args.alpha_lr,
            "lr": args.lr,
            "epochs": qat,
            "stats_epochs": args.stats_epochs,
        }
        return [{"name": "pams", "params": params}]

    runs: list[tuple[str, list[dict[str, Any]], nn.Module]] = [("FP32 +ft", [], fp)]
    for bits in args.bits:
        runs += [
            (f"pams SKT {args.skt_weight:g}", pams(bits, args.skt_weight), fp),
            ("pams no SKT", pams(bits, 0.0), fp),
            ("minmax_quant", [{"name": "minmax_quant", "params": {"bits": bits}}], fp),
        ]
    if args.random_init:
        torch.manual_seed(args.seed)
        scratch = create_model(args.model, **task.model_kwargs()).to(device)
        runs.append(("pams SKT, random init", pams(min(args.bits), args.skt_weight), scratch))
    for label, recipe, start in runs:
        if not recipe:  # the FP model trained for the quantized runs' epochs as well
            model = copy.deepcopy(start).train()
            for p in model.parameters():
                p.requires_grad_(True)
            t0 = time.perf_counter()
            train_phase(model, Phase("ft", args.epochs), make_context(task, teacher, args, device, args.epochs, args.lr), loss_terms=[])
            row = measure(label, model, task, device, time.perf_counter() - t0, {"bits": 32})
        else:
            row = run_pipeline(label, recipe, start, teacher, task, args, device, args.epochs)
        rows.append(row)
        print(f"  {label} {row['bits']}-bit: PSNR {row['psnr']:.3f} dB ({row['seconds']:.0f} s)", flush=True)
    print()
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
