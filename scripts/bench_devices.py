"""What the per-device benchmarks share: the ``--device`` / ``--json`` options and the report they write."""
from __future__ import annotations

import argparse
import json

import torch


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--json", help="also write the figures to this file")


def selected_devices(parser: argparse.ArgumentParser, choice: str) -> list[torch.device]:
    """The CPU and/or CUDA, as ``--device`` asked; ``all`` takes CUDA only when present."""
    devices = [torch.device("cpu")] if choice in ("cpu", "all") else []
    if choice in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif choice == "cuda":
        parser.error("CUDA is not available")
    return devices


def write_report(report: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
