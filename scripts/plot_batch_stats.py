#!/usr/bin/env python
"""The paper's statistics figure: mu_B, sigma_B^2, g_B and Psi_B of one norm layer over training, two runs side by side.

    python scripts/plot_batch_stats.py runs/bn32 runs/bn2 --layer layer1.0.bn1 --out stats.png

Each run directory must hold TensorBoard logs written with a ``mabn.BatchStatisticsRecorder``
(the trainers do so when ``STATS.RECORD`` is on). Rows share their y range so that the noise of
the two runs can be compared at a glance.
"""
from __future__ import annotations

import argparse
import os
import sys

from figures import pyplot, save_figure  # sibling script

STATISTICS = (("mu", r"$\mu_B$"), ("sigma2", r"$\sigma_B^2$"), ("g", r"$g_B$"), ("psi", r"$\Psi_B$"))


def load_batch_statistics(run_dir: str) -> dict[str, dict[str, tuple[list, list]]]:
    """``{layer: {statistic: (steps, values)}}`` from every TensorBoard event file under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    found: dict[str, dict[str, tuple[list, list]]] = {}
    for directory, _, files in os.walk(run_dir):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        events = EventAccumulator(directory, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if not tag.startswith("batch_stats/"):
                continue
            layer, statistic = tag[len("batch_stats/"):].rsplit("/", 1)
            scalars = events.Scalars(tag)
            steps, values = found.setdefault(layer, {}).setdefault(statistic, ([], []))
            steps.extend(s.step for s in scalars)
            values.extend(s.value for s in scalars)
    if not found:
        raise ValueError(f"no batch statistics (batch_stats/* scalars) in the TensorBoard logs under {run_dir}")
    return found


def plot(runs: list[str], labels: list[str], layer: str | None, out: str) -> str:
    plt = pyplot()
    data = [load_batch_statistics(run) for run in runs]
    layer = layer or sorted(data[0])[0]
    for run, stats in zip(runs, data):
        if layer not in stats:
            raise ValueError(f"layer {layer!r} was not recorded in {run}; recorded: {sorted(stats)}")
    fig, axes = plt.subplots(len(STATISTICS), len(runs), figsize=(5 * len(runs), 9), sharex="col", sharey="row", squeeze=False)
    for col, (stats, label) in enumerate(zip(data, labels)):
        axes[0, col].set_title(f"{label}: {layer}")
        for row, (key, symbol) in enumerate(STATISTICS):
            steps, values = stats[layer].get(key, ([], []))
            axes[row, col].plot(steps, values, linewidth=0.6)
            axes[row, col].set_ylabel(symbol)
        axes[-1, col].set_xlabel("step")
    return save_figure(fig, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (two for the paper's figure)")
    parser.add_argument("--labels", nargs="+", help="column titles (default: the directory names)")
    parser.add_argument("--layer", help="norm layer name (default: the first recorded one)")
    parser.add_argument("--out", default="batch_statistics.png")
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error("give one label per run")
    print(plot(args.runs, labels, args.layer, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
