#!/usr/bin/env python
"""The paper's inference-speed figure: ResNet-50 images/s by batch size for BN, MABN (folded), LN, IN and GN.

    python scripts/bench_inference.py                       # CPU, and CUDA when present
    python scripts/bench_inference.py --device cuda --batches 1 8 32 --json inference.json

BN and MABN fold into the convolutions for inference (``mabn.fold_model``), so both run the same plain
network; LN, IN and GN normalize with statistics of the test sample and cannot. Every model runs in one
process, taking turns one forward pass at a time so that slow spells of a shared machine hit them all,
and the median pass of each is reported with its ratio to folded BN beside the paper's ratios (measured
on a GPU, where convolutions are fast and norms memory-bound). A second copy of the folded BN network
is timed as a control: its distance from 1.00 is the resolution of the measurement on this machine.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torchvision

import mabn
import paper_tables  # sibling scripts
from bench_devices import add_device_options, selected_devices, write_report

# The norm of each timed model, to put beside it the paper's images/s at batch 1 (configs/paper_tables.yaml).
MODEL_NORMS = {"BN (folded)": "bn", "MABN (folded)": "mabn", "LN": "ln", "IN": "in", "GN": "gn"}
_PAPER_BY_NORM = {norm: row["paper"] for row in paper_tables.rows("inference_speed") for norm in row["norms"]}
PAPER_IMAGES_PER_S = {model: _PAPER_BY_NORM[norm] for model, norm in MODEL_NORMS.items()}


CONTROL = "BN copy (control)"


def build_models(device: torch.device, channels_last: bool) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    bn = mabn.fold_model(torchvision.models.resnet50())
    models = {
        "BN (folded)": bn,
        "MABN (folded)": mabn.fold_model(mabn.convert_model(torchvision.models.resnet50(), norm="mabn", conv="cen")),
        "LN": mabn.convert_model(torchvision.models.resnet50(), norm="ln"),
        "IN": mabn.convert_model(torchvision.models.resnet50(), norm="in"),
        "GN": mabn.convert_model(torchvision.models.resnet50(), norm="gn"),
        CONTROL: copy.deepcopy(bn),
    }
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return {name: m.eval().to(device, memory_format=memory_format) for name, m in models.items()}


def forward_time(model, x) -> float:
    begin = time.perf_counter()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - begin


@torch.inference_mode()
def bench(device: torch.device, batches, size: int, rounds: int, min_seconds: float, channels_last: bool) -> dict:
    """``{batch: {model: images/s}}`` from at least ``rounds`` turns and ``min_seconds`` per model."""
    models = build_models(device, channels_last)
    results = {}
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for model in models.values():  # warm-up (cuDNN autotuning, allocator)
            forward_time(model, x)
        samples = {name: [] for name in models}
        while len(samples[CONTROL]) < rounds or min(sum(v) for v in samples.values()) < min_seconds:
            for name, model in models.items():
                samples[name].append(forward_time(model, x))
        # the median pass, not the mean: a pass interrupted by another process says nothing about the model
        results[batch] = {name: batch / statistics.median(v) for name, v in samples.items()}
    return results


def print_table(device: torch.device, results: dict) -> None:
    names = list(next(iter(results.values())))
    title = f"CPU, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"\n## ResNet-50 inference on {title}: images/s (ratio to folded BN)\n")
    print("| batch | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for batch, row in results.items():
        bn = row["BN (folded)"]
        print(f"| {batch} | " + " | ".join(f"{row[n]:.1f} ({row[n] / bn:.2f})" for n in names) + " |")
    paper_bn = PAPER_IMAGES_PER_S["BN (folded)"]
    paper = [f"{PAPER_IMAGES_PER_S[n]:.1f} ({PAPER_IMAGES_PER_S[n] / paper_bn:.2f})" if n in PAPER_IMAGES_PER_S else "-" for n in names]
    print("| paper, batch 1 (GPU) | " + " | ".join(paper) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--rounds", type=int, default=5, help="at least this many passes of every model")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="at least this much time per model and batch")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    devices = selected_devices(parser, args.device)
    report = {}
    for device in devices:
        results = bench(device, args.batches, args.size, args.rounds, args.min_seconds, args.channels_last)
        print_table(device, results)
        report[device.type] = results
        sys.stdout.flush()
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
