"""Interpretation and adversarial-input detection for decouple (:mod:`methods.decouple`), and its HTML report.

Ours: the paper's abstract names the uses. The calculation paths (the gated filters' encodings)
are summarised per class (:func:`filter_paths`), compared within and across classes
(:func:`hamming_distances`, :func:`knn_accuracy`), and used to tell FGSM examples from clean
inputs (:func:`fgsm`, :func:`fgsm_path_distances`, :func:`auroc`); :func:`analyse` does all of
it on a gated model and :func:`write_report` renders the result.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deploy import eval_mode
from methods._gated_conv import Encodings, collect_encodings, gated_convs, set_dynamic

__all__ = [
    "filter_paths",
    "hamming_distances",
    "knn_accuracy",
    "auroc",
    "fgsm",
    "fgsm_path_distances",
    "detection_auroc",
    "Analysis",
    "analyse",
    "write_report",
]


def filter_paths(encodings: Encodings, num_classes: int) -> dict[str, torch.Tensor]:
    """``{layer: (num_classes, C_out)}``: how often each filter is open for the inputs of each class (by label)."""
    out = {}
    for name, codes in encodings.layers.items():
        rows = []
        for c in range(num_classes):
            members = codes[encodings.targets == c]
            rows.append(members.float().mean(0) if len(members) else torch.zeros(codes.shape[1]))
        out[name] = torch.stack(rows)
    return out


def hamming_distances(paths: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean Hamming distance between the paths of two different inputs of the same class, and of different classes."""
    distance = torch.cdist(paths.float(), paths.float(), p=1)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    different = labels[:, None] != labels[None, :]
    intra = float(distance[same].mean()) if same.any() else 0.0
    inter = float(distance[different].mean()) if different.any() else 0.0
    return intra, inter


