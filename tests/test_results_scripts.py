"""The results collector and the summary of the Fashion-MNIST reproduction, on hand-made run directories."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import collect_results  # noqa: E402
import reproduce_fashion_mnist  # noqa: E402


def _run(directory, metrics=None, checkpoint=False):
    os.makedirs(directory, exist_ok=True)
    if metrics is not None:
        with open(os.path.join(directory, "metrics.json"), "w") as f:
            json.dump(metrics, f)
    if checkpoint:
        open(os.path.join(directory, "checkpoint.pth"), "wb").close()


def test_collector_prints_measured_beside_paper_and_marks_missing_runs(tmp_path, capsys):
    imagenet, coco = tmp_path / "imagenet", tmp_path / "coco"
    _run(imagenet / "bn_b32", {"top1_err": 23.9, "top5_err": 7.0, "finished": True})
    _run(imagenet / "mabn_b2", {"top1_err": 40.0, "finished": False})
    _run(imagenet / "brn_b2", checkpoint=True)
    _run(imagenet / "gn", {"top1_err": 24.5, "top5_err": 7.5, "finished": True})
    _run(imagenet / "ablation" / "fwdsma_bwdsma_reduced_renorm", {"top1_err": 23.6, "finished": True})
    _run(coco / "scratch_mabn_2", {"bbox": {"AP": 36.0, "AP50": 55.0, "AP75": 40.0}, "segm": {"AP": 32.0, "AP50": 52.0, "AP75": 34.0},
                                   "finished": True})
    plot = tmp_path / "error_vs_b.png"
    assert collect_results.main(["--imagenet", str(imagenet), "--coco", str(coco), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    bn_row = next(line for line in out.splitlines() if line.startswith("| BN |"))
    assert "23.90 vs 23.41 (+0.49)" in bn_row and "missing (paper ~24.30)" in bn_row
    assert "40.00 (unfinished) vs 23.67 (+16.33)" in out
    assert next(line for line in out.splitlines() if line.startswith("| BRN |")).count("unfinished") == 1
    assert "| GN | 24.50 | 7.50 |" in out
    assert "| yes | yes | yes | yes | 23.60 |" in out
    mabn_coco = next(line for line in out.splitlines() if "| MABN | 2 |" in line and "scratch" in line)
    assert "36.00 vs 36.50 (-0.50)" in mabn_coco and "32.00 vs 32.69 (-0.69)" in mabn_coco
    assert plot.stat().st_size > 5000


def test_fashion_mnist_summary_reports_mean_spread_and_gap():
    results = {(norm, b): [10.0 + i, 12.0 + i] for i, (norm, b, _) in enumerate(reproduce_fashion_mnist.ROWS)}
    table, means = reproduce_fashion_mnist.summarize(results, steps=900)
    lines = table.splitlines()
    assert "900 steps" in lines[0]
    assert "| BN | 32 | 11.00 ± 1.41 | 2 | +0.00 | 23.41 |" in lines
    assert "| MABN | 2 | 14.00 ± 1.41 | 2 | +3.00 | 23.67 |" in lines
    assert means["mabn"][1] == 17.0


def test_error_vs_b_axis_is_numeric_log2_whatever_order_the_results_come_in():
    # Partial results, first seen in the order 2, 32, 16, 8, 4, 1: a categorical axis would wrap the curves.
    measured = {"bn": {2: [30.0, 31.0], 32: [24.0, 24.2], 16: [24.5], 8: [25.0], 4: [27.0], 1: [60.0, 40.0]}}
    fig = collect_results.error_vs_b_figure([{"title": "measured", "measured": measured},
                                             {"title": "paper", "paper": {"bn": {32: 23.4, 2: 35.2}}}])
    measured_ax, paper_ax = fig.axes
    assert measured_ax.get_xscale() == "log" and paper_ax.get_xscale() == "log"
    assert [t.get_text() for t in measured_ax.get_xticklabels()] == ["1", "2", "4", "8", "16", "32"]
    assert measured_ax.xaxis_inverted()  # largest b on the left, as in the paper's figure
    line = measured_ax.get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 4, 8, 16, 32]
    assert list(line.get_ydata()) == [50.0, 30.5, 27.0, 25.0, 24.5, 24.1]
    # One error bar per point: the seeds' standard deviation (0 where there is one seed).
    (bars,) = measured_ax.containers
    segments = bars.lines[2][0].get_segments()
    spans = [round(abs(seg[1][1] - seg[0][1]) / 2, 6) for seg in segments]
    assert spans == [round(14.142136, 6), round(0.707107, 6), 0.0, 0.0, 0.0, round(0.141421, 6)]
    assert [t.get_text() for t in paper_ax.get_xticklabels()] == ["2", "32"]
    assert measured_ax.get_title() == "measured" and paper_ax.get_title() == "paper"


def test_fashion_mnist_schedules_name_existing_rows_and_summarize_a_subset():
    for schedule in reproduce_fashion_mnist.SCHEDULES.values():
        assert set(schedule["rows"]) <= set(reproduce_fashion_mnist.ALL_ROWS)
    long = reproduce_fashion_mnist.SCHEDULES["long"]
    assert long["steps"] == 4 * reproduce_fashion_mnist.STEPS_PER_EPOCH and long["seeds"] >= 2
    results = {("mabn", 1): [16.0, 17.0], ("bn", 1): [50.0, 54.0]}
    table, _ = reproduce_fashion_mnist.summarize(results, steps=7500)
    assert "| MABN | 1 | 16.50 ± 0.71 | 2 | - |" in table and "| BN | 32 |" not in table
