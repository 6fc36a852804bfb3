"""scripts/gpu_check.py on a machine without a GPU: it refuses clearly, and what it computes from its parts is right.

Its parts need CUDA; what is checked here is everything around them: the exit without CUDA, the time limit of a
child process, the layer tests it names, its trainer command lines against the trainers' own config checks,
the throughput and evaluations read back from a run directory, the GPU-hours arithmetic and the report.
"""
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from cls.train import check_config as check_cls_config
from det.train import check_config as check_det_config
from mabn.engine.config import load_config
from mabn.engine.launch import parse_args
from mabn.layers import fused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_check  # noqa: E402
from gpu_check import CheckFailed, Outcome, Rate  # noqa: E402

IMAGENET_RUN = 120 * 1_281_167  # the paper's recipe: 120 epochs of ImageNet-1k
COCO_RUN = 180_000 * 16  # 180k iterations of 16 images


def test_without_cuda_it_says_so_and_exits_with_code_3(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--json", str(tmp_path / "report.json")]) == gpu_check.NO_CUDA == 3
    err = capsys.readouterr().err
    assert "no CUDA device here" in err and "nothing was run" in err
    assert not (tmp_path / "report.json").exists()


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waits for init to reap it
    except FileNotFoundError:
        return True


def test_a_child_past_its_time_limit_is_stopped_with_all_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # the grandchild in a session of its own, as torchrun starts its workers
    code = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60'], start_new_session=True); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    start = time.monotonic()
    child = gpu_check.run_child([sys.executable, "-c", code], str(tmp_path / "logs" / "sleeper"), timeout=5)
    assert child.returncode is None and time.monotonic() - start < 15
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not _dead(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dead(grandchild), "the sleeper's own child outlived the time limit"
    with pytest.raises(CheckFailed, match=r"^sleeper did not finish within \d+ s \(log: .*sleeper\.err\)$"):
        child.require_success("sleeper")

    failing = gpu_check.run_child([sys.executable, "-c", "import sys; sys.exit('config error: no such key')"],
                                  str(tmp_path / "logs" / "failing"), timeout=60)
    with pytest.raises(CheckFailed, match=r"^failing exited with 1: config error: no such key \(log: "):
        failing.require_success("failing")


def test_the_layer_tests_it_runs_exist_and_take_the_device():
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *gpu_check.LAYER_TESTS],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    for node in gpu_check.LAYER_TESTS:
        assert any(i == node or i.startswith(node + "[") for i in ids), node
        path, name = node.split("::")
        test = getattr(importlib.import_module(os.path.basename(path)[:-3]), name.split("[")[0])
        assert "device" in inspect.signature(test).parameters, f"{node} does not take the device fixture"


PYTEST_OUTPUT = """\
tests/test_fused.py::test_fused_channels_last[formal-b=2] PASSED                               [ 33%]
tests/test_layers.py::test_empty_batch_returns_empty_and_touches_no_buffer[brn] FAILED         [ 66%]
tests/test_layers.py::test_activation_checkpointing_advances_state_once[False] ERROR           [100%]
=========================== short test summary info ============================
FAILED tests/test_layers.py::test_empty_batch_returns_empty_and_touches_no_buffer[brn] - AssertionError: running_mean
ERROR tests/test_layers.py::test_activation_checkpointing_advances_state_once[False] - RuntimeError: CUDA error
"""


def test_pytest_results_are_read_from_its_verbose_output():
    assert gpu_check.pytest_statuses(PYTEST_OUTPUT) == {
        "tests/test_fused.py::test_fused_channels_last[formal-b=2]": "PASSED",
        "tests/test_layers.py::test_empty_batch_returns_empty_and_touches_no_buffer[brn]": "FAILED",
        "tests/test_layers.py::test_activation_checkpointing_advances_state_once[False]": "ERROR",
    }
    assert gpu_check.pytest_messages(PYTEST_OUTPUT) == {
        "tests/test_layers.py::test_empty_batch_returns_empty_and_touches_no_buffer[brn]": "AssertionError: running_mean",
        "tests/test_layers.py::test_activation_checkpointing_advances_state_once[False]": "RuntimeError: CUDA error",
    }


def test_the_fallback_it_looks_for_is_what_the_backend_switch_warns(monkeypatch):
    monkeypatch.delenv("MABN_BACKEND", raising=False)
    monkeypatch.setattr(fused, "_fused_works", {})
    monkeypatch.setattr(fused, "_run_probe", lambda device: 1 / 0)
    with pytest.warns(UserWarning, match=gpu_check.FALLBACK_WARNING):
        fused.select("auto", torch.device("cpu"))


@pytest.mark.parametrize("nproc", [1, 2])
def test_trainer_command_lines_pass_the_trainers_config_checks(tmp_path, nproc):
    ctx = gpu_check.Context(str(tmp_path), nproc, env={})
    checks = {"cls": check_cls_config, "det": check_det_config}
    for run in gpu_check.TRAINER_RUNS:
        args = gpu_check.trainer_args(run, gpu_check.row_config(run), ctx, str(tmp_path / run.name), str(tmp_path / "shapes"))
        for argv in (args, ["--test-only", "--checkpoint", "model_final.pth", *args]):
            parsed = parse_args(argv, "")
            cfg = load_config(gpu_check.TRAINERS[run.trainer](), parsed.config, parsed.opts)
            checks[run.trainer](cfg, parsed.test_only)
        assert (cfg.DEVICE, cfg.DIST.BACKEND, cfg.MODEL.NORM, cfg.SOLVER.AMP) == ("cuda", "nccl", run.norm, run.amp)
        assert cfg.OUTPUT_DIR == str(tmp_path / run.name)
        if run.trainer == "cls":  # one epoch of 30 steps on every process
            assert cfg.SOLVER.MAX_STEPS == 30 and cfg.DATA.SYNTHETIC_SAMPLES == 30 * cfg.DATA.BATCH_SIZE * nproc
        else:
            assert cfg.SOLVER.MAX_ITER == 30 and cfg.DATA.ROOT == str(tmp_path / "shapes")
        assert gpu_check.images_per_step(run, cfg, nproc) == nproc * (32 if run.trainer == "cls" else 2)
    # each trainer and each norm once under fp16 (with its grad scaler) and once under bf16
    for key in ("trainer", "norm"):
        pairs = {(getattr(run, key), run.amp) for run in gpu_check.TRAINER_RUNS}
        assert pairs == {(value, amp) for value, _ in pairs for amp in ("fp16", "bf16")}


def _write_run(directory, images_per_s, data_time, final, tested, steps=(10, 20, 30)):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory / "tensorboard"))
    for step in steps:
        writer.add_scalar("train/images_per_s", images_per_s if step == steps[-1] else 1.0, step)  # compiling slows the first
        writer.add_scalar("train/data_time", data_time, step)
    writer.close()
    (directory / "metrics.json").write_text(json.dumps(final))
    (directory / "eval.json").write_text(json.dumps(tested))


