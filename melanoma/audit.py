"""Know your data: duplicates, a background-only probe, and per-class image statistics.

The probe answers "can the label be predicted without looking at the lesion?": a gradient-boosted
classifier sees only colour statistics of the outer ring of each image (the lesion, in the
middle, is masked out). A cross-validated AUC near 0.5 means the border carries no label
information; near 1 means the classes come from different cameras or clinics, and a CNN can
score well by learning the photograph instead of the lesion.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.ensemble import HistGradientBoostingClassifier  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402
from sklearn.model_selection import StratifiedKFold, cross_val_predict  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402
from tqdm import tqdm  # noqa: E402

from melanoma.classifier.preprocessing import InvalidImageError, PreprocessSpec, image_dimensions  # noqa: E402
from melanoma.data.combine import load_datasets  # noqa: E402
from melanoma.data.dataset import PreparedData  # noqa: E402
from melanoma.data.records import CLASSES, Source  # noqa: E402

log = logging.getLogger(__name__)

RING = 0.15  # the outer share of each side that the border probe sees
# Central-crop correlation above which two different files count as the same lesion (calibrated by
# eye on melanoma10k at 64 px: 0.98 keeps re-shot lesions, 0.97 starts pairing different ones).
NEAR_DUPLICATE_CORRELATION = 0.98
DARK_CORNER = 40  # mean corner brightness (0-255) below which a corner counts as vignetted


def ring_mask(size: int, ring: float = RING) -> np.ndarray:
    """True on the outer ``ring`` share of a square image."""
    width = max(1, int(round(size * ring)))
    mask = np.ones((size, size), bool)
    mask[width:-width, width:-width] = False
    return mask


def border_features(images: np.ndarray) -> np.ndarray:
    """Colour statistics of the outer ring only (uint8 images (N, 3, H, W)): per channel mean,
    std and quartiles, and the darkness of each corner."""
    n, c, h, _ = images.shape
    ring = images[:, :, ring_mask(h)].astype(np.float32)  # (N, C, ring pixels)
    quartiles = np.percentile(ring, [25, 50, 75], axis=2).transpose(1, 0, 2).reshape(n, -1)
    k = max(1, h // 8)
    corners = [images[:, :, :k, :k], images[:, :, :k, -k:], images[:, :, -k:, :k], images[:, :, -k:, -k:]]
    corner_means = np.stack([cr.reshape(n, -1).mean(1) for cr in corners], 1)
    return np.concatenate([ring.mean(2), ring.std(2), quartiles, corner_means], 1)


def border_probe(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[float, np.ndarray]:
    """Cross-validated (5-fold) AUC of a classifier that sees only the image border; also the
    out-of-fold probabilities."""
    folds = min(5, int(np.bincount(labels).min()))
    if folds < 2:
        return float("nan"), np.full(len(labels), np.nan)
    # Leaves of 20 (the default) cannot split a few dozen images; small sets get smaller leaves.
    classifier = HistGradientBoostingClassifier(max_iter=200, min_samples_leaf=max(2, min(20, len(labels) // 50)),
                                                random_state=seed)
    # One OpenMP thread: on a busy 2-core machine, OpenMP's spinning workers made this 30x slower.
    with threadpool_limits(limits=1, user_api="openmp"):
        probs = cross_val_predict(classifier,
                                  border_features(images), labels,
                                  cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                  method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, probs)), probs


def central_signatures(images: np.ndarray) -> np.ndarray:
    """The central half of each image (N, C, H, W), flattened, zero-mean and unit-norm: its dot
    product with another is their correlation. The centre, because dermoscope vignettes make
    whole-image correlations high between different lesions."""
    h, w = images.shape[-2:]
    centre = images[:, :, h // 4: h - h // 4, w // 4: w - w // 4].reshape(len(images), -1).astype(np.float32)
    centre -= centre.mean(axis=1, keepdims=True)
    return centre / np.maximum(np.linalg.norm(centre, axis=1, keepdims=True), 1e-6)


def similar_pairs(signatures: np.ndarray, threshold: float, block: int = 1024) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose signatures correlate above ``threshold``, in blocks of rows."""
    pairs = []
    for start in tqdm(range(0, len(signatures), block), desc="comparing images", unit="block", leave=False):
        rows, cols = np.nonzero(signatures[start:start + block] @ signatures.T > threshold)
        rows += start
        pairs += [(int(i), int(j)) for i, j in zip(rows, cols) if j > i]
    return pairs


