"""FedGKT's ResNet family: the ResNet-8 edge extractor, the stem-less server bodies and the full baselines.

Architectures follow FedML's FedGKT models (``resnet8_56`` on the edge, ``resnet56_server`` in the
cloud) and reproduce their parameter counts for ``num_classes=10, in_channels=3``:

=================  ==========  ===================================================
name               params      structure
=================  ==========  ===================================================
resnet8_gkt           10,586   stem -> 2 Bottleneck(16) -> avgpool -> fc
resnet55_server      590,858   Bottleneck stages [6, 6, 6] on the 16-channel features
resnet14_gkt          24,602   stem + 3 BasicBlock(16) -> 2 Bottleneck(16) -> avgpool -> fc
resnet20_gkt          38,618   stem + 6 BasicBlock(16) -> 2 Bottleneck(16) -> avgpool -> fc
resnet109_server   1,147,274   Bottleneck stages [12, 12, 12] on the 16-channel features
resnet56             591,322   stem + resnet55_server body (FedAvg baseline)
resnet110          1,147,738   stem + resnet109_server body
=================  ==========  ===================================================

The edge/server seam is the stem output (B x 16 x H x W): ``forward_features`` stops there and
``forward_head`` continues from it, so ``resnet56.forward_head`` is exactly ``resnet55_server``.
The deeper extractors (``resnet14_gkt``, ``resnet20_gkt``) add 16-channel basic blocks inside the
extractor, so the seam and every server model stay unchanged; they show where forward-gradient
training saves memory (backprop's stored activations grow with depth, a forward pass's do not).

``pipeline_modules()`` lists an edge model as a chain of modules whose composition is the logits;
module-wise trainers (local-guess forward gradients, AsyncFGD) split and pipeline along it.

Knobs from the deeper-models FL study ("wider / smaller receptive field"): ``width`` multiplies every
channel count, ``stem_kernel`` / ``stem_stride`` / ``stem_max_pool`` shape the stem.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from model_zoo._registry import register_model

# ---------------------------------------------------------------------------------------------
# blocks


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand, plus a projected shortcut when shapes change."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class Stem(nn.Sequential):
    """conv(k, stride) + BN + ReLU [+ 3x3/2 max-pool]: everything the edge device computes for FedGKT."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, max_pool: bool = False):
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        if max_pool:
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        super().__init__(*layers)
        self.out_channels = out_channels


class BasicBlock(nn.Module):
    """Two 3x3 convolutions at constant width plus identity (ResNet-20 style): deepens the extractor
    without changing its 16-channel output."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class DeepStem(nn.Sequential):
    """A stem followed by residual blocks that keep its channel count (a deeper extractor, same seam)."""

    def __init__(self, stem: Stem, blocks: int):
        super().__init__(stem, *[BasicBlock(stem.out_channels) for _ in range(blocks)])
        self.out_channels = stem.out_channels


class Classifier(nn.Module):
    """Global average pool + linear, sharing (not copying) a body's ``pool`` and ``fc``."""

    def __init__(self, pool: nn.Module, fc: nn.Linear):
        super().__init__()
        self.pool, self.fc = pool, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))  # B x C x h x w -> B x C -> B x classes


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    layers = [Bottleneck(in_planes, planes, stride)]
    in_planes = planes * Bottleneck.expansion
    layers += [Bottleneck(in_planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers), in_planes


def _scaled(channels: int, width: float) -> int:
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(1, int(round(channels * width)))


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        # Each residual branch starts as identity: deep bodies train from the first step (Goyal et al. 2017).
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


# ---------------------------------------------------------------------------------------------
# models


class ResNetBody(nn.Module):
    """Bottleneck stages + global average pool + linear classifier, on a feature map (no stem)."""

    def __init__(
        self,
        in_channels: int,
        stage_blocks: Sequence[int],
        num_classes: int = 10,
        width: float = 1.0,
        stage_planes: Sequence[int] = (16, 32, 64),
        stage_strides: Sequence[int] = (1, 2, 2),
    ):
        super().__init__()
        if not (len(stage_blocks) == len(stage_planes) == len(stage_strides)):
            raise ValueError("stage_blocks, stage_planes and stage_strides must have the same length")
        stages, planes = [], in_channels
        for blocks, p, s in zip(stage_blocks, stage_planes, stage_strides):
            stage, planes = _make_stage(planes, _scaled(p, width), blocks, s)
            stages.append(stage)
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        self.in_channels = in_channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.stages(features)
        x = self.pool(x).flatten(1)  # B x C x h x w -> B x C
        return self.fc(x)

    def pipeline_modules(self) -> list[nn.Module]:
        """Every block in order, then the classifier (pool + fc)."""
        return [block for stage in self.stages for block in stage] + [Classifier(self.pool, self.fc)]


class GKTServerNet(ResNetBody):
    """The cloud model of FedGKT: a ResNet body that starts from the edge's 16-channel features."""

    def __init__(self, stage_blocks: Sequence[int], num_classes: int = 10, feature_channels: int | None = None,
                 width: float = 1.0, zero_init_residual: bool = True):
        # The edge stem emits round(16 * width) channels; a different extractor names its own count.
        in_channels = feature_channels if feature_channels is not None else _scaled(16, width)
        super().__init__(in_channels, stage_blocks, num_classes, width)
        _init_weights(self, zero_init_residual)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"expected features of shape B x {self.in_channels} x H x W, got {tuple(features.shape)}")
        return super().forward(features)


