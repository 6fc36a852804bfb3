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

import json
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from cls import transforms as T
from cls.config import get_default_config
from cls.datasets import build_dataset
from mabn.batch_statistics import BatchStatisticsRecorder
from mabn.checkpoint import CheckpointedTrainer, load_weights, save_checkpoint
from mabn.config import CfgNode, ConfigError
from mabn.distributed import DistInfo, all_finite, all_reduce_sum, average_norm_statistics
from mabn.launch import NonFiniteLossError, autocast, run
from mabn.models import build_classifier
from mabn.run_log import RunLogger, progress
from mabn.sampling import ResumableDistributedSampler, SeededDataset, shard_indices
from mabn.solver import LRSchedule, build_scheduler, build_sgd, linear_scaled_lr

GROUPABLE_NORMS = ("bn", "brn", "mabn")


def check_config(cfg: CfgNode, test_only: bool = False) -> None:
    """Cross-key constraints that types alone cannot express; each error names the keys involved."""
    b, n = cfg.MODEL.NORM_BATCH_SIZE, cfg.DATA.BATCH_SIZE
    if b is not None:
        if cfg.MODEL.NORM not in GROUPABLE_NORMS:
            raise ConfigError(f"MODEL.NORM_BATCH_SIZE applies to {', '.join(GROUPABLE_NORMS)}, not MODEL.NORM {cfg.MODEL.NORM!r}")
        if b <= 0 or n % b != 0:
            raise ConfigError(f"MODEL.NORM_BATCH_SIZE={b} must be a positive divisor of DATA.BATCH_SIZE={n}")
    if "norm_batch_size" in cfg.MODEL.NORM_OPTIONS:
        raise ConfigError("set the normalization batch with MODEL.NORM_BATCH_SIZE, not MODEL.NORM_OPTIONS.norm_batch_size")
    if cfg.DATA.DATASET == "imagenet" and not cfg.DATA.ROOT:
        raise ConfigError("DATA.ROOT must point to the ImageNet directory (with train/ and val/) for DATA.DATASET imagenet")
    if cfg.DATA.DATASET == "fashion_mnist" and cfg.MODEL.IN_CHANNELS != 1:
        raise ConfigError("Fashion-MNIST images have one channel: set MODEL.IN_CHANNELS 1")
    for key in ("BATCH_SIZE", "WORKERS"):
        if cfg.DATA[key] < (1 if key == "BATCH_SIZE" else 0):
            raise ConfigError(f"DATA.{key} must be {'positive' if key == 'BATCH_SIZE' else 'non-negative'}, got {cfg.DATA[key]}")


# ----------------------------------------------------------------------------- data
def build_transforms(cfg: CfgNode):
    d = cfg.DATA
    if d.DATASET == "imagenet":
        return T.imagenet_train_transform(d.CROP_SIZE, d.LIGHTING_STD), T.imagenet_eval_transform(d.RESIZE_SIZE, d.CROP_SIZE)
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
    train = build_dataset(d.DATASET, d.TRAIN_SPLIT, root, train_tf, d.SKIP_CORRUPT, **options)
    val = build_dataset(d.DATASET, d.VAL_SPLIT, root, eval_tf, d.SKIP_CORRUPT, **{**options, **({"seed": 1} if options else {})})
    classes = len(getattr(train, "classes", [])) or cfg.MODEL.NUM_CLASSES
    if classes > cfg.MODEL.NUM_CLASSES:
        raise ConfigError(f"the training set has {classes} classes but MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES}")
    return train, val


def build_loaders(cfg: CfgNode, info: DistInfo, train_set, val_set):
    sampler = ResumableDistributedSampler(len(train_set), cfg.DATA.BATCH_SIZE, info.rank, info.world_size, cfg.SEED)
    pin = info.device.type == "cuda"
    workers = cfg.DATA.WORKERS
    train_loader = DataLoader(
        SeededDataset(train_set, cfg.SEED), batch_size=cfg.DATA.BATCH_SIZE, sampler=sampler, num_workers=workers,
        pin_memory=pin, drop_last=True, persistent_workers=workers > 0,
    )
    val_loader = DataLoader(
        Subset(val_set, shard_indices(len(val_set), info.rank, info.world_size)), batch_size=cfg.TEST.BATCH_SIZE,
        shuffle=False, num_workers=workers, pin_memory=pin,
    )
    return sampler, train_loader, val_loader


# ----------------------------------------------------------------------------- model
MUST_MATCH = "MODEL.ARCH, NORM, CENTERED_CONVS and NUM_CLASSES"  # for a checkpoint to load into the model this config builds


