"""Deployed speed against MACs: does a compressed ResNet-56 run as much faster as its MACs promise?

ResNet-56 at CIFAR-10's shape (3x32x32, 10 classes), or with ``--model resnet18`` torchvision's
ResNet-18 (a wider network: 64 to 512 channels) at ``--size`` (64 for 3x64x64), random weights and
inputs (latency does not depend on their values). Each method compresses a copy through slimtune's own ``prepare`` and
``finalize`` (no training), at settings that cut the MACs about 2x, 3x and 4x:

- ``l1_filter``: ``ratio`` found by bisection;
- ``gal`` (``structure: channel``) and ``ssr``: the same fraction of every masked unit zeroed
  (GAL's channel masks, SSR's groups, lowest weight norm first, as training would leave them),
  the fraction found by bisection, then each method's own removal;
- ``kse``: ``levels`` G = 3, 4, 5 (its indicator decides how much goes; the MACs ratio is
  what it is, printed), inference path ``auto`` timed at each batch size.

Every model, the baseline too, is timed in each form:

- ``eager``: the ``nn.Module`` as the method leaves it;
- ``unfolded``: ``torch.export`` of that module as it is (slimtune's export before the inference
  rewrites);
- ``program``: what ``export_model`` writes as ``model.pt2``, the default deployable form that a
  trial's ``latency_ms`` times (batch norms folded into convolutions, dropout removed);
- ``compiled`` (``--compile``): that program compiled by AOTInductor (``model_compiled.pt2``);
- ``ort`` and ``ort_int8`` (``--onnx``): ``model.onnx`` in ONNX Runtime at ``--threads``, of the
  model as it is and of the model after ``minmax_quant`` at 8 bits (weights per tensor,
  activations at running maxima from one random batch), an integer QDQ model on ONNX Runtime's
  integer kernels; the int8 speed-up is over the float baseline's ``ort``;
- ``ov`` and ``ov_int8`` (``--openvino``): the same two ONNX files compiled by OpenVINO for the CPU
  at ``--threads`` (``pip install openvino``; it reads the QDQ model's scales and runs it on its
  integer kernels), to choose between the two runtimes by the figures;
- ``ort_int8fl`` and ``ov_int8fl`` (``--first-last``, with ``--onnx``/``--openvino``): as the
  ``*_int8`` forms, with ``minmax_quant``'s ``quantize_first_last`` (the stem and the classifier
  quantized too, so that the integer kernels run in NHWC from the stem on).

Speed-up = the baseline's latency in the same form / the model's; "of MACs" = speed-up / MACs
ratio. Target (issue 18): the ``program`` form's speed-up >= 0.9 x the MACs ratio at batch 64 on
CPU for the 2x-4x settings. Latencies are medians at ``--threads`` CPU threads. With ``--rounds R``
each model's forms are timed in R alternating rounds (every form once per round), so that a
load that comes and goes weighs on them alike: each latency is the median of its rounds, and
each 8-bit/float ratio the median of the rounds' ratios.

    python bench/deploy_speed.py                      # 2 threads, batch 64 and 1 (a few minutes on a quiet machine)
    python bench/deploy_speed.py --compile            # adds AOTInductor (tens of seconds to minutes per model)
    python bench/deploy_speed.py --methods l1_filter --repeats 3      # a quick check
    python bench/deploy_speed.py --onnx --methods l1_filter --repeats 3    # adds ONNX Runtime fp32 and int8
    python bench/deploy_speed.py --breakdown          # adds where the program's time goes (convolutions or other ops)
    python bench/deploy_speed.py --onnx --openvino    # adds OpenVINO on the same ONNX files
    python bench/deploy_speed.py --openvino --first-last --methods l1_filter --targets 4 --rounds 5   # 8-bit both ways, interleaved
    python bench/deploy_speed.py --model resnet18 --size 64 --onnx --openvino --batches 64 1   # the wider model
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy import FORMS, compile_program, count_flops, export_model, export_onnx, latency_ms, load_form, load_onnx  # noqa: E402
from methods import MethodContext, create_method  # noqa: E402
from methods.gal import soft_masks  # noqa: E402
from models import create_model  # noqa: E402

#: The input shape of one example; ``--size`` changes its height and width (set once in :func:`main`).
SHAPE = (3, 32, 32)
MODELS = ("resnet56", "resnet18")
TARGETS = (2.0, 3.0, 4.0)
METHODS = ("l1_filter", "gal", "kse", "ssr")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--targets", type=float, nargs="+", default=list(TARGETS), help="MACs ratios of the pruned settings (default 2 3 4)"
    )
    parser.add_argument("--model", default="resnet56", choices=MODELS, help="resnet56 (CIFAR) or torchvision's resnet18 (default resnet56)")
    parser.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every latency (default 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1], help="batch sizes timed (default 64 1)")
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed passes per latency at the largest batch; 5x as many at batch 1 (default 10)"
    )
    parser.add_argument("--onnx", action="store_true", help="also time model.onnx in ONNX Runtime, float and 8-bit integer (ort, ort_int8)")
    parser.add_argument(
        "--openvino",
        action="store_true",
        help="also time the same ONNX files in OpenVINO (ov, ov_int8; implies --onnx; pip install openvino)",
    )
    parser.add_argument(
        "--first-last",
        action="store_true",
        help="with --onnx/--openvino, also time the 8-bit model with minmax_quant's quantize_first_last (ort_int8fl, ov_int8fl)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time each model's forms in this many alternating rounds; latencies and 8-bit/float ratios are medians over them (default 1)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time the AOTInductor-compiled program (needs a C++ compiler; slow to build)"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also split the program's time at the largest batch into convolutions and everything else (torch.profiler; "
        "profiling slows each op, so the milliseconds are larger than the latencies, only the shares compare)",
    )
    return parser.parse_args(argv)


def macs(model: nn.Module) -> int:
    return count_flops(model, torch.zeros(1, *SHAPE)).macs


def context(base: nn.Module) -> MethodContext:
    return MethodContext(
        teacher=base, train_loader=[], val_loader=[], task_loss=None, evaluate=None,
        example_input=torch.zeros(1, *SHAPE), device=torch.device("cpu"), log=lambda message: None,
    )  # fmt: skip


def l1_filter(base: nn.Module, fraction: float) -> nn.Module:
    method = create_method("l1_filter", {"ratio": fraction})
    return method.finalize(method.prepare(copy.deepcopy(base), context(base)), context(base))


def _lowest(norms: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for the ``fraction`` of entries with the lowest norms (at least one kept)."""
    count = min(int(round(fraction * norms.numel())), norms.numel() - 1)
    zero = torch.zeros(norms.numel(), dtype=torch.bool)
    zero[norms.argsort()[:count]] = True
    return zero


