#!/usr/bin/env python
"""Training throughput of the cls/ trainer (synthetic data): BN-32, BN-2, BRN-2 and MABN-2 as ratios to BN-32,
and the trainer against a minimal plain PyTorch loop on the same model, data and optimizer.

    python scripts/bench_train.py                          # CPU defaults: ResNet-50 at 64 px
    python scripts/bench_train.py --device cuda --size 224 --steps 50

At 224 px it also turns each measured throughput into the expected cost of one ImageNet run of the paper
(120 epochs of 1,281,167 images): device-hours, and wall hours on 8 such devices, assuming the data
pipeline keeps up and 8 devices scale linearly (an estimate, not a measurement of a whole run).

Every configuration is built once; then, round after round, each trains one timed epoch of ``--steps``
steps (after an untimed warm-up epoch), and the median over rounds is reported. Same process, side by
side: the only comparison these noisy machines allow.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's cls/ (not installed)

import torch
from torch import nn
from torch.utils.data import DataLoader

from cls import train as cls_train
from cls.config import get_default_config
from cls.datasets import IMAGENET_TRAIN_IMAGES
from mabn.engine.distributed import init_distributed, wrap_ddp
from mabn.engine.logger import RunLogger

IMAGENET_RUN_IMAGES = get_default_config().SOLVER.EPOCHS * IMAGENET_TRAIN_IMAGES  # one run of the paper's recipe
CONFIGS = {
    "BN-32": ["MODEL.NORM", "bn"],
    "BN-2": ["MODEL.NORM", "bn", "MODEL.NORM_BATCH_SIZE", "2"],
    "BRN-2": ["MODEL.NORM", "brn", "MODEL.NORM_BATCH_SIZE", "2"],
    "MABN-2": ["MODEL.NORM", "mabn", "MODEL.NORM_BATCH_SIZE", "2", "MODEL.CENTERED_CONVS", "True"],
}


class TrainerEpoch:
    """The cls/ trainer's own steps (cls.train), set up as its ``train()`` sets them up; one call trains an epoch."""

    def __init__(self, cfg, info, log):
        self.cfg, self.info, self.log = cfg, info, log
        self.train_set, _ = cls_train.build_datasets(cfg)
        self.sampler, self.loader = cls_train.build_train_loader(cfg, info, self.train_set)
        self.schedule = cls_train.build_schedule(cfg, self.sampler)
        self.model = cls_train.build_training_model(cfg, info, log)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.SOLVER.LABEL_SMOOTHING)
        self.optimizer, self.scheduler, self.scaler, self.lr = cls_train.build_optimizer(cfg, info, self.model, self.schedule)
        self.ddp_model = wrap_ddp(self.model, info)
        self.progress = cls_train.Progress()

    def __call__(self) -> None:
        cls_train.train_one_epoch(self.ddp_model, self.criterion, self.optimizer, self.scheduler, self.scaler, self.loader,
                                  self.sampler, self.progress, self.schedule, self.cfg, self.info, self.log, save=lambda: None)
        if self.info.device.type == "cuda":
            torch.cuda.synchronize()


class PlainLoop:
    """What the trainer does, minus everything it adds: forward, loss, backward, SGD step."""

    def __init__(self, cfg, trainer: TrainerEpoch, device):
        self.device = device
        torch.manual_seed(cfg.SEED)
        self.model = cls_train.build_model(cfg).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=trainer.lr, momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.SOLVER.LABEL_SMOOTHING)
        dataset = trainer.train_set  # the trainer's synthetic set, without its seeding wrapper
        workers = cfg.DATA.WORKERS
        self.loader = DataLoader(dataset, batch_size=cfg.DATA.BATCH_SIZE, shuffle=True, drop_last=True, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def epoch(self) -> None:
        self.model.train()
        for images, targets in self.loader:
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            loss = self.criterion(self.model(images), targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, help="image side (default: 224 on CUDA, 64 on the CPU)")
    parser.add_argument("--batch", type=int, default=32, help="per-process batch N")
    parser.add_argument("--steps", type=int, help="steps per timed epoch (default: 50 on CUDA, 6 on the CPU)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    size = args.size or (224 if cuda else 64)
    steps = args.steps or (50 if cuda else 6)
    info = init_distributed(args.device)
    output = tempfile.mkdtemp(prefix="bench_train_")  # the trainers' run directories, removed at exit
    try:
        return bench(args, cuda, size, steps, info, output)
    finally:
        shutil.rmtree(output, ignore_errors=True)


def bench(args, cuda: bool, size: int, steps: int, info, output: str) -> int:
    trainers, loops = {}, {}
    for name, overrides in CONFIGS.items():
        cfg = get_default_config()
        cfg.merge_from_list([
            "DEVICE", args.device, "MODEL.ARCH", args.arch, "DATA.DATASET", "synthetic", "DATA.BATCH_SIZE", str(args.batch),
            "DATA.SYNTHETIC_SAMPLES", str(steps * args.batch), "DATA.SYNTHETIC_IMAGE_SIZE", str(size),
            "DATA.WORKERS", str(args.workers), "SOLVER.EPOCHS", "1000", "LOG.PROGRESS", "False", "LOG.PERIOD", "1000000",
            "OUTPUT_DIR", f"{output}/{name}", *overrides,
        ])
        cfg.freeze()
        trainers[name] = TrainerEpoch(cfg, info, RunLogger(cfg.OUTPUT_DIR, tensorboard=False))
        if name in ("BN-32", "MABN-2"):
            loops[name] = PlainLoop(cfg, trainers[name], info.device)

    # Each plain loop runs right beside the trainer it is compared with, after it in even rounds and before it
    # in odd ones, and their ratio is the median of the per-round ratios: slow spells of a shared machine last
    # seconds, so only epochs measured next to each other compare.
    runs = {f"trainer {n}": t for n, t in trainers.items()}
    runs.update({f"plain loop {n}": loop.epoch for n, loop in loops.items()})
    groups = [[f"trainer {n}"] + ([f"plain loop {n}"] if n in loops else []) for n in trainers]
    for run in runs.values():  # warm-up: compiled kernels, allocator, data workers
        run()
    times = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for group in groups:
            for name in group if round_ % 2 == 0 else reversed(group):
                times[name].append(timed(runs[name]) / steps)
    step = {name: statistics.median(v) for name, v in times.items()}
    overhead = {name: statistics.median(t / p for t, p in zip(times[f"trainer {name}"], times[f"plain loop {name}"]))
                for name in loops}

    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n## Training throughput, {args.arch} at {size} px, N = {args.batch}, {device}\n")
    estimate = size == 224
    extra = " ImageNet run: device-hours | wall hours on 8 |" if estimate else ""
    print("| configuration | s/step | images/s | ratio to BN-32 |" + extra)
    print("|---|---|---|---|" + ("---|---|" if estimate else ""))
    bn = step["trainer BN-32"]
    for name in CONFIGS:
        t = step[f"trainer {name}"]
        hours = IMAGENET_RUN_IMAGES * t / args.batch / 3600
        extra = f" {hours:.0f} | {hours / 8:.1f} |" if estimate else ""
        print(f"| {name} | {t:.3f} | {args.batch / t:.1f} | {bn / t:.2f} |" + extra)
    print("\n| plain loop vs trainer | plain s/step | trainer s/step | trainer / plain (median of paired rounds) |")
    print("|---|---|---|---|")
    for name in loops:
        plain, trained = step[f"plain loop {name}"], step[f"trainer {name}"]
        print(f"| {name} | {plain:.3f} | {trained:.3f} | {overhead[name]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
