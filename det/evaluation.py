"""COCO box and mask AP of torchvision Mask R-CNN predictions, across ranks.

    evaluator = CocoEvaluator(dataset.coco, ("bbox", "segm"), dataset.label_to_category_id)
    for images, targets in loader:
        outputs = model(images)
        evaluator.update({int(t["image_id"]): o for t, o in zip(targets, outputs)})
    results = evaluator.evaluate()          # {'bbox': {'AP': .., 'AP50': ..}, 'segm': {..}}, in percent
    write_json(results, "runs/x/metrics.json")
"""
from __future__ import annotations

import copy
import os

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mabn.engine.output_dir import write_json_atomically

IOU_TYPES = ("bbox", "segm")
# The first six entries of COCOeval.stats, in order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
HEADLINE = {"bbox": "box", "segm": "mask"}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _evaluable_ground_truth(coco_gt: COCO) -> COCO:
    """``coco_gt``, or a copy whose annotation ids start at 1 when some id is 0 or negative.

    COCOeval stores the id of the matched ground truth in its match table and reads 0 as "unmatched", so a
    detection matching an annotation with id 0 (labelme's converter numbers from 0) would count as a false
    positive. The ids are never referenced by results, so renumbering them changes nothing else.
    """
    if all(ann_id > 0 for ann_id in coco_gt.anns):
        return coco_gt
    renumbered = COCO()
    renumbered.dataset = dict(coco_gt.dataset)
    renumbered.dataset["annotations"] = [dict(ann, id=i) for i, ann in enumerate(coco_gt.dataset["annotations"], start=1)]
    renumbered.createIndex()
    return renumbered


class CocoEvaluator:
    """Accumulates detections per image and scores them with pycocotools' COCOeval.

    Results are kept per image id, so an image seen twice (``DistributedSampler`` pads the last batches with
    repeated images, possibly on another rank) is counted once.
    """

    def __init__(self, coco_gt: COCO, iou_types=IOU_TYPES, label_to_category_id: dict | None = None):
        if label_to_category_id is None:
            raise TypeError("CocoEvaluator needs label_to_category_id (the dataset's) to map labels back to COCO category ids")
        unknown = [t for t in iou_types if t not in IOU_TYPES]
        if unknown:
            raise ValueError(f"unsupported IoU types {unknown}; choose from {IOU_TYPES}")
        self.coco_gt = _evaluable_ground_truth(coco_gt)
        self.iou_types = tuple(iou_types)
        self.label_to_category_id = {int(k): int(v) for k, v in label_to_category_id.items()}
        # {iou_type: {image_id: [COCO result dicts]}}; an image with no detection maps to [].
        self.results: dict[str, dict[int, list[dict]]] = {t: {} for t in self.iou_types}
        self._synchronized = False

    def update(self, predictions: dict) -> None:
        """``{image_id: {'boxes' (K,4) xyxy, 'scores' (K,), 'labels' (K,), 'masks' (K,1,H,W)}}`` of one batch."""
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise KeyError(f"image id {image_id} is not in the ground truth")
            for iou_type in self.iou_types:
                self.results[iou_type][image_id] = self._convert(image_id, prediction, iou_type)
        self._synchronized = False

    def _category_ids(self, labels: torch.Tensor) -> list[int]:
        try:
            return [self.label_to_category_id[int(label)] for label in labels]
        except KeyError as error:
            raise KeyError(f"predicted label {error.args[0]} has no category id in label_to_category_id") from None

    def _convert(self, image_id: int, prediction: dict, iou_type: str) -> list[dict]:
        scores = prediction["scores"].detach().cpu().tolist()
        category_ids = self._category_ids(prediction["labels"].detach().cpu())
        if iou_type == "bbox":
            xyxy = prediction["boxes"].detach().cpu().float().reshape(-1, 4)
            # xyxy -> COCO's xywh, out of place: the caller's tensor may be a CPU tensor we must not modify.
            boxes = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
            return [{"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                    for c, b, s in zip(category_ids, boxes.tolist(), scores)]
        masks = prediction["masks"].detach().cpu()
        if masks.dim() == 4:  # torchvision's (K, 1, H, W) probabilities
            masks = masks[:, 0]
        binary = (masks > 0.5).numpy().astype(np.uint8)
        # pycocotools encodes (H, W, K) Fortran-ordered uint8 arrays.
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
        for rle in rles:
            rle["counts"] = rle["counts"].decode("utf-8")  # bytes are not JSON-serialisable
        # No "bbox" key: loadRes would then take the box area instead of the mask area for the size buckets.
        return [{"image_id": image_id, "category_id": c, "segmentation": r, "score": s}
                for c, r, s in zip(category_ids, rles, scores)]

    def synchronize(self) -> None:
        """Merge the results of every rank (no-op without a process group); each image id is kept once."""
        if _distributed() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.results)
            for iou_type in self.iou_types:
                merged: dict[int, list[dict]] = {}
                for rank_results in gathered:
                    merged.update(rank_results[iou_type])
                self.results[iou_type] = merged
        self._synchronized = True

    def instances(self) -> list[dict]:
        """Every detection as one COCO result (image_id, category_id, bbox as xywh, score and, with masks, an RLE
        segmentation), by image id: detectron2's ``coco_instances_results.json``, which ``COCO.loadRes`` reads and
        the COCO test-dev server takes. Call after :meth:`synchronize` for the detections of every rank."""
        detections = []
        for image_id in sorted(self.results[self.iou_types[0]]):
            # both IoU types convert the same predictions in the same order, one dict per detection each
            for parts in zip(*(self.results[t][image_id] for t in self.iou_types)):
                detections.append({k: v for part in parts for k, v in part.items()})
        return detections

    def evaluate(self) -> dict[str, dict[str, float]]:
        """COCO metrics in percent (-1 where COCO has no object of that size), identical on every rank.

        Collective when distributed: every rank must call it. COCOeval runs on rank 0 only.
        """
        if not self._synchronized:
            self.synchronize()
        metrics = None
        if not _distributed() or dist.get_rank() == 0:
            metrics = {t: self._evaluate_type(t) for t in self.iou_types}
        if _distributed() and dist.get_world_size() > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    def _evaluate_type(self, iou_type: str) -> dict[str, float]:
        per_image = self.results[iou_type]
        detections = [d for image_results in per_image.values() for d in image_results]
        print(f"IoU metric: {iou_type}")
        if not detections:
            # loadRes([]) fails on its first element; no detection at all means AP 0.
            print(f"no detections on {len(per_image)} images: AP 0")
            return {name: 0.0 for name in METRICS}
        # loadRes adds ids and areas to the dicts it gets; copies keep our results reusable.
        coco_dt = self.coco_gt.loadRes(copy.deepcopy(detections))
        coco_eval = COCOeval(self.coco_gt, coco_dt, iou_type)
        coco_eval.params.imgIds = sorted(per_image)  # only the images that were evaluated
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        return {name: float(v) * 100 if v >= 0 else -1.0 for name, v in zip(METRICS, coco_eval.stats[: len(METRICS)])}


def write_json(results: dict[str, dict[str, float]], path: str) -> str:
    """Write the headline numbers (box_AP, box_AP50, box_AP75, mask_AP, ...) and the full dicts, atomically."""
    payload = {}
    for iou_type, prefix in HEADLINE.items():
        if iou_type in results:
            payload.update({f"{prefix}_{name}": results[iou_type][name] for name in ("AP", "AP50", "AP75")})
    payload.update(results)
    return write_json_atomically(payload, path, indent=2, sort_keys=True)
