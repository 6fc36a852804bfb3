#!/usr/bin/env python
"""The paper's central claim on real data, on a 2-core CPU: small normalization batches with a regular SGD batch.

    python scripts/reproduce_fashion_mnist.py                   # 900 steps per run, about 30 minutes on 2 CPU cores
    python scripts/reproduce_fashion_mnist.py --quick           # 150 steps, one seed: about 5 minutes
    python scripts/reproduce_fashion_mnist.py --schedule long   # 4 epochs (7,500 steps) per run, near convergence

The default schedule is half an epoch: enough to show the pattern, far from convergence (BN-32 ends near 18%
test error, against ~7% after four epochs), so small differences between methods there mean little. The long
schedule trains four epochs with the same cosine schedule, for the rows BN-32, BN-1, BRN-1, MABN-2 and MABN-1
(``--rows`` chooses others) and two seeds; it takes several hours on 2 CPU cores.

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
# The paper's ImageNet top-1 error of ResNet-50 for each row's pattern; "~" read off its figure.
PAPER = {(row["norm"], row["b"]): "-" if row["paper"] is None else f"{'~' if row['approximate'] else ''}{row['paper']:g}"
         for row in TABLE}
STATS_RUNS = ("bn_b32", "bn_b2")  # seed 0 of these records the batch statistics of layer1.0.bn1


def run_name(config: str) -> str:
    """``cls/fashion_mnist/bn_b32.yaml`` -> ``bn_b32``: the row's directory under --out."""
    return os.path.splitext(os.path.basename(config))[0]


ALL_ROWS = [run_name(config) for _, _, config in ROWS]
STEPS_PER_EPOCH = 60_000 // 32  # Fashion-MNIST's training images at the configs' gradient batch of 32
# Training schedules: steps per run, seeds, rows.
SCHEDULES = {
    "default": {"steps": 900, "seeds": 2, "rows": ALL_ROWS},
    "quick": {"steps": 150, "seeds": 1, "rows": ALL_ROWS},
    "long": {"steps": 4 * STEPS_PER_EPOCH, "seeds": 2, "rows": ["bn_b32", "bn_b1", "brn_b1", "mabn_b2", "mabn_b1"]},
}


def run_one(config: str, seed: int, epochs: int, steps: int, directory: str, workers: int) -> dict:
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
            "SEED", str(seed), "SOLVER.EPOCHS", str(epochs), "SOLVER.MAX_STEPS", str(steps), "OUTPUT_DIR", directory, "DATA.WORKERS", str(workers),
            "LOG.PERIOD", "100"]
    if name in STATS_RUNS and seed == 0:
        args += ["STATS.RECORD", "True", "STATS.LAYERS", "[layer1.0.bn1]"]
    code = train(args)
    if code != 0:
        raise SystemExit(f"{name} (seed {seed}) failed with exit code {code}; see {directory}/log.txt")
    with open(metrics_path) as f:
        return json.load(f)


def summarize(results: dict, steps: int) -> tuple[str, dict]:
    bn32 = statistics.mean(results[("bn", 32)]) if ("bn", 32) in results else None
    lines = [
        f"Fashion-MNIST test error (%), ResNet-20, gradient batch 32, {steps} steps, mean ± std over seeds",
        "",
        "| Method | b | test error | seeds | gap to BN-32 | paper: ImageNet top-1 error |",
        "|---|---|---|---|---|---|",
    ]
    means = {}
    for norm, b, _ in ROWS:
        if (norm, b) not in results:  # a row this schedule does not run
            continue
        errors = results[(norm, b)]
        mean = statistics.mean(errors)
        spread = statistics.stdev(errors) if len(errors) > 1 else float("nan")
        means.setdefault(norm, {})[b] = mean
        spread_text = f" ± {spread:.2f}" if len(errors) > 1 else ""
        gap = "-" if bn32 is None else f"{mean - bn32:+.2f}"
        lines.append(f"| {paper_tables.norm_label(norm)} | {b} | {mean:.2f}{spread_text} | {len(errors)} | {gap} | {PAPER[(norm, b)]} |")
    return "\n".join(lines), means


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="default",
                        help="default: 900 steps, 2 seeds, all rows; quick: 150 steps, 1 seed; long: 4 epochs, 2 seeds, 5 rows")
    parser.add_argument("--quick", action="store_const", const="quick", dest="schedule", help="the same as --schedule quick")
    parser.add_argument("--rows", nargs="+", choices=ALL_ROWS, help="the rows to run (default: the schedule's)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the schedule's)")
    parser.add_argument("--seeds", type=int, help="seeds per method (default: the schedule's)")
    parser.add_argument("--out", help="output root (default: runs/fashion_mnist, or runs/fashion_mnist_<schedule>)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading workers per run")
    args = parser.parse_args(argv)
    schedule = SCHEDULES[args.schedule]
    steps, seeds = args.steps or schedule["steps"], args.seeds or schedule["seeds"]
    epochs = -(-steps // STEPS_PER_EPOCH)  # enough epochs for the steps (the cosine schedule spans the steps)
    names = args.rows or schedule["rows"]
    rows = [(norm, b, config) for norm, b, config in ROWS if run_name(config) in names]
    directory = "fashion_mnist" if args.schedule == "default" else f"fashion_mnist_{args.schedule}"
    out = os.path.abspath(args.out or os.path.join(ROOT, "runs", directory))

    started = time.time()
    results: dict = {}
    total = len(rows) * seeds
    for i, (norm, b, config) in enumerate(rows):
        for seed in range(seeds):
            done = i * seeds + seed
            print(f"\n[{done + 1}/{total}] {run_name(config)} seed {seed} ({steps} steps; {time.time() - started:.0f}s elapsed)", file=sys.stderr, flush=True)
            metrics = run_one(config, seed, epochs, steps, os.path.join(out, run_name(config), f"seed{seed}"), args.workers)
            results.setdefault((norm, b), []).append(metrics["top1_err"])

    table, _ = summarize(results, steps)
    elapsed = time.time() - started
    print("\n" + table + f"\n\n({total} runs in {elapsed / 60:.1f} min; logs and TensorBoard under {out})")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"steps": steps, "seeds": seeds, "minutes": elapsed / 60,
                   "schedule": args.schedule, "test_error": {f"{norm}_b{b}": results[(norm, b)] for norm, b, _ in rows}}, f, indent=2)
    per_seed = {}
    for (norm, b), errors in results.items():
        per_seed.setdefault(norm, {})[b] = errors
    panels = [{"title": f"Fashion-MNIST, ResNet-20, {steps} steps (measured)", "measured": per_seed},
              {"title": "ImageNet, ResNet-50 (paper)", "paper": paper_tables.paper_by_norm_and_b(TABLE)}]
    figure = plot_error_vs_b(panels, os.path.join(out, "error_vs_b.png"), "error (%)")
    if not all(name in names for name in STATS_RUNS):  # the statistics figure compares BN-32 with BN-2
        print(f"figure: {figure}")
        return 0
    stats = plot_batch_statistics([os.path.join(out, r, "seed0") for r in STATS_RUNS], ["BN, b = 32", "BN, b = 2"],
                                  "layer1.0.bn1", os.path.join(out, "batch_statistics_bn32_vs_bn2.png"))
    print(f"figures: {figure}, {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
