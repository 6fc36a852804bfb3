"""The benchmark scripts run end to end on tiny inputs and report every configuration they promise.

Their figures are measured by running them (README, Speed); here only that they work is checked, since
timings on a shared CI machine mean nothing.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench_data  # noqa: E402
import bench_inference  # noqa: E402
import bench_layers  # noqa: E402
import bench_train  # noqa: E402


def test_bench_inference_reports_every_norm_and_the_control(tmp_path, capsys):
    report = tmp_path / "inference.json"
    assert bench_inference.main(["--device", "cpu", "--batches", "1", "2", "--size", "64", "--rounds", "1",
                                 "--min-seconds", "0", "--json", str(report)]) == 0
    results = json.loads(report.read_text())["cpu"]
    assert set(results) == {"1", "2"}
    for row in results.values():
        assert set(row) == {"BN (folded)", "MABN (folded)", "LN", "IN", "GN", bench_inference.CONTROL}
        assert all(v > 0 for v in row.values())
    out = capsys.readouterr().out
    assert "| paper, batch 1 (GPU) | 237.9 (1.00) |" in out and "99.4 (0.42)" in out


def test_bench_train_times_every_configuration_and_the_plain_loop(capsys):
    assert bench_train.main(["--device", "cpu", "--arch", "resnet20", "--size", "32", "--batch", "4", "--steps", "1",
                             "--rounds", "1", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    for name in bench_train.CONFIGS:
        assert f"| {name} |" in out
    assert "trainer / plain" in out and out.count("| BN-32 |") == 2 and out.count("| MABN-2 |") == 2


def test_bench_data_measures_every_pipeline_on_generated_sets(tmp_path, capsys):
    report = tmp_path / "data.json"
    args = ["--root", str(tmp_path / "sets"), "--images", "4", "--coco-images", "2", "--rounds", "1", "--batch", "2",
            "--batches", "1", "--max-workers", "1", "--check", "2", "--json", str(report)]
    assert bench_data.main(args) == 0
    results = json.loads(report.read_text())
    names = [f"cls {p}" for p in bench_data.classification_pipelines()] or ["cls train"]
    assert set(results["pipelines"]) == {*names, "det train"}
    for row in results["pipelines"].values():
        assert row["identical"] and len(row["workers"]) == 1 and row["cores_per_gpu"] >= 1
        assert set(row["per_process"]) == set(bench_data.VARIANTS) and all(v > 0 for v in row["per_process"].values())
    assert results["decoders"]["torchvision.io.decode_jpeg"]["pixels"]  # compared, whatever the libjpeg build gives
    assert [row["masks"] for row in results["det_masks"].values()] == ["reference", "identical"]
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in names) and "cores per GPU" in out
    # A second run reuses the generated files instead of writing new ones.
    files = sorted(p.stat().st_mtime_ns for p in (tmp_path / "sets").rglob("*.*"))
    bench_data.make_imagenet_like(str(tmp_path / "sets" / "imagenet"), 4)
    bench_data.make_coco_like(str(tmp_path / "sets" / "coco"), 2)
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "sets").rglob("*.*")) == files


def test_bench_layers_times_both_policies_of_the_non_finite_rule(monkeypatch, capsys):
    from mabn.layers import functional

    policy = functional.branches_on_flags
    # one input and one layer kind (each kind compiles its graphs twice, once per policy)
    monkeypatch.setattr(bench_layers, "RULE_POLICY_CASES", [((4, 4, 3, 3), 1)])
    monkeypatch.setattr(bench_layers, "RULE_POLICY_KINDS", ("MABN",))
    assert bench_layers.main(["--device", "cpu", "--rule-policies", "--repeats", "1"]) == 0
    assert functional.branches_on_flags is policy  # the library's policy is put back
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4x4x3x3 | 1 |")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert len(cells) == 9 and cells[3:7] == ["-"] * 4  # BN and BRN not asked for
    assert all(cell.endswith("x)") for cell in cells[7:])  # MABN under both policies, as a ratio to nn.BatchNorm2d


def test_bench_layers_takes_the_fixed_cost_apart_and_puts_the_graphs_back(capsys):
    from mabn.layers import fused

    assert bench_layers.main(["--device", "cpu", "--fixed-cost-parts", "--repeats", "2"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("| ") and not line.startswith("| part"):
            label, value = (cell.strip() for cell in line.strip("|").split("|"))
            rows[label] = float(value)
    parts = {name: rows[label] for name, label in bench_layers.FIXED_COST_PARTS.items()}
    assert all(value > 0 for name, value in parts.items() if name != "rest")
    assert parts["MABN without graph calls"] < parts["MABN"]  # the graphs' calls were really left out
    assert parts["inductor"] < parts["runs"]  # inductor's modules run inside the compiled variants
    # the variants are dynamo's compiled ones again, not the timed or replaying stand-ins
    for graph in (fused._compiled(fused._forward), fused._compiled(fused._backward)):
        ids = lambda variants: {(id(guards), id(run)) for guards, run in variants}  # noqa: E731
        assert graph._variants and ids(graph._variants) == ids(graph._known_variants())
