#!/usr/bin/env python
"""The paper's central claim on real data, on a 2-core CPU: small normalization batches with a regular SGD batch.

    python scripts/reproduce_fashion_mnist.py            # about 30 minutes on 2 CPU cores
    python scripts/reproduce_fashion_mnist.py --quick    # about 5 minutes

Fashion-MNIST (the Debian package dataset-fashion-mnist, read offline), a CIFAR-style ResNet-20, gradient
batch N = 32, and the normalization batch b of the paper's ImageNet protocol: BN-32, then BN, BRN and MABN at
b = 2 and b = 1 (configs/cls/fashion_mnist/). Each method trains for the same number of steps with several
seeds; the script prints one table of test error (mean and spread over seeds) beside the paper's ImageNet
pattern, and writes under --out: every run's directory (config, log, TensorBoard, checkpoints, metrics),
results.md / results.json, the test error versus b figure, and the paper's batch-statistics figure
(BN-32 against BN-2 for layer1.0.bn1). Finished runs are skipped, so an interrupted reproduction resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]  # sibling scripts, and the checkout's cls/ (the trainers are not installed)

import paper_tables  # noqa: E402  (sibling scripts)
from collect_results import plot_error_vs_b  # noqa: E402
from plot_batch_stats import plot as plot_batch_statistics  # noqa: E402

from mabn.engine.output_dir import run_finished  # noqa: E402

# The table's rows (configs/paper_tables.yaml), each beside the ImageNet row it stands in for.
TABLE = paper_tables.rows("fashion_mnist")
# (norm, b, config file under configs/) in the order of the table.
ROWS = [(row["norm"], row["b"], row["config"]) for row in TABLE]
PRESETS = {"full": {"steps": 900, "seeds": 2}, "quick": {"steps": 150, "seeds": 1}}
# The paper's ImageNet top-1 error of ResNet-50 for each row's pattern; "~" read off its figure.
PAPER = {(row["norm"], row["b"]): "-" if row["paper"] is None else f"{'~' if row['approximate'] else ''}{row['paper']:g}"
         for row in TABLE}
STATS_RUNS = ("bn_b32", "bn_b2")  # seed 0 of these records the batch statistics of layer1.0.bn1


def run_name(config: str) -> str:
    """``cls/fashion_mnist/bn_b32.yaml`` -> ``bn_b32``: the row's directory under --out."""
    return os.path.splitext(os.path.basename(config))[0]


def run_one(config: str, seed: int, steps: int, directory: str, workers: int) -> dict:
    from cls.train import main as train

    metrics_path = os.path.join(directory, "metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
        if metrics.get("total_steps") != steps:
            raise SystemExit(f"{directory} holds a run of {metrics.get('total_steps')} steps, not {steps}: choose another --out")
        if run_finished(directory):  # the flag and the final model it vouches for
            return metrics
    name = run_name(config)
    args = ["--config", os.path.join(paper_tables.CONFIGS_DIR, config),
            "SEED", str(seed), "SOLVER.MAX_STEPS", str(steps), "OUTPUT_DIR", directory, "DATA.WORKERS", str(workers),
            "LOG.PERIOD", "100"]
    if name in STATS_RUNS and seed == 0:
        args += ["STATS.RECORD", "True", "STATS.LAYERS", "[layer1.0.bn1]"]
    code = train(args)
    if code != 0:
        raise SystemExit(f"{name} (seed {seed}) failed with exit code {code}; see {directory}/log.txt")
    with open(metrics_path) as f:
        return json.load(f)


def summarize(results: dict, steps: int) -> tuple[str, dict]:
    bn32 = statistics.mean(results[("bn", 32)])
    lines = [
        f"Fashion-MNIST test error (%), ResNet-20, gradient batch 32, {steps} steps, mean ± std over seeds",
        "",
        "| Method | b | test error | seeds | gap to BN-32 | paper: ImageNet top-1 error |",
        "|---|---|---|---|---|---|",
    ]
    means = {}
    for norm, b, _ in ROWS:
        errors = results[(norm, b)]
        mean = statistics.mean(errors)
        spread = statistics.stdev(errors) if len(errors) > 1 else float("nan")
        means.setdefault(norm, {})[b] = mean
        spread_text = f" ± {spread:.2f}" if len(errors) > 1 else ""
        lines.append(f"| {paper_tables.norm_label(norm)} | {b} | {mean:.2f}{spread_text} | {len(errors)} | {mean - bn32:+.2f} | {PAPER[(norm, b)]} |")
    return "\n".join(lines), means


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{PRESETS['quick']['seeds']} seed, {PRESETS['quick']['steps']} steps per run")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the preset's)")
    parser.add_argument("--seeds", type=int, help="seeds per method (default: the preset's)")
    parser.add_argument("--out", help="output root (default: runs/fashion_mnist, or runs/fashion_mnist_quick)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading workers per run")
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    steps, seeds = args.steps or preset["steps"], args.seeds or preset["seeds"]
    out = os.path.abspath(args.out or os.path.join(ROOT, "runs", "fashion_mnist_quick" if args.quick else "fashion_mnist"))

    started = time.time()
    results: dict = {}
    total = len(ROWS) * seeds
    for i, (norm, b, config) in enumerate(ROWS):
        for seed in range(seeds):
            done = i * seeds + seed
            print(f"\n[{done + 1}/{total}] {run_name(config)} seed {seed} ({steps} steps; {time.time() - started:.0f}s elapsed)", file=sys.stderr, flush=True)
            metrics = run_one(config, seed, steps, os.path.join(out, run_name(config), f"seed{seed}"), args.workers)
            results.setdefault((norm, b), []).append(metrics["top1_err"])

    table, means = summarize(results, steps)
    elapsed = time.time() - started
    print("\n" + table + f"\n\n({total} runs in {elapsed / 60:.1f} min; logs and TensorBoard under {out})")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"steps": steps, "seeds": seeds, "minutes": elapsed / 60,
                   "test_error": {f"{norm}_b{b}": results[(norm, b)] for norm, b, _ in ROWS}}, f, indent=2)
    figure = plot_error_vs_b(means, paper_tables.paper_by_norm_and_b(TABLE), os.path.join(out, "error_vs_b.png"), "test error (%)",
                             "Fashion-MNIST (measured) and ImageNet (paper)")
    stats = plot_batch_statistics([os.path.join(out, r, "seed0") for r in STATS_RUNS], ["BN, b = 32", "BN, b = 2"],
                                  "layer1.0.bn1", os.path.join(out, "batch_statistics_bn32_vs_bn2.png"))
    print(f"figures: {figure}, {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
