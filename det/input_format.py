"""The network input of the authors' maskrcnn-benchmark, as the smallest subclass of torchvision's transform.

torchvision's detection models take RGB images in [0, 1] and normalize them inside the model
(``GeneralizedRCNNTransform.normalize``: minus the ImageNet mean, over its std). maskrcnn-benchmark, with the
authors' configs, feeds the network BGR 0-255 minus its pixel mean, std 1 (``INPUT.TO_BGR255``,
``INPUT.PIXEL_MEAN``, ``INPUT.PIXEL_STD``). ``input_format="authors"`` keeps the data pipeline as it is (RGB in
[0, 1], what torchvision's models and our transforms produce) and overrides only ``normalize``, so resizing,
batching and post-processing stay torchvision's and the state dict does not change.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

INPUT_FORMATS = ("torchvision", "authors")
# maskrcnn-benchmark's INPUT.PIXEL_MEAN (config/defaults.py), in BGR order on the 0-255 scale; INPUT.PIXEL_STD 1.
AUTHORS_PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)


class BGR255Transform(GeneralizedRCNNTransform):
    """torchvision's resize-and-batch transform whose normalization gives the authors' network input."""

    @classmethod
    def adopt(cls, transform: GeneralizedRCNNTransform) -> "BGR255Transform":
        """Turn the transform torchvision's ``MaskRCNN`` built into this class in place (it has no state)."""
        transform.__class__ = cls
        transform.image_mean, transform.image_std = list(AUTHORS_PIXEL_MEAN_BGR), [1.0, 1.0, 1.0]
        return transform

    def normalize(self, image: Tensor) -> Tensor:
        """An RGB image in [0, 1] -> BGR 0-255 minus the pixel mean."""
        if not image.is_floating_point():
            raise TypeError(f"expected a float RGB image in [0, 1], got {image.dtype}")
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        return image.flip(0) * 255 - mean[:, None, None]


def adopt_input_format(transform: GeneralizedRCNNTransform, input_format: str) -> GeneralizedRCNNTransform:
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
    return BGR255Transform.adopt(transform) if input_format == "authors" else transform
