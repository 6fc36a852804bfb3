#!/usr/bin/env python
"""Throughput of the training data pipelines, and the CPU cores one GPU needs to be kept fed.

    python scripts/bench_data.py                                   # generates its sets under a temporary directory
    python scripts/bench_data.py --root /tmp/bench_data --gpu-images-per-s 2500 --det-gpu-images-per-s 20

Generates (or reuses, under ``--root``) an ImageNet-like ImageFolder of JPEGs at ImageNet's typical sizes
(500x375, 375x500, 500x333, 500x500) and quality 90, with smooth multi-scale noise as content (natural-image-like
spectrum, hence JPEG sizes like ImageNet's), and a COCO-like set (640x480 JPEGs, about 7 polygon objects per image,
COCO's average). Then, for every augmentation pipeline the classification trainer offers (the choices of
``DATA.PIPELINE``, or its one pipeline where the key does not exist) and for the detection trainer's pipeline:

* images per CPU-second of one process (CPU time, not wall time, so that other load on the machine does not
  count): the trainer's ``SeededDataset`` item by item, i.e. what one DataLoader worker on a core of its own does;
  the pipeline before (torchvision's ``pil_loader``: decode, then ``convert('RGB')``, which copies every image;
  transforms that copy) and now (``mabn.engine.image_files.load_rgb``: no copy when the JPEG already decodes to RGB;
  ``Lighting`` and ``Normalize`` in place), interleaved round by round, with a check that both produce identical
  tensors; then the CPU time of each stage of the classification sample;
* images/s (wall time) of a DataLoader with 1, 2, ... workers up to the cores present (files in the page cache);
* the cores one GPU needs at ``--gpu-images-per-s`` (cls) and ``--det-gpu-images-per-s`` (det): the GPU's rate
  over one worker's images per CPU-second, workers only (the training process needs its own core besides).

The GPU figures are assumptions, not measurements of this project (no GPU was available): 2,500 images/s is
the order of published ResNet-50 mixed-precision training throughputs on one A100-class GPU; 20 images/s is an
assumed Mask R-CNN R50-FPN AMP training rate on one such GPU. Pass the figures of your GPU (``scripts/gpu_check.py``
measures the trainers' images/s).

For the det masks, the way ``det.coco`` built them before (one pycocotools decode call, then a transposing
copy) against ``det.coco.decode_masks``, checked identical. Last, the JPEG decoders our stack offers, per image: PIL with and without the extra copy, ``torchvision.io
.decode_jpeg``, and PIL's draft mode (DCT-domain downscaling by 2 at decode), each compared with PIL's full
decode, pixel for pixel (draft mode: after a resize to the crop size, its most favourable case).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's cls/, det/

import numpy as np
import torch
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader
from torchvision.datasets.folder import pil_loader

from cls import train as cls_train
from cls.config import get_default_config
from cls.datasets import image_folder
from det.coco import CocoDetection, decode_masks, segmentation_to_rle
from det.sampler import collate_fn
from det.transforms import build_transforms as det_transforms
from mabn.engine.image_files import load_rgb
from mabn.engine.sampling import SeededDataset

# Assumed training throughputs of one current GPU (see the module docstring): images/s.
DEFAULT_GPU_IMAGES_PER_S = 2500.0  # ResNet-50, fp16 autocast
DEFAULT_DET_GPU_IMAGES_PER_S = 20.0  # Mask R-CNN R50-FPN, fp16 autocast
IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (500, 500))  # (width, height), the most common ones
COCO_SIZES = ((640, 480), (480, 640))
JPEG_QUALITY = 90
COCO_OBJECTS_PER_IMAGE = 7
VARIANTS = ("before", "now")


def smooth_noise(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """RGB noise summed over octaves with amplitude ~ 1/frequency, plus fine grain: a natural-looking spectrum."""
    acc = np.zeros((height, width, 3), np.float32)
    for octave, cells in enumerate((3, 12, 48, 192)):
        small = rng.normal(0, 1, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        up = [np.asarray(Image.fromarray(small[..., c], "F").resize((width, height), Image.BICUBIC)) for c in range(3)]
        acc += np.stack(up, -1) / (octave + 1)
    acc += rng.normal(0, 0.3, acc.shape).astype(np.float32)
    acc = (acc - acc.mean()) / acc.std() * 50 + 115
    return Image.fromarray(acc.clip(0, 255).astype(np.uint8))


def make_imagenet_like(root: str, images: int, classes: int = 4, seed: int = 0) -> str:
    """``root/train/<class>/*.JPEG``; an existing set with at least ``images`` files is reused as it is."""
    split = os.path.join(root, "train")
    existing = sum(len(files) for _, _, files in os.walk(split)) if os.path.isdir(split) else 0
    if existing >= images:
        return root
    rng = np.random.default_rng(seed)
    for i in range(images):
        directory = os.path.join(split, f"n{i % classes:08d}")
        os.makedirs(directory, exist_ok=True)
        smooth_noise(rng, *IMAGENET_SIZES[i % len(IMAGENET_SIZES)]).save(
            os.path.join(directory, f"img_{i:06d}.JPEG"), quality=JPEG_QUALITY)
    return root


def _object_polygon(rng: np.random.Generator, width: int, height: int) -> list[float]:
    """A star-shaped polygon of 16-48 vertices, 5-40 % of the short side across."""
    radius = rng.uniform(0.025, 0.2) * min(width, height)
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(16, 49))))
    radii = radius * rng.uniform(0.5, 1.0, len(angles))
    return [float(v) for a, r in zip(angles, radii) for v in (cx + r * math.cos(a), cy + r * math.sin(a))]


def make_coco_like(root: str, images: int, seed: int = 0) -> tuple[str, str]:
    """``root/train2017/*.jpg`` and ``root/annotations/instances_train2017.json``, reused if big enough."""
    image_dir, annotation_file = os.path.join(root, "train2017"), os.path.join(root, "annotations", "instances_train2017.json")
    if os.path.isfile(annotation_file):
        with open(annotation_file) as f:
            if len(json.load(f)["images"]) >= images:
                return image_dir, annotation_file
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(annotation_file), exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, annotations = [], []
    for image_id in range(1, images + 1):
        width, height = COCO_SIZES[image_id % len(COCO_SIZES)]
        file_name = f"{image_id:012d}.jpg"
        smooth_noise(rng, width, height).save(os.path.join(image_dir, file_name), quality=JPEG_QUALITY)
        entries.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for _ in range(COCO_OBJECTS_PER_IMAGE):
            polygon = _object_polygon(rng, width, height)
            xs, ys = polygon[0::2], polygon[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 4)),
                                "segmentation": [polygon], "area": box[2] * box[3], "bbox": box, "iscrowd": 0})
    categories = [{"id": i, "name": f"object{i}", "supercategory": "object"} for i in (1, 2, 3)]
    with open(annotation_file, "w") as f:
        json.dump({"images": entries, "annotations": annotations, "categories": categories}, f)
    return image_dir, annotation_file


def classification_pipelines() -> tuple[str, ...]:
    """The augmentation pipelines the cls trainer offers: DATA.PIPELINE's choices, or () where it has one only."""
    spec = get_default_config().DATA._specs.get("PIPELINE")
    return tuple(getattr(spec, "choices", ()))


def classification_set(root: str, pipeline: str | None):
    cfg = get_default_config()
    cfg.DATA.DATASET, cfg.DATA.ROOT = "imagenet", root
    if pipeline is not None:
        cfg.DATA.PIPELINE = pipeline
    train_transform, _ = cls_train.build_transforms(cfg)
    return image_folder(root, "train", train_transform)


def _tensors(sample):
    """The tensors of a sample (image, target), flattened, for an exact comparison."""
    if isinstance(sample, torch.Tensor):
        return [sample]
    if isinstance(sample, dict):
        return [t for key in sorted(sample) for t in _tensors(sample[key])]
    if isinstance(sample, (tuple, list)):
        return [t for item in sample for t in _tensors(item)]
    return [torch.tensor(sample)]


def identical(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def with_copies(transforms):
    """The pipeline as it was before the in-place speed-up: every transform with an ``inplace`` flag copying."""
    if not hasattr(transforms, "transforms"):
        return transforms
    before = copy.copy(transforms)
    before.transforms = [copy.copy(t) for t in transforms.transforms]
    for t in before.transforms:
        if getattr(t, "inplace", False):
            t.inplace = False
    return before


class Variants:
    """Switches a dataset between its pipeline as it was ('before': torchvision's ``pil_loader``, which copies RGB
    images in ``convert``, and transforms that copy) and as it is now ('now'); ``attribute`` names its transform."""

    def __init__(self, dataset, attribute: str):
        self.dataset, self.attribute = dataset, attribute
        self.now = (dataset.loader, getattr(dataset, attribute))
        self.before = (pil_loader, with_copies(self.now[1]))

    def use(self, variant: str) -> None:
        self.dataset.loader, transform = getattr(self, variant)
        setattr(self.dataset, self.attribute, transform)


def per_process_rates(variants: Variants, images: int, rounds: int, check: int) -> tuple[dict[str, float], bool]:
    """Median images per CPU-second of ``SeededDataset`` item by item in each of VARIANTS, interleaved round by
    round; and whether the first ``check`` samples are identical in both."""
    seeded = SeededDataset(variants.dataset, seed=0)
    samples = {}
    for variant in VARIANTS:
        variants.use(variant)
        samples[variant] = [seeded[(0, i)] for i in range(check)]
    same = all(identical(x, y) for x, y in zip(*samples.values()))
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            variants.use(variant)
            start = time.process_time()
            for i in range(images):
                seeded[(0, i % len(seeded))]
            times[variant].append(images / (time.process_time() - start))
    variants.use("now")
    return {variant: statistics.median(v) for variant, v in times.items()}, same


WHOLE_SAMPLE = "whole sample (SeededDataset)"


def stage_ms(dataset, images: int, rounds: int) -> dict[str, float]:
    """Median CPU ms per image of each stage of a classification sample: the loader, then each transform of the
    Compose in turn; and of the whole sample as the trainer loads it (``SeededDataset``, which also seeds)."""
    seeded = SeededDataset(dataset, seed=0)
    stages = {"loader (load_rgb)": dataset.loader}
    for t in dataset.transform.transforms:  # a transform by its function's or its class's name, kept apart if repeated
        name = getattr(t, "__name__", type(t).__name__)
        stages[name if name not in stages else f"{name} ({len(stages)})"] = t
    times: dict[str, list[float]] = {name: [] for name in [*stages, WHOLE_SAMPLE]}
    for _ in range(rounds):
        spent = dict.fromkeys(times, 0.0)
        for i in range(images):
            torch.manual_seed(i)
            sample = dataset.samples[i % len(dataset)][0]
            for name, stage in stages.items():
                start = time.process_time()
                sample = stage(sample)
                spent[name] += time.process_time() - start
            start = time.process_time()
            seeded[(0, i % len(dataset))]
            spent[WHOLE_SAMPLE] += time.process_time() - start
        for name in times:
            times[name].append(spent[name] / images * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def loader_rate(dataset, workers: int, batch: int, batches: int, collate=None) -> float:
    """Images/s of a DataLoader with ``workers`` workers, timed from the first batch (workers started) on."""
    keys = [(0, i % len(dataset)) for i in range(batch * (batches + 1))]
    loader = DataLoader(SeededDataset(dataset, seed=0), batch_size=batch, sampler=keys, num_workers=workers,
                        collate_fn=collate)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    count = sum(1 for _ in iterator)
    return count * batch / (time.perf_counter() - start)


def interleaved_ms(fns: dict, rounds: int) -> dict[str, float]:
    """Median CPU ms per call of each function, the functions taking turns round by round (after one warm-up call)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append((time.process_time() - start) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def _draft_decode(path: str, crop_size: int) -> Image.Image:
    with Image.open(path) as image:
        image.draft("RGB", (image.width // 2, image.height // 2))
        return image.convert("RGB").resize((crop_size, crop_size), Image.BILINEAR)


def decoder_report(paths: list[str], crop_size: int, rounds: int) -> list[tuple[str, float, str]]:
    """(decoder, ms per image, pixels against PIL's full decode) for each decoder of our stack."""
    full = [np.asarray(pil_loader(p)) for p in paths]
    decoded = [torchvision.io.decode_jpeg(torchvision.io.read_file(p)).permute(1, 2, 0).numpy() for p in paths]
    tv_diff = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(full, decoded))
    resized = [np.asarray(Image.fromarray(a).resize((crop_size, crop_size), Image.BILINEAR)) for a in full]
    drafted = [np.asarray(_draft_decode(p, crop_size)) for p in paths]
    draft_diff = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(resized, drafted))
    draft_share = statistics.mean(float((a != b).mean()) for a, b in zip(resized, drafted))

    def each(fn):
        return lambda: [fn(p) for p in paths]

    draft = f"PIL draft 1/2 + resize to {crop_size} (full image)"
    undrafted = f"PIL decode (load_rgb) + resize to {crop_size} (full image)"
    pixels = {
        "PIL decode + convert('RGB') (pil_loader)": "reference",
        "PIL decode, no copy (load_rgb)": "identical",
        "torchvision.io.decode_jpeg": "identical" if tv_diff == 0 else f"differs, max |diff| {tv_diff}",
        undrafted: "reference of the next row",
        draft: (f"differs from full decode + resize: max |diff| {draft_diff}, {draft_share:.0%} of values"
                if draft_diff else "identical"),
    }
    ms = interleaved_ms({
        "PIL decode + convert('RGB') (pil_loader)": each(pil_loader),
        "PIL decode, no copy (load_rgb)": each(load_rgb),
        "torchvision.io.decode_jpeg": each(lambda p: torchvision.io.decode_jpeg(torchvision.io.read_file(p))),
        undrafted: each(lambda p: load_rgb(p).resize((crop_size, crop_size), Image.BILINEAR)),
        draft: each(lambda p: _draft_decode(p, crop_size)),
    }, rounds)
    return [(name, ms[name] / len(paths), pixels[name]) for name in pixels]


def mask_report(dataset: CocoDetection, rounds: int) -> list[tuple[str, float, str]]:
    """(way, CPU ms per image, masks against the one decode call) for the two ways of building the (K, H, W) masks."""
    images = []
    for image_id in dataset.ids:
        info = dataset.coco.imgs[image_id]
        rles = [segmentation_to_rle(a["segmentation"], info["height"], info["width"]) for a in dataset.coco.imgToAnns[image_id]]
        images.append((rles, info["height"], info["width"]))
    ways = {
        "before: one decode call, (H, W, K) transposed": lambda r, h, w: np.ascontiguousarray(mask_utils.decode(r).transpose(2, 0, 1)),
        "now: det.coco.decode_masks, object by object": decode_masks,
    }
    before, now = ways.values()
    same = all(np.array_equal(b, n) and n.flags.c_contiguous for b, n in ((before(*i), now(*i)) for i in images))
    ms = interleaved_ms({name: lambda way=way: [way(*image) for image in images] for name, way in ways.items()}, rounds)
    return [(name, ms[name] / len(images), "reference" if i == 0 else "identical" if same else "DIFFERENT")
            for i, name in enumerate(ways)]


def cores_needed(gpu_rate: float, per_process: float) -> int:
    return math.ceil(gpu_rate / per_process)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="where the generated sets live (reused when present); default: a temporary directory")
    parser.add_argument("--images", type=int, default=64, help="ImageNet-like images to generate and read per round")
    parser.add_argument("--coco-images", type=int, default=16, help="COCO-like images to generate and read per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the per-process measurement (median)")
    parser.add_argument("--batch", type=int, default=32, help="DataLoader batch (cls; det uses 2 images per batch)")
    parser.add_argument("--batches", type=int, default=8, help="timed DataLoader batches per worker count")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers up to (default: the cores)")
    parser.add_argument("--check", type=int, default=4, help="samples compared tensor for tensor between the loaders")
    parser.add_argument("--gpu-images-per-s", type=float, default=DEFAULT_GPU_IMAGES_PER_S)
    parser.add_argument("--det-gpu-images-per-s", type=float, default=DEFAULT_DET_GPU_IMAGES_PER_S)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    for key in ("images", "coco_images", "rounds", "batch", "batches", "check"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.max_workers < 0:
        parser.error(f"--max-workers must be >= 0, got {args.max_workers}")
    if args.gpu_images_per_s <= 0 or args.det_gpu_images_per_s <= 0:
        parser.error("--gpu-images-per-s and --det-gpu-images-per-s must be positive")
    args.check = min(args.check, args.images, args.coco_images)

    with tempfile.TemporaryDirectory() as scratch:
        root = args.root or scratch
        return run(args, make_imagenet_like(os.path.join(root, "imagenet"), args.images),
                   make_coco_like(os.path.join(root, "coco"), args.coco_images))


def run(args, imagenet_root: str, coco: tuple[str, str]) -> int:
    torch.set_num_threads(1)  # what a DataLoader worker gets
    results: dict = {"cpu_cores": os.cpu_count(), "pipelines": {}}
    print(f"{os.cpu_count()} CPU cores; {args.images} ImageNet-like and {args.coco_images} COCO-like JPEGs (quality {JPEG_QUALITY})")
    print("\n| pipeline | images per CPU-second, before | now | now / before | identical tensors | "
          "DataLoader images/s with 1, 2, ... workers | cores per GPU at the stated rate |")
    print("|---|---|---|---|---|---|---|")

    def report(name, dataset, attribute, images, gpu_rate, batch, collate=None):
        rates, same = per_process_rates(Variants(dataset, attribute), images, args.rounds, args.check)
        before, now = rates["before"], rates["now"]
        scaling = [loader_rate(dataset, w, batch, args.batches, collate) for w in range(1, args.max_workers + 1)]
        cores = cores_needed(gpu_rate, now)
        results["pipelines"][name] = {"per_process": rates, "identical": same, "workers": scaling,
                                      "gpu_images_per_s": gpu_rate, "cores_per_gpu": cores}
        print(f"| {name} | {before:.1f} | {now:.1f} | {now / before:.2f} | {'yes' if same else 'NO'} | "
              f"{', '.join(f'{r:.1f}' for r in scaling) or '-'} | {cores} at {gpu_rate:g} images/s |")
        return same

    ok = True
    for pipeline in classification_pipelines() or (None,):
        ok &= report(f"cls {pipeline or 'train'}", classification_set(imagenet_root, pipeline), "transform",
                     args.images, args.gpu_images_per_s, args.batch)
    det_set = CocoDetection(*coco, det_transforms(train=True), train=True)
    ok &= report("det train", det_set, "transforms", args.coco_images, args.det_gpu_images_per_s, 2, collate_fn)

    for pipeline in classification_pipelines() or (None,):
        stages = stage_ms(classification_set(imagenet_root, pipeline), args.images, args.rounds)
        results["pipelines"][f"cls {pipeline or 'train'}"]["stages_ms"] = stages
        print(f"\n| cls {pipeline or 'train'}: stage | CPU ms per image | share of the whole sample |")
        print("|---|---|---|")
        for name, ms in stages.items():
            print(f"| {name} | {ms:.2f} | {ms / stages[WHOLE_SAMPLE]:.0%} |")

    print("\n| det masks of the COCO-like set | CPU ms per image | masks |")
    print("|---|---|---|")
    masks = mask_report(det_set, args.rounds)
    for name, ms, same in masks:
        print(f"| {name} | {ms:.2f} | {same} |")
        ok &= same != "DIFFERENT"
    results["det_masks"] = {name: {"ms": ms, "masks": same} for name, ms, same in masks}

    print("\n| JPEG decoder (ImageNet-like files) | CPU ms per image | pixels |")
    print("|---|---|---|")
    paths = [path for path, _ in classification_set(imagenet_root, None).samples[: args.check]]
    decoders = decoder_report(paths, get_default_config().DATA.CROP_SIZE, args.rounds)
    for name, ms, pixels in decoders:
        print(f"| {name} | {ms:.2f} | {pixels} |")
    results["decoders"] = {name: {"ms": ms, "pixels": pixels} for name, ms, pixels in decoders}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not ok:
        print("the pipeline before and now produced different tensors: a speed-up changed pixels", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
