#!/usr/bin/env python
"""Print every table of the paper as Markdown: the measured value beside the paper's, and the difference.

    python scripts/collect_results.py --imagenet runs/imagenet --coco runs/coco --plot error_vs_b.png

Reads ``metrics.json`` of each run directory (``<root>/<config name>``, the layout that
``scripts/reproduce_imagenet.sh`` / ``reproduce_coco.sh`` create). Runs that are missing or still going
are marked as such. The rows and the paper's figures are those of configs/paper_tables.yaml. ``--plot``
draws top-1 error against the normalization batch b, like the paper's figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import paper_tables  # sibling scripts
from figures import pyplot, save_figure

# Where each column of the COCO table stands in a run's metrics.json.
COCO_METRICS = {"APb": ("bbox", "AP"), "APb50": ("bbox", "AP50"), "APb75": ("bbox", "AP75"),
                "APm": ("segm", "AP"), "APm50": ("segm", "AP50"), "APm75": ("segm", "AP75")}


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


def _paper_cell(run: dict, value, row: dict) -> str:
    return _cell(run, value, row["paper"], row["approximate"])


def _batch_norms() -> list[str]:
    """The norms of the ImageNet table by normalization batch, in its order."""
    return list(dict.fromkeys(row["norm"] for row in paper_tables.rows("imagenet_batch")))


def _batch_table(root: str) -> tuple[list[str], dict]:
    rows = {(row["norm"], row["b"]): row for row in paper_tables.rows("imagenet_batch")}
    b_values = sorted({b for _, b in rows}, reverse=True)
    lines = ["## ImageNet, ResNet-50: top-1 error (%), measured vs paper (difference)", "",
             "| Norm | " + " | ".join(f"b = {b}" for b in b_values) + " |", "|---" * (len(b_values) + 1) + "|"]
    measured: dict = {}
    for norm in _batch_norms():
        cells = []
        for b in b_values:
            row = rows.get((norm, b))
            if row is None:  # a b the paper does not run this norm at
                cells.append("-")
                continue
            run = read_run(os.path.join(root, row["name"]))
            value = run.get("top1_err")
            if value is not None:
                measured.setdefault(norm, {})[b] = value
            cells.append(_paper_cell(run, value, row))
        lines.append(f"| {paper_tables.norm_label(norm)} | " + " | ".join(cells) + " |")
    return lines, measured


def _baselines_table(root: str) -> list[str]:
    lines = ["## ImageNet, batch-independent baselines: top-1 error (%)", "", "| Norm | top-1 error | top-5 error |", "|---|---|---|"]
    for row in paper_tables.rows("imagenet_baselines"):
        run = read_run(os.path.join(root, row["name"]))
        lines.append(f"| {paper_tables.norm_label(row['norm'])} | {_paper_cell(run, run.get('top1_err'), row)} | {_cell(run, run.get('top5_err'))} |")
    return lines


def _ablation_table(root: str) -> list[str]:
    table = paper_tables.table("imagenet_ablation")
    switches = table["switches"]
    lines = ["## ImageNet ablation of MABN at b = 2: top-1 error (%)", "",
             "| " + " | ".join(switches.values()) + " | top-1 error |", "|---" * (len(switches) + 1) + "|"]
    for row in table["rows"]:
        run = read_run(os.path.join(root, row["name"]))
        on = ["yes" if row["switches"][switch] else "no" for switch in switches]
        lines.append("| " + " | ".join(on) + f" | {_paper_cell(run, run.get('top1_err'), row)} |")
    return lines


def imagenet_tables(root: str) -> tuple[str, dict]:
    """The three ImageNet tables as Markdown, and the measured top-1 errors ``{norm: {b: error}}``."""
    batch, measured = _batch_table(root)
    return "\n".join(batch + [""] + _baselines_table(root) + [""] + _ablation_table(root)), measured


def _coco_metric(run: dict, column: str):
    iou, key = COCO_METRICS[column]
    return run.get(iou, {}).get(key) if isinstance(run.get(iou), dict) else None


def coco_table(root: str) -> str:
    table = paper_tables.table("coco")
    columns = table["metrics"]
    lines = ["## COCO, Mask R-CNN R50-FPN, 2x (minival): measured vs paper (difference)", "",
             "| Strategy | Norm | Batch | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for row in table["rows"]:
        run = read_run(os.path.join(root, row["name"]))
        paper = row["paper"] or [None] * len(columns)
        cells = [_cell(run, _coco_metric(run, column), figure) for column, figure in zip(columns, paper)]
        lines.append(f"| {table['strategies'][row['strategy']]} | {paper_tables.norm_label(row['norm'])} | {row['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_and_spread(values) -> tuple[float, float]:
    """A run's figure, or the mean and standard deviation of one figure over seeds (0 for a single seed)."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def error_vs_b_figure(panels: list[dict], ylabel: str = "top-1 error (%)"):
    """Error against the normalization batch b, one panel per dataset, like the paper's figure.

    Each panel is ``{"title": str, "measured": {norm: {b: figure or [figure per seed]}}, "paper": {norm: {b: figure}}}``
    ("measured" and "paper" each optional). b is a number on a log2 axis, largest on the left as in the paper,
    so partial results never reorder it; measured points carry an error bar of one standard deviation over
    seeds, paper figures are dashed.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ticks = set()
        for i, norm in enumerate(_batch_norms()):
            color, label = f"C{i}", paper_tables.norm_label(norm)
            measured, paper = panel.get("measured", {}).get(norm), panel.get("paper", {}).get(norm)
            if measured:
                bs = sorted(measured)
                points = [_mean_and_spread(measured[b]) for b in bs]
                ax.errorbar(bs, [m for m, _ in points], yerr=[s for _, s in points], fmt="o-", color=color, capsize=3,
                            label=f"{label} (measured)" if paper else label)
                ticks.update(bs)
            if paper:
                bs = sorted(paper)
                ax.plot(bs, [paper[b] for b in bs], "s--", color=color, alpha=0.5, label=f"{label} (paper)" if measured else label)
                ticks.update(bs)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(b) for b in sorted(ticks)])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_xlabel("normalization batch b")
        ax.set_ylabel(ylabel)
        ax.set_title(panel["title"])
        ax.legend(fontsize=8)
    return fig


def plot_error_vs_b(panels: list[dict], out: str, ylabel: str = "top-1 error (%)") -> str:
    """Write :func:`error_vs_b_figure` to ``out``."""
    return save_figure(error_vs_b_figure(panels, ylabel), out)


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
            paper = paper_tables.paper_by_norm_and_b(paper_tables.rows("imagenet_batch"))
            panel = {"title": "ImageNet, ResNet-50", "measured": measured, "paper": paper}
            print(f"wrote {plot_error_vs_b([panel], args.plot)}\n")
    if args.only != "imagenet":
        print(coco_table(args.coco))
    return 0


if __name__ == "__main__":
    sys.exit(main())
