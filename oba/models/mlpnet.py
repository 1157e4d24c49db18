"""MNIST "MLPNet" 784-40-20-10 (ReLU, no biases), the small benchmark of WoodFisher and CBS.

The reference checkpoint ``mnist_25_epoch_93.97.ckpt`` (93.97 % MNIST test accuracy) stores a
``model_state_dict`` whose layers are wrapped for masking: ``module.fc1._layer.weight`` plus an
all-ones ``module.fc1._weight_mask`` buffer, and so on. :func:`read_mlpnet_checkpoint` folds each
mask into its weight and returns plain ``fc1.weight`` ... keys. The checkpoint also pickles its
optimizer and learning-rate scheduler *classes*; exactly those two are allowlisted for the
``weights_only=True`` load (:data:`CHECKPOINT_GLOBALS`). Inputs are normalised with mean 0.1307
and std 0.3081 (:data:`oba.data.normalization.MNIST_MEAN`, ``MNIST_STD``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import CheckpointError, get_state_dict, read_torch_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_GLOBALS",
    "MLPNet",
    "mlpnet",
    "read_mlpnet_checkpoint",
]

CHECKPOINT_FORMAT = (
    "a WoodFisher/CBS MLPNet checkpoint: a dict with 'model_state_dict' holding "
    "'module.fcK._layer.weight' and 'module.fcK._weight_mask' for K = 1, 2, 3"
)
CHECKPOINT_GLOBALS = (torch.optim.SGD, torch.optim.lr_scheduler.ExponentialLR)


class MLPNet(nn.Module):
    """Fully connected ReLU network without biases: ``[N, 1, 28, 28]`` or ``[N, 784] -> [N, 10]``.

    Args:
        sizes: layer widths, input first (default 784-40-20-10).
    """

    def __init__(self, sizes: tuple[int, int, int, int] = (784, 40, 20, 10)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1], bias=False)
        self.fc2 = nn.Linear(sizes[1], sizes[2], bias=False)
        self.fc3 = nn.Linear(sizes[2], sizes[3], bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def mlpnet(num_classes: int = 10) -> MLPNet:
    """MNIST MLPNet 784-40-20-``num_classes``."""
    return MLPNet((784, 40, 20, num_classes))


def read_mlpnet_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The WoodFisher/CBS MLPNet checkpoint as an :class:`MLPNet` state dict (masks folded in).

    ``module.fcK._layer.weight * module.fcK._weight_mask -> fcK.weight``; the masks are all ones
    in the reference file, so the weights are unchanged there. Keys other than the masks pass
    through with ``module.`` and ``._layer`` removed, so strict loading reports them.

    Raises:
        CheckpointError: the file is unreadable, lacks ``model_state_dict``, or a mask does not
            match its weight.
    """
    checkpoint = read_torch_file(path, expected=CHECKPOINT_FORMAT, allowed_globals=CHECKPOINT_GLOBALS)
    raw = get_state_dict(checkpoint, "model_state_dict", path=path, expected=CHECKPOINT_FORMAT)
    masks = {key[: -len("._weight_mask")]: value for key, value in raw.items() if key.endswith("._weight_mask")}
    state_dict: dict[str, Tensor] = {}
    for key, value in raw.items():
        if key.endswith("._weight_mask"):
            continue
        layer, _, rest = key.partition("._layer.")
        if rest == "weight" and layer in masks:
            if masks[layer].shape != value.shape:
                raise CheckpointError(
                    f"{path}: mask {layer}._weight_mask has shape {tuple(masks[layer].shape)} "
                    f"but {key} has shape {tuple(value.shape)} (expected {CHECKPOINT_FORMAT})"
                )
            value = value * masks[layer]
        state_dict[f"{layer}.{rest}" if rest else key] = value
    return state_dict
