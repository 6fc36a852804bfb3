"""The region proposal network of the authors' maskrcnn-benchmark, as the smallest subclass of torchvision's.

Three points of the authors' recipe that torchvision's ``RegionProposalNetwork`` fixes differently, each
an option here whose default is torchvision's behaviour:

* ``smooth_l1_beta``: the beta of the smooth-L1 box loss (both use 1/9; kept as an option so that the
  recipe states it). Overrides ``compute_loss``.
* ``post_nms_per_batch``: in training, the ``post_nms_top_n`` proposals are the best over the whole batch
  (maskrcnn-benchmark's ``FPN_POST_NMS_PER_BATCH``), not per image. Overrides ``filter_proposals``: the
  per-image lists torchvision keeps hold every proposal of the batch-wide best ``post_nms_top_n`` (an image
  cannot contribute more than that), so choosing those from them is exact.
* ``straddle_thresh``: anchors reaching more than this many pixels outside the (resized, unpadded) image
  take no part in the loss (label -1, which the sampler skips), maskrcnn-benchmark's ``STRADDLE_THRESH``;
  negative keeps every anchor (torchvision). Overrides ``assign_targets_to_anchors``, and ``forward`` only to
  hand it the image sizes, which torchvision does not pass there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork

TORCHVISION_BETA = 1 / 9  # of both of torchvision's smooth-L1 box losses (RPN and box head)


class RecipeRPN(RegionProposalNetwork):
    smooth_l1_beta = TORCHVISION_BETA
    post_nms_per_batch = False
    straddle_thresh = -1.0

    @classmethod
    def adopt(cls, rpn: RegionProposalNetwork, smooth_l1_beta: float = TORCHVISION_BETA,
              post_nms_per_batch: bool = False, straddle_thresh: float = -1.0) -> "RecipeRPN":
        """Turn the RPN torchvision's ``MaskRCNN`` built (it takes no RPN module, only its arguments) into this
        class in place: same submodules, same state-dict keys."""
        if smooth_l1_beta <= 0:
            raise ValueError(f"RPN smooth-L1 beta must be positive, got {smooth_l1_beta}")
        rpn.__class__ = cls
        rpn.smooth_l1_beta = float(smooth_l1_beta)
        rpn.post_nms_per_batch = bool(post_nms_per_batch)
        rpn.straddle_thresh = float(straddle_thresh)
        return rpn

    def forward(self, images, features, targets=None):
        self._image_sizes = images.image_sizes
        try:
            return super().forward(images, features, targets)
        finally:
            del self._image_sizes

    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]):
        labels, matched_gt_boxes = super().assign_targets_to_anchors(anchors, targets)
        if self.straddle_thresh >= 0:
            for labels_per_image, anchors_per_image, (height, width) in zip(labels, anchors, self._image_sizes):
                labels_per_image[~inside_image(anchors_per_image, height, width, self.straddle_thresh)] = -1.0
        return labels, matched_gt_boxes

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        boxes, scores = super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        if self.training and self.post_nms_per_batch:
            boxes, scores = best_over_batch(boxes, scores, self.post_nms_top_n())
        return boxes, scores

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        if self.smooth_l1_beta == TORCHVISION_BETA:
            return super().compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
        # the same sampling and normalization (sum over positives / sampled anchors), another beta
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos = torch.where(torch.cat(sampled_pos, dim=0))[0]
        sampled = torch.cat([sampled_pos, torch.where(torch.cat(sampled_neg, dim=0))[0]])
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[sampled_pos], torch.cat(regression_targets)[sampled_pos],
                                    beta=self.smooth_l1_beta, reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled])
        return objectness_loss, box_loss


def inside_image(boxes: Tensor, height: int, width: int, thresh: float) -> Tensor:
    """Boxes (x0, y0, x1, y1) lying within ``thresh`` pixels of the image, as maskrcnn-benchmark's visibility."""
    return ((boxes[:, 0] >= -thresh) & (boxes[:, 1] >= -thresh)
            & (boxes[:, 2] < width + thresh) & (boxes[:, 3] < height + thresh))


def best_over_batch(boxes: list[Tensor], scores: list[Tensor], top_n: int) -> tuple[list[Tensor], list[Tensor]]:
    """Of every image's proposals, the ``top_n`` best scoring over the whole batch, still split by image."""
    counts = [len(s) for s in scores]
    if sum(counts) <= top_n:
        return boxes, scores
    keep = torch.zeros(sum(counts), dtype=torch.bool, device=scores[0].device)
    keep[torch.cat(scores).topk(top_n, sorted=False).indices] = True
    kept = keep.split(counts)
    return [b[k] for b, k in zip(boxes, kept)], [s[k] for s, k in zip(scores, kept)]
