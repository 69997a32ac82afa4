"""Latency of packed quantized models as trials time it: does quantization still cost time?

A trial's ``latency_ms`` times the exported program (``model.pt2``) loaded by
``deploy.load_program``. Packed quantized layers store integer codes; the program
dequantizes them (shifts, masks, casts, scale). This bench builds the space's model (random
weights: latency does not depend on their values), quantizes a copy with each of ``--methods``
(``minmax_quant``: weights and each quantized layer's input; ``minmax_weights``: ``minmax_quant``
with ``quantize_activations: false``, weights only; ``pams``: weights and the residual blocks'
activations) at each of ``--bits`` through slimtune's own pipeline trained one step on one
batch (what the pre-flight does: enough to calibrate and pack), exports each and times, at the
trial's input shape and ``measure.latency_batch_size``, with ``deploy.latency_ms`` at
``--threads``:

- ``plain``: ``torch.export.load(path).module()``, what a user gets without slimtune: the
  weights are unpacked in every call;
- ``program``: ``deploy.load_program(path)``, what trials time and ``slimtune export``
  reports: the weights are unpacked once, at load;
- ``module``: the pickled ``nn.Module`` (``model.pt``), packed layers' weights cached while timed.

Each figure is the median over ``--rounds`` rounds (in each round every model and form in turn,
so that a change of the machine's load spreads over all of them) of ``latency_ms``'s median of
``--repeats`` calls, and of the process's CPU time per call in the same calls (warm-up included),
which waits for no other process and so moves less with the load; the machine's load average is
printed with them.

    python bench/quant_latency.py     # spaces/sr_quickstart.yaml: EDSR-small x2, 24x24 LR input, batch 1, 1 thread (about 4 min)
    python bench/quant_latency.py --methods minmax_quant --bits 8 4 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy import export_model, latency_ms, load_exported, load_form  # noqa: E402
from search.space.spec import load_space  # noqa: E402
from search.trial.context import build_model, first_batch, load_task, run_one_batch  # noqa: E402  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: Each ``--methods`` choice: the registered method and the parameters it adds to ``bits``.
METHODS = {"minmax_quant": ("minmax_quant", {}), "minmax_weights": ("minmax_quant", {"quantize_activations": False}), "pams": ("pams", {})}
FORMS = ("plain", "program", "module")
WARMUP = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default=str(ROOT / "spaces" / "sr_quickstart.yaml"), help="the task, model and latency batch size")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30, help="timed calls per latency_ms")
    p.add_argument("--rounds", type=int, default=5, help="latency_ms runs per form; their median is printed")
    return p.parse_args(argv)


def load_forms(out_dir: Path) -> dict[str, torch.nn.Module]:
    """Each of :data:`FORMS` loaded from an export directory."""
    return {
        "plain": load_exported(out_dir).module(),
        "program": load_form(out_dir, "program"),
        "module": load_form(out_dir, "module"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="torch")
    space = load_space(args.space)
    task = load_task(space)
    torch.manual_seed(0)
    baseline = build_model(space, task).eval()
    x = task.example_input(space.latency_batch_size)
    batch = first_batch(space, task)
    runs: list[tuple[str, int, torch.nn.Module]] = [("float", 32, baseline)]
    for label in args.methods:
        method, params = METHODS[label]
        for bits in args.bits:
            recipe = [{"name": method, "params": {"bits": bits, **params}}]
            runs.append((label, bits, run_one_batch(recipe, space, task, copy.deepcopy(baseline), baseline, batch)[0]))
    with tempfile.TemporaryDirectory() as tmp:
        artifacts, loaded = [], []
        for label, bits, model in runs:
            out_dir = Path(tmp) / f"{label}-{bits}"
            artifacts.append(export_model(model, task.example_input(1), out_dir)["model.pt2"])
            loaded.append(load_forms(out_dir))
        print(
            f"{space.model} on {space.task}, input {tuple(x.shape)}, {args.threads} thread(s), "
            f"median of {args.rounds} rounds x {args.repeats} calls; load average {os.getloadavg()[0]:.2f} at the start"
        )
        times = [{form: [] for form in FORMS} for _ in runs]
        cpu = [{form: [] for form in FORMS} for _ in runs]
        for _ in range(args.rounds):
            for forms, measured, used in zip(loaded, times, cpu):
                for form in FORMS:
                    started = time.process_time()
                    measured[form].append(latency_ms(forms[form], x, repeats=args.repeats, warmup=WARMUP, threads=args.threads))
                    used[form].append((time.process_time() - started) * 1000.0 / (WARMUP + args.repeats))
    print(f"{'':<19} {'':>12} {'latency_ms (wall, median)':^32} {'CPU ms per call':^32}")
    print(
        f"{'model':<14} {'bits':>4} {'model.pt2 B':>12} "
        + " ".join(f"{form:>10}" for form in FORMS)
        + " "
        + " ".join(f"{form:>10}" for form in FORMS)
    )
    for (label, bits, _), artifact, measured, used in zip(runs, artifacts, times, cpu):
        wall = " ".join(f"{statistics.median(measured[form]):>10.2f}" for form in FORMS)
        spent = " ".join(f"{statistics.median(used[form]):>10.2f}" for form in FORMS)
        print(f"{label:<14} {bits:>4} {artifact:>12,} {wall} {spent}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
