#!/usr/bin/env python
"""Forward + backward time and peak memory of the norm layers, as ratios to nn.BatchNorm2d in the same process.

    python scripts/bench_layers.py                    # CPU, and CUDA when present
    python scripts/bench_layers.py --device cpu --repeats 9 --json bench_layers.json

    python scripts/bench_layers.py --device cpu --fixed-cost   # microseconds per call where arithmetic is nil
    python scripts/bench_layers.py --device cpu --fixed-cost-parts   # where MABN2d's fixed cost goes
    python scripts/bench_layers.py --device cpu --rule-policies   # what branching on the non-finite flags saves

Shapes: ResNet-50's norm inputs at N = 32 (64x56x56, 128x28x28, 256x14x14, 512x7x7 and their 4x-channel
block outputs), a detection shape (N = 2, 256x200x272), small inputs where a layer's fixed cost shows (the
FPN's upper levels at N = 2, 256x25x42 and 256x13x21; 8x64x16x16) and the CIFAR-style ResNet-20's at N = 32
(16x28x28, 32x14x14, 64x7x7, as in the Fashion-MNIST demo). Layers: MABN2d with the fused kernels and with
the reference path, BRN, GN, and the grouped b = 2 and b = 1 variants of BN, BRN and MABN (N > 2; ratios
against ungrouped BN, so they show what a normalization batch of 2 or 1 costs). Every layer runs once per
round, rounds repeat, and the median is reported: these machines are noisy, so only ratios measured side by
side mean anything. ``--fixed-cost`` times forward + backward on a (2, 16, 4, 4) input, where the
arithmetic is negligible: what is left is each layer's fixed cost per call (dispatch, autograd, Python).
``--fixed-cost-parts`` takes MABN2d's apart on that input: the step with its two compiled-graph calls replaced by
their recorded results, and, timed inside those calls, dynamo's guard checks, the compiled variants and
inductor's share of them.
``--rule-policies`` times the grouped layers with the non-finite rule as it runs on the CPU (only the branch
needed, ``functional.branches_on_flags``) and as on an accelerator (both branches, the result picked), side by
side in one process. Peak memory is what one forward + backward allocates on top of its
input and output gradient (CUDA: allocator statistics; CPU, Linux: the peak resident size, in a child
process whose glibc maps every allocation of 64 KiB or more on its own, so that freed memory leaves it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import types

import torch
from torch import nn

from bench_devices import add_device_options, selected_devices, write_report  # sibling script
from mabn import BatchNorm2d, BatchRenorm2d, MABN2d
from mabn.layers import functional, fused

SHAPES = [
    (32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7),
    (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7),
    (2, 256, 200, 272),
    (2, 256, 25, 42), (2, 256, 13, 21), (8, 64, 16, 16),
    (32, 16, 28, 28), (32, 32, 14, 14), (32, 64, 7, 7),
]
FIXED_COST_SHAPE = (2, 16, 4, 4)
GROUPED = ("BN", "BRN", "MABN")
NORM_BATCHES = (2, 1)


def layers_for(channels: int, batch: int) -> dict[str, nn.Module]:
    mabn_options = dict(warmup_iters=0, renorm_warmup_iters=0)  # measure the steady state: SMA and r active
    brn_options = dict(warmup_steps=0)
    layers = {
        "BN": nn.BatchNorm2d(channels),
        "MABN fused": MABN2d(channels, backend="fused", **mabn_options),
        "MABN reference": MABN2d(channels, backend="reference", **mabn_options),
        "BRN": BatchRenorm2d(channels, backend="fused", **brn_options),
        "GN": nn.GroupNorm(min(32, channels), channels),  # ResNet-20 has 16 channels
    }
    for b in NORM_BATCHES:
        if batch % b == 0 and batch > 2:
            layers.update({
                f"BN b={b}": BatchNorm2d(channels, norm_batch_size=b, backend="fused"),
                f"BRN b={b}": BatchRenorm2d(channels, norm_batch_size=b, backend="fused", **brn_options),
                f"MABN b={b}": MABN2d(channels, norm_batch_size=b, backend="fused", **mabn_options),
            })
    return layers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    xi = x.detach().requires_grad_()
    layer(xi).backward(dy)


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def cpu_memories(shapes) -> list[dict]:
    """CPU peak memories, measured in a child process whose glibc maps every allocation of 64 KiB or more
    on its own (MALLOC_MMAP_THRESHOLD_), so that its resident size follows its live tensors; the timings
    run without that setting, which slows allocation down."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    indices = [str(SHAPES.index(tuple(s))) for s in shapes]
    child = subprocess.run([sys.executable, __file__, "--device", "cpu", "--memory-only", "--shapes", *indices],
                           env=env, capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def peak_memory(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> int:
    """Bytes one forward + backward holds at its peak beyond ``x`` and ``dy`` (parameter grads excluded)."""
    layer.zero_grad(set_to_none=False)  # parameter gradients exist already: their memory is not the layer's
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(layer, x, dy)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM); see cpu_memories
    base = _proc_status("VmRSS")
    step(layer, x, dy)
    return _proc_status("VmHWM") - base


def interleaved_times(layers: dict, x, dy, device: torch.device, rounds: int, warmup: int, calls: int = 1,
                      clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per forward + backward of each layer, one figure per round (the mean of ``calls`` calls), the
    layers taking turns round by round so that a machine's changing load reaches them alike. ``warmup``
    calls first compile kernels, fill windows and allocate gradients."""
    for layer in layers.values():
        for _ in range(warmup):
            step(layer, x, dy)
    times = {name: [] for name in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            _sync(device)
            start = clock()
            for _ in range(calls):
                step(layer, x, dy)
            _sync(device)
            times[name].append((clock() - start) / calls)
    return times


def bench_shape(shape, device: torch.device, repeats: int) -> dict:
    """Median forward + backward time of every layer on ``shape``, each layer once per round."""
    n, c, h, w = shape
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    dy = torch.randn(shape, device=device)
    layers = {name: layer.to(device) for name, layer in layers_for(c, n).items()}
    times = interleaved_times(layers, x, dy, device, repeats, warmup=2)
    bn_time = statistics.median(times["BN"])
    return {"shape": list(shape), "layers": {
        name: {"ms": 1e3 * statistics.median(t), "time_ratio": statistics.median(t) / bn_time} for name, t in times.items()
    }}


def memories(shape, device: torch.device) -> dict:
    """Peak memory of every layer on ``shape``: ``{name: bytes}``."""
    x = torch.randn(shape, device=device)
    dy = torch.randn(shape, device=device)
    layers = {name: layer.to(device) for name, layer in layers_for(shape[1], shape[0]).items()}
    for layer in layers.values():
        step(layer, x, dy)
    return {name: peak_memory(layer, x, dy) for name, layer in layers.items()}


def add_memory(result: dict, memory: dict) -> None:
    for name, entry in result["layers"].items():
        entry.update(peak_mb=memory[name] / 2**20, memory_ratio=memory[name] / memory["BN"])


def print_table(device: torch.device, results: list[dict]) -> None:
    names = list(dict.fromkeys(name for r in results for name in r["layers"]))  # grouped ones: N > 2 only
    print(f"\n## {device.type.upper()} ({torch.get_num_threads()} threads)" if device.type == "cpu" else f"\n## CUDA: {torch.cuda.get_device_name(device)}")
    print("forward+backward time / nn.BatchNorm2d (same process, median), BN time in ms; peak memory / BN's in brackets\n")
    print("| shape | BN ms | " + " | ".join(names[1:]) + " |")
    print("|---" * (len(names) + 1) + "|")
    for r in results:
        cells = []
        for name in names[1:]:
            entry = r["layers"].get(name)
            cells.append("-" if entry is None else f"{entry['time_ratio']:.2f}x ({entry['memory_ratio']:.2f}x)")
        n, c, h, w = r["shape"]
        print(f"| {n}x{c}x{h}x{w} | {r['layers']['BN']['ms']:.2f} | " + " | ".join(cells) + " |")
    for b in NORM_BATCHES:
        grouped = [r for r in results if f"MABN b={b}" in r["layers"]]
        if grouped:
            print(f"\ngrouped b = {b} relative to ungrouped BN of the same batch: " + ", ".join(
                f"{name} b={b} max {max(r['layers'][f'{name} b={b}']['time_ratio'] for r in grouped):.2f}x" for name in GROUPED))
    print("MABN fused: max " + f"{max(r['layers']['MABN fused']['time_ratio'] for r in results):.2f}x time, "
          f"max {max(r['layers']['MABN fused']['memory_ratio'] for r in results):.2f}x memory of BN over all shapes")


def fixed_costs(device: torch.device, rounds: int, calls: int = 50) -> dict[str, float]:
    """Microseconds per forward + backward on FIXED_COST_SHAPE: median over rounds of the mean of ``calls``
    calls (one call is too short for the clock), layers taking turns round by round. On the CPU the clock is
    the process's CPU time, which the other processes of a shared machine do not inflate (run it with
    OMP_NUM_THREADS=1: idle worker threads spinning would count); on CUDA, wall time."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    n, c, _, _ = FIXED_COST_SHAPE
    torch.manual_seed(0)
    x = torch.randn(FIXED_COST_SHAPE, device=device)
    dy = torch.randn(FIXED_COST_SHAPE, device=device)
    mabn_options = dict(warmup_iters=0, renorm_warmup_iters=0)
    layers = {
        "BN": nn.BatchNorm2d(c),
        "MABN fused": MABN2d(c, backend="fused", **mabn_options),
        "BRN": BatchRenorm2d(c, backend="fused", warmup_steps=0),
        "BN b=1": BatchNorm2d(c, norm_batch_size=1, backend="fused"),
        "MABN b=1": MABN2d(c, norm_batch_size=1, backend="fused", **mabn_options),
    }
    layers = {name: layer.to(device) for name, layer in layers.items()}
    times = interleaved_times(layers, x, dy, device, rounds, warmup=3, calls=calls, clock=clock)
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def print_fixed_costs(device: torch.device, costs: dict[str, float]) -> None:
    n, c, h, w = FIXED_COST_SHAPE
    clock = f"process CPU time, {torch.get_num_threads()} threads" if device.type == "cpu" else "wall time"
    print(f"\n## {device.type.upper()}: fixed cost per forward + backward ({n}x{c}x{h}x{w} input, median, {clock})\n")
    print("| layer | us per call | minus BN's |")
    print("|---|---|---|")
    for name, us in costs.items():
        print(f"| {name} | {us:.0f} | {us - costs['BN']:+.0f} |")


def _timed(fn, totals: dict, part: str):
    """``fn``, adding the wall time of each call to ``totals[part]`` (nanoseconds)."""
    def timed(*args):
        start = time.perf_counter_ns()
        out = fn(*args)
        totals[part] += time.perf_counter_ns() - start
        return out
    return timed


_ALWAYS_PASSES = types.SimpleNamespace(check=lambda frame_locals: True)  # guards that accept anything


class _FusedGraphs:
    """The variant lists of the fused backend's two graphs, swapped for instrumented or replaying ones.

    ``fused._Graph`` runs the first variant in its list whose guards pass; the lists are shared by every layer
    of a configuration, so each mode of :func:`fixed_cost_parts` sets them before its own steps."""

    def __init__(self):
        self.graphs = [fused._compiled(fused._forward), fused._compiled(fused._backward)]
        self.warm = [graph._variants for graph in self.graphs]

    def plain(self) -> None:
        for graph, variants in zip(self.graphs, self.warm):
            graph._variants = variants

    def timed(self, totals: dict) -> None:
        for graph, variants in zip(self.graphs, self.warm):
            graph._variants = [
                (types.SimpleNamespace(check=_timed(guards.check, totals, "guards")), _timed(run, totals, "runs"))
                for guards, run in variants
            ]

    def record(self) -> list:
        """Variants that keep what the next call of each graph returns (``[forward's, backward's]``)."""
        recorded = [None, None]
        for i, (graph, variants) in enumerate(zip(self.graphs, self.warm)):
            def keep(run, i=i):
                def keeping(*args):
                    recorded[i] = out = run(*args)
                    return out
                return keeping
            graph._variants = [(guards, keep(run)) for guards, run in variants]
        return recorded

    def replay(self, recorded: list) -> None:
        """No guard check, no graph: each call returns the recorded result (outputs written in place are not)."""
        for graph, out in zip(self.graphs, recorded):
            graph._variants = [(_ALWAYS_PASSES, lambda *args, out=out: out)]


class _InductorTimer:
    """Adds the time spent in inductor's compiled modules (its generated Python and the kernels it calls) to
    ``totals['inductor']`` while installed; nothing where this torch has no ``CompiledFxGraph``."""

    def __init__(self, totals: dict):
        try:
            from torch._inductor.output_code import CompiledFxGraph
        except ImportError:
            CompiledFxGraph = None
        self.cls, self.totals = CompiledFxGraph, totals
        self.original = None if CompiledFxGraph is None else CompiledFxGraph.__call__

    def __enter__(self):
        if self.cls is not None:
            self.cls.__call__ = _timed(self.original, self.totals, "inductor")
        return self

    def __exit__(self, *exc):
        if self.cls is not None:
            self.cls.__call__ = self.original


FIXED_COST_PARTS = {
    "nn.BatchNorm2d": "nn.BatchNorm2d, the whole step",
    "MABN": "MABN2d fused, the whole step",
    "MABN without graph calls": "MABN2d without its two graph calls (their recorded results returned instead)",
    "guards": "its graph calls: dynamo's guard checks",
    "runs": "its graph calls: the compiled variants (dynamo's bytecode, AOTAutograd's wrapper, inductor)",
    "inductor": "of which inductor's compiled modules (generated Python and kernels)",
    "rest": "the whole step less the three parts above it",
    "MABN timed": "MABN2d fused with these timers on (what they add)",
}


def fixed_cost_parts(device: torch.device, rounds: int, calls: int = 50) -> dict[str, float]:
    """Microseconds per forward + backward of MABN2d (fused) on FIXED_COST_SHAPE, taken apart: the whole step,
    the step with its two compiled-graph calls replaced by their recorded results (what the layer's Python and
    the autograd Function cost), and, timed inside the calls, the guard checks, the compiled variants and
    inductor's part of those; nn.BatchNorm2d beside them. All modes take turns round by round in one process;
    the whole steps on the clock of --fixed-cost, the parts on the wall clock (run it with OMP_NUM_THREADS=1)."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    torch.manual_seed(0)
    x = torch.randn(FIXED_COST_SHAPE, device=device)
    dy = torch.randn(FIXED_COST_SHAPE, device=device)
    c = FIXED_COST_SHAPE[1]
    bn = nn.BatchNorm2d(c).to(device)
    layer = MABN2d(c, backend="fused", warmup_iters=0, renorm_warmup_iters=0).to(device)
    for _ in range(3):
        step(bn, x, dy)
        step(layer, x, dy)
    graphs = _FusedGraphs()
    recorded = graphs.record()
    step(layer, x, dy)
    totals = {"guards": 0, "runs": 0, "inductor": 0}

    def timed_steps(module, prepare=graphs.plain) -> float:
        prepare()
        _sync(device)
        start = clock()
        for _ in range(calls):
            step(module, x, dy)
        _sync(device)
        return (clock() - start) / calls

    times = {name: [] for name in ("nn.BatchNorm2d", "MABN", "MABN without graph calls", "MABN timed")}
    parts = {name: [] for name in totals}
    try:
        for _ in range(rounds):
            times["nn.BatchNorm2d"].append(timed_steps(bn))
            times["MABN"].append(timed_steps(layer))
            times["MABN without graph calls"].append(timed_steps(layer, lambda: graphs.replay(recorded)))
            totals.update(dict.fromkeys(totals, 0))
            with _InductorTimer(totals):
                times["MABN timed"].append(timed_steps(layer, lambda: graphs.timed(totals)))
            for name in totals:
                parts[name].append(totals[name] * 1e-9 / calls)
    finally:
        graphs.plain()
    result = {name: 1e6 * statistics.median(t) for name, t in times.items()}
    result.update({name: 1e6 * statistics.median(t) for name, t in parts.items()})
    result["rest"] = result["MABN"] - result["MABN without graph calls"] - result["guards"] - result["runs"]
    return result


def print_fixed_cost_parts(device: torch.device, parts: dict[str, float]) -> None:
    n, c, h, w = FIXED_COST_SHAPE
    clock = f"{torch.get_num_threads()} threads" if device.type == "cpu" else "wall time"
    print(f"\n## {device.type.upper()}: where MABN2d's fixed cost goes ({n}x{c}x{h}x{w} input, us per forward + backward, "
          f"median, {clock})\n")
    print("| part | us per step |")
    print("|---|---|")
    for name, label in FIXED_COST_PARTS.items():
        print(f"| {label} | {parts[name]:.1f} |")


# (shape, b) cases of --rule-policies: one group, a few, and the ResNet-20 shapes at b = 2 and 1
RULE_POLICY_CASES = [
    ((2, 16, 4, 4), None), ((2, 16, 4, 4), 1), ((2, 256, 13, 21), None), ((8, 64, 16, 16), 1),
    ((32, 32, 14, 14), 2), ((32, 64, 7, 7), 2), ((32, 64, 7, 7), 1),
]


RULE_POLICY_KINDS = ("BN", "BRN", "MABN")


class _UnderPolicy(nn.Module):
    """``layer`` run with the non-finite rule's policy ``branches``: set in forward, it is still in force when that
    forward's backward runs (every step here is a forward and its backward), and the compiled graphs guard on it,
    so each policy keeps variants of its own."""

    def __init__(self, layer: nn.Module, branches):
        super().__init__()
        self.layer, self.branches = layer, branches

    def forward(self, x):
        functional.branches_on_flags = self.branches
        return self.layer(x)


def rule_policies(device: torch.device, rounds: int) -> list[dict]:
    """Microseconds per forward + backward of grouped BN, BRN and MABN under both policies of the non-finite rule,
    and of nn.BatchNorm2d, all taking turns in one process (process CPU time on the CPU, as --fixed-cost)."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    on_host, on_device = functional.branches_on_flags, (lambda device: False)
    results = []
    try:
        for shape, b in RULE_POLICY_CASES:
            torch.manual_seed(0)
            x, dy = torch.randn(shape, device=device), torch.randn(shape, device=device)
            c = shape[1]
            makers = {
                "BN": lambda: BatchNorm2d(c, norm_batch_size=b, backend="fused"),
                "BRN": lambda: BatchRenorm2d(c, norm_batch_size=b, backend="fused", warmup_steps=0),
                "MABN": lambda: MABN2d(c, norm_batch_size=b, backend="fused", warmup_iters=0, renorm_warmup_iters=0),
            }
            layers = {"nn.BatchNorm2d": _UnderPolicy(nn.BatchNorm2d(c), on_host)}
            for kind in RULE_POLICY_KINDS:
                make = makers[kind]
                if kind == "BN" and b is None:
                    continue  # ungrouped, our BatchNorm2d is nn.BatchNorm2d: no rule to time
                layers[f"{kind} both"] = _UnderPolicy(make(), on_device)
                layers[f"{kind} branch"] = _UnderPolicy(make(), on_host)
            layers = {name: layer.to(device) for name, layer in layers.items()}
            calls = max(1, min(50, 200_000 // x.numel()))
            times = interleaved_times(layers, x, dy, device, rounds, warmup=3, calls=calls, clock=clock)
            results.append({"shape": list(shape), "norm_batch_size": b,
                            "us": {name: 1e6 * statistics.median(t) for name, t in times.items()}})
    finally:
        functional.branches_on_flags = on_host
    return results


def print_rule_policies(device: torch.device, results: list[dict]) -> None:
    clock = f"process CPU time, {torch.get_num_threads()} threads" if device.type == "cpu" else "wall time"
    print(f"\n## {device.type.upper()}: the non-finite rule, both branches (as on an accelerator) against the branch "
          f"needed (as on the CPU); us per forward + backward, median, {clock}; ratios to nn.BatchNorm2d\n")
    print("| shape | b | nn.BatchNorm2d us | BN both | BN branch | BRN both | BRN branch | MABN both | MABN branch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        us = r["us"]
        bn = us["nn.BatchNorm2d"]
        cells = [f"{us[k]:.0f} ({us[k] / bn:.2f}x)" if k in us else "-"
                 for k in ("BN both", "BN branch", "BRN both", "BRN branch", "MABN both", "MABN branch")]
        b = r["norm_batch_size"] or "N"
        print(f"| {'x'.join(map(str, r['shape']))} | {b} | {bn:.0f} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(parser)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--shapes", type=int, nargs="+", help="indices into the shape list (default: all)")
    parser.add_argument("--fixed-cost", action="store_true", help="only the fixed cost per call, in microseconds")
    parser.add_argument("--fixed-cost-parts", action="store_true",
                        help="only where MABN2d's fixed cost goes: guards, compiled variants, the layer's own Python")
    parser.add_argument("--rule-policies", action="store_true",
                        help="only the non-finite rule's two policies (branch needed / both branches), side by side")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the child of cpu_memories
    args = parser.parse_args(argv)
    devices = selected_devices(parser, args.device)
    # the modes that measure one thing on a fixed set of inputs: (measure, print) per device
    modes = {"rule_policies": (rule_policies, print_rule_policies), "fixed_cost": (fixed_costs, print_fixed_costs),
             "fixed_cost_parts": (fixed_cost_parts, print_fixed_cost_parts)}
    mode = next((modes[name] for name in modes if getattr(args, name)), None)
    if mode is not None:
        measure, show = mode
        report = {}
        for device in devices:
            report[device.type] = measured = measure(device, args.repeats)
            show(device, measured)
        write_report(report, args.json)
        return 0
    shapes = [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
    if args.memory_only:
        print(json.dumps([memories(shape, torch.device("cpu")) for shape in shapes]))
        return 0
    report = {}
    for device in devices:
        results = [bench_shape(shape, device, args.repeats) for shape in shapes]
        found = cpu_memories(shapes) if device.type == "cpu" else [memories(s, device) for s in shapes]
        for result, memory in zip(results, found):
            add_memory(result, memory)
        print_table(device, results)
        report[device.type] = results
        sys.stdout.flush()
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