def test_throughput_and_evaluations_are_read_back_from_the_run_directory(tmp_path):
    cls_run = next(run for run in gpu_check.TRAINER_RUNS if run.trainer == "cls")
    final = {"finished": True, "step": 30, "total_steps": 30, "samples": 1920, "top1_err": 99.9}
    _write_run(tmp_path, 3000.0, 0.002, final, {"samples": 1920, "top1_err": 99.8})
    speed = gpu_check.throughput(str(tmp_path), images_in_step=64, nproc=2)
    assert speed["images_per_s_per_gpu"] == pytest.approx(1500.0)  # the last window, per GPU
    assert speed["data_wait"] == pytest.approx(0.002 * 3000 / 64)  # seconds waiting per step x steps per second
    assert gpu_check.evaluations(cls_run, str(tmp_path), 1920) == {"top1_err": (99.9, 99.8)}

    (tmp_path / "eval.json").write_text(json.dumps({"samples": 1920, "top1_err": 97.0}))
    with pytest.raises(CheckFailed, match=r"--test-only disagrees with the run's last evaluation: top1_err 99.90 vs 97.00"):
        gpu_check.evaluations(cls_run, str(tmp_path), 1920)
    (tmp_path / "metrics.json").write_text(json.dumps({**final, "step": 12}))
    with pytest.raises(CheckFailed, match="does not describe a finished run of 30 steps"):
        gpu_check.evaluations(cls_run, str(tmp_path), 1920)
    short = tmp_path / "short"
    _write_run(short, 3000.0, 0.002, final, final, steps=(10, 20))
    with pytest.raises(CheckFailed, match="should end at step 30; images/s ends at step 20"):
        gpu_check.throughput(str(short), images_in_step=64, nproc=2)


