"""CIFAR-style ResNets (He et al. 2016, section 4.2), the family the FSP paper uses.

Depth 6n + 2: a 3×3 stem, three stages of n basic blocks with widths 16k, 32k, 64k (k the width
multiplier), the 2nd and 3rd stages halving the spatial size, global average pooling, a linear head.
Submodules: ``stem``, ``stage1.0`` … ``stage3.{n-1}``, ``head``. The FSP paper takes its layer
pairs at the start and end of each stage: (``stem``, ``stage1``), (``stage1``, ``stage2.0.conv1``)…
"""

from __future__ import annotations

from torch import Tensor, nn

from distillery.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, num_classes: int, width: int = 1) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 26, 32, 44, 56, 110), got {depth}")
        blocks = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        c_in = widths[0]
        for i, c_out in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            stage = nn.Sequential(*[BasicBlock(c_in if b == 0 else c_out, c_out, stride if b == 0 else 1)
                                    for b in range(blocks)])
            self.add_module(f"stage{i}", stage)
            c_in = c_out
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(self.pool(x).flatten(1))


def _make(depth: int):
    def factory(*, in_channels: int, num_classes: int, input_size: int, width: int = 1) -> CifarResNet:
        return CifarResNet(depth, in_channels, num_classes, width)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"CIFAR-style ResNet-{depth} ({(depth - 2) // 6} basic blocks per stage)."
    return register_model(factory)


for _depth in (8, 14, 20, 26, 32, 44, 56, 110):
    _make(_depth)
