#!/usr/bin/env python
"""The CUDA acceptance run: one command for whoever has a GPU, at most 10 minutes on one device, a short report.

    python scripts/gpu_check.py                                  # everything, on GPU 0
    python scripts/gpu_check.py --json gpu_check.json            # also the whole report as JSON
    python scripts/gpu_check.py --parts det_mabn bench_layers    # rerun some parts
    python scripts/gpu_check.py --nproc 2                        # trainer runs on 2 GPUs: NCCL, DDP, SyncBN's all-reduce

The CUDA paths of this project (Triton-compiled fused kernels, cuDNN BN as the baseline, fp16 / bf16 autocast,
channels_last, the trainers on CUDA) were written without a GPU. The parts, in this order, each in child
processes under a time budget of its own, so that one that fails or hangs costs only its budget:

  layers           the layer tests that take a device (tests/, ``pytest --device cuda``), with the fused
                   backend: fused against reference in fp32 (b = N, grouped b = 2 and 1, BN and BRN too),
                   channels_last, fp16 and bf16 autocast, no host synchronization, an empty batch, activation
                   checkpointing. They are the CPU tests themselves, tolerances included.
  bench_layers     scripts/bench_layers.py --device cuda: every norm's forward + backward against cuDNN BN
  bench_inference  scripts/bench_inference.py --device cuda: the paper's inference figure
  cls_*, det_*     torchrun of cls/train.py and det/train.py: 30 steps of a paper row's config, SyncBN or MABN,
                   under fp16 or bf16 autocast (each trainer and each norm once with each), on synthetic
                   images / the generated shapes set; then --test-only on model_final.pth, which must agree
                   with the run's own final evaluation

Each part prints a PASS / FAIL / SKIP line as it ends. Then come the summary, the training throughput of
the trainer runs turned into GPU-hours for each table of the paper (configs/paper_tables.yaml), and a
Markdown block to paste into the README. Logs and run directories stay under --workdir; checkpoints are
deleted once checked. MABN_BACKEND is not passed on: the benchmarks and trainers run the default backend.
Compiled kernels are cached on disk (torch.compile's cache), so a rerun of a part is faster than its first run.

Exit codes: 0 every part passed; 1 a part failed, or the time limit left it unrun; 2 bad arguments;
3 no CUDA device here (nothing was run).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # cls/, det/ and mabn/ come from the checkout

import torch  # noqa: E402

import bench_inference  # noqa: E402  (sibling scripts)
import paper_tables  # noqa: E402
from cls.config import get_default_config as cls_defaults  # noqa: E402
from cls.datasets import IMAGENET_TRAIN_IMAGES  # noqa: E402
from det.config import get_default_config as det_defaults  # noqa: E402
from mabn.engine.config import load_config  # noqa: E402

NO_CUDA = 3  # exit code
TIME_LIMIT_S = 570  # default --time-limit: the budgets below add up to less; start-up and report fit in 10 minutes
MIN_PART_S = 20  # a part is not started with less time than this left
TRAIN_STEPS = 30
LOG_PERIOD = 10  # the trainers log images/s per window of this many steps; the last window, after compilation, is the measurement
RECIPE_GPUS = 8  # the paper's runs: 8 GPUs x 32 images (ImageNet), 8 GPUs x 2 images (COCO)
TEST_ONLY_AGREEMENT = 0.5  # points (top-1 % or AP) between --test-only and the run's own last evaluation: the same
# weights on the same images, but GPU kernels need not sum in the same order twice, and that can flip a near tie
FALLBACK_WARNING = "fused kernels unavailable"  # what mabn.layers.fused warns when 'auto' falls back to the reference
TRAINERS = {"cls": cls_defaults, "det": det_defaults}
TRAIN_SCRIPTS = {trainer: os.path.join(ROOT, trainer, "train.py") for trainer in TRAINERS}

# The layer tests run on CUDA (pytest node ids of tests that take the `device` fixture of tests/conftest.py): each CUDA
# path once, since every test compiles kernels of its own (seconds each) and the part has a budget.
LAYER_TESTS = (
    "tests/test_fused.py::test_fused_equals_reference_float32[formal-b=N]",
    "tests/test_fused.py::test_fused_equals_reference_float32[formal-b=2]",
    "tests/test_fused.py::test_fused_equals_reference_float32[classification-b=1]",
    "tests/test_fused.py::test_fused_equals_reference_float32[bn-b=2]",
    "tests/test_fused.py::test_fused_equals_reference_float32[brn-b=2]",
    "tests/test_fused.py::test_fused_channels_last[formal-b=2]",
    "tests/test_fused.py::test_fused_under_autocast_matches_reference",
    "tests/test_fused.py::test_fused_path_never_synchronizes_with_the_host",
    "tests/test_layers.py::test_empty_batch_returns_empty_and_touches_no_buffer",
    "tests/test_layers.py::test_activation_checkpointing_advances_state_once",
)


class CheckFailed(Exception):
    """A part found something wrong; the message says what, and where its log is."""


# ----------------------------------------------------------------------------- child processes
@dataclass
class Child:
    """A child process that has ended, or been stopped at its time limit (``returncode`` None)."""

    command: list
    returncode: Optional[int]
    seconds: float
    stdout_path: str
    stderr_path: str

    def stdout(self) -> str:
        with open(self.stdout_path, errors="replace") as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def require_success(self, what: str) -> None:
        """Raise CheckFailed naming ``what``, how it ended and its last words, unless it exited 0."""
        if self.returncode == 0:
            return
        if self.returncode is None:
            raise CheckFailed(f"{what} did not finish within {self.seconds:.0f} s (log: {self.stderr_path})")
        raise CheckFailed(f"{what} exited with {self.returncode}: {last_words(self.stderr() + self.stdout())} (log: {self.stderr_path})")


# A line that says why a process failed: a Python exception, the trainers' "config error: ..." / "error: ..." (after the
# log's time stamp), pytest's "ERROR: ...". torchrun's own report of a failed worker ends with lines of '=' instead.
_ERROR_LINE = re.compile(r"^[\w.]+(Error|Exception): |(^|\s)(config )?error: ", re.IGNORECASE)


def last_words(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if _ERROR_LINE.search(line) and "ChildFailedError" not in line]
    return (errors or lines or ["no output"])[-1]


def _descendants(pid: int) -> list:
    """Every process below ``pid`` (Linux /proc), whatever its session: torchrun starts its workers in sessions
    of their own, so killing the child's session would leave them running."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state, past the (name)
        except (OSError, ValueError, IndexError):  # not a process, or one that just ended
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the child, everything below it and their process groups (new DataLoader workers included)."""
    for pid in [process.pid, *_descendants(process.pid)]:
        try:
            group = os.getpgid(pid)
            if group != os.getpgrp():
                os.killpg(group, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # already gone


def run_child(command: list, log_prefix: str, timeout: float, env: Optional[dict] = None) -> Child:
    """Run ``command`` from the repository root in a session of its own, stdout and stderr to ``log_prefix``.out
    and .err. At ``timeout`` seconds, or on Ctrl-C, the child and every process it started are killed: torchrun's
    workers, DataLoader workers and compile workers never outlive their part."""
    os.makedirs(os.path.dirname(log_prefix), exist_ok=True)
    stdout_path, stderr_path = f"{log_prefix}.out", f"{log_prefix}.err"
    start = time.monotonic()
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=ROOT, env=env, start_new_session=True)
        try:
            returncode = process.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # also on KeyboardInterrupt, which the child's session does not receive from the terminal
            if process.poll() is None:
                _kill_tree(process)
            process.wait()
    return Child(list(command), returncode, time.monotonic() - start, stdout_path, stderr_path)


def torchrun(nproc: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def figure(value: float) -> str:
    """A measured rate as the report prints it: three significant digits, thousands grouped."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def section_after_heading(text: str) -> str:
    """What a benchmark printed after its first '## ' heading (its description, table and summary lines)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("## ")]
    return "\n".join(lines[starts[0] + 1:]).strip() if starts else ""


# ----------------------------------------------------------------------------- parts
@dataclass
class Outcome:
    status: str  # PASS, FAIL or SKIP
    summary: str  # one line: what the part found, or why it failed
    details: dict = field(default_factory=dict)  # for the JSON report
    markdown: str = ""  # the part's section of the README block
    seconds: float = 0.0
    unrun: bool = False  # a SKIP for want of time: the check is still owed


@dataclass
class Context:
    workdir: str
    nproc: int
    env: dict  # of the children

    def log(self, part: str, name: str) -> str:
        return os.path.join(self.workdir, part, name)


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: int
    check: Callable[[Context, float], Outcome]  # (context, seconds it may take)


def pytest_statuses(output: str) -> dict:
    """``{node id: PASSED / FAILED / ERROR / ...}`` from ``pytest -v`` lines; a test that never ran is absent."""
    return dict(re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", output, re.MULTILINE))


def pytest_messages(output: str) -> dict:
    """``{node id: message}`` of the ``-rfE`` summary lines (``FAILED tests/x.py::test - AssertionError: ...``)."""
    return {node: message for node, message in re.findall(r"^(?:FAILED|ERROR) (tests/\S+::\S+)(?: - (.*))?$", output, re.MULTILINE)}


def check_layers(ctx: Context, timeout: float) -> Outcome:
    command = [sys.executable, "-m", "pytest", "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider", "--device", "cuda", *LAYER_TESTS]
    child = run_child(command, ctx.log("layers", "pytest"), timeout, {**ctx.env, "MABN_BACKEND": "fused"})
    output = child.stdout()
    statuses, messages = pytest_statuses(output), pytest_messages(output)
    passed = [node for node, status in statuses.items() if status == "PASSED"]
    failed = [node for node, status in statuses.items() if status in ("FAILED", "ERROR")]
    details = {"command": command, "tests": statuses, "messages": messages, "log": child.stdout_path}
    names = ", ".join(node.split("::", 1)[1] for node in failed)
    if child.returncode == 0 and passed and len(passed) == len(statuses):
        return Outcome("PASS", f"{len(passed)} layer tests passed on CUDA with the fused backend", details)
    if child.returncode is None:
        summary = f"timed out after {child.seconds:.0f} s with {len(passed)} tests passed" + (f", failed: {names}" if failed else "")
    elif failed:
        first = messages.get(failed[0], "")
        summary = f"{len(failed)} of {len(statuses)} failed: {names}" + (f" ({first[:200]})" if first else "")
    else:  # pytest itself could not run them: not installed, a node id gone, a usage error
        summary = f"pytest exited with {child.returncode}: {last_words(child.stdout() + child.stderr())}"
    return Outcome("FAIL", f"{summary} (log: {child.stdout_path})", details)


def run_benchmark(ctx: Context, name: str, args: list, timeout: float) -> tuple:
    """``(child, figures)``: scripts/<name>.py with ``args`` and --json, and the CUDA figures it wrote."""
    figures_path = ctx.log(name, "figures.json")
    command = [sys.executable, os.path.join(ROOT, "scripts", f"{name}.py"), *args, "--json", figures_path]
    child = run_child(command, ctx.log(name, name), timeout, ctx.env)
    child.require_success(f"scripts/{name}.py")
    with open(figures_path) as f:
        return child, json.load(f)["cuda"]


def _benchmark_markdown(caption: str, child: Child) -> str:
    return f"{caption}\n\n{section_after_heading(child.stdout())}"


def check_bench_layers(ctx: Context, timeout: float) -> Outcome:
    child, results = run_benchmark(ctx, "bench_layers", ["--device", "cuda"], timeout)
    names = dict.fromkeys(name for r in results for name in r["layers"] if name != "BN")  # the b = 2 ones: N = 32 only
    worst = {name: max(r["layers"][name]["time_ratio"] for r in results if name in r["layers"]) for name in names}
    memory = max(r["layers"]["MABN fused"]["memory_ratio"] for r in results)
    summary = (f"worst of {len(results)} shapes, time / cuDNN BN: " + ", ".join(f"{n} {v:.2f}x" for n, v in worst.items())
               + f"; MABN fused memory at most {memory:.2f}x BN's")
    markdown = _benchmark_markdown("Norm layers, forward + backward (`python scripts/bench_layers.py --device cuda`):", child)
    return Outcome("PASS", summary, {"command": child.command, "figures": results}, markdown)


INFERENCE_BATCHES = ("1", "8", "32")


def check_bench_inference(ctx: Context, timeout: float) -> Outcome:
    args = ["--device", "cuda", "--batches", *INFERENCE_BATCHES, "--min-seconds", "1"]
    child, results = run_benchmark(ctx, "bench_inference", args, timeout)
    batch_one = results[INFERENCE_BATCHES[0]]
    bn, paper_bn = batch_one["BN (folded)"], bench_inference.PAPER_IMAGES_PER_S["BN (folded)"]
    others = [name for name in bench_inference.PAPER_IMAGES_PER_S if name != "BN (folded)"]
    summary = (f"batch 1: folded BN {bn:.0f} images/s (paper {paper_bn:.0f}); / BN: "
               + ", ".join(f"{name} {batch_one[name] / bn:.2f}x (paper {bench_inference.PAPER_IMAGES_PER_S[name] / paper_bn:.2f}x)"
                           for name in others))
    markdown = _benchmark_markdown(f"ResNet-50 inference (`python scripts/bench_inference.py {' '.join(args)}`):", child)
    return Outcome("PASS", summary, {"command": child.command, "figures": results}, markdown)


# ----------------------------------------------------------------------------- trainer runs
@dataclass(frozen=True)
class TrainerRun:
    """A paper row's config, run for TRAIN_STEPS steps on CUDA and evaluated again with --test-only."""

    name: str
    trainer: str  # cls or det
    config: str  # under configs/
    norm: str  # the norm it measures: the rows of the paper's tables with this norm get its images/s
    amp: str  # SOLVER.AMP
    budget_s: int
    overrides: tuple = ()  # what turns the row's config into this run's, besides data and length

    def config_path(self) -> str:
        return os.path.join(paper_tables.CONFIGS_DIR, self.config)

    def check(self, ctx: Context, timeout: float) -> Outcome:
        return check_trainer_run(self, ctx, timeout)