def test_rates_come_from_the_trainer_runs_that_passed():
    outcomes = {
        "cls_syncbn": Outcome("PASS", "", {"images_per_s_per_gpu": 2000.0, "nproc": 1}),
        "cls_mabn": Outcome("FAIL", "exited with 3"),
        "det_mabn": Outcome("PASS", "", {"images_per_s_per_gpu": 10.0, "nproc": 1}),
    }
    rates = gpu_check.measured_rates(outcomes)
    assert set(rates) == {("cls", "syncbn"), ("cls", "bn"), ("det", "mabn")}  # one-process SyncBN runs BN's kernels
    assert rates[("cls", "bn")] == Rate(2000.0, "cls_syncbn (fp16, 1 GPU)")


def test_gpu_hours_of_every_table_of_the_paper_with_gpu_runs():
    rates = {("cls", "bn"): Rate(2000.0, "a"), ("cls", "mabn"): Rate(1000.0, "b"), ("det", "mabn"): Rate(10.0, "c")}
    tables = {t["table"]: t for t in gpu_check.gpu_hours(rates)}
    assert list(tables) == ["imagenet_batch", "imagenet_baselines", "imagenet_ablation", "coco"]  # Fashion-MNIST: CPU runs
    batch = tables["imagenet_batch"]
    assert (batch["runs"], batch["measured_runs"], batch["not_measured"]) == (16, 11, {"BRN": 5})
    assert batch["gpu_hours"] == pytest.approx((5 * IMAGENET_RUN / 2000 + 6 * IMAGENET_RUN / 1000) / 3600)
    assert batch["gpu_hours_per_run"] == pytest.approx([IMAGENET_RUN / 2000 / 3600, IMAGENET_RUN / 1000 / 3600])
    ablation = tables["imagenet_ablation"]  # the table names its norm once, for all 16 rows
    assert (ablation["measured_runs"], ablation["gpu_hours"]) == (16, pytest.approx(16 * IMAGENET_RUN / 1000 / 3600))
    baselines = tables["imagenet_baselines"]
    assert (baselines["measured_runs"], baselines["gpu_hours"], baselines["gpu_hours_per_run"]) == (0, 0, None)
    assert baselines["not_measured"] == {"GN": 1, "LN": 1, "IN": 1}
    coco = tables["coco"]
    assert (coco["runs"], coco["measured_runs"]) == (7, 2)  # MABN from scratch and fine-tuned
    assert coco["gpu_hours"] == pytest.approx(2 * COCO_RUN / 10 / 3600)
    assert coco["not_measured"] == {"BN": 1, "BRN": 1, "SyncBN": 2, "GN": 1}

    markdown = gpu_check.gpu_hours_markdown(list(tables.values()), rates)
    assert f"| imagenet_ablation | 16 | 16 | {IMAGENET_RUN / 1000 / 3600:,.0f} | {16 * IMAGENET_RUN / 1000 / 3600:,.0f} |" in markdown
    assert "| imagenet_baselines | 3 | 0 | - | 0 | 0.0 | GN (1), LN (1), IN (1) |" in markdown
    assert f"| imagenet_batch | 16 | 11 | {IMAGENET_RUN / 2000 / 3600:,.0f}-{IMAGENET_RUN / 1000 / 3600:,.0f} |" in markdown
    assert gpu_check.gpu_hours_markdown([], {}).endswith("no throughput was measured.")


ENVIRONMENT = {"gpu": "NVIDIA H200", "gpus_visible": 1, "memory_gib": 139.8, "capability": "9.0", "torch": "2.14.1",
               "cuda": "12.8", "cudnn": 91000, "nccl": "2.27.3", "triton": "3.5.0", "python": "3.11.7", "cpus": 16,
               "date": "2026-12-01"}


def test_status_lines_exit_code_and_markdown_block():
    outcomes = {
        "layers": Outcome("PASS", "14 layer tests passed on CUDA", seconds=81.6),
        "bench_layers": Outcome("FAIL", "scripts/bench_layers.py exited with 1: a | b", seconds=90.0),
        "det_mabn": Outcome("SKIP", "no time left (12 s of --time-limit 570)", unrun=True),
        "multi_process": gpu_check.multi_process_skip(),
    }
    assert gpu_check.status_line("1/3", "layers", outcomes["layers"], 160) == "  1/3 PASS  layers            82/160 s  14 layer tests passed on CUDA"
    assert gpu_check.status_line("-", "multi_process", outcomes["multi_process"]).startswith("    - SKIP  multi_process          0 s  one process")
    assert gpu_check.exit_code(outcomes) == 1
    assert gpu_check.exit_code({k: outcomes[k] for k in ("layers", "multi_process")}) == 0  # one GPU cannot do more
    assert gpu_check.exit_code({"det_mabn": outcomes["det_mabn"]}) == 1  # a part left unrun is still owed

    block = gpu_check.markdown_block(ENVIRONMENT, outcomes, "GPU-hours table", 312.0, 1)
    assert block.startswith("**GPU check, NVIDIA H200** (2026-12-01; `python scripts/gpu_check.py`: NVIDIA H200 (139.8 GiB")
    assert "1 of 4 parts passed in 5.2 min." in block
    assert "| bench_layers | FAIL | 90 | scripts/bench_layers.py exited with 1: a / b |" in block  # no stray table cell
    assert block.endswith("\n\nGPU-hours table")


