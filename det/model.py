"""Mask R-CNN R50-FPN with the normalization of the paper's detection experiments, on torchvision's models.

    model = build_mask_rcnn(num_classes=81, norm="mabn")            # MABN + centered convs, from scratch
    model = build_mask_rcnn(num_classes=81, norm="frozenbn")        # the usual fine-tune baseline

The configured norm sits in the ResNet stem and every bottleneck, in every FPN conv (lateral and
output), in the 4conv1fc box head and in the 4-conv mask head; the RPN head stays plain. With MABN
every conv of those parts is weight-centered (:class:`mabn.CenConv2d`), because MABN's reduced
statistics assume zero-mean pre-activations. Module names are torchvision's
(``backbone.body.layer1.0.bn1.weight``, ...), so ImageNet ResNet-50 weights map onto the body
(see :mod:`det.backbone_weights`).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead

import mabn

FPN_CHANNELS = 256

# Options that count images: in the body and the FPN the batch axis holds images, in the RoI heads it
# holds a varying number of RoIs that no fixed normalization batch divides, so the heads never get them.
IMAGE_BATCH_OPTIONS = ("norm_batch_size",)

# Parts this function builds; passing them through **maskrcnn_kwargs would silently bypass the norm.
BUILT_HERE = ("backbone", "rpn_head", "box_head", "mask_head")

NO_NORM = "none"


def build_mask_rcnn(
    num_classes: int,
    norm: str = "mabn",
    norm_options: Optional[dict] = None,
    centered_convs: Optional[bool] = None,
    head_norm: Optional[str] = None,
    min_size: int = 800,
    max_size: int = 1333,
    trainable_backbone_layers: int = 5,
    head_norm_options: Optional[dict] = None,
    **maskrcnn_kwargs,
) -> MaskRCNN:
    """A torchvision ``MaskRCNN`` (ResNet-50-FPN, 4conv1fc box head, 4-conv mask head).

    Args:
        num_classes: classes including the background.
        norm: norm of the ResNet body, a :func:`mabn.build_norm` name ('bn', 'brn', 'syncbn', 'gn', 'ln',
            'in', 'mabn', 'frozenbn', ...).
        norm_options: options for the norms, e.g. ``{'buffer_size': 16, 'warmup_iters': 100}``; each norm
            gets those it accepts (``mabn.norm_options``). ``norm_batch_size`` reaches the body and the FPN
            only (see ``IMAGE_BATCH_OPTIONS``). An option that no norm in use accepts is an error, and so is
            one that the body and head norms read differently (``mabn.option_meaning``: ``momentum`` is
            MABN's EMA keep-rate but BN's and BRN's update rate): give the heads theirs in ``head_norm_options``.
        centered_convs: make every conv of the body, FPN, box head and mask head that feeds a norm a
            ``mabn.CenConv2d`` (default: exactly when ``norm == 'mabn'``). The RPN head and the mask predictor stay plain.
        head_norm: norm of the FPN and the box / mask heads (default: ``norm``, except none for
            'frozenbn', whose statistics only exist where pretrained weights provide them). ``'none'``:
            no norm there (the convs then carry a bias).
        min_size, max_size: resize range of the images (short side, cap on the long side).
        trainable_backbone_layers: body stages left trainable, counted from layer4 (5: all, the
            from-scratch setting; fewer freezes the stem and early stages as torchvision does).
        head_norm_options: options of the head norm only (FPN and RoI heads), over ``norm_options``; each
            must be one the head norm accepts.
        **maskrcnn_kwargs: passed to ``torchvision.models.detection.MaskRCNN`` (e.g.
            ``box_batch_size_per_image``, ``rpn_post_nms_top_n_test``, ``box_detections_per_img``,
            ``rpn_anchor_generator``).
    """
    clashes = sorted(set(BUILT_HERE) & set(maskrcnn_kwargs))
    if clashes:
        raise ValueError(f"build_mask_rcnn builds {clashes} itself from norm / head_norm; do not pass them")
    if norm == NO_NORM:
        raise ValueError("norm='none': the ResNet body needs a norm (use 'frozenbn' for pretrained statistics)")
    if head_norm is None:
        head_norm = NO_NORM if norm == "frozenbn" else norm
    if centered_convs is None:
        centered_convs = norm == "mabn"
    norm_layers = _NormLayers(norm, head_norm, norm_options or {}, head_norm_options or {})

    body = resnet50(norm_layer=norm_layers.body)
    backbone = _resnet_fpn_extractor(body, trainable_backbone_layers, norm_layer=norm_layers.fpn)
    box_head = FastRCNNConvFCHead((FPN_CHANNELS, 7, 7), [FPN_CHANNELS] * 4, [1024], norm_layer=norm_layers.roi)
    mask_head = MaskRCNNHeads(FPN_CHANNELS, [FPN_CHANNELS] * 4, 1, norm_layer=norm_layers.roi)
    if centered_convs:
        for part in (backbone, box_head, mask_head):
            mabn.convert_model(part, conv="cen")

    anchor_generator = maskrcnn_kwargs.pop("rpn_anchor_generator", None) or fpn_anchor_generator()
    rpn_head = RPNHead(FPN_CHANNELS, anchor_generator.num_anchors_per_location()[0], conv_depth=1)
    return MaskRCNN(
        backbone,
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchor_generator,
        rpn_head=rpn_head,
        box_head=box_head,
        mask_head=mask_head,
        **maskrcnn_kwargs,
    )


def fpn_anchor_generator() -> AnchorGenerator:
    """One anchor size per FPN level (P2-P6) and three aspect ratios, as in the FPN paper and torchvision."""
    sizes = ((32,), (64,), (128,), (256,), (512,))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


class _NormLayers:
    """The ``norm_layer(channels)`` callables of the body, the FPN and the RoI heads, options checked once."""

    def __init__(self, norm: str, head_norm: str, options: dict, head_options: dict):
        in_use = [name for name in dict.fromkeys((norm, head_norm)) if name != NO_NORM]
        accepted = {name: set(mabn.norm_options(name)) for name in in_use}  # also rejects unknown names
        unknown = sorted(set(options) - set().union(*accepted.values()))
        if unknown:
            listing = "; ".join(f"{name!r} accepts {sorted(names)}" for name, names in accepted.items())
            raise ValueError(f"norm_options {unknown} are accepted by no norm in use ({listing})")
        for option in sorted(set(options) - set(head_options)):  # an option the heads set themselves reaches the body only
            readers = {name: mabn.option_meaning(name, option) for name in in_use if option in accepted[name]}
            if len(set(readers.values())) > 1:
                meanings = "; ".join(f"to {name!r} {meaning}" for name, meaning in readers.items())
                raise ValueError(f"norm_options {option!r} means different things to the norms in use ({meanings}): "
                                 "keep it for the body norm and give the heads their own value in head_norm_options")
        if head_options:
            if head_norm == NO_NORM:
                raise ValueError(f"head_norm_options {sorted(head_options)} given, but the heads have no norm")
            refused = sorted(set(head_options) - accepted[head_norm])
            if refused:
                raise ValueError(f"head_norm_options {refused} are not accepted by the head norm {head_norm!r}, which "
                                 f"accepts {sorted(accepted[head_norm])}")
        self.body = self._layer(norm, options, accepted, per_image=True)
        self.fpn = self._layer(head_norm, {**options, **head_options}, accepted, per_image=True)
        self.roi = self._layer(head_norm, {**options, **head_options}, accepted, per_image=False)

    @staticmethod
    def _layer(name: str, options: dict, accepted: dict, per_image: bool) -> Optional[Callable[[int], nn.Module]]:
        if name == NO_NORM:
            return None
        options = {
            key: value
            for key, value in options.items()
            if key in accepted[name] and (per_image or key not in IMAGE_BATCH_OPTIONS)
        }
        return functools.partial(mabn.build_norm, name, **options)
