"""Multi-layer perceptrons, as in Hinton et al. 2015 (1200-1200 teacher, 800-800 student)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distillery.models.registry import register_model


class MLP(nn.Module):
    """Flatten → [Linear → ReLU → Dropout] per hidden layer → Linear classifier.

    Hidden layers are named ``hidden1``, ``hidden2``, … so they can be tapped by name.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, dropout: float = 0.0,
                 input_dropout: float = 0.0) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.input_dropout = nn.Dropout(input_dropout)
        layers: list[nn.Module] = []
        width = in_features
        for i, size in enumerate(hidden, start=1):
            block = nn.Sequential(nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout))
            self.add_module(f"hidden{i}", block)
            layers.append(block)
            width = size
        self._hidden = layers
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_dropout(self.flatten(x))
        for block in self._hidden:
            x = block(x)
        return self.classifier(x)


@register_model
def mlp(*, in_channels: int, num_classes: int, input_size: int, hidden: Sequence[int] = (800, 800),
        dropout: float = 0.0, input_dropout: float = 0.0) -> MLP:
    """An MLP with the given hidden sizes (default Hinton's 800-800 student)."""
    return MLP(in_channels * input_size * input_size, hidden, num_classes, dropout, input_dropout)


@register_model
def mlp_hinton_teacher(*, in_channels: int, num_classes: int, input_size: int) -> MLP:
    """Hinton's large MNIST net: 1200-1200 ReLU, dropout 0.5 on hidden units, 0.2 on the input."""
    return MLP(in_channels * input_size * input_size, (1200, 1200), num_classes, dropout=0.5, input_dropout=0.2)
