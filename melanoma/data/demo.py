"""A synthetic dermoscopy-like dataset in the Kaggle layout, deterministic per seed.

Benign: small, round, evenly coloured lesions. Malignant: larger, asymmetric, with an irregular
border and several colours (the ABCD rule in caricature). Both on varied skin tones, so a
model must look at the lesion, not the background.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from melanoma.data.records import CLASSES

SKIN_TONES = np.array([[224, 186, 160], [205, 160, 130], [180, 130, 100], [235, 200, 180]], np.float32)
LESION_BROWNS = np.array([[120, 75, 50], [95, 60, 40], [140, 95, 65]], np.float32)
MALIGNANT_EXTRAS = np.array([[40, 25, 20], [90, 95, 120], [160, 60, 50], [70, 40, 30]], np.float32)


def _lesion_mask(rng: np.random.Generator, size: int, radius: float, irregularity: float) -> np.ndarray:
    """A star-shaped blob: radius modulated by a few random harmonics of the angle."""
    angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    r = np.ones_like(angles)
    for k in range(2, 7):
        r += irregularity * rng.uniform(0, 1 / k) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    center = size / 2 + rng.normal(0, size * 0.05, 2)
    points = np.stack([center[0] + radius * r * np.cos(angles), center[1] + radius * r * np.sin(angles)], 1)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [points.astype(np.int32)], 1)
    return mask.astype(bool)


def synthetic_lesion(rng: np.random.Generator, malignant: bool, size: int = 128) -> np.ndarray:
    """One RGB uint8 picture of a synthetic lesion on skin."""
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] + rng.normal(0, 8, 3)
    image = np.tile(skin, (size, size, 1)) + rng.normal(0, 6, (size, size, 3))
    if malignant:
        mask = _lesion_mask(rng, size, size * rng.uniform(0.24, 0.36), irregularity=rng.uniform(0.8, 1.4))
        image[mask] = LESION_BROWNS[rng.integers(len(LESION_BROWNS))]
        for colour in MALIGNANT_EXTRAS[rng.permutation(len(MALIGNANT_EXTRAS))[:rng.integers(2, 4)]]:
            blotch = _lesion_mask(rng, size, size * rng.uniform(0.08, 0.16), irregularity=1.0)
            shift = rng.integers(-size // 8, size // 8, 2)
            blotch = np.roll(blotch, tuple(shift), axis=(0, 1)) & mask
            image[blotch] = colour
    else:
        mask = _lesion_mask(rng, size, size * rng.uniform(0.12, 0.22), irregularity=rng.uniform(0.0, 0.25))
        image[mask] = LESION_BROWNS[rng.integers(len(LESION_BROWNS))] + rng.normal(0, 4, 3)
    image[mask] += rng.normal(0, 5, (int(mask.sum()), 3))
    image = cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (3, 3), 0)
    return image


def make_demo_dataset(root: str | Path, per_class: int = 240, seed: int = 0, size: int = 128,
                      test_fraction: float = 0.25) -> Path:
    """Write ``root/{train,test}/{benign,malignant}/*.jpg``; returns ``root``.

    ``per_class`` training images per class, and ``test_fraction`` as many again for test.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = {"train": per_class, "test": max(1, round(per_class * test_fraction))}
    for split, n in counts.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rgb = synthetic_lesion(rng, malignant=bool(label), size=size)
                cv2.imwrite(str(folder / f"{name}_{i:04d}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 92])
    return root


def demo_dataset(per_class: int, seed: int, base: Path) -> Path:
    """The demo dataset for these settings under ``base``, generated on first use."""
    root = base / f"demo-{per_class}-seed{seed}"
    if not (root / ".complete").exists():
        make_demo_dataset(root, per_class=per_class, seed=seed)
        (root / ".complete").touch()
    return root
