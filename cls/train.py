#!/usr/bin/env python
"""Image classification with the normalization of your choice: MABN, BN, BRN, SyncBN, GN, LN or IN.

    torchrun --nproc_per_node=8 cls/train.py --config configs/cls/mabn_b2.yaml DATA.ROOT /data/imagenet
    python cls/train.py --config configs/cls/fashion_mnist/mabn_b2.yaml          # one process (CPU or GPU)
    torchrun --nproc_per_node=8 cls/train.py --config configs/cls/mabn_b2.yaml --test-only --checkpoint runs/x/model_final.pth

Trailing ``KEY VALUE`` pairs override the config (``SOLVER.BASE_LR 0.05 OUTPUT_DIR runs/x``). A run
resumes from ``OUTPUT_DIR/checkpoint.pth`` when one exists (or from ``--resume PATH``), exactly where
it stopped. Everything a run writes goes to ``OUTPUT_DIR``: ``config.yaml`` (the resolved config),
``log.txt``, ``tensorboard/``, ``checkpoint.pth``, ``metrics.json`` and finally ``model_final.pth``.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

if __package__ in (None, ""):  # run as a script (torchrun cls/train.py): the repository root holds cls/ and mabn/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from cls import transforms as T
from cls.config import get_default_config
from cls.datasets import ImageFolderDataset, build_dataset
from cls.models import build_classifier
from mabn.batch_statistics import BatchStatisticsRecorder
from mabn.engine.checkpoint import Checkpointer, NonFiniteModelError, load_pretrained, load_weights, resume_path
from mabn.engine.config import CfgNode, ConfigError
from mabn.engine.distributed import DistInfo, all_finite, all_reduce_sum, average_norm_statistics, wrap_ddp
from mabn.engine.launch import NonFiniteLossError, autocast, run
from mabn.engine.image_files import ImageFileError, check_image_files
from mabn.engine.logger import RunLogger, progress_bar
from mabn.engine.output_dir import METRICS_FILE, write_json_atomically
from mabn.engine.sampling import ResumableDistributedSampler, SeededDataset, evaluation_subset, shard_indices
from mabn.engine.solver import LRSchedule, build_scheduler, build_sgd, linear_scaled_lr
from mabn.layers.registry import groupable_norms


def check_config(cfg: CfgNode, test_only: bool = False) -> None:
    """Cross-key constraints that types and ranges (cls/config.py) cannot express; each error names the keys involved."""
    b, n = cfg.MODEL.NORM_BATCH_SIZE, cfg.DATA.BATCH_SIZE
    if b is not None:
        if cfg.MODEL.NORM not in groupable_norms():
            raise ConfigError(f"MODEL.NORM_BATCH_SIZE applies to {', '.join(groupable_norms())}, not MODEL.NORM {cfg.MODEL.NORM!r}")
        if n % b != 0:
            raise ConfigError(f"MODEL.NORM_BATCH_SIZE={b} must be a positive divisor of DATA.BATCH_SIZE={n}")
    if "norm_batch_size" in cfg.MODEL.NORM_OPTIONS:
        raise ConfigError("set the normalization batch with MODEL.NORM_BATCH_SIZE, not MODEL.NORM_OPTIONS.norm_batch_size")
    if cfg.DATA.DATASET == "imagenet" and not cfg.DATA.ROOT:
        raise ConfigError("DATA.ROOT must point to the ImageNet directory (with train/ and val/) for DATA.DATASET imagenet")
    if cfg.DATA.DATASET == "fashion_mnist" and cfg.MODEL.IN_CHANNELS != 1:
        raise ConfigError("Fashion-MNIST images have one channel: set MODEL.IN_CHANNELS 1")


# ----------------------------------------------------------------------------- data
def build_transforms(cfg: CfgNode):
    d = cfg.DATA
    if d.DATASET == "imagenet":
        return T.imagenet_transforms(d.PIPELINE, d.CROP_SIZE, d.RESIZE_SIZE, d.LIGHTING_STD)
    if d.DATASET == "fashion_mnist":
        return T.small_train_transform(28, d.PADDING), T.small_eval_transform()
    return None, None  # synthetic tensors need no transform


def build_datasets(cfg: CfgNode):
    d = cfg.DATA
    train_tf, eval_tf = build_transforms(cfg)
    options = {}
    if d.DATASET == "synthetic":
        options = dict(num_samples=d.SYNTHETIC_SAMPLES, num_classes=cfg.MODEL.NUM_CLASSES,
                       image_size=d.SYNTHETIC_IMAGE_SIZE, channels=cfg.MODEL.IN_CHANNELS)
    root = d.ROOT or None
    try:
        train = build_dataset(d.DATASET, d.TRAIN_SPLIT, root, train_tf, d.SKIP_CORRUPT, **options)
        val = build_dataset(d.DATASET, d.VAL_SPLIT, root, eval_tf, d.SKIP_CORRUPT, **{**options, **({"seed": 1} if options else {})})
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:  # a missing or malformed data root, split or file
        raise ConfigError(f"DATA.DATASET {d.DATASET!r}, DATA.ROOT {d.ROOT!r}: {e}") from None
    if cfg.TEST.MAX_IMAGES:
        val = Subset(val, evaluation_subset(len(val), cfg.TEST.MAX_IMAGES))
    classes = len(getattr(train, "classes", [])) or cfg.MODEL.NUM_CLASSES
    if classes > cfg.MODEL.NUM_CLASSES:
        raise ConfigError(f"the training set has {classes} classes but MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES}")
    return train, val


def check_val_images(cfg: CfgNode, info: DistInfo, val_set) -> None:
    """Every validation image this rank will evaluate exists and has a readable header, checked before training (a
    broken one found at the evaluation would cost the epoch); with DATA.SKIP_CORRUPT broken images are skipped then."""
    base, indices = (val_set.dataset, val_set.indices) if isinstance(val_set, Subset) else (val_set, range(len(val_set)))
    if cfg.DATA.SKIP_CORRUPT or not isinstance(base, ImageFolderDataset):
        return
    shard = [indices[i] for i in shard_indices(len(indices), info.rank, info.world_size)]
    try:
        check_image_files((base.samples[i][0] for i in shard), f"DATA.VAL_SPLIT {cfg.DATA.VAL_SPLIT!r} of DATA.ROOT {cfg.DATA.ROOT!r}")
    except ImageFileError as e:
        raise ConfigError(f"{e} (DATA.SKIP_CORRUPT True skips broken images)") from None


def build_train_loader(cfg: CfgNode, info: DistInfo, train_set) -> tuple[ResumableDistributedSampler, DataLoader]:
    sampler = ResumableDistributedSampler(len(train_set), cfg.DATA.BATCH_SIZE, info.rank, info.world_size, cfg.SEED)
    workers = cfg.DATA.WORKERS
    loader = DataLoader(
        SeededDataset(train_set, cfg.SEED), batch_size=cfg.DATA.BATCH_SIZE, sampler=sampler, num_workers=workers,
        pin_memory=info.device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
    )
    return sampler, loader


def build_val_loader(cfg: CfgNode, info: DistInfo, val_set) -> DataLoader:
    """Rank r evaluates samples r, r + world_size, ...: each sample exactly once over all ranks."""
    return DataLoader(
        Subset(val_set, shard_indices(len(val_set), info.rank, info.world_size)), batch_size=cfg.TEST.BATCH_SIZE,
        shuffle=False, num_workers=cfg.DATA.WORKERS, pin_memory=info.device.type == "cuda",
    )


# ----------------------------------------------------------------------------- model and optimizer
MUST_MATCH = "MODEL.ARCH, NORM, CENTERED_CONVS and NUM_CLASSES"  # for a checkpoint to load into the model this config builds
# MODEL.WEIGHTS, which training starts from, may come with any norm (translated) and another number of classes
FINETUNE_MUST_MATCH = "MODEL.ARCH and IN_CHANNELS must match the run that saved it; norms and the classifier may differ"
CLASSIFIER = "fc."  # the layer whose shape follows MODEL.NUM_CLASSES, left new when the weights have other classes
# what a checkpoint means: a resume that changes one of these is refused (unless CHECKPOINT.RESUME_CHANGED_CONFIG)
RESUME_MUST_MATCH = ("MODEL.ARCH", "MODEL.NUM_CLASSES", "MODEL.IN_CHANNELS", "MODEL.NORM", "MODEL.NORM_BATCH_SIZE",
                     "MODEL.NORM_OPTIONS", "MODEL.CENTERED_CONVS", "DATA.DATASET", "DATA.BATCH_SIZE", "SOLVER.EPOCHS",
                     "SOLVER.MAX_STEPS", "SOLVER.LR_SCHEDULE", "SOLVER.LR_STEPS", "SOLVER.WARMUP_EPOCHS")


def build_model(cfg: CfgNode) -> nn.Module:
    m = cfg.MODEL
    options = dict(m.NORM_OPTIONS)
    if m.NORM_BATCH_SIZE is not None:
        options["norm_batch_size"] = m.NORM_BATCH_SIZE
    try:
        return build_classifier(m.ARCH, m.NUM_CLASSES, m.NORM, options, m.CENTERED_CONVS, m.IN_CHANNELS, m.ZERO_INIT_RESIDUAL)
    except ValueError as e:  # an unknown norm option, a value the norm refuses, a channel count GN cannot split, ...
        raise ConfigError(f"MODEL.NORM {m.NORM!r} / MODEL.NORM_OPTIONS {dict(options)}: {e}") from None


def build_training_model(cfg: CfgNode, info: DistInfo, log: RunLogger) -> nn.Module:
    """The model on its device, with identical initial weights on every rank, from ``MODEL.WEIGHTS`` if set: weights
    of this trainer or torchvision's, with any norm (BN statistics become MABN's) and any number of classes."""
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg).to(info.device)
    if cfg.SOLVER.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    if cfg.MODEL.WEIGHTS:
        load_pretrained(model, cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS", lambda key: not key.startswith(CLASSIFIER),
                        FINETUNE_MUST_MATCH, log)
    return model


@dataclass
class Schedule:
    """How long the run is, in optimizer steps."""

    steps_per_epoch: int
    total_steps: int

    def epoch_end(self, progress: "Progress") -> int:
        """The batch of ``progress``'s epoch after which training stops: its last, or earlier for SOLVER.MAX_STEPS."""
        return min(self.steps_per_epoch, progress.batch_in_epoch + self.total_steps - progress.step)


