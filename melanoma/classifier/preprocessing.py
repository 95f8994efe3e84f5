"""Image bytes to model input: the one preprocessing both training and serving use.

Two steps, split where the cache sits:
  ``decode_image`` + ``preprocess``: bytes -> RGB array -> uint8 (C, H, W) at the model's size,
  ``normalize``: a uint8 batch -> the float tensor the network sees.
Training caches the uint8 output of the first step; serving runs both steps per request.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image

from melanoma.classifier.architectures import IMAGENET_MEAN, IMAGENET_STD

# Bump when preprocessing changes, so cached arrays made by older code are not reused.
PREPROCESS_VERSION = 3
# Refuse images above this many pixels before decoding them (decompression bombs).
MAX_PIXELS = 50_000_000


class InvalidImageError(ValueError):
    """The bytes are not an image we can use."""


class Region(NamedTuple):
    """A rectangle as fractions of an image's width and height: (x0, y0) top left, (x1, y1)
    bottom right. Fractions, so one region serves an image decoded at any scale."""

    x0: float
    y0: float
    x1: float
    y1: float

    def pixels(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in pixels of an image of ``shape`` (H, W, ...), at least 1 px."""
        h, w = shape[:2]
        x0, y0 = min(round(self.x0 * w), w - 1), min(round(self.y0 * h), h - 1)
        return x0, y0, max(x0 + 1, round(self.x1 * w)), max(y0 + 1, round(self.y1 * h))


@dataclass(frozen=True)
class PreprocessSpec:
    """Settings that turn a decoded image into model input; stored with every logged model. The
    defaults are TrainConfig's (a test keeps them in step)."""

    img_size: int = 96
    channels: int = 3
    color_constancy: bool = False
    mask_corners: bool = False
    crop_lesion: bool = True
    crop_margin: float = 0.2  # skin kept on each side of the lesion, as a fraction of its size
    crop_method: str = "largest"  # which dark blob is the lesion: see lesion_box
    rgb_mean: tuple[float, ...] = IMAGENET_MEAN  # the RGB statistics the model's weights expect
    rgb_std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:  # JSON gives lists back
        object.__setattr__(self, "rgb_mean", tuple(self.rgb_mean))
        object.__setattr__(self, "rgb_std", tuple(self.rgb_std))

    @property
    def mean(self) -> tuple[float, ...]:
        return self.rgb_mean if self.channels == 3 else (float(np.mean(self.rgb_mean)),)

    @property
    def std(self) -> tuple[float, ...]:
        return self.rgb_std if self.channels == 3 else (float(np.mean(self.rgb_std)),)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessSpec:
        """A stored spec; settings it predates take the values its model was trained with
        (``LEGACY_PREPROCESS``), never today's defaults."""
        return cls(**{**LEGACY_PREPROCESS, **values})

    def image_settings(self) -> dict:
        """The settings that shape the uint8 image (normalisation comes later, on tensors)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("rgb_mean", "rgb_std")}


# What models logged before a setting existed were preprocessed with: no lesion crop, its margin
# 0.2 and the largest blob once the crop existed, no colour constancy or corner mask, ImageNet statistics.
LEGACY_PREPROCESS = {"color_constancy": False, "mask_corners": False, "crop_lesion": False, "crop_margin": 0.2,
                     "crop_method": "largest", "rgb_mean": IMAGENET_MEAN, "rgb_std": IMAGENET_STD}
CROP_METHODS = ("largest", "central")
INK_BLUE_EXCESS = 20  # a pixel this much bluer than red (0-255) is marker ink or a sticker: skin and lesions are not
CENTRAL_REACH = 0.3  # "central": a blob this far from the centre (a fraction of the image) counts 1/e of its area


def image_dimensions(data: bytes) -> tuple[int, int]:
    """Width and height read from the file header only, without decoding pixels."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"image refused: {exc}") from exc
    except Exception as exc:  # PIL raises several types for garbage input
        raise InvalidImageError("not a recognised image file (JPEG, PNG, BMP, ...)") from exc