def knn_accuracy(reference: torch.Tensor, reference_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Accuracy of a ``k``-nearest-neighbour vote (Hamming distance) of the queries' paths among the reference paths.

    Binary paths tie often, so every reference input as close as the ``k``-th nearest votes (no
    arbitrary tie-break); a tied vote goes to the lowest class.
    """
    distance = torch.cdist(queries.float(), reference.float(), p=1)
    kth = distance.kthvalue(min(k, len(reference)), dim=1).values
    neighbours = (distance <= kth[:, None]).float()
    classes = int(max(reference_labels.max(), labels.max())) + 1
    votes = neighbours @ F.one_hot(reference_labels, classes).float()
    return float((votes.argmax(1) == labels).float().mean())


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of a score that should be higher for ``positives`` (ties count one half)."""
    if len(negatives) == 0 or len(positives) == 0:
        return 0.5
    greater = (positives[:, None] > negatives[None, :]).double().mean()
    ties = (positives[:, None] == negatives[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def detection_auroc(clean: torch.Tensor, adversarial: torch.Tensor, changed: torch.Tensor) -> float:
    """AUROC of the path distance telling successful FGSM examples from clean inputs.

    Only the adversarial examples that changed the prediction (``changed``) are positives: an
    attack that failed leaves an input the model still reads as its class, and counting it
    would charge the detector for inputs that are not adversarial in effect. 0.5 when none did.
    """
    return auroc(clean, adversarial[changed])


def fgsm(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """FGSM examples (Goodfellow et al.): ``inputs + epsilon * sign(grad of the CE)``, the model in eval mode."""
    x = inputs.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), targets)
    (grad,) = torch.autograd.grad(loss, x)
    return (inputs + epsilon * grad.sign()).detach()


@dataclass
class Analysis:
    """What :func:`analyse` found; :func:`write_report` renders it.

    Attributes:
        class_paths: :func:`filter_paths` of the reference data.
        intra, inter: :func:`hamming_distances` of the queries.
        knn_accuracy: :func:`knn_accuracy` of the queries among the reference inputs.
        clean_distances, adversarial_distances: each query's (and its FGSM example's) path's L1
            distance to the mean reference path of the class the model predicts for it.
        fgsm_changed: Which FGSM examples change the model's prediction.
        fgsm_auroc: How well that distance separates the successful FGSM examples (those in
            ``fgsm_changed``) from clean inputs (:func:`detection_auroc`).
        fgsm_auroc_all: The same over every FGSM example, failed attacks included.
        fgsm_success: Fraction of FGSM examples that change the model's prediction.
        epsilon: The FGSM step, in input units.
    """

    class_paths: dict[str, torch.Tensor]
    intra: float
    inter: float
    knn_accuracy: float
    clean_distances: torch.Tensor
    adversarial_distances: torch.Tensor
    fgsm_changed: torch.Tensor
    fgsm_auroc: float
    fgsm_auroc_all: float
    fgsm_success: float
    epsilon: float

    def figures(self) -> dict[str, float]:
        return {
            "intra_class_hamming": self.intra,
            "inter_class_hamming": self.inter,
            "knn_accuracy": self.knn_accuracy,
            "fgsm_auroc": self.fgsm_auroc,
            "fgsm_auroc_all": self.fgsm_auroc_all,
            "fgsm_success": self.fgsm_success,
        }


def _first_examples(loader: Any, limit: int) -> Any:
    """``loader``'s batches until ``limit`` examples (the last one cut)."""
    seen = 0
    for inputs, labels in loader:
        if seen >= limit:
            return
        take = min(limit - seen, inputs.shape[0])
        yield inputs[:take], labels[:take]
        seen += take


def fgsm_path_distances(
    model: nn.Module, reference: Encodings, loader: Any, device: torch.device | str, epsilon: float, limit: int = 1000
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Path distances of clean inputs and of their FGSM examples to the mean path of the predicted class.

    Returns ``(clean distances, adversarial distances, which FGSM examples change the prediction)``.
    """
    num_classes = int(reference.targets.max()) + 1
    means = torch.stack(
        [
            reference.paths[reference.targets == c].mean(0) if (reference.targets == c).any() else reference.paths.mean(0)
            for c in range(num_classes)
        ]
    )
    batches = list(_first_examples(loader, limit))
    clean = collect_encodings(model, batches, device)
    with eval_mode(model):
        adversarial_batches = [(fgsm(model, x.to(device), y.to(device), epsilon).cpu(), y) for x, y in batches]
    adversarial = collect_encodings(model, adversarial_batches, device)

    def distance(enc: Encodings) -> torch.Tensor:
        predicted = enc.predictions.clamp_max(num_classes - 1)
        return (enc.paths - means[predicted]).abs().sum(1)

    return distance(clean), distance(adversarial), adversarial.predictions != clean.predictions


def analyse(
    model: nn.Module, reference_loader: Any, query_loader: Any, device: torch.device | str, epsilon: float, limit: int = 1000
) -> Analysis:
    """Paths per class on the reference data; Hamming distances, kNN accuracy and FGSM detection on the queries.

    Runs on the gated model in its static form (restored afterwards); at most ``limit``
    examples of each loader.
    """
    dynamic = {name: m.dynamic for name, m in gated_convs(model).items()}
    set_dynamic(model, False)
    try:
        reference = collect_encodings(model, list(_first_examples(reference_loader, limit)), device)
        queries = collect_encodings(model, list(_first_examples(query_loader, limit)), device)
        num_classes = int(max(reference.targets.max(), queries.targets.max())) + 1
        intra, inter = hamming_distances(queries.paths, queries.targets)
        knn = knn_accuracy(reference.paths, reference.targets, queries.paths, queries.targets)
        clean, adversarial, changed = fgsm_path_distances(model, reference, query_loader, device, epsilon, limit)
    finally:
        for name, m in gated_convs(model).items():
            m.dynamic = dynamic[name]
    return Analysis(
        filter_paths(reference, num_classes), intra, inter, knn, clean, adversarial, changed,
        detection_auroc(clean, adversarial, changed), auroc(clean, adversarial), float(changed.float().mean()), epsilon,
    )  # fmt: skip


def write_report(analysis: Analysis, folder: Path, figures: dict[str, float] | None = None) -> list[Path]:
    """Write ``report.html`` with ``paths.png`` (per-class filter paths per layer) and ``fgsm.png`` into ``folder``.

    Returns the files written.
    """
    import matplotlib  # noqa: PLC0415  heavy, and only for the report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = list(analysis.class_paths.items())
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 2.2 * max(len(layers), 1)), squeeze=False)
    for ax, (name, frequency) in zip(axes[:, 0], layers):
        image = ax.imshow(frequency.numpy(), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_title(f"{name}: how often each filter is open, per class", fontsize=9)
        ax.set_ylabel("class")
        ax.set_xlabel("filter")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    paths_png = folder / "paths.png"
    fig.savefig(paths_png, dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = 30
    ax.hist(analysis.clean_distances.numpy(), bins=bins, alpha=0.6, label="clean")
    ax.hist(
        analysis.adversarial_distances[analysis.fgsm_changed].numpy(),
        bins=bins,
        alpha=0.6,
        label=f"successful FGSM (eps {analysis.epsilon:g})",
    )
    ax.set_xlabel("L1 distance of the path to the predicted class's mean path")
    ax.set_ylabel("inputs")
    ax.legend()
    fig.tight_layout()
    fgsm_png = folder / "fgsm.png"
    fig.savefig(fgsm_png, dpi=90)
    plt.close(fig)
    rows = {**analysis.figures(), **(figures or {})}
    table = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in rows.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>decouple: calculation paths</title></head>
<body>
<h1>Architecture decoupling: calculation paths</h1>
<p>Intra-class Hamming distance between two inputs' paths: {analysis.intra:.2f}; inter-class: {analysis.inter:.2f}.
kNN (k=5) on the paths predicts the class with accuracy {analysis.knn_accuracy:.3f}.
FGSM examples (eps {analysis.epsilon:g}) change the prediction {analysis.fgsm_success:.1%} of the time; those successful
attacks are told from clean inputs by their path's distance to the predicted class's mean path with AUROC
{analysis.fgsm_auroc:.3f} ({analysis.fgsm_auroc_all:.3f} counting the failed attacks too).</p>
<table border="1" cellpadding="3"><tr><th>figure</th><th>value</th></tr>
{table}
</table>
<h2>Per-class filter paths</h2><img src="paths.png" alt="per-class filter paths">
<h2>Adversarial-input detection</h2><img src="fgsm.png" alt="path distances of clean and FGSM inputs">
</body></html>
"""
    report = folder / "report.html"
    report.write_text(page)
    return [report, paths_png, fgsm_png]
