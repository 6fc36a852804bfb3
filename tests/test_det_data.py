"""The detection data pipeline: COCO loading and validation, paired transforms, grouped batching, COCO evaluation."""
import filecmp
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils
from torch.utils.data import DistributedSampler, RandomSampler
from torchvision.datasets.folder import pil_loader

from det.coco import CocoDetection, decode_masks, segmentation_to_rle
from det.evaluation import CocoEvaluator, write_json, write_json_atomically
from det.sampler import GroupedBatchSampler, aspect_ratio_group_ids, collate_fn
from det.synthetic_shapes import CATEGORIES, make_shapes_dataset
from det.transforms import RandomHorizontalFlip, build_transforms, hflip
from mabn.engine.sampling import SeededDataset

from fixtures_det import (
    HEIGHT,
    WIDTH,
    annotation,
    as_prediction,
    evaluate_on_two_ranks,
    ground_truth_predictions,
    mask_extent,
    write_coco,
)

# pycocotools 2.0.11's decode trips numpy 2's __array__(copy=...) deprecation; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

LABELME = "/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes")), num_train=8, num_val=8)


def shapes_split(root, split="val2017", train=False, transforms=None):
    return CocoDetection(os.path.join(root, split), os.path.join(root, "annotations", f"instances_{split}.json"), transforms, train)


def evaluate(dataset, predictions, iou_types=("bbox", "segm")):
    evaluator = CocoEvaluator(dataset.coco, iou_types, dataset.label_to_category_id)
    evaluator.update(predictions)
    return evaluator.evaluate()


# ---------------------------------------------------------------------------------------------- synthetic set


def test_synthetic_set_layout_and_determinism(tmp_path, shapes):
    for path in ("train2017", "val2017", "annotations/instances_train2017.json", "annotations/instances_val2017.json"):
        assert os.path.exists(os.path.join(shapes, path)), path
    again = make_shapes_dataset(str(tmp_path / "again"), num_train=8, num_val=8)
    other = make_shapes_dataset(str(tmp_path / "other"), num_train=8, num_val=8, seed=1)
    for split in ("train2017", "val2017"):
        assert not filecmp.dircmp(os.path.join(shapes, split), os.path.join(again, split)).diff_files
    val = "annotations/instances_val2017.json"
    assert filecmp.cmp(os.path.join(shapes, val), os.path.join(again, val), shallow=False)
    assert not filecmp.cmp(os.path.join(shapes, val), os.path.join(other, val), shallow=False)

    with open(os.path.join(shapes, "annotations/instances_train2017.json")) as f:
        data = json.load(f)
    assert [c["name"] for c in data["categories"]] == [name for name, _ in CATEGORIES]
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=9)[1:]
    assert len(data["images"]) == 8 and per_image.min() >= 1 and per_image.max() <= 3
    for ann in data["annotations"]:
        assert ann["iscrowd"] == 0 and ann["area"] > 300  # big enough to learn in a short CPU run


def test_cli_writes_the_set(tmp_path):
    root = tmp_path / "cli"
    command = [sys.executable, "-m", "det.synthetic_shapes", str(root), "--num-train", "2", "--num-val", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert len(os.listdir(root / "train2017")) == 2 and len(os.listdir(root / "val2017")) == 1


def test_targets_of_synthetic_set(shapes):
    dataset = shapes_split(shapes, "train2017", train=True)
    assert len(dataset) == 8 and dataset.num_classes == 4
    assert dataset.category_id_to_label == {1: 1, 2: 2, 3: 3}
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 96, 128) and 0 <= image.min() and image.max() <= 1
    k = len(target["boxes"])
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (k, 4)
    assert target["labels"].dtype == torch.int64 and target["masks"].dtype == torch.uint8 and target["masks"].shape == (k, 96, 128)
    assert target["image_id"].dtype == torch.int64 and target["image_id"].dim() == 0
    assert target["area"].shape == (k,) and target["iscrowd"].tolist() == [0] * k
    for box, mask, label, area in zip(target["boxes"], target["masks"], target["labels"], target["area"]):
        # The mask covers its box (to a pixel), has the annotated area, and its pixels have the category's colour.
        assert np.allclose(mask_extent(mask), box.tolist(), atol=1.0)
        assert int(mask.sum()) == pytest.approx(float(area), abs=1)
        mean_rgb = image[:, mask.bool()].mean(dim=1) * 255
        assert torch.allclose(mean_rgb, torch.tensor(CATEGORIES[int(label) - 1][1], dtype=torch.float32), atol=25)


