import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from melanoma.bench import notebook_cnn
from melanoma.models import NotebookCNN, PretrainedWeightsError, build_model, fold_conv1, gradcam_layer


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
@pytest.mark.parametrize("channels", [1, 3])
def test_models_take_1_or_3_channels_and_give_2_logits(name, channels):
    model = build_model(name, channels).eval()
    assert model(torch.randn(2, channels, 64, 64)).shape == (2, 2)
    assert isinstance(gradcam_layer(model, 64), nn.Module)


def test_gradcam_uses_the_deepest_resnet_stage_at_least_4_pixels_across():
    model = build_model("resnet18", 3)
    assert gradcam_layer(model, 224) is model.layer4  # 7x7
    assert gradcam_layer(model, 64) is model.layer3  # layer4 would be 2x2
    assert gradcam_layer(model, 32) is model.layer2
    assert gradcam_layer(model, 16) is model.layer1


def test_cnn_is_the_notebooks_architecture():
    model = NotebookCNN(1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 256), (256, 2)]
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())


def test_pool_before_relu_computes_the_notebooks_conv_bn_relu_pool():
    torch.manual_seed(0)
    ours = NotebookCNN(3).features[0].train()
    conv, bn, pool, relu = ours
    notebook_order = nn.Sequential(conv, bn, nn.ReLU(), pool)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(ours(x), notebook_order(x))


def test_cnn_has_the_notebooks_function_and_gradients():
    """Our CNN (pool before ReLU, fast conv weight gradients, channels-last) against the notebook's
    layer order with plain nn.Conv2d, same weights: same logits and same gradients in training."""
    torch.manual_seed(0)
    ours = NotebookCNN(1).train()
    notebook = notebook_cnn().train()
    for a, b in zip(notebook.parameters(), ours.parameters(), strict=True):
        a.data.copy_(b.data)
    ours = ours.to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 32, 32)
    ours.classifier[3].p = notebook[-2].p = 0.0  # dropout draws differ between the two graphs
    out_ours, out_notebook = ours(x.contiguous(memory_format=torch.channels_last)), notebook(x)
    torch.testing.assert_close(out_ours, out_notebook, atol=1e-5, rtol=1e-4)
    out_ours.sum().backward()
    out_notebook.sum().backward()
    for a, b in zip(notebook.parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3)


@pytest.fixture
def torch_home_with_weights(tmp_path, monkeypatch) -> Path:
    """A TORCH_HOME holding a (random) ResNet-18 checkpoint under torchvision's file name."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    state = resnet18(weights=None).state_dict()
    torch.save(state, checkpoints / Path(ResNet18_Weights.IMAGENET1K_V1.url).name)
    return tmp_path / "torch"


def test_pretrained_true_loads_cached_imagenet_weights_and_folds_conv1(torch_home_with_weights):
    reference = torch.load(next(torch_home_with_weights.rglob("*.pth")), weights_only=True)
    rgb = build_model("resnet18", 3, "true")
    torch.testing.assert_close(rgb.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])
    torch.testing.assert_close(rgb.conv1.weight, reference["conv1.weight"])
    gray = build_model("resnet18", 1, "true")
    torch.testing.assert_close(gray.conv1.weight, reference["conv1.weight"].sum(dim=1, keepdim=True))
    assert gray.fc.out_features == 2


def test_pretrained_from_a_local_weights_file(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "imagenet.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    model = build_model("resnet18", 1, str(path))
    torch.testing.assert_close(model.conv1.weight, fold_conv1(torch.load(path, weights_only=True)["conv1.weight"], 1))


def test_folding_conv1_keeps_the_response_to_gray_images():
    rgb = nn.Conv2d(3, 8, 3, bias=False)
    gray = nn.Conv2d(1, 8, 3, bias=False)
    gray.weight.data = fold_conv1(rgb.weight.data, 1)
    x = torch.randn(2, 1, 9, 9)
    torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)))


def test_offline_without_cached_weights_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PretrainedWeightsError, match=r"resnet18-f37072fd.pth.*TORCH_HOME"):
        build_model("resnet18", 3, "true")
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_model("resnet18", 3, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="only for resnet18"):
        build_model("cnn", 3, "true")
