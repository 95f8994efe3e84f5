"""Generated pictures that are not dermoscopy photos, for measuring the in-scope check: flat
colours, noise, gradients, documents, screenshots, checkerboards, tiny or extreme crops of real
photos, and real photos in grey (as a radiograph or a black-and-white scan would come). Deterministic
for a seed."""

from __future__ import annotations

import cv2
import numpy as np

GENERATED_KINDS = ("flat colour", "noise", "gradient", "document", "screenshot", "checkerboard", "tiny crop",
                   "extreme crop", "grey photo")
FROM_PHOTOS = 3  # the last kinds are made from photos


def generated_pictures(rng: np.random.Generator, photos: list[np.ndarray], per_kind: int = 8,
                       size: int = 256) -> dict[str, list[np.ndarray]]:
    """``per_kind`` RGB uint8 pictures of each kind; the crops are cut from ``photos`` (RGB)."""
    def flat() -> np.ndarray:
        return np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8)

    def noise() -> np.ndarray:
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

    def gradient() -> np.ndarray:
        ramp = np.linspace(0, 1, size)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 60, 3)
        return np.clip(np.broadcast_to(ramp, (size, size, 3)), 0, 255).astype(np.uint8)

    def document() -> np.ndarray:
        page = np.full((size, size, 3), 245, np.uint8)
        for y in range(16, size - 16, 14):
            x = int(rng.integers(12, 30))
            while x < size - 40:
                width = int(rng.integers(8, 40))
                cv2.rectangle(page, (x, y), (x + width, y + 6), (30, 30, 30), -1)
                x += width + int(rng.integers(4, 10))
        return page

    def screenshot() -> np.ndarray:
        screen = np.full((size, size, 3), rng.integers(200, 256, 3), np.uint8)
        cv2.rectangle(screen, (0, 0), (size, 24), tuple(int(c) for c in rng.integers(0, 120, 3)), -1)
        for _ in range(6):
            x, y = (int(v) for v in rng.integers(0, size - 60, 2))
            cv2.rectangle(screen, (x, y + 24), (x + 60, y + 50), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
        return screen

    def checkerboard() -> np.ndarray:
        cell = int(rng.integers(8, 48))
        grid = (np.add.outer(np.arange(size) // cell, np.arange(size) // cell) % 2).astype(np.uint8) * 255
        return np.repeat(grid[:, :, None], 3, axis=2)

    def tiny_crop() -> np.ndarray:  # a 12x12 patch of a photo, blown up
        photo = photos[int(rng.integers(len(photos)))]
        y, x = int(rng.integers(0, photo.shape[0] - 12)), int(rng.integers(0, photo.shape[1] - 12))
        return cv2.resize(photo[y:y + 12, x:x + 12], (size, size), interpolation=cv2.INTER_NEAREST)

    def extreme_crop() -> np.ndarray:  # a thin strip of a photo's edge, stretched
        photo = photos[int(rng.integers(len(photos)))]
        strip = photo[: max(4, photo.shape[0] // 16)]
        return cv2.resize(strip, (size, size), interpolation=cv2.INTER_LINEAR)

    def grey_photo() -> np.ndarray:
        photo = photos[int(rng.integers(len(photos)))]
        return np.repeat(cv2.cvtColor(np.ascontiguousarray(photo), cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)

    makers = dict(zip(GENERATED_KINDS, (flat, noise, gradient, document, screenshot, checkerboard, tiny_crop,
                                        extreme_crop, grey_photo)))
    kinds = GENERATED_KINDS if photos else GENERATED_KINDS[:-FROM_PHOTOS]
    return {name: [makers[name]() for _ in range(per_kind)] for name in kinds}