def gal(base: nn.Module, fraction: float) -> nn.Module:
    """GAL's channel masks as FISTA would leave them: the channels with the weakest filters at 0."""
    method, ctx = create_method("gal", {"structure": "channel"}), context(base)
    model = method.prepare(copy.deepcopy(base), ctx)
    with torch.no_grad():
        for mask in soft_masks(model):
            weight = mask.inner.weight
            norms = weight.abs().flatten(1).sum(1) if weight.dim() > 1 else weight.abs()
            mask.mask.masked_fill_(_lowest(norms, fraction), 0.0)
    return method.finalize(model, ctx)


def ssr(base: nn.Module, fraction: float) -> nn.Module:
    """SSR's groups as its AULM would leave them: the weakest groups of every layer zero."""
    from methods.ssr import group_norms

    method, ctx = create_method("ssr", {}), context(base)
    model = method.prepare(copy.deepcopy(base), ctx)
    for layer in method.layers:
        norms = group_norms([w.detach() for w in layer.weights(model)], layer.group_of_row, layer.groups)
        layer.zero = _lowest(norms, fraction)
    return method.finalize(model, ctx)


def kse(base: nn.Module, levels: int, batch: int) -> nn.Module:
    method, ctx = create_method("kse", {"levels": levels, "timing_batch_size": batch}), context(base)
    return method.finalize(method.prepare(copy.deepcopy(base), ctx), ctx)


