"""A small generated COCO-format instance-segmentation set for tests and CPU smoke runs.

    python -m det.synthetic_shapes data/shapes --num-train 64 --num-val 16

writes the standard COCO layout (``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``),
so the detection trainer reads it with exactly the code path it uses for COCO. Objects are large, barely
overlapping filled shapes whose colour identifies the category, so a small Mask R-CNN trained for a few
minutes on a CPU reaches a box AP clearly above zero.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# (name, base RGB colour). The colours are far apart from each other and from the grey background.
CATEGORIES = (("rectangle", (220, 40, 40)), ("ellipse", (40, 200, 60)), ("triangle", (50, 80, 230)))
SPLITS = ("train2017", "val2017")
ELLIPSE_VERTICES = 24


def _shape_polygon(kind: str, x0: float, y0: float, w: float, h: float, rng: np.random.Generator) -> list[float]:
    """Flat COCO polygon ``[x1, y1, x2, y2, ...]`` of one shape inscribed in the box (x0, y0, w, h)."""
    if kind == "rectangle":
        points = [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    elif kind == "ellipse":
        cx, cy = x0 + w / 2, y0 + h / 2
        angles = np.linspace(0.0, 2 * math.pi, ELLIPSE_VERTICES, endpoint=False)
        points = [(cx + w / 2 * math.cos(a), cy + h / 2 * math.sin(a)) for a in angles]
    elif kind == "triangle":
        # The apex moves along the top edge so that triangles are not all isosceles.
        apex = x0 + w * rng.uniform(0.2, 0.8)
        points = [(apex, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return [round(float(c), 2) for point in points for c in point]


def _place_boxes(rng: np.random.Generator, count: int, height: int, width: int) -> list[tuple[float, float, float, float]]:
    """Up to ``count`` boxes (x0, y0, w, h) of 25-55 % of the short side that do not touch each other."""
    short = min(height, width)
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(50 * count):  # rejection sampling; a crowded image just gets fewer objects
        if len(boxes) == count:
            break
        w, h = (float(rng.uniform(0.25, 0.55) * short) for _ in range(2))
        x0, y0 = float(rng.uniform(1, width - w - 1)), float(rng.uniform(1, height - h - 1))
        gap = 2.0
        apart = (x0 + w + gap <= bx or bx + bw + gap <= x0 or y0 + h + gap <= by or by + bh + gap <= y0 for bx, by, bw, bh in boxes)
        if all(apart):
            boxes.append((x0, y0, w, h))
    return boxes


def _make_split(root: str, split: str, num_images: int, image_size: tuple[int, int], rng: np.random.Generator) -> str:
    height, width = image_size
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        # Noisy mid-grey background: the network has to use colour and shape, not "anything not black".
        pixels = rng.normal(128, 18, size=(height, width, 3)).clip(0, 255)
        for x0, y0, w, h in _place_boxes(rng, int(rng.integers(1, 4)), height, width):
            category = int(rng.integers(len(CATEGORIES)))
            kind, colour = CATEGORIES[category]
            polygon = _shape_polygon(kind, x0, y0, w, h, rng)
            # The pixels are painted from the mask pycocotools rasterises from the polygon, so image and
            # annotation agree exactly (PIL's polygon fill differs at the boundary).
            rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
            mask = mask_utils.decode(rle).astype(bool)
            jitter = rng.integers(-20, 21, size=3)
            pixels[mask] = np.clip(np.array(colour) + jitter, 0, 255) + rng.normal(0, 6, size=(int(mask.sum()), 3))
            xs, ys = polygon[0::2], polygon[1::2]
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category + 1,
                "segmentation": [polygon],
                "area": float(mask_utils.area(rle)),
                "bbox": [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
                "iscrowd": 0,
            })
        file_name = f"{image_id:012d}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(root, split, file_name))
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    dataset = {
        "info": {"description": "synthetic shapes (det.synthetic_shapes)"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, (name, _) in enumerate(CATEGORIES)],
    }
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump(dataset, f)
    return path


def make_shapes_dataset(
    root: str, num_train: int = 64, num_val: int = 16, image_size: tuple[int, int] = (96, 128), seed: int = 0
) -> str:
    """Write the set under ``root`` (image_size is (height, width)); the same seed gives the same files."""
    height, width = image_size
    if min(height, width) < 32:
        raise ValueError(f"image_size {image_size} is too small for the shapes (need at least 32x32)")
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        # One generator per split: the val images do not change when num_train does.
        _make_split(root, split, count, (height, width), np.random.default_rng([seed, split_index]))
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="output directory")
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_shapes_dataset(args.root, args.num_train, args.num_val, (args.height, args.width), args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