def build_model(cfg: CfgNode) -> nn.Module:
    m = cfg.MODEL
    options = dict(m.NORM_OPTIONS)
    if m.NORM_BATCH_SIZE is not None:
        options["norm_batch_size"] = m.NORM_BATCH_SIZE
    return build_classifier(m.ARCH, m.NUM_CLASSES, m.NORM, options, m.CENTERED_CONVS, m.IN_CHANNELS, m.ZERO_INIT_RESIDUAL)


# ----------------------------------------------------------------------------- train / evaluate
@torch.no_grad()
def evaluate(model: nn.Module, loader, cfg: CfgNode, info: DistInfo, expected: int, show: bool) -> dict:
    """Top-1 / top-5 over the whole validation set: each rank a disjoint shard, sums reduced over ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, top-1, top-5, count
    for images, targets in progress(loader, show, total=len(loader), desc="eval"):
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


def write_json(values: dict, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(values, f, indent=2)
    os.replace(tmp, path)


class Trainer(CheckpointedTrainer):
    COUNTERS = ("epoch", "batch_in_epoch", "step")  # what a checkpoint restores besides model, optimizer, scheduler, scaler, RNG

    def __init__(self, cfg: CfgNode, info: DistInfo, log: RunLogger, resume: str | None):
        self.cfg, self.info, self.log = cfg, info, log
        self.show = info.is_main and cfg.LOG.PROGRESS
        train_set, val_set = build_datasets(cfg)
        self.val_size = len(val_set)
        self.sampler, self.train_loader, self.val_loader = build_loaders(cfg, info, train_set, val_set)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = cfg.SOLVER.EPOCHS * self.steps_per_epoch
        if cfg.SOLVER.MAX_STEPS is not None:
            self.total_steps = min(self.total_steps, cfg.SOLVER.MAX_STEPS)

        torch.manual_seed(cfg.SEED)  # identical initial weights on every rank
        self.model = build_model(cfg).to(info.device)
        if cfg.SOLVER.CHANNELS_LAST:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.MODEL.WEIGHTS:
            load_weights(self.model, cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS", MUST_MATCH)
        s = cfg.SOLVER
        total_batch = cfg.DATA.BATCH_SIZE * info.world_size
        self.lr = linear_scaled_lr(s.BASE_LR, total_batch, s.REFERENCE_BATCH)
        self.optimizer = build_sgd(self.model, self.lr, s.MOMENTUM, s.WEIGHT_DECAY, s.NORM_WEIGHT_DECAY, s.NESTEROV)
        schedule = LRSchedule(
            s.LR_SCHEDULE, self.total_steps, [e * self.steps_per_epoch for e in s.LR_STEPS], s.LR_GAMMA,
            round(s.WARMUP_EPOCHS * self.steps_per_epoch), s.WARMUP_FACTOR,
        )
        self.scheduler = build_scheduler(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=s.AMP == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=s.LABEL_SMOOTHING)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.metrics: dict = {}
        self.checkpoint_path = os.path.join(cfg.OUTPUT_DIR, "checkpoint.pth")
        if resume == "" or (resume is None and os.path.isfile(self.checkpoint_path)):
            resume = self.checkpoint_path  # --resume without a path, or a run that was interrupted
        if resume:
            self._restore(resume)
        self.ddp = self.model
        if info.enabled:
            # MABN keeps per-rank windows: buffers must not be overwritten by rank 0's on every forward.
            # (torch 2.14 deprecates broadcast_buffers, but its successor still syncs buffers at init.)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.ddp = nn.parallel.DistributedDataParallel(
                    self.model, device_ids=[info.local_rank] if info.device.type == "cuda" else None, broadcast_buffers=False,
                )
        self.recorder = None
        if cfg.STATS.RECORD and info.is_main:
            layers = list(cfg.STATS.LAYERS) or None
            self.recorder = BatchStatisticsRecorder(self.model, log.writer, layers, cfg.STATS.CHANNEL)

    # ------------------------------------------------------------------ loop
    def evaluate(self) -> dict:
        if self.cfg.DIST.AVERAGE_NORM_STATS:
            average_norm_statistics(self.model)
        metrics = evaluate(self.model, self.val_loader, self.cfg, self.info, self.val_size, self.show)
        self.log.info(
            f"eval epoch {self.epoch}: top-1 err {metrics['top1_err']:.2f}%  top-5 err {metrics['top5_err']:.2f}%  "
            f"(acc {metrics['top1_acc']:.2f}% / {metrics['top5_acc']:.2f}%) over {metrics['samples']} images"
        )
        self.log.scalars({k: metrics[k] for k in ("top1_err", "top5_err", "top1_acc", "top5_acc", "loss")}, self.step, "val/")
        return metrics

    def train_steps(self) -> None:
        cfg, info = self.cfg, self.info
        self.ddp.train()
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        window = {"steps": 0, "data": 0.0, "start": time.time()}
        bar = progress(self.train_loader, self.show, total=self.steps_per_epoch, desc=f"epoch {self.epoch}", initial=self.batch_in_epoch)
        end = time.time()
        for images, targets in bar:
            window["data"] += time.time() - end
            images = images.to(info.device, non_blocking=True)
            targets = targets.to(info.device, non_blocking=True)
            if cfg.SOLVER.CHANNELS_LAST:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(cfg.SOLVER.AMP, info.device):
                loss = self.criterion(self.ddp(images), targets)
            if not all_finite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at epoch {self.epoch}, step {self.step}; stopping. "
                    f"The last good checkpoint is {self.checkpoint_path}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            self.batch_in_epoch += 1
            window["steps"] += 1
            if self.recorder is not None and self.step % cfg.STATS.PERIOD == 0:
                self.recorder.write(self.step)
            if self.step % cfg.LOG.PERIOD == 0:
                self._log_window(window, loss)
            if cfg.CHECKPOINT.PERIOD_STEPS and self.step % cfg.CHECKPOINT.PERIOD_STEPS == 0 and self.batch_in_epoch < self.steps_per_epoch:
                self.save()
            if self.step >= self.total_steps:
                break
            end = time.time()
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _log_window(self, window: dict, loss: torch.Tensor) -> None:
        elapsed = time.time() - window["start"]
        images = window["steps"] * self.cfg.DATA.BATCH_SIZE * self.info.world_size
        values = {"loss": loss.item(), "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": images / max(elapsed, 1e-9),
                  "data_time": window["data"] / window["steps"]}
        self.log.scalars(values, self.step, "train/")
        self.log.info(
            f"epoch {self.epoch} step {self.step}/{self.total_steps}  loss {values['loss']:.4f}  lr {values['lr']:.5f}  "
            f"{values['images_per_s']:.1f} img/s  data {values['data_time']:.3f}s"
        )
        window.update(steps=0, data=0.0, start=time.time())

    def fit(self) -> dict:
        cfg = self.cfg
        self.log.info(f"training {self.total_steps} steps ({self.steps_per_epoch} per epoch) at lr {self.lr:g} "
                      f"on {self.info.world_size} process(es) x {cfg.DATA.BATCH_SIZE} images")
        while self.step < self.total_steps:
            self.train_steps()
            epoch_done = self.batch_in_epoch == 0
            last = self.step >= self.total_steps
            if last or (epoch_done and self.epoch % cfg.TEST.EVAL_PERIOD == 0):
                self.metrics = {**self.evaluate(), "epoch": self.epoch, "step": self.step}
                if self.info.is_main:
                    write_json({**self.metrics, "finished": last, "total_steps": self.total_steps}, os.path.join(cfg.OUTPUT_DIR, "metrics.json"))
            if epoch_done or last:
                self.save()
        if self.info.is_main:
            final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
            save_checkpoint({"model": self.model.state_dict(), "config": cfg.dump(), "metrics": self.metrics}, final)
            self.log.info(f"saved {final}")
        if self.recorder is not None:
            self.recorder.close()
        return self.metrics


def test_only(cfg: CfgNode, info: DistInfo, log: RunLogger, checkpoint: str | None) -> dict:
    path = checkpoint or cfg.MODEL.WEIGHTS
    if not path:
        raise ConfigError("--test-only needs --checkpoint PATH or MODEL.WEIGHTS")
    _, val_set = build_datasets(cfg)
    val_loader = DataLoader(Subset(val_set, shard_indices(len(val_set), info.rank, info.world_size)),
                            batch_size=cfg.TEST.BATCH_SIZE, num_workers=cfg.DATA.WORKERS)
    model = build_model(cfg).to(info.device)
    load_weights(model, path, "--checkpoint" if checkpoint else "MODEL.WEIGHTS", MUST_MATCH)
    metrics = evaluate(model, val_loader, cfg, info, len(val_set), info.is_main and cfg.LOG.PROGRESS)
    log.info(f"{path}: top-1 err {metrics['top1_err']:.2f}%  top-5 err {metrics['top5_err']:.2f}%  "
             f"(acc {metrics['top1_acc']:.2f}% / {metrics['top5_acc']:.2f}%) over {metrics['samples']} images")
    if info.is_main:
        write_json({**metrics, "checkpoint": os.path.abspath(path)}, os.path.join(cfg.OUTPUT_DIR, "eval.json"))
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run(argv, __doc__, get_default_config, check_config,
               lambda cfg, info, log, resume: Trainer(cfg, info, log, resume).fit(), test_only)


if __name__ == "__main__":
    raise SystemExit(main())