def build_schedule(cfg: CfgNode, sampler: ResumableDistributedSampler) -> Schedule:
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.SOLVER.EPOCHS * steps_per_epoch
    if cfg.SOLVER.MAX_STEPS is not None:
        total_steps = min(total_steps, cfg.SOLVER.MAX_STEPS)
    return Schedule(steps_per_epoch, total_steps)


def build_optimizer(cfg: CfgNode, info: DistInfo, model: nn.Module, schedule: Schedule):
    """``(optimizer, lr scheduler, grad scaler, lr)``: SGD at the linearly scaled rate, the epoch schedule in steps."""
    s = cfg.SOLVER
    lr = linear_scaled_lr(s.BASE_LR, cfg.DATA.BATCH_SIZE * info.world_size, s.REFERENCE_BATCH)
    optimizer = build_sgd(model, lr, s.MOMENTUM, s.WEIGHT_DECAY, s.NORM_WEIGHT_DECAY, s.NESTEROV)
    steps = schedule.steps_per_epoch
    lr_schedule = LRSchedule(s.LR_SCHEDULE, schedule.total_steps, [e * steps for e in s.LR_STEPS], s.LR_GAMMA,
                             round(s.WARMUP_EPOCHS * steps), s.WARMUP_FACTOR)
    scheduler = build_scheduler(optimizer, lr_schedule)
    scaler = torch.amp.GradScaler(info.device.type, enabled=s.AMP == "fp16")
    return optimizer, scheduler, scaler, lr