# ---------------------------------------------------------------------------------------------- evaluation


def test_default_loader_gives_the_samples_of_torchvisions_pil_loader(shapes):
    """The loader without pil_loader's copy changes no pixel, target or flip of the training pipeline."""
    dataset = shapes_split(shapes, "train2017", train=True, transforms=build_transforms(train=True))
    seeded = SeededDataset(dataset, seed=5)
    now = [seeded[(0, i)] for i in range(4)]
    dataset.loader = pil_loader
    before = [seeded[(0, i)] for i in range(4)]
    for (image, target), (image_before, target_before) in zip(now, before):
        assert torch.equal(image, image_before)
        assert target.keys() == target_before.keys() and all(torch.equal(target[k], target_before[k]) for k in target)


def test_decode_masks_is_the_transposed_single_decode_call(shapes):
    dataset = shapes_split(shapes, "train2017", train=True)
    for image_id in dataset.ids[:4]:
        info = dataset.coco.imgs[image_id]
        rles = [segmentation_to_rle(a["segmentation"], info["height"], info["width"]) for a in dataset.coco.imgToAnns[image_id]]
        masks = decode_masks(rles, info["height"], info["width"])
        reference = mask_utils.decode(rles).transpose(2, 0, 1)  # (H, W, K) -> (K, H, W)
        assert masks.flags.c_contiguous and masks.dtype == np.uint8 and np.array_equal(masks, reference)
    empty = decode_masks([], 7, 9)
    assert empty.shape == (0, 7, 9) and empty.dtype == np.uint8


def test_ground_truth_as_detections_scores_100_and_perturbations_lower_it(shapes):
    dataset = shapes_split(shapes)
    predictions = ground_truth_predictions(dataset)
    perfect = evaluate(dataset, predictions)
    for iou_type in ("bbox", "segm"):
        assert perfect[iou_type]["AP"] == pytest.approx(100) and perfect[iou_type]["AP50"] == pytest.approx(100)

    shifted, dropped = {}, {}
    for n, (image_id, p) in enumerate(predictions.items()):
        boxes, masks = p["boxes"].clone(), p["masks"].clone()
        if n % 2 == 0:  # half of the images: boxes moved right by half their width (IoU 1/3)
            boxes[:, [0, 2]] += (boxes[:, 2:3] - boxes[:, 0:1]) / 2
        else:  # the other half: masks erased
            masks.zero_()
        shifted[image_id] = dict(p, boxes=boxes)
        dropped[image_id] = dict(p, masks=masks)
    box_hit = evaluate(dataset, shifted)
    assert box_hit["bbox"]["AP"] < 90 and box_hit["bbox"]["AP50"] < 90
    assert box_hit["segm"]["AP"] == pytest.approx(100)  # the two IoU types are scored independently
    mask_hit = evaluate(dataset, dropped)
    assert mask_hit["segm"]["AP"] < 90 and mask_hit["bbox"]["AP"] == pytest.approx(100)


def test_evaluator_without_detections_reports_zero(shapes, capsys):
    dataset = shapes_split(shapes)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 96, 128)}
    metrics = evaluate(dataset, {image_id: empty for image_id in dataset.ids})
    assert metrics == {t: {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0} for t in ("bbox", "segm")}
    assert "IoU metric: bbox" in capsys.readouterr().out
    assert evaluate(dataset, {}, ("bbox",))["bbox"]["AP"] == 0.0


