"""torchvision's RoI heads with the smooth-L1 beta of the box regression loss as an option.

torchvision computes the box head's loss with beta 1/9 inside ``RoIHeads.forward`` (its module-level
``fastrcnn_loss``); the authors' maskrcnn-benchmark uses beta 1. Rather than copy ``forward``, this subclass
keeps what the loss needs as torchvision computes it (the sampled labels and regression targets from
``select_training_samples``, the box predictor's regression output from a forward hook held for the call) and, when beta is not
torchvision's, replaces ``loss_box_reg`` with the same loss (sum over the foreground RoIs of the class's four
deltas, divided by all sampled RoIs) at that beta. Parameters and state-dict keys are torchvision's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads

from det.rpn import TORCHVISION_BETA


class RecipeRoIHeads(RoIHeads):
    smooth_l1_beta = TORCHVISION_BETA

    @classmethod
    def adopt(cls, roi_heads: RoIHeads, smooth_l1_beta: float = TORCHVISION_BETA) -> "RecipeRoIHeads":
        """Turn the RoI heads torchvision's ``MaskRCNN`` built (it takes their arguments, not the module) into
        this class in place: same submodules, same state-dict keys."""
        if smooth_l1_beta <= 0:
            raise ValueError(f"box head smooth-L1 beta must be positive, got {smooth_l1_beta}")
        roi_heads.__class__ = cls
        roi_heads.smooth_l1_beta = float(smooth_l1_beta)
        roi_heads._sampled = None
        return roi_heads

    def select_training_samples(self, proposals, targets):
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        self._sampled = (labels, regression_targets)
        return proposals, matched_idxs, labels, regression_targets

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or self.smooth_l1_beta == TORCHVISION_BETA:
            return super().forward(features, proposals, image_shapes, targets)
        # hooked for this call only, so that a box predictor replaced after building (new classes) is seen too
        kept = {}
        hook = self.box_predictor.register_forward_hook(lambda module, inputs, outputs: kept.update(regression=outputs[1]))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
            labels, regression_targets = self._sampled
        finally:
            hook.remove()
            self._sampled = None
        losses["loss_box_reg"] = box_regression_loss(kept["regression"], labels, regression_targets, self.smooth_l1_beta)
        return result, losses


def box_regression_loss(box_regression: Tensor, labels: list[Tensor], regression_targets: list[Tensor],
                        beta: float) -> Tensor:
    """Fast R-CNN's box loss: smooth-L1 (``beta``) of each foreground RoI's deltas for its own class, summed and
    divided by the number of sampled RoIs (foreground and background)."""
    labels = torch.cat(labels)
    regression_targets = torch.cat(regression_targets)
    foreground = torch.where(labels > 0)[0]
    deltas = box_regression.reshape(len(labels), -1, 4)[foreground, labels[foreground]]
    return F.smooth_l1_loss(deltas, regression_targets[foreground], beta=beta, reduction="sum") / labels.numel()