class GKTEdgeNet(nn.Module):
    """The edge model of FedGKT: a stem (the shared features) plus a small local classifier head.

    ``forward(x) -> (logits, features)`` where ``features`` is the stem output the server trains on.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, head_blocks: int = 2, width: float = 1.0,
                 stem_kernel: int = 3, stem_stride: int = 1, stem_max_pool: bool = False,
                 zero_init_residual: bool = True, extractor_blocks: int = 0):
        super().__init__()
        if extractor_blocks < 0:
            raise ValueError(f"extractor_blocks must be >= 0, got {extractor_blocks}")
        stem = Stem(in_channels, _scaled(16, width), stem_kernel, stem_stride, stem_max_pool)
        self.stem = DeepStem(stem, extractor_blocks) if extractor_blocks else stem
        self.head = ResNetBody(self.stem.out_channels, [head_blocks], num_classes, width,
                               stage_planes=(16,), stage_strides=(1,))
        self.feature_channels = self.stem.out_channels
        _init_weights(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        return self.forward_head(features), features

    def pipeline_modules(self) -> list[nn.Module]:
        """stem, [extractor blocks], head blocks, classifier: composed, they give the logits."""
        stem = list(self.stem) if isinstance(self.stem, DeepStem) else [self.stem]
        return stem + self.head.pipeline_modules()


class ResNet(nn.Module):
    """A full ResNet (stem + body), for FedAvg and centralized baselines; same seam as the GKT pair."""

    def __init__(self, stage_blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0, stem_kernel: int = 3, stem_stride: int = 1, stem_max_pool: bool = False,
                 zero_init_residual: bool = True, stage_planes: Sequence[int] = (16, 32, 64),
                 stage_strides: Sequence[int] = (1, 2, 2)):
        super().__init__()
        self.stem = Stem(in_channels, _scaled(16, width), stem_kernel, stem_stride, stem_max_pool)
        self.body = ResNetBody(self.stem.out_channels, stage_blocks, num_classes, width, stage_planes, stage_strides)
        self.feature_channels = self.stem.out_channels
        _init_weights(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x))

    def pipeline_modules(self) -> list[nn.Module]:
        return [self.stem] + self.body.pipeline_modules()


# ---------------------------------------------------------------------------------------------
# variants


@register_model
def resnet8_gkt(**kwargs) -> GKTEdgeNet:
    return GKTEdgeNet(head_blocks=2, **kwargs)


@register_model
def resnet14_gkt(**kwargs) -> GKTEdgeNet:
    """ResNet-8 with three basic blocks in the extractor (14 weighted layers)."""
    return GKTEdgeNet(head_blocks=2, extractor_blocks=3, **kwargs)


@register_model
def resnet20_gkt(**kwargs) -> GKTEdgeNet:
    """ResNet-8 with six basic blocks in the extractor (20 weighted layers)."""
    return GKTEdgeNet(head_blocks=2, extractor_blocks=6, **kwargs)


@register_model
def resnet55_server(**kwargs) -> GKTServerNet:
    return GKTServerNet([6, 6, 6], **kwargs)


@register_model
def resnet109_server(**kwargs) -> GKTServerNet:
    return GKTServerNet([12, 12, 12], **kwargs)


@register_model
def resnet56(**kwargs) -> ResNet:
    return ResNet([6, 6, 6], **kwargs)


@register_model
def resnet110(**kwargs) -> ResNet:
    return ResNet([12, 12, 12], **kwargs)


@register_model
def resnet8(**kwargs) -> ResNet:
    """The edge model as a standalone classifier, for the centralized ResNet-8 baseline (10,586 params)."""
    return ResNet([2], stage_planes=(16,), stage_strides=(1,), **kwargs)
