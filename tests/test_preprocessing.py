import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

import melanoma.classifier.preprocessing as preprocessing
from melanoma.classifier.preprocessing import (
    InvalidImageError,
    PreprocessSpec,
    decode_image,
    lesion_box,
    load_for_model,
    model_region,
    normalization,
    normalize,
    preprocess,
)


def encode(image: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def png_claiming_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header (with a valid CRC) claims another size."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8), ".png"))
    ihdr = 8 + 8  # signature, then chunk length + type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp"])
def test_formats_decode_to_rgb(ext):
    bgr = np.zeros((20, 30, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR order
    rgb = decode_image(encode(bgr, ext))
    assert rgb.shape == (20, 30, 3)
    assert rgb[..., 0].mean() > 150 and rgb[..., 2].mean() < 50


def test_grayscale_and_rgba_become_rgb():
    gray = decode_image(encode(np.full((10, 10), 90, np.uint8), ".png"))
    assert gray.shape == (10, 10, 3) and np.all(gray == 90)
    rgba = decode_image(encode(np.full((10, 10, 4), 60, np.uint8), ".png"))
    assert rgba.shape == (10, 10, 3)


def test_garbage_empty_and_truncated_bytes_raise_clear_errors():
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(InvalidImageError, match="not a recognised image"):
        decode_image(b"this is text, not a picture")
    jpeg = encode(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), ".jpg")
    with pytest.raises(InvalidImageError):
        decode_image(jpeg[:200])


def test_a_decompression_bomb_is_refused_from_its_header(monkeypatch):
    called = []
    monkeypatch.setattr(preprocessing.cv2, "imdecode", lambda *a: called.append(1))
    with pytest.raises(InvalidImageError, match="decompression bomb"):
        decode_image(png_claiming_size(60_000, 60_000))  # PIL's own header check
    with pytest.raises(InvalidImageError, match="8000x8000 = 64,000,000 pixels, over the limit"):
        decode_image(png_claiming_size(8000, 8000))  # ours, stricter
    assert not called, "the pixels must not be decoded"


def test_preprocess_sizes_channels_and_is_deterministic():
    image = np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    rgb = preprocess(image, PreprocessSpec(img_size=64, channels=3))
    gray = preprocess(image, PreprocessSpec(img_size=48, channels=1, color_constancy=False))
    assert rgb.shape == (3, 64, 64) and rgb.dtype == np.uint8
    assert gray.shape == (1, 48, 48)
    np.testing.assert_array_equal(rgb, preprocess(image, PreprocessSpec(img_size=64, channels=3)))


def test_shades_of_gray_removes_a_colour_cast():
    rng = np.random.default_rng(0)
    scene = rng.integers(60, 200, (50, 50, 1), dtype=np.uint8).repeat(3, axis=2).astype(np.float32)
    tinted = np.clip(scene * np.array([1.3, 1.0, 0.7]), 0, 255).astype(np.uint8)
    balanced = preprocessing.shades_of_gray(tinted).reshape(-1, 3).mean(axis=0)
    assert balanced.max() - balanced.min() < 0.1 * np.ptp(tinted.reshape(-1, 3).mean(0))


def test_training_and_serving_share_one_path():
    jpeg = encode(np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8), ".jpg")
    spec = PreprocessSpec(img_size=32, color_constancy=True, crop_lesion=False)
    expected = preprocess(decode_image(jpeg, reduce_to=32), spec)
    np.testing.assert_array_equal(load_for_model(jpeg, spec), expected)


def test_normalize_uses_the_spec_statistics():
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(batch, *normalization(PreprocessSpec(channels=3)))
    expected = (1 - torch.tensor(PreprocessSpec().mean)) / torch.tensor(PreprocessSpec().std)
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    torch.testing.assert_close(normalize(batch.float() / 255, *normalization(PreprocessSpec())), out)


def test_training_and_the_scorer_normalise_alike():
    from melanoma.classifier.inference import Scorer, to_model_input

    spec = PreprocessSpec(channels=3, rgb_mean=(0.2, 0.4, 0.6), rgb_std=(0.1, 0.2, 0.3))
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    seen = []

    class Recorder(torch.nn.Module):  # what the network receives
        def forward(self, x):
            seen.append(x)
            return torch.zeros(len(x), 2)

    Scorer(Recorder(), spec)(batch)
    torch.testing.assert_close(seen[0], to_model_input(batch, spec, torch.device("cpu")))


def skin_with_lesion(h: int, w: int, centre: tuple[int, int], radius: int, vignette: bool = False) -> np.ndarray:
    image = np.full((h, w, 3), (230, 190, 170), np.uint8)
    cv2.circle(image, centre, radius, (90, 50, 40), thickness=-1)
    if vignette:
        ring = np.zeros((h, w), np.uint8)
        cv2.circle(ring, (w // 2, h // 2), min(h, w) // 2, 1, thickness=-1)
        image[ring == 0] = 0
    return image


def test_lesion_box_frames_the_lesion_with_the_images_aspect():
    image = skin_with_lesion(300, 400, centre=(230, 160), radius=30)
    x, y, w, h = lesion_box(image)
    assert w / h == pytest.approx(400 / 300, rel=0.02)
    assert x <= 230 - 30 and x + w >= 230 + 30 and y <= 160 - 30 and y + h >= 160 + 30
    assert w <= 400 / 2  # zoomed in: a 60 px lesion does not need most of the frame


def test_lesion_box_ignores_a_dark_vignette_and_keeps_a_third_at_least():
    image = skin_with_lesion(300, 300, centre=(150, 150), radius=5, vignette=True)
    x, y, w, h = lesion_box(image)
    assert (w, h) == (100, 100)
    assert abs(x - 100) <= 2 and abs(y - 100) <= 2  # centred on the lesion, not pulled to the dark rim


def test_the_central_crop_is_not_fooled_by_marker_ink_or_a_ruler():
    image = skin_with_lesion(300, 400, centre=(200, 150), radius=22)
    cv2.rectangle(image, (60, 60), (150, 120), (110, 60, 170), thickness=-1)  # a surgeon's purple ink mark
    cv2.rectangle(image, (120, 235), (300, 245), (20, 20, 20), thickness=-1)  # a ruler's dark edge, near the rim
    x, y, w, h = lesion_box(image, method="largest")
    assert x + w < 200  # the largest dark blob is the ink mark, left of the lesion
    x, y, w, h = lesion_box(image, method="central")
    assert x <= 200 - 22 and x + w >= 200 + 22 and y <= 150 - 22 and y + h >= 150 + 22
    assert w <= 400 / 2  # framed on the lesion alone
    assert lesion_box(skin_with_lesion(300, 400, centre=(230, 160), radius=30), method="central") == \
        lesion_box(skin_with_lesion(300, 400, centre=(230, 160), radius=30))  # one clear lesion: the same box
    with pytest.raises(ValueError, match="crop_method must be one of"):
        lesion_box(image, method="nearest")


def test_lesion_box_without_a_blob_is_the_whole_image():
    assert lesion_box(np.full((120, 90, 3), 200, np.uint8)) == (0, 0, 90, 120)


def test_crop_lesion_spec_zooms_in_on_small_lesions():
    image = skin_with_lesion(300, 300, centre=(150, 150), radius=40)
    plain = preprocess(image, PreprocessSpec(img_size=64, crop_lesion=False))
    cropped = preprocess(image, PreprocessSpec(img_size=64, crop_lesion=True))
    assert cropped.shape == plain.shape
    assert (cropped.mean(0) < 128).mean() > 2 * (plain.mean(0) < 128).mean()


def test_crop_margin_sets_the_skin_around_the_lesion():
    image = skin_with_lesion(400, 400, centre=(200, 200), radius=80)  # large enough not to hit the 1/3 floor
    widths = [model_region(image, PreprocessSpec(crop_margin=m)) for m in (0.0, 0.2, 0.5)]
    sides = [r.x1 - r.x0 for r in widths]
    assert sides[0] < sides[1] < sides[2]
    assert sides[2] / sides[0] == pytest.approx(2.0, rel=0.1)  # (1 + 2 * 0.5) / (1 + 0)
    # Models logged before the setting existed keep the 20 % they were trained with.
    assert model_region(image, PreprocessSpec(**{"img_size": 96, "crop_lesion": True})) == widths[1]