def decode_image(data: bytes, reduce_to: int | None = None, smallest: int = 1) -> np.ndarray:
    """Decode image file bytes to an RGB uint8 array (H, W, 3).

    Grayscale and RGBA inputs become RGB. Images over ``MAX_PIXELS``, or with a side under
    ``smallest`` pixels, are refused from their header. With ``reduce_to``, JPEGs are decoded at
    1/2, 1/4 or 1/8 scale when the result still has at least ``reduce_to`` pixels per side (DCT
    scaling: much faster, same quality after the later downsizing).
    """
    if not data:
        raise InvalidImageError("empty image data")
    width, height = image_dimensions(data)
    if width * height > MAX_PIXELS:
        raise InvalidImageError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{MAX_PIXELS:,}; refused without decoding"
        )
    if min(width, height) < smallest:
        raise InvalidImageError(f"image is {width}x{height} pixels; the model needs at least "
                                f"{smallest}x{smallest} (a photo of the lesion, not a thumbnail)")
    flag = cv2.IMREAD_COLOR
    if reduce_to:
        for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if min(width, height) // factor >= reduce_to:
                flag = reduced
                break
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if bgr is None or bgr.size == 0:
        raise InvalidImageError("image data is corrupt or truncated and could not be decoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def shades_of_gray(image: np.ndarray, power: int = 6) -> np.ndarray:
    """Colour constancy (Finlayson & Trezzi 2004): scale channels so the scene's Minkowski
    p-norm illuminant becomes neutral gray. Removes much of a camera's or clinic's colour cast."""
    pixels = image.astype(np.float32)
    illuminant = np.power(np.mean(np.power(pixels, power), axis=(0, 1)), 1.0 / power)
    gains = illuminant.mean() / np.maximum(illuminant, 1e-6)
    return np.clip(pixels * gains, 0, 255).astype(np.uint8)


def mask_outside_circle(image: np.ndarray) -> np.ndarray:
    """Black out everything outside the inscribed circle: every image gets the same dark
    dermoscope vignette, so corners and borders stop telling one photo source from another."""
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (w // 2, h // 2), min(h, w) // 2, 1, thickness=-1)
    return image * mask[..., None]


def lesion_box(image: np.ndarray, margin: float = PreprocessSpec.crop_margin, min_fraction: float = 1 / 3,
               method: str = PreprocessSpec.crop_method) -> tuple[int, int, int, int]:
    """(x, y, width, height) of a crop around the lesion, with the image's aspect ratio.

    The lesion is a blob darker than the skin (Otsu's threshold on a blurred grayscale copy,
    searched inside the central ellipse so a dark vignette does not count): with ``largest``
    the largest blob; with ``central`` the blob of the largest area x exp(-(distance from the
    centre / CENTRAL_REACH)^2), after leaving out marker ink and stickers (bluer than red), so a
    surgeon's ink mark or a ruler at the edge is not taken for the lesion. The crop spans the
    same fraction of the width and of the height, at least ``min_fraction``, so it is squashed to
    a square exactly as the whole image would be. Without a blob, the whole image.
    """
    if method not in CROP_METHODS:
        raise ValueError(f"crop_method must be one of {CROP_METHODS}, got {method!r}")
    h, w = image.shape[:2]
    scale = 128 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.GaussianBlur(cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA),
                             (0, 0), 2)
    sh, sw = small.shape
    yy, xx = np.mgrid[:sh, :sw]
    candidates = ((yy - (sh - 1) / 2) / (0.45 * sh)) ** 2 + ((xx - (sw - 1) / 2) / (0.45 * sw)) ** 2 <= 1
    if method == "central":
        blurred = cv2.GaussianBlur(cv2.resize(image, size, interpolation=cv2.INTER_AREA), (0, 0), 2).astype(np.int16)
        ink = (blurred[..., 2] - blurred[..., 0] > INK_BLUE_EXCESS).astype(np.uint8)
        candidates &= cv2.dilate(ink, np.ones((5, 5), np.uint8)) == 0
    if not candidates.any():
        return 0, 0, w, h
    threshold, _ = cv2.threshold(small[candidates].reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = ((small < threshold) & candidates).astype(np.uint8)
    count, _, stats, centroids = cv2.connectedComponentsWithStats(dark)
    if count < 2:
        return 0, 0, w, h
    score = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    if method == "central":
        distance = np.hypot(centroids[1:, 0] / sw - 0.5, centroids[1:, 1] / sh - 0.5)
        score *= np.exp(-(distance / CENTRAL_REACH) ** 2)
    bx, by, bw, bh, _ = stats[1 + int(np.argmax(score))]
    fraction = float(np.clip(max(bw / sw, bh / sh) * (1 + 2 * margin), min_fraction, 1.0))
    cw, ch = round(w * fraction), round(h * fraction)
    cx, cy = (bx + bw / 2) / scale, (by + bh / 2) / scale
    x0 = int(np.clip(round(cx - cw / 2), 0, w - cw))
    y0 = int(np.clip(round(cy - ch / 2), 0, h - ch))
    return x0, y0, cw, ch


def model_region(image: np.ndarray, spec: PreprocessSpec) -> Region:
    """The part of the image the model sees, as fractions of its width and height:
    ``lesion_box`` (with ``spec.crop_margin``) when ``spec.crop_lesion``, else the whole image."""
    if not spec.crop_lesion:
        return Region(0.0, 0.0, 1.0, 1.0)
    h, w = image.shape[:2]
    x, y, bw, bh = lesion_box(image, margin=spec.crop_margin, method=spec.crop_method)
    return Region(x / w, y / h, (x + bw) / w, (y + bh) / h)


def preprocess(image: np.ndarray, spec: PreprocessSpec, region: Region | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> uint8 (C, H, W) at ``spec.img_size`` square, from ``region``
    (``model_region`` when not given)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidImageError(f"expected an RGB array (H, W, 3), got shape {image.shape}")
    x0, y0, x1, y1 = region.pixels(image.shape) if region else model_region(image, spec).pixels(image.shape)
    image = image[y0:y1, x0:x1]
    size = spec.img_size
    interpolation = cv2.INTER_AREA if min(image.shape[:2]) >= size else cv2.INTER_LINEAR
    resized = cv2.resize(image, (size, size), interpolation=interpolation)
    if spec.color_constancy:
        resized = shades_of_gray(resized)
    if spec.mask_corners:
        resized = mask_outside_circle(resized)
    if spec.channels == 1:
        return cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY)[None]
    return np.ascontiguousarray(resized.transpose(2, 0, 1))


def decode_for_model(data: bytes, spec: PreprocessSpec, refuse_small: bool = False) -> np.ndarray:
    """Image file bytes -> RGB array, decoded at no more resolution than the model can use.
    With ``refuse_small`` (serving), images with a side under the model's input size are refused:
    scoring them would mean inventing detail. Training data that small is upscaled."""
    # A lesion crop keeps at least a third of each side: decode at enough resolution for it.
    reduce_to = 3 * spec.img_size if spec.crop_lesion else spec.img_size
    return decode_image(data, reduce_to=reduce_to, smallest=spec.img_size if refuse_small else 1)


def load_for_model(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Image file bytes -> uint8 (C, H, W): decoding and preprocessing in one call."""
    return preprocess(decode_for_model(data, spec), spec)


def normalization(spec: PreprocessSpec, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's mean and std as (1, C, 1, 1) tensors, in units of the [0, 1] pixel scale."""
    shape = (1, -1, 1, 1)
    return (torch.tensor(spec.mean, device=device).view(shape), torch.tensor(spec.std, device=device).view(shape))


def normalize(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W), or floats already scaled to [0, 1] -> float32 normalised with ``mean``
    and ``std`` (``normalization``). The one normalisation of training, evaluation, serving and
    the exported graph."""
    x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
    return (x - mean) / std