# ----------------------------------------------------------------------------- train
@dataclass
class Progress:
    """What a checkpoint restores besides model, optimizer, scheduler, scaler and RNG states."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0


def train_one_epoch(model: nn.Module, criterion, optimizer, scheduler, scaler, loader: DataLoader,
                    sampler: ResumableDistributedSampler, progress: Progress, schedule: Schedule, cfg: CfgNode,
                    info: DistInfo, log: RunLogger, save, recorder=None) -> None:
    """Train from ``progress`` to the end of its epoch (or of the run), calling ``save()`` every
    ``CHECKPOINT.PERIOD_STEPS`` steps inside the epoch; ``progress`` moves to the next epoch at its end."""
    model.train()
    sampler.set_epoch(progress.epoch, progress.batch_in_epoch)
    window = {"steps": 0, "data": 0.0, "start": time.time()}
    bar = progress_bar(loader, info.is_main and cfg.LOG.PROGRESS, total=schedule.epoch_end(progress), desc=f"epoch {progress.epoch}",
                       initial=progress.batch_in_epoch)
    end = time.time()
    for images, targets in bar:
        window["data"] += time.time() - end
        images = images.to(info.device, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        if cfg.SOLVER.CHANNELS_LAST:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(cfg.SOLVER.AMP, info.device):
            loss = criterion(model(images), targets)
        if not all_finite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {progress.epoch}, step {progress.step}; stopping.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        progress.step += 1
        progress.batch_in_epoch += 1
        window["steps"] += 1
        if recorder is not None and progress.step % cfg.STATS.PERIOD == 0:
            recorder.write(progress.step)
        if progress.step % cfg.LOG.PERIOD == 0:
            log_window(window, loss, optimizer, progress, schedule, cfg, info, log)
        period = cfg.CHECKPOINT.PERIOD_STEPS
        if period and progress.step % period == 0 and progress.batch_in_epoch < schedule.steps_per_epoch:
            save()
        if progress.step >= schedule.total_steps:
            break
        end = time.time()
    if progress.batch_in_epoch >= schedule.steps_per_epoch:
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0


def log_window(window: dict, loss: torch.Tensor, optimizer, progress: Progress, schedule: Schedule, cfg: CfgNode,
               info: DistInfo, log: RunLogger) -> None:
    elapsed = time.time() - window["start"]
    images = window["steps"] * cfg.DATA.BATCH_SIZE * info.world_size
    values = {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"], "images_per_s": images / max(elapsed, 1e-9),
              "data_time": window["data"] / window["steps"]}
    log.scalars(values, progress.step, "train/")
    log.info(
        f"epoch {progress.epoch} step {progress.step}/{schedule.total_steps}  loss {values['loss']:.4f}  lr {values['lr']:.5f}  "
        f"{values['images_per_s']:.1f} img/s  data {values['data_time']:.3f}s"
    )
    window.update(steps=0, data=0.0, start=time.time())


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: nn.Module, loader, cfg: CfgNode, info: DistInfo, expected: int, show: bool) -> dict:
    """Top-1 / top-5 over the whole validation set: each rank a disjoint shard, sums reduced over ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, top-1, top-5, count
    for images, targets in progress_bar(loader, show, total=len(loader), desc="eval"):
        images = images.to(info.device, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        if cfg.SOLVER.CHANNELS_LAST:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(cfg.SOLVER.AMP, info.device):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == targets[:, None]
        totals += torch.stack([
            F.cross_entropy(logits, targets, reduction="sum").double(), hits[:, 0].sum().double(),
            hits.any(dim=1).sum().double(), torch.tensor(float(targets.numel()), device=info.device, dtype=torch.float64),
        ])
    all_reduce_sum(totals)
    loss, top1, top5, count = totals.tolist()
    if int(count) != expected:
        raise RuntimeError(f"evaluated {int(count)} samples, expected {expected}")
    return {
        "top1_acc": 100.0 * top1 / count, "top5_acc": 100.0 * top5 / count,
        "top1_err": 100.0 * (1 - top1 / count), "top5_err": 100.0 * (1 - top5 / count),
        "loss": loss / count, "samples": int(count),
    }


def report(metrics: dict, what: str) -> str:
    return (f"{what}: top-1 err {metrics['top1_err']:.2f}%  top-5 err {metrics['top5_err']:.2f}%  "
            f"(acc {metrics['top1_acc']:.2f}% / {metrics['top5_acc']:.2f}%) over {metrics['samples']} images")


# ----------------------------------------------------------------------------- the two entry points
def train(cfg: CfgNode, info: DistInfo, log: RunLogger, resume: str | None) -> dict:
    # data
    train_set, val_set = build_datasets(cfg)
    check_val_images(cfg, info, val_set)
    sampler, train_loader = build_train_loader(cfg, info, train_set)
    val_loader = build_val_loader(cfg, info, val_set)
    schedule = build_schedule(cfg, sampler)
    # model, loss and optimizer
    model = build_training_model(cfg, info, log)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.SOLVER.LABEL_SMOOTHING)
    optimizer, scheduler, scaler, lr = build_optimizer(cfg, info, model, schedule)
    # resume
    checkpointer = Checkpointer(cfg, info, log, model, optimizer, scheduler, scaler, tuple(asdict(Progress())),
                                RESUME_MUST_MATCH)
    progress, metrics = Progress(), {}
    resume_from = resume_path(cfg.OUTPUT_DIR, resume)
    if resume_from:
        counters, metrics = checkpointer.resume(resume_from)
        progress = Progress(**counters)
    checkpointer.accept()
    ddp_model = wrap_ddp(model, info)
    recorder = None
    if cfg.STATS.RECORD and info.is_main:
        recorder = BatchStatisticsRecorder(model, log.writer, list(cfg.STATS.LAYERS) or None, cfg.STATS.CHANNEL)
    metrics_path = os.path.join(cfg.OUTPUT_DIR, METRICS_FILE)

    def save() -> None:
        checkpointer.save(asdict(progress), metrics)

    # loop: evaluate when due (not yet done for this step: a resumed run whose evaluation failed repeats it),
    # train an epoch, save. The checkpoint is written before the evaluation, so a failing evaluation never costs it.
    log.info(f"training {schedule.total_steps} steps ({schedule.steps_per_epoch} per epoch) at lr {lr:g} "
             f"on {info.world_size} process(es) x {cfg.DATA.BATCH_SIZE} images")
    while True:
        last = progress.step >= schedule.total_steps
        epoch_done = progress.step > 0 and progress.batch_in_epoch == 0
        if (last or (epoch_done and progress.epoch % cfg.TEST.EVAL_PERIOD == 0)) and metrics.get("step") != progress.step:
            if cfg.DIST.AVERAGE_NORM_STATS:
                average_norm_statistics(model)
            metrics = {**evaluate(model, val_loader, cfg, info, len(val_set), info.is_main and cfg.LOG.PROGRESS),
                       "epoch": progress.epoch, "step": progress.step}
            log.info(report(metrics, f"eval epoch {progress.epoch}"))
            log.scalars({k: metrics[k] for k in ("top1_err", "top5_err", "top1_acc", "top5_acc", "loss")}, progress.step, "val/")
            if info.is_main:
                write_json_atomically({**metrics, "finished": False, "total_steps": schedule.total_steps}, metrics_path, indent=2)
        if last:
            break
        try:
            train_one_epoch(ddp_model, criterion, optimizer, scheduler, scaler, train_loader, sampler, progress, schedule,
                            cfg, info, log, save, recorder)
        except NonFiniteModelError:  # raised by the save, which names the checkpoint it kept
            raise
        except NonFiniteLossError as e:  # with the checkpoint that is kept, and its step
            raise NonFiniteLossError(f"{e} {checkpointer.last_good()}") from None
        save()
    # the final model, then (last: only once everything it vouches for exists) "finished"
    if checkpointer.save_final(metrics):
        write_json_atomically({**metrics, "finished": True, "total_steps": schedule.total_steps}, metrics_path, indent=2)
    if recorder is not None:
        recorder.close()
    return metrics


def test_only(cfg: CfgNode, info: DistInfo, log: RunLogger, checkpoint: str | None) -> dict:
    path = checkpoint or cfg.MODEL.WEIGHTS
    if not path:
        raise ConfigError("--test-only needs --checkpoint PATH or MODEL.WEIGHTS")
    _, val_set = build_datasets(cfg)
    model = build_model(cfg).to(info.device)
    load_weights(model, path, "--checkpoint" if checkpoint else "MODEL.WEIGHTS", MUST_MATCH)
    metrics = evaluate(model, build_val_loader(cfg, info, val_set), cfg, info, len(val_set), info.is_main and cfg.LOG.PROGRESS)
    log.info(report(metrics, path))
    if info.is_main:
        write_json_atomically({**metrics, "checkpoint": os.path.abspath(path)}, os.path.join(cfg.OUTPUT_DIR, "eval.json"), indent=2)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run(argv, __doc__, get_default_config, check_config, train, test_only, metrics=("val/top1_err", "val/top5_err"))


if __name__ == "__main__":
    raise SystemExit(main())
