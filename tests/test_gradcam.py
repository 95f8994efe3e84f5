import numpy as np
import torch
from torch import nn

from melanoma.classifier.gradcam import GradCAM, overlay, overlay_on_photo
from melanoma.classifier.models import build_model, gradcam_layer
from melanoma.classifier.preprocessing import Region


class SpotDetector(nn.Module):
    """Channel 0 fires on bright pixels, channel 1 on dark ones; the malignant logit is the
    global mean of channel 0, the benign logit that of channel 1 (a CNN in miniature)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(inplace=True))
        self.features[0].weight.data = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
        self.features[0].bias.data = torch.tensor([-0.5, 0.5])

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3)).flip(1)  # (benign, malignant)


def test_gradcam_points_where_the_evidence_is_for_each_image_of_a_batch():
    x = torch.full((3, 1, 32, 32), 0.2)
    spots = [(slice(2, 10), slice(3, 11)), (slice(20, 30), slice(18, 26)), (slice(12, 18), slice(0, 8))]
    for image, (rows, cols) in zip(x, spots):
        image[0, rows, cols] = 1.0
    model = SpotDetector()
    with GradCAM(model, model.features) as cam:
        malignant = cam(x, class_index=1)
        benign = cam(x, class_index=0)
    assert malignant.shape == (3, 32, 32)
    for i, (rows, cols) in enumerate(spots):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[rows, cols] = True
        assert malignant[i][inside].min() > 0.9 and malignant[i][~inside].max() < 0.05
        assert benign[i][inside].max() < 0.05 and benign[i][~inside].mean() > 0.9


def test_hooks_are_removed_and_the_mode_restored():
    model = build_model("cnn", 3).train()
    layer = gradcam_layer(model, 48, 3)
    with GradCAM(model, layer) as cam:
        maps = cam(torch.rand(4, 3, 48, 48))
        assert not model.training
    assert maps.shape == (4, 48, 48) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert model.training
    assert not layer._forward_hooks


def test_gradcam_works_on_resnet_with_in_place_relu_and_inside_inference_mode():
    model = build_model("resnet18", 1).eval()
    with torch.inference_mode(False), GradCAM(model, gradcam_layer(model, 64, 1)) as cam:
        maps = cam(torch.rand(2, 1, 64, 64))
    assert maps.shape == (2, 64, 64)
    assert not model.training


def test_overlay_keeps_the_image_shape():
    image = np.zeros((40, 30, 3), np.uint8)
    out = overlay(image, np.random.rand(10, 10))
    assert out.shape == (40, 30, 3) and out.dtype == np.uint8
    assert overlay(np.zeros((40, 30, 1), np.uint8), np.random.rand(5, 5)).shape == (40, 30, 3)


def test_the_photo_overlay_puts_the_heat_where_the_model_looked_on_the_photo():
    photo = np.full((600, 800, 3), 128, np.uint8)
    cam = np.zeros((32, 32))
    cam[4:8, 24:28] = 1.0  # hot in the upper right of the model's input
    region = Region(0.25, 0.5, 0.75, 1.0)  # the model saw the lower middle of the photo
    shown = overlay_on_photo(photo, cam, region).astype(int)
    redness = shown[..., 0] - shown[..., 2]
    ys, xs = np.nonzero(redness > redness.max() / 2)
    # crop pixels x 24-27, y 4-7 of 32 -> photo x 200 + 26/32 * 400 = 525, y 300 + 6/32 * 300 = 356
    assert abs(xs.mean() - 525) < 10 and abs(ys.mean() - 356) < 10
    assert (shown[:290] == 128).all()  # above the region: the photo as it was
    assert overlay_on_photo(np.zeros((3000, 2000, 3), np.uint8), cam, region).shape == (1024, 683, 3)
