"""A small VGG-style CNN: a fast, accurate teacher for 28×28 images on a CPU."""

from __future__ import annotations

from torch import Tensor, nn

from distillery.models.registry import register_model


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class SmallCNN(nn.Module):
    """Two stages of two 3×3 conv-BN-ReLU layers, each followed by 2×2 max-pooling, then an MLP head.

    Stages are named ``stage1`` and ``stage2`` (their outputs are tappable feature maps).
    """

    def __init__(self, in_channels: int, num_classes: int, input_size: int, width: int = 16,
                 fc_width: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(_conv_bn_relu(in_channels, width), _conv_bn_relu(width, width), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv_bn_relu(width, 2 * width), _conv_bn_relu(2 * width, 2 * width),
                                    nn.MaxPool2d(2))
        spatial = input_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * spatial * spatial, fc_width),
            nn.ReLU(), nn.Dropout(dropout), nn.Linear(fc_width, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stage2(self.stage1(x)))


@register_model
def cnn(*, in_channels: int, num_classes: int, input_size: int, width: int = 16, fc_width: int = 128,
        dropout: float = 0.3) -> SmallCNN:
    """Small CNN (width 16: ~0.45 M parameters on 28×28 inputs)."""
    return SmallCNN(in_channels, num_classes, input_size, width, fc_width, dropout)
