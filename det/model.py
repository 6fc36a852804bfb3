"""Mask R-CNN R50-FPN with the normalization of the paper's detection experiments, on torchvision's models.

    model = build_mask_rcnn(num_classes=81, norm="mabn")            # MABN + centered convs, from scratch
    model = build_mask_rcnn(num_classes=81, norm="frozenbn")        # the usual fine-tune baseline

The configured norm sits in the ResNet stem and every bottleneck, in every FPN conv (lateral and
output), in the 4conv1fc box head and in the 4-conv mask head; the RPN head stays plain. With MABN
every conv of those parts is weight-centered (:class:`mabn.CenConv2d`), because MABN's reduced
statistics assume zero-mean pre-activations. Module names are torchvision's
(``backbone.body.layer1.0.bn1.weight``, ...), so ImageNet ResNet-50 weights map onto the body
(see :mod:`det.backbone_weights`).

The authors' recipe (maskrcnn-benchmark, which produced the paper's COCO numbers) differs from
torchvision's defaults in a few points, each an argument here whose default is torchvision's:

* ``stride_in_1x1``: the stride of each stage's first bottleneck on its 1x1 conv (MSRA ResNet, the
  authors' ``MODEL.RESNETS.STRIDE_IN_1X1``) instead of the 3x3; set on the built convs, same keys.
* ``head_init='authors'``: box head convs N(0, 0.01) and its fc Kaiming-uniform (a = 1), box predictor
  cls N(0, 0.01) and bbox N(0, 0.001), mask head convs and predictor Kaiming-normal (fan-out), every bias 0.
* ``rpn_smooth_l1_beta``, ``rpn_post_nms_per_batch``, ``rpn_straddle_thresh``: :class:`det.rpn.RecipeRPN`,
  a subclass of torchvision's RPN overriding ``compute_loss``, ``filter_proposals`` and
  ``assign_targets_to_anchors`` (and ``forward``, only to pass the image sizes on).
* ``box_smooth_l1_beta``: :class:`det.roi_heads.RecipeRoIHeads`, a subclass of torchvision's RoI heads that
  recomputes ``loss_box_reg`` at that beta (torchvision's is fixed at 1/9 inside ``RoIHeads.forward``).
* ``input_format='authors'``: the network input in BGR 0-255 minus maskrcnn-benchmark's pixel mean
  (:class:`det.input_format.BGR255Transform`, overriding only ``normalize`` of torchvision's transform).

torchvision's ``MaskRCNN`` builds its RPN, RoI heads and transform itself from keyword arguments, so those three are
re-classed in place after it has built them: the state dict is torchvision's either way.
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
from det.input_format import adopt_input_format
from det.roi_heads import RecipeRoIHeads
from det.rpn import TORCHVISION_BETA, RecipeRPN

FPN_CHANNELS = 256

# Options that count images: in the body and the FPN the batch axis holds images, in the RoI heads it
# holds a varying number of RoIs that no fixed normalization batch divides, so the heads never get them.
IMAGE_BATCH_OPTIONS = ("norm_batch_size",)

# Parts this function builds; passing them through **maskrcnn_kwargs would silently bypass the norm.
BUILT_HERE = ("backbone", "rpn_head", "box_head", "mask_head")

NO_NORM = "none"

HEAD_INITS = ("torchvision", "authors")


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
    stride_in_1x1: bool = False,
    head_init: str = "torchvision",
    rpn_smooth_l1_beta: float = TORCHVISION_BETA,
    box_smooth_l1_beta: float = TORCHVISION_BETA,
    rpn_post_nms_per_batch: bool = False,
    rpn_straddle_thresh: float = -1.0,
    input_format: str = "torchvision",
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
        stride_in_1x1: put the stride of layer2-4's first bottleneck on its 1x1 conv (the authors', MSRA
            style) instead of its 3x3 (torchvision). ImageNet weights must have been trained with the same layout.
        head_init: 'torchvision' or 'authors' (maskrcnn-benchmark's initialization of box and mask heads).
        rpn_smooth_l1_beta, box_smooth_l1_beta: beta of the smooth-L1 box losses of the RPN and the box head
            (torchvision: 1/9 both; the authors: 1/9 and 1).
        rpn_post_nms_per_batch: in training, keep ``rpn_post_nms_top_n_train`` proposals over the whole batch
            (the authors) rather than per image (torchvision).
        rpn_straddle_thresh: anchors reaching more than this many pixels outside the image are left out of the
            RPN loss (the authors: 0); negative keeps them all (torchvision).
        input_format: the network input made from the RGB [0, 1] images: 'torchvision' (normalized by the
            ImageNet mean / std) or 'authors' (BGR 0-255 minus maskrcnn-benchmark's pixel mean; det/input_format.py).
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
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
    norm_layers = _NormLayers(norm, head_norm, norm_options or {}, head_norm_options or {})

    body = resnet50(norm_layer=norm_layers.body)
    if stride_in_1x1:
        move_stride_to_1x1(body)
    backbone = _resnet_fpn_extractor(body, trainable_backbone_layers, norm_layer=norm_layers.fpn)
    box_head = FastRCNNConvFCHead((FPN_CHANNELS, 7, 7), [FPN_CHANNELS] * 4, [1024], norm_layer=norm_layers.roi)
    mask_head = MaskRCNNHeads(FPN_CHANNELS, [FPN_CHANNELS] * 4, 1, norm_layer=norm_layers.roi)
    if head_init == "authors":
        init_box_head_as_authors(box_head)
        init_kaiming_fan_out(mask_head)
    if centered_convs:
        for part in (backbone, box_head, mask_head):
            mabn.convert_model(part, conv="cen")

    anchor_generator = maskrcnn_kwargs.pop("rpn_anchor_generator", None) or fpn_anchor_generator()
    rpn_head = RPNHead(FPN_CHANNELS, anchor_generator.num_anchors_per_location()[0], conv_depth=1)
    model = MaskRCNN(
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
    if head_init == "authors":
        init_box_predictor_as_authors(model.roi_heads.box_predictor)
        init_kaiming_fan_out(model.roi_heads.mask_predictor)
    adopt_input_format(model.transform, input_format)
    RecipeRPN.adopt(model.rpn, rpn_smooth_l1_beta, rpn_post_nms_per_batch, rpn_straddle_thresh)
    RecipeRoIHeads.adopt(model.roi_heads, box_smooth_l1_beta)
    return model


def move_stride_to_1x1(body: nn.Module) -> None:
    """MSRA's bottleneck layout: the downsampling stride of each stage's first block on its 1x1 conv."""
    for stage in (body.layer2, body.layer3, body.layer4):
        block = stage[0]
        block.conv1.stride, block.conv2.stride = block.conv2.stride, block.conv1.stride


def init_box_head_as_authors(box_head: nn.Module) -> None:
    """maskrcnn-benchmark's 4conv1fc head: convs N(0, 0.01), the fc Kaiming-uniform with a = 1, biases 0."""
    for module in box_head.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.01)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=1)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            nn.init.zeros_(module.bias)


def init_box_predictor_as_authors(predictor: nn.Module) -> None:
    """Small logits and smaller deltas at the start: class scores N(0, 0.01), box deltas N(0, 0.001), biases 0."""
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    for layer in (predictor.cls_score, predictor.bbox_pred):
        nn.init.zeros_(layer.bias)


def init_kaiming_fan_out(part: nn.Module) -> None:
    """maskrcnn-benchmark's mask head and predictor: every conv Kaiming-normal (fan-out, ReLU), biases 0
    (torchvision draws the same weights but leaves the predictor's biases at PyTorch's default)."""
    for module in part.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


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