def duplicate_pairs(data: PreparedData) -> dict:
    """Exact (same md5) and near (central correlation above ``NEAR_DUPLICATE_CORRELATION``: the same
    lesion re-encoded, resized or photographed again) duplicate pairs, with how many cross splits
    or carry conflicting labels."""
    groups: dict[str, list[int]] = {}
    for i, md5 in enumerate(data.md5s):
        groups.setdefault(md5, []).append(i)
    exact = [(a, b) for members in groups.values() for k, a in enumerate(members) for b in members[k + 1:]]
    near = [(i, j) for i, j in similar_pairs(central_signatures(data.images), NEAR_DUPLICATE_CORRELATION)
            if data.md5s[i] != data.md5s[j]]

    def describe(pairs: list[tuple[int, int]]) -> dict:
        return {"pairs": len(pairs),
                "cross_split": int(sum(data.splits[i] != data.splits[j] for i, j in pairs)),
                "conflicting_labels": int(sum(data.labels[i] != data.labels[j] for i, j in pairs)),
                "examples": [[data.paths[i], data.paths[j]] for i, j in pairs[:20]]}

    return {"exact": describe(exact), "near": describe(near)}


def original_dimensions(data: PreparedData) -> np.ndarray:
    """(width, height) of each file from its header."""
    dims = []
    for location in dict.fromkeys(data.locations):
        source = Source(location)
        try:
            for i in np.flatnonzero(data.locations == location):
                try:
                    dims.append((i, image_dimensions(source.read(data.paths[i]))))
                except InvalidImageError:
                    dims.append((i, (0, 0)))
        finally:
            source.close()
    return np.array([d for _, d in sorted(dims, key=lambda x: x[0])], dtype=np.float64)


def source_table(data: PreparedData, seed: int = 0) -> dict:
    """Per source: images of each class, the border probe within that source (where it holds
    both classes), and a warning where a source holds one class only."""
    table = {}
    for source in sorted(set(data.sources)):
        idx = np.flatnonzero(data.sources == source)
        counts = {name: int((data.labels[idx] == label).sum()) for label, name in enumerate(CLASSES)}
        row: dict = {**counts, "border_probe_auc": float("nan")}
        if min(counts.values()) == 0:
            only = next(name for name, c in counts.items() if c)
            row["warning"] = (f"every {source} image is {only}: in this data the source predicts the label, so a "
                              f"model can learn what {source} photos look like instead of what the lesions are")
        else:
            row["border_probe_auc"] = border_probe(data.images[idx], data.labels[idx], seed)[0]
        table[source] = row
    return table