def test_a_benchmark_section_is_what_follows_its_heading():
    printed = "compiling...\n\n## CUDA: NVIDIA H200\nforward+backward time / BN\n\n| shape | BN ms |\n|---|---|\n| 2x3 | 0.10 |\n"
    assert gpu_check.section_after_heading(printed) == "forward+backward time / BN\n\n| shape | BN ms |\n|---|---|\n| 2x3 | 0.10 |"
    assert gpu_check.section_after_heading("no table\n") == ""


TORCHRUN_FAILURE = """\
2026-12-01 10:00:01 training 30 steps (30 per epoch) at lr 0.0125 on 1 process(es) x 32 images
Traceback (most recent call last):
  File "cls/train.py", line 380, in <module>
RuntimeError: CUDA error: no kernel image is available for execution on the device
E1201 10:00:02.503000 77 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
cls/train.py FAILED
============================================================
"""


def test_a_failure_is_reported_by_its_error_line_not_by_torchruns_report():
    assert gpu_check.last_words(TORCHRUN_FAILURE) == "RuntimeError: CUDA error: no kernel image is available for execution on the device"
    nan = "2026-12-01 10:00:05 error: loss is nan at epoch 0, step 3; stopping.\nE1201 worker failed (exitcode: 3)\n"
    assert gpu_check.last_words(nan) == "2026-12-01 10:00:05 error: loss is nan at epoch 0, step 3; stopping."
    assert gpu_check.last_words("config error: unknown key SOLVER.AMPP\n") == "config error: unknown key SOLVER.AMPP"
    assert gpu_check.last_words("done\n\n") == "done" and gpu_check.last_words("") == "no output"


def test_main_runs_each_part_within_the_time_left_keeps_going_and_reports(monkeypatch, capsys, tmp_path):
    def slow(ctx, timeout):
        time.sleep(0.6)
        return Outcome("PASS", f"took its time, allowed {timeout:.1f} s")

    def broken(ctx, timeout):
        raise KeyError("images_per_s")

    parts = (gpu_check.Part("broken", 1, broken), gpu_check.Part("slow", 100, slow), gpu_check.Part("late", 100, slow))
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    monkeypatch.setattr(gpu_check, "MIN_PART_S", 0.5)
    monkeypatch.setattr(gpu_check, "environment", lambda: ENVIRONMENT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    report = tmp_path / "report.json"
    code = gpu_check.main(["--time-limit", "1", "--workdir", str(tmp_path / "work"), "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 1
    assert "  1/3 FAIL  broken" in out and "KeyError: 'images_per_s'" in out
    assert "  2/3 PASS  slow" in out  # the next part runs, its budget of 100 s cut to the time left
    assert 0.5 <= float(re.search(r"took its time, allowed ([\d.]+) s", out).group(1)) <= 1.0
    assert "  3/3 SKIP  late" in out and "no time left" in out
    assert "multi_process" not in out and "GPU-hours" not in out  # no trainer run was asked for
    assert "1 passed, 1 failed, 1 skipped" in out and "| broken | FAIL |" in out
    written = json.loads(report.read_text())
    assert written["exit_code"] == 1 and list(written["parts"]) == ["broken", "slow", "late"]
    assert "Traceback" in written["parts"]["broken"]["details"]["traceback"] and written["parts"]["late"]["unrun"]


def test_every_part_gets_its_whole_budget_within_the_ten_minutes():
    assert sum(part.budget_s for part in gpu_check.PARTS) + gpu_check.MIN_PART_S <= gpu_check.TIME_LIMIT_S < 600
    assert [part.name for part in gpu_check.PARTS][:3] == ["layers", "bench_layers", "bench_inference"]
    assert {part.name for part in gpu_check.PARTS} >= {run.name for run in gpu_check.TRAINER_RUNS}