def test_evaluator_counts_a_repeated_image_once(shapes):
    dataset = shapes_split(shapes)
    predictions = ground_truth_predictions(dataset)
    evaluator = CocoEvaluator(dataset.coco, ("bbox", "segm"), dataset.label_to_category_id)
    before = {i: {k: v.clone() for k, v in p.items()} for i, p in predictions.items()}
    first = dataset.ids[0]
    evaluator.update({first: predictions[first]})  # "rank 0"
    evaluator.update(predictions)  # "rank 1" saw the same image again (sampler padding)
    evaluator.synchronize()
    # The predictions are read, never modified (the same tensors were converted twice above).
    assert all(torch.equal(predictions[i][k], before[i][k]) for i in predictions for k in before[i])
    assert sorted(evaluator.results["bbox"]) == sorted(dataset.ids)
    # Counted twice, the second copy of each box would be a false positive at full score.
    metrics = evaluator.evaluate()
    assert metrics["bbox"]["AP"] == pytest.approx(100) and metrics["segm"]["AP"] == pytest.approx(100)


def test_evaluator_only_scores_the_images_it_saw(shapes):
    dataset = shapes_split(shapes)
    predictions = ground_truth_predictions(dataset)
    half = {i: predictions[i] for i in dataset.ids[:4]}
    assert evaluate(dataset, half)["bbox"]["AP"] == pytest.approx(100)