def class_statistics(data: PreparedData, dims: np.ndarray) -> dict:
    """Per class: original size and aspect, brightness, mean colour, share of dark corners."""
    k = max(1, data.images.shape[-1] // 8)
    corners = np.stack([data.images[:, :, :k, :k], data.images[:, :, :k, -k:],
                        data.images[:, :, -k:, :k], data.images[:, :, -k:, -k:]], 1)
    dark_corners = corners.reshape(len(data.images), 4, -1).mean(2).min(1) < DARK_CORNER
    stats = {}
    for label, name in enumerate(CLASSES):
        idx = data.labels == label
        if not idx.any():
            continue
        rgb = data.images[idx].reshape(idx.sum(), 3, -1).mean(2)
        sizes = dims[idx]
        stats[name] = {
            "count": int(idx.sum()),
            "original_sizes": {f"{int(w)}x{int(h)}": int(c) for (w, h), c in
                               zip(*np.unique(sizes, axis=0, return_counts=True))},
            "aspect_mean": float(np.mean(sizes[:, 0] / np.maximum(sizes[:, 1], 1))),
            "brightness_mean": float(rgb.mean()),
            "rgb_mean": [float(v) for v in rgb.mean(0)],
            "dark_corner_share": float(dark_corners[idx].mean()),
        }
    return stats


def verdict(probe_auc: float, exact: int, near: int, confounds: list[str] = ()) -> str:
    if probe_auc != probe_auc:
        shortcut = "border probe not run (too few images per class)"
    elif probe_auc >= 0.8:
        shortcut = (f"SHORTCUT RISK: the image border alone predicts the label (AUC {probe_auc:.3f}); "
                    "the classes differ in how they were photographed")
    elif probe_auc >= 0.65:
        shortcut = f"some label information in the image border (AUC {probe_auc:.3f})"
    else:
        shortcut = f"no label information in the image border (AUC {probe_auc:.3f})"
    return "; ".join([shortcut, f"{exact} exact and {near} near duplicate pairs", *confounds])


def audit_dataset(datasets: str | Path, img_size: int = 64, seed: int = 0, require_train: bool = True,
                  label_map: str = "", locations: dict[str, Path] | None = None) -> dict:
    """The audit report of one dataset or several (comma-separated, as ``data`` takes them), as a
    dict (JSON-serialisable)."""
    spec = PreprocessSpec(img_size=img_size, channels=3, color_constancy=False, crop_lesion=False)  # the whole frame
    data = load_datasets(str(datasets), spec, require_train=require_train, label_map=label_map, locations=locations)
    probe_auc, probe_probs = border_probe(data.images, data.labels, seed)
    duplicates = duplicate_pairs(data)
    stats = class_statistics(data, original_dimensions(data))
    sources = source_table(data, seed)
    report = {
        "data": data.source,
        "images": len(data.labels),
        "skipped_files": len(data.skipped),
        "border_probe_auc": probe_auc,
        "exact_duplicate_pairs": duplicates["exact"]["pairs"],
        "near_duplicate_pairs": duplicates["near"]["pairs"],
        "cross_split_duplicate_pairs": duplicates["exact"]["cross_split"] + duplicates["near"]["cross_split"],
        "conflicting_label_pairs": duplicates["exact"]["conflicting_labels"] + duplicates["near"]["conflicting_labels"],
        "copies_across_datasets": data.copies_removed,
        "copies_within_datasets": data.copies_within,
        "verdict": verdict(probe_auc, duplicates["exact"]["pairs"], duplicates["near"]["pairs"],
                           [row["warning"] for row in sources.values() if "warning" in row]),
        "duplicates": duplicates,
        "class_statistics": stats,
        "sources": sources,
    }
    report["_figure_data"] = {"labels": data.labels, "probe_probs": probe_probs, "images": data.images}
    return report


def audit_figure(report: dict) -> plt.Figure:
    """One page: the border probe's ROC, brightness and corner darkness by class, example borders."""
    fig_data = report["_figure_data"]
    labels, probs, images = fig_data["labels"], fig_data["probe_probs"], fig_data["images"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    if np.isfinite(report["border_probe_auc"]):
        fpr, tpr, _ = roc_curve(labels, probs)
        axes[0].plot(fpr, tpr, label=f"border-only probe, AUC {report['border_probe_auc']:.3f}")
    axes[0].plot([0, 1], [0, 1], "--", c="gray", lw=0.8, label="no information")
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="label from the border alone")
    axes[0].legend(fontsize=8, loc="lower right")
    brightness = images.reshape(len(images), -1).mean(1)
    k = max(1, images.shape[-1] // 8)
    corner = images[:, :, :k, :k].reshape(len(images), -1).mean(1)
    for label, name in enumerate(CLASSES):
        axes[1].hist(brightness[labels == label], bins=40, alpha=0.6, label=name, density=True)
        axes[2].hist(corner[labels == label], bins=40, alpha=0.6, label=name, density=True)
    axes[1].set(xlabel="mean brightness (0-255)", title="brightness by class")
    axes[2].set(xlabel="top-left corner brightness (0-255)", title="vignette (dark corners) by class")
    for ax in axes[1:]:
        ax.legend(fontsize=8)
    fig.suptitle(report["verdict"], fontsize=9)
    fig.tight_layout()
    return fig


def public_report(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def write_report(report: dict, json_path: Path | None, figure_path: Path | None) -> list[Path]:
    written = []
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(public_report(report), indent=2))
        written.append(json_path)
    if figure_path is not None:
        figure_path.parent.mkdir(parents=True, exist_ok=True)
        fig = audit_figure(report)
        fig.savefig(figure_path, dpi=110)
        plt.close(fig)
        written.append(figure_path)
    return written
