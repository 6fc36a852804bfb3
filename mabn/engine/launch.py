"""The command line both trainers share: arguments, config, process group, logging and exit codes.

    torchrun --nproc_per_node=8 {cls,det}/train.py --config FILE [--resume [PATH]] [--test-only [--checkpoint PATH]] [KEY VALUE ...]

Exit codes: 0 done, 2 a configuration or input that cannot be used (the message names it), 3 a NaN/Inf
loss (the last good checkpoint is kept); anything else propagates, and torchrun stops the other ranks.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

import torch

from .config import CfgNode, ConfigError, load_config
from .distributed import DistInfo, cleanup, init_distributed, local_rank_from_argv
from .logger import RunLogger


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf on some rank; every rank raises it at the same step."""


def parse_args(argv: list[str], description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (may inherit others through _BASE_)")
    parser.add_argument("--resume", nargs="?", const="", default=None,
                        help="resume from PATH (default: OUTPUT_DIR/checkpoint.pth, which is also picked up automatically)")
    parser.add_argument("--test-only", action="store_true", help="evaluate --checkpoint (or MODEL.WEIGHTS) and exit")
    parser.add_argument("--checkpoint", help="weights to evaluate with --test-only")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding the config")
    return parser.parse_args(argv)


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
) -> int:
    """Parse, resolve and check the config, join the process group, then ``train(cfg, info, log, resume)`` or
    ``test(cfg, info, log, checkpoint)``; returns the exit code."""
    args = parse_args(local_rank_from_argv(sys.argv[1:] if argv is None else argv), description)
    try:
        cfg = load_config(defaults(), args.config, args.opts)
        check_config(cfg, args.test_only)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    info = init_distributed(cfg.DEVICE, cfg.DIST.BACKEND, cfg.DIST.TIMEOUT_MINUTES)
    log = RunLogger(cfg.OUTPUT_DIR, enabled=info.is_main)
    try:
        if info.is_main:
            cfg.save(os.path.join(cfg.OUTPUT_DIR, "config_test.yaml" if args.test_only else "config.yaml"))
        if args.test_only:
            test(cfg, info, log, args.checkpoint)
        else:
            train(cfg, info, log, args.resume)
        return 0
    except (NonFiniteLossError, ConfigError) as e:
        log.info(f"error: {e}")
        if not info.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteLossError) else 2
    finally:
        log.close()
        cleanup()
