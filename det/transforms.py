"""Transforms applied jointly to an image and its detection target.

Only what must happen before batching lives here: resizing (short side 800, long side <= 1333) and pixel
normalisation are done by torchvision's ``GeneralizedRCNNTransform`` inside the model.
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import functional as F


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


class ToTensor:
    """PIL image -> float CHW tensor in [0, 1]; the target is left as it is."""

    def __call__(self, image, target):
        if not isinstance(image, Image.Image):
            raise TypeError(f"ToTensor expects a PIL image, got {type(image).__name__}")
        return F.pil_to_tensor(image).float().div_(255), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def hflip(image, target: dict) -> tuple:
    """Mirror the image (PIL or tensor) and its boxes and masks left-right."""
    width = F.get_dimensions(image)[-1]
    target = dict(target)  # the caller's dict and tensors stay untouched
    if "boxes" in target:
        boxes = target["boxes"]
        # [x1, y1, x2, y2] -> [W - x2, y1, W - x1, y2]: the left edge becomes the right one.
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return F.hflip(image), target


class RandomHorizontalFlip:
    """``hflip`` with probability ``p``, drawn from torch's generator so DataLoader workers are seeded."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image, target):
        if torch.rand(()) < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def build_transforms(train: bool) -> Compose:
    """The detection pipeline: tensor conversion, plus random flips when training."""
    transforms = [ToTensor()]
    if train:
        transforms.append(RandomHorizontalFlip(0.5))
    return Compose(transforms)
