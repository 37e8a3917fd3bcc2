"""Built-in architectures, all made of plain `nn.BatchNorm*d` layers, registered in the model registry.

The engine converts them with `syncbn.convert_sync_batchnorm` when a job asks for synchronized BatchNorm, and the
saved model is reverted with `syncbn.revert_sync_batchnorm`, so a user loads it into the very module
`service.engine.model_registry.build_model` returns.

- `resnet18`: the CIFAR-style ResNet-18 (3x3 stem, no max-pool, stages of 64-512 channels, 2 basic blocks each).
- `small_resnet`: a ResNet with one basic block per stage and 16-32-64 channels (9 BatchNorm layers); quick on CPU.
- `cnn`: three conv-BN-ReLU layers (the last two strided) and a linear head.
- `mlp`: two hidden layers with `BatchNorm1d`, for vectors or flattened images.

Down-sampling uses strided 3x3 convolutions with padding, so any image size down to 1x1 works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from service.engine.model_registry import register_model

__all__ = ["MLP", "PlainCNN", "ResNet", "cnn", "mlp", "resnet18", "small_resnet"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, stages of basic blocks, global average pooling, linear classifier."""

    def __init__(
        self, in_channels: int, num_classes: int, widths: Sequence[int], blocks_per_stage: Sequence[int]
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        channels = widths[0]
        for index, (width, blocks) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            layers: list[nn.Module] = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


class PlainCNN(nn.Module):
    """Conv-BN-ReLU x3 (strides 1, 2, 2), global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width, stride in ((32, 1), (64, 2), (128, 2)):
            layers += [
                nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class MLP(nn.Module):
    """Flatten, then Linear-BatchNorm1d-ReLU x2 (256, 128 units) and a linear classifier."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, 256, bias=False),
            nn.BatchNorm1d(256),
            nn.ReLU(inplace=True),
            nn.Linear(256, 128, bias=False),
            nn.BatchNorm1d(128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _image_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) != 3:
        raise ValueError(
            f"model {name!r} expects image samples (channels, height, width), got sample shape {shape}: "
            "use model 'mlp' for vectors."
        )
    return shape


@register_model("resnet18")
def resnet18(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """CIFAR-style ResNet-18: 3x3 stem, no max-pool, 4 stages of 64-512 channels, 2 basic blocks each."""
    shape = _image_shape("resnet18", sample_shape)
    return ResNet(shape[0], num_classes, widths=(64, 128, 256, 512), blocks_per_stage=(2, 2, 2, 2))


@register_model("small_resnet")
def small_resnet(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Small ResNet: one basic block per stage, 16-32-64 channels (9 BatchNorm layers); quick on CPU."""
    shape = _image_shape("small_resnet", sample_shape)
    return ResNet(shape[0], num_classes, widths=(16, 32, 64), blocks_per_stage=(1, 1, 1))


@register_model("cnn")
def cnn(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Plain conv net: three conv-BN-ReLU layers (the last two strided) and a linear head."""
    shape = _image_shape("cnn", sample_shape)
    return PlainCNN(shape[0], num_classes)


@register_model("mlp")
def mlp(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multi-layer perceptron: two hidden layers with BatchNorm1d, for vectors or flattened images."""
    return MLP(math.prod(sample_shape), num_classes)