def test_results_file_is_coco_results_json_that_pycocotools_loads(shapes, tmp_path):
    """The ground truth as detections of a subset of the images, written as coco_instances_results.json: pycocotools
    loads it, and COCOeval of the loaded file scores those images 100 (boxes; masks without the box field)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from mabn.engine.sampling import evaluation_subset

    dataset = shapes_split(shapes)
    subset = dataset.subset(evaluation_subset(len(dataset), 3))
    assert len(subset) == 3 and subset.ids == [dataset.ids[0], dataset.ids[2], dataset.ids[5]] and len(dataset) == 8
    predictions = ground_truth_predictions(subset)
    evaluator = CocoEvaluator(subset.coco, ("bbox", "segm"), subset.label_to_category_id)
    evaluator.update(predictions)
    evaluator.synchronize()
    path = write_json_atomically(evaluator.instances(), str(tmp_path / "inference" / "coco_instances_results.json"))
    ground_truth = COCO(os.path.join(shapes, "annotations", "instances_val2017.json"))
    loaded = ground_truth.loadRes(path)
    assert len(loaded.anns) == sum(len(p["boxes"]) for p in predictions.values()) > 0
    assert {ann["image_id"] for ann in loaded.anns.values()} == set(subset.ids)
    for iou_type in ("bbox", "segm"):
        detections = json.loads(open(path).read())
        if iou_type == "segm":  # with a box, loadRes would take its area for the size buckets (detectron2 drops it too)
            detections = [{k: v for k, v in d.items() if k != "bbox"} for d in detections]
        coco_eval = COCOeval(ground_truth, ground_truth.loadRes(detections), iou_type)
        coco_eval.params.imgIds = subset.ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        assert coco_eval.stats[0] == pytest.approx(1.0), iou_type


def test_evaluator_merges_ranks_with_all_gather(shapes, tmp_path):
    # Rank 1 is a spawned process (fork can deadlock once torch's thread pools have run), rank 0 is this one:
    # a single fresh interpreter keeps the test fast on two cores.
    args = (2, str(tmp_path / "init"), shapes, str(tmp_path))
    rank1 = mp.get_context("spawn").Process(target=evaluate_on_two_ranks, args=(1, *args))
    rank1.start()
    try:
        evaluate_on_two_ranks(0, *args)
    finally:
        rank1.join(timeout=60)
    assert rank1.exitcode == 0
    ranks = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    assert ranks[0] == ranks[1]  # rank 0's metrics are broadcast
    assert ranks[0]["num_images"] == 8  # two images were on both ranks
    assert ranks[0]["metrics"]["bbox"]["AP"] == pytest.approx(100) and ranks[0]["metrics"]["segm"]["AP"] == pytest.approx(100)


def test_write_json_is_atomic_and_has_headlines(tmp_path):
    results = {"bbox": {"AP": 41.0, "AP50": 60.0, "AP75": 44.0, "APs": 20.0, "APm": 45.0, "APl": 55.0},
               "segm": {"AP": 37.0, "AP50": 58.0, "AP75": 39.0, "APs": 17.0, "APm": 40.0, "APl": 53.0}}
    path = tmp_path / "out" / "metrics.json"
    path.parent.mkdir()
    path.write_text("stale")
    write_json(results, str(path))
    with open(path) as f:
        written = json.load(f)
    assert (written["box_AP"], written["box_AP50"], written["box_AP75"]) == (41.0, 60.0, 44.0)
    assert (written["mask_AP"], written["mask_AP50"], written["mask_AP75"]) == (37.0, 58.0, 39.0)
    assert written["bbox"] == results["bbox"] and written["segm"] == results["segm"]
    assert os.listdir(path.parent) == ["metrics.json"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------- labelme's real set


@pytest.mark.skipif(not os.path.isdir(LABELME), reason="Debian package labelme-examples is not installed")
def test_labelme_coco_set():
    dataset = CocoDetection(LABELME, os.path.join(LABELME, "annotations.json"), train=False)
    # Category 0 (_background_) is a category like any other for the mapping: label 0 stays the background.
    assert dataset.num_classes == 22 and dataset.category_id_to_label[0] == 1 and dataset.label_to_category_id[16] == 15
    assert dataset.ids == [0, 1, 2] and len(dataset) == 3
    assert [dataset.get_height_and_width(i) for i in range(3)] == [(338, 500), (375, 500), (375, 500)]
    assert aspect_ratio_group_ids(dataset) == [0, 0, 0]

    instances = 0
    for idx in range(3):
        image, target = dataset[idx]
        assert image.shape == (3, *dataset.get_height_and_width(idx))
        anns = dataset.coco.imgToAnns[dataset.ids[idx]]
        instances += len(target["masks"])
        assert [dataset.label_to_category_id[int(label)] for label in target["labels"]] == [a["category_id"] for a in anns]
        for mask, ann in zip(target["masks"], anns):
            # Shoelace area of the polygons (several for occluded objects) against the rasterised mask.
            polygon_area = sum(0.5 * abs(np.dot(p[0::2], np.roll(p[1::2], 1)) - np.dot(p[1::2], np.roll(p[0::2], 1)))
                               for p in ann["segmentation"])
            assert int(mask.sum()) == pytest.approx(polygon_area, rel=0.03)
            assert int(mask.sum()) == pytest.approx(ann["area"], rel=0.08)
    assert instances == 12

    assert len(CocoDetection(LABELME, os.path.join(LABELME, "annotations.json"), train=True)) == 3
    # Annotation ids start at 0 here, which COCOeval would read as "unmatched": the evaluator renumbers them.
    metrics = evaluate(dataset, ground_truth_predictions(dataset))
    assert metrics["bbox"]["AP"] == pytest.approx(100) and metrics["segm"]["AP"] == pytest.approx(100)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field,value,message", [
    ("bbox", [1, 2, 3], "bbox must be 4 finite numbers"),
    ("bbox", [1, 2, float("nan"), 3], "bbox must be 4 finite numbers"),
    ("bbox", [1, 2, "3", 4], "bbox must be 4 finite numbers"),
    ("bbox", [1, 2, -3, 4], "negative width or height"),
    ("category_id", 99, "category id 99 is not in 'categories'"),
    ("image_id", 42, "image id 42 is not in 'images'"),
    ("segmentation", [[1, 2, 3, 4]], "at least 6 coordinates"),
    ("segmentation", [[1, 2, 3, 4, 5, 6, 7]], "at least 6 coordinates"),
    ("segmentation", [], "empty polygon list"),
    ("segmentation", "polygon", "polygon list or an RLE dict"),
    ("segmentation", {"counts": "abc"}, "'counts' and 'size'"),
    ("segmentation", {"counts": [0, 10], "size": [5, 5]}, "is not the image's"),
], ids=lambda v: str(v)[:24])
def test_malformed_annotation_names_file_and_id(tmp_path, field, value, message):
    bad = annotation(7, 1, 5, 5, 10)
    bad[field] = value
    image_dir, annotation_file = write_coco(tmp_path, [annotation(1, 1, 20, 5, 10), bad])
    with pytest.raises(ValueError, match=message) as error:
        CocoDetection(image_dir, annotation_file)
    assert f"{annotation_file}: annotation id 7:" in str(error.value)


def test_crowd_segmentation_is_checked_only_when_decoded(tmp_path):
    crowd = annotation(7, 1, 5, 5, 10, iscrowd=1, segmentation={"counts": [0, 10]})
    image_dir, annotation_file = write_coco(tmp_path, [annotation(1, 1, 20, 5, 10), crowd])
    assert len(CocoDetection(image_dir, annotation_file, train=True)[0][1]["boxes"]) == 1
    with pytest.raises(ValueError, match="annotation id 7"):
        CocoDetection(image_dir, annotation_file, train=False)[0]


def test_missing_files_are_named(tmp_path):
    image_dir, annotation_file = write_coco(tmp_path, [annotation(1, 1, 5, 5, 10)])
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(image_dir, missing)
    with pytest.raises(FileNotFoundError, match="no_images"):
        CocoDetection(str(tmp_path / "no_images"), annotation_file)
    dataset = CocoDetection(image_dir, annotation_file)
    os.remove(os.path.join(image_dir, "1.png"))
    with pytest.raises(FileNotFoundError, match="1.png"):
        dataset[0]


def test_image_size_must_match_the_annotation(tmp_path):
    image_dir, annotation_file = write_coco(tmp_path, [annotation(1, 1, 5, 5, 10)])
    from PIL import Image

    Image.new("RGB", (WIDTH + 1, HEIGHT)).save(os.path.join(image_dir, "1.png"))
    with pytest.raises(ValueError, match="1.png"):
        CocoDetection(image_dir, annotation_file)[0]


# ---------------------------------------------------------------------------------------------- train / eval filtering


def test_crowds_empty_images_and_degenerate_boxes(tmp_path):
    crowd_mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    crowd_mask[2:12, 30:50] = 1
    compressed = mask_utils.encode(np.asfortranarray(crowd_mask))
    compressed["counts"] = compressed["counts"].decode()
    # Uncompressed RLE as COCO stores crowds: column-major run lengths starting with zeros.
    flat = crowd_mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    uncompressed = {"counts": np.diff(np.concatenate([[0], changes])).tolist(), "size": [HEIGHT, WIDTH]}
    anns = [
        annotation(1, 1, 5, 5, 10),
        annotation(2, 1, 30, 2, 20, iscrowd=1, bbox=[30, 2, 20, 10], segmentation=uncompressed),
        annotation(3, 1, 10, 20, 0),  # zero width and height
        annotation(4, 1, 70, 5, 10),  # entirely right of the image: nothing left after clipping
        annotation(5, 2, 30, 2, 20, iscrowd=1, bbox=[30, 2, 20, 10], segmentation=compressed),  # image 2: only a crowd
        annotation(6, 4, 50, 30, 20),  # image 4: a box reaching out of the image, clipped
        annotation(7, 4, 0, 0, 20, bbox=[0, 0, 20, 20], segmentation=compressed),  # non-crowd compressed RLE
    ]  # image 3: no annotation at all
    image_dir, annotation_file = write_coco(tmp_path, anns, num_images=4)

    train = CocoDetection(image_dir, annotation_file, train=True)
    assert train.ids == [1, 4]
    _, target = train[0]
    assert target["boxes"].tolist() == [[5, 5, 15, 15]] and target["iscrowd"].tolist() == [0]
    _, target = train[1]
    assert target["boxes"].tolist() == [[50, 30, WIDTH, HEIGHT], [0, 0, 20, 20]]
    assert torch.equal(target["masks"][1], torch.from_numpy(crowd_mask))

    evaluation = CocoDetection(image_dir, annotation_file, train=False)
    assert evaluation.ids == [1, 2, 3, 4]
    _, target = evaluation[0]
    assert target["iscrowd"].tolist() == [0, 1] and torch.equal(target["masks"][1], torch.from_numpy(crowd_mask))
    _, target = evaluation[1]
    assert target["iscrowd"].tolist() == [1] and torch.equal(target["masks"][0], torch.from_numpy(crowd_mask))
    _, target = evaluation[2]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, HEIGHT, WIDTH) and target["labels"].shape == (0,)


# ---------------------------------------------------------------------------------------------- transforms


def test_horizontal_flip_moves_boxes_with_masks(shapes):
    image, target = shapes_split(shapes)[0]
    flipped_image, flipped = RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    width = image.shape[-1]
    assert torch.allclose(flipped["boxes"][:, [0, 2]], width - target["boxes"][:, [2, 0]])
    assert torch.equal(flipped["boxes"][:, [1, 3]], target["boxes"][:, [1, 3]])
    for box, mask in zip(flipped["boxes"], flipped["masks"]):
        assert np.allclose(mask_extent(mask), box.tolist(), atol=1.0)
    back_image, back = hflip(flipped_image, flipped)
    assert torch.equal(back_image, image) and torch.equal(back["masks"], target["masks"])
    assert torch.allclose(back["boxes"], target["boxes"])
    assert torch.equal(RandomHorizontalFlip(p=0.0)(image, target)[1]["boxes"], target["boxes"])


def test_train_transforms_flip_about_half_the_time(shapes):
    dataset = shapes_split(shapes, transforms=build_transforms(train=True))
    plain = shapes_split(shapes, transforms=build_transforms(train=False))[0][0]
    torch.manual_seed(0)
    flips = sum(torch.equal(dataset[0][0], plain.flip(-1)) for _ in range(40))
    assert 10 <= flips <= 30


# ---------------------------------------------------------------------------------------------- batching


def check_grouped_batches(batches, group_ids, batch_size):
    for batch in batches:
        assert 0 < len(batch) <= batch_size and len({group_ids[i] for i in batch}) == 1


def test_grouped_batches_cover_every_index_once():
    group_ids = torch.randint(0, 2, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = GroupedBatchSampler(RandomSampler(range(23)), group_ids, batch_size=4)
    for _ in range(3):  # a fresh order each epoch, the same guarantees
        batches = list(sampler)
        check_grouped_batches(batches, group_ids, 4)
        assert sorted(i for b in batches for i in b) == list(range(23))
        assert len(batches) == len(sampler) == sum(math.ceil(group_ids.count(g) / 4) for g in (0, 1))


def test_grouped_batches_have_the_same_count_on_every_rank():
    group_ids = [0] * 11 + [1] * 9
    padded_epochs = 0
    for epoch in range(6):
        per_rank, unpadded = [], set()
        for rank in range(3):
            sampler = DistributedSampler(range(20), num_replicas=3, rank=rank, seed=0)
            sampler.set_epoch(epoch)
            batched = GroupedBatchSampler(sampler, group_ids, batch_size=4)
            batches = list(batched)
            check_grouped_batches(batches, group_ids, 4)
            assert len(batches) == len(batched)
            # Each of the rank's indices is in a batch; extra batches only repeat its own indices.
            assert {i for b in batches for i in b} == set(sampler)
            unpadded.add(sum(math.ceil([group_ids[i] for i in sampler].count(g) / 4) for g in (0, 1)))
            per_rank.append(batches)
        assert len({len(b) for b in per_rank}) == 1  # otherwise DDP would hang at the epoch's end
        assert {i for batches in per_rank for b in batches for i in b} == set(range(20))
        padded_epochs += len(unpadded) > 1
    assert padded_epochs > 0  # the case that needs padding did occur


def test_aspect_ratio_groups_and_collate(tmp_path):
    class Sizes:
        sizes = [(40, 60), (60, 40), (50, 50)]

        def __len__(self):
            return len(self.sizes)

        def get_height_and_width(self, idx):
            return self.sizes[idx]

    assert aspect_ratio_group_ids(Sizes()) == [0, 1, 0]
    images, targets = collate_fn([(torch.zeros(3, 4, 5), {"a": 1}), (torch.zeros(3, 6, 5), {"a": 2})])
    assert isinstance(images, list) and [t["a"] for t in targets] == [1, 2]


def test_data_loader_end_to_end(shapes):
    dataset = shapes_split(shapes, "train2017", train=True, transforms=build_transforms(train=True))
    sampler = GroupedBatchSampler(RandomSampler(dataset), aspect_ratio_group_ids(dataset), batch_size=3)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn)
    seen = [int(t["image_id"]) for images, targets in loader for t in targets]
    assert sorted(seen) == sorted(dataset.ids) and len(loader) == 3
    assert as_prediction(dataset[0][1])["masks"].shape[1] == 1
