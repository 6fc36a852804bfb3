#!/usr/bin/env python
"""COCO Mask R-CNN R50-FPN with the normalization of your choice: MABN, BN, BRN, SyncBN, GN or frozen BN.

    torchrun --nproc_per_node=8 det/train.py --config configs/det/scratch_mabn_2.yaml DATA.ROOT /data/coco
    torchrun --nproc_per_node=8 det/train.py --config configs/det/scratch_mabn_2.yaml --test-only MODEL.WEIGHTS runs/x/model_final.pth
    python det/train.py --config configs/det/shapes/mabn_2.yaml                # one process, CPU, generated shapes

Training is iteration-based (``SOLVER.MAX_ITER`` iterations of ``SOLVER.IMS_PER_GPU`` images per process,
aspect-ratio grouped), evaluated with pycocotools (box and mask AP). Trailing ``KEY VALUE`` pairs override
the config. A run resumes from ``OUTPUT_DIR/checkpoint.pth`` when one exists (or from ``--resume PATH``),
exactly where it stopped. Everything a run writes goes to ``OUTPUT_DIR``: ``config.yaml`` (the resolved
config), ``log.txt`` (with the COCO AP tables), ``tensorboard/``, ``checkpoint.pth``, ``metrics.json``
(box / mask AP, AP50, AP75 of the latest evaluation), ``inference/coco_instances_results.json`` (its
detections, as detectron2 writes them) and finally ``model_final.pth``; ``--test-only`` writes ``eval.json``.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from dataclasses import asdict, dataclass

if __package__ in (None, ""):  # run as a script (torchrun det/train.py): the repository root holds det/ and mabn/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler, Sampler, Subset

from det.backbone_weights import BODY_PREFIX, load_backbone_weights
from det.coco import CocoDetection
from det.config import get_default_config
from det.evaluation import IOU_TYPES, CocoEvaluator, write_json, write_json_atomically
from det.model import NO_NORM, build_mask_rcnn
from det.sampler import GroupedBatchSampler, aspect_ratio_group_ids, collate_fn
from det.transforms import build_transforms
from mabn.engine.checkpoint import Checkpointer, load_pretrained, load_weights, resume_path
from mabn.engine.config import CfgNode, ConfigError
from mabn.engine.distributed import DistInfo, all_finite, all_reduce_sum, average_norm_statistics, wrap_ddp
from mabn.engine.launch import NonFiniteLossError, autocast, run
from mabn.engine.image_files import ImageFileError, check_image_files
from mabn.engine.logger import RunLogger, progress_bar
from mabn.engine.output_dir import METRICS_FILE
from mabn.engine.sampling import SeededDataset, evaluation_subset, shard_indices
from mabn.engine.solver import LRSchedule, build_scheduler, build_sgd, linear_scaled_lr
from mabn.layers.registry import NORMS, is_norm

RESULTS_FILE = os.path.join("inference", "coco_instances_results.json")  # under OUTPUT_DIR, where detectron2 writes it

# The lines of COCOeval's output worth keeping in the log: the 12-line AP / AR table of each IoU type.
TABLE_LINES = ("IoU metric", " Average Precision", " Average Recall", "no detections")


def check_config(cfg: CfgNode, test_only: bool = False) -> None:
    """Cross-key constraints that types and ranges (det/config.py) cannot express; each error names the keys involved."""
    m, s, d = cfg.MODEL, cfg.SOLVER, cfg.DATA
    if m.HEAD_NORM is not None and m.HEAD_NORM != NO_NORM and m.HEAD_NORM not in NORMS:
        raise ConfigError(f"MODEL.HEAD_NORM {m.HEAD_NORM!r} must be {NO_NORM!r} or one of {', '.join(NORMS)}")
    if m.BACKBONE_WEIGHTS and m.WEIGHTS:
        raise ConfigError("set MODEL.BACKBONE_WEIGHTS (ImageNet body) or MODEL.WEIGHTS (whole detector), not both")
    if m.NORM == "frozenbn" and not (m.BACKBONE_WEIGHTS or m.WEIGHTS or test_only):
        raise ConfigError("MODEL.NORM frozenbn keeps pretrained statistics: set MODEL.BACKBONE_WEIGHTS (or MODEL.WEIGHTS)")
    if len(d.TRAIN_IMAGES) != len(d.TRAIN_ANNOTATIONS) or not d.TRAIN_IMAGES:
        raise ConfigError(f"DATA.TRAIN_IMAGES ({len(d.TRAIN_IMAGES)} entries) and DATA.TRAIN_ANNOTATIONS "
                          f"({len(d.TRAIN_ANNOTATIONS)}) must pair up, at least one set")
    if list(s.STEPS) != sorted(s.STEPS) or any(step <= 0 for step in s.STEPS):
        raise ConfigError(f"SOLVER.STEPS must be increasing positive iterations, got {list(s.STEPS)}")


# ----------------------------------------------------------------------------- data
def data_path(cfg: CfgNode, path: str) -> str:
    return os.path.join(cfg.DATA.ROOT, path)  # an absolute path stays as it is


def coco_set(cfg: CfgNode, images_key: str, annotations_key: str, index: int | None, train: bool) -> CocoDetection:
    """One COCO-format set; a missing or malformed file becomes a ConfigError naming the key and the file."""
    images, annotations = cfg.DATA[images_key], cfg.DATA[annotations_key]
    if index is not None:
        images, annotations = images[index], annotations[index]
        images_key, annotations_key = f"{images_key}[{index}]", f"{annotations_key}[{index}]"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' loading chatter
            return CocoDetection(data_path(cfg, images), data_path(cfg, annotations), build_transforms(train), train)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"DATA.{images_key} / DATA.{annotations_key} (DATA.ROOT {cfg.DATA.ROOT!r}): {e}") from None


def check_categories(reference: CocoDetection, other: CocoDetection) -> None:
    if other.label_to_category_id != reference.label_to_category_id:
        raise ConfigError(f"{other.annotation_file} and {reference.annotation_file} have different categories; "
                          "every training set and the validation set must share one category list")


def build_val_set(cfg: CfgNode) -> CocoDetection:
    val_set = coco_set(cfg, "VAL_IMAGES", "VAL_ANNOTATIONS", None, train=False)
    return val_set.subset(evaluation_subset(len(val_set), cfg.TEST.MAX_IMAGES)) if cfg.TEST.MAX_IMAGES else val_set


def check_val_images(cfg: CfgNode, info: DistInfo, val_set: CocoDetection) -> None:
    """Every validation image this rank will evaluate exists, has a readable header and the annotated size, checked
    before training: a broken one found at the final evaluation would cost the whole run."""
    images = [val_set.coco.imgs[val_set.ids[i]] for i in shard_indices(len(val_set), info.rank, info.world_size)]
    try:
        check_image_files((os.path.join(val_set.image_dir, image["file_name"]) for image in images),
                          f"DATA.VAL_IMAGES ({val_set.annotation_file})", ((image["width"], image["height"]) for image in images))
    except ImageFileError as e:
        raise ConfigError(str(e)) from None


def build_train_set(cfg: CfgNode, val_set: CocoDetection) -> tuple[torch.utils.data.Dataset, list[int]]:
    """The training sets, concatenated, and the aspect-ratio group of every image."""
    parts = [coco_set(cfg, "TRAIN_IMAGES", "TRAIN_ANNOTATIONS", i, train=True) for i in range(len(cfg.DATA.TRAIN_IMAGES))]
    group_ids = []
    for part in parts:
        check_categories(val_set, part)
        if len(part) == 0:
            raise ConfigError(f"{part.annotation_file} has no image with a usable (non-crowd, non-empty) annotation")
        group_ids += aspect_ratio_group_ids(part)
    return (parts[0] if len(parts) == 1 else ConcatDataset(parts)), group_ids


class ResumableGroupedBatches(Sampler):
    """The aspect-ratio grouped batches of one epoch, from any batch on, as lists of ``(epoch, index)`` keys.

    The order is a function of (seed, epoch, rank) alone: ``DistributedSampler`` shuffles with ``seed + epoch``
    and :class:`det.sampler.GroupedBatchSampler` groups deterministically, so a resumed run recomputes the
    epoch and skips the batches it has trained on.
    """

    def __init__(self, group_ids: list[int], batch_size: int, rank: int, world_size: int, seed: int):
        self.shuffled = DistributedSampler(group_ids, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.grouped = GroupedBatchSampler(self.shuffled, group_ids, batch_size)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        self.shuffled.set_epoch(epoch)

    def batches_per_epoch(self) -> int:
        return len(self.grouped)  # the same on every rank (GroupedBatchSampler pads the shorter shards)

    def __iter__(self):
        for i, batch in enumerate(self.grouped):
            if i >= self.start_batch:
                yield [(self.epoch, index) for index in batch]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)


def loader_generator(cfg: CfgNode, info: DistInfo) -> torch.Generator:
    # Each DataLoader iterator draws a worker base seed; from its own generator, not from the global one the
    # model uses, so that starting an epoch (or resuming mid-epoch) does not shift the model's random numbers.
    return torch.Generator().manual_seed(cfg.SEED * 1_000_003 + info.rank)


def build_train_loader(cfg: CfgNode, info: DistInfo, train_set, group_ids: list[int]):
    batches = ResumableGroupedBatches(group_ids, cfg.SOLVER.IMS_PER_GPU, info.rank, info.world_size, cfg.SEED)
    workers = cfg.DATA.WORKERS
    loader = DataLoader(
        SeededDataset(train_set, cfg.SEED), batch_sampler=batches, collate_fn=collate_fn, num_workers=workers,
        pin_memory=info.device.type == "cuda", persistent_workers=workers > 0, generator=loader_generator(cfg, info),
    )
    return batches, loader


def build_val_loader(cfg: CfgNode, info: DistInfo, val_set: CocoDetection) -> DataLoader:
    """Rank r evaluates images r, r + world_size, ...: each image exactly once over all ranks."""
    return DataLoader(
        Subset(val_set, shard_indices(len(val_set), info.rank, info.world_size)), batch_size=cfg.TEST.IMS_PER_GPU,
        shuffle=False, collate_fn=collate_fn, num_workers=cfg.DATA.WORKERS, pin_memory=info.device.type == "cuda",
        generator=loader_generator(cfg, info),
    )


# ----------------------------------------------------------------------------- model
MUST_MATCH = "MODEL.NORM, HEAD_NORM, CENTERED_CONVS and the categories"  # for a checkpoint to load into the model this config builds
# MODEL.WEIGHTS, which training starts from (a detector of this trainer or torchvision's), must provide the whole body
FINETUNE_MUST_MATCH = "its ResNet-50 body must load; FPN, RPN and RoI heads load where names and shapes match"


def build_model(cfg: CfgNode, num_classes: int) -> nn.Module:
    m = cfg.MODEL
    rpn, roi = m.RPN, m.ROI_HEADS
    try:
        return build_mask_rcnn(
            num_classes, m.NORM, dict(m.NORM_OPTIONS), m.CENTERED_CONVS, m.HEAD_NORM, m.MIN_SIZE, m.MAX_SIZE,
            m.TRAINABLE_BACKBONE_LAYERS, dict(m.HEAD_NORM_OPTIONS),
            rpn_pre_nms_top_n_train=rpn.PRE_NMS_TOP_N_TRAIN, rpn_pre_nms_top_n_test=rpn.PRE_NMS_TOP_N_TEST,
            rpn_post_nms_top_n_train=rpn.POST_NMS_TOP_N_TRAIN, rpn_post_nms_top_n_test=rpn.POST_NMS_TOP_N_TEST,
            rpn_nms_thresh=rpn.NMS_THRESH, rpn_fg_iou_thresh=rpn.FG_IOU_THRESH, rpn_bg_iou_thresh=rpn.BG_IOU_THRESH,
            rpn_batch_size_per_image=rpn.BATCH_SIZE_PER_IMAGE, rpn_positive_fraction=rpn.POSITIVE_FRACTION,
            box_batch_size_per_image=roi.BATCH_SIZE_PER_IMAGE, box_positive_fraction=roi.POSITIVE_FRACTION,
            box_fg_iou_thresh=roi.FG_IOU_THRESH, box_bg_iou_thresh=roi.BG_IOU_THRESH,
            box_score_thresh=roi.SCORE_THRESH_TEST, box_nms_thresh=roi.NMS_THRESH_TEST,
            box_detections_per_img=roi.DETECTIONS_PER_IMG,
            stride_in_1x1=m.RESNETS.STRIDE_IN_1X1, head_init=m.HEAD_INIT,
            rpn_smooth_l1_beta=rpn.SMOOTH_L1_BETA, box_smooth_l1_beta=roi.SMOOTH_L1_BETA,
            rpn_post_nms_per_batch=rpn.POST_NMS_PER_BATCH, rpn_straddle_thresh=rpn.STRADDLE_THRESH,
            input_format=m.INPUT_FORMAT,
        )
    except ValueError as e:  # an unknown norm option, a channel count GN cannot split, ...
        raise ConfigError(f"MODEL.NORM {m.NORM!r} / MODEL.HEAD_NORM / MODEL.NORM_OPTIONS {dict(m.NORM_OPTIONS)} / "
                          f"MODEL.HEAD_NORM_OPTIONS {dict(m.HEAD_NORM_OPTIONS)}: {e}") from None


def load_backbone(model: nn.Module, path: str, log: RunLogger) -> None:
    try:
        report = load_backbone_weights(model, path)
    except (RuntimeError, ValueError) as e:  # unreadable file, keys or shapes that do not fit the body
        raise ConfigError(f"MODEL.BACKBONE_WEIGHTS: {e}") from None
    groups: dict[str, int] = {}
    for key in report["new"]:
        prefix = ".".join(key.split(".")[:2])
        groups[prefix] = groups.get(prefix, 0) + 1
    log.info(f"backbone weights {path}: {len(report['loaded'])} body tensors loaded; "
             f"{len(report['reset'])} norm progress buffers restarted; new (initialized here): "
             + ", ".join(f"{prefix} ({n})" for prefix, n in groups.items()))


def frozen_norms(model: nn.Module) -> list[nn.Module]:
    """Norms of the body stages left out of training (TRAINABLE_BACKBONE_LAYERS < 5): they must stay in eval
    mode, or BN / MABN would keep updating statistics that no longer match their frozen affine parameters."""
    return [module for module in model.backbone.body.modules()
            if is_norm(module) and not any(p.requires_grad for p in module.parameters())]


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, val_set: CocoDetection, cfg: CfgNode, info: DistInfo,
             log: RunLogger, show: bool) -> dict:
    """COCO box and mask metrics (percent) of the whole validation set, each rank predicting its shard."""
    model.eval()
    evaluator = CocoEvaluator(val_set.coco, IOU_TYPES, val_set.label_to_category_id)
    for images, targets in progress_bar(loader, show, total=len(loader), desc="eval"):
        images = [image.to(info.device, non_blocking=True) for image in images]
        with autocast(cfg.SOLVER.AMP, info.device):
            outputs = model(images)
        # float32 on the CPU, whatever autocast produced on the device
        outputs = [{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in o.items()} for o in outputs]
        evaluator.update({int(t["image_id"]): o for t, o in zip(targets, outputs)})
    evaluator.synchronize()
    if len(evaluator.results["bbox"]) != len(val_set):
        raise RuntimeError(f"evaluated {len(evaluator.results['bbox'])} images, expected {len(val_set)}")
    if info.is_main:  # every detection, for test-dev submissions and error analysis
        write_json_atomically(evaluator.instances(), os.path.join(cfg.OUTPUT_DIR, RESULTS_FILE))
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        metrics = evaluator.evaluate()
    table = [line for line in output.getvalue().splitlines() if line.startswith(TABLE_LINES)]
    log.info(f"COCO evaluation of {len(val_set)} images ({val_set.annotation_file}):\n" + "\n".join(table))
    return metrics


def num_classes(cfg: CfgNode, dataset: CocoDetection) -> int:
    """MODEL.NUM_CLASSES, or the categories of the annotations + background, which it must equal if set."""
    if cfg.MODEL.NUM_CLASSES not in (None, dataset.num_classes):
        raise ConfigError(f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES} but {dataset.annotation_file} has "
                          f"{dataset.num_classes - 1} categories + background")
    return dataset.num_classes


def headline(metrics: dict) -> str:
    return "  ".join(f"{t} AP {metrics[t]['AP']:.1f} AP50 {metrics[t]['AP50']:.1f} AP75 {metrics[t]['AP75']:.1f}" for t in IOU_TYPES)


# ----------------------------------------------------------------------------- train
@dataclass
class Progress:
    """What a checkpoint restores besides model, optimizer, scheduler, scaler and RNG states."""

    iter: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def build_training_model(cfg: CfgNode, info: DistInfo, log: RunLogger, num_classes_: int, resuming: bool) -> nn.Module:
    """The detector on its device, identical on every rank, from the configured weights unless a checkpoint
    (which holds everything, and whose weights have since moved) is resumed."""
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg, num_classes_).to(info.device)
    if not resuming:
        if cfg.MODEL.BACKBONE_WEIGHTS:
            load_backbone(model, cfg.MODEL.BACKBONE_WEIGHTS, log)
        if cfg.MODEL.WEIGHTS:
            load_pretrained(model, cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS", lambda key: key.startswith(BODY_PREFIX),
                            FINETUNE_MUST_MATCH, log)
    return model


def build_optimizer(cfg: CfgNode, info: DistInfo, model: nn.Module):
    """``(optimizer, lr scheduler, grad scaler, lr)``: SGD at the linearly scaled rate, step schedule with warm-up."""
    s = cfg.SOLVER
    lr = linear_scaled_lr(s.BASE_LR, s.IMS_PER_GPU * info.world_size, s.REFERENCE_BATCH)
    optimizer = build_sgd(model, lr, s.MOMENTUM, s.WEIGHT_DECAY, s.NORM_WEIGHT_DECAY,
                          bias_lr_factor=s.BIAS_LR_FACTOR, bias_weight_decay=s.WEIGHT_DECAY_BIAS)
    scheduler = build_scheduler(optimizer, LRSchedule("step", s.MAX_ITER, s.STEPS, s.GAMMA, s.WARMUP_ITERS, s.WARMUP_FACTOR))
    scaler = torch.amp.GradScaler(info.device.type, enabled=s.AMP == "fp16")
    return optimizer, scheduler, scaler, lr


def train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    model.train()
    for module in frozen:
        module.eval()


def endless_batches(batches: ResumableGroupedBatches, loader: DataLoader, progress: Progress):
    """Batches from ``(progress.epoch, progress.batch_in_epoch)`` on, epoch after epoch; the caller counts
    ``batch_in_epoch``, this moves ``epoch`` on."""
    while True:
        batches.set_epoch(progress.epoch, progress.batch_in_epoch)
        yield from loader
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0


def train_step(model: nn.Module, optimizer, scheduler, scaler, images: list, targets: list, progress: Progress,
               cfg: CfgNode, info: DistInfo) -> dict:
    """One SGD iteration; returns the detached losses."""
    images = [image.to(info.device, non_blocking=True) for image in images]
    targets = [{k: v.to(info.device, non_blocking=True) for k, v in t.items()} for t in targets]
    with autocast(cfg.SOLVER.AMP, info.device):
        losses = model(images, targets)
    loss = sum(losses.values())
    if not all_finite(loss):
        terms = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"loss is {loss.item()} at iteration {progress.iter} ({terms}); stopping.")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}


def log_window(window: dict, losses: dict, lr: float, progress: Progress, cfg: CfgNode, info: DistInfo, log: RunLogger) -> None:
    # Every rank takes part in the reduction: the logged losses are the means over all ranks.
    names = list(losses)
    values = all_reduce_sum(torch.stack([losses[k].float() for k in names])) / info.world_size
    elapsed = time.time() - window["start"]
    iter_time = elapsed / window["iters"]
    max_iter = cfg.SOLVER.MAX_ITER
    scalars = {**dict(zip(names, values.tolist())), "lr": lr, "iter_time": iter_time,
               "data_time": window["data"] / window["iters"],
               "images_per_s": window["iters"] * cfg.SOLVER.IMS_PER_GPU * info.world_size / max(elapsed, 1e-9)}
    log.scalars(scalars, progress.iter, "train/")
    eta = int(iter_time * (max_iter - progress.iter))
    terms = "  ".join(f"{k} {scalars[k]:.4f}" for k in names)
    log.info(f"iter {progress.iter}/{max_iter}  {terms}  lr {scalars['lr']:.5f}  {iter_time:.3f}s/iter "
             f"(data {scalars['data_time']:.3f}s)  eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
    window.update(iters=0, data=0.0, start=time.time())


def evaluate_and_report(model: nn.Module, loader: DataLoader, val_set: CocoDetection, progress: Progress, cfg: CfgNode,
                        info: DistInfo, log: RunLogger) -> dict:
    """Evaluate with the inference statistics of all ranks, log the tables, write ``metrics.json`` (not yet
    finished: that is written once the final model exists)."""
    if cfg.DIST.AVERAGE_NORM_STATS:
        average_norm_statistics(model)
    metrics = evaluate(model, loader, val_set, cfg, info, log, info.is_main and cfg.LOG.PROGRESS)
    log.info(f"eval at iteration {progress.iter}: {headline(metrics)}")
    for iou_type in IOU_TYPES:
        log.scalars(metrics[iou_type], progress.iter, f"val/{iou_type}/")
    if info.is_main:
        # metrics.json: box_AP, ..., mask_AP75, the bbox / segm dicts and the progress of the run
        write_metrics(metrics, progress, cfg, finished=False)
    return {**metrics, "iter": progress.iter}


def write_metrics(metrics: dict, progress: Progress, cfg: CfgNode, finished: bool) -> None:
    """``metrics.json``: box_AP, ..., mask_AP75, the bbox / segm dicts and the progress of the run."""
    write_json({**metrics, "iter": progress.iter, "max_iter": cfg.SOLVER.MAX_ITER, "finished": finished},
               os.path.join(cfg.OUTPUT_DIR, METRICS_FILE))


# what a checkpoint means: a resume that changes one of these is refused (unless CHECKPOINT.RESUME_CHANGED_CONFIG)
RESUME_MUST_MATCH = ("MODEL.NUM_CLASSES", "MODEL.NORM", "MODEL.NORM_OPTIONS", "MODEL.HEAD_NORM", "MODEL.HEAD_NORM_OPTIONS",
                     "MODEL.CENTERED_CONVS", "MODEL.TRAINABLE_BACKBONE_LAYERS", "SOLVER.IMS_PER_GPU", "SOLVER.MAX_ITER",
                     "SOLVER.STEPS", "SOLVER.WARMUP_ITERS")


def train(cfg: CfgNode, info: DistInfo, log: RunLogger, resume: str | None) -> dict:
    # data
    val_set = build_val_set(cfg)
    check_val_images(cfg, info, val_set)
    train_set, group_ids = build_train_set(cfg, val_set)
    batches, train_loader = build_train_loader(cfg, info, train_set, group_ids)
    val_loader = build_val_loader(cfg, info, val_set)
    # model and optimizer
    resume_from = resume_path(cfg.OUTPUT_DIR, resume)
    model = build_training_model(cfg, info, log, num_classes(cfg, val_set), resuming=bool(resume_from))
    frozen = frozen_norms(model)
    torch.manual_seed(cfg.SEED + 1 + info.rank)  # from here on, each rank draws its own RPN / RoI samples
    optimizer, scheduler, scaler, lr = build_optimizer(cfg, info, model)
    # resume
    checkpointer = Checkpointer(cfg, info, log, model, optimizer, scheduler, scaler, tuple(asdict(Progress())),
                                RESUME_MUST_MATCH)
    progress, metrics = Progress(), {}
    if resume_from:
        counters, metrics = checkpointer.resume(resume_from)
        progress = Progress(**counters)
    checkpointer.accept()
    ddp_model = wrap_ddp(model, info, cfg.DIST.FIND_UNUSED_PARAMETERS)

    # loop: iterate, saving and evaluating every so often; the checkpoint is written before the evaluation, so that
    # a failing evaluation never costs it (and a resumed run repeats an evaluation that did not finish)
    max_iter = cfg.SOLVER.MAX_ITER
    log.info(f"training {max_iter} iterations ({batches.batches_per_epoch()} per epoch) at lr {lr:g} "
             f"on {info.world_size} process(es) x {cfg.SOLVER.IMS_PER_GPU} images, norm {cfg.MODEL.NORM}")
    evaluation_due = lambda: cfg.TEST.EVAL_PERIOD and progress.iter % cfg.TEST.EVAL_PERIOD == 0  # noqa: E731
    if 0 < progress.iter < max_iter and evaluation_due() and metrics.get("iter") != progress.iter:
        metrics = evaluate_and_report(model, val_loader, val_set, progress, cfg, info, log)
    train_mode(ddp_model, frozen)
    window = {"iters": 0, "data": 0.0, "start": time.time()}
    end = time.time()
    if progress.iter < max_iter:
        bar = progress_bar(endless_batches(batches, train_loader, progress), info.is_main and cfg.LOG.PROGRESS,
                           total=max_iter, desc="train", initial=progress.iter)
        for images, targets in bar:
            window["data"] += time.time() - end
            lr = optimizer.param_groups[0]["lr"]  # this iteration's; the scheduler steps after it
            try:
                losses = train_step(ddp_model, optimizer, scheduler, scaler, images, targets, progress, cfg, info)
            except NonFiniteLossError as e:  # with the checkpoint that is kept, and its iteration
                raise NonFiniteLossError(f"{e} {checkpointer.last_good()}") from None
            progress.iter += 1
            progress.batch_in_epoch += 1
            window["iters"] += 1
            if progress.iter % cfg.LOG.PERIOD == 0 or progress.iter == max_iter:
                log_window(window, losses, lr, progress, cfg, info, log)
            if progress.iter >= max_iter:
                break
            evaluate_now = evaluation_due()
            save_now = cfg.CHECKPOINT.PERIOD and progress.iter % cfg.CHECKPOINT.PERIOD == 0
            if save_now:
                checkpointer.save(asdict(progress), metrics)
            if evaluate_now:
                metrics = evaluate_and_report(model, val_loader, val_set, progress, cfg, info, log)
                train_mode(ddp_model, frozen)
            if evaluate_now or save_now:  # keep their time out of the iteration times
                window.update(iters=0, data=0.0, start=time.time())
            end = time.time()
    # checkpoint, final evaluation (not when rerunning a run evaluated at this iteration), model, then (last: only
    # once everything it vouches for exists) "finished"
    checkpointer.save(asdict(progress), metrics)
    if metrics.get("iter") != progress.iter:
        metrics = evaluate_and_report(model, val_loader, val_set, progress, cfg, info, log)
        train_mode(ddp_model, frozen)
    if checkpointer.save_final(metrics):
        write_metrics(metrics, progress, cfg, finished=True)
    return metrics


def test_only(cfg: CfgNode, info: DistInfo, log: RunLogger, checkpoint: str | None) -> dict:
    path = checkpoint or cfg.MODEL.WEIGHTS
    if not path:
        raise ConfigError("--test-only needs --checkpoint PATH or MODEL.WEIGHTS")
    val_set = build_val_set(cfg)
    model = build_model(cfg, num_classes(cfg, val_set)).to(info.device)
    load_weights(model, path, "--checkpoint" if checkpoint else "MODEL.WEIGHTS", MUST_MATCH)
    metrics = evaluate(model, build_val_loader(cfg, info, val_set), val_set, cfg, info, log, info.is_main and cfg.LOG.PROGRESS)
    log.info(f"{path}: {headline(metrics)}")
    if info.is_main:
        write_json({**metrics, "checkpoint": os.path.abspath(path)}, os.path.join(cfg.OUTPUT_DIR, "eval.json"))
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run(argv, __doc__, get_default_config, check_config, train, test_only,
               metrics=[f"val/{iou_type}/AP" for iou_type in IOU_TYPES])


if __name__ == "__main__":
    raise SystemExit(main())
