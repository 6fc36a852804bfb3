"""Helpers for the detection data tests: hand-written COCO files and ground truth turned into predictions."""
from __future__ import annotations

import datetime
import json
import os

import numpy as np
import torch
from PIL import Image

HEIGHT, WIDTH = 40, 60


def square(x: float, y: float, size: float) -> list[float]:
    return [x, y, x + size, y, x + size, y + size, x, y + size]


def annotation(ann_id: int, image_id: int, x: float, y: float, size: float, category_id: int = 1, **extra) -> dict:
    """A valid square annotation; ``extra`` overrides or adds fields."""
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x, y, size, size],
        "area": size * size,
        "segmentation": [square(x, y, size)],
        "iscrowd": 0,
    }
    ann.update(extra)
    return ann


def write_coco(root, annotations: list[dict], num_images: int = 1, categories=({"id": 1, "name": "thing"},)) -> tuple[str, str]:
    """A COCO set of ``num_images`` blank images (ids 1..n) under ``root``; returns (image_dir, annotation_file)."""
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    images = []
    for image_id in range(1, num_images + 1):
        file_name = f"{image_id}.png"
        Image.new("RGB", (WIDTH, HEIGHT), (90, 90, 90)).save(os.path.join(image_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "height": HEIGHT, "width": WIDTH})
    annotation_file = os.path.join(root, "instances.json")
    with open(annotation_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": list(categories)}, f)
    return image_dir, annotation_file


def as_prediction(target: dict) -> dict:
    """A target as torchvision Mask R-CNN would predict it, with full confidence."""
    masks = target["masks"].float()[:, None]  # (K, 1, H, W) probabilities
    scores = torch.ones(len(target["boxes"]))
    return {"boxes": target["boxes"].clone(), "labels": target["labels"].clone(), "scores": scores, "masks": masks}


def ground_truth_predictions(dataset) -> dict[int, dict]:
    """``{image_id: prediction}`` reproducing every (non-crowd) target of the dataset."""
    predictions = {}
    for idx in range(len(dataset)):
        _, target = dataset[idx]
        keep = target["iscrowd"] == 0
        objects = {k: target[k][keep] for k in ("boxes", "labels", "masks")}
        predictions[int(target["image_id"])] = as_prediction(objects)
    return predictions


def mask_extent(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) pixel-edge bounds of a non-empty (H, W) mask."""
    ys, xs = np.nonzero(mask.numpy())
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def evaluate_on_two_ranks(rank: int, world_size: int, init_file: str, shapes_root: str, out_dir: str) -> None:
    """torch.multiprocessing.spawn target: each rank sees an overlapping half of the val images, as
    DistributedSampler padding produces; writes the metrics each rank gets back."""
    import torch.distributed as dist

    from det.coco import CocoDetection
    from det.evaluation import CocoEvaluator

    # A short timeout turns a collective that never completes into a failure instead of a hung test run.
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timeout)
    try:
        annotation_file = os.path.join(shapes_root, "annotations", "instances_val2017.json")
        dataset = CocoDetection(os.path.join(shapes_root, "val2017"), annotation_file, train=False)
        predictions = ground_truth_predictions(dataset)
        image_ids = sorted(predictions)
        half = len(image_ids) // 2
        mine = image_ids[: half + 1] if rank == 0 else image_ids[half - 1:]
        evaluator = CocoEvaluator(dataset.coco, ("bbox", "segm"), dataset.label_to_category_id)
        evaluator.update({i: predictions[i] for i in mine})
        metrics = evaluator.evaluate()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"metrics": metrics, "num_images": len(evaluator.results["bbox"])}, f)
    finally:
        dist.destroy_process_group()