# Each trainer and each norm once under fp16 (with the grad scaler) and once under bf16. MABN's fp16 run is the
# detector's: with one normalization batch per step (b = N = 2) a gradient that overflows stays in the backward
# window for m steps, which is where fp16 could hurt.
TRAINER_RUNS = (
    TrainerRun("cls_syncbn", "cls", "cls/bn_b32.yaml", "syncbn", "fp16", 45, ("MODEL.NORM", "syncbn")),
    TrainerRun("cls_mabn", "cls", "cls/mabn_b2.yaml", "mabn", "bf16", 75),
    TrainerRun("det_syncbn", "det", "det/scratch_syncbn_2x8.yaml", "syncbn", "bf16", 65),
    TrainerRun("det_mabn", "det", "det/scratch_mabn_2.yaml", "mabn", "fp16", 85),
)
SHAPES_SET = ("--num-train", "32", "--num-val", "8")  # det.synthetic_shapes: 96 x 128 images, resized to the recipe's 800 px


def row_config(run: TrainerRun):
    """The row's config with the run's overrides: what the run's batch and data workers start from."""
    return load_config(TRAINERS[run.trainer](), run.config_path(), run.overrides)


def trainer_args(run: TrainerRun, cfg, ctx: Context, output_dir: str, shapes_root: str = "") -> list:
    """The trainer's command line after the script: the row's config, then what makes it a short CUDA run."""
    workers_per_process = max(1, (os.cpu_count() or 1) // ctx.nproc - 1)
    if run.trainer == "cls":
        data = ["DATA.DATASET", "synthetic", "DATA.SYNTHETIC_SAMPLES", str(TRAIN_STEPS * cfg.DATA.BATCH_SIZE * ctx.nproc),
                "DATA.WORKERS", str(min(cfg.DATA.WORKERS, workers_per_process)), "SOLVER.MAX_STEPS", str(TRAIN_STEPS),
                "SOLVER.CHANNELS_LAST", "True", "CHECKPOINT.PERIOD_STEPS", "0"]
    else:
        data = ["DATA.ROOT", shapes_root, "DATA.WORKERS", str(min(cfg.DATA.WORKERS, workers_per_process)),
                "SOLVER.MAX_ITER", str(TRAIN_STEPS), "SOLVER.STEPS", f"[{2 * TRAIN_STEPS // 3}]", "SOLVER.WARMUP_ITERS", "10",
                "TEST.EVAL_PERIOD", "0", "CHECKPOINT.PERIOD", "0"]
    return ["--config", run.config_path(), *run.overrides, *data, "DEVICE", "cuda", "DIST.BACKEND", "nccl",
            "SOLVER.AMP", run.amp, "LOG.PERIOD", str(LOG_PERIOD), "LOG.PROGRESS", "False", "OUTPUT_DIR", output_dir]


def images_per_step(run: TrainerRun, cfg, nproc: int) -> int:
    return (cfg.DATA.BATCH_SIZE if run.trainer == "cls" else cfg.SOLVER.IMS_PER_GPU) * nproc


def logged_scalars(output_dir: str) -> dict:
    """``{tag: [(step, value), ...]}`` of the run's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(output_dir, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def throughput(output_dir: str, images_in_step: int, nproc: int) -> dict:
    """Images/s per GPU over the last logged window, and the share of that window spent waiting for data."""
    scalars = logged_scalars(output_dir)
    if "train/images_per_s" not in scalars:
        raise CheckFailed(f"no train/images_per_s in {output_dir}/tensorboard")
    step, images_per_s = scalars["train/images_per_s"][-1]
    data_time = dict(scalars.get("train/data_time", [])).get(step)  # seconds per step, waiting for the loader
    if step != TRAIN_STEPS or data_time is None:
        raise CheckFailed(f"{output_dir}/tensorboard: the last window of train/images_per_s and train/data_time should "
                          f"end at step {TRAIN_STEPS}; images/s ends at step {step}")
    return {"images_per_s_per_gpu": images_per_s / nproc, "data_wait": data_time * images_per_s / images_in_step,
            "window_steps": LOG_PERIOD}


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckFailed(f"{path} was not written")
    with open(path) as f:
        return json.load(f)


# The figures compared between a run's last evaluation (metrics.json) and --test-only (eval.json).
HEADLINES = {"cls": ("top1_err",), "det": ("box_AP", "mask_AP")}


def evaluations(run: TrainerRun, output_dir: str, samples: int) -> dict:
    """The run's final evaluation and the --test-only one, checked for completeness and agreement."""
    final, tested = _read_json(os.path.join(output_dir, "metrics.json")), _read_json(os.path.join(output_dir, "eval.json"))
    done = final.get("step") == final.get("total_steps") == TRAIN_STEPS if run.trainer == "cls" else \
        final.get("iter") == final.get("max_iter") == TRAIN_STEPS
    if not (final.get("finished") and done):
        raise CheckFailed(f"metrics.json does not describe a finished run of {TRAIN_STEPS} steps: {final}")
    if run.trainer == "cls" and not final["samples"] == tested["samples"] == samples:
        raise CheckFailed(f"evaluated {final['samples']} and {tested['samples']} images (--test-only), not {samples}")
    figures = {key: (final[key], tested[key]) for key in HEADLINES[run.trainer]}
    apart = {key: pair for key, pair in figures.items() if abs(pair[0] - pair[1]) > TEST_ONLY_AGREEMENT}
    if apart:
        raise CheckFailed("--test-only disagrees with the run's last evaluation: "
                          + ", ".join(f"{key} {a:.2f} vs {b:.2f}" for key, (a, b) in apart.items()))
    return figures


def check_trainer_run(run: TrainerRun, ctx: Context, timeout: float) -> Outcome:
    start = time.monotonic()

    def left() -> float:
        return timeout - (time.monotonic() - start)

    output_dir = ctx.log(run.name, "run")
    shutil.rmtree(output_dir, ignore_errors=True)  # a trainer resumes what it finds there, and stale metrics would mislead
    shapes_root = ""
    if run.trainer == "det":
        shapes_root = os.path.join(ctx.workdir, "shapes")
        if not os.path.isfile(os.path.join(shapes_root, "annotations", "instances_val2017.json")):  # written last
            command = [sys.executable, "-m", "det.synthetic_shapes", shapes_root, *SHAPES_SET]
            run_child(command, ctx.log(run.name, "shapes"), left(), ctx.env).require_success("python -m det.synthetic_shapes")
    cfg = row_config(run)
    args = trainer_args(run, cfg, ctx, output_dir, shapes_root)
    script = TRAIN_SCRIPTS[run.trainer]
    try:
        train = run_child([*torchrun(ctx.nproc), script, *args], ctx.log(run.name, "train"), left(), ctx.env)
        train.require_success(f"{run.trainer}/train.py")
        if run.norm == "mabn" and FALLBACK_WARNING in train.stderr():
            fallback = next(line for line in train.stderr().splitlines() if FALLBACK_WARNING in line)
            raise CheckFailed(f"MABN ran the reference path, not the fused one: {fallback.strip()}")
        step_images = images_per_step(run, cfg, ctx.nproc)
        speed = throughput(output_dir, step_images, ctx.nproc)
        final_model = os.path.join(output_dir, "model_final.pth")
        tested = run_child([*torchrun(ctx.nproc), script, "--test-only", "--checkpoint", final_model, *args],
                           ctx.log(run.name, "test_only"), left(), ctx.env)
        tested.require_success(f"{run.trainer}/train.py --test-only")
        figures = evaluations(run, output_dir, TRAIN_STEPS * step_images)
    finally:
        for checkpoint in glob.glob(os.path.join(output_dir, "*.pth")):
            os.remove(checkpoint)  # hundreds of MB each; the logs and metrics stay
    agreement = ", ".join(f"{key} {a:.2f} (--test-only {b:.2f})" for key, (a, b) in figures.items())
    summary = (f"{TRAIN_STEPS} steps of {step_images} images, {run.amp}: {figure(speed['images_per_s_per_gpu'])} images/s per GPU "
               f"(data wait {speed['data_wait']:.0%}); {agreement}")
    details = {"config": run.config, "norm": run.norm, "amp": run.amp, "nproc": ctx.nproc, "images_per_step": step_images,
               **speed, "evaluation": {key: {"run": a, "test_only": b} for key, (a, b) in figures.items()},
               "command": [*torchrun(ctx.nproc), script, *args]}
    return Outcome("PASS", summary, details)


def multi_process_skip() -> Outcome:
    return Outcome("SKIP", "one process: the trainers start no process group (no NCCL, no DDP) and SyncBN normalizes like "
                           "BN; NCCL cannot put two ranks on one GPU. On a machine with 2 GPUs: --nproc 2")


# The budgets are estimates for a first run on a fresh machine, where every fused kernel is compiled (the layer
# tests and the MABN runs most of all); they add up to less than TIME_LIMIT_S, so no part is cut short by another.
PARTS = (
    Part("layers", 150, check_layers),
    Part("bench_layers", 85, check_bench_layers),
    Part("bench_inference", 45, check_bench_inference),
    *(Part(run.name, run.budget_s, run.check) for run in TRAINER_RUNS),
)


def run_part(part: Part, ctx: Context, timeout: float) -> Outcome:
    """The part's outcome; whatever goes wrong in it is a FAIL of this part, and the next one runs."""
    start = time.monotonic()
    try:
        outcome = part.check(ctx, timeout)
    except CheckFailed as e:
        outcome = Outcome("FAIL", str(e))
    except Exception as e:  # a bug of this script, or of what it reads: report it and go on
        outcome = Outcome("FAIL", f"{type(e).__name__}: {e}", {"traceback": traceback.format_exc()})
    outcome.seconds = time.monotonic() - start
    return outcome


# ----------------------------------------------------------------------------- GPU-hours of the paper's tables
@dataclass(frozen=True)
class Rate:
    images_per_s: float  # per GPU
    source: str  # the run that measured it


def measured_rates(outcomes: dict) -> dict:
    """``{(trainer, norm): Rate}`` of the trainer runs that passed. A SyncBN run also measures BN: on one process
    it runs BN's kernels, on several it adds the all-reduce (an upper bound on BN's time)."""
    rates = {}
    for run in TRAINER_RUNS:
        outcome = outcomes.get(run.name)
        if outcome is None or outcome.status != "PASS":
            continue
        rate = Rate(outcome.details["images_per_s_per_gpu"], f"{run.name} ({run.amp}, {outcome.details['nproc']} GPU)")
        for norm in (run.norm, "bn") if run.norm == "syncbn" else (run.norm,):
            rates[(run.trainer, norm)] = rate
    return rates


def run_images(config: str) -> Optional[int]:
    """Training images of one run of the row with this config; None for a row that is not a GPU run (the
    Fashion-MNIST stand-ins train on the CPU)."""
    trainer = config.split("/")[0]
    cfg = load_config(TRAINERS[trainer](), os.path.join(paper_tables.CONFIGS_DIR, config))
    if trainer == "det":
        return cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_GPU * RECIPE_GPUS
    if cfg.DATA.DATASET != "imagenet":
        return None
    images = cfg.SOLVER.EPOCHS * IMAGENET_TRAIN_IMAGES
    if cfg.SOLVER.MAX_STEPS is not None:
        images = min(images, cfg.SOLVER.MAX_STEPS * cfg.DATA.BATCH_SIZE * RECIPE_GPUS)
    return images


def gpu_hours(rates: dict) -> list:
    """Per table of the paper with GPU runs: its runs, the GPU-hours of those whose norm has a measured rate
    (a row with another b than the measured run's takes that run's rate), and the norms left unmeasured."""
    tables = []
    for name, table in paper_tables.load()["tables"].items():
        rows = [row for row in table["rows"] if "config" in row]
        images = [run_images(row["config"]) for row in rows]
        if not rows or None in images:
            continue
        hours, unmeasured = [], {}
        for row, count in zip(rows, images):
            norm = row.get("norm", table.get("norm"))  # the ablation names its norm once for the table
            rate = rates.get((row["config"].split("/")[0], norm))
            if rate is None:
                label = paper_tables.norm_label(norm)
                unmeasured[label] = unmeasured.get(label, 0) + 1
            else:
                hours.append(count / rate.images_per_s / 3600)
        tables.append({"table": name, "runs": len(rows), "measured_runs": len(hours), "gpu_hours": sum(hours),
                       "gpu_hours_per_run": [min(hours), max(hours)] if hours else None, "not_measured": unmeasured})
    return tables


def gpu_hours_markdown(tables: list, rates: dict) -> str:
    if not rates:
        return "GPU-hours of the paper's tables: no trainer run passed, so no throughput was measured."
    sources = {}
    for (trainer, norm), rate in rates.items():
        sources.setdefault((rate.source, rate.images_per_s), []).append(paper_tables.norm_label(norm))
    lines = [
        f"GPU-hours of the paper's tables at the images/s per GPU of the trainer runs ("
        + "; ".join(f"{' and '.join(norms)}: {figure(ips)}, measured by {source}" for (source, ips), norms in sources.items())
        + f"). One ImageNet run: {cls_defaults().SOLVER.EPOCHS} epochs of {IMAGENET_TRAIN_IMAGES:,} images; one COCO run: "
          f"{det_defaults().SOLVER.MAX_ITER:,} iterations of {det_defaults().SOLVER.IMS_PER_GPU * RECIPE_GPUS} images. "
          f"Assumes the data pipeline keeps up and linear scaling to {RECIPE_GPUS} GPUs; a row at another b takes its norm's "
          "rate; SyncBN measured on one GPU leaves out its all-reduce.",
        "",
        f"| table | runs | runs measured | GPU-hours per run | GPU-hours, measured runs | hours on {RECIPE_GPUS} GPUs | not measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in tables:
        per_run = "-"
        if t["gpu_hours_per_run"] is not None:
            low, high = (f"{h:,.0f}" for h in t["gpu_hours_per_run"])
            per_run = low if low == high else f"{low}-{high}"
        missing = ", ".join(f"{label} ({count})" for label, count in t["not_measured"].items()) or "-"
        lines.append(f"| {t['table']} | {t['runs']} | {t['measured_runs']} | {per_run} | {t['gpu_hours']:,.0f} | "
                     f"{t['gpu_hours'] / RECIPE_GPUS:,.1f} | {missing} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the report
def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        nccl = torch.cuda.nccl.version()
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception:  # a build without NCCL
        nccl = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"gpu": props.name, "gpus_visible": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "nccl": nccl, "triton": triton_version,
            "python": platform.python_version(), "cpus": os.cpu_count(), "date": datetime.date.today().isoformat()}


def describe_environment(env: dict) -> str:
    return (f"{env['gpu']} ({env['memory_gib']} GiB, compute capability {env['capability']}, {env['gpus_visible']} visible), "
            f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, NCCL {env['nccl']}, Triton {env['triton']}, "
            f"{env['cpus']} CPUs")


def status_line(progress: str, name: str, outcome: Outcome, budget_s: Optional[int] = None) -> str:
    took = f"{outcome.seconds:.0f}" + ("" if budget_s is None else f"/{budget_s}") + " s"
    return f"{progress:>5} {outcome.status:<4}  {name:<16} {took:>9}  {outcome.summary}"


def markdown_block(env: dict, outcomes: dict, hours: str, elapsed: float, nproc: int) -> str:
    passed = sum(o.status == "PASS" for o in outcomes.values())
    lines = [
        f"**GPU check, {env['gpu']}** ({env['date']}; `python scripts/gpu_check.py`"
        + (f" --nproc {nproc}" if nproc > 1 else "") + f": {describe_environment(env)}): "
        f"{passed} of {len(outcomes)} parts passed in {elapsed / 60:.1f} min.",
        "",
        "| part | result | seconds | what it found |",
        "|---|---|---|---|",
        *(f"| {name} | {o.status} | {o.seconds:.0f} | {o.summary.replace('|', '/')} |" for name, o in outcomes.items()),
    ]
    sections = [o.markdown for o in outcomes.values() if o.markdown] + ([hours] if hours else [])
    return "\n".join(lines) + "".join(f"\n\n{section}" for section in sections)


def exit_code(outcomes: dict) -> int:
    return 1 if any(o.status == "FAIL" or o.unrun for o in outcomes.values()) else 0


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], help="run only these parts (default: all)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) of the trainer runs (default: 1)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help=f"seconds for all parts (default: {TIME_LIMIT_S})")
    parser.add_argument("--workdir", help="logs and run directories (default: a new temporary directory)")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be positive, got {args.nproc}")
    if torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
        parser.error(f"--nproc {args.nproc}, but only {torch.cuda.device_count()} GPU(s) are visible")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, built with CUDA {torch.version.cuda}; "
              "torch.cuda.is_available() is False). This script checks the CUDA paths and needs an NVIDIA GPU; "
              "nothing was run.", file=sys.stderr)
        return NO_CUDA
    start = time.monotonic()
    deadline = start + args.time_limit
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(workdir, exist_ok=True)
    child_env = {key: value for key, value in os.environ.items() if key != "MABN_BACKEND"}
    child_env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    ctx = Context(workdir, args.nproc, child_env)
    env = environment()
    parts = [p for p in PARTS if args.parts is None or p.name in args.parts]
    plan = ", ".join(f"{p.name} {p.budget_s} s" for p in parts)
    print(f"gpu_check on {describe_environment(env)}\nlogs: {workdir}\n{len(parts)} parts within {args.time_limit:.0f} s: {plan}\n",
          flush=True)

    def write_report(**results) -> None:  # after every part too: a run stopped from outside keeps what it found
        if args.json:
            report = {"environment": env, "nproc": args.nproc, "time_limit_s": args.time_limit, "workdir": workdir,
                      "seconds": time.monotonic() - start, "parts": {name: asdict(o) for name, o in outcomes.items()}, **results}
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)

    outcomes = {}
    for index, part in enumerate(parts, 1):
        left = deadline - time.monotonic()
        if left < MIN_PART_S:
            outcome = Outcome("SKIP", f"no time left ({left:.0f} s of --time-limit {args.time_limit:.0f})", unrun=True)
        else:
            outcome = run_part(part, ctx, min(part.budget_s, left))
        outcomes[part.name] = outcome
        print(status_line(f"{index}/{len(parts)}", part.name, outcome, part.budget_s), flush=True)
        write_report(exit_code=None)  # not finished
    trainer_runs = [run.name for run in TRAINER_RUNS if run.name in outcomes]
    if trainer_runs and args.nproc == 1:
        outcomes["multi_process"] = multi_process_skip()
        print(status_line("-", "multi_process", outcomes["multi_process"]))

    rates = measured_rates(outcomes)
    tables = gpu_hours(rates) if trainer_runs else []
    hours = gpu_hours_markdown(tables, rates) if trainer_runs else ""
    elapsed = time.monotonic() - start
    code = exit_code(outcomes)
    counts = {status: sum(o.status == status for o in outcomes.values()) for status in ("PASS", "FAIL", "SKIP")}
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {elapsed / 60:.1f} min; exit code {code}\n")
    if hours:
        print(hours)
    print("\n----- Markdown for the README (Speed section) -----\n")
    print(markdown_block(env, outcomes, hours, elapsed, args.nproc))
    write_report(exit_code=code, rates=[{"trainer": t, "norm": n, **asdict(r)} for (t, n), r in rates.items()], gpu_hours=tables)
    return code


if __name__ == "__main__":
    sys.exit(main())