def at_macs_ratio(
    build: Callable[[nn.Module, float], nn.Module], base: nn.Module, target: float, steps: int = 9
) -> tuple[float, nn.Module]:
    """Bisect the removed fraction until the MACs ratio is within 3% of ``target``."""
    base_macs, low, high = macs(base), 0.0, 0.95
    best: tuple[float, float, nn.Module] | None = None
    for _ in range(steps):
        middle = (low + high) / 2
        model = build(base, middle)
        ratio = base_macs / macs(model)
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (middle, ratio, model)
        if abs(ratio - target) <= 0.03 * target:
            break
        low, high = (middle, high) if ratio < target else (low, middle)
    return best[0], best[2]


def int8(model: nn.Module, first_last: bool = False) -> nn.Module:
    """``model`` after ``minmax_quant`` at 8 bits (``quantize_first_last`` as given), its activations' running maxima from one random batch."""
    method = create_method("minmax_quant", {"bits": 8, "quantize_first_last": first_last})
    ctx = context(model)
    quantized = method.prepare(copy.deepcopy(model), ctx)
    with torch.no_grad():
        quantized.train()(torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(1)))
    return method.finalize(quantized, ctx).eval()


def load_openvino(path: Path, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``path`` (ONNX) compiled by OpenVINO for the CPU at ``threads`` threads, as a tensor-to-tensor callable."""
    import openvino

    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(request.infer([x.numpy()])[0])

    return run


def forms(
    model: nn.Module,
    workdir: Path,
    compile_: bool,
    onnx: bool = False,
    threads: int | None = None,
    openvino: bool = False,
    first_last: bool = False,
) -> dict[str, Any]:
    """Each form of ``model`` as a callable (see the module docstring)."""
    model = model.eval()
    out: dict[str, Any] = {"eager": model}
    with torch.no_grad():
        unfolded = torch.export.export(model, (torch.zeros(2, *SHAPE),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    out["unfolded"] = unfolded.module()
    export_model(model, torch.zeros(1, *SHAPE), workdir)
    out["program"] = load_form(workdir, "program")
    if compile_:
        compile_program(workdir)
        out["compiled"] = load_form(workdir, "compiled")
    if onnx:
        versions = [("ort", model), ("ort_int8", int8(model))] + ([("ort_int8fl", int8(model, first_last=True))] if first_last else [])
        for name, version in versions:
            export_onnx(version, torch.zeros(1, *SHAPE), workdir / f"{name}.onnx")
            out[name] = load_onnx(workdir / f"{name}.onnx", threads)
            if openvino:
                out[name.replace("ort", "ov")] = load_openvino(workdir / f"{name}.onnx", threads or torch.get_num_threads())
    return out


def breakdown(program: Any, batch: int, threads: int, repeats: int = 5) -> tuple[float, float]:
    """Milliseconds per pass of ``program`` in convolution ops and in all other ops, under torch.profiler."""
    from deploy import torch_threads

    x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch_threads(threads):
        for _ in range(3):
            program(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            for _ in range(repeats):
                program(x)
    conv = other = 0.0
    for event in profile.key_averages():
        ms = event.self_cpu_time_total / 1000 / repeats
        if "conv" in event.key:
            conv += ms
        else:
            other += ms
    return conv, other


def time_forms(
    callables: dict[str, Any], batches: list[int], repeats: int, threads: int, rounds: int = 1
) -> dict[tuple[str, int], list[float]]:
    """Each form's latency at each batch in each of ``rounds`` rounds (every form once per round, in turn).

    A form's passes run together, after 3 untimed ones: passes of different forms interleaved one
    by one time each other's thread pools (ONNX Runtime's, OpenVINO's and OpenMP's threads spin a
    while after a pass): tried once, OpenVINO's float ResNet-56 at batch 64 took 64 ms, against
    21-36 ms timed apart.
    """
    generator = torch.Generator().manual_seed(0)
    inputs = {batch: torch.randn(batch, *SHAPE, generator=generator) for batch in batches}
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for batch, x in inputs.items():
            for form, call in callables.items():
                ms = latency_ms(call, x, repeats=repeats * (5 if batch == 1 else 1), warmup=3, threads=threads)
                times.setdefault((form, batch), []).append(ms)
    return times


def float_form(name: str) -> str:
    """The float form an 8-bit form is compared with: ``ort`` for ``ort_int8`` and ``ort_int8fl``."""
    return name.split("_int8")[0]


def main(argv: list[str] | None = None) -> int:
    global SHAPE  # every helper above times and counts at this shape
    args = parse_args(argv)
    args.onnx = args.onnx or args.openvino
    SHAPE = (3, args.size, args.size)
    started = time.monotonic()
    torch.manual_seed(0)
    base = create_model(args.model, num_classes=10, in_channels=3).eval()
    with torch.no_grad():
        for module in base.modules():  # BN statistics and scales away from 0 and 1, as after training
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    base_macs = macs(base)
    names = (
        ["eager", "unfolded", "program"]
        + (["compiled"] if args.compile else [])
        + (["ort", "ort_int8"] + (["ort_int8fl"] if args.first_last else []) if args.onnx else [])
        + (["ov", "ov_int8"] + (["ov_int8fl"] if args.first_last else []) if args.openvino else [])
    )
    print(
        f"{args.model} at {SHAPE}, {base_macs / 1e6:.1f}M MACs; {args.threads} CPU threads, batches {args.batches}, median of {args.repeats} "
        f"(x5 at batch 1), {args.rounds} round(s); torch {torch.__version__}; forms: {', '.join(names)} ({FORMS['program']} is the default 'program')"
    )
    rows: list[dict[str, Any]] = []

    def add(method: str, setting: str, model: nn.Module, batches: list[int]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            callables = forms(model, Path(tmp), args.compile, args.onnx, args.threads, args.openvino, args.first_last)
            rounds = time_forms(callables, batches, args.repeats, args.threads, args.rounds)
            times = {key: statistics.median(ms) for key, ms in rounds.items()}
            largest = max(args.batches)  # the breakdown table's batch; kse's rows timed at another have none
            split = breakdown(callables["program"], largest, args.threads) if args.breakdown and largest in batches else None
        rows.append({"method": method, "setting": setting, "macs": macs(model), "times": times, "rounds": rounds, "breakdown": split})
        print(f"  {method:<9} {setting:<14} {base_macs / rows[-1]['macs']:5.2f}x fewer MACs  " + "  ".join(
            f"b{b} {form} {times[form, b]:.2f} ms" for b in batches for form in names if (form, b) in times
        ), flush=True)  # fmt: skip

    add("baseline", "-", base, args.batches)
    builders = {"l1_filter": l1_filter, "gal": gal, "ssr": ssr}
    for method in args.methods:
        if method == "kse":
            for levels in (3, 4, 5):
                for batch in args.batches:  # path auto picks each layer's faster path at the timing batch
                    add("kse", f"G={levels} @b{batch}", kse(base, levels, batch), [batch])
            continue
        for target in args.targets:
            fraction, model = at_macs_ratio(builders[method], base, target)
            add(method, f"{fraction:.3f} removed", model, args.batches)
    report(rows, names, args.batches, args.threads)
    print(f"\n{time.monotonic() - started:.0f} s in all")
    return 0


def report(rows: list[dict[str, Any]], names: list[str], batches: list[int], threads: int) -> None:
    base = rows[0]
    for batch in batches:
        print(f"\nbatch {batch}, {threads} CPU threads: latency ms (speed-up over the baseline in the same form; speed-up / MACs ratio)")
        print(f"{'method':<9} {'setting':<14} {'MACs ratio':>10}  " + "  ".join(f"{name:>24}" for name in names))
        for row in rows:
            if ("program", batch) not in row["times"]:
                continue
            ratio = base["macs"] / row["macs"]
            cells = []
            for name in names:
                ms = row["times"][name, batch]
                speedup = base["times"][float_form(name), batch] / ms  # int8 against the float model in its runtime
                cells.append(f"{ms:8.2f} ({speedup:4.2f}x; {speedup / ratio:4.2f})")
            print(f"{row['method']:<9} {row['setting']:<14} {ratio:>10.2f}  " + "  ".join(f"{c:>24}" for c in cells))
    if base["breakdown"] is not None:
        batch = max(batches)
        print(f"\nprogram at batch {batch}, under torch.profiler: ms per pass in convolutions and in other ops (ReLU, residual add, ...)")
        print(f"{'method':<9} {'setting':<14} {'MACs ratio':>10}  {'conv ms':>8} {'conv GMAC/s':>11} {'other ms':>8} {'other share':>11}")
        for row in rows:
            if row["breakdown"] is None:
                continue
            conv, other = row["breakdown"]
            rate = row["macs"] * batch / conv / 1e6
            print(
                f"{row['method']:<9} {row['setting']:<14} {base['macs'] / row['macs']:>10.2f}  {conv:8.2f} {rate:11.1f} {other:8.2f} {other / (conv + other):11.0%}"
            )
    deploy_targets(rows, names, batches)
    in_range = [r for r in rows[1:] if 2.0 * 0.97 <= base["macs"] / r["macs"] <= 4.0 * 1.03 and ("program", 64) in r["times"]]
    if 64 in batches and in_range:
        shares = [base["times"]["program", 64] / r["times"]["program", 64] / (base["macs"] / r["macs"]) for r in in_range]
        met = sum(share >= 0.9 for share in shares)
        print(
            f"\ntarget (program form, batch 64, 2x-4x fewer MACs): speed-up >= 0.9 x MACs ratio in {met} of {len(shares)} settings; "
            f"speed-up / MACs ratio min {min(shares):.2f}, median {statistics.median(shares):.2f}"
        )


FLOAT_FORMS = ("eager", "unfolded", "program", "compiled", "ort", "ov")


def deploy_targets(rows: list[dict[str, Any]], names: list[str], batches: list[int]) -> None:
    """Issue 26's targets: the 8-bit baseline against its float model in the same runtime; ~4x fewer
    MACs and 8 bits against the float baseline's fastest form; batch 1's deployed forms against the program."""
    base = rows[0]
    rounds = len(base["rounds"][names[0], batches[0]])
    for form in (n for n in names if "_int8" in n):
        runtime = float_form(form)
        shares = {b: [q / f for q, f in zip(base["rounds"][form, b], base["rounds"][runtime, b], strict=True)] for b in batches}
        print(
            f"\ntarget (8-bit baseline {form}: <= 0.45x its float latency in {runtime} at batch 64, faster at batch 1; "
            f"median of {rounds} round(s), their range): "
            + ", ".join(f"batch {b} {statistics.median(s):.2f}x ({min(s):.2f}-{max(s):.2f})" for b, s in shares.items())
        )
    int8_forms = [n for n in names if "_int8" in n]
    if 64 in batches and int8_forms:
        fastest_float = min((base["times"][n, 64], n) for n in names if n in FLOAT_FORMS)
        print(
            f"target (about 4x fewer MACs + 8 bits: >= 4x faster than the float baseline's fastest form, {fastest_float[1]} {fastest_float[0]:.2f} ms, at batch 64):"
        )
        for row in rows[1:]:
            ratio = base["macs"] / row["macs"]
            if abs(ratio - 4.0) <= 0.12 * 4.0 and (int8_forms[0], 64) in row["times"]:
                best = min((row["times"][n, 64], n) for n in int8_forms)
                print(
                    f"  {row['method']:<9} {row['setting']:<14} {ratio:.2f}x fewer MACs: {best[1]} {best[0]:.2f} ms, {fastest_float[0] / best[0]:.2f}x faster"
                )
    if 1 in batches:
        deployed = [n for n in names if n not in ("eager", "unfolded", "program")]
        slower = [
            f"{row['method']} {row['setting']} {n}" for row in rows for n in deployed
            if (n, 1) in row["times"] and row["times"][n, 1] > row["times"]["program", 1]
        ]  # fmt: skip
        print(
            f"target (batch 1: every deployed form at most the program's latency): {len(slower)} slower"
            + (f": {', '.join(slower)}" if slower else "")
        )


if __name__ == "__main__":
    sys.exit(main())
