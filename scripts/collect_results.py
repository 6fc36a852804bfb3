#!/usr/bin/env python
"""Print every table of the paper as Markdown: the measured value beside the paper's, and the difference.

    python scripts/collect_results.py --imagenet runs/imagenet --coco runs/coco --plot error_vs_b.png

Reads ``metrics.json`` of each run directory (``<root>/<config name>``, the layout that
``scripts/reproduce_imagenet.sh`` / ``reproduce_coco.sh`` create). Runs that are missing or still going
are marked as such. ``--plot`` draws top-1 error against the normalization batch b, like the paper's figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from figures import pyplot, save_figure  # sibling script

# shared/spec/PAPER_RESULTS.md; values read off the paper's plot are marked approximate there.
PAPER_IMAGENET = {
    "bn": {32: 23.41, 16: 24.3, 8: 25.4, 4: 27.9, 2: 35.22},
    "brn": {32: 23.6, 16: 24.4, 8: 25.3, 4: 26.9, 2: 30.29},
    "mabn": {32: 23.5, 16: 23.7, 8: 23.6, 4: 23.7, 2: 23.67, 1: 23.7},
}
APPROXIMATE = {("bn", 16), ("bn", 8), ("bn", 4), ("brn", 32), ("brn", 16), ("brn", 8), ("brn", 4),
               ("mabn", 32), ("mabn", 16), ("mabn", 8), ("mabn", 4), ("mabn", 1)}
B_VALUES = (32, 16, 8, 4, 2, 1)
NORM_NAMES = {"bn": "BN", "brn": "BRN", "mabn": "MABN"}
COCO_METRICS = (("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("segm", "AP"), ("segm", "AP50"), ("segm", "AP75"))
COCO_HEADERS = ("APb", "APb50", "APb75", "APm", "APm50", "APm75")
PAPER_COCO = {
    "scratch_bn_2": ("2x from scratch", "BN", "2", (32.38, 50.44, 35.47, 29.07, 47.68, 30.75)),
    "scratch_brn_2": ("2x from scratch", "BRN", "2", (34.07, 52.66, 37.12, 30.98, 50.03, 32.93)),
    "scratch_syncbn_2x8": ("2x from scratch", "SyncBN", "2x8", (36.80, 56.06, 40.23, 33.10, 53.15, 35.24)),
    "scratch_mabn_2": ("2x from scratch", "MABN", "2", (36.50, 55.79, 40.17, 32.69, 52.78, 34.71)),
    "finetune_syncbn_2x8": ("2x fine-tune", "SyncBN", "2x8", (38.25, 57.81, 42.01, 34.22, 54.97, 36.34)),
    "finetune_mabn_2": ("2x fine-tune", "MABN", "2", (38.42, 58.19, 41.99, 34.12, 55.10, 36.12)),
    "scratch_gn": ("2x from scratch", "GN", "2", None),
}
ABLATION_SWITCHES = (("fwdsma", "fwdbatch", "forward SMA"), ("bwdsma", "bwdbatch", "backward SMA"),
                     ("reduced", "full", "reduced statistics + centered convs"), ("renorm", "norenorm", "renormalization"))


def read_run(directory: str) -> dict:
    """``{'status': 'missing' | 'unfinished' | 'finished', ...metrics}`` of one run directory."""
    path = os.path.join(directory, "metrics.json")
    if not os.path.isfile(path):
        status = "unfinished" if os.path.isfile(os.path.join(directory, "checkpoint.pth")) else "missing"
        return {"status": status}
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return {"status": f"unreadable metrics.json ({e})"}
    return {**metrics, "status": "finished" if metrics.get("finished") else "unfinished"}


def _cell(run: dict, value, paper=None, approximate=False) -> str:
    reference = None if paper is None else f"{'~' if approximate else ''}{paper:.2f}"
    if run["status"] == "missing" or value is None:  # still show the target the run is for
        return run["status"] if reference is None else f"{run['status']} (paper {reference})"
    text = f"{value:.2f}"
    if run["status"] != "finished":
        text += " (unfinished)"
    if reference is not None:
        text += f" vs {reference} ({value - paper:+.2f})"
    return text


def imagenet_tables(root: str) -> tuple[str, dict]:
    lines = ["## ImageNet, ResNet-50: top-1 error (%), measured vs paper (difference)", "",
             "| Norm | " + " | ".join(f"b = {b}" for b in B_VALUES) + " |", "|---" * (len(B_VALUES) + 1) + "|"]
    measured: dict = {}
    for norm in ("bn", "brn", "mabn"):
        cells = []
        for b in B_VALUES:
            paper = PAPER_IMAGENET[norm].get(b)
            if paper is None:
                cells.append("-")
                continue
            run = read_run(os.path.join(root, f"{norm}_b{b}"))
            value = run.get("top1_err")
            if value is not None:
                measured.setdefault(norm, {})[b] = value
            cells.append(_cell(run, value, paper, (norm, b) in APPROXIMATE))
        lines.append(f"| {NORM_NAMES[norm]} | " + " | ".join(cells) + " |")
    lines += ["", "## ImageNet, batch-independent baselines: top-1 error (%)", "", "| Norm | top-1 error | top-5 error |", "|---|---|---|"]
    for norm in ("gn", "ln", "in"):
        run = read_run(os.path.join(root, norm))
        lines.append(f"| {norm.upper()} | {_cell(run, run.get('top1_err'))} | {_cell(run, run.get('top5_err'))} |")
    lines += ["", "## ImageNet ablation of MABN at b = 2: top-1 error (%)", "",
              "| " + " | ".join(label for _, _, label in ABLATION_SWITCHES) + " | top-1 error |", "|---" * (len(ABLATION_SWITCHES) + 1) + "|"]
    for bits in range(2 ** len(ABLATION_SWITCHES) - 1, -1, -1):
        on = [(bits >> (len(ABLATION_SWITCHES) - 1 - i)) & 1 for i in range(len(ABLATION_SWITCHES))]
        name = "_".join(yes if flag else no for flag, (yes, no, _) in zip(on, ABLATION_SWITCHES))
        run = read_run(os.path.join(root, "ablation", name))
        lines.append("| " + " | ".join("yes" if flag else "no" for flag in on) + f" | {_cell(run, run.get('top1_err'))} |")
    return "\n".join(lines), measured


def coco_table(root: str) -> str:
    lines = ["## COCO, Mask R-CNN R50-FPN, 2x (minival): measured vs paper (difference)", "",
             "| Strategy | Norm | Batch | " + " | ".join(COCO_HEADERS) + " |", "|---" * (len(COCO_HEADERS) + 3) + "|"]
    for name, (strategy, norm, batch, paper) in PAPER_COCO.items():
        run = read_run(os.path.join(root, name))
        cells = []
        for i, (iou, key) in enumerate(COCO_METRICS):
            value = run.get(iou, {}).get(key) if isinstance(run.get(iou), dict) else None
            cells.append(_cell(run, value, None if paper is None else paper[i]))
        lines.append(f"| {strategy} | {norm} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_error_vs_b(measured: dict, paper: dict, out: str, ylabel: str = "top-1 error (%)", title: str = "") -> str:
    """Error against the normalization batch b per norm: measured (solid) beside the paper's (dashed)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, norm in enumerate(("bn", "brn", "mabn")):
        color = f"C{i}"
        if measured.get(norm):
            bs = sorted(measured[norm], reverse=True)
            ax.plot([str(b) for b in bs], [measured[norm][b] for b in bs], "o-", color=color, label=f"{NORM_NAMES[norm]} (measured)")
        if paper.get(norm):
            bs = sorted(paper[norm], reverse=True)
            ax.plot([str(b) for b in bs], [paper[norm][b] for b in bs], "s--", color=color, alpha=0.5, label=f"{NORM_NAMES[norm]} (paper, ImageNet)")
    ax.set_xlabel("normalization batch b")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagenet", default="runs/imagenet", help="root of the ImageNet runs")
    parser.add_argument("--coco", default="runs/coco", help="root of the COCO runs")
    parser.add_argument("--only", choices=["imagenet", "coco"], help="print only these tables")
    parser.add_argument("--plot", help="write the top-1 error versus b figure to this file")
    args = parser.parse_args(argv)
    if args.only != "coco":
        text, measured = imagenet_tables(args.imagenet)
        print(text + "\n")
        if args.plot:
            print(f"wrote {plot_error_vs_b(measured, PAPER_IMAGENET, args.plot)}\n")
    if args.only != "imagenet":
        print(coco_table(args.coco))
    return 0


if __name__ == "__main__":
    sys.exit(main())
