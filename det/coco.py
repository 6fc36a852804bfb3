"""COCO-format instance segmentation as (image, target) pairs for torchvision's Mask R-CNN.

The annotation file is checked once, up front, so that a bad annotation fails at start-up with its file and id
instead of deep inside a data-loader worker hours into a run. Category ids are mapped to contiguous labels
1..C (0 is the background class of torchvision's detection heads); ``label_to_category_id`` maps predictions
back for the COCO evaluator.
"""
from __future__ import annotations

import copy
import math
import os
from numbers import Real

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from det.transforms import ToTensor
from mabn.engine.image_files import load_rgb


def clipped_xyxy(bbox, height: int, width: int) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` as ``(x1, y1, x2, y2)`` clipped to the image."""
    x, y, w, h = bbox
    return (min(max(x, 0.0), width), min(max(y, 0.0), height), min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))


def _has_area(box: tuple[float, float, float, float]) -> bool:
    # torchvision's detection models reject boxes without positive width and height.
    return box[2] > box[0] and box[3] > box[1]


def segmentation_error(segmentation, height: int, width: int) -> str | None:
    """Why ``segmentation`` is neither a COCO polygon list nor an RLE dict for an image of this size (None if valid)."""
    if isinstance(segmentation, list):
        if not segmentation:
            return "segmentation is an empty polygon list"
        for polygon in segmentation:
            # pycocotools reads a 4-number "polygon" as a box, and an odd count has no last y.
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                return "segmentation polygons must be lists of at least 6 coordinates (an even number)"
        return None
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            return "an RLE segmentation needs 'counts' and 'size'"
        if list(segmentation["size"]) != [height, width]:
            return f"RLE size {segmentation['size']} is not the image's [height, width] [{height}, {width}]"
        if not isinstance(segmentation["counts"], (str, bytes, list)):
            return "RLE 'counts' must be a string (compressed) or a list of run lengths (uncompressed)"
        return None
    return f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}"


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """Compressed RLE of a valid polygon list (parts merged into one object) or RLE (compressed or not)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def decode_masks(rles: list[dict], height: int, width: int) -> np.ndarray:
    """The binary masks of compressed RLEs as one C-contiguous uint8 array (K, H, W).

    pycocotools decodes into Fortran order, (H, W) per object; copying the objects one by one into a C-order
    array makes the same array as transposing the (H, W, K) of one decode call, with a faster copy (numpy
    transposes 2-D arrays faster than a 3-D one): ~0.3 ms less per 640x480 image of 7 objects, of ~11 ms for
    the whole training sample (``scripts/bench_data.py``).
    """
    masks = np.empty((len(rles), height, width), np.uint8)
    for mask, rle in zip(masks, rles):
        mask[...] = mask_utils.decode(rle)
    return masks


class CocoDetection(torch.utils.data.Dataset):
    """Images of a COCO-format instance-segmentation set with their targets.

    ``train=True`` drops crowd annotations from the targets and leaves out images that have no usable
    annotation left (torchvision's losses need at least one box); ``train=False`` keeps every image and
    every annotation, crowd ones flagged by ``iscrowd``, since COCOeval scores all images.
    """

    def __init__(self, image_dir: str, annotation_file: str, transforms=None, train: bool = True, loader=load_rgb):
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"COCO image directory not found: {image_dir}")
        if not os.path.isfile(annotation_file):
            raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
        self.image_dir = image_dir
        self.annotation_file = annotation_file
        self.transforms = transforms if transforms is not None else ToTensor()
        self.train = train
        self.loader = loader  # path -> RGB PIL image; like ImageFolder's, so the same loaders can be compared
        self.coco = COCO(annotation_file)
        self._validate()

        category_ids = sorted(self.coco.cats)
        self.category_id_to_label = {cat_id: label for label, cat_id in enumerate(category_ids, start=1)}
        self.label_to_category_id = {label: cat_id for cat_id, label in self.category_id_to_label.items()}
        self.num_classes = len(category_ids) + 1
        self.class_names = ["__background__"] + [self.coco.cats[c]["name"] for c in category_ids]

        image_ids = sorted(self.coco.imgs)
        self.ids = [i for i in image_ids if self._annotations(i)] if train else image_ids

    def _validate(self) -> None:
        """Raise ValueError naming the file and the image / annotation id of the first malformed entry."""
        where = f"{self.annotation_file}:"
        for image_id, image in self.coco.imgs.items():
            for key in ("height", "width"):
                if not isinstance(image.get(key), int) or image[key] <= 0:
                    raise ValueError(f"{where} image id {image_id}: '{key}' must be a positive integer, got {image.get(key)!r}")
            if not isinstance(image.get("file_name"), str):
                raise ValueError(f"{where} image id {image_id}: 'file_name' missing")
        for ann_id, ann in self.coco.anns.items():
            bbox = ann.get("bbox")
            numbers = isinstance(bbox, (list, tuple)) and len(bbox) == 4
            numbers = numbers and all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
            if not numbers:
                raise ValueError(f"{where} annotation id {ann_id}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            if bbox[2] < 0 or bbox[3] < 0:
                raise ValueError(f"{where} annotation id {ann_id}: bbox has a negative width or height: {bbox!r}")
            if ann.get("category_id") not in self.coco.cats:
                raise ValueError(f"{where} annotation id {ann_id}: category id {ann.get('category_id')!r} is not in 'categories'")
            image = self.coco.imgs.get(ann.get("image_id"))
            if image is None:
                raise ValueError(f"{where} annotation id {ann_id}: image id {ann.get('image_id')!r} is not in 'images'")
            # Crowd regions never reach a training target; in evaluation a bad one fails when it is decoded.
            if not ann.get("iscrowd", 0):
                error = segmentation_error(ann.get("segmentation"), image["height"], image["width"])
                if error:
                    raise ValueError(f"{where} annotation id {ann_id}: {error}")

    def _annotations(self, image_id: int) -> list[dict]:
        """The annotations that become targets: positive area after clipping, and no crowds in training."""
        image = self.coco.imgs[image_id]
        anns = self.coco.imgToAnns.get(image_id, [])
        if self.train:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        return [a for a in anns if _has_area(clipped_xyxy(a["bbox"], image["height"], image["width"]))]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int]) -> "CocoDetection":
        """The same set (annotations, category mapping) restricted to these images; COCOeval of its predictions
        scores these images only."""
        view = copy.copy(self)
        view.ids = [self.ids[i] for i in indices]
        return view

    def get_height_and_width(self, idx: int) -> tuple[int, int]:
        """(height, width) from the annotation file, without decoding the image (aspect-ratio grouping)."""
        image = self.coco.imgs[self.ids[idx]]
        return image["height"], image["width"]

    def _load_image(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        path = os.path.join(self.image_dir, info["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path} (image id {image_id} of {self.annotation_file})")
        image = self.loader(path)
        if image.size != (info["width"], info["height"]):
            # Masks are drawn at the annotated size; a mismatch would silently misalign them.
            raise ValueError(f"{path} is {image.size[0]}x{image.size[1]} but {self.annotation_file} says "
                             f"{info['width']}x{info['height']} (image id {image_id})")
        return image

    def _target(self, image_id: int) -> dict[str, torch.Tensor]:
        info = self.coco.imgs[image_id]
        height, width = info["height"], info["width"]
        anns = self._annotations(image_id)
        rles = []
        for ann in anns:
            error = segmentation_error(ann.get("segmentation"), height, width)
            if error:
                raise ValueError(f"{self.annotation_file}: annotation id {ann['id']}: {error}")
            rles.append(segmentation_to_rle(ann["segmentation"], height, width))
        masks = decode_masks(rles, height, width)
        boxes = [clipped_xyxy(a["bbox"], height, width) for a in anns]
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.category_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            # COCOeval buckets objects by the annotated area (the mask's), so carry that one, not the box's.
            "area": torch.tensor([a.get("area", (x2 - x1) * (y2 - y1)) for a, (x1, y1, x2, y2) in zip(anns, boxes)], dtype=torch.float32),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
        }

    def __getitem__(self, idx: int):
        image_id = self.ids[idx]
        return self.transforms(self._load_image(image_id), self._target(image_id))

    def __repr__(self) -> str:
        split = "train" if self.train else "eval"
        return f"{type(self).__name__}({self.annotation_file!r}, {split}, {len(self)} images, {self.num_classes - 1} categories)"
