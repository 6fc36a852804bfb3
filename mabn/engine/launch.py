"""The command line both trainers share: arguments, config, process group, logging and exit codes.

    torchrun --nproc_per_node=8 {cls,det}/train.py --config FILE [--resume [PATH]] [--test-only [--checkpoint PATH]] [KEY VALUE ...]

detectron2's spellings work too (``--config-file``, ``--eval-only``), and flags may also follow the ``KEY VALUE``
overrides. ``--print-config`` prints every config key with its value (the defaults, then the file and the
overrides) and exits. A training run holds ``OUTPUT_DIR`` (:class:`mabn.engine.output_dir.OutputDirLock`): a
second trainer on it is refused. Exit codes: 0 done, 2 a configuration, input or output that cannot be used
(the message names it: a bad key, a missing file, an OUTPUT_DIR in use, a full disk), 3 a NaN/Inf loss or
model (the last good checkpoint is kept, and named); anything else propagates, and torchrun stops the other
ranks.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, Optional, Sequence

import torch

from .config import CfgNode, ConfigError, load_config
from .distributed import DistInfo, cleanup, init_distributed, local_rank_from_argv
from .logger import RunLogger
from .output_dir import OutputDirLock, OutputDirLockedError, OutputError

# What a config key looks like (OUTPUT_DIR, SOLVER.BASE_LR): a word after --resume that looks like one and is no
# file is the first override, not the checkpoint to resume from.
CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf on some rank; every rank raises it at the same step."""


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--config-file", dest="config", metavar="FILE",
                        help="YAML config (may inherit others through _BASE_)")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="resume from PATH (default: OUTPUT_DIR/checkpoint.pth, which is also picked up automatically)")
    parser.add_argument("--test-only", "--eval-only", dest="test_only", action="store_true",
                        help="evaluate --checkpoint (or MODEL.WEIGHTS) and exit")
    parser.add_argument("--checkpoint", metavar="PATH", help="weights to evaluate with --test-only")
    parser.add_argument("--print-config", action="store_true",
                        help="print every config key with its value (defaults <- --config <- overrides) and exit")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding the config")
    return parser


def parse_args(argv: list[str], description: str) -> argparse.Namespace:
    """The arguments, flags before, between or after the ``KEY VALUE`` overrides."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    overrides = []
    while True:
        if args.resume and CONFIG_KEY.fullmatch(args.resume) and not os.path.exists(args.resume):
            args.opts, args.resume = [args.resume, *args.opts], ""  # `--resume OUTPUT_DIR runs/x`: the flag alone
        opts, key_at = args.opts, 0
        # argparse.REMAINDER takes everything from the first KEY on, flags included; a flag where a KEY is due
        # starts the arguments over
        while key_at < len(opts) and not opts[key_at].startswith("-"):
            if key_at + 1 < len(opts) and opts[key_at + 1].startswith("--"):  # no config value starts so
                parser.error(f"{opts[key_at]} has no value ({opts[key_at + 1]} is a flag: give KEY VALUE pairs, "
                             "flags before, between or after them)")
            key_at += 2
        overrides += opts[:key_at]
        if key_at >= len(opts):
            break
        parser.parse_args(opts[key_at:], namespace=args)
    args.opts = overrides
    return args


def autocast(amp: str, device: torch.device):
    """``SOLVER.AMP``: 'off', 'bf16' or 'fp16'."""
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, enabled=amp != "off")


def run(
    argv: Optional[list[str]],
    description: str,
    defaults: Callable[[], CfgNode],
    check_config: Callable[[CfgNode, bool], None],
    train: Callable[[CfgNode, DistInfo, RunLogger, Optional[str]], object],
    test: Callable[[CfgNode, DistInfo, RunLogger, Optional[str]], object],
    metrics: Sequence[str] = (),
) -> int:
    """Parse, resolve and check the config, join the process group, then ``train(cfg, info, log, resume)`` or
    ``test(cfg, info, log, checkpoint)``; returns the exit code. ``metrics``: the scalar tags that TensorBoard's
    HParams tab shows beside the config of each training run (e.g. ``val/top1_err``)."""
    args = parse_args(local_rank_from_argv(sys.argv[1:] if argv is None else argv), description)
    try:
        cfg = load_config(defaults(), args.config, args.opts)
        if args.print_config:
            print(cfg.dump(), end="")
            return 0
        check_config(cfg, args.test_only)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    info = init_distributed(cfg.DEVICE, cfg.DIST.BACKEND, cfg.DIST.TIMEOUT_MINUTES)
    lock = None
    log = None
    try:
        if info.is_main and not args.test_only:
            lock = OutputDirLock(cfg.OUTPUT_DIR).acquire()
        log = RunLogger(cfg.OUTPUT_DIR, enabled=info.is_main)
        if info.is_main and args.test_only:  # a training run writes config.yaml once it is accepted (Checkpointer.accept)
            cfg.save(os.path.join(cfg.OUTPUT_DIR, "config_test.yaml"))
        log.config(cfg, () if args.test_only else metrics)
        if args.test_only:
            test(cfg, info, log, args.checkpoint)
        else:
            train(cfg, info, log, args.resume)
        return 0
    except (NonFiniteLossError, ConfigError, OutputError, OutputDirLockedError) as e:
        if log is not None:
            log.info(f"error: {e}")
        if log is None or not info.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteLossError) else 2
    finally:
        if log is not None:
            log.close()
        if lock is not None:
            lock.release()
        cleanup()
